"""The synth and info commands: what a user sees, exit codes, and no partial output on failure."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rl_adapt.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("fmt", ["camus", "nnunet"])
def test_synth_then_info_lists_cases(tmp_path: Path, fmt: str, capsys):
    out = tmp_path / "D"
    assert main(["synth", "--domain", "source", "--patients", "3", "--out", str(out), "--format", fmt,
                 "--size", "48", "--seed", "4"]) == 0
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    rows = [ln for ln in text.splitlines() if ln.startswith("patient")]
    assert len(rows) == 12
    first = rows[0].split()
    assert first[:4] == ["patient0001_2CH_ED", "2CH", "ED", "48x48"]
    assert "x" in first[4] and first[5] == "yes" and float(first[6]) > 0  # spacing, labelled, EF
    assert f"format: {'camus2023' if fmt == 'camus' else 'nnunet'}  cases: 12  patients: 3" in text
    assert "views: 2CH 6, 4CH 6  phases: ED 6, ES 6" in text


def test_synth_no_labels_and_first_patient(tmp_path: Path, capsys):
    out = tmp_path / "T"
    assert main(["synth", "--domain", "target-blur", "--patients", "1", "--out", str(out), "--format",
                 "nnunet", "--size", "40", "--no-labels", "--first-patient", "7"]) == 0
    assert sorted(p.name for p in (out / "imagesTs").iterdir())[0] == "patient0007_2CH_ED_0000.nii.gz"
    assert not (out / "labelsTr").exists()
    capsys.readouterr()
    assert main(["info", str(out), "--summary"]) == 0
    assert "labelled: 0" in capsys.readouterr().out


def test_synth_errors_exit_2_without_output(tmp_path: Path, capsys):
    assert main(["synth", "--domain", "vendorX", "--patients", "1", "--out", str(tmp_path / "A")]) == 2
    err = capsys.readouterr().err
    assert "unknown domain 'vendorX'" in err and "target-shadow" in err
    assert main(["synth", "--patients", "0", "--out", str(tmp_path / "B")]) == 2
    (tmp_path / "C").mkdir()
    assert main(["synth", "--patients", "1", "--size", "40", "--out", str(tmp_path / "C")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["C"] and not any((tmp_path / "C").iterdir())


def test_info_errors_exit_2(tmp_path: Path, capsys):
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err


def test_console_script(tmp_path: Path):
    exe = Path(sys.executable).with_name("rl-adapt")
    if not exe.exists():
        pytest.skip("rl-adapt console script not installed next to this python")
    bad = subprocess.run([str(exe), "info", str(tmp_path / "nope")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "nope" in bad.stderr


def test_info_on_real_camus_subset(camus_dir: Path, tmp_path: Path, capsys):
    sub = tmp_path / "sub"
    (sub / "imagesTr").mkdir(parents=True)
    (sub / "labelsTr").mkdir()
    (sub / "dataset.json").symlink_to(camus_dir / "dataset.json")
    for f in sorted((camus_dir / "imagesTr").glob("patient0001_*"))[:4]:
        (sub / "imagesTr" / f.name).symlink_to(f)
        n = f.name.replace("_0000.nii.gz", ".nii.gz")
        (sub / "labelsTr" / n).symlink_to(camus_dir / "labelsTr" / n)
    assert main(["info", str(sub)]) == 0
    out = capsys.readouterr().out
    assert "patient0001_4CH_ES  4CH   ES     224x224  1x1" in out and "cases: 4" in out
