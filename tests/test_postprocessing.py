"""Postprocessing in nnU-Net's format: the steps, the label-free decision, the files and nnU-Net's own reader."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from rl_adapt.measures.anatomy import check_anatomy
from rl_adapt.cleanup import CleanupConfig, clean_mask
from rl_adapt.errors import InputError
from rl_adapt.postprocessing import (
    Postprocessing,
    anatomical_cleanup,
    decide,
    load_postprocessing,
    postprocessing_files,
    remove_all_but_largest_component_from_segmentation,
)

from phantoms import LA, LV, MYO  # noqa: E402
from phantoms import heart as phantom_heart  # noqa: E402


def hearts(n: int, size: int = 64) -> np.ndarray:
    out, seed = [], 0
    while len(out) < n:
        m = phantom_heart(size, np.random.default_rng(seed))
        seed += 1
        if check_anatomy(m).valid:
            out.append(m)
    return np.stack(out)


def with_strays(masks: np.ndarray, seed: int = 0) -> np.ndarray:
    """Each mask with two stray blobs in the background (a MYO and an LA one): invalid, easy to clean."""
    rng = np.random.default_rng(seed)
    out = masks.copy()
    for m in out:
        for lab in (MYO, LA):
            bg = np.argwhere(m == 0)
            bg = bg[(bg[:, 0] > 2) & (bg[:, 0] < m.shape[0] - 3) & (bg[:, 1] > 2) & (bg[:, 1] < m.shape[1] - 3)]
            r, c = bg[rng.integers(len(bg))]
            if (m[r - 2 : r + 3, c - 2 : c + 3] == 0).all():
                m[r - 1 : r + 1, c - 1 : c + 1] = lab
    return out


def test_largest_component_matches_nnunet_in_2d_and_on_stacks():
    from nnunetv2.postprocessing.remove_connected_components import (
        remove_all_but_largest_component_from_segmentation as nnunet_fn,
    )

    rng = np.random.default_rng(0)
    seg = rng.integers(0, 4, (2, 1, 24, 24)).astype(np.uint8)
    for labels in ([1, 2, 3], 1, 2, 3, [2, 3]):
        for s in (seg[0, 0], seg[0], seg[1]):  # (H, W) and (1, H, W) as nnU-Net's 2D readers give it
            np.testing.assert_array_equal(remove_all_but_largest_component_from_segmentation(s, labels),
                                          nnunet_fn(s, labels))


def test_anatomical_cleanup_is_clean_mask_per_slice():
    m = with_strays(hearts(2))
    np.testing.assert_array_equal(anatomical_cleanup(m[0]), clean_mask(m[0]))
    stack = anatomical_cleanup(m[:, None])                     # (N, 1, H, W)
    assert stack.shape == (2, 1) + m.shape[1:] and stack.dtype == m.dtype
    np.testing.assert_array_equal(stack[1, 0], clean_mask(m[1]))
    np.testing.assert_array_equal(anatomical_cleanup(m[0], rim_px=3), clean_mask(m[0], CleanupConfig(rim_px=3)))


def test_decide_keeps_steps_that_raise_agreement_and_nothing_for_clean_masks():
    clean = hearts(6)
    noisy = with_strays(clean)
    rule, info = decide(noisy, clean)
    assert rule.steps, info
    assert info["postprocessed"]["agreement"] > info["input"]["agreement"]
    assert info["postprocessed"]["validity"] > info["input"]["validity"]
    assert info["postprocessed"]["validity"] == 1.0
    np.testing.assert_array_equal(np.stack([rule(m) for m in noisy]), clean)
    # nothing to gain on masks that already equal their reference: no step is kept
    rule, info = decide(clean, clean)
    assert rule.steps == [] and not any(t["kept"] for t in info["trials"])
    with pytest.raises(ValueError):
        decide(clean, clean[:3])


def with_lv_holes(masks: np.ndarray) -> np.ndarray:
    """Each mask with a 2 x 2 background hole at the LV's centre: invalid (holes_in_lv), the clean-up fills it."""
    out = masks.copy()
    for m in out:
        r, c = np.argwhere(m == LV).mean(axis=0).astype(int)
        m[r : r + 2, c : c + 2] = 0
    return out


def test_decide_validity_rule_keeps_the_cleanup_only_within_the_agreement_tolerance():
    clean = hearts(6)
    holed = with_lv_holes(clean)
    assert not any(check_anatomy(m).valid for m in holed)
    every = np.concatenate([clean[:3], holed[3:]])        # the untrusted half is invalid
    # the trusted images already agree with their references: agreement cannot rise, nnU-Net's rule keeps nothing
    rule, info = decide(clean[:3], clean[:3], ("anatomical_cleanup",), all_masks=every)
    assert rule.steps == [] and info["postprocessed"]["validity_all"] == 0.5
    # the validity rule keeps it: validity on all target images 0.5 -> 1.0 at no agreement cost
    rule, info = decide(clean[:3], clean[:3], ("anatomical_cleanup",), all_masks=every, validity_tolerance=0.01)
    assert [n for n, _ in rule.steps] == ["anatomical_cleanup"]
    assert info["input"]["validity_all"] == 0.5 and info["postprocessed"]["validity_all"] == 1.0
    assert info["trials"][0]["kept_for"].startswith("validity")
    # ... but not when it moves the trusted masks away from their references by more than the tolerance
    rule, info = decide(holed[:3], holed[:3], ("anatomical_cleanup",), all_masks=holed, validity_tolerance=1e-4)
    assert rule.steps == [] and info["trials"][0]["worst_label_agreement_fall"] > 1e-4
    assert info["trials"][0]["validity_all_after"] == 1.0
    with pytest.raises(ValueError):
        decide(clean, clean, validity_tolerance=-0.1)
    with pytest.raises(ValueError):
        decide(clean, clean, all_masks=clean[:, :10])


def test_files_are_nnunet_readable_and_json_is_the_rule(tmp_path):
    from nnunetv2.postprocessing.remove_connected_components import apply_postprocessing

    rule = Postprocessing([("remove_all_but_largest_component_from_segmentation", {"labels_or_regions": [1, 2, 3]}),
                           ("anatomical_cleanup", {})])
    files = postprocessing_files(rule, {"n_images": 3})
    (tmp_path / "postprocessing.json").write_text(json.dumps(files["postprocessing.json"]))
    (tmp_path / "postprocessing.pkl").write_bytes(files["postprocessing.pkl"])
    loaded = load_postprocessing(tmp_path)
    assert loaded is not None and loaded.key() == rule.key()
    assert load_postprocessing(tmp_path / "postprocessing.json").key() == rule.key()
    # nnU-Net users name the pickle: its JSON twin is read, never the pickle; without a twin one clear refusal
    assert load_postprocessing(tmp_path / "postprocessing.pkl").key() == rule.key()
    (tmp_path / "postprocessing.json").unlink()
    with pytest.raises(InputError, match="postprocessing.pkl.*pickled postprocessing rule is not loaded"):
        load_postprocessing(tmp_path / "postprocessing.pkl")
    (tmp_path / "postprocessing.json").write_text(json.dumps(files["postprocessing.json"]))
    # what nnUNetv2_apply_postprocessing does with the pickle: fns applied in order to seg[0] of a (1, 1, H, W) read
    fns, kwargs = pickle.loads(files["postprocessing.pkl"])
    seg = with_strays(hearts(1))[None]                         # (1, 1, H, W)
    np.testing.assert_array_equal(apply_postprocessing(seg[0], fns, kwargs), rule(seg[0]))
    assert check_anatomy(rule(seg[0, 0])).valid


def test_load_rejects_unknown_functions_and_missing_rules(tmp_path):
    assert load_postprocessing(tmp_path) is None
    (tmp_path / "postprocessing.json").write_text(json.dumps({"postprocessing_fns": ["os.system"],
                                                               "postprocessing_kwargs": [{}]}))
    with pytest.raises(InputError, match="unknown postprocessing function"):
        load_postprocessing(tmp_path)
    (tmp_path / "postprocessing.json").write_text(json.dumps({"something": 1}))
    with pytest.raises(InputError, match="postprocessing_fns"):
        load_postprocessing(tmp_path)
    # nnU-Net's own location after nnUNetv2_find_best_configuration
    (tmp_path / "postprocessing.json").unlink()
    (tmp_path / "crossval_results_folds_0").mkdir()
    (tmp_path / "crossval_results_folds_0" / "postprocessing.json").write_text(json.dumps(
        {"postprocessing_fns": ["remove_all_but_largest_component_from_segmentation"],
         "postprocessing_kwargs": [{"labels_or_regions": [1, 2, 3]}]}))
    assert load_postprocessing(tmp_path).steps[0][1] == {"labels_or_regions": [1, 2, 3]}
    assert Postprocessing().describe() == "none" and LV == 1
