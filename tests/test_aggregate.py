"""Aggregation: tidy/wide tables, clinical errors, NaN-aware summaries with seeded bootstrap, paired tests."""
from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from rl_adapt.measures.aggregate import (
    TIDY_COLUMNS,
    MetricAccumulator,
    clinical_errors,
    paired_difference,
    summarize,
)
from rl_adapt.measures.anatomy import check_anatomy
from rl_adapt.data.case import Case
from rl_adapt.measures.metrics import segmentation_metrics


def test_summarize_counts_nans_and_is_seeded():
    vals = [1.0, 2.0, float("nan"), 3.0, None, 4.0]
    s = summarize(vals, seed=3)
    assert s["n"] == 4 and s["n_nan"] == 2
    assert s["mean"] == 2.5 and s["median"] == 2.5 and s["std"] == pytest.approx(np.std([1, 2, 3, 4], ddof=1))
    assert s["ci95"][0] < 2.5 < s["ci95"][1]
    assert summarize(vals, seed=3)["ci95"] == s["ci95"]
    empty = summarize([float("nan")])
    assert empty["n"] == 0 and empty["n_nan"] == 1 and math.isnan(empty["mean"])
    # the bootstrap CI of a large normal sample is close to mean +- 1.96 sd/sqrt(n)
    x = np.random.default_rng(0).normal(10, 2, 2000)
    lo, hi = summarize(x)["ci95"]
    half = 1.96 * 2 / math.sqrt(2000)
    assert lo == pytest.approx(x.mean() - half, abs=0.03) and hi == pytest.approx(x.mean() + half, abs=0.03)


def test_paired_difference():
    rng = np.random.default_rng(1)
    a = rng.normal(0.9, 0.02, 40)
    b = a - 0.01 + rng.normal(0, 0.002, 40)
    a[3] = np.nan
    r = paired_difference(a, b)
    assert r["n"] == 39 and r["n_dropped"] == 1
    assert r["mean_diff"] == pytest.approx(0.01, abs=0.002) and r["ci95"][0] > 0 and r["wilcoxon_p"] < 1e-6
    assert paired_difference([1, 2], [1, 2])["wilcoxon_p"] == 1.0
    with pytest.raises(ValueError):
        paired_difference([1, 2], [1])


def test_clinical_errors():
    e = clinical_errors({"EF": 55.0, "EDV": 110.0, "ESV": 45.0}, {"EF": 60.0, "EDV": 100.0, "ESV": 50.0})
    assert e["EF_abs_err"] == 5.0 and e["EF_err"] == -5.0
    assert e["EDV_rel_err"] == pytest.approx(10.0) and e["ESV_rel_err"] == pytest.approx(10.0)
    assert math.isnan(clinical_errors({"EF": 50.0}, {})["EF_abs_err"])


def _maps():
    gt = np.zeros((40, 40), np.uint8)
    gt[5:30, 10:30] = 2
    gt[8:30, 14:26] = 1
    gt[30:38, 14:26] = 3
    pred = gt.copy()
    pred[8:12, 14:26] = 2
    return pred, gt


def test_accumulator_tables_summary_and_csv(tmp_path):
    pred, gt = _maps()
    acc = MetricAccumulator()
    for model, p in (("a", pred), ("b", gt)):
        for i in range(3):
            case = Case(f"p{i}_2CH_ED", np.zeros_like(gt, np.float32), gt, (0.5, 0.5),
                        {"patient": f"p{i}", "view": "2CH", "phase": "ED"})
            acc.add(case, segmentation_metrics(p, gt, (0.5, 0.5)), check_anatomy(p), model=model)
        acc.add_patient("p0", model, {"EF": 50.0, "EDV": 100.0, "ESV": 50.0, "volume_method": "biplane"},
                        {"EF": 55.0, "EDV": 110.0, "ESV": 49.5})
    rows = acc.rows()
    n_checks = len(check_anatomy(gt).checks)
    assert len(rows) == 2 * 3 * (4 * 4 + 1 + n_checks)
    assert set(rows[0]) == set(TIDY_COLUMNS) and rows[0]["patient"] == "p0" and rows[0]["view"] == "2CH"
    wide = acc.wide()
    assert len(wide) == 6 and wide[3]["LV_dice"] == 1.0 and wide[0]["LV_dice"] < 1.0
    summ = acc.summary(n_bootstrap=200)
    assert acc.models() == ["a", "b"]
    assert summ["b"]["LV_dice"]["mean"] == 1.0 and summ["a"]["LV_dice"]["n"] == 3
    assert summ["a"]["EF_abs_err"]["mean"] == 5.0 and summ["a"]["n_patients"] == 1
    assert "valid_fraction" in summ["a"]
    acc.write_csv(tmp_path / "long.csv", tmp_path / "wide.csv", tmp_path / "patients.csv")
    with open(tmp_path / "long.csv") as f:
        back = list(csv.DictReader(f))
    assert len(back) == len(rows) and tuple(back[0]) == TIDY_COLUMNS
    with open(tmp_path / "patients.csv") as f:
        pats = list(csv.DictReader(f))
    assert float(pats[0]["EDV_rel_err"]) == pytest.approx(100 * 10 / 110)
