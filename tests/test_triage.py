"""rl-adapt triage: patients ranked by the anatomical checks their masks fail, label-free."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from rl_adapt.measures.anatomy import check_anatomy
from rl_adapt.synth.domains import generate_domain
from rl_adapt.evaluation.triage import image_rows, patient_ranking


def _broken(mask: np.ndarray) -> np.ndarray:
    """A plausible mask made implausible: a hole in the LV and a stray LA island."""
    out = mask.copy()
    ys, xs = np.nonzero(out == 1)
    cy, cx = int(ys.mean()), int(xs.mean())
    out[cy - 2 : cy + 3, cx - 2 : cx + 3] = 0
    out[2:8, 2:8] = 3
    return out


def test_the_patient_with_implausible_masks_ranks_first_and_counts_add_up():
    cases = generate_domain("source", 3, seed=0, size=96)
    masks = [c.label for c in cases]
    assert all(check_anatomy(m).valid for m in masks), "synthetic truth should be plausible"
    bad_patient = cases[-1].patient
    masks = [_broken(m) if c.patient == bad_patient else m for c, m in zip(cases, masks)]
    rows = image_rows([c.name for c in cases], [c.patient for c in cases], masks)
    assert [r["valid"] for r in rows] == [0 if c.patient == bad_patient else 1 for c in cases]
    for r, m in zip(rows, masks):
        assert r["n_failed"] == len(check_anatomy(m).failed) and r["failed_checks"].count(";") == max(r["n_failed"] - 1, 0)
    ranking = patient_ranking(rows)
    assert [r["rank"] for r in ranking] == [1, 2, 3]
    assert ranking[0]["patient"] == bad_patient and ranking[0]["invalid_images"] == 4
    assert ranking[0]["failed_checks"] == sum(r["n_failed"] for r in rows)
    # ties (two valid patients) are broken by name, so the order is reproducible
    assert [r["patient"] for r in ranking[1:]] == sorted({c.patient for c in cases} - {bad_patient})


def test_image_rows_refuses_mismatched_inputs():
    with pytest.raises(ValueError, match="differ in length"):
        image_rows(["a", "b"], [None], [np.zeros((8, 8), np.uint8)] * 2)


def test_cli_writes_both_tables_and_refuses_an_existing_output(tmp_path: Path, capsys):
    import torch

    from rl_adapt.cli import main
    from rl_adapt.data.writers import write_nnunet_raw
    from rl_adapt.policies.nnunet import NnUNetModel, export_model_folder, plan_dataset, shrink_plan

    labelled = write_nnunet_raw(generate_domain("source", 2, seed=0, size=64), tmp_path / "Dataset903_Tri",
                                dataset_name="Dataset903_Tri")
    plans, dataset_json, _ = plan_dataset(labelled)
    model = NnUNetModel.from_plans(shrink_plan(plans, [4, 8, 16], [64, 64], 4, fit_median_to_patch=False),
                                   dataset_json, seed=0, mirror_axes=None)
    with torch.no_grad():
        for p in model.network.parameters():
            p.add_(0.05 * torch.randn_like(p))
    folder = export_model_folder(model.network, model, tmp_path / "results")
    out = tmp_path / "triage"
    assert main(["triage", "--model", str(folder), "--images", str(labelled), "--out", str(out), "--top", "1",
                 "--no-progress"]) == 0
    images = list(csv.DictReader(open(out / "images.csv")))
    patients = list(csv.DictReader(open(out / "patients.csv")))
    assert len(images) == 8 and len(patients) == 2
    assert sum(int(p["images"]) for p in patients) == 8 and [p["rank"] for p in patients] == ["1", "2"]
    assert {p["patient"] for p in patients} == {r["patient"] for r in images}
    assert "wrote" in capsys.readouterr().out
    assert main(["triage", "--model", str(folder), "--images", str(labelled), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
