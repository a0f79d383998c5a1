"""rl-adapt shift: a real-looking dataset seen through a target vendor, split selection, label repair."""
import json

import numpy as np
import pytest

from rl_adapt.cli import main
from rl_adapt.data.label_repair import remove_resize_artefacts
from rl_adapt.data.readers import read_dataset
from rl_adapt.data.writers import write_nnunet_raw
from rl_adapt.synth.domains import generate_domain


def test_shift_keeps_the_split_and_changes_the_look(tmp_path):
    cases = generate_domain("source", 2, seed=0, size=64)
    raw = write_nnunet_raw(cases, tmp_path / "Dataset905_Src", dataset_name="Dataset905_Src")
    split = tmp_path / "splits.json"
    split.write_text(json.dumps({"train": [c.name for c in cases[:4]], "val": [c.name for c in cases[4:]]}))
    out = tmp_path / "Dataset906_Blur"
    assert main(["shift", "--data", str(raw), "--preset", "target-blur", "--out", str(out),
                 "--split-file", str(split), "--split", "val", "--no-progress"]) == 0
    shifted = read_dataset(out)
    assert [c.name for c in shifted] == [c.name for c in cases[4:]]
    for orig, new in zip(cases[4:], shifted):
        assert new.label is not None and new.image.shape == orig.image.shape
        assert np.abs(new.image.astype(float) - orig.image.astype(float)).mean() > 5
    assert main(["shift", "--data", str(raw), "--preset", "target-blur", "--out", str(tmp_path / "x"),
                 "--split-file", str(split), "--split", "nope"]) == 2
    assert not (tmp_path / "x").exists()


def test_label_repair_removes_interpolation_sandwiches(tmp_path):
    lab = np.zeros((32, 32), np.uint8)
    lab[8:24, 10:22] = 2
    lab[10:22, 12:20] = 1
    damaged = lab.copy()
    damaged[8:24, 9] = 1  # an LV strip between background and MYO: the resize signature
    fixed = remove_resize_artefacts(damaged)
    assert np.array_equal(fixed, lab)
    case = generate_domain("source", 1, seed=0, size=64)
    raw = write_nnunet_raw(case, tmp_path / "Dataset907_R", dataset_name="Dataset907_R")
    out = tmp_path / "Dataset908_Same"
    assert main(["shift", "--data", str(raw), "--preset", "none", "--repair-labels", "--out", str(out)]) == 0
    for a, b in zip(case, read_dataset(out)):
        assert np.array_equal(a.image, b.image)
        assert np.array_equal(b.label, remove_resize_artefacts(a.label))
        assert np.mean(a.label != b.label) < 0.01  # a clean mask is nearly untouched


@pytest.mark.parametrize("command", ["shift", "pretrain", "adapt", "baseline", "evaluate", "predict", "triage", "demo"])
def test_every_long_running_command_takes_no_progress(command, capsys):
    """A batch script passes ``--no-progress`` to every step of a protocol (results/camus220/prepare.sh, run.sh)."""
    with pytest.raises(SystemExit) as stop:
        main([command, "--help"])
    assert stop.value.code == 0
    assert "--no-progress" in capsys.readouterr().out
