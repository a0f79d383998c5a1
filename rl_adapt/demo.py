"""The offline demo: the whole pipeline on synthetic data, as the sequence of CLI commands a user runs.

Stages (each skipped when its output already exists, so an interrupted demo resumes)::

    synth source (labelled)  -> OUT/data/source
    synth target (unlabelled, adaptation set) and target test (labelled, other patients)
    pretrain                 -> OUT/source_model
    (in_domain_reference) synth labelled target patients, pretrain on them -> OUT/in_domain_model
    adapt (RL)               -> OUT/adapt
    baselines (TENT, pseudo-label) -> OUT/baseline_<method>
    evaluate all models on the target test split -> OUT/eval (summary.json, report.html)
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from rl_adapt.errors import RLAdaptError

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    """Sizes and presets of the demo run (``configs/demo.yaml``; ``configs/demo_full.yaml`` for GPUs)."""

    seed: int = 0
    """Seed for data synthesis and every stage."""
    target_domain: str = "target-blur"
    """Synthetic target vendor preset to adapt to."""
    image_size: int = 128
    """Synthetic image size in pixels (square)."""
    source_patients: int = 40
    """Labelled source patients (4 images each) for pretraining and the shape prior."""
    target_patients: int = 40
    """Unlabelled target patients the adaptation sees."""
    test_patients: int = 20
    """Labelled target patients (other ones) for the evaluation."""
    pretrain_config: str = "configs/pretrain_cpu.yaml"
    """Pretraining config (path relative to the repository or absolute)."""
    adapt_config: str = "configs/adapt_cpu.yaml"
    """Adaptation config."""
    baseline_config: str = "configs/baseline_cpu.yaml"
    """Config shared by the baselines (same budget knobs)."""
    baselines: tuple[str, ...] = ("tent", "pseudo-label")
    """Baselines evaluated beside the source and the RL-adapted model."""
    in_domain_reference: bool = False
    """Also train the source model's network, with labels, on ``target_patients`` other target-domain patients
    (ids from 6001) and evaluate it beside the others as ``in_domain``: the upper bound that the issue-5 bar
    measures the gap to. Adds one synth and one pretrain stage (about 75 s on the 2-core CPU box)."""
    evaluate_device: str = "cpu"
    """Torch device of the evaluation stage ("cpu", "cuda"), passed as ``rl-adapt evaluate --device``."""
    extra_overrides: dict[str, list[str]] = field(default_factory=dict)
    """Per-command extra ``--set`` overrides, e.g. {"adapt": ["ppo.lr=1e-4"]}."""


REPO_ROOT = Path(__file__).resolve().parents[1]


def _config_path(name: str) -> Path:
    """Resolve a config path: as given, else relative to the repository (``configs/...``)."""
    p = Path(name)
    if p.is_absolute() or p.exists():
        return p
    cand = REPO_ROOT / p
    if cand.exists():
        return cand
    raise RLAdaptError(f"{name}: config file not found (looked in . and {REPO_ROOT})")


def _cli(args: list[str]) -> None:
    from rl_adapt.cli import main

    log.info("rl-adapt %s", " ".join(args))
    code = main(args)
    if code != 0:
        raise RLAdaptError(f"demo stage failed: rl-adapt {' '.join(args)} (exit {code})")


def _sets(cfg: DemoConfig, command: str) -> list[str]:
    """``--set`` arguments for ``command`` from ``cfg.extra_overrides``."""
    return [x for o in cfg.extra_overrides.get(command, []) for x in ("--set", o)]


def find_model_folder(root: Path) -> Path:
    """The single nnU-Net model folder (``<Dataset>/<Trainer>__<Plans>__2d``) under ``root``."""
    hits = sorted(p.parent for p in root.glob("*/*/plans.json"))
    if len(hits) != 1:
        raise RLAdaptError(f"{root}: expected one nnU-Net model folder, found {len(hits)}")
    return hits[0]


def demo_stages(cfg: DemoConfig, out: Path) -> list[tuple[str, Path, list[str]]]:
    """The demo as (name, output path, rl-adapt arguments); a stage whose output exists is skipped."""
    d = out / "data"
    common = ["--seed", str(cfg.seed), "--size", str(cfg.image_size), "--format", "nnunet"]
    stages = [
        ("synth source", d / "source", ["synth", "--domain", "source", "--patients", str(cfg.source_patients),
                                        "--out", str(d / "source"), "--dataset-name", "Dataset910_SynthSource",
                                        *common]),
        ("synth target", d / "target", ["synth", "--domain", cfg.target_domain, "--patients",
                                        str(cfg.target_patients), "--first-patient", "5001", "--no-labels",
                                        "--out", str(d / "target"), *common]),
        ("synth target test", d / "target_test", ["synth", "--domain", cfg.target_domain, "--patients",
                                                  str(cfg.test_patients), "--first-patient", "9001",
                                                  "--out", str(d / "target_test"), *common]),
        ("pretrain", out / "source_model", ["pretrain", "--data", str(d / "source"), "--out",
                                            str(out / "source_model"), "--config",
                                            str(_config_path(cfg.pretrain_config)), *_sets(cfg, "pretrain")]),
    ]
    if cfg.in_domain_reference:
        stages += [
            ("synth target in-domain", d / "target_in_domain", [
                "synth", "--domain", cfg.target_domain, "--patients", str(cfg.target_patients), "--first-patient",
                "6001", "--out", str(d / "target_in_domain"), "--dataset-name", "Dataset911_SynthTargetInDomain",
                *common]),
            ("pretrain in-domain", out / "in_domain_model", [
                "pretrain", "--data", str(d / "target_in_domain"), "--out", str(out / "in_domain_model"),
                "--config", str(_config_path(cfg.pretrain_config)), *_sets(cfg, "pretrain")]),
        ]
    return stages


def run_demo(cfg: DemoConfig, out: str | Path, progress: bool = True) -> dict:
    """Run (or resume) the demo under ``out``.

    :returns: ``{"summary": summary.json contents, "timings": {stage: seconds}, "eval_dir": str, "ran": [names of the
        stages run by this call (the others were finished before)]}``.
    """
    from tqdm import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    np_flag = [] if progress else ["--no-progress"]
    stages = demo_stages(cfg, out)
    bar = tqdm(total=len(stages) + 3 + len(cfg.baselines), desc="demo", unit="stage", disable=None if progress else True)
    t0 = time.time()
    timings: dict[str, float] = {}
    ran: list[str] = []

    def stage(name: str, done: bool, args_fn) -> None:
        bar.set_postfix_str(name)
        t = time.time()
        if not done:
            _cli(args_fn())
            ran.append(name)
        timings[name] = round(time.time() - t, 1)
        bar.update(1)

    for name, path, args in stages:
        stage(name, path.exists(), lambda a=args: a)
    source_model = find_model_folder(out / "source_model")
    adapt_dir = out / "adapt"
    adapt_done = (adapt_dir / "state.json").exists() and '"export"' in (adapt_dir / "state.json").read_text()
    stage("adapt (RL)", adapt_done, lambda: [
        "adapt", "--model", str(source_model), "--target", str(out / "data" / "target"), "--out", str(adapt_dir),
        "--source-data", str(out / "data" / "source"), "--config", str(_config_path(cfg.adapt_config)),
        *(["--resume"] if adapt_dir.exists() else []), *_sets(cfg, "adapt"), *np_flag])
    models = {"source": source_model}
    for method in cfg.baselines:
        bdir = out / f"baseline_{method}"
        stage(f"baseline {method}", bdir.exists(), lambda m=method, b=bdir: [
            "baseline", "--method", m, "--model", str(source_model), "--target", str(out / "data" / "target"),
            "--out", str(b), "--config", str(_config_path(cfg.baseline_config)), *_sets(cfg, "baseline"), *np_flag])
        models[method] = find_model_folder(bdir)
    if cfg.in_domain_reference:
        models["in_domain"] = find_model_folder(out / "in_domain_model")
    models["rl_adapted"] = find_model_folder(adapt_dir / "model")  # last: the report contrasts it with the first
    eval_dir = out / "eval"
    stage("evaluate", (eval_dir / "summary.json").exists(), lambda: [
        "evaluate", *[x for n, p in models.items() for x in ("--model", f"{n}={p}")],
        "--data", str(out / "data" / "target_test"), "--out", str(eval_dir), "--reward", str(adapt_dir),
        "--device", cfg.evaluate_device, *np_flag])
    bar.close()
    summary = json.loads((eval_dir / "summary.json").read_text())
    log.info("demo finished in %.0f s: %s", time.time() - t0, timings)
    return {"summary": summary, "timings": timings, "eval_dir": str(eval_dir), "ran": ran}
