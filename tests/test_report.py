"""report.html from evaluation files: self-contained, every section present, renders in Chromium."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

from rl_adapt.errors import InputError
from rl_adapt.evaluation.scoring import clinical_row, summarise
from rl_adapt.io_utils import json_clean, write_csv
from rl_adapt.io_utils import write_json_atomic
from rl_adapt.evaluation.report import build_report, write_report

CHECKS = ("holes_in_lv", "disconnected_myo", "gap_lv_la")


def fabricate(folder: Path, n_patients: int = 6, models=("source", "adapted"), seed: int = 0,
              reliability: bool = True, overlays: bool = True) -> Path:
    """An evaluation folder as `evaluate` writes it, from made-up numbers (the report never needs models)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows, prow = [], []
    for mi, m in enumerate(models):
        for p in range(n_patients):
            for v in ("2CH", "4CH"):
                for ph in ("ED", "ES"):
                    r = {"case": f"patient{p:04d}_{v}_{ph}", "patient": f"patient{p:04d}", "view": v, "phase": ph,
                         "model": m}
                    for s in ("LV", "MYO", "LA", "epi"):
                        r[f"{s}_dice"] = float(np.clip(rng.normal(0.8 + 0.05 * mi, 0.05), 0, 1))
                        for k in ("hd", "hd95", "assd"):
                            r[f"{s}_{k}"] = float(abs(rng.normal(6 - mi, 2)))
                    for k in ("dice", "hd", "hd95", "assd"):
                        r[f"mean_{k}"] = float(np.mean([r[f"{s}_{k}"] for s in ("LV", "MYO", "LA")]))
                    ok = {c: bool(rng.random() < 0.8 + 0.1 * mi) for c in CHECKS}
                    r.update(valid=all(ok.values()), failed_checks=";".join(c for c in CHECKS if not ok[c]),
                             **{f"check_{c}": ok[c] for c in CHECKS})
                    rows.append(r)
            ref = {"EDV": rng.uniform(80, 160), "ESV": rng.uniform(30, 70)}
            ref["EF"] = 100 * (ref["EDV"] - ref["ESV"]) / ref["EDV"]
            pred = {k: v * rng.normal(1, 0.08) for k, v in ref.items()}
            prow.append(clinical_row(f"patient{p:04d}", m, pred, ref, {"EF": ref["EF"]}))
    write_csv(folder / "per_image.csv", rows)
    write_csv(folder / "per_patient.csv", prow)
    write_json_atomic(folder / "summary.json",
                      json_clean(summarise(rows, prow, list(models), ece={models[0]: 0.07}, n_bootstrap=100)))
    if reliability:
        edges = np.linspace(0, 1, 11)
        conf = (edges[:-1] + edges[1:]) / 2
        write_json_atomic(folder / "reliability.json", json_clean({
            "model": models[0], "reward_run": "runs/x", "ece": 0.07, "auroc": 0.85, "n_pixels": 1000,
            "bins": {"edges": edges.tolist(), "confidence": conf.tolist(),
                     "accuracy": np.clip(conf + 0.05, 0, 1).tolist(), "count": [0] + [100] * 9}}))
    if overlays:
        n, t = 4, 40
        yy, xx = np.mgrid[:t, :t]
        gt = np.zeros((n, t, t), np.uint8)
        gt[:, ((yy - 18) ** 2 / 120 + (xx - 20) ** 2 / 40) < 1] = 1
        np.savez_compressed(folder / "overlays.npz", case=np.array([f"c{i}" for i in range(n)]),
                            group=np.array(["helped", "hurt", "random", "random"]), models=np.array(list(models)),
                            shape=np.full((n, 2), t, np.int32), image=(rng.random((n, t, t)) * 255).astype(np.uint8),
                            gt=gt, pred=np.stack([gt] * len(models)), dice=rng.random((len(models), n)),
                            uncertainty=rng.random((n, t, t)).astype(np.float16))
    return folder


def test_report_has_every_section_and_is_self_contained(tmp_path):
    folder = fabricate(tmp_path / "ev")
    out = write_report(folder)
    text = out.read_text(encoding="utf-8")
    for title in ("Summary", "Paired comparisons", "Dice per structure", "HD95 per structure",
                  "Anatomical validity per check", "Ejection fraction", "Reward network as uncertainty",
                  "helped most", "hurt most", "Random cases"):
        assert title in text, title
    srcs = re.findall(r'src="([^"]+)"', text)
    assert len(srcs) >= 8 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "http://" not in text and "https://" not in text  # nothing fetched from anywhere
    assert text.count("<table>") >= 3 and "95 % CI" in text


def test_report_optional_sections_and_single_model(tmp_path):
    folder = fabricate(tmp_path / "ev", models=("only",), reliability=False, overlays=False)
    (folder / "per_patient.csv").unlink()
    text = build_report(folder)
    assert "Reward network" not in text and "Ejection fraction" not in text and "Paired" not in text
    assert "Dice per structure" in text


def test_report_missing_files_is_input_error(tmp_path):
    with pytest.raises(InputError):
        build_report(tmp_path)


def test_report_renders_in_headless_chromium(tmp_path):
    from PIL import Image

    if shutil.which("chromium") is None:
        if os.environ.get("RL_ADAPT_REQUIRE_CHROMIUM"):  # .ci/run installs it: a skip there would hide a failure
            pytest.fail("chromium not found although .ci/run installs it")
        pytest.skip("chromium not installed (Debian: apt-get install chromium; .ci/run installs it)")

    out = write_report(fabricate(tmp_path / "ev"))
    shot = tmp_path / "shot.png"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=1280,2400",
                        out.resolve().as_uri()], check=False, capture_output=True, timeout=120)
    assert shot.is_file()
    px = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    assert px.shape[0] == 2400 and px.shape[1] == 1280
    assert px.std() > 20  # not a blank page
    assert (np.abs(px - px.reshape(-1, 3).mean(0)).sum(-1) > 60).mean() > 0.05  # plenty of non-background
    header = px[:60].reshape(-1, 3).mean(0)
    assert header[2] > header[0]  # the dark-blue header is drawn (CSS applied)
