"""rl-adapt evaluate: summary.json schema on a tiny real run, paired statistics, bad input, atomic output."""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from rl_adapt.data.case import Case
from rl_adapt.errors import InputError
from rl_adapt.evaluation.evaluate import EvaluateConfig, evaluate
from rl_adapt.evaluation.inputs import parse_comparisons, parse_model_specs
from rl_adapt.evaluation.overlays import select_overlays
from rl_adapt.evaluation.scoring import TEXT_COLUMNS, complete_patients, paired_stats, summarise
from rl_adapt.io_utils import json_clean, write_csv
from rl_adapt.io_utils import read_csv as _read_csv
from rl_adapt.measures.statistics import bootstrap_ci


def read_csv(path):
    return _read_csv(path, TEXT_COLUMNS)

STRUCT_KEYS = {"LV", "MYO", "LA", "epi", "mean"}


# ----------------------------------------------------------------------------------------- tiny fixtures
def tiny_cases(n_patients: int = 2, size: int = 48, seed: int = 0) -> list[Case]:
    """Ellipse phantoms: LV inside MYO, LA below (apex up), 4 cases per patient, exact labels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = []
    for p in range(n_patients):
        for view in ("2CH", "4CH"):
            for phase in ("ED", "ES"):
                s = 1.0 if phase == "ED" else 0.8
                cy, cx = size * 0.4 + rng.normal(0, 1), size / 2 + rng.normal(0, 1)
                ry, rx = size * 0.25 * s, size * 0.12 * s
                e = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
                lab = np.zeros((size, size), np.uint8)
                lab[e < 1.7] = 2
                lab[e < 1] = 1
                la = ((yy - (cy + ry * 1.5)) / (size * 0.1)) ** 2 + ((xx - cx) / (size * 0.11)) ** 2 < 1
                lab[la & (lab == 0)] = 3
                img = (40 + rng.normal(0, 10, (size, size)) + 60 * (lab == 2) + 10 * (lab == 3)).clip(0, 255)
                out.append(Case(f"patient{p:04d}_{view}_{phase}", img.astype(np.float32), lab, (0.5, 0.5),
                                {"patient": f"patient{p:04d}", "view": view, "phase": phase, "EF": 50.0}))
    return out


def build_tiny_world(root: Path) -> dict:
    """Labelled raw dataset + two tiny nnU-Net results folders (random init, seeds 0 and 1); cached in ``root``."""
    from rl_adapt.data.writers import write_nnunet_raw
    from rl_adapt.policies.nnunet import NnUNetModel, export_model_folder, plan_dataset, shrink_plan

    done = root / "done.json"
    if done.is_file():
        return {k: Path(v) for k, v in json.loads(done.read_text()).items()}
    raw = write_nnunet_raw(tiny_cases(), root / "Dataset900_Tiny", dataset_name="Dataset900_Tiny")
    plans, dj, _ = plan_dataset(raw)
    plans = shrink_plan(plans, features=(4, 8, 16), patch_size=(48, 48), batch_size=2)
    paths = {"data": raw}
    for i, name in enumerate(("src", "other")):
        model = NnUNetModel.from_plans(plans, dj, seed=i)
        paths[name] = export_model_folder(model.network, model, root / name)
    done.write_text(json.dumps({k: str(v) for k, v in paths.items()}))
    return paths


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> dict:
    return build_tiny_world(tmp_path_factory.getbasetemp() / "tiny_nnunet_world")


# ----------------------------------------------------------------------------------------- statistics
def test_paired_stats_known_inputs():
    a = np.linspace(0.7, 0.9, 10)
    st = paired_stats(a, a + 0.05, n_bootstrap=500)
    assert st["dice_mean_diff"] == pytest.approx(0.05)
    assert st["ci95"][0] == pytest.approx(0.05) and st["ci95"][1] == pytest.approx(0.05)
    assert st["wilcoxon_p"] == pytest.approx(2 / 2 ** 10)  # exact two-sided test, all 10 differences positive
    assert st["n"] == 10
    same = paired_stats(a, a)
    assert same["dice_mean_diff"] == 0.0 and same["wilcoxon_p"] == 1.0
    withnan = paired_stats([0.5, np.nan, 0.7], [0.6, 0.9, np.nan])
    assert withnan["n"] == 1 and withnan["dice_mean_diff"] == pytest.approx(0.1)
    empty = paired_stats([np.nan], [0.3])
    assert empty["n"] == 0 and math.isnan(empty["dice_mean_diff"])


def test_bootstrap_ci_brackets_mean_and_is_seeded():
    x = np.random.default_rng(0).normal(1.0, 0.5, 400)
    lo, hi = bootstrap_ci(x, 1000, seed=3)
    assert lo < x.mean() < hi and hi - lo == pytest.approx(2 * 1.96 * x.std() / 20, rel=0.2)
    assert bootstrap_ci(x, 1000, seed=3) == [lo, hi]
    assert all(math.isnan(v) for v in bootstrap_ci([np.nan], 10))


def _rows(models=("a", "b")):
    rows = []
    for m, off in zip(models, (0.0, 0.1)):
        for i in range(4):
            r = {"case": f"c{i}", "patient": f"p{i // 2}", "view": "2CH", "phase": "ED", "model": m,
                 "valid": i % 2 == 0}
            for s in ("LV", "MYO", "LA", "epi"):
                r[f"{s}_dice"] = 0.5 + off + 0.01 * i
                for k in ("hd", "hd95", "assd"):
                    r[f"{s}_{k}"] = float("nan") if (s == "LA" and i == 0) else 3.0 - off
            for k in ("dice", "hd", "hd95", "assd"):
                r[f"mean_{k}"] = float(np.nanmean([r[f"{s}_{k}"] for s in ("LV", "MYO", "LA")]))
            rows.append(r)
    return rows


def test_summarise_nan_aware_counts_and_strict_json():
    rows = _rows()
    prow = [{"patient": "p0", "model": "a", "EF_err": -4.0, "EDV_err_pct": 10.0, "ESV_err_pct": float("nan")},
            {"patient": "p0", "model": "b", "EF_err": 2.0, "EDV_err_pct": -5.0, "ESV_err_pct": 3.0}]
    s = json_clean(summarise(rows, prow, ["a", "b"], ece={"a": 0.1}, n_bootstrap=200))
    text = json.dumps(s, allow_nan=False)  # strict JSON: no NaN literals
    s = json.loads(text)
    assert s["n_images"] == 4 and s["n_patients"] == 2
    a = s["models"]["a"]
    assert a["dice"]["LV"] == pytest.approx(0.515) and a["validity_rate"] == 0.5
    assert a["hd95"]["LA"] == pytest.approx(3.0) and s["counts"]["models"]["a"]["hd95"]["LA"] == 3
    assert a["ef_mae"] == 4.0 and a["edv_mae_pct"] == 10.0 and a["esv_mae_pct"] is None and a["ece"] == 0.1
    assert s["models"]["b"]["ece"] is None
    assert list(s["paired"]) == ["b vs a"]
    assert s["paired"]["b vs a"]["dice_mean_diff"] == pytest.approx(0.1)
    assert s["counts"]["paired"]["b vs a"] == 4


def test_summarise_extra_pairs_compare_two_non_reference_models():
    rows = _rows()
    rows += [{**r, "model": "c", "mean_dice": r["mean_dice"] + 0.05} for r in rows if r["model"] == "b"]
    s = summarise(rows, [], ["a", "b", "c"], n_bootstrap=200, pairs=[("c", "b"), ("b", "a"), ("c", "c")])
    assert list(s["paired"]) == ["b vs a", "c vs a", "c vs b"]  # the reference's first, duplicates and self dropped
    assert s["paired"]["c vs b"]["dice_mean_diff"] == pytest.approx(0.05)
    assert s["paired"]["c vs a"]["dice_mean_diff"] == pytest.approx(0.15)
    lo, hi = s["paired"]["c vs b"]["ci95"]
    assert lo == pytest.approx(0.05) and hi == pytest.approx(0.05) and s["counts"]["paired"]["c vs b"] == 4


def test_parse_comparisons_names_the_bad_spec():
    assert parse_comparisons(["rl:styled", " rl : src "], ["src", "styled", "rl"]) == [("rl", "styled"), ("rl", "src")]
    for spec, says in (("rl-styled", "expected NAME:REFERENCE"), ("rl:tent", "'tent' is not one of the models"),
                       ("rl:rl", "compared with itself"), (":src", "expected NAME:REFERENCE")):
        with pytest.raises(InputError, match=says):
            parse_comparisons([spec], ["src", "styled", "rl"])


def test_csv_round_trip_keeps_ids_and_nan(tmp_path):
    rows = [{"case": "0001", "patient": "0001", "model": "m", "x": float("nan"), "valid": True, "y": 1.5}]
    write_csv(tmp_path / "t.csv", rows)
    back = read_csv(tmp_path / "t.csv")[0]
    assert back["case"] == "0001" and back["patient"] == "0001" and math.isnan(back["x"])
    assert back["valid"] == 1.0 and back["y"] == 1.5


def test_overlay_selection_helped_hurt_random():
    rows = []
    for i in range(10):
        rows.append({"model": "a", "case": f"c{i}", "mean_dice": 0.5})
        rows.append({"model": "b", "case": f"c{i}", "mean_dice": 0.5 + 0.05 * (i - 5)})
    cases = [f"c{i}" for i in range(10)]
    sel = select_overlays(rows, cases, ["a", "b"], 2, seed=0)
    assert [c for c, g in sel if g == "helped"] == ["c9", "c8"]
    assert [c for c, g in sel if g == "hurt"] == ["c0", "c1"]
    rand = [c for c, g in sel if g == "random"]
    assert len(rand) == 2 and not set(rand) & {"c0", "c1", "c8", "c9"}
    assert sel == select_overlays(rows, cases, ["a", "b"], 2, seed=0)
    one = select_overlays([r for r in rows if r["model"] == "b"], cases, ["b"], 1)
    assert one[0] == ("c0", "worst")


def test_complete_patients_needs_both_views_and_phases():
    cases = tiny_cases(2)
    assert list(complete_patients(cases)) == ["patient0000", "patient0001"]
    assert list(complete_patients(cases[:-1])) == ["patient0000"]


def test_parse_model_specs():
    assert parse_model_specs(["a=/x/y", "/m/src"]) == {"a": Path("/x/y"), "src": Path("/m/src")}
    with pytest.raises(InputError):
        parse_model_specs(["a=/x", "a=/y"])
    with pytest.raises(InputError):
        parse_model_specs([])


# ----------------------------------------------------------------------------------------- real tiny run
def _check_schema(s: dict, names: list[str], pairs: tuple[str, ...] = ()) -> None:
    assert isinstance(s["n_images"], int) and isinstance(s["n_patients"], int)
    assert list(s["models"]) == names
    for n in names:
        e = s["models"][n]
        for metric in ("dice", "hd95", "hd", "assd"):
            assert set(e[metric]) == STRUCT_KEYS
            assert all(v is None or isinstance(v, float) for v in e[metric].values())
        assert isinstance(e["validity_rate"], float) and 0.0 <= e["validity_rate"] <= 1.0
        for k in ("ef_mae", "edv_mae_pct", "esv_mae_pct", "ece"):
            assert k in e and (e[k] is None or isinstance(e[k], float))
    assert set(s["paired"]) == {f"{n} vs {names[0]}" for n in names[1:]} | set(pairs)
    for st in s["paired"].values():
        assert set(st) == {"dice_mean_diff", "ci95", "wilcoxon_p"}
        assert isinstance(st["dice_mean_diff"], float) and len(st["ci95"]) == 2


def test_evaluate_tiny_run_writes_schema_tables_and_report(tiny_world, tmp_path):
    out = tmp_path / "eval"
    cfg = EvaluateConfig(overlays=1, n_bootstrap=200, workers=1,  # one forked worker, overlapping prediction
                         compare=["src:other"])  # the reverse of the reference comparison
    s = evaluate({"src": tiny_world["src"], "other": tiny_world["other"]}, tiny_world["data"], out, config=cfg,
                 progress=False)
    text = (out / "summary.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    on_disk = json.loads(text)
    assert on_disk == json.loads(json.dumps(s))
    _check_schema(on_disk, ["src", "other"], pairs=("src vs other",))
    fwd, rev = on_disk["paired"]["other vs src"], on_disk["paired"]["src vs other"]
    assert rev["dice_mean_diff"] == pytest.approx(-fwd["dice_mean_diff"]) and rev["wilcoxon_p"] == fwd["wilcoxon_p"]
    assert on_disk["n_images"] == 8 and on_disk["n_patients"] == 2
    rows = read_csv(out / "per_image.csv")
    assert len(rows) == 16 and {r["model"] for r in rows} == {"src", "other"}
    for col in ("case", "patient", "view", "phase", "LV_dice", "epi_hd95", "MYO_assd", "LA_hd", "valid",
                "failed_checks"):
        assert col in rows[0]
    assert any(k.startswith("check_") for k in rows[0])
    # the summary's Dice is the NaN-aware mean of the table
    lv = [r["LV_dice"] for r in rows if r["model"] == "src"]
    assert on_disk["models"]["src"]["dice"]["LV"] == pytest.approx(float(np.nanmean(lv)), rel=1e-6)
    prow = read_csv(out / "per_patient.csv")
    assert {r["model"] for r in prow} <= {"src", "other"}
    assert (out / "report.html").is_file() and (out / "overlays.npz").is_file()
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "src" in html
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".eval")]  # no temp folder left


def test_evaluate_bad_inputs_leave_nothing(tiny_world, tmp_path):
    data, src = tiny_world["data"], tiny_world["src"]
    out = tmp_path / "eval"
    cfg = EvaluateConfig(report=False, workers=0)
    broken = tmp_path / "broken_model"
    shutil.copytree(src, broken)
    (broken / "fold_0" / "checkpoint_final.pth").write_bytes(b"not a checkpoint")
    unlabelled = tmp_path / "Dataset901_NoLabels"
    shutil.copytree(data, unlabelled)
    shutil.rmtree(unlabelled / "labelsTr")
    (unlabelled / "imagesTr").rename(unlabelled / "imagesTs")
    empty = tmp_path / "empty"
    empty.mkdir()
    mismatched = tmp_path / "Dataset902_Mismatch"
    shutil.copytree(data, mismatched)
    first = sorted((mismatched / "labelsTr").iterdir())[0]
    first.rename(first.with_name("patient9999_2CH_ED.nii.gz"))
    bad = [({"m": broken}, data), ({"m": tmp_path / "nowhere"}, data), ({"m": src}, unlabelled),
           ({"m": src}, empty), ({"m": src}, mismatched)]
    for models, d in bad:
        with pytest.raises(InputError):
            evaluate(models, d, out, config=cfg, progress=False)
        assert not out.exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".eval")]


def test_a_killed_evaluation_resumes_without_predicting_its_finished_models_again(tiny_world, tmp_path,
                                                                                 monkeypatch):
    from rl_adapt.errors import RLAdaptError
    from rl_adapt.policies.nnunet import NnUNetModel

    models = {"src": tiny_world["src"], "other": tiny_world["other"]}
    cfg = EvaluateConfig(report=False, workers=0, n_bootstrap=100)
    evaluate(models, tiny_world["data"], tmp_path / "ref", config=cfg, progress=False)
    out = tmp_path / "eval"
    real, calls = NnUNetModel.predict, []

    def predict(self, *a, **k):  # the second model is killed at its first image
        calls.append(1)
        if len(calls) == 9:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(NnUNetModel, "predict", predict)
        with pytest.raises(KeyboardInterrupt):
            evaluate(models, tiny_world["data"], out, config=cfg, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["unfinished"]  # no table yet, the first model's masks kept
    with pytest.raises(InputError, match="--resume"):
        evaluate(models, tiny_world["data"], out, config=cfg, progress=False)
    with pytest.raises(RLAdaptError, match="other settings"):
        evaluate({"src": tiny_world["src"]}, tiny_world["data"], out, config=cfg, progress=False, resume=True)

    calls.clear()
    with monkeypatch.context() as m:
        m.setattr(NnUNetModel, "predict", predict)
        evaluate(models, tiny_world["data"], out, config=cfg, progress=False, resume=True)
    assert len(calls) == 8  # the second model's 8 images only
    assert not (out / "unfinished").exists()
    for name in ("per_image.csv", "per_patient.csv", "summary.json"):
        assert (out / name).read_text() == (tmp_path / "ref" / name).read_text(), name
    # --resume of the finished evaluation: its summary, nothing predicted or written (where it runs may differ);
    # other settings: refused, the key named
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    calls.clear()
    with monkeypatch.context() as m:
        m.setattr(NnUNetModel, "predict", predict)
        again = evaluate(models, tiny_world["data"], out, config=dataclasses.replace(cfg, torch_threads=2),
                         progress=False, resume=True)
    assert again == json.loads((out / "summary.json").read_text()) and not calls
    with pytest.raises(RLAdaptError, match="finished with other settings.*n_bootstrap: 100 then, 50 now"):
        evaluate(models, tiny_world["data"], out, config=dataclasses.replace(cfg, n_bootstrap=50), progress=False,
                 resume=True)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamp


def test_cli_evaluate_bad_model_exits_nonzero(tiny_world, tmp_path, capsys):
    from rl_adapt.cli import main

    rc = main(["evaluate", "--model", f"x={tmp_path / 'nowhere'}", "--data", str(tiny_world["data"]),
               "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 2 and not (tmp_path / "o").exists()
    err = capsys.readouterr().err
    assert "error" in err and "nowhere" in err and len(err.strip().splitlines()) == 1


def test_evaluate_with_reward_network_reports_reliability(tiny_world, tmp_path):
    from rl_adapt.engine.reward.network import RewardNet, RewardNetConfig

    import torch

    torch.manual_seed(0)
    run = tmp_path / "adapt_run"
    run.mkdir()
    RewardNet(RewardNetConfig(features=4, depth=2)).save(run / "reward_net.pt")
    out = tmp_path / "eval"
    s = evaluate({"src": tiny_world["src"], "other": tiny_world["other"]}, tiny_world["data"], out, reward=run,
                 config=EvaluateConfig(overlays=1, n_bootstrap=100, workers=0), progress=False)
    assert isinstance(s["models"]["src"]["ece"], float) and 0.0 <= s["models"]["src"]["ece"] <= 1.0
    assert s["models"]["other"]["ece"] is None
    rel = json.loads((out / "reliability.json").read_text())
    assert rel["ece"] == pytest.approx(s["models"]["src"]["ece"])
    assert sum(rel["bins"]["count"]) == rel["n_pixels"] > 0 and len(rel["bins"]["edges"]) == 11
    with np.load(out / "overlays.npz") as z:
        u = z["uncertainty"].astype(np.float32)
        assert u.shape == z["image"].shape and 0.0 <= u.min() and u.max() <= 1.0
    assert "Reward network as uncertainty" in (out / "report.html").read_text()
    r = s["reward"]  # also scored near the borders, where the errors are
    assert r["model"] == "src" and r["border_px"] == 5 and 0.0 <= r["border_ece"] <= 1.0
    assert rel["border"]["n_pixels"] <= rel["n_pixels"]
    conf = rel["policy_confidence"]  # the model's own confidence, scored on the same pixels as the reward
    assert conf["everywhere"]["n_pixels"] == rel["n_pixels"] and conf["border"]["n_pixels"] == rel["border"]["n_pixels"]
    assert 0.0 <= r["confidence_border_auroc"] <= 1.0 and r["confidence_auroc"] == conf["everywhere"]["auroc"]
    other = evaluate({"src": tiny_world["src"], "other": tiny_world["other"]}, tiny_world["data"], tmp_path / "e2",
                     reward=run, config=EvaluateConfig(overlays=0, n_bootstrap=100, workers=0, report=False,
                                                       reward_model="other"), progress=False)
    assert other["reward"]["model"] == "other" and other["models"]["src"]["ece"] is None
    with pytest.raises(InputError, match="reward-model 'nobody'"):
        evaluate({"src": tiny_world["src"]}, tiny_world["data"], tmp_path / "e3", reward=run,
                 config=EvaluateConfig(report=False, reward_model="nobody", workers=0), progress=False)


def test_evaluate_applies_one_postprocessing_rule_to_every_model(tiny_world, tmp_path):
    from rl_adapt.measures.anatomy import check_anatomy
    from rl_adapt.evaluation.inputs import load_labelled, load_model
    from rl_adapt.postprocessing import Postprocessing, postprocessing_files

    src, other = tmp_path / "src", tmp_path / "other"
    shutil.copytree(tiny_world["src"], src)
    shutil.copytree(tiny_world["other"], other)
    rule = Postprocessing([("remove_all_but_largest_component_from_segmentation", {"labels_or_regions": [1, 2, 3]}),
                           ("anatomical_cleanup", {})])
    (other / "postprocessing.json").write_text(json.dumps(postprocessing_files(rule)["postprocessing.json"]))
    cfg = EvaluateConfig(report=True, overlays=1, n_bootstrap=100, workers=0)
    models = {"src": src, "other": other}
    s = evaluate(models, tiny_world["data"], tmp_path / "eval", config=cfg, progress=False)
    raw_only = evaluate(models, tiny_world["data"], tmp_path / "eval_raw", progress=False,
                        config=EvaluateConfig(report=False, n_bootstrap=100, workers=0, postprocessing="none"))
    # the raw figures do not depend on the postprocessing; the postprocessed ones have the same shape
    assert "postprocessed" not in raw_only
    assert {k: v for k, v in s.items() if k not in ("postprocessed", "postprocessing")} == raw_only
    _check_schema(s["postprocessed"], ["src", "other"])
    assert s["postprocessing"]["postprocessing_fns"] == [n for n, _ in rule.steps]
    assert s["postprocessing"]["applied_to"] == ["src", "other"] and "other" in s["postprocessing"]["source"]
    # the source model, which carries no rule, is postprocessed with the other model's rule too
    rows = read_csv(tmp_path / "eval" / "postprocessed" / "per_image.csv")
    assert len(rows) == 16 and {r["model"] for r in rows} == {"src", "other"}
    case = load_labelled(tiny_world["data"])[0]
    pred = load_model(src).predict(case.image, case.spacing)
    row = next(r for r in rows if r["model"] == "src" and r["case"] == case.name)
    assert bool(row["valid"]) == check_anatomy(rule(pred)).valid
    assert "Postprocessed outputs" in (tmp_path / "eval" / "report.html").read_text()
    # an explicit rule file works for models that carry none
    s2 = evaluate({"src": src}, tiny_world["data"], tmp_path / "eval2", progress=False,
                  config=EvaluateConfig(report=False, n_bootstrap=100, workers=0,
                                        postprocessing=str(other / "postprocessing.json")))
    assert s2["postprocessed"]["models"]["src"] == s["postprocessed"]["models"]["src"]
    # an empty rule (nnU-Net writes one when no step helped) changes nothing and does not conflict
    (src / "postprocessing.json").write_text(json.dumps(postprocessing_files(Postprocessing())["postprocessing.json"]))
    s3 = evaluate(models, tiny_world["data"], tmp_path / "eval_empty", progress=False,
                  config=EvaluateConfig(report=False, n_bootstrap=100, workers=0))
    assert s3["postprocessed"] == s["postprocessed"]
    # two different rules: refused, nothing written
    lcc = Postprocessing([("remove_all_but_largest_component_from_segmentation", {"labels_or_regions": [1, 2, 3]})])
    (src / "postprocessing.json").write_text(json.dumps(postprocessing_files(lcc)["postprocessing.json"]))
    with pytest.raises(InputError, match="different postprocessing rules"):
        evaluate(models, tiny_world["data"], tmp_path / "eval3", config=cfg, progress=False)
    assert not (tmp_path / "eval3").exists()


def test_the_reward_is_scored_beside_the_models_own_confidence_in_the_image_geometry(tiny_world):
    """``reward_in_geometry`` returns the model's maximum softmax probability mapped back like its logits: the same
    as the softmax of the logits mapped back (up to the resampling order), and highest where the prediction is."""
    import torch
    from rl_adapt.engine.reward.network import RewardNet, RewardNetConfig
    from rl_adapt.evaluation.inputs import load_labelled, load_model
    from rl_adapt.evaluation.reliability import reward_in_geometry

    torch.manual_seed(0)
    model = load_model(tiny_world["src"])
    case = load_labelled(tiny_world["data"])[0]
    r, pred, covered, confidence = reward_in_geometry(RewardNet(RewardNetConfig(features=4, depth=2)), model, case)
    patch, props = model.to_patch(case.image, case.spacing)
    with torch.no_grad():
        out = model.network(patch[None])
        out = out[0] if isinstance(out, (list, tuple)) else out
    logits = torch.from_numpy(model.from_patch(out[0], props))
    expected = torch.softmax(logits, 0).amax(0).numpy()
    assert confidence.shape == r.shape == pred.shape and covered.any()
    assert np.abs(confidence - expected)[covered].mean() < 0.02
    assert confidence[covered].min() >= 1.0 / model.num_classes - 0.02
