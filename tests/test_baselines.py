"""Test-time adaptation baselines: losses, what each method updates, determinism, folders written."""
from __future__ import annotations

import copy
import hashlib
import math

import numpy as np
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet

from rl_adapt.evaluation.baselines import (IGNORE, METHODS, SOURCE_METHODS, TARGET_METHODS, BaselineConfig,
                                          adapt_network, entropy_loss, norm_parameters, pseudo_label_loss,
                                          pseudo_labels, run_baseline)
from rl_adapt.errors import ConfigError, InputError
from test_evaluate import build_tiny_world
from conftest import TEST_THREADS  # noqa: E402


def tiny_net(seed: int = 0) -> torch.nn.Module:
    """A 3-stage nnU-Net-style PlainConvUNet (InstanceNorm with affine, LeakyReLU), 4 classes."""
    torch.manual_seed(seed)
    return PlainConvUNet(1, 3, (4, 8, 16), torch.nn.Conv2d, 3, (1, 2, 2), (1, 1, 1), 4, (1, 1), False,
                         torch.nn.InstanceNorm2d, {"eps": 1e-5, "affine": True}, None, None, torch.nn.LeakyReLU,
                         {"inplace": True}, deep_supervision=False)


def patches(n: int = 6, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


def cfg(method: str, **kw) -> BaselineConfig:
    base = dict(method=method, steps=4, batch_size=2, lr=1e-2, confidence=0.3, seed=0)
    base.update(kw)
    return BaselineConfig(**base)


def changed(before: torch.nn.Module, after: torch.nn.Module) -> set[str]:
    a = dict(before.named_parameters())
    return {k for k, p in after.named_parameters() if not torch.equal(a[k], p)}


def test_entropy_loss_values():
    assert entropy_loss(torch.zeros(2, 4, 3, 3)).item() == pytest.approx(math.log(4))
    peaked = torch.zeros(1, 4, 2, 2)
    peaked[:, 1] = 50.0
    assert entropy_loss(peaked).item() == pytest.approx(0.0, abs=1e-6)


def test_pseudo_labels_threshold_and_masked_loss():
    class Fixed(torch.nn.Module):
        def forward(self, x):
            out = torch.zeros(x.shape[0], 4, *x.shape[2:])
            out[:, 2, :, : x.shape[3] // 2] = 10.0  # confident MYO on the left half, uniform on the right
            return out

    lab = pseudo_labels(Fixed(), torch.zeros(3, 1, 4, 6), confidence=0.9, batch_size=2)
    assert lab.shape == (3, 4, 6) and lab.dtype == torch.long
    assert (lab[..., :3] == 2).all() and (lab[..., 3:] == IGNORE).all()
    logits = torch.zeros(3, 4, 4, 6, requires_grad=True)
    loss = pseudo_label_loss(logits, lab)
    assert loss.item() == pytest.approx(math.log(4))  # mean over the confident pixels only
    none = pseudo_label_loss(logits, torch.full_like(lab, IGNORE))
    assert none.item() == 0.0 and none.requires_grad


def test_tent_updates_only_norm_affine_parameters():
    torch.set_num_threads(TEST_THREADS)
    net = tiny_net()
    src = copy.deepcopy(net)
    adapt_network(net, patches(), cfg("tent"), progress=False)
    norm = {n for n, _ in norm_parameters(src)}
    diff = changed(src, net)
    assert diff and diff <= norm
    assert all(p.requires_grad for p in net.parameters())  # flags restored afterwards


@pytest.mark.parametrize("method", ["entropy", "pseudo-label"])
def test_full_network_methods_update_convolutions(method):
    torch.set_num_threads(TEST_THREADS)
    net = tiny_net()
    src = copy.deepcopy(net)
    hist = adapt_network(net, patches(), cfg(method, rounds=2), progress=False)
    assert len(hist) == 8 and all(math.isfinite(h["loss"]) for h in hist)
    assert any("conv" in k and k not in {n for n, _ in norm_parameters(src)} for k in changed(src, net))
    if method == "entropy":
        assert hist[-1]["loss"] < hist[0]["loss"]
    else:
        assert 0.0 <= hist[0]["confident"] <= 1.0


@pytest.mark.parametrize("method", TARGET_METHODS)
def test_same_seed_same_weights(method):
    torch.set_num_threads(TEST_THREADS)
    nets = [tiny_net() for _ in range(3)]
    adapt_network(nets[0], patches(), cfg(method, seed=5), progress=False)
    adapt_network(nets[1], patches(), cfg(method, seed=5), progress=False)
    adapt_network(nets[2], patches(), cfg(method, seed=6), progress=False)
    sd = [n.state_dict() for n in nets]
    assert all(torch.equal(sd[0][k], sd[1][k]) for k in sd[0])
    assert not all(torch.equal(sd[0][k], sd[2][k]) for k in sd[0])


def test_config_checks():
    with pytest.raises(ValueError):
        BaselineConfig(method="tent", confidence=1.5)
    with pytest.raises(ValueError):
        BaselineConfig(method="nope")  # type: ignore[arg-type]
    from rl_adapt.config import load_config

    with pytest.raises(ConfigError):
        load_config(BaselineConfig, None, ["stepz=3"])


# ----------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="session")
def world(tmp_path_factory):
    return build_tiny_world(tmp_path_factory.getbasetemp() / "tiny_nnunet_world")


def _sha(folder) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("method", METHODS)
def test_run_baseline_writes_loadable_new_folder(world, tmp_path, method):
    from rl_adapt.policies.nnunet import load_model_folder

    torch.set_num_threads(TEST_THREADS)
    before = _sha(world["src"])
    source = world["data"] if method in SOURCE_METHODS else None  # a labelled set; its images are the target too
    out = run_baseline(world["src"], world["data"], tmp_path / "b", cfg(method, steps=2), progress=False,
                       source_data=source)
    assert _sha(world["src"]) == before  # the source is only read
    assert out.is_dir() and str(out).startswith(str(tmp_path / "b"))
    assert (tmp_path / "b" / "baseline_config.yaml").is_file() and (tmp_path / "b" / "baseline_history.json").is_file()
    adapted, source = load_model_folder(out), load_model_folder(world["src"])
    diff = changed(source.network, adapted.network)  # named_parameters: each tensor once, no aliases
    assert (adapted.harmonizer is not None) == (method == "harmonize")
    if method == "harmonize":  # the source's weights, with the image map beside them
        assert not diff and (out / "harmonization.npz").is_file()
        img = np.random.default_rng(1).integers(0, 255, (48, 48)).astype(np.uint8)
        assert torch.equal(adapted.to_patch(img, (0.5, 0.5))[0],
                           source.to_patch(adapted.harmonizer.apply(img), (0.5, 0.5))[0])
        with pytest.raises(InputError, match="harmonization.npz"):  # not a source model to adapt again
            run_baseline(out, world["data"], tmp_path / "again", cfg("tent"), progress=False)
        from rl_adapt.evaluation.evaluate import EvaluateConfig, evaluate
        s = evaluate({"src": world["src"], "mapped": out}, world["data"], tmp_path / "ev", progress=False,
                     config=EvaluateConfig(overlays=0, n_bootstrap=50, workers=0))
        assert s["harmonized_inputs"] == ["mapped"]
        assert "mapped maps each image toward the source" in (tmp_path / "ev" / "report.html").read_text()
    else:
        assert diff
    if method == "tent":
        assert diff <= {n for n, _ in norm_parameters(source.network)}
    img = np.random.default_rng(0).random((48, 48)).astype(np.float32)
    assert adapted.predict(img, (0.5, 0.5)).shape == (48, 48)


def test_styled_source_is_seeded_and_needs_the_source_data(world, tmp_path):
    from rl_adapt.policies.nnunet import load_model_folder

    torch.set_num_threads(TEST_THREADS)
    with pytest.raises(InputError, match="--source-data"):
        run_baseline(world["src"], world["data"], tmp_path / "none", cfg("styled-source"), progress=False)
    assert not (tmp_path / "none").exists()
    nets = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        out = run_baseline(world["src"], world["data"], tmp_path / name, cfg("styled-source", steps=2, seed=seed),
                           progress=False, source_data=world["data"])
        nets.append(load_model_folder(out).network.state_dict())
    assert all(torch.equal(nets[0][k], nets[1][k]) for k in nets[0])
    assert not all(torch.equal(nets[0][k], nets[2][k]) for k in nets[0])
    with pytest.raises(ValueError, match="fine_tune_supervised"):
        adapt_network(tiny_net(), patches(), cfg("styled-source"), progress=False)


def test_a_killed_styled_source_baseline_resumes_from_its_restyled_pairs(world, tmp_path, monkeypatch):
    import rl_adapt.evaluation.baselines as bl
    from rl_adapt.errors import RLAdaptError
    from rl_adapt.policies.nnunet import load_model_folder

    torch.set_num_threads(TEST_THREADS)
    c = cfg("styled-source", steps=2, seed=3)
    ref = run_baseline(world["src"], world["data"], tmp_path / "ref", c, progress=False, source_data=world["data"])
    out = tmp_path / "k"

    def killed(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:  # killed while training, after the restyling stage finished
        m.setattr(bl, "fine_tune_supervised", killed)
        with pytest.raises(KeyboardInterrupt):
            run_baseline(world["src"], world["data"], out, c, progress=False, source_data=world["data"])
    assert sorted(p.name for p in out.iterdir()) == ["unfinished"]  # no model folder, no history
    assert (out / "unfinished" / "styled_source.npz").is_file()
    with pytest.raises(InputError, match="--resume"):
        run_baseline(world["src"], world["data"], out, c, progress=False, source_data=world["data"])
    with pytest.raises(RLAdaptError, match="steps: 2 then, 3 now"):
        run_baseline(world["src"], world["data"], out, cfg("styled-source", steps=3, seed=3), progress=False,
                     source_data=world["data"], resume=True)

    calls = []
    with monkeypatch.context() as m:  # the resume reads the restyled pairs back instead of restyling again
        m.setattr(bl, "styled_source_pairs", lambda *a, **k: calls.append(1))
        got = run_baseline(world["src"], world["data"], out, c, progress=False, source_data=world["data"],
                           resume=True)
    assert calls == []
    a, b = load_model_folder(ref).network.state_dict(), load_model_folder(got).network.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    names = lambda root: sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))  # noqa: E731
    assert names(out) == names(tmp_path / "ref")  # the unfinished folder is gone
    assert (out / "baseline_history.json").read_text() == (tmp_path / "ref" / "baseline_history.json").read_text()
    with monkeypatch.context() as m:  # resumed once more: the finished folder, nothing restyled or trained
        m.setattr(bl, "styled_source_pairs", lambda *a, **k: calls.append(1))
        m.setattr(bl, "fine_tune_supervised", killed)
        assert run_baseline(world["src"], world["data"], out, c, progress=False, source_data=world["data"],
                            resume=True) == got
    assert calls == []


def test_a_baseline_that_fails_before_any_stage_finished_leaves_nothing(world, tmp_path, monkeypatch):
    import rl_adapt.evaluation.baselines as bl

    def broken(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(bl, "styled_source_pairs", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        run_baseline(world["src"], world["data"], tmp_path / "b", cfg("styled-source", steps=1), progress=False,
                     source_data=world["data"])
    assert not (tmp_path / "b").exists()


def test_run_baseline_bad_inputs(world, tmp_path):
    c = cfg("tent", steps=1)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError):
        run_baseline(world["src"], empty, tmp_path / "o1", c, progress=False)
    with pytest.raises(InputError):
        run_baseline(tmp_path / "nope", world["data"], tmp_path / "o2", c, progress=False)
    (tmp_path / "exists").mkdir()
    with pytest.raises(InputError):
        run_baseline(world["src"], world["data"], tmp_path / "exists", c, progress=False)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_cli_baseline(world, tmp_path, capsys):
    from rl_adapt.cli import main

    rc = main(["baseline", "--method", "pseudo-label", "--model", str(world["src"]), "--target", str(world["data"]),
               "--out", str(tmp_path / "pl"), "--set", "steps=1", "--set", "batch_size=2", "--no-progress"])
    assert rc == 0 and "pseudo-label" in capsys.readouterr().out
    rc = main(["baseline", "--method", "tent", "--model", str(world["src"]), "--target", str(world["data"]),
               "--out", str(tmp_path / "pl"), "--no-progress"])
    assert rc == 2 and "--resume" in capsys.readouterr().err
    # --resume of the finished run (a requeued job): its model folder, nothing redone; other settings: refused
    stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "pl").rglob("*")}
    rc = main(["baseline", "--method", "pseudo-label", "--model", str(world["src"]), "--target", str(world["data"]),
               "--out", str(tmp_path / "pl"), "--set", "steps=1", "--set", "batch_size=2", "--set", "threads=2",
               "--no-progress", "--resume"])  # where it runs may differ
    out = capsys.readouterr().out
    assert rc == 0 and str(next((tmp_path / "pl").glob("*/nnUNetTrainer__*__2d"))) in out
    rc = main(["baseline", "--method", "pseudo-label", "--model", str(world["src"]), "--target", str(world["data"]),
               "--out", str(tmp_path / "pl"), "--set", "steps=2", "--set", "batch_size=2", "--no-progress", "--resume"])
    err = capsys.readouterr().err
    assert rc == 2 and "finished with other settings" in err and "steps: 1 then, 2 now" in err
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "pl").rglob("*")} == stamp
