"""Nothing lost, nothing silent: every subcommand fed bad input, through the real command line.

One table (:data:`CASES`) of what a hostile user tried, per subcommand. Each bad case must end with exit status 2
(130 for Ctrl-C) and exactly one line on stderr, ``rl-adapt COMMAND: error: ...``, naming the file or value and
what is wrong; no traceback; nothing created (no output folder, no temporary sibling); and every input file
byte-identical (sha256 of every file under the shared world and the case's own folder, before and after). The
cases whose input is only degraded (blank images, names that are not CAMUS-like, a case name that is HTML) must
exit 0 with a WARNING a user cannot miss and the count in what the command writes.

Data: ``rl-adapt synth --patients 2 --size 48`` (nnU-Net raw) and the tiny random nnU-Net model of
``test_evaluate.build_tiny_world`` (shared with test_evaluate and test_baselines); bad files are written per case.
Most cases run ``rl_adapt.cli.main`` in-process; those marked ``subprocess`` run ``python -m rl_adapt`` so that
a traceback or a stray log line would show on the real stderr.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from rl_adapt.cli import main
from rl_adapt.data.case import Case
from rl_adapt.data.writers import write_nnunet_raw
from test_bad_input_reading import _cut, _gz_damaged, _spacing_file, _write
from test_data_bad_input import _nnunet
from test_evaluate import build_tiny_world

REPO = Path(__file__).resolve().parents[1]
DATASET = "Dataset950_Bad"
SUBPROCESS_TIMEOUT = 180


# ------------------------------------------------------------------------------------------------ the world
@pytest.fixture(scope="module")
def world(tmp_path_factory) -> SimpleNamespace:
    """The shared inputs: a synthetic labelled nnU-Net raw dataset (2 patients, 48 px) and a tiny model."""
    root = tmp_path_factory.mktemp("bad_input_world")
    assert main(["synth", "--patients", "2", "--size", "48", "--format", "nnunet", "--out", str(root / DATASET)]) == 0
    tiny_root = tmp_path_factory.getbasetemp() / "tiny_nnunet_world"
    tiny = build_tiny_world(tiny_root)
    return SimpleNamespace(root=root, data=root / DATASET, model=tiny["src"], tiny_root=tiny_root)


class Ctx:
    """One case's view of the world: shared inputs, its own folder ``tmp`` and builders of bad inputs there."""

    def __init__(self, world: SimpleNamespace, tmp: Path):
        self.world, self.tmp = world, tmp
        self.data, self.model = world.data, world.model
        self.out = tmp / "out"

    def file(self, name: str = "a_file") -> Path:
        """A regular file (an --out below it cannot be created, not even by root)."""
        p = self.tmp / name
        p.write_text("I am a file\n")
        return p

    def folder(self, name: str, files: dict[str, str] | None = None) -> Path:
        d = self.tmp / name
        d.mkdir(parents=True, exist_ok=True)
        for rel, text in (files or {}).items():
            (d / rel).write_text(text)
        return d

    def images(self, name: str = "imgs", **arrays: np.ndarray) -> Path:
        """A folder of 2D NIfTI images, one per keyword (file stem -> array), spacing 0.3 mm."""
        d = self.folder(name)
        for stem, arr in arrays.items():
            img = sitk.GetImageFromArray(arr)
            img.SetSpacing((0.3, 0.3))
            sitk.WriteImage(img, str(d / f"{stem}.nii.gz"))
        return d

    def spacing(self, value: float, ext: str = ".nii.gz") -> Path:
        """A folder holding one image whose header spacing is ``value`` mm."""
        d = self.folder(f"spacing_{ext.strip('.')}")
        _spacing_file(d, ext, value)
        return d

    def model_copy(self, name: str = "model_copy") -> Path:
        """A copy of the tiny model folder (same <Dataset>/<Trainer>__<Plans>__2d layout) to break."""
        dst = self.tmp / name / self.model.parent.name / self.model.name
        shutil.copytree(self.model, dst)
        return dst

    def labelled(self, name: str, cases: list[Case]) -> Path:
        return write_nnunet_raw(cases, self.tmp / name, dataset_name=name)


def _heart_cases(names: list[str], blank: tuple[str, ...] = ()) -> list[Case]:
    """Labelled 48 px cases with a simple LV/MYO/LA layout; the ones named in ``blank`` have an all-zero image."""
    rng = np.random.default_rng(0)
    lab = np.zeros((48, 48), np.uint8)
    lab[8:34, 14:34], lab[12:30, 18:30], lab[34:44, 18:30] = 2, 1, 3
    out = []
    for n in names:
        img = (40 + 60 * (lab == 2) + rng.normal(0, 8, lab.shape)).clip(0, 255).astype(np.uint8)
        out.append(Case(n, np.zeros_like(img) if n in blank else img, lab.copy(), (0.5, 0.5)))
    return out


CAMUS_NAMES = [f"patient000{p}_{v}_{ph}" for p in (1, 2) for v in ("2CH", "4CH") for ph in ("ED", "ES")]


# ------------------------------------------------------------------------------------------- case builders
def _truncated(c: Ctx) -> Path:
    d = c.folder("truncated")
    _cut(_write(d / "a.nii.gz"))
    return d


def _corrupt_gzip(c: Ctx) -> Path:
    d = c.folder("corrupt")
    _gz_damaged(d)
    return d


def _nan_pixels(c: Ctx) -> Path:
    img = np.full((32, 32), 50, np.float32)
    img[3, 3] = np.nan
    return c.images("nan", n=img)


def _volume(c: Ctx) -> Path:
    d = c.folder("vol")
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((3, 16, 12), np.uint8)), str(d / "vol.nii.gz"))
    return d


def _label_7(c: Ctx) -> Path:
    lab = np.zeros((16, 12), np.uint8)
    lab[4:8, 4:8], lab[0, 0] = 1, 7
    return _nnunet(c.tmp / "Dataset961_Label7", label=lab)


def _junk_checkpoint(c: Ctx) -> Path:
    m = c.model_copy()
    (m / "fold_0" / "checkpoint_final.pth").write_bytes(b"not a checkpoint" * 10)
    return m


def _other_plan(c: Ctx) -> Path:
    """The tiny model's checkpoint under the plans of a wider network (a checkpoint of another plan)."""
    m = c.model_copy()
    plans = json.loads((m / "plans.json").read_text())
    kwargs = plans["configurations"]["2d"]["architecture"]["arch_kwargs"]
    kwargs["features_per_stage"] = [2 * f for f in kwargs["features_per_stage"]]
    (m / "plans.json").write_text(json.dumps(plans))
    return m


def _existing_fold(c: Ctx) -> Path:
    (c.out / DATASET / "nnUNetTrainer__nnUNetPlansSmall__2d" / "fold_0").mkdir(parents=True)
    return c.out


def _bad_yaml(c: Ctx) -> Path:
    p = c.tmp / "bad.yaml"
    p.write_text("train:\n  epochs: [1, 2\n")
    return p


def _junk_prior(c: Ctx) -> Path:
    p = c.tmp / "prior" / "shape_prior.pt"
    p.parent.mkdir()
    p.write_bytes(b"not a shape prior")
    return p


def _earlier_run(c: Ctx) -> Path:
    """Something that is not an evaluation: a folder with a user's file in it."""
    return c.folder("precious", {"notes.txt": "do not delete\n"})


def _link_to(c: Ctx, target: Path) -> Path:
    link = c.tmp / "link"
    link.symlink_to(target, target_is_directory=True)
    return link


def _blank_images(c: Ctx) -> Path:
    return c.labelled("Dataset962_Blank", _heart_cases(CAMUS_NAMES, blank=("patient0001_2CH_ED", "patient0002_4CH_ES")))


def _odd_names(c: Ctx) -> Path:
    return c.labelled("Dataset963_Odd", _heart_cases(["scan_a", "scan_b", "scan_c", *CAMUS_NAMES[:4],
                                                     CAMUS_NAMES[4]]))


def _html_name(c: Ctx) -> Path:
    return c.labelled("Dataset964_Html", _heart_cases(["<img src=x onerror=alert(1)>", *CAMUS_NAMES[:4]]))


# ------------------------------------------------------------------------------------------- output checks
def _summary_warning(kind: str, count: int) -> Callable[[Ctx], None]:
    def check(c: Ctx) -> None:
        s = json.loads((c.out / "summary.json").read_text())
        assert s["warnings"][kind]["count"] == count, s["warnings"]
    return check


def _html_escaped(c: Ctx) -> None:
    html = (c.out / "report.html").read_text()
    assert "<script>alert(1)" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<img src=x" not in html  # the case name is drawn into the overlay figure, never written as HTML
    _summary_warning("left_out_of_clinical_indices", 1)(c)


def _triage_blank_column(c: Ctx) -> None:
    rows = list(csv.DictReader(open(c.out / "images.csv")))
    assert sorted(r["case"] for r in rows if r["blank"] == "1") == ["patient0001_2CH_ED", "patient0002_4CH_ES"]


def _two_masks_blank(c: Ctx) -> None:
    assert len(list(c.out.glob("*.nii.gz"))) == 8


# ---------------------------------------------------------------------------------------------------- table
@dataclass(frozen=True)
class Bad:
    """One case: the command line (built in the case's folder), what its one stderr line must say, exit status."""

    command: str
    what: str
    argv: Callable[[Ctx], list[str]]
    words: tuple[str, ...]
    code: int = 2
    subprocess: bool = False
    check: Callable[[Ctx], None] | None = None
    """Exit-0 cases: what the written output must hold."""

    @property
    def id(self) -> str:
        return f"{self.command}: {self.what}"


def _eval(c: Ctx, data: Path, *extra: str, model: Path | None = None) -> list[str]:
    return ["evaluate", "--model", f"a={model or c.model}", "--data", str(data), "--workers", "0", *extra]


def _adapt(c: Ctx, *extra: str, target: Path | None = None, model: Path | None = None,
           out: Path | None = None) -> list[str]:
    return ["adapt", "--model", str(model or c.model), "--target", str(target or c.data), "--out", str(out or c.out),
            "--set", "corrector.use_shape_prior=false", *extra]


def _baseline(c: Ctx, *extra: str, method: str = "tent") -> list[str]:
    return ["baseline", "--method", method, "--model", str(c.model), "--target", str(c.data), *extra]


def _pretrain(c: Ctx, *extra: str) -> list[str]:
    return ["pretrain", "--data", str(c.data), *extra]


def _demo(c: Ctx, *sets: str, out: Path | None = None) -> list[str]:
    return ["demo", "--out", str(out or c.out), *[x for s in sets for x in ("--set", s)]]


CASES: list[Bad] = [
    # ---- synth
    Bad("synth", "output folder exists (a dataset)", lambda c: ["synth", "--out", str(c.data)],
        (DATASET, "already exists")),
    Bad("synth", "output under a regular file", lambda c: ["synth", "--out", str(c.file() / "sub")],
        ("a_file/sub", "cannot be created", "is a file, not a folder")),
    Bad("synth", "image size 8", lambda c: ["synth", "--size", "8", "--out", str(c.out)],
        ("--size: 8 is out of range (must be >= 32",)),
    Bad("synth", "zero patients", lambda c: ["synth", "--patients", "0", "--out", str(c.out)],
        ("--patients: 0 is out of range (must be >= 1)",)),
    Bad("synth", "unknown domain", lambda c: ["synth", "--domain", "target-nope", "--out", str(c.out)],
        ("unknown domain 'target-nope'", "target-blur")),
    # ---- info (reads only)
    Bad("info", "missing folder", lambda c: ["info", str(c.tmp / "nowhere")], ("nowhere", "not found")),
    Bad("info", "empty folder", lambda c: ["info", str(c.folder("empty"))], ("empty", "no images")),
    Bad("info", "truncated .nii.gz", lambda c: ["info", str(_truncated(c))], ("a.nii.gz", "truncated")),
    Bad("info", "damaged gzip bytes", lambda c: ["info", str(_corrupt_gzip(c))],
        ("a.nii.gz", "damaged compressed data")),
    Bad("info", "NaN pixels", lambda c: ["info", str(_nan_pixels(c))], ("n.nii.gz", "NaN/Inf")),
    Bad("info", "3D volume", lambda c: ["info", str(_volume(c))], ("vol.nii.gz", "3D volume")),
    Bad("info", "label value 7", lambda c: ["info", str(_label_7(c))], ("patient0001_2CH_ED.nii.gz", "7")),
    Bad("info", "label shape differs from image",
        lambda c: ["info", str(_nnunet(c.tmp / "Dataset965_Shape", label=np.zeros((16, 10), np.uint8)))],
        ("labelsTr", "does not match image size")),
    Bad("info", "label spacing differs from image",
        lambda c: ["info", str(_nnunet(c.tmp / "Dataset966_Spacing", lspacing=(1.0, 0.5)))], ("labelsTr", "spacing")),
    Bad("info", "spacing 1000 mm", lambda c: ["info", str(c.spacing(1000.0))], ("s.nii.gz", "spacing")),
    Bad("info", "spacing NaN (.mhd)", lambda c: ["info", str(c.spacing(math.nan, ".mhd"))], ("s.mhd", "spacing")),
    # ---- shift
    Bad("shift", "--split without --split-file",
        lambda c: ["shift", "--data", str(c.data), "--preset", "target-blur", "--split", "val", "--out", str(c.out)],
        ("--split val", "needs --split-file")),
    Bad("shift", "output inside the dataset",
        lambda c: ["shift", "--data", str(c.data), "--preset", "target-blur", "--out", str(c.data / "shifted")],
        ("shifted", "is inside the --data input")),
    Bad("shift", "unknown preset",
        lambda c: ["shift", "--data", str(c.data), "--preset", "target-nope", "--out", str(c.out)], ("target-nope",)),
    # ---- pretrain
    Bad("pretrain", "train.epochs=-3", lambda c: _pretrain(c, "--out", str(c.out), "--set", "train.epochs=-3"),
        ("train.epochs: -3 is out of range (must be >= 1)",)),
    Bad("pretrain", "augment probability 1.5",
        lambda c: _pretrain(c, "--out", str(c.out), "--set", "augment.p_blur=1.5"),
        ("augment.p_blur: 1.5 is out of range (must be >= 0 and <= 1)",)),
    Bad("pretrain", "unknown --set key", lambda c: _pretrain(c, "--out", str(c.out), "--set", "train.epochz=3"),
        ("unknown key(s) ['epochz']",)),
    Bad("pretrain", "YAML syntax error", lambda c: _pretrain(c, "--out", str(c.out), "--config", str(_bad_yaml(c))),
        ("bad.yaml", "not valid YAML")),
    Bad("pretrain", "output under a regular file", lambda c: _pretrain(c, "--out", str(c.file() / "m")),
        ("a_file/m", "is a file, not a folder")),
    Bad("pretrain", "output is the dataset", lambda c: _pretrain(c, "--out", str(c.data)),
        (DATASET, "is the --data input")),
    Bad("pretrain", "model fold already exists", lambda c: _pretrain(c, "--out", str(_existing_fold(c))),
        ("nnUNetTrainer__nnUNetPlansSmall__2d/fold_0", "already exists")),
    Bad("pretrain", "device tpu", lambda c: _pretrain(c, "--out", str(c.out), "--set", "train.device=tpu"),
        ("device 'tpu'",), subprocess=True),
    # ---- predict
    Bad("predict", "output inside the model folder",
        lambda c: ["predict", "--model", str(c.model), "--images", str(c.data), "--out", str(c.model / "masks")],
        ("masks", "is inside the --model input")),
    Bad("predict", "output folder exists",
        lambda c: ["predict", "--model", str(c.model), "--images", str(c.data), "--out", str(c.folder("out"))],
        ("out", "already exists")),
    Bad("predict", "device tpu",
        lambda c: ["predict", "--model", str(c.model), "--images", str(c.data), "--out", str(c.out), "--device", "tpu"],
        ("device 'tpu' is not a torch device",), subprocess=True),
    Bad("predict", "junk checkpoint_final.pth",
        lambda c: ["predict", "--model", str(_junk_checkpoint(c)), "--images", str(c.data), "--out", str(c.out)],
        ("checkpoint_final.pth", "not a readable torch checkpoint"), subprocess=True),
    Bad("predict", "checkpoint of another plan",
        lambda c: ["predict", "--model", str(_other_plan(c)), "--images", str(c.data), "--out", str(c.out)],
        ("does not fit the network of plans.json", "shape mismatch")),
    Bad("predict", "spacing 1e-30 mm",
        lambda c: ["predict", "--model", str(c.model), "--images", str(c.spacing(1e-30)), "--out", str(c.out)],
        ("s.nii.gz", "spacing")),
    Bad("predict", "blank images (warned, counted)",
        lambda c: ["predict", "--model", str(c.model), "--images", str(_blank_images(c)), "--out", str(c.out)],
        ("2 of 8 images are blank",), code=0, subprocess=True, check=_two_masks_blank),
    # ---- triage
    Bad("triage", "output is the images folder",
        lambda c: ["triage", "--model", str(c.model), "--images", str(c.data), "--out", str(c.data)],
        (DATASET, "is the --images input")),
    Bad("triage", "--top 0",
        lambda c: ["triage", "--model", str(c.model), "--images", str(c.data), "--out", str(c.out), "--top", "0"],
        ("--top: 0 is out of range (must be >= 1)",)),
    Bad("triage", "spacing 0 mm",
        lambda c: ["triage", "--model", str(c.model), "--images", str(c.spacing(0.0)), "--out", str(c.out)],
        ("s.nii.gz", "spacing")),
    Bad("triage", "blank images (warned, counted)",
        lambda c: ["triage", "--model", str(c.model), "--images", str(_blank_images(c)), "--out", str(c.out)],
        ("2 of 8 images are blank",), code=0, check=_triage_blank_column),
    # ---- adapt (checks made before the loop starts)
    Bad("adapt", "target folder missing", lambda c: _adapt(c, target=c.tmp / "no_target"),
        ("no_target", "does not exist (given as --target)")),
    Bad("adapt", "model folder missing", lambda c: _adapt(c, model=c.tmp / "no_model"),
        ("no_model", "does not exist (given as --model)")),
    Bad("adapt", "unknown --set key", lambda c: _adapt(c, "--set", "ppo.learning_rate=1e-5"),
        ("unknown key(s) ['learning_rate']",)),
    Bad("adapt", "out-of-range value", lambda c: _adapt(c, "--set", "source_teacher.held_out=1.5"),
        ("source_teacher.held_out: 1.5 is out of range",)),
    Bad("adapt", "junk shape prior file", lambda c: _adapt(c, "--shape-prior", str(_junk_prior(c))),
        ("shape_prior.pt", "not a shape prior")),
    Bad("adapt", "run folder inside the model folder",
        lambda c: _adapt(c, out=c.model / "run"), ("run", "is inside the --model input")),
    Bad("adapt", "run folder exists (no --resume)", lambda c: _adapt(c, out=c.folder("out")),
        ("out", "already exists", "--resume")),
    Bad("adapt", "--resume into a folder that is no run", lambda c: _adapt(c, "--resume", out=_earlier_run(c)),
        ("precious", "not an earlier output of rl-adapt adapt", "config.yaml")),
    Bad("adapt", "device tpu", lambda c: _adapt(c, "--set", "device=tpu"), ("device 'tpu'",), subprocess=True),
    # ---- evaluate
    Bad("evaluate", "--out is the dataset, --overwrite", lambda c: [*_eval(c, c.data), "--out", str(c.data),
                                                                   "--overwrite"],
        (DATASET, "is the --data input"), subprocess=True),
    Bad("evaluate", "--out holds the dataset, --overwrite", lambda c: [*_eval(c, c.data), "--out",
                                                                      str(c.data.parent), "--overwrite"],
        ("holds the --data input",)),
    Bad("evaluate", "--out a symbolic link to the dataset, --overwrite",
        lambda c: [*_eval(c, c.data), "--out", str(_link_to(c, c.data)), "--overwrite"],
        ("link", "is the --data input")),
    Bad("evaluate", "--overwrite of a folder that is no evaluation",
        lambda c: [*_eval(c, c.data), "--out", str(_earlier_run(c)), "--overwrite"],
        ("precious", "not an earlier output of rl-adapt evaluate", "summary.json")),
    Bad("evaluate", "output inside the model folder", lambda c: [*_eval(c, c.data), "--out", str(c.model / "eval")],
        ("eval", "is inside the --model a input")),
    Bad("evaluate", "device cuda without a GPU", lambda c: [*_eval(c, c.data), "--out", str(c.out), "--device", "cuda"],
        ("device 'cuda'", "CUDA is not available")),
    Bad("evaluate", "--overlays -1", lambda c: [*_eval(c, c.data), "--out", str(c.out), "--overlays", "-1"],
        ("--overlays: -1 is out of range (must be >= 0)",)),
    Bad("evaluate", "--compare with a model not given", lambda c: [*_eval(c, c.data), "--out", str(c.out),
                                                                   "--compare", "a:styled"],
        ("--compare 'a:styled'", "'styled' is not one of the models given")),
    Bad("evaluate", "spacing negative", lambda c: [*_eval(c, c.spacing(-1.0)), "--out", str(c.out)],
        ("s.nii.gz", "spacing")),
    Bad("evaluate", "blank images (warned, counted)",
        lambda c: [*_eval(c, _blank_images(c)), "--out", str(c.out), "--no-report"], ("2 of 8 images are blank",),
        code=0, check=_summary_warning("blank_images", 2)),
    Bad("evaluate", "names not CAMUS-like (warned, counted)",
        lambda c: [*_eval(c, _odd_names(c)), "--out", str(c.out), "--no-report"],
        ("4 of 8 images are left out of the clinical indices", "3 have no patient/view/phase",
         "1 belong to 1 patient(s) without all four"), code=0,
        check=_summary_warning("left_out_of_clinical_indices", 4)),
    Bad("evaluate", "case and model names with HTML in the report (escaped)",
        lambda c: ["evaluate", "--model", f"<script>alert(1)</script>={c.model}", "--data", str(_html_name(c)),
                   "--workers", "0", "--out", str(c.out), "--overlays", "5"],
        ("1 of 5 images are left out of the clinical indices",), code=0, check=_html_escaped),
    # ---- baseline
    Bad("baseline", "output folder exists", lambda c: _baseline(c, "--out", str(c.folder("out"))),
        ("out", "already exists")),
    Bad("baseline", "output under a regular file", lambda c: _baseline(c, "--out", str(c.file() / "tent")),
        ("a_file/tent", "is a file, not a folder")),
    Bad("baseline", "lr=-1", lambda c: _baseline(c, "--out", str(c.out), "--set", "lr=-1"),
        ("lr: -1.0 is out of range (must be > 0",)),
    Bad("baseline", "output inside the target", lambda c: _baseline(c, "--out", str(c.data / "tent")),
        ("tent", "is inside the --target input")),
    Bad("baseline", "styled-source without --source-data",
        lambda c: _baseline(c, "--out", str(c.out), method="styled-source"), ("needs the labelled source data",)),
    Bad("baseline", "device tpu", lambda c: _baseline(c, "--out", str(c.out), "--set", "device=tpu"),
        ("device 'tpu'",)),
    # ---- demo (checked before the first stage)
    Bad("demo", "unknown target domain", lambda c: _demo(c, "target_domain=target-nope"), ("target-nope",)),
    Bad("demo", "image_size=8", lambda c: _demo(c, "image_size=8"), ("image_size: 8 is out of range",)),
    Bad("demo", "output is a dataset, not a demo", lambda c: _demo(c, out=c.data),
        (DATASET, "not an earlier output of rl-adapt demo")),
    Bad("demo", "extra_overrides for an unknown command", lambda c: _demo(c, "extra_overrides={adpat: [seed=1]}"),
        ("unknown command(s) ['adpat']",)),
    Bad("demo", "a stage's value out of range", lambda c: _demo(c, "extra_overrides={pretrain: [train.epochs=0]}"),
        ("pretrain_cpu.yaml", "train.epochs: 0 is out of range")),
]


# ----------------------------------------------------------------------------------------------- machinery
def _snapshot(*roots: Path) -> dict[str, str]:
    """``{path: sha256 or "<dir>"}`` of everything under ``roots`` (hidden temporary siblings included)."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            out[str(p)] = "<dir>" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _run(case: Bad, argv: list[str], capsys) -> tuple[int, str, str]:
    if case.subprocess:
        res = subprocess.run([sys.executable, "-m", "rl_adapt", *argv], cwd=REPO, capture_output=True, text=True,
                             timeout=SUBPROCESS_TIMEOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))
        return res.returncode, res.stdout, res.stderr
    capsys.readouterr()
    code = main(argv)
    got = capsys.readouterr()
    return code, got.out, got.err


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Bad, world, tmp_path, capsys, caplog):
    if case.what.startswith("device cuda") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    ctx = Ctx(world, tmp_path / "case")
    ctx.tmp.mkdir()
    argv = case.argv(ctx)
    if case.command in ("predict", "triage", "evaluate", "adapt", "baseline", "pretrain") and not case.subprocess:
        argv.append("--no-progress")
    out_existed = ctx.out.exists()
    roots = (world.root, world.tiny_root, ctx.tmp)
    before = _snapshot(*roots)
    with caplog.at_level(logging.WARNING):
        code, stdout, stderr = _run(case, argv, capsys)
    assert "Traceback" not in stderr + stdout, stderr
    after = _snapshot(*roots)
    if os.environ.get("RL_ADAPT_BAD_INPUT_TABLE"):  # the table of cases and what each now says, for the docs
        with open(os.environ["RL_ADAPT_BAD_INPUT_TABLE"], "a") as table:
            said = [line for line in stderr.splitlines() if line.strip()] or [
                r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            table.write(json.dumps({"id": case.id, "command": case.command, "what": case.what, "exit": code,
                                    "said": said[:2]}) + "\n")
    if case.code == 0:
        assert code == 0, stderr
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        if case.subprocess:
            warnings = [line for line in stderr.splitlines() if line.startswith("WARNING")]
            assert len(stderr.strip().splitlines()) == len(warnings), stderr  # nothing else on stderr
        assert len(warnings) >= 1 and all(any(w in line for line in warnings) for w in case.words), warnings
        written = {p for p in after if p == str(ctx.out) or p.startswith(str(ctx.out) + os.sep)}
        assert written and {k: v for k, v in after.items() if k not in written} == before
        assert case.check is not None
        case.check(ctx)
        return
    assert code == case.code, (code, stderr)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"rl-adapt {case.command}: error: "), lines[0]
    assert all(w in lines[0] for w in case.words), lines[0]
    assert after == before, sorted(set(after) ^ set(before)) or "an input changed"
    if not out_existed:
        assert not ctx.out.exists()


def test_every_subcommand_has_cases():
    from rl_adapt.cli import COMMANDS

    assert {c.command for c in CASES} == set(COMMANDS)
    assert len({c.id for c in CASES}) == len(CASES)


def test_ctrl_c_stops_pretrain_with_one_line_and_keeps_only_its_checkpoint(world, tmp_path):
    """Ctrl-C (SIGINT) during pretraining: exit 130, "interrupted" with the way to continue, no traceback, no model
    folder (only the resume checkpoint of the finished epochs), inputs intact."""
    out = tmp_path / "m"
    before = _snapshot(world.root)
    proc = subprocess.Popen([sys.executable, "-m", "rl_adapt", "pretrain", "--data", str(world.data), "--out", str(out),
                             "--no-progress", "--set", "train.epochs=100000", "--set", "plan.features=[4, 8, 16]",
                             "--set", "plan.patch_size=[48, 48]", "--set", "plan.batch_size=2"],
                            cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"),
                            # a suite started in the background of a non-interactive shell inherits SIGINT ignored,
                            # and Python then installs no KeyboardInterrupt handler: give the child the default
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    try:
        for line in proc.stderr:  # INFO lines (--no-progress); interrupt in the middle of training
            lines.append(line)
            if "epoch 3/" in line:
                proc.send_signal(signal.SIGINT)
                break
        _, rest = proc.communicate(timeout=SUBPROCESS_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = "".join(lines) + rest
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    own = [line for line in err.splitlines() if line.strip() and not line.startswith("INFO ")]
    assert own == [f"rl-adapt pretrain: interrupted; the same command with --resume continues from what {out} kept"], \
        err
    assert [p.name for p in out.iterdir()] == ["unfinished_pretrain"]  # no model folder
    import torch
    ckpt = torch.load(next(out.glob("unfinished_pretrain/*/checkpoint.pt")), weights_only=False)
    assert ckpt["epochs_done"] >= 2
    assert _snapshot(world.root) == before


def test_help_shows_the_allowed_values(capsys):
    """Each command with a config shows every key's default and range in its --help."""
    for command, line in (("pretrain", "train.epochs = 20"), ("baseline", "lr = 0.0001"),
                          ("demo", "image_size = 128")):
        with pytest.raises(SystemExit) as info:
            main([command, "--help"])
        assert info.value.code == 0
        text = capsys.readouterr().out
        assert any(row.strip().startswith(line) and "[" in row for row in text.splitlines()), (command, text[-2000:])


def test_check_output_rules(tmp_path):
    """The rules of rl_adapt.preflight.check_output, as Adapter will call it (``may_exist=resume``)."""
    from rl_adapt.errors import InputError
    from rl_adapt.preflight import check_output

    data, model = tmp_path / "data", tmp_path / "models" / "M"
    data.mkdir()
    model.mkdir(parents=True)
    (data / "a.nii.gz").write_text("x")
    inputs = {"--model": model, "--target": data}
    assert check_output(tmp_path / "new" / "run", inputs) == tmp_path / "new" / "run"
    assert not (tmp_path / "new").exists()  # the write probe leaves nothing
    for out, words in ((data, "is the --target input"), (model / "run", "is inside the --model input"),
                       (tmp_path / "models", "holds the --model input"),
                       (data / "a.nii.gz" / "x", "inside the --target"),
                       (_file(tmp_path / "f") / "x", "f is a file, not a folder")):
        with pytest.raises(InputError, match=words):
            check_output(out, inputs, may_exist=True)
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(InputError, match="already exists"):
        check_output(run, inputs)
    assert check_output(run, inputs, may_exist=True, earlier_output=("config.yaml",)) == run  # empty: fine
    (run / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match=r"not an earlier output of rl-adapt adapt \(no config.yaml\)"):
        check_output(run, inputs, may_exist=True, earlier_output=("config.yaml",), command="rl-adapt adapt")
    (run / "config.yaml").write_text("seed: 0\n")
    assert check_output(run, inputs, may_exist=True, earlier_output=("config.yaml",)) == run
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "notes.txt"]
    with pytest.raises(InputError, match="exists and is not a folder"):
        check_output(tmp_path / "f", {}, may_exist=True)


def _file(path: Path) -> Path:
    path.write_text("x")
    return path


def test_match_expert_names():
    from rl_adapt.preflight import match_expert_names

    matched, unmatched = match_expert_names(["patient0001_2CH_ED.nii.gz", "nobody_2CH_ED.nii.gz", "p2_0000.png"],
                                            ["patient0001_2CH_ED", "p2"])
    assert matched == ["patient0001_2CH_ED.nii.gz", "p2_0000.png"] and unmatched == ["nobody_2CH_ED.nii.gz"]
