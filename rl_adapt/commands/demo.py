"""``rl-adapt demo``: the whole pipeline, offline, on synthetic data (the README's main-job command).

The demo is the sequence of commands a user runs, each in its own process (``python -m rl_adapt COMMAND ...``),
as stages with dependencies::

    synth source (labelled)            -> OUT/data/source
    synth target (unlabelled, adaptation set), synth target test (labelled, other patients)
    pretrain                           -> OUT/source_model            (needs synth source)
    synth target in-domain, pretrain in-domain -> OUT/in_domain_model (optional upper bound)
    adapt (RL)                         -> OUT/adapt                   (needs the source model and data)
    baseline tent, baseline pseudo-label -> OUT/baseline_<method>     (need the source model)
    evaluate every model on the target test split -> OUT/eval (summary.json, report.html)

Stages whose inputs are ready run side by side, up to ``jobs`` at a time (the CPUs this process may use). The
CPU threads are planned, not left to chance: the two pretrainings run side by side with half the CPUs each, then
the two baselines likewise, then the adaptation alone with all of them (``threads``; the figures depend on the
thread counts, through the float rounding of multi-threaded kernels). A stage whose output exists is skipped,
so an interrupted demo resumes. Each stage's output goes to ``OUT/logs/<stage>.log``.
"""
from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from rl_adapt.commands import add_config_help
from rl_adapt.commands.evaluate import format_table
from rl_adapt.config import bounded, load_config
from rl_adapt.devices import available_cpus
from rl_adapt.errors import RLAdaptError
from rl_adapt.io_utils import read_json
from rl_adapt.synth.vendors import VENDORS

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class DemoConfig:
    """Sizes and presets of the demo run (``configs/demo.yaml``; ``configs/demo_full.yaml`` for GPUs)."""

    seed: int = bounded(0, ge=0)
    """Seed for data synthesis and every stage."""
    target_domain: str = bounded("target-blur", choices=tuple(n for n in VENDORS if n != "source"))
    """Synthetic target vendor preset to adapt to."""
    image_size: int = bounded(128, ge=32, le=4096)
    """Synthetic image size in pixels (square)."""
    source_patients: int = bounded(40, ge=2)
    """Labelled source patients (4 images each) for pretraining and the shape prior."""
    target_patients: int = bounded(40, ge=1)
    """Unlabelled target patients the adaptation sees."""
    test_patients: int = bounded(20, ge=1)
    """Labelled target patients (other ones) for the evaluation."""
    pretrain_config: str = "configs/pretrain_cpu.yaml"
    """Pretraining config (path relative to the working folder or the repository, or absolute)."""
    adapt_config: str = "configs/adapt_cpu.yaml"
    """Adaptation config."""
    baseline_config: str = "configs/baseline_cpu.yaml"
    """Config shared by the baselines (same budget knobs)."""
    baselines: tuple[str, ...] = bounded(("tent", "pseudo-label"), choices=("tent", "entropy", "pseudo-label"))
    """Baselines evaluated beside the source and the RL-adapted model (target-only: the demo has no styled-source).
    """
    in_domain_reference: bool = False
    """Also train the source model's network, with labels, on ``target_patients`` other target-domain patients
    (ids from 6001) and evaluate it beside the others as ``in_domain``: the upper bound of what adaptation can
    reach. Adds one synth and one pretrain stage."""
    evaluate_device: str = "cpu"
    """Torch device of the evaluation stage ("cpu", "cuda"), passed as ``rl-adapt evaluate --device``."""
    jobs: int = bounded(0, ge=0)
    """Stages run side by side (each in its own process); 0: the CPUs this process may use."""
    threads: int = bounded(0, ge=0)
    """CPU threads shared by the stages running at the same time: the two pretrainings and the two baselines get
    half each, the adaptation all of them (0: the CPUs this process may use). The figures depend on it (float
    rounding of multi-threaded kernels)."""
    extra_overrides: dict[str, list[str]] = field(default_factory=dict)
    """Per-command extra ``--set`` overrides, e.g. {"adapt": ["ppo.lr=1e-4"]}."""


@dataclass
class Stage:
    """One command of the demo."""

    name: str
    """Shown in the progress line and used for its log file."""
    output: Path
    """What it writes; the stage is done when :attr:`done_file` exists."""
    args: list[str]
    """``rl-adapt`` arguments."""
    needs: tuple[str, ...] = ()
    """Names of the stages whose outputs it reads."""
    done_file: Path | None = None
    """The file that proves the stage finished (default: ``output`` itself, which commands write atomically)."""
    done_glob: str | None = None
    """Instead of :attr:`done_file`: a pattern under ``output`` that some file matches once the stage finished
    (a pretraining's ``checkpoint_final.pth``, whose folder is named by the planner)."""
    resumable: bool = False
    """The command continues an interrupted run of itself with ``--resume`` (given when ``output`` exists)."""
    threads_key: str | None = None
    """The command's config key for its torch CPU threads (set by the runner), if it has one."""
    share: int = 1
    """How many of the demo's stages are planned to run beside this one (its threads are the CPUs / share)."""

    def done(self) -> bool:
        if self.done_glob is not None:
            return self.output.is_dir() and any(self.output.glob(self.done_glob))
        return (self.done_file or self.output).exists()


PRETRAINED = "*/*/fold_*/checkpoint_final.pth"
"""What a finished ``rl-adapt pretrain`` wrote under its ``--out`` (an unfinished one holds ``unfinished_pretrain/``
only, which ``--resume`` continues)."""


def config_path(name: str) -> Path:
    """A config path as given (absolute or relative to the working folder), else relative to the repository."""
    p = Path(name)
    if p.is_absolute() or p.exists():
        return p
    if (REPO_ROOT / p).exists():
        return REPO_ROOT / p
    raise RLAdaptError(f"{name}: config file not found (looked in . and {REPO_ROOT})")


def _sets(cfg: DemoConfig, command: str) -> list[str]:
    return [x for o in cfg.extra_overrides.get(command, []) for x in ("--set", o)]


def find_model_folder(root: Path) -> Path:
    """The single nnU-Net model folder (``<Dataset>/<Trainer>__<Plans>__2d``) under ``root``."""
    hits = sorted(p.parent for p in root.glob("*/*/plans.json"))
    if len(hits) != 1:
        raise RLAdaptError(f"{root}: expected one nnU-Net model folder, found {len(hits)}")
    return hits[0]


def demo_stages(cfg: DemoConfig, out: Path) -> list[Stage]:
    """The demo's stages in start priority (among the ready ones, earlier first)."""
    d = out / "data"
    common = ["--seed", str(cfg.seed), "--size", str(cfg.image_size), "--format", "nnunet"]
    quiet = ["--no-progress"]  # each stage logs its progress to its log file
    pretrain = ["--config", str(config_path(cfg.pretrain_config)), *_sets(cfg, "pretrain")]
    source_model = "{source}"  # the model folder inside OUT/source_model, known once pretrain finished
    adapt_dir = out / "adapt"
    in_domain = []
    if cfg.in_domain_reference:
        in_domain = [
            Stage("synth target in-domain", d / "target_in_domain", [
                "synth", "--domain", cfg.target_domain, "--patients", str(cfg.target_patients), "--first-patient",
                "6001", "--out", str(d / "target_in_domain"), "--dataset-name", "Dataset911_SynthTargetInDomain",
                *common]),
            Stage("pretrain in-domain", out / "in_domain_model", [
                "pretrain", "--data", str(d / "target_in_domain"), "--out", str(out / "in_domain_model"),
                *pretrain, *quiet], needs=("synth target in-domain",), threads_key="train.num_threads", share=2,
                done_glob=PRETRAINED, resumable=True),
        ]
    stages = [
        Stage("synth source", d / "source", [
            "synth", "--domain", "source", "--patients", str(cfg.source_patients), "--out", str(d / "source"),
            "--dataset-name", "Dataset910_SynthSource", *common]),
        *in_domain[:1],
        Stage("pretrain", out / "source_model", [
            "pretrain", "--data", str(d / "source"), "--out", str(out / "source_model"), *pretrain, *quiet],
            needs=("synth source",), threads_key="train.num_threads", share=2 if in_domain else 1,
            done_glob=PRETRAINED, resumable=True),
        *in_domain[1:],
        Stage("synth target", d / "target", [
            "synth", "--domain", cfg.target_domain, "--patients", str(cfg.target_patients), "--first-patient",
            "5001", "--no-labels", "--out", str(d / "target"), *common]),
    ]
    for method in cfg.baselines:  # before the adaptation, which then has every CPU to itself
        stages.append(Stage(f"baseline {method}", out / f"baseline_{method}", [
            "baseline", "--method", method, "--model", str(source_model), "--target", str(d / "target"),
            "--out", str(out / f"baseline_{method}"), "--config", str(config_path(cfg.baseline_config)),
            *_sets(cfg, "baseline"), *quiet], needs=("pretrain", "synth target"), threads_key="threads",
            share=max(1, len(cfg.baselines)), done_file=out / f"baseline_{method}" / "baseline_history.json",
            resumable=True))
    stages.append(Stage("adapt (RL)", adapt_dir, [
        "adapt", "--model", str(source_model), "--target", str(d / "target"), "--out", str(adapt_dir),
        "--source-data", str(d / "source"), "--config", str(config_path(cfg.adapt_config)),
        *_sets(cfg, "adapt"), *quiet],
        needs=("pretrain", "synth target", "synth source", *(f"baseline {m}" for m in cfg.baselines)),
        done_file=adapt_dir / "model", resumable=True, threads_key="threads"))
    stages.append(Stage("synth target test", d / "target_test", [
        "synth", "--domain", cfg.target_domain, "--patients", str(cfg.test_patients), "--first-patient", "9001",
        "--out", str(d / "target_test"), *common]))
    models = ["source"] + list(cfg.baselines) + (["in_domain"] if cfg.in_domain_reference else []) + ["rl_adapted"]
    evaluate = ["evaluate", *[x for m in models for x in ("--model", f"{m}={{{m}}}")], "--data",
                str(d / "target_test"), "--out", str(out / "eval"), "--reward", str(adapt_dir), "--device",
                cfg.evaluate_device, *quiet]
    stages.append(Stage("evaluate", out / "eval", evaluate, needs=tuple(s.name for s in stages),
                        done_file=out / "eval" / "summary.json", resumable=True))
    return stages


def _model_folder(out: Path, model: str) -> str:
    """The folder of one model the demo made (``source``, ``in_domain``, ``rl_adapted`` or a baseline's name)."""
    roots = {"source": "source_model", "in_domain": "in_domain_model", "rl_adapted": "adapt/model"}
    return str(find_model_folder(out / roots.get(model, f"baseline_{model}")))


def run_stages(stages: list[Stage], jobs: int, logs: Path, progress: bool = False,
               prepare: Callable[[Stage], list[str]] | None = None) -> tuple[dict[str, float], list[str]]:
    """Run the unfinished ``stages`` as ``python -m rl_adapt ARGS`` processes, up to ``jobs`` at a time.

    A stage starts once every stage it ``needs`` has finished, in list order among the ready ones. Its output goes
    to ``logs/<stage>.log``.

    :param prepare: ``stage -> arguments`` at start time (default: ``stage.args``).
    :returns: ``({stage: seconds}, [names of the stages run by this call])``; finished stages count 0 s.
    :raises RLAdaptError: a stage failed (the message names it and shows the end of its log); the stages still
        running are stopped.
    """
    logs.mkdir(parents=True, exist_ok=True)
    pending = [s for s in stages if not s.done()]
    finished = {s.name for s in stages if s.done()}
    timings: dict[str, float] = {name: 0.0 for name in finished}
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    ran: list[str] = []
    t_start = time.time()
    try:
        while pending or running:
            for s in [s for s in pending if set(s.needs) <= finished][: max(0, jobs - len(running))]:
                args = prepare(s) if prepare is not None else list(s.args)
                with open(_log_path(logs, s.name), "w") as logfile:
                    proc = subprocess.Popen([sys.executable, "-m", "rl_adapt", *args], stdout=logfile,
                                            stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
                running[s.name] = (proc, time.time())
                pending.remove(s)
                _say(progress, f"demo: {s.name} started")
            time.sleep(0.1)
            for name, (proc, t0) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[name]
                if proc.returncode != 0:
                    text = _log_path(logs, name).read_text(errors="replace").strip().splitlines()[-8:]
                    raise RLAdaptError(f"demo stage {name!r} failed (exit {proc.returncode}; log "
                                       f"{_log_path(logs, name)}), it ends with:\n  " + "\n  ".join(text))
                timings[name] = round(time.time() - t0, 1)
                finished.add(name)
                ran.append(name)
                _say(progress, f"demo: {name} finished in {timings[name]:.0f} s "
                               f"({len(finished)}/{len(stages)} stages, {time.time() - t_start:.0f} s)")
            if pending and not running and not any(set(s.needs) <= finished for s in pending):
                raise RLAdaptError(f"demo stages wait for stages that do not exist: {[s.name for s in pending]}")
    finally:
        for proc, _ in running.values():  # a failure or Ctrl-C stops the other stages too
            proc.terminate()
            proc.wait()
    return timings, ran


def run_demo(cfg: DemoConfig, out: str | Path, progress: bool = True) -> dict:
    """Run (or resume) the demo under ``out``, up to ``cfg.jobs`` stage processes at a time.

    :returns: ``{"summary": summary.json, "timings": {stage: seconds}, "eval_dir": str, "ran": [stages run now]}``.
    :raises RLAdaptError: a stage failed (the message names it and shows the end of its log).
    """
    out = Path(out)
    jobs = cfg.jobs or available_cpus()
    t_start = time.time()

    cpus = cfg.threads or available_cpus()

    def prepare(stage: Stage) -> list[str]:
        args = [_fill(a, out) for a in stage.args]
        if stage.threads_key:
            args += ["--set", f"{stage.threads_key}={max(1, cpus // stage.share)}"]
        return args + (["--resume"] if stage.resumable and stage.output.exists() else [])

    log.info("demo: up to %d stages side by side", jobs)
    timings, ran = run_stages(demo_stages(cfg, out), jobs, out / "logs", progress, prepare)
    log.info("demo finished in %.0f s: %s", time.time() - t_start, timings)
    return {"summary": read_json(out / "eval" / "summary.json"), "timings": timings, "eval_dir": str(out / "eval"),
            "ran": ran}


def _fill(arg: str, out: Path) -> str:
    """``arg`` with its ``{model}`` placeholder (at most one) replaced by that model's folder."""
    if "{" not in arg:
        return arg
    head, _, rest = arg.partition("{")
    name, _, tail = rest.partition("}")
    return head + _model_folder(out, name) + tail


def _log_path(logs: Path, stage: str) -> Path:
    return logs / (stage.replace(" ", "_").replace("(", "").replace(")", "") + ".log")


def _say(progress: bool, text: str) -> None:
    log.info(text) if not progress else print(text, file=sys.stderr, flush=True)


def register(sub) -> argparse.ArgumentParser:
    """Add the ``demo`` subcommand to ``sub``."""
    p = sub.add_parser(
        "demo",
        help="The whole pipeline offline on synthetic data, with a report.",
        description=(
            "Synthesise a source and a shifted target domain, pretrain a small source nnU-Net, adapt it with "
            "RL, run the TENT and pseudo-label baselines, evaluate all models on a labelled target test split "
            "and write OUT/eval/report.html. Independent stages run side by side, as many as the CPUs "
            "available (e.g. --set jobs=1 for one at a time). Re-running with the same OUT resumes where it "
            "stopped."
        ),
    )
    p.add_argument("--out", type=Path, default=Path("results/runs/demo"), help="demo folder")
    p.add_argument("--config", type=Path, help="DemoConfig YAML (default configs/demo.yaml)")
    p.add_argument("--full", action="store_true",
                   help="reference scale (220 target test patients, default nnU-Net plan): configs/demo_full.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one DemoConfig value, e.g. --set target_domain=target-shadow")
    p.add_argument("--no-progress", action="store_true", help="one log line per stage instead of progress lines")
    add_config_help(p, lambda: DemoConfig, "DemoConfig keys (YAML file or --set KEY=VALUE), default and allowed "
                                           "values:")
    return p


STAGE_CONFIGS: dict[str, tuple[str, str, str]] = {
    "pretrain": ("pretrain_config", "rl_adapt.training.pretrain", "PretrainConfig"),
    "adapt": ("adapt_config", "rl_adapt.engine.loop", "AdaptConfig"),
    "baseline": ("baseline_config", "rl_adapt.evaluation.baselines", "BaselineConfig"),
}
"""The commands whose config the demo passes on: ``DemoConfig`` field of the file, module and class that read it.
``extra_overrides`` may name only these."""


def preflight(cfg: DemoConfig, out: Path, demo_config: Path | None = None) -> None:
    """Check, before the first stage starts, what would otherwise fail minutes into the demo: the output folder
    (new, or an earlier demo's to resume), the evaluation device, and every stage's config file with its
    ``extra_overrides`` (loaded and range-checked as the stage will load it). The target preset is a checked
    choice of :class:`DemoConfig`.

    :raises RLAdaptError: the first problem, in one line.
    """
    import importlib

    from rl_adapt.errors import ConfigError
    from rl_adapt.preflight import check_device, check_output

    unknown = sorted(set(cfg.extra_overrides) - set(STAGE_CONFIGS))
    if unknown:
        raise ConfigError(f"extra_overrides: unknown command(s) {unknown}; the demo passes overrides to "
                          f"{sorted(STAGE_CONFIGS)}")
    files = {key: config_path(getattr(cfg, key)) for key, _, _ in STAGE_CONFIGS.values()}
    check_output(out, {"--config": demo_config, **files}, may_exist=True, earlier_output=("logs",),
                 command="rl-adapt demo")
    check_device(cfg.evaluate_device)
    for command, (key, module, name) in STAGE_CONFIGS.items():
        overrides = cfg.extra_overrides.get(command, [])
        if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
            raise ConfigError(f"extra_overrides.{command}: expected a list of KEY=VALUE strings, got {overrides!r}")
        config_class = getattr(importlib.import_module(module), name)
        for extra in ([f"method={m}"] for m in cfg.baselines) if command == "baseline" else [[]]:
            load_config(config_class, files[key], [*overrides, *extra])


def run(args: argparse.Namespace) -> int:
    """Run the demo and print the summary table, the stage times and where the report is."""
    cfg_path = args.config or config_path("configs/demo_full.yaml" if args.full else "configs/demo.yaml")
    cfg = load_config(DemoConfig, cfg_path, args.overrides)
    preflight(cfg, args.out, cfg_path)
    result = run_demo(cfg, args.out, progress=not args.no_progress)
    print(format_table(result["summary"]))
    print("stage seconds: " + ", ".join(f"{k} {v}" for k, v in result["timings"].items()))
    print(f"report: {Path(result['eval_dir']) / 'report.html'}")
    return 0
