"""Label-free postprocessing stored with a model, in nnU-Net v2's format.

nnU-Net v2 decides a postprocessing on its cross-validation predictions (``determine_postprocessing``: keep the
largest foreground component, then the largest component per label, each step kept only if it raises Dice) and
stores it next to the model as ``postprocessing.pkl`` (a pickled ``(functions, kwargs)`` pair that
``nnUNetv2_apply_postprocessing -pp_pkl_file`` applies, function after function, to every predicted segmentation)
and ``postprocessing.json`` (the same as names and kwargs, plus the figures behind the decision).

The adaptation (:mod:`rl_adapt.engine.loop`) has no target labels, so it decides with the same greedy procedure but
against the anatomically valid corrected masks of its last iteration (:func:`decide`), and it may also try one step
nnU-Net does not have: the corrector's anatomy-guided clean-up (:func:`anatomical_cleanup`), kept when it raises
agreement, or (``validity_tolerance``) when it raises the validity of the outputs on the whole target set at a
bounded agreement cost. It writes both files
into the adapted model folder. ``rl-adapt predict`` and ``rl-adapt evaluate`` read the JSON (never the pickle: only
allow-listed functions of :data:`FUNCTIONS` run) and apply the steps in order to the final label map in the input
geometry, as nnU-Net does; ``evaluate`` applies one rule to every model it compares and reports the raw outputs
beside the postprocessed ones.
"""
from __future__ import annotations

import json
import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from scipy import ndimage as ndi

from rl_adapt.cleanup import CleanupConfig, clean_mask
from rl_adapt.errors import InputError
from rl_adapt.labels import STRUCTURES
from rl_adapt.measures.anatomy import is_valid
from rl_adapt.measures.metrics import dice_per_label
from rl_adapt.policies.nnunet import nnunet_postprocessing_functions

log = logging.getLogger(__name__)

JSON_NAME = "postprocessing.json"
PKL_NAME = "postprocessing.pkl"
FOREGROUND = list(STRUCTURES)
"""CAMUS foreground labels (LV, MYO, LA)."""


def _per_slice(segmentation: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    seg = np.asarray(segmentation)
    if seg.ndim == 2:
        return fn(seg)
    out = np.empty_like(seg)
    for idx in np.ndindex(*seg.shape[:-2]):
        out[idx] = fn(seg[idx])
    return out


def remove_all_but_largest_component_from_segmentation(segmentation: np.ndarray,
                                                       labels_or_regions: int | Sequence[int],
                                                       background_label: int = 0) -> np.ndarray:
    """nnU-Net v2's step of the same name: the pixels of ``labels_or_regions`` (one label or a list, taken together)
    outside their largest connected component (full connectivity: 8 in 2D) become ``background_label``.

    Works on (H, W) label maps and on stacks (..., H, W) slice by slice; returns a new array.
    """
    labels = [labels_or_regions] if np.isscalar(labels_or_regions) else list(labels_or_regions)

    def one(seg: np.ndarray) -> np.ndarray:
        mask = np.isin(seg, labels)
        comps, n = ndi.label(mask, structure=np.ones((3, 3), bool))
        out = seg.copy()
        if n > 1:
            sizes = np.bincount(comps.ravel())[1:]
            out[mask & (comps != int(np.argmax(sizes)) + 1)] = background_label
        return out

    return _per_slice(segmentation, one)


def anatomical_cleanup(segmentation: np.ndarray, **cleanup: Any) -> np.ndarray:
    """The deterministic clean-up (:func:`rl_adapt.cleanup.clean_mask`) as a postprocessing step.

    :param cleanup: :class:`rl_adapt.cleanup.CleanupConfig` fields (defaults for the others).
    Works on (H, W) label maps and on stacks (..., H, W) slice by slice; returns a new array of the input dtype.
    """
    cfg = CleanupConfig(**cleanup)
    seg = np.asarray(segmentation)
    return _per_slice(seg, lambda s: clean_mask(s, cfg).astype(seg.dtype))


FUNCTIONS: dict[str, Callable[..., np.ndarray]] = {
    "remove_all_but_largest_component_from_segmentation": remove_all_but_largest_component_from_segmentation,
    "anatomical_cleanup": anatomical_cleanup,
}
"""The functions a ``postprocessing.json`` may name (nnU-Net's own step and ours)."""


@dataclass
class Postprocessing:
    """An ordered list of postprocessing steps, each a function name of :data:`FUNCTIONS` and its kwargs."""

    steps: list[tuple[str, dict]] = field(default_factory=list)
    source: str | None = None
    """Where the rule was read from (informational)."""

    def __post_init__(self) -> None:
        for name, _ in self.steps:
            if name not in FUNCTIONS:
                raise InputError(self.source, f"unknown postprocessing function {name!r} (known: {sorted(FUNCTIONS)})")

    def __call__(self, segmentation: np.ndarray) -> np.ndarray:
        """Apply every step in order (a new array; the input is not modified)."""
        seg = np.asarray(segmentation)
        for name, kwargs in self.steps:
            seg = FUNCTIONS[name](seg, **kwargs)
        return seg

    def key(self) -> str:
        """Canonical JSON text of the steps (two rules are the same rule when their keys are equal)."""
        return json.dumps([[n, kw] for n, kw in self.steps], sort_keys=True)

    def describe(self) -> str:
        """Short human-readable form, e.g. ``anatomical_cleanup()`` or ``none``."""
        if not self.steps:
            return "none"
        return " -> ".join(f"{n}({', '.join(f'{k}={v}' for k, v in kw.items())})" for n, kw in self.steps)

    def to_json(self) -> dict:
        """``{"postprocessing_fns": [...], "postprocessing_kwargs": [...]}`` as in nnU-Net's postprocessing.json."""
        return {"postprocessing_fns": [n for n, _ in self.steps], "postprocessing_kwargs": [kw for _, kw in self.steps]}


def _from_json_dict(data: Mapping, source: str) -> Postprocessing:
    try:
        names = list(data["postprocessing_fns"])
        kwargs = list(data.get("postprocessing_kwargs") or [{}] * len(names))
    except (KeyError, TypeError) as exc:
        raise InputError(source, f"not a postprocessing.json (needs postprocessing_fns): {exc}") from exc
    if len(kwargs) != len(names) or not all(isinstance(k, dict) for k in kwargs):
        raise InputError(source, "postprocessing_kwargs must be one dict per function")
    return Postprocessing(steps=[(str(n), dict(k)) for n, k in zip(names, kwargs)], source=source)


def find_postprocessing_file(model_dir: str | Path) -> Path | None:
    """``<model>/postprocessing.json``, else the single ``<model>/crossval_results_folds_*/postprocessing.json``
    (where ``nnUNetv2_find_best_configuration`` puts it); None when there is none."""
    model_dir = Path(model_dir)
    if (model_dir / JSON_NAME).is_file():
        return model_dir / JSON_NAME
    found = sorted(model_dir.glob(f"crossval_results_folds_*/{JSON_NAME}"))
    if len(found) > 1:
        raise InputError(model_dir, "several crossval_results_folds_*/postprocessing.json; name one explicitly")
    return found[0] if found else None


def load_postprocessing(path: str | Path) -> Postprocessing | None:
    """The rule in a ``postprocessing.json``, or in a model folder (None when the folder has none).

    Only the JSON is read: the functions it names must be in :data:`FUNCTIONS` (the pickle is never loaded).
    """
    path = Path(path)
    if path.is_dir():
        found = find_postprocessing_file(path)
        if found is None:
            return None
        path = found
    if path.suffix == ".pkl":  # nnU-Net writes the pickle and the JSON side by side; only the JSON is read
        twin = path.with_suffix(".json")
        if not twin.is_file():
            raise InputError(path, "a pickled postprocessing rule is not loaded (unpickling can run code): give the "
                                   f"{JSON_NAME} that nnU-Net writes beside it, or the model folder")
        log.info("postprocessing: reading %s (the JSON twin of %s)", twin, path.name)
        path = twin
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(path, f"cannot read postprocessing rule: {exc}") from exc
    return _from_json_dict(data, str(path))


def postprocessing_files(rule: Postprocessing, decision: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``{"postprocessing.json": dict, "postprocessing.pkl": bytes}`` for a model folder (see the module doc).

    The pickle holds ``(functions, kwargs)`` as nnU-Net's ``determine_postprocessing`` saves it: nnU-Net's own
    function for the largest-component steps, :func:`anatomical_cleanup` (needs rl_adapt installed) for ours.
    """
    fns = nnunet_postprocessing_functions([n for n, _ in rule.steps], ours={"anatomical_cleanup": anatomical_cleanup})
    data = {**rule.to_json(), **dict(decision or {})}
    return {JSON_NAME: data, PKL_NAME: pickle.dumps((fns, [dict(kw) for _, kw in rule.steps]))}


# ------------------------------------------------------------------------------------------- decision
CANDIDATES: tuple[str, ...] = ("largest_foreground", "largest_per_label", "anatomical_cleanup")
"""Steps :func:`decide` tries, in this order: nnU-Net's two, then the corrector's clean-up."""


def _candidate_steps(name: str, cleanup: Mapping[str, Any] | None) -> list[list[tuple[str, dict]]]:
    """Each candidate as a list of single steps tried one after the other (per label: one step per label)."""
    lcc = "remove_all_but_largest_component_from_segmentation"
    if name == "largest_foreground":
        return [[(lcc, {"labels_or_regions": list(FOREGROUND)})]]
    if name == "largest_per_label":
        return [[(lcc, {"labels_or_regions": lab})] for lab in FOREGROUND]
    if name == "anatomical_cleanup":
        return [[("anatomical_cleanup", dict(cleanup or {}))]]
    raise ValueError(f"unknown postprocessing candidate {name!r} (known: {list(CANDIDATES)})")


def _agreement(masks: np.ndarray, reference: np.ndarray) -> tuple[float, list[float]]:
    """Mean over images of the per-label Dice (LV, MYO, LA) -> (mean of the three, [LV, MYO, LA])."""
    per = np.array([dice_per_label(m, r, FOREGROUND) for m, r in zip(masks, reference)], float)
    means = np.nanmean(per, axis=0) if len(per) else np.full(len(FOREGROUND), np.nan)
    return float(np.nanmean(means)), [float(x) for x in means]


def decide(masks: np.ndarray, reference: np.ndarray, candidates: Sequence[str] = CANDIDATES,
           cleanup: Mapping[str, Any] | None = None, all_masks: np.ndarray | None = None,
           validity_tolerance: float = 0.0) -> tuple[Postprocessing, dict]:
    """nnU-Net's greedy ``determine_postprocessing``, label-free: ``reference`` replaces the ground truth.

    Each candidate step is applied on top of the steps kept so far and kept when the mean agreement (Dice over LV,
    MYO, LA, averaged over images) with ``reference`` rises and no label's agreement falls (nnU-Net: "if a single
    class got worse we won't do this"; for one label's step only that label's Dice is compared, as nnU-Net does).

    The ``anatomical_cleanup`` step exists to make outputs anatomically valid, which the agreement with valid
    references barely sees (the references cover the images whose correction is valid, and the clean-up moves a
    few boundary pixels). With ``validity_tolerance > 0`` it is also kept when it raises the validity of the
    model's outputs on every target image (``all_masks``) while no label's agreement falls by more than
    ``validity_tolerance`` (Dice).

    :param masks: (N, H, W) the model's label maps on the (unlabelled) target images with a trusted reference.
    :param reference: (N, H, W) trusted reference masks (the anatomically valid corrections), same images.
    :param cleanup: kwargs of the ``anatomical_cleanup`` step (CleanupConfig fields).
    :param all_masks: (M, H, W) the model's label maps on all target images, for the validity rule (default:
        ``masks``).
    :param validity_tolerance: largest fall of any label's agreement (Dice, 0-1) accepted for a validity gain;
        0 keeps nnU-Net's rule only.
    :returns: the rule and the JSON-ready figures behind it (agreement and validity before/after, per step).
    """
    masks = np.asarray(masks)
    reference = np.asarray(reference)
    if masks.shape != reference.shape or masks.ndim != 3:
        raise ValueError(f"masks {masks.shape} and reference {reference.shape} must both be (N, H, W)")
    if validity_tolerance < 0:
        raise ValueError(f"validity_tolerance must be >= 0, got {validity_tolerance}")
    every = masks if all_masks is None else np.asarray(all_masks)
    if every.ndim != 3 or every.shape[1:] != masks.shape[1:]:
        raise ValueError(f"all_masks {every.shape} must be (M, H, W) with the H, W of masks {masks.shape}")

    def validity(stack: np.ndarray) -> float:
        return float(np.mean([is_valid(m) for m in stack])) if len(stack) else float("nan")

    def applied(rule: Postprocessing, stack: np.ndarray) -> np.ndarray:
        return np.stack([rule(m) for m in stack]) if len(stack) else stack

    current, cur_every = masks, every
    cur_mean, cur_per = _agreement(current, reference)
    cur_valid = validity(cur_every)
    start = {"agreement": cur_mean, "agreement_per_label": cur_per, "validity": validity(current),
             "validity_all": cur_valid, "n_images_all": int(len(every))}
    kept: list[tuple[str, dict]] = []
    trials = []
    for cand in candidates:
        for steps in _candidate_steps(cand, cleanup):
            rule = Postprocessing(steps)
            trial = applied(rule, current)
            new_mean, new_per = _agreement(trial, reference)
            lab = steps[0][1].get("labels_or_regions")
            if isinstance(lab, int):  # one label's step: nnU-Net compares that label only
                i = FOREGROUND.index(lab)
                keep = new_per[i] > cur_per[i]
            else:
                keep = new_mean > cur_mean and all(n >= c for n, c in zip(new_per, cur_per))
            record = {"step": rule.describe(), "agreement_before": cur_mean, "agreement_after": new_mean,
                      "validity_all_before": cur_valid}
            trial_every = None
            if cand == "anatomical_cleanup" and validity_tolerance > 0:
                trial_every = applied(rule, cur_every)
                new_valid = validity(trial_every)
                worst_fall = max(c - n for n, c in zip(new_per, cur_per))
                record.update(validity_all_after=new_valid, worst_label_agreement_fall=worst_fall)
                if not keep and new_valid > cur_valid and worst_fall <= validity_tolerance:
                    keep = True
                    record["kept_for"] = f"validity, agreement within {validity_tolerance}"
            record["kept"] = bool(keep)
            trials.append(record)
            if keep:
                kept.extend(steps)
                if trial_every is None:
                    trial_every = applied(rule, cur_every)
                current, cur_every, cur_mean, cur_per = trial, trial_every, new_mean, new_per
                cur_valid = validity(cur_every)
    end = {"agreement": cur_mean, "agreement_per_label": cur_per, "validity": validity(current),
           "validity_all": cur_valid, "n_images_all": int(len(every))}
    info = {"decided_on": "target images with an anatomically valid correction (no labels); validity on all "
                          "target images",
            "n_images": int(len(masks)), "validity_tolerance": float(validity_tolerance),
            "input": start, "postprocessed": end, "trials": trials}
    return Postprocessing(kept), info
