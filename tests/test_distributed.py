"""Data parallelism with torch.distributed (gloo, 2 CPU processes): identical weights on every rank, the same
weights as one process with the global batch, byte-identical evaluation tables, and resume after a killed rank."""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from rl_adapt import distributed as dist
from rl_adapt.engine.ppo import PixelPPO, PPOConfig
from rl_adapt.engine.run_state import RunState
from rl_adapt.engine.stages import Stages
from rl_adapt.io_utils import atomic_path
from rl_adapt.policies.nnunet import load_model_folder

SIZE, K = 16, 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _blobs(n: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    labels = np.zeros((n, SIZE, SIZE), np.int64)
    for i in range(n):
        cy, cx = g.uniform(5, 11, 2)
        labels[i][(yy - cy) ** 2 + (xx - cx) ** 2 < 16] = 1
        labels[i][(yy - cy) ** 2 + (xx - cx) ** 2 < 4] = 2
    images = labels.astype(np.float32) + g.normal(0, 0.6, labels.shape).astype(np.float32)
    return torch.from_numpy(images)[:, None], torch.from_numpy(labels)


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, K, 3, padding=1))


def _ppo_phase(world: dist.World, n_envs: int, batch_size: int, images_per_rank: int, out: Path) -> None:
    torch.set_num_threads(1)
    images, labels = _blobs()

    def reward(imgs, actions, indices):
        return (actions == labels[indices]).float()

    cfg = PPOConfig(lr=3e-3, n_envs=n_envs, n_steps=2, n_epochs=2, batch_size=batch_size, sampling="per_image",
                    normalize_advantage=True, ent_coef=0.01)
    model = PixelPPO.from_network(_net(), images, reward, cfg, device="cpu", seed=3, world=world)
    model.learn(images_per_rank)
    torch.save({k: v.detach().clone() for k, v in model.policy.network.state_dict().items()},
               out / f"rank{world.rank}.pt")


def _worker(rank: int, size: int, port: int, fn_args: tuple, fn=_ppo_phase) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(size),
                      LOCAL_RANK=str(rank))
    world = dist.setup("cpu")
    clean = False
    try:
        fn(world, *fn_args)
        clean = True
    finally:
        dist.teardown(world, clean)


class _SlowToSave:
    """A stage result whose file takes rank 0 a while to write (as a policy's weights do on a busy machine)."""

    def __init__(self, value: int):
        self.value = value

    def save(self, path: Path) -> None:
        time.sleep(1.0)
        with atomic_path(path) as tmp:
            tmp.write_text(str(self.value))

    @classmethod
    def load(cls, path: Path) -> "_SlowToSave":
        return cls(int(path.read_text()))


def _stages_then_read(world: dist.World, folder: Path) -> None:
    """Both ranks compute a parallel stage and a rank-0 stage, then read each one's file right away (as the loop
    reads ``warm_start.pt``); each rank writes what it read."""
    stages = Stages(RunState(folder, "sha"), folder / "metrics.jsonl", world=world)
    read = []
    for name, parallel in (("together", True), ("alone", False)):
        path = folder / f"{name}.txt"
        stages.run(name, path, lambda: (_SlowToSave(7), {}), _SlowToSave.load, parallel=parallel)
        read.append(_SlowToSave.load(path).value)  # FileNotFoundError if this rank ran ahead of rank 0's save
    (folder / f"read{world.rank}.json").write_text(json.dumps(read))


def test_every_rank_leaves_a_stage_only_once_its_file_is_saved(tmp_path):
    """A parallel stage is computed on every rank but saved by rank 0: a rank that went on before the save and read
    the file failed (FileNotFoundError on ``warm_start.pt``, 4 of 12 two-rank adapt runs on a busy box)."""
    mp.spawn(_worker, args=(2, _free_port(), (tmp_path,), _stages_then_read), nprocs=2, join=True)
    assert [json.loads((tmp_path / f"read{r}.json").read_text()) for r in (0, 1)] == [[7, 7], [7, 7]]


def test_two_gloo_processes_train_the_same_weights_as_one_process_with_the_global_batch(tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    two.mkdir(), one.mkdir()
    mp.spawn(_worker, args=(2, _free_port(), (4, 4, 16, two)), nprocs=2, join=True)
    _ppo_phase(dist.SINGLE, 8, 8, 32, one)  # the same global batch (8), minibatch (8) and images (32)
    r0, r1, single = (torch.load(p) for p in (two / "rank0.pt", two / "rank1.pt", one / "rank0.pt"))
    for key in single:
        assert torch.equal(r0[key], r1[key]), key  # the ranks hold identical weights
        torch.testing.assert_close(r0[key], single[key], rtol=1e-4, atol=1e-5)
    moved = max(float((single[k] - _net().state_dict()[k]).abs().max()) for k in single)
    assert moved > 1e-3  # the phase did train


def test_a_torchrun_job_waits_for_rank_zero_stages_longer_than_nccls_default(monkeypatch):
    """Rank 0 fits the scanner and restyles alone while the others wait: the process group is joined with
    :data:`WAIT_LIMIT`, not NCCL's 10-minute default."""
    from datetime import timedelta

    joined = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(dist.td, "is_initialized", lambda: False)
    monkeypatch.setattr(dist.td, "init_process_group", lambda **kw: joined.update(kw))
    world = dist.setup("cpu")
    assert world.rank == 1 and world.size == 2
    assert joined == {"backend": "gloo", "timeout": dist.WAIT_LIMIT} and dist.WAIT_LIMIT >= timedelta(hours=1)


def test_rank_helpers_for_one_process():
    w = dist.SINGLE
    assert not w.active and w.main and dist.rank_slice(8, w) == slice(0, 8)
    assert dist.shard(5, w).tolist() == [0, 1, 2, 3, 4] and dist.gather_shards([1, 2], 2, w) == [1, 2]
    assert dist.rank_slice(8, dist.World(rank=1, size=2)) == slice(4, 8)
    assert dist.shard(5, dist.World(rank=1, size=2)).tolist() == [1, 3]
    dist.teardown(w)  # no group joined: nothing to leave
    assert not torch.distributed.is_initialized()
    with pytest.raises(ValueError):
        dist.rank_slice(7, dist.World(rank=0, size=2))


# ------------------------------------------------------------------------------------ torchrun end to end
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from test_adapt import TINY_ADAPT, tiny_world  # noqa: E402,F401  (the module-scoped fixture)
from test_pretrain import TINY as TINY_PRETRAIN, raw  # noqa: E402,F401  (the tiny raw dataset)

REPO = Path(__file__).resolve().parents[1]


def _torchrun(args: list[str], nproc: int = 2, **popen) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "rl_adapt", *args]
    return subprocess.Popen(cmd, env=env, cwd=REPO, **popen)


def _adapt_args(world, out: Path) -> list[str]:
    sets = [x for s in [*TINY_ADAPT, "ppo.n_envs=2", "ppo.batch_size=2"] for x in ("--set", s)]
    return ["adapt", "--model", str(world["model"]), "--target", str(world["target"]), "--out", str(out), *sets,
            "--no-progress"]


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def test_adapt_on_two_ranks_resumes_after_one_rank_is_killed(tiny_world, tmp_path):
    straight = tmp_path / "straight"
    done = _torchrun(_adapt_args(tiny_world, straight), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = done.communicate(timeout=600)
    assert done.returncode == 0, err[-3000:]
    assert out.count("adapted model:") == 1  # rank 0 prints, the other rank is silent
    killed = tmp_path / "killed"
    proc = _torchrun(_adapt_args(tiny_world, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = killed / "state.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and "iter0/reward" in state.read_text():
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    workers = _children(proc.pid)
    assert len(workers) == 2, f"torchrun's workers: {workers}"
    os.kill(workers[-1], signal.SIGKILL)  # one rank dies mid-PPO; torchrun stops the job
    proc.wait(timeout=120)
    assert proc.returncode != 0, "torchrun did not report the killed rank"
    assert "export" not in state.read_text(), "the run finished before the rank was killed"
    done_before = set(json.loads(state.read_text())["completed"])
    resumed = _torchrun(_adapt_args(tiny_world, killed) + ["--resume"], stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, text=True)
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    stages = [json.loads(line)["stage"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    for s in done_before:  # finished stages were not redone
        assert stages.count(s) == 1, s
    a, b = torch.load(straight / "iter1" / "policy.pt"), torch.load(killed / "iter1" / "policy.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the job requeued once more after it finished (the SLURM scripts of docs/cluster.md pass --resume always)
    stamp = {p: p.stat().st_mtime_ns for p in killed.rglob("*")}
    again = _torchrun(_adapt_args(tiny_world, killed) + ["--resume"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                      text=True)
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0 and out.count("adapted model:") == 1, err[-3000:]
    assert {p: p.stat().st_mtime_ns for p in killed.rglob("*")} == stamp


def test_restyling_draws_on_two_ranks_are_scored_once_and_agree(tiny_world, tmp_path):
    """The source teacher with two restyling draws under torchrun, restyled through a fitted scanner (the shipped
    configs' mode): every draw stage recorded once, one choice, the draws' files removed, the run's warm start the
    chosen draw's, and one fit shared by the draws (rank 0 restyles; the other rank reads the saved pairs)."""
    from test_adapt import TEACHER

    run = tmp_path / "run"
    scanner = ["source_teacher.pairs.mode=scanner", "source_teacher.pairs.fit.source_images=2",
               "source_teacher.pairs.fit.target_images=4", "source_teacher.pairs.fit.sweeps=1"]
    sets = [x for s in [*TEACHER, *scanner, "source_teacher.draws=2", "ppo.n_envs=2", "ppo.batch_size=2"]
            for x in ("--set", s)]
    args = _adapt_args(tiny_world, run) + ["--source-data", str(tiny_world["source"]), *sets]
    done = _torchrun(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = done.communicate(timeout=600)
    assert done.returncode == 0, err[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    stages = [r["stage"] for r in records]
    for name in ("draw0/styled_source", "draw0/warm_start", "draw0/score", "draw1/score", "draw_choice",
                 "styled_source", "warm_start"):
        assert stages.count(name) == 1, name
    rec = {r["stage"]: r for r in records}
    chosen = rec["draw_choice"]["chosen"]
    assert rec["draw_choice"]["scores"] == [rec["draw0/score"]["agreement"], rec["draw1/score"]["agreement"]]
    assert rec["warm_start"]["draw"] == chosen
    assert rec["warm_start"]["held_out_dice"] == rec[f"draw{chosen}/warm_start"]["held_out_dice"]
    assert not (run / "draws").exists() and (run / "warm_start.pt").is_file()
    fitted = rec["styled_source"]["scanner"]
    assert fitted == rec["draw0/styled_source"]["scanner"] == rec["draw1/styled_source"]["scanner"]
    assert fitted["preset"]["name"] == "fitted"


def test_averaged_draws_on_two_ranks_give_one_warm_start_the_mean_of_the_draws(tiny_world, tmp_path):
    """``draw_merge: average`` under torchrun: the averaging stage (which judges the average on the held-out pairs,
    a collective step) runs on both ranks without a deadlock, is recorded once, and the guard starts from it."""
    from test_adapt import TEACHER

    sets = [*TEACHER, "source_teacher.draws=2", "source_teacher.draw_merge=average", "ppo.n_envs=2",
            "ppo.batch_size=2"]
    run = tmp_path / "run"
    args = _adapt_args(tiny_world, run) + ["--source-data", str(tiny_world["source"])]
    done = _torchrun(args + [x for s in sets for x in ("--set", s)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                     text=True)
    _, err = done.communicate(timeout=600)
    assert done.returncode == 0, err[-3000:]
    rec = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        assert r["stage"] not in rec, r["stage"]  # every stage recorded once
        rec[r["stage"]] = r
    assert rec["warm_start"]["averaged_draws"] == 2 and not (run / "draws").exists()
    assert rec["iter0/ppo"]["agreement_before"] == pytest.approx(rec["warm_start"]["held_out_dice"])


def test_evaluate_on_two_ranks_writes_the_tables_of_one(tiny_world, tmp_path):
    from rl_adapt.evaluation.evaluate import EvaluateConfig, evaluate

    source = tiny_world["source"]  # labelled synthetic images
    evaluate({"a": tiny_world["model"]}, source, tmp_path / "one", config=EvaluateConfig(report=False, workers=0),
             progress=False)
    two = _torchrun(["evaluate", "--model", f"a={tiny_world['model']}", "--data", str(source), "--out",
                     str(tmp_path / "two"), "--no-report", "--no-progress", "--workers", "0"],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = two.communicate(timeout=600)
    assert two.returncode == 0, err[-3000:]
    for name in ("per_image.csv", "per_patient.csv"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    one_s = json.loads((tmp_path / "one" / "summary.json").read_text())
    two_s = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert one_s == two_s


def test_commands_that_do_not_run_data_parallel_refuse_a_torchrun_job(tmp_path):
    p = _torchrun(["synth", "--domain", "source", "--patients", "1", "--out", str(tmp_path / "s")],
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = p.communicate(timeout=120)
    assert p.returncode != 0 and "only adapt, evaluate, pretrain run data-parallel" in err
    assert not (tmp_path / "s").exists()


def test_pretrain_on_two_ranks_takes_the_steps_of_one_process_with_the_global_batch(raw, tmp_path):
    """2 ranks x batch 2 == 1 process x batch 4 (same crops, augmentation and batch Dice), one model written."""
    from rl_adapt.cli import main

    assert main(["pretrain", "--data", str(raw), "--out", str(tmp_path / "one"), *TINY_PRETRAIN]) == 0  # batch 4
    two = _torchrun(["pretrain", "--data", str(raw), "--out", str(tmp_path / "two"), *TINY_PRETRAIN,
                     "--set", "plan.batch_size=2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = two.communicate(timeout=600)
    assert two.returncode == 0, err[-3000:]
    folder = f"{raw.name}/nnUNetTrainer__nnUNetPlansSmall__2d"
    # the logits, not the raw weights: a convolution's bias in front of an instance norm changes nothing, its
    # gradient is rounding noise, and AdamW scales noise up to a full step, differently in each run
    one, two = (load_model_folder(tmp_path / o / folder, device="cpu") for o in ("one", "two"))
    x = torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(two.network(x), one.network(x), rtol=1e-3, atol=1e-4)
    summary = json.loads((tmp_path / "two" / folder / "fold_0" / "pretrain_summary.json").read_text())
    assert summary["processes"] == 2 and set(summary["dice_heldout"]) == {"LV", "MYO", "LA", "mean"}
    # rank 0 alone logged to TensorBoard and checkpointed; the finished run's resume folder is gone
    assert len(list((tmp_path / "two" / folder / "fold_0" / "tensorboard").glob("events.out.tfevents*"))) == 1
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [raw.name]
