"""The adaptation loop end to end on a tiny synthetic world: outputs, source untouched, resume after kill -9."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from rl_adapt.engine.loop import AdaptConfig, AdaptInputs, Adapter
from rl_adapt.config import load_config
from rl_adapt.errors import ConfigError, InputError, RLAdaptError
from conftest import TEST_THREADS  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# The machinery, not the quality, is tested here: every correction is trusted (a briefly trained tiny model's
# corrections pass the anatomy checks or not depending on the CPU's float rounding), and the shape prior is off
# unless a test gives source data.
TINY_ADAPT = [
    "device=cpu", f"threads={TEST_THREADS}", "iterations=2", "ppo_images_per_iteration=16",
    "trusted_corrections=all",
    "corrector.use_shape_prior=false",
    "correction_reward_weight=1.0", "keep_if_closer=false",  # 16 images: the guard would often keep the source
    "rollout.samples_per_image=1", "rollout.batch_size=8",
    "reward.features=4", "reward.depth=2", "reward.steps=20", "reward.batch_size=4",
    "ppo.n_envs=4", "ppo.n_steps=2", "ppo.batch_size=4", "ppo.n_epochs=2", "ppo.weight_average_decay=0.8",
    "shape_prior.steps=20", "shape_prior.size=32", "shape_prior.batch_size=8",
]


def _tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes())
            h.update(str(p.stat().st_mtime_ns).encode())
    return h.hexdigest()


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory) -> dict:
    """Synthetic source (labelled) + other unlabelled patients at 96x96 (MYO-LA contact is too coarse to judge at 64) and a briefly pretrained tiny nnU-Net."""
    from rl_adapt.data.writers import write_nnunet_raw
    from rl_adapt.training.pretrain import PretrainConfig, pretrain
    from rl_adapt.synth.domains import generate_domain

    root = tmp_path_factory.mktemp("adapt_world")
    src = write_nnunet_raw(generate_domain("source", 6, seed=0, size=96), root / "Dataset901_Src",
                           dataset_name="Dataset901_Src")
    tgt_cases = generate_domain("source", 3, seed=1, size=96)  # the machinery, not the gain, is tested here
    tgt = write_nnunet_raw(tgt_cases, root / "Dataset902_Tgt", dataset_name="Dataset902_Tgt", labelled=False)
    cfg = load_config(PretrainConfig, None, [
        "plan.features=[8, 16, 32, 32]", "plan.patch_size=[96, 96]", "plan.batch_size=8",
        "train.epochs=25", "train.device=cpu", f"train.num_threads={TEST_THREADS}", "train.val_every=100", "train.lr=0.01",
    ])
    res = pretrain(src, root / "models", cfg, progress=False)
    return {"root": root, "source": src, "target": tgt, "model": Path(res.model_dir)}


def _cfg(extra=()):
    return load_config(AdaptConfig, None, [*TINY_ADAPT, *extra])


def test_adapt_writes_a_loadable_model_and_leaves_the_source_alone(tiny_world, tmp_path):
    from rl_adapt.policies.nnunet import load_model_folder

    before = _tree_digest(tiny_world["model"])
    run = tmp_path / "run"
    inputs = AdaptInputs(model_dir=tiny_world["model"], target_dir=tiny_world["target"],
                         source_data=tiny_world["source"])
    cfg = _cfg(["corrector.use_shape_prior=true"])
    folder = Adapter(inputs, cfg, run, progress=False).run()
    assert _tree_digest(tiny_world["model"]) == before
    adapted = load_model_folder(folder)
    source = load_model_folder(tiny_world["model"])
    diffs = [float((a - b).abs().max()) for a, b in zip(adapted.network.state_dict().values(),
                                                         source.network.state_dict().values())
             if torch.is_floating_point(a)]
    assert max(diffs) > 0, "PPO did not change the policy"
    stages = [json.loads(line)["stage"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    for k in range(2):
        for s in ("rollout", "correct", "reward", "ppo"):
            assert f"iter{k}/{s}" in stages
    assert "shape_prior" in stages
    ppo_records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
                   if json.loads(line)["stage"].endswith("/ppo")]
    assert all(r.get("weight_averaged") == 1.0 for r in ppo_records)  # the phase's weight average was exported
    assert (run / "reward_net.pt").is_file() and (run / "config.yaml").is_file()
    assert any((run / "tensorboard").rglob("events.out.tfevents.*"))
    state = json.loads((run / "state.json").read_text())
    assert "export" in state["completed"]
    # a finished run resumes to the same folder without redoing anything
    mtime = (run / "iter0" / "policy.pt").stat().st_mtime_ns
    assert Adapter(inputs, cfg, run, resume=True, progress=False).run() == folder
    assert (run / "iter0" / "policy.pt").stat().st_mtime_ns == mtime
    # ... and names the model inside the run folder after the folder was moved
    moved = tmp_path / "moved"
    run.rename(moved)
    again = Adapter(inputs, cfg, moved, resume=True, progress=False).run()
    assert again == moved / folder.relative_to(run) and (again / "plans.json").is_file()


def test_bad_inputs_are_refused_before_writing(tiny_world, tmp_path):
    inputs = AdaptInputs(model_dir=tiny_world["model"], target_dir=tmp_path / "missing")
    with pytest.raises(InputError, match="target dir does not exist"):
        Adapter(inputs, _cfg(), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    run = tmp_path / "used"
    run.mkdir()
    (run / "x").write_text("x")
    ok = AdaptInputs(model_dir=tiny_world["model"], target_dir=tiny_world["target"])
    with pytest.raises(RLAdaptError, match="--resume"):
        Adapter(ok, _cfg(), run, progress=False)
    inside = AdaptInputs(model_dir=tiny_world["model"], target_dir=tiny_world["target"])
    with pytest.raises(InputError, match="inside the --model input"):
        Adapter(inside, _cfg(), tiny_world["model"] / "run", progress=False)
    junk = tmp_path / "prior.pt"
    junk.write_bytes(b"not a checkpoint")
    bad_prior = AdaptInputs(model_dir=tiny_world["model"], target_dir=tiny_world["target"], shape_prior=junk)
    with pytest.raises(InputError, match="prior.pt.*not a shape prior"):
        Adapter(bad_prior, _cfg(), tmp_path / "run2", progress=False)
    assert not (tmp_path / "run2").exists()


TEACHER = ["iterations=1", "source_teacher.enabled=true", "source_teacher.held_out=0.34",
           "source_teacher.reward_images=8", "guard=styled_source", "keep_if_closer=true",
           "source_teacher.pairs.style_images=4", "source_teacher.pairs.mode=degrade",
           "source_teacher.warm_start.steps=3", "source_teacher.warm_start.batch_size=4"]


def test_the_source_teacher_supervises_teaches_the_reward_and_judges_the_guard(tiny_world, tmp_path):
    """Restyled source images with true labels: a stage of their own, reward data, and the guard's judge."""
    run = tmp_path / "run"
    inputs = AdaptInputs(model_dir=tiny_world["model"], target_dir=tiny_world["target"],
                         source_data=tiny_world["source"])
    cfg = _cfg([*TEACHER, "source_teacher.pairs.depth=true"])
    adapter = Adapter(inputs, cfg, run, progress=False)
    adapter.run()
    rec = {json.loads(x)["stage"]: json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()}
    assert rec["styled_source"]["n_pairs"] == 24 and 0 < rec["styled_source"]["n_held_out"] < 24
    from PIL import Image
    with Image.open(run / "styled_source.png") as picture:  # source / restyled / target rows of policy patches
        side = adapter.images.shape[-1]
        assert picture.size == (6 * side, 3 * side + 4) and len(set(np.asarray(picture).ravel().tolist())) > 16
    assert rec["iter0/reward"]["n_source_images"] == 8
    assert rec["warm_start"]["steps"] == 3 and "held_out_dice" in rec["warm_start"]
    warm = torch.load(run / "warm_start.pt")
    source = torch.load(tiny_world["model"] / "fold_0" / "checkpoint_final.pth", weights_only=False)["network_weights"]
    assert any(not torch.equal(v, source[k].to(v.dtype)) for k, v in warm.items() if torch.is_floating_point(v))
    # the guard's "before" is the warm-started policy, whose held-out Dice the warm start recorded
    assert rec["iter0/ppo"]["agreement_before"] == pytest.approx(rec["warm_start"]["held_out_dice"])
    ppo = rec["iter0/ppo"]
    assert ppo["guard"] == "styled_source" and ppo["guard_images"] == rec["styled_source"]["n_held_out"]
    assert ppo["last_supervised_loss"] > 0  # the restyled pairs entered every PPO minibatch
    assert ppo["rejected"] == (ppo["agreement_after"] < ppo["agreement_before"])
    # no target label was read: the target folder has none, and the run resumes to the same model
    assert Adapter(inputs, cfg, run, resume=True, progress=False).run().is_dir()
    with pytest.raises(ConfigError, match="source_teacher"):
        _cfg(["guard=styled_source"])
    with pytest.raises(ConfigError, match="--source-data"):
        Adapter(AdaptInputs(model_dir=tiny_world["model"], target_dir=tiny_world["target"]),
                _cfg(["source_teacher.enabled=true"]), tmp_path / "x", progress=False)


def test_scanner_restyling_is_fitted_once_for_all_draws_and_recorded(tiny_world, tmp_path, monkeypatch):
    """``pairs.mode: scanner``: the draws share one fit of the target scanner (label-free), and the run records it."""
    import rl_adapt.training.styled_source as styled_source

    calls = []
    real = styled_source.fit_scanner
    monkeypatch.setattr(styled_source, "_FITS", {})
    monkeypatch.setattr(styled_source, "fit_scanner", lambda *a, **k: calls.append(1) or real(*a, **k))
    inputs = AdaptInputs(model_dir=tiny_world["model"], target_dir=tiny_world["target"],
                         source_data=tiny_world["source"])
    cfg = _cfg([*TEACHER, "source_teacher.pairs.mode=scanner", "source_teacher.draws=2",
                "source_teacher.pairs.fit.source_images=2", "source_teacher.pairs.fit.target_images=4",
                "source_teacher.pairs.fit.sweeps=1"])
    run = tmp_path / "run"
    Adapter(inputs, cfg, run, progress=False).run()
    rec = {json.loads(x)["stage"]: json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()}
    assert len(calls) == 1
    fitted = rec["styled_source"]["scanner"]
    assert fitted == rec["draw0/styled_source"]["scanner"] == rec["draw1/styled_source"]["scanner"]
    assert fitted["preset"]["name"] == "fitted" and fitted["evaluations"] > 1
    assert np.isfinite(fitted["mismatch"]) and np.isfinite(fitted["start_mismatch"])
    assert rec["styled_source"]["n_styled"] > 0


def test_a_resumed_run_reuses_its_recorded_scanner_fit_and_mode_choice(tiny_world, tmp_path, monkeypatch):
    """``mode: auto`` with two draws, killed after draw 0: the resumed process (empty caches) restyles draw 1 from the
    fit and choice that draw 0 recorded, without fitting again, and ends as an uninterrupted run does."""
    import rl_adapt.engine.loop as loop
    import rl_adapt.training.styled_source as styled_source

    inputs = AdaptInputs(model_dir=tiny_world["model"], target_dir=tiny_world["target"],
                         source_data=tiny_world["source"])
    cfg = _cfg([*TEACHER, "source_teacher.pairs.mode=auto", "source_teacher.draws=2",
                "source_teacher.pairs.fit.source_images=2", "source_teacher.pairs.fit.target_images=4",
                "source_teacher.pairs.fit.sweeps=1"])
    real_fit, real_pairs = styled_source.fit_scanner, loop.styled_source_pairs
    fits, restylings = [], []
    monkeypatch.setattr(styled_source, "fit_scanner", lambda *a, **k: fits.append(1) or real_fit(*a, **k))

    def kill_second_restyling(*args, **kwargs):
        restylings.append(1)
        if len(restylings) == 2:
            raise KeyboardInterrupt
        return real_pairs(*args, **kwargs)

    def fresh_process() -> None:
        monkeypatch.setattr(styled_source, "_FITS", {})
        monkeypatch.setattr(styled_source, "_CHOICES", {})

    fresh_process()
    whole = tmp_path / "whole"
    Adapter(inputs, cfg, whole, progress=False).run()
    assert len(fits) == 1
    fresh_process()
    run = tmp_path / "run"
    monkeypatch.setattr(loop, "styled_source_pairs", kill_second_restyling)
    with pytest.raises(KeyboardInterrupt):
        Adapter(inputs, cfg, run, progress=False).run()
    assert len(fits) == 2
    fresh_process()
    monkeypatch.setattr(loop, "styled_source_pairs", real_pairs)
    Adapter(inputs, cfg, run, resume=True, progress=False).run()
    assert len(fits) == 2  # the resumed process did not fit again
    rec = {json.loads(x)["stage"]: json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()}
    one = {json.loads(x)["stage"]: json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()}
    for key in ("scanner", "mode_choice", "mode"):
        assert rec["draw1/styled_source"][key] == rec["draw0/styled_source"][key] == one["draw1/styled_source"][key]
    assert (run / "styled_source.npz").read_bytes() == (whole / "styled_source.npz").read_bytes()
    assert rec["draw_choice"]["scores"] == one["draw_choice"]["scores"]


def test_restyling_draws_are_scored_label_free_and_the_best_one_is_kept(tiny_world, tmp_path, monkeypatch):
    """Two restyling draws: each restyled, warm-started and scored on the target images as stages of their own (a
    run that fails inside the draws resumes without redoing them); the best score's draw becomes the run's."""
    import rl_adapt.engine.loop as loop

    inputs = AdaptInputs(model_dir=tiny_world["model"], target_dir=tiny_world["target"],
                         source_data=tiny_world["source"])
    cfg = _cfg([*TEACHER, "source_teacher.draws=2", "seed=3"])
    run = tmp_path / "run"
    real = loop.sharded_correction
    calls = []

    def fail_second_score(*args, **kwargs):  # the draw-1 score is interrupted
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "sharded_correction", fail_second_score)
    with pytest.raises(KeyboardInterrupt):
        Adapter(inputs, cfg, run, progress=False).run()
    assert (run / "draws" / "draw1" / "warm_start.pt").is_file()
    monkeypatch.setattr(loop, "sharded_correction", real)
    Adapter(inputs, cfg, run, resume=True, progress=False).run()
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    stages = [r["stage"] for r in lines]
    for d in (0, 1):  # finished draw stages were not redone
        assert stages.count(f"draw{d}/styled_source") == 1 and stages.count(f"draw{d}/warm_start") == 1
        assert stages.count(f"draw{d}/score") == 1
    rec = {r["stage"]: r for r in lines}
    assert [rec["draw0/score"]["seed"], rec["draw1/score"]["seed"]] == [3, 1003]
    scores = [rec[f"draw{d}/score"]["agreement"] for d in (0, 1)]
    assert all(0.0 <= x <= 1.0 for x in scores) and rec["draw_choice"]["scores"] == scores
    chosen = rec["draw_choice"]["chosen"]
    assert chosen == (1 if scores[1] > scores[0] else 0)
    # the run's pairs and warm start are the chosen draw's, and the draws' own files are gone
    assert rec["styled_source"]["draw"] == chosen == rec["warm_start"]["draw"]
    assert rec["warm_start"]["held_out_dice"] == rec[f"draw{chosen}/warm_start"]["held_out_dice"]
    assert rec["iter0/ppo"]["agreement_before"] == pytest.approx(rec["warm_start"]["held_out_dice"])
    assert not (run / "draws").exists()
    # draw 0 is the single-draw run's own: same pairs, same warm start
    single = tmp_path / "single"
    Adapter(inputs, _cfg([*TEACHER, "seed=3"]), single, progress=False).run()
    one = {json.loads(x)["stage"]: json.loads(x) for x in (single / "metrics.jsonl").read_text().splitlines()}
    assert one["warm_start"]["held_out_dice"] == rec["draw0/warm_start"]["held_out_dice"]
    assert one["warm_start"]["last_loss"] == rec["draw0/warm_start"]["last_loss"]
    if chosen == 0:
        assert (single / "styled_source.npz").read_bytes() == (run / "styled_source.npz").read_bytes()
    with pytest.raises(ConfigError, match="draws > 1 needs source_teacher.warm_start.steps > 0"):
        _cfg([*TEACHER, "source_teacher.draws=2", "source_teacher.warm_start.steps=0"])


def test_averaged_draws_warm_start_from_the_mean_of_the_draws_weights(tiny_world, tmp_path, monkeypatch):
    """``draw_merge: average``: the run's warm start is the uniform mean of every draw's warm-started weights, every
    draw holds out the same source patients (so the guard's held-out pairs were seen by none of the averaged draws),
    and the guard starts from the averaged policy's held-out Dice."""
    import rl_adapt.engine.loop as loop
    from rl_adapt.training.styled_source import StyledPairs

    inputs = AdaptInputs(model_dir=tiny_world["model"], target_dir=tiny_world["target"],
                         source_data=tiny_world["source"])
    monkeypatch.setattr(loop.shutil, "rmtree", lambda *a, **k: None)  # keep the draws' files to compare with
    run = tmp_path / "run"
    Adapter(inputs, _cfg([*TEACHER, "source_teacher.draws=2", "source_teacher.draw_merge=average", "seed=3"]), run,
            progress=False).run()
    draws = [torch.load(run / "draws" / f"draw{d}" / "warm_start.pt") for d in (0, 1)]
    merged = torch.load(run / "warm_start.pt")
    assert set(merged) == set(draws[0])
    floats = [k for k, v in merged.items() if v.is_floating_point()]
    assert floats and any(not torch.equal(draws[0][k], draws[1][k]) for k in floats)  # two different draws
    for k in floats:
        torch.testing.assert_close(merged[k], (draws[0][k] + draws[1][k]) / 2, rtol=1e-6, atol=1e-7)
    pairs = [StyledPairs.load(run / "draws" / f"draw{d}" / "styled_source.npz") for d in (0, 1)]
    assert not np.array_equal(pairs[0].styled, pairs[1].styled) or not torch.equal(pairs[0].images, pairs[1].images)
    assert pairs[0].names == pairs[1].names and pairs[0].held_out.any()
    np.testing.assert_array_equal(pairs[0].held_out, pairs[1].held_out)
    rec = {json.loads(x)["stage"]: json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()}
    assert rec["warm_start"]["averaged_draws"] == 2 and 0.0 <= rec["warm_start"]["held_out_dice"] <= 1.0
    assert rec["iter0/ppo"]["agreement_before"] == pytest.approx(rec["warm_start"]["held_out_dice"])
    with pytest.raises(ConfigError, match="draw_merge: average needs source_teacher.draws > 1"):
        _cfg([*TEACHER, "source_teacher.draw_merge=average"])


def test_draws_can_mix_restyling_modes_and_each_draw_is_what_its_mode_alone_gives(tiny_world, tmp_path):
    """``source_teacher.draw_modes``: draw d is restyled in its own mode with its own seed, so a mixed run's draw d is
    the draw d of a run in that mode alone (the label-free choice then spans both modes), and the mode is recorded."""
    inputs = AdaptInputs(model_dir=tiny_world["model"], target_dir=tiny_world["target"],
                         source_data=tiny_world["source"])

    def records(run, extra):
        Adapter(inputs, _cfg([*TEACHER, "seed=3", *extra]), run, progress=False).run()
        return {json.loads(x)["stage"]: json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()}

    mixed = records(tmp_path / "mixed", ["source_teacher.draws=2", "source_teacher.draw_modes=[degrade,ratio]"])
    ratio = records(tmp_path / "ratio", ["source_teacher.draws=2", "source_teacher.pairs.mode=ratio"])
    degrade = records(tmp_path / "degrade", [])  # one draw: draw 0 of the degrade mode
    assert [mixed["draw0/score"]["mode"], mixed["draw1/score"]["mode"]] == ["degrade", "ratio"]
    assert [mixed["draw0/styled_source"]["mode"], mixed["draw1/styled_source"]["mode"]] == ["degrade", "ratio"]
    assert mixed["styled_source"]["mode"] == ["degrade", "ratio"][mixed["draw_choice"]["chosen"]]
    for key in ("held_out_dice", "last_loss"):
        assert mixed["draw1/warm_start"][key] == ratio["draw1/warm_start"][key]
        assert mixed["draw0/warm_start"][key] == degrade["warm_start"][key]
    assert mixed["draw1/score"]["agreement"] == ratio["draw1/score"]["agreement"]
    assert ratio["draw0/score"]["mode"] == "ratio"
    with pytest.raises(ConfigError, match="draw_modes has 1 entries for 2 draws"):
        _cfg([*TEACHER, "source_teacher.draws=2", "source_teacher.draw_modes=[ratio]"])


def test_a_config_that_needs_a_shape_prior_without_one_is_refused(tiny_world, tmp_path):
    inputs = AdaptInputs(model_dir=tiny_world["model"], target_dir=tiny_world["target"])
    with pytest.raises(ConfigError, match="--source-data DIR.*--shape-prior FILE.*corrector.use_shape_prior=false"):
        Adapter(inputs, _cfg(["corrector.use_shape_prior=true"]), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    res = subprocess.run([sys.executable, "-m", "rl_adapt.cli", "adapt", "--model", str(tiny_world["model"]),
                          "--target", str(tiny_world["target"]), "--out", str(tmp_path / "cli"),
                          "--config", str(REPO / "configs" / "adapt_cpu.yaml")],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "--source-data" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "cli").exists()


def test_too_few_valid_corrections_stop_the_first_iteration_with_what_to_try(tiny_world, tmp_path):
    """Blank expert masks make every correction invalid by construction: the error counts and explains."""
    from rl_adapt.data.readers import read_dataset
    from rl_adapt.data.writers import write_mask

    expert = tmp_path / "expert"
    for case in read_dataset(tiny_world["target"], with_labels=False):
        write_mask(expert / f"{case.name}.nii.gz", np.zeros(case.image.shape, np.uint8), like=case)
    inputs = AdaptInputs(model_dir=tiny_world["model"], target_dir=tiny_world["target"], expert_dir=expert)
    adapter = Adapter(inputs, _cfg(["trusted_corrections=valid", "iterations=1"]), tmp_path / "run", progress=False)
    with pytest.raises(RLAdaptError) as err:
        adapter.run()
    msg = str(err.value)
    n = len(read_dataset(tiny_world["target"], with_labels=False))
    assert f"0 of {n} target images have an anatomically valid correction" in msg
    assert "failed most:" in msg and "(%d)" % n in msg  # every blank mask fails the same checks
    assert "--shape-prior" in msg and "--set trusted_corrections=all" in msg


def test_a_later_iteration_without_trusted_corrections_keeps_the_previous_weights(tiny_world, tmp_path, monkeypatch):
    from rl_adapt.engine import loop as adapt_mod

    real = adapt_mod.Adapter._trusted
    calls = []

    def trusted_only_first_time(self, valid):
        calls.append(1)
        out = real(self, valid)
        return out if len(calls) == 1 else np.zeros_like(out)

    monkeypatch.setattr(adapt_mod.Adapter, "_trusted", trusted_only_first_time)
    run = tmp_path / "run"
    inputs = AdaptInputs(model_dir=tiny_world["model"], target_dir=tiny_world["target"])
    adapter = Adapter(inputs, _cfg(), run, progress=False)
    adapter.run()
    assert adapter.rejected_iterations() == [1]
    state = json.loads((run / "state.json").read_text())["completed"]
    assert state["iter1/reward"]["skipped"] is True and "trusted" in state["iter1/ppo"]["reason"]
    a, b = torch.load(run / "iter0" / "policy.pt"), torch.load(run / "iter1" / "policy.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (run / "iter1" / "reward_net.pt").read_bytes() == (run / "iter0" / "reward_net.pt").read_bytes()


def test_a_run_that_fails_before_any_stage_leaves_no_run_folder_and_unmatched_experts_are_counted(tiny_world, tmp_path):
    from rl_adapt.data.readers import read_dataset

    empty = tmp_path / "empty_target"
    empty.mkdir()
    (empty / "dataset.json").write_text("{}")  # exists, but holds no image: found only when the run reads it
    with pytest.raises(InputError):
        Adapter(AdaptInputs(model_dir=tiny_world["model"], target_dir=empty), _cfg(), tmp_path / "run",
                progress=False).run()
    assert not (tmp_path / "run").exists()
    expert = tmp_path / "expert"
    _expert_folder(tiny_world, expert, 1)
    _expert_folder(tiny_world, expert, 2, name="nobody_2CH_ED")
    adapter = Adapter(AdaptInputs(model_dir=tiny_world["model"], target_dir=tiny_world["target"], expert_dir=expert),
                      _cfg(), tmp_path / "run2", progress=False)
    adapter._load()
    rec = [json.loads(x) for x in (tmp_path / "run2" / "metrics.jsonl").read_text().splitlines()]
    inputs = next(r for r in rec if r["stage"] == "inputs")
    assert inputs["n_expert"] == 1 and inputs["warning_unmatched_expert_masks"] == 1
    assert inputs["n_target"] == len(read_dataset(tiny_world["target"], with_labels=False))


def test_a_given_shape_prior_is_reused_not_retrained(tiny_world, tmp_path):
    from rl_adapt.engine.shape_prior import ShapePrior, ShapePriorConfig, train_shape_prior

    masks = np.zeros((4, 32, 32), np.uint8)
    masks[:, 8:24, 10:22] = 2
    masks[:, 10:22, 12:20] = 1
    prior = train_shape_prior(masks, ShapePriorConfig(size=32, features=4, steps=2, batch_size=2), device="cpu")
    given = tmp_path / "given.pt"
    prior.save(given)
    inputs = AdaptInputs(model_dir=tiny_world["model"], target_dir=tiny_world["target"],
                         source_data=tiny_world["source"], shape_prior=given)
    adapter = Adapter(inputs, _cfg(["corrector.use_shape_prior=true"]), tmp_path / "run", progress=False)
    loaded = adapter._shape_prior()
    assert isinstance(loaded, ShapePrior)
    assert (tmp_path / "run" / "shape_prior.pt").read_bytes() == given.read_bytes()
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records] == ["shape_prior"] and "n_masks" not in records[0]


def test_resume_after_kill_matches_an_uninterrupted_run(tiny_world, tmp_path):
    """kill -9 a CLI run once its first stages are done, resume it, and compare with a straight run."""
    args = ["--model", str(tiny_world["model"]), "--target", str(tiny_world["target"])]
    sets = [x for s in TINY_ADAPT for x in ("--set", s)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cli = [sys.executable, "-m", "rl_adapt.cli", "adapt", *args, "--no-progress"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*cli, "--out", str(killed), *sets], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    state = killed / "state.json"
    while time.time() < deadline:
        if state.exists() and "iter0/reward" in state.read_text():
            break
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert "export" not in state.read_text()
    done_before = set(json.loads(state.read_text())["completed"])
    res = subprocess.run([*cli, "--out", str(killed), "--resume"], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    stages = [json.loads(line)["stage"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    for s in done_before:  # finished stages were not redone
        assert stages.count(s) == 1, s
    straight = tmp_path / "straight"
    res2 = subprocess.run([*cli, "--out", str(straight), *sets, "--resume"], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)  # --resume is safe to pass always: here it starts a new run
    assert res2.returncode == 0, res2.stderr[-2000:]
    a = torch.load(killed / "iter1" / "policy.pt")
    b = torch.load(straight / "iter1" / "policy.pt")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    leftovers = [p for p in killed.rglob("*") if ".tmp-" in p.name]
    assert not leftovers
    # --resume of the finished run (a requeued job): its model folder, exit 0, nothing redone or rewritten; with
    # another setting: refused, the key named
    stamp = {p: p.stat().st_mtime_ns for p in killed.rglob("*")}
    res3 = subprocess.run([*cli, "--out", str(killed), "--resume"], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert res3.returncode == 0 and "adapted model:" in res3.stdout, res3.stderr[-2000:]
    res4 = subprocess.run([*cli, "--out", str(killed), "--resume", "--set", "seed=7"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert res4.returncode == 2 and "other settings" in res4.stderr and "seed" in res4.stderr, res4.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in killed.rglob("*")} == stamp


def test_blended_reward_uses_corrections_only_where_trusted():
    from rl_adapt.engine.guard import agreement
    from rl_adapt.engine.reward.blend import BlendedReward

    class ConstNet:
        def score(self, images, actions):
            return torch.full(actions.shape, 0.25)

    corrected = torch.tensor([[[1, 1], [0, 0]], [[2, 2], [2, 2]]])
    trusted = torch.tensor([True, False])
    actions = torch.tensor([[[1, 0], [0, 3]], [[2, 2], [2, 2]]])
    images = torch.zeros(2, 1, 2, 2)
    fn = BlendedReward(ConstNet(), corrected, trusted, weight=1.0)
    pure = BlendedReward(ConstNet(), corrected, trusted, weight=0.0)
    assert torch.equal(pure(images, actions, torch.tensor([0, 1])), torch.full((2, 2, 2), 0.25))  # learned only
    r = fn(images, actions, torch.tensor([0, 1]))
    assert torch.equal(r[0], torch.tensor([[1.0, 0.0], [1.0, 0.0]]))  # trusted: agreement with the correction
    assert torch.equal(r[1], torch.full((2, 2), 0.25))  # untrusted: the reward network
    half = BlendedReward(ConstNet(), corrected, trusted, weight=0.5)
    assert torch.allclose(half(images, actions, torch.tensor([0, 0]))[0],
                          torch.tensor([[0.625, 0.125], [0.625, 0.125]]))
    # the indices say which correction each image is compared with: swapped, image 0 is judged untrusted
    assert torch.equal(fn(images, actions, torch.tensor([1, 0]))[0], torch.full((2, 2), 0.25))
    a = np.array([[[1, 1], [2, 3]]], np.uint8)
    assert agreement(a, a) == 1.0 and agreement(a, np.zeros_like(a)) < 1.0


def test_contact_penalties_hit_exactly_the_pixels_the_frontier_checks_count():
    from rl_adapt.engine.reward.blend import BlendedReward, touching
    from rl_adapt.measures.anatomy import check_anatomy

    class ConstNet:
        def score(self, images, actions):
            return torch.full(actions.shape, 0.25)

    rng = np.random.default_rng(0)
    labels = torch.as_tensor(rng.integers(0, 4, (3, 12, 12)))
    for m in labels.numpy():
        myo = m == 2
        cols = np.flatnonzero(myo.any(0))
        ratio = check_anatomy(m).values()["frontier_myo_la"]
        assert touching(torch.as_tensor(m)[None], 2, 3)[0].sum().item() == pytest.approx(ratio * (cols[-1] - cols[0] + 1))
    # a 1-px MYO | LA border, LV alone in the background, the image's outside ignored
    m = torch.zeros(1, 5, 6, dtype=torch.int64)
    m[0, :, 0] = 2
    m[0, :, 1] = 3
    m[0, 2, 4] = 1
    assert touching(m, 2, 3)[0, :, 0].all() and touching(m, 3, 2)[0, :, 1].all() and touching(m, 2, 3).sum() == 5
    assert touching(m, 1, 0).sum() == 1 and touching(m, 0, 1).sum() == 8
    images = torch.zeros(1, 1, 5, 6)
    fn = BlendedReward(ConstNet(), m.clone(), torch.tensor([True]), weight=1.0, myo_la_penalty=0.5,
                       lv_bg_penalty=0.25)
    r = fn(images, m, torch.tensor([0]))  # actions == corrections: agreement 1 everywhere, minus the penalties
    assert torch.allclose(r[0, :, :2], torch.full((5, 2), 0.5)) and r[0, 2, 4].item() == 0.75
    assert (r[0, :, 2:] == 1).sum() == 5 * 4 - 1
    plain = BlendedReward(ConstNet(), m.clone(), torch.tensor([True]), weight=1.0)
    assert torch.equal(plain(images, m, torch.tensor([0])), torch.ones(1, 5, 6))


def test_guard_keeps_the_previous_weights_when_ppo_moves_away(tiny_world, tmp_path, caplog):
    """A destructive learning rate wrecks the policy; the label-free guard must reject it and keep the source."""
    run = tmp_path / "run"
    inputs = AdaptInputs(model_dir=tiny_world["model"], target_dir=tiny_world["target"])
    cfg = _cfg(["iterations=1", "keep_if_closer=true", "ppo.lr=0.5", "ppo.max_grad_norm=1000.0"])
    adapter = Adapter(inputs, cfg, run, progress=False)
    with caplog.at_level(logging.WARNING, logger="rl_adapt.engine.loop"):
        adapter.run()
    assert adapter.rejected_iterations() == [0]
    assert any("the adapted network is the source network" in r.getMessage() for r in caplog.records)
    rec = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ppo = next(r for r in rec if r["stage"] == "iter0/ppo")
    assert ppo["rejected"] is True and ppo["agreement_after"] < ppo["agreement_before"]
    source = torch.load(tiny_world["model"] / "fold_0" / "checkpoint_final.pth", weights_only=False)["network_weights"]
    kept = torch.load(run / "iter0" / "policy.pt")
    for key, value in kept.items():
        assert torch.equal(value, source[key].to(value.dtype)), key


def _expert_folder(tiny_world, folder: Path, index: int, name: str | None = None):
    """Write the true mask of target image ``index`` into ``folder`` (under ``name`` if given: a stray file);
    returns (the target cases, the chosen case)."""
    from rl_adapt.data.readers import read_dataset
    from rl_adapt.data.writers import write_mask
    from rl_adapt.synth.domains import generate_domain

    target = read_dataset(tiny_world["target"], with_labels=False)
    truth = {c.name: c.label for c in generate_domain("source", 3, seed=1, size=96)}
    chosen = target[index]
    write_mask(folder / f"{name or chosen.name}.nii.gz", truth[chosen.name], like=chosen)
    return target, chosen


def test_guard_is_judged_on_expert_images_when_given(tiny_world, tmp_path):
    expert = tmp_path / "expert"
    target, _ = _expert_folder(tiny_world, expert, 1)
    with_expert = Adapter(AdaptInputs(model_dir=tiny_world["model"], target_dir=tiny_world["target"],
                                      expert_dir=expert), _cfg(), tmp_path / "a", progress=False)
    with_expert._load()
    assert with_expert._guard_images().tolist() == [1]
    without = Adapter(AdaptInputs(model_dir=tiny_world["model"], target_dir=tiny_world["target"]), _cfg(),
                      tmp_path / "b", progress=False)
    without._load()
    assert without._guard_images().tolist() == list(range(len(target)))


def test_pseudo_labels_add_the_accepted_corrections_to_the_supervised_term(tiny_world, tmp_path):
    """``pseudo_labels``: the target images whose correction is accepted join PPO's cross-entropy with that correction
    as the mask (an expert mask wins over it); off, the term holds only what it held before."""
    from rl_adapt.engine.corrector import Corrections

    expert = tmp_path / "expert"
    _expert_folder(tiny_world, expert, 0)
    inputs = AdaptInputs(model_dir=tiny_world["model"], target_dir=tiny_world["target"], expert_dir=expert)
    run = Adapter(inputs, _cfg(["pseudo_labels=true", "ppo.supervised_coef=0.5"]), tmp_path / "a", progress=False)
    run._load()
    n, side = run.images.shape[0], run.images.shape[-1]
    corrected = np.random.default_rng(0).integers(0, 4, (n, side, side)).astype(np.uint8)
    accepted = np.zeros(n, bool)
    accepted[[0, n - 1]] = True  # image 0 has an expert mask
    corr = Corrections(corrected=corrected, accepted=accepted, valid=accepted.copy(), path=np.full(n, "cleanup"))
    cfg, (images, masks) = run._supervised(corr)
    assert cfg.supervised_coef == 0.5 and images.shape[0] == masks.shape[0] == 2
    torch.testing.assert_close(images[1], run.images[n - 1])
    assert np.array_equal(masks[1].numpy(), corrected[n - 1])
    assert np.array_equal(masks[0].numpy(), run.expert[run.target_cases[0].name])  # not image 0's correction
    off = Adapter(inputs, _cfg(["ppo.supervised_coef=0.5"]), tmp_path / "b", progress=False)
    off._load()
    assert off._supervised(corr)[1][0].shape[0] == 1  # the expert image only
    no_weight = Adapter(inputs, _cfg(["pseudo_labels=true", "ppo.supervised_coef=0"]), tmp_path / "c", progress=False)
    no_weight._load()
    assert no_weight._supervised(corr)[1] is None


def test_train_on_expert_keeps_only_the_images_with_an_expert_mask(tiny_world, tmp_path):
    expert = tmp_path / "expert"
    _, chosen = _expert_folder(tiny_world, expert, 2)
    run = Adapter(AdaptInputs(model_dir=tiny_world["model"], target_dir=tiny_world["target"], expert_dir=expert),
                  _cfg(["train_on=expert"]), tmp_path / "a", progress=False)
    run._load()
    assert [c.name for c in run.target_cases] == [chosen.name]
    assert run.images.shape[0] == 1 and run._guard_images().tolist() == [0]
    full = Adapter(AdaptInputs(model_dir=tiny_world["model"], target_dir=tiny_world["target"]), _cfg(),
                   tmp_path / "b", progress=False)
    full._load()
    torch.testing.assert_close(run.images[0], full.images[2])
    # no expert folder: refused before the run folder exists; a folder whose masks match no image: refused too
    with pytest.raises(InputError, match="--expert"):
        Adapter(AdaptInputs(model_dir=tiny_world["model"], target_dir=tiny_world["target"]),
                _cfg(["train_on=expert"]), tmp_path / "c", progress=False)
    assert not (tmp_path / "c").exists()
    other = tmp_path / "other"
    _expert_folder(tiny_world, other, 2, name="nobody_2CH_ED")
    stray = Adapter(AdaptInputs(model_dir=tiny_world["model"], target_dir=tiny_world["target"], expert_dir=other),
                    _cfg(["train_on=expert"]), tmp_path / "d", progress=False)
    with pytest.raises(InputError, match="expert masks is named like a target image"):
        stray._load()
    with pytest.raises(ConfigError, match="train_on"):
        _cfg(["train_on=some"])


def test_export_stores_a_label_free_postprocessing_in_nnunet_format(tiny_world, tmp_path):
    from rl_adapt.postprocessing import load_postprocessing

    run = tmp_path / "run"
    inputs = AdaptInputs(model_dir=tiny_world["model"], target_dir=tiny_world["target"])
    # tolerance 0: agreement alone decides, so a kept step can never lower it (with a tolerance the validity rule
    # may keep the clean-up at a small agreement cost)
    cfg = _cfg(["iterations=1", "postprocessing=[largest_foreground, largest_per_label, anatomical_cleanup]",
                "postprocessing_validity_tolerance=0"])
    folder = Adapter(inputs, cfg, run, progress=False).run()
    assert (folder / "postprocessing.pkl").is_file()
    data = json.loads((folder / "postprocessing.json").read_text())
    rule = load_postprocessing(folder)
    assert data["postprocessing_fns"] == [n for n, _ in rule.steps]
    kept = [t for t in data["trials"] if t["kept"]]
    assert len(kept) <= len(rule.steps) and len(data["trials"]) == 5  # fg, 3 labels, clean-up
    assert data["reference"] == "iter0/corrected.npz" and data["n_images"] >= 1
    # kept steps never lower the agreement with the trusted corrections
    assert data["postprocessed"]["agreement"] >= data["input"]["agreement"]
    rec = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r["stage"] == "postprocessing" for r in rec)
    # without candidates nothing is written; unknown candidates are a config error
    folder2 = Adapter(inputs, _cfg(["iterations=1"]), tmp_path / "run2", progress=False).run()
    assert not (folder2 / "postprocessing.json").exists()
    with pytest.raises(ConfigError, match="unknown candidate"):
        _cfg(["postprocessing=[fill_everything]"])


def test_harmonized_runs_train_on_mapped_images_and_ship_the_map_with_the_model(tiny_world, tmp_path):
    """``harmonize.when: always``: the map is a stage of the run, every target patch is the mapped image's, the exported
    folder carries it, loading that folder applies it, and such a folder is refused as a source model."""
    from rl_adapt.harmonize import Harmonizer
    from rl_adapt.policies.nnunet import load_model_folder

    run = tmp_path / "run"
    inputs = AdaptInputs(model_dir=tiny_world["model"], target_dir=tiny_world["target"],
                         source_data=tiny_world["source"])
    cfg = _cfg(["iterations=1", "harmonize.when=always"])
    adapter = Adapter(inputs, cfg, run, progress=False)
    folder = adapter.run()
    stages = {json.loads(x)["stage"]: json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()}
    assert stages["harmonize"]["n_target"] == 3 * 4 and stages["harmonize"]["n_source"] == 6 * 4
    saved = Harmonizer.load(run / "harmonization.npz")
    assert (folder / "harmonization.npz").read_bytes() == (run / "harmonization.npz").read_bytes()
    ckpt = torch.load(folder / "fold_0" / "checkpoint_final.pth", weights_only=False)
    assert "harmonization.npz" in ckpt["rl_adapt"]["input_map"]  # said where nnU-Net's own predictor would look
    from rl_adapt.data.readers import read_dataset
    raw = read_dataset(tiny_world["target"], with_labels=False)
    plain = load_model_folder(tiny_world["model"])
    expected = torch.stack([plain.to_patch(saved.apply(c.image), c.spacing)[0] for c in raw])
    assert torch.equal(adapter.images.cpu(), expected)  # the policy trained on the mapped images
    unmapped = torch.stack([plain.to_patch(c.image, c.spacing)[0] for c in raw])
    assert not torch.equal(expected, unmapped)
    adapted = load_model_folder(folder)
    assert adapted.harmonizer is not None
    assert torch.equal(adapted.to_patch(raw[0].image, raw[0].spacing)[0], expected[0])  # predict/evaluate map too
    with pytest.raises(InputError, match="harmonization.npz.*original source model"):
        Adapter(AdaptInputs(model_dir=folder, target_dir=tiny_world["target"]), _cfg(["iterations=1"]),
                tmp_path / "again", progress=False).run()
    assert not (tmp_path / "again").exists()
    with pytest.raises(ConfigError, match="--source-data"):
        Adapter(AdaptInputs(model_dir=tiny_world["model"], target_dir=tiny_world["target"]),
                _cfg(["harmonize.when=auto"]), tmp_path / "x", progress=False)


def test_harmonize_auto_maps_a_target_the_scanner_model_cannot_make(tiny_world, tmp_path):
    """``harmonize.when: auto`` asks the restyling's own label-free choice on the raw target images: a target whose grey
    levels were inverted inside the fan (a look the B-mode scanner model cannot make) gets ``degrade``, so it is
    harmonized; the choice is a recorded stage and a resumed run reads it back."""
    from rl_adapt.data.case import Case
    from rl_adapt.data.readers import read_dataset
    from rl_adapt.data.writers import write_nnunet_raw

    raw = read_dataset(tiny_world["target"], with_labels=False)
    remapped = write_nnunet_raw([Case(c.name, np.where(c.image > 2, 255 - c.image, 0).astype(np.uint8), None,
                                      c.spacing) for c in raw],
                                tmp_path / "Dataset903_Remapped", dataset_name="Dataset903_Remapped", labelled=False)
    inputs = AdaptInputs(model_dir=tiny_world["model"], target_dir=remapped, source_data=tiny_world["source"])
    cfg = _cfg(["iterations=1", "harmonize.when=auto", "source_teacher.pairs.style_images=8",
                "source_teacher.pairs.depth=true", "source_teacher.pairs.angular=true",
                "source_teacher.pairs.fit.source_images=4", "source_teacher.pairs.fit.target_images=8",
                "source_teacher.pairs.fit.sweeps=1"])
    run = tmp_path / "run"
    folder = Adapter(inputs, cfg, run, progress=False).run()
    stages = {json.loads(x)["stage"]: json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()}
    choice = stages["harmonize_choice"]
    assert choice["mode"] == "degrade" and choice["degrade_mismatch"] < 0.5 * choice["scanner_mismatch"]
    assert choice["harmonize"] is True and "harmonize" in stages
    assert (folder / "harmonization.npz").is_file()
    resumed = Adapter(inputs, cfg, run, resume=True, progress=False)
    assert resumed.run() == folder and resumed.harmonizer is not None
