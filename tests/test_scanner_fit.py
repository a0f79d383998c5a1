"""The label-free scanner fit: geometry from pixel spacing, image statistics, and a fit that finds a known scanner's
display levels on small synthetic images (numpy only, seconds)."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
import pytest

from rl_adapt.errors import InputError
from rl_adapt.scanner_fit import (SEARCH, ScannerFitConfig, ScannerObjective, fit_scanner, geometry_from_spacing,
                                  image_statistics)
from rl_adapt.synth.domains import apply_vendor_shift, generate_domain, shifted_spacing
from rl_adapt.synth.vendors import VENDORS


@pytest.fixture(scope="module")
def source_cases():
    return generate_domain("source", 3, seed=5, size=64)


def test_geometry_from_spacing_recovers_every_preset_fan():
    for preset in VENDORS.values():
        geo = geometry_from_spacing((0.7, 0.8), shifted_spacing((0.7, 0.8), preset.name))
        assert geo["depth_mm"] == pytest.approx(preset.depth_mm)
        assert geo["sector_deg"] == pytest.approx(preset.sector_deg)


def test_image_statistics_see_darker_and_blurrier_images(source_cases):
    image = source_cases[0].image
    base = image_statistics(image)
    assert {k: v.shape for k, v in base.items()} == {"quantiles": (19,), "depth": (16,), "spectrum": (24,),
                                                      "dips": (8,)}
    assert all(np.isfinite(v).all() for v in base.values())
    dark = image_statistics((image * 0.5).astype(np.uint8))
    assert (dark["quantiles"] <= base["quantiles"] + 1e-9).all() and dark["quantiles"][-1] < base["quantiles"][-1]
    blurred, _ = apply_vendor_shift(image, replace(VENDORS["source"], name="soft", post_blur_px=1.5), seed=0)
    soft = image_statistics(blurred)
    # the highest axial and lateral bands lose amplitude, the lowest do not
    assert soft["spectrum"][11] < base["spectrum"][11] - 0.3 and soft["spectrum"][23] < base["spectrum"][23] - 0.3
    with pytest.raises(InputError):
        image_statistics(np.zeros((3, 4, 5), np.uint8))


def test_fit_finds_a_known_scanners_display_levels_and_is_deterministic(source_cases):
    truth = replace(VENDORS["source"], name="truth", gain_db=-5.0, dynamic_range_db=33.0)  # white 5 dB, black -28 dB
    images = [c.image for c in source_cases]
    targets = [apply_vendor_shift(im, truth, seed=10 + i)[0] for i, im in enumerate(images)]
    cfg = ScannerFitConfig(source_images=12, target_images=12, sweeps=3)
    groups = (("white_db", "black_db"),)
    fit = fit_scanner(images, targets, (1.0, 1.0), (1.0, 1.0), cfg, groups=groups)
    white, black = -fit.preset.gain_db, -fit.preset.gain_db - fit.preset.dynamic_range_db
    step_w, step_b = np.diff(SEARCH["white_db"]).max(), np.diff(SEARCH["black_db"]).max()
    assert abs(white - 5.0) <= step_w and abs(black + 28.0) <= step_b
    assert fit.preset.depth_mm == VENDORS["source"].depth_mm and fit.preset.name == "fitted"
    objective = ScannerObjective(images, targets, cfg)
    assert objective(fit.preset) == pytest.approx(fit.score)
    assert fit.score < 0.1 * min(objective(replace(VENDORS["source"], name="fitted")), fit.start_score)
    again = fit_scanner(images, targets, (1.0, 1.0), (1.0, 1.0), cfg, groups=groups)
    assert again.preset == fit.preset and again.score == fit.score
    assert "gain_db=-" in fit.summary()
    with pytest.raises(InputError, match="source and target"):
        fit_scanner([], targets, (1.0, 1.0), (1.0, 1.0), cfg)


def test_scanner_pairs_warp_label_with_image_and_are_seeded(tmp_path_factory):
    """``mode: scanner`` styled pairs: toward a target imaged deeper and wider, image and label are warped to the
    target's fan and carry its larger spacing, so after the model's resampling the heart keeps its physical size;
    the same seed gives the same pairs."""
    from test_evaluate import build_tiny_world

    from rl_adapt.data.case import Case
    from rl_adapt.data.readers import read_dataset
    from rl_adapt.policies.nnunet import load_model_folder
    from rl_adapt.training.styled_source import StyledSourceConfig, styled_source_pairs

    world = build_tiny_world(tmp_path_factory.getbasetemp() / "tiny_nnunet_world")
    model = load_model_folder(world["src"])
    source = read_dataset(world["data"], with_labels=True, progress=False)
    deep = VENDORS["target-shadow"]
    target = [Case(c.name, apply_vendor_shift(c.image, deep.name, seed=i)[0], None,
                   shifted_spacing(c.spacing, deep.name)) for i, c in enumerate(source)]
    cfg = StyledSourceConfig(mode="scanner", styled_fraction=1.0,
                             fit=ScannerFitConfig(source_images=2, target_images=4, sweeps=1))
    pairs = styled_source_pairs(model, source, target, cfg, seed=0)
    plain = styled_source_pairs(model, source, target, StyledSourceConfig(styled_fraction=0.0), seed=0)
    assert pairs.styled.all() and not plain.styled.any()
    heart = (pairs.labels > 0).sum(dim=(1, 2)).double()
    plain_heart = (plain.labels > 0).sum(dim=(1, 2)).double()
    # same physical heart resampled to the model's spacing: about the same area, never the plain patch's labels
    assert not torch.equal(pairs.labels, plain.labels)
    assert (heart / plain_heart).mean().item() == pytest.approx(1.0, abs=0.25)
    again = styled_source_pairs(model, source, target, cfg, seed=0)
    assert torch.equal(again.images, pairs.images) and torch.equal(again.labels, pairs.labels)


def test_pairs_with_nothing_restyled_fit_no_scanner_and_depth_bands_reach_the_restyling(tmp_path_factory):
    """``styled_fraction: 0`` keeps every pair's source look, so ``auto`` fits no scanner and chooses no mode (minutes on
    CAMUS-sized sets) and the record says ``none``; ``histogram_bands`` reaches the restyling of ``degrade`` pairs."""
    from test_evaluate import build_tiny_world

    from rl_adapt.data.case import Case
    from rl_adapt.data.readers import read_dataset
    from rl_adapt.policies.nnunet import load_model_folder
    from rl_adapt.training import styled_source as ss

    world = build_tiny_world(tmp_path_factory.getbasetemp() / "tiny_nnunet_world")
    model = load_model_folder(world["src"])
    source = read_dataset(world["data"], with_labels=True, progress=False)
    hazy = [Case(c.name, np.clip(c.image + 90.0 * np.exp(-np.arange(c.image.shape[0]) / 8.0)[:, None], 0, 255)
                 .astype(np.uint8) * (c.image > 0), None, c.spacing) for c in source]
    fits, choices = len(ss._FITS), len(ss._CHOICES)
    cfg = ss.StyledSourceConfig(mode="auto", styled_fraction=0.0, fit=ScannerFitConfig(source_images=2,
                                                                                        target_images=4, sweeps=1))
    pairs = ss.styled_source_pairs(model, source, hazy, cfg, seed=0)
    assert not pairs.styled.any() and ss.restyling_record(source, hazy, cfg) == {"mode": "none"}
    assert (len(ss._FITS), len(ss._CHOICES)) == (fits, choices)
    one = ss.StyledSourceConfig(mode="degrade", styled_fraction=1.0, style_images=4)
    flat = ss.styled_source_pairs(model, source, hazy, one, seed=0)
    banded = ss.styled_source_pairs(model, source, hazy, replace(one, histogram_bands=3), seed=0)
    assert torch.equal(flat.labels, banded.labels) and not torch.equal(flat.images, banded.images)


def test_auto_mode_restyles_the_way_nearer_the_target_and_gives_that_modes_own_pairs(tmp_path_factory):
    """``mode: auto`` scores the fitted scanner and ``degrade`` by the fit's label-free mismatch: a target seen through
    a B-mode scanner gets the scanner, a target whose grey levels alone were remapped (a look the scanner model cannot
    make) gets ``degrade``; the pairs are the chosen mode's with the same seed, and the choice is told apart by the
    images, not by file names the two targets share."""
    from test_evaluate import build_tiny_world

    from rl_adapt.data.case import Case
    from rl_adapt.data.readers import read_dataset
    from rl_adapt.policies.nnunet import load_model_folder
    from rl_adapt.training.styled_source import StyledSourceConfig, chosen_mode, styled_source_pairs

    world = build_tiny_world(tmp_path_factory.getbasetemp() / "tiny_nnunet_world")
    model = load_model_folder(world["src"])
    source = read_dataset(world["data"], with_labels=True, progress=False)
    bmode = [Case(c.name, apply_vendor_shift(c.image, "target-blur", seed=i)[0], None,
                  shifted_spacing(c.spacing, "target-blur")) for i, c in enumerate(source)]
    remapped = [Case(c.name, (255 * (c.image / 255.0) ** 0.5).astype(np.uint8), None, c.spacing) for c in source]
    cfg = StyledSourceConfig(mode="auto", styled_fraction=1.0, depth=True, angular=True, style_images=8,
                             fit=ScannerFitConfig(source_images=4, target_images=8, sweeps=1))
    to_scanner, to_degrade = chosen_mode(source, bmode, cfg), chosen_mode(source, remapped, cfg)
    assert to_scanner["mode"] == "scanner" and to_scanner["scanner_mismatch"] < 0.5 * to_scanner["degrade_mismatch"]
    assert to_degrade["mode"] == "degrade" and to_degrade["degrade_mismatch"] < 0.5 * to_degrade["scanner_mismatch"]
    for target, mode in ((bmode, "scanner"), (remapped, "degrade")):
        auto = styled_source_pairs(model, source, target, cfg, seed=3)
        own = styled_source_pairs(model, source, target, replace(cfg, mode=mode), seed=3)
        assert torch.equal(auto.images, own.images) and torch.equal(auto.labels, own.labels)


def test_restyled_for_scoring_gives_seeded_uint8_restylings_of_every_image_in_the_asked_mode(source_cases):
    """What ``auto`` scores: AUTO_REPEATS restylings per image, uint8 and inside the image's sector, the same for the
    same config (its fit seed draws everything), and different restylings for ``ratio`` and ``degrade``."""
    from rl_adapt.styling import sector_mask
    from rl_adapt.training.styled_source import AUTO_REPEATS, StyledSourceConfig, restyled_for_scoring

    target = [replace(c, image=apply_vendor_shift(c.image, "target-blur", seed=i)[0], label=None)
              for i, c in enumerate(source_cases)]
    images = [c.image for c in source_cases[:2]]
    cfg = StyledSourceConfig(mode="auto", depth=True, angular=True, style_images=3)
    styled, masks = restyled_for_scoring(images, source_cases, target, cfg, "degrade")
    assert len(styled) == len(masks) == AUTO_REPEATS * len(images)
    for k, (out, mask) in enumerate(zip(styled, masks)):
        source = images[k // AUTO_REPEATS]
        assert out.dtype == np.uint8 and out.shape == source.shape
        assert np.array_equal(mask, sector_mask(source)) and np.array_equal(out[~mask], source[~mask])
    again, _ = restyled_for_scoring(images, source_cases, target, cfg, "degrade")
    assert all(np.array_equal(a, b) for a, b in zip(styled, again))
    assert not np.array_equal(styled[0], styled[1])  # the repeats are new draws, not copies
    ratio, _ = restyled_for_scoring(images, source_cases, target, cfg, "ratio")
    assert not any(np.array_equal(a, b) for a, b in zip(styled, ratio))


def test_refinement_finds_display_levels_between_grid_points(source_cases):
    """``refine``: finer local passes reach a scanner whose levels lie between the grid's points, closer than the grid."""
    truth = replace(VENDORS["source"], name="truth", gain_db=-3.0, dynamic_range_db=32.0)  # white 3 dB, black -29 dB
    images = [c.image for c in source_cases]
    targets = [apply_vendor_shift(im, truth, seed=10 + i)[0] for i, im in enumerate(images)]
    groups = (("white_db", "black_db"),)
    grid = fit_scanner(images, targets, (1.0, 1.0), (1.0, 1.0), ScannerFitConfig(source_images=12, target_images=12),
                       groups=groups)
    fine = fit_scanner(images, targets, (1.0, 1.0), (1.0, 1.0),
                       ScannerFitConfig(source_images=12, target_images=12, refine=2), groups=groups)
    levels = {name: (-f.preset.gain_db, -f.preset.gain_db - f.preset.dynamic_range_db)
              for name, f in (("grid", grid), ("fine", fine))}
    assert levels["grid"][0] in SEARCH["white_db"] and levels["grid"][1] in SEARCH["black_db"]
    assert fine.score < grid.score and fine.evaluations > grid.evaluations
    error = {name: abs(w - 3.0) + abs(b + 29.0) for name, (w, b) in levels.items()}
    assert error["fine"] < error["grid"]
