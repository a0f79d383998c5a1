"""nnU-Net v2 results folders in and out: the ONLY module of the project that imports ``nnunetv2``.

* :func:`load_model_folder` builds the network of a results folder
  (``DatasetXXX_Name/<Trainer>__<Plans>__2d/{plans.json, dataset.json, fold_N/checkpoint_final.pth}``)
  with nnU-Net's own ``PlansManager`` + ``get_network_from_plans`` (never the trainer-class lookup, which
  imports every trainer module and, through timm/torchvision, can crash on CPU installs) and loads the
  ``network_weights`` of one fold or an ensemble of folds.
* :class:`NnUNetModel` preprocesses single 2D images exactly as nnU-Net (the plan's preprocessor class:
  transpose, crop to non-zero, normalisation, resampling to the plan spacing), predicts with nnU-Net's
  sliding window (:mod:`rl_adapt.policies.inference`) and maps logits/masks back to the input geometry.
* :func:`export_model_folder` writes a NEW results folder that ``nnUNetPredictor`` loads with the
  default trainer name; the source folder is never written.
* :func:`plan_dataset` runs nnU-Net's fingerprint extraction and ``ExperimentPlanner`` on a raw dataset;
  :func:`shrink_plan` derives a small CPU plan (same plans.json schema).

nnU-Net checkpoints are Python pickles (``torch.load(weights_only=False)``): loading one can run code, so
only load checkpoints you trust; this module loads only paths the user names.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from nnunetv2.postprocessing.remove_connected_components import remove_all_but_largest_component_from_segmentation
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from rl_adapt.errors import InputError
from rl_adapt.harmonize import FILE_NAME as HARMONIZATION_FILE
from rl_adapt.harmonize import Harmonizer
from rl_adapt.io_utils import atomic_dir
from rl_adapt.policies.inference import centre_pad_crop, sliding_window_logits, undo_centre_pad_crop
import shutil
from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from tqdm import tqdm

log = logging.getLogger(__name__)

CAMUS_LABELS: dict[str, int] = {"background": 0, "LV": 1, "MYO": 2, "LA": 3}
"""The label set of CAMUS and of the synthetic domains (dataset.json ``labels``)."""

DEFAULT_TRAINER = "nnUNetTrainer"
OUTSIDE_LOGIT = -30.0
"""Logit given to foreground classes outside the cropped/predicted region (background gets 0 there)."""

_pickle_note_done = False


def _note_pickle(path: Path) -> None:
    global _pickle_note_done
    if not _pickle_note_done:
        log.info("loading %s with torch.load(weights_only=False): nnU-Net checkpoints are pickles, "
                 "load only checkpoints you trust", path)
        _pickle_note_done = True


def _strip_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove ``_orig_mod.`` (torch.compile) and ``module.`` (DDP) prefixes from parameter names."""
    out = {}
    for k, v in state_dict.items():
        for prefix in ("_orig_mod.", "module."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def _check_2d(configuration: ConfigurationManager, folder: Path | None, name: str) -> None:
    if len(configuration.patch_size) != 2:
        raise InputError(folder, f"configuration '{name}' is {len(configuration.patch_size)}D "
                                 f"(patch {list(configuration.patch_size)}); only 2D nnU-Net configurations are supported")
    if configuration.previous_stage_name is not None:
        raise InputError(folder, f"configuration '{name}' is a cascade stage; only plain 2D configurations are supported")


def _check_labels(dataset_json: dict, expected_labels: Mapping[str, int] | None, folder: Path | None) -> None:
    labels = dataset_json.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise InputError(folder, "dataset.json has no 'labels' mapping")
    if any(not isinstance(v, int) or isinstance(v, bool) for v in labels.values()):
        raise InputError(folder, f"region-based or non-integer labels are not supported: {labels}")
    if "ignore" in labels:
        raise InputError(folder, "an 'ignore' label is not supported")
    values = sorted(labels.values())
    if values != list(range(len(values))):
        raise InputError(folder, f"labels must be 0..K-1, got {labels}")
    if expected_labels is not None and dict(labels) != dict(expected_labels):
        raise InputError(folder, f"label set {labels} differs from the expected {dict(expected_labels)}")


def build_network(plans_manager: PlansManager, configuration: ConfigurationManager, dataset_json: dict,
                  deep_supervision: bool = False) -> torch.nn.Module:
    """The plan's network (random init, nnU-Net's initialiser), built as nnU-Net's trainer does.

    :returns: module mapping ``(B, C, P0, P1)`` float32 to logits ``(B, K, P0, P1)`` (a list, highest
        resolution first, when ``deep_supervision``).
    """
    num_in = determine_num_input_channels(plans_manager, configuration, dataset_json)
    num_out = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    return get_network_from_plans(configuration.network_arch_class_name, configuration.network_arch_init_kwargs,
                                  configuration.network_arch_init_kwargs_req_import, num_in, num_out,
                                  allow_init=True, deep_supervision=deep_supervision)


@dataclass
class NnUNetModel:
    """A 2D nnU-Net v2 model (one fold or an ensemble) with nnU-Net's preprocessing and inference.

    Build it with :func:`load_model_folder` (a trained results folder) or :meth:`from_plans` (fresh weights).
    """

    plans: dict
    """plans.json content."""
    dataset_json: dict
    """dataset.json content."""
    configuration: str
    """Configuration name inside the plans (``"2d"``)."""
    networks: list[torch.nn.Module]
    """One network per fold (deep supervision off), on :attr:`device`, in eval mode."""
    folder: Path | None = None
    """The results folder it was loaded from (``None`` when built from plans)."""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    """Device of the networks."""
    mirror_axes: tuple[int, ...] | None = None
    """Axes nnU-Net allows for test-time mirroring (from the checkpoint); used only when asked."""
    trainer_name: str = DEFAULT_TRAINER
    """Trainer recorded in the checkpoint (informational; never looked up)."""
    folds: tuple = (0,)
    """Folds loaded."""
    tile_step: float = 0.5
    """Sliding-window tile step (fraction of the patch), nnU-Net's default."""
    accumulate_dtype: torch.dtype = torch.float16
    """Dtype of sliding-window sums. nnUNetPredictor accumulates in float16; doing the same (default) gives
    identical logits and label maps. ``torch.float32`` is more precise (differs from nnU-Net by its fp16
    rounding, ~1e-2 on logits of magnitude ~10)."""
    tile_batch: int = 1
    """Tiles per forward call."""
    harmonizer: Harmonizer | None = None
    """Input harmonization stored with an adapted model (``harmonization.npz``, :mod:`rl_adapt.harmonize`): applied
    to every image before nnU-Net's preprocessing. ``None``: images go in as they are."""
    def __post_init__(self) -> None:
        self.plans_manager = PlansManager(self.plans)
        self.configuration_manager = self.plans_manager.get_configuration(self.configuration)
        _check_2d(self.configuration_manager, self.folder, self.configuration)
        if list(self.plans_manager.transpose_forward)[0] != 0:
            raise InputError(self.folder, f"transpose_forward {self.plans_manager.transpose_forward} moves the "
                                          "slice axis; not supported for 2D images")
        self.label_manager = self.plans_manager.get_label_manager(self.dataset_json)
        self._preprocessor = self.configuration_manager.preprocessor_class(verbose=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_plans(cls, plans: dict, dataset_json: dict, configuration: str = "2d", device: str | torch.device = "cpu",
                   seed: int | None = None, mirror_axes: tuple[int, ...] | None = None) -> "NnUNetModel":
        """A model with freshly initialised weights for ``plans`` (used to pretrain)."""
        _check_labels(dataset_json, None, None)
        pm = PlansManager(plans)
        if configuration not in pm.available_configurations:
            raise InputError(None, f"plans have no configuration '{configuration}' (have {pm.available_configurations})")
        cm = pm.get_configuration(configuration)
        _check_2d(cm, None, configuration)
        if seed is not None:
            torch.manual_seed(seed)
        net = build_network(pm, cm, dataset_json).to(device).eval()
        return cls(plans=plans, dataset_json=dataset_json, configuration=configuration, networks=[net],
                   device=torch.device(device), mirror_axes=mirror_axes)

    # ------------------------------------------------------------------ properties
    @property
    def network(self) -> torch.nn.Module:
        """The first fold's network: ``(B, C, P0, P1)`` float32 -> logits ``(B, K, P0, P1)``."""
        return self.networks[0]

    @property
    def num_classes(self) -> int:
        """Number of output channels K (background included)."""
        return int(self.label_manager.num_segmentation_heads)

    @property
    def num_input_channels(self) -> int:
        """Input channels C of the network."""
        return int(determine_num_input_channels(self.plans_manager, self.configuration_manager, self.dataset_json))

    @property
    def patch_size(self) -> tuple[int, int]:
        """Plan patch size ``(P0, P1)`` in pixels (rows, cols)."""
        return tuple(int(p) for p in self.configuration_manager.patch_size)

    @property
    def spacing(self) -> tuple[float, float]:
        """Plan target spacing ``(row, col)`` in mm."""
        return tuple(float(s) for s in self.configuration_manager.spacing)

    @property
    def labels(self) -> dict[str, int]:
        """dataset.json label names to values."""
        return dict(self.dataset_json["labels"])

    @property
    def plans_name(self) -> str:
        return self.plans_manager.plans_name

    @property
    def dataset_name(self) -> str:
        return self.plans_manager.dataset_name

    def state_dict(self, fold_index: int = 0) -> dict[str, torch.Tensor]:
        """Weights of one network (CPU copies)."""
        return {k: v.detach().cpu().clone() for k, v in _strip_prefixes(self.networks[fold_index].state_dict()).items()}

    # ------------------------------------------------------------------ preprocessing
    def preprocess(self, image: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, dict]:
        """nnU-Net preprocessing of one 2D image.

        :param image: ``(H, W)`` (any real dtype), rows first.
        :param spacing: ``(row, col)`` pixel size in mm.
        :returns: ``data`` ``(C, h, w)`` float32 at the plan spacing (z-scored for non-CT channels) and the
            properties nnU-Net needs to map back (``spacing``, ``bbox_used_for_cropping``, shapes).
        """
        img = self._checked_image(image, spacing)
        r, c = float(spacing[0]), float(spacing[1])
        # the same spacing nnU-Net's SimpleITK reader assigns to a 2D image: a huge dummy slice spacing first
        props: dict[str, Any] = {"spacing": [max(r, c) * 999, r, c]}
        data = img.astype(np.float32)[None, None]
        data, _, props = self._preprocessor.run_case_npy(data, None, props, self.plans_manager,
                                                         self.configuration_manager, self.dataset_json)
        return np.ascontiguousarray(data[:, 0], dtype=np.float32), props

    def _checked_image(self, image: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
        """``image`` as an array after the checks preprocessing needs (2D, finite, one channel, valid spacing), through
        the model's :attr:`harmonizer` when it has one."""
        img = np.asarray(image)
        if img.ndim != 2:
            raise InputError(None, f"expected a 2D image (H, W), got shape {img.shape}")
        if self.num_input_channels != 1:
            raise InputError(self.folder, f"model expects {self.num_input_channels} input channels; only 1 is supported")
        if len(spacing) != 2 or not all(np.isfinite(s) and s > 0 for s in spacing):
            raise InputError(None, f"spacing must be two positive numbers (row, col) in mm, got {spacing}")
        if not np.all(np.isfinite(img)):
            raise InputError(None, "image contains NaN or Inf")
        return img if self.harmonizer is None else self.harmonizer.apply(img)

    def preprocess_pair(self, image: np.ndarray, label: np.ndarray, spacing: Sequence[float]
                        ) -> tuple[np.ndarray, np.ndarray, dict]:
        """nnU-Net preprocessing of an image and its label map (training data).

        :returns: ``data`` ``(C, h, w)`` float32, ``seg`` ``(h, w)`` int16 (label values; ``-1`` marks pixels
            outside the image's non-zero region, as nnU-Net), props.
        """
        img = self._checked_image(image, spacing)
        lab = np.asarray(label)
        if lab.shape != img.shape:
            raise InputError(None, f"label shape {lab.shape} differs from image shape {img.shape}")
        bad = sorted(set(np.unique(lab).tolist()) - set(self.labels.values()))
        if bad:
            raise InputError(None, f"label values {bad} not in dataset.json labels {self.labels}")
        r, c = float(spacing[0]), float(spacing[1])
        props: dict[str, Any] = {"spacing": [max(r, c) * 999, r, c]}
        data, seg, props = self._preprocessor.run_case_npy(
            img.astype(np.float32)[None, None], lab.astype(np.int16)[None, None], props, self.plans_manager,
            self.configuration_manager, self.dataset_json)
        props.pop("class_locations", None)
        return (np.ascontiguousarray(data[:, 0], dtype=np.float32), np.ascontiguousarray(seg[0, 0], dtype=np.int16),
                props)

    # ------------------------------------------------------------------ back to input geometry
    def _resample_back(self, arr: np.ndarray | torch.Tensor, props: dict, is_seg: bool) -> np.ndarray:
        """``(K, h, w)`` logits or ``(h, w)`` labels at plan spacing -> cropped input geometry."""
        pm, cm = self.plans_manager, self.configuration_manager
        spacing_t = [props["spacing"][i] for i in pm.transpose_forward]
        current = [spacing_t[0], *cm.spacing]
        target_shape = props["shape_after_cropping_and_before_resampling"]
        if is_seg:
            seg = np.asarray(arr)[None, None]
            out = cm.resampling_fn_seg(seg, target_shape, current, spacing_t)
            return np.asarray(out)[0, 0]
        t = arr[:, None] if isinstance(arr, torch.Tensor) else torch.from_numpy(np.asarray(arr))[:, None]
        out = cm.resampling_fn_probabilities(t, target_shape, current, spacing_t)
        out = out.numpy() if isinstance(out, torch.Tensor) else np.asarray(out)
        return out[:, 0]

    def _uncrop(self, arr: np.ndarray, props: dict, fill: float | Sequence[float]) -> np.ndarray:
        """Insert cropped ``(..., h', w')`` into the shape before cropping and undo the transpose."""
        pm = self.plans_manager
        shape = props["shape_before_cropping"]  # (1, H', W') transposed
        bbox = props["bbox_used_for_cropping"]
        lead = arr.shape[:-2]
        out = np.empty((*lead, *shape[1:]), dtype=arr.dtype)
        if np.ndim(fill) == 0:
            out[...] = fill
        else:
            for k, v in enumerate(fill):
                out[k] = v
        out[(..., slice(bbox[1][0], bbox[1][1]), slice(bbox[2][0], bbox[2][1]))] = arr
        back = [t - 1 for t in pm.transpose_backward[1:]]  # spatial part of the transpose
        return np.ascontiguousarray(out.transpose(*range(len(lead)), *[len(lead) + b for b in back]))

    def _logit_fill(self) -> list[float]:
        return [0.0] + [OUTSIDE_LOGIT] * (self.num_classes - 1)

    def logits_to_original(self, logits: np.ndarray | torch.Tensor, props: dict) -> np.ndarray:
        """Logits ``(K, h, w)`` at plan spacing -> ``(K, H, W)`` float32 in the input geometry.

        Outside the non-zero crop the logits are background 0, foreground :data:`OUTSIDE_LOGIT`.
        """
        res = self._resample_back(logits, props, is_seg=False)
        return self._uncrop(res.astype(np.float32), props, self._logit_fill())

    def logits_to_mask(self, logits: np.ndarray | torch.Tensor, props: dict) -> np.ndarray:
        """Logits ``(K, h, w)`` at plan spacing -> label map ``(H, W)`` uint8, exactly as nnU-Net's export."""
        res = self._resample_back(logits, props, is_seg=False)
        seg = np.argmax(res, axis=0).astype(np.uint8)
        return self._uncrop(seg, props, 0)

    # ------------------------------------------------------------------ prediction
    def preprocessed_logits(self, data: np.ndarray | torch.Tensor, mirror: bool = False) -> torch.Tensor:
        """Sliding-window logits ``(K, h, w)`` (CPU tensor) for preprocessed ``data`` ``(C, h, w)``."""
        return sliding_window_logits(self.networks, data, self.patch_size, step=self.tile_step,
                                     mirror_axes=self.mirror_axes if mirror else None, device=self.device,
                                     accumulate_dtype=self.accumulate_dtype, tile_batch=self.tile_batch)

    def predict_logits(self, image: np.ndarray, spacing: Sequence[float], mirror: bool = False) -> np.ndarray:
        """Logits ``(K, H, W)`` float32 in the input geometry (sliding window, fold ensemble averaged).

        :param mirror: test-time mirroring over :attr:`mirror_axes` (off by default: echo is not symmetric).
        """
        data, props = self.preprocess(image, spacing)
        return self.logits_to_original(self.preprocessed_logits(data, mirror), props)

    def predict(self, image: np.ndarray, spacing: Sequence[float], mirror: bool = False) -> np.ndarray:
        """Label map ``(H, W)`` uint8 in the input geometry."""
        data, props = self.preprocess(image, spacing)
        return self.logits_to_mask(self.preprocessed_logits(data, mirror), props)

    def predict_cases(self, cases: Iterable[Any], progress: bool = True, mirror: bool = False) -> list[np.ndarray]:
        """Label maps ``(H, W)`` uint8 for objects with ``.image`` ``(H, W)`` and ``.spacing`` ``(row, col)``."""

        cases = list(cases)
        return [self.predict(c.image, c.spacing, mirror=mirror)
                for c in tqdm(cases, desc="predict", unit="img", disable=None if progress else True)]

    # ------------------------------------------------------------------ fixed-size patches (RL, training)
    def to_patch(self, image: np.ndarray, spacing: Sequence[float]) -> tuple[torch.Tensor, dict]:
        """Preprocess, then centre pad (zeros) / crop to exactly the patch size.

        :returns: ``(C, P0, P1)`` float32 tensor and props (nnU-Net's, plus ``preprocessed_shape`` and
            ``patch_offsets``) for :meth:`from_patch`.
        """
        data, props = self.preprocess(image, spacing)
        patch, offsets = centre_pad_crop(data, self.patch_size, 0.0)
        props = dict(props, preprocessed_shape=tuple(data.shape[-2:]), patch_offsets=offsets)
        return torch.from_numpy(np.ascontiguousarray(patch)), props

    def label_to_patch(self, image: np.ndarray, label: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
        """A label map ``(H, W)`` in the geometry :meth:`to_patch` gives its image: ``(P0, P1)`` uint8 (labels 0..K-1;
        pixels outside the image's non-zero region and padding are background)."""
        _, seg, _ = self.preprocess_pair(image, label, spacing)
        patch, _ = centre_pad_crop(np.maximum(seg, 0)[None], self.patch_size, 0)
        return np.asarray(patch)[0].astype(np.uint8)

    def from_patch(self, patch: np.ndarray | torch.Tensor, props: dict) -> np.ndarray:
        """Inverse of :meth:`to_patch` for a label map or logits.

        :param patch: ``(P0, P1)`` integer labels or ``(K, P0, P1)`` float logits.
        :returns: ``(H, W)`` uint8 labels (nearest-label resampling as nnU-Net's seg resampling), or
            ``(K, H, W)`` float32 logits; regions outside the patch/crop are background.
        """
        arr = patch.detach().cpu().numpy() if isinstance(patch, torch.Tensor) else np.asarray(patch)
        shape, offsets = props["preprocessed_shape"], props["patch_offsets"]
        if arr.ndim == 2:
            full = undo_centre_pad_crop(arr.astype(np.int16), shape, offsets, 0)
            seg = self._resample_back(full, props, is_seg=True)
            return self._uncrop(seg.astype(np.uint8), props, 0)
        if arr.ndim == 3:
            full = undo_centre_pad_crop(arr.astype(np.float32), shape, offsets, self._logit_fill())
            return self.logits_to_original(full, props)
        raise ValueError(f"expected (P0, P1) labels or (K, P0, P1) logits, got shape {arr.shape}")


# ---------------------------------------------------------------------- loading
def _fold_dirname(fold: int | str) -> str:
    return f"fold_{fold}"


def resolve_model_folder(path: str | Path) -> Path:
    """The model folder for ``path``: ``path`` itself when it holds plans.json, else the single
    ``<Dataset>/<Trainer>__<Plans>__<config>/`` below it (an nnUNet_results-style root, as ``rl-adapt pretrain``
    writes). :raises InputError: none or several model folders."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(path, "model folder not found")
    if (path / "plans.json").is_file():
        return path
    found = sorted({p.parent for pattern in ("*/plans.json", "*/*/plans.json") for p in path.glob(pattern)})
    if len(found) == 1:
        return found[0]
    if not found:
        raise InputError(path, "not an nnU-Net results folder: no plans.json here or in <Dataset>/<Trainer>__<Plans>__2d/ below")
    raise InputError(path, "several model folders below; name one: " + ", ".join(str(f.relative_to(path)) for f in found))


def load_model_folder(folder: str | Path, folds: Sequence[int | str] = (0,), device: str | torch.device = "cpu",
                      checkpoint: str = "checkpoint_final.pth",
                      expected_labels: Mapping[str, int] | None = None) -> NnUNetModel:
    """Load a 2D nnU-Net v2 results folder (one fold or an ensemble).

    :param folder: ``<...>/DatasetXXX_Name/<Trainer>__<Plans>__<config>/`` with plans.json, dataset.json and
        ``fold_N/<checkpoint>``.
    :param folds: folds to load (``"all"`` allowed); several = ensemble averaged at prediction.
    :param expected_labels: if given, dataset.json ``labels`` must equal it (e.g. :data:`CAMUS_LABELS`).
    :returns: the model; with the folder's ``harmonization.npz`` as its :attr:`NnUNetModel.harmonizer` when it has one.
    :raises InputError: not a results folder, missing fold/checkpoint, a 3D/cascade configuration, a
        checkpoint that does not fit the plan, an unexpected label set, or an unreadable harmonization map.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "model folder not found")
    missing = [n for n in ("plans.json", "dataset.json") if not (folder / n).is_file()]
    if missing:
        raise InputError(folder, f"not an nnU-Net results folder: missing {', '.join(missing)} (expected "
                                 "<Dataset>/<Trainer>__<Plans>__2d/ with plans.json, dataset.json, fold_N/)")
    try:
        plans = json.loads((folder / "plans.json").read_text())
        dataset_json = json.loads((folder / "dataset.json").read_text())
    except (OSError, ValueError) as exc:
        raise InputError(folder, f"cannot read plans.json/dataset.json: {exc}") from exc
    _check_labels(dataset_json, expected_labels, folder)
    available = sorted(p.name for p in folder.glob("fold_*") if p.is_dir())
    if not folds:
        raise InputError(folder, "no folds requested")
    ckpts = []
    for f in folds:
        fdir = folder / _fold_dirname(f)
        if not fdir.is_dir():
            raise InputError(folder, f"fold {f} not found (available: {', '.join(available) or 'none'})")
        path = fdir / checkpoint
        if not path.is_file():
            present = sorted(p.name for p in fdir.glob("*.pth"))
            raise InputError(path, f"checkpoint missing (present in {fdir.name}: {', '.join(present) or 'none'})")
        _note_pickle(path)
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file
            raise InputError(path, f"not a readable torch checkpoint: {exc}") from exc
        if not isinstance(ckpt, dict) or "network_weights" not in ckpt:
            raise InputError(path, "not an nnU-Net checkpoint (no 'network_weights')")
        ckpts.append((path, ckpt))
    first = ckpts[0][1]
    name_parts = folder.name.split("__")
    configuration = (first.get("init_args") or {}).get("configuration") or (name_parts[-1] if len(name_parts) == 3 else "2d")
    pm = PlansManager(plans)
    if configuration not in pm.available_configurations:
        raise InputError(folder, f"configuration '{configuration}' not in plans.json ({pm.available_configurations})")
    cm = pm.get_configuration(configuration)
    _check_2d(cm, folder, configuration)
    networks = []
    for path, ckpt in ckpts:
        net = build_network(pm, cm, dataset_json)
        sd = _strip_prefixes(ckpt["network_weights"])
        _load_checked(net, sd, path)
        networks.append(net.to(device).eval())
    mirror = first.get("inference_allowed_mirroring_axes")
    harmonizer = None
    if (folder / HARMONIZATION_FILE).is_file():
        harmonizer = Harmonizer.load(folder / HARMONIZATION_FILE)
        log.info("%s: images are harmonized toward the source's look before the network (%s)", folder,
                 HARMONIZATION_FILE)
    return NnUNetModel(plans=plans, dataset_json=dataset_json, configuration=configuration, networks=networks,
                       folder=folder, device=torch.device(device),
                       mirror_axes=None if mirror is None else tuple(int(a) for a in mirror),
                       trainer_name=str(first.get("trainer_name", DEFAULT_TRAINER)), folds=tuple(folds),
                       harmonizer=harmonizer)


def _load_checked(net: torch.nn.Module, sd: Mapping[str, torch.Tensor], path: Path | None) -> None:
    """load_state_dict with a readable error naming the first mismatching parameters."""
    own = net.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k}: checkpoint {tuple(sd[k].shape)} vs plan {tuple(v.shape)}"
             for k, v in own.items() if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append(f"{len(wrong)} shape mismatch(es), e.g. {wrong[0]}")
        if missing:
            parts.append(f"{len(missing)} parameter(s) missing, e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected parameter(s), e.g. {unexpected[0]}")
        raise InputError(path, "checkpoint does not fit the network of plans.json (a different plan?): " + "; ".join(parts))
    net.load_state_dict(sd, strict=True)


# ---------------------------------------------------------------------- export
def export_model_folder(network_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor], source: NnUNetModel,
                        out_folder: str | Path, fold: int = 0, extra_meta: dict | None = None,
                        mirror_axes: tuple[int, ...] | None | str = "source", overwrite: bool = False,
                        checkpoint: str = "checkpoint_final.pth",
                        extra_files: Mapping[str, Any] | None = None) -> Path:
    """Write a NEW nnU-Net results folder ``out_folder/<DatasetName>/nnUNetTrainer__<Plans>__<config>/``.

    Layout: plans.json, dataset.json (copies of the source's), dataset_fingerprint.json when the source has one,
    ``fold_<fold>/<checkpoint>`` holding a slim checkpoint (``network_weights``, ``init_args``,
    ``trainer_name="nnUNetTrainer"``, ``inference_allowed_mirroring_axes``, ``current_epoch``, ``rl_adapt`` meta;
    no optimizer state) that ``nnUNetPredictor.initialize_from_trained_model_folder`` loads.

    :param network_or_state_dict: a network of the source's plan, or its state dict (checked to fit).
    :param mirror_axes: ``"source"`` keeps the source's mirroring axes; a tuple or ``None`` overrides.
    :param overwrite: replace an existing ``fold_<fold>`` of the target folder.
    :param extra_files: more files written atomically with the fold, keyed by path relative to the model
        folder: ``dict``/``list`` -> JSON, ``str`` -> text, ``bytes``, or a ``Path`` (file or folder, copied).
    :returns: the model folder path.
    :raises InputError: the target is the source folder (or inside it) or the weights do not fit the plan.
    """
    sd = network_or_state_dict.state_dict() if isinstance(network_or_state_dict, torch.nn.Module) \
        else dict(network_or_state_dict)
    sd = {k: v.detach().cpu().clone().contiguous() for k, v in _strip_prefixes(sd).items()}
    _load_checked(build_network(source.plans_manager, source.configuration_manager, source.dataset_json), sd, None)
    out_folder = Path(out_folder)
    model_dir = out_folder / source.dataset_name / f"{DEFAULT_TRAINER}__{source.plans_name}__{source.configuration}"
    if source.folder is not None:
        src = source.folder.resolve()
        dst = model_dir.resolve()
        if dst == src or src in dst.parents or dst in src.parents:
            raise InputError(model_dir, f"export target overlaps the source model folder {src}; choose another --out")
    axes = source.mirror_axes if mirror_axes == "source" else mirror_axes
    ckpt = {
        "network_weights": sd,
        "init_args": {"plans": source.plans, "configuration": source.configuration, "fold": fold,
                      "dataset_json": source.dataset_json, "device": torch.device("cpu")},
        "trainer_name": DEFAULT_TRAINER,
        "inference_allowed_mirroring_axes": None if axes is None else tuple(int(a) for a in axes),
        "current_epoch": int((extra_meta or {}).get("epochs", 0)),
        "rl_adapt": dict(extra_meta or {}),
    }

    fold_name = _fold_dirname(fold)
    extras = dict(extra_files or {})
    for rel in extras:
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise ValueError(f"extra file {rel!r} must be a relative path inside the model folder")

    def write_extras(root: Path, only_fold: bool) -> None:
        for rel, content in extras.items():
            parts = Path(rel).parts
            if only_fold:
                if parts[0] != fold_name:
                    continue
                target = root.joinpath(*parts[1:])
            else:
                target = root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, (dict, list)):
                _write_json(target, content)
            elif isinstance(content, str):
                target.write_text(content, encoding="utf-8")
            elif isinstance(content, bytes):
                target.write_bytes(content)
            elif isinstance(content, Path) and content.is_dir():
                shutil.copytree(content, target)
            elif isinstance(content, Path):
                shutil.copyfile(content, target)
            else:
                raise TypeError(f"extra file {rel!r}: unsupported content {type(content).__name__}")

    def write_fold(fold_dir: Path) -> None:
        torch.save(ckpt, fold_dir / checkpoint)

    if not model_dir.exists():
        with atomic_dir(model_dir) as tmp:
            _write_json(tmp / "plans.json", source.plans)
            _write_json(tmp / "dataset.json", source.dataset_json)
            if source.folder is not None and (source.folder / "dataset_fingerprint.json").is_file():
                (tmp / "dataset_fingerprint.json").write_bytes((source.folder / "dataset_fingerprint.json").read_bytes())
            (tmp / fold_name).mkdir()
            write_fold(tmp / fold_name)
            write_extras(tmp, only_fold=False)
    else:
        existing = json.loads((model_dir / "plans.json").read_text()) if (model_dir / "plans.json").is_file() else None
        if existing != json.loads(json.dumps(source.plans)):
            raise InputError(model_dir, "exists with different plans.json; choose another output folder")
        fold_dir = model_dir / _fold_dirname(fold)
        with atomic_dir(fold_dir, overwrite=overwrite) as tmp:
            write_fold(tmp)
            write_extras(tmp, only_fold=True)
    log.info("exported fold %s to %s", fold, model_dir)
    return model_dir


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=4, sort_keys=False) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------- planning
@contextlib.contextmanager
def _nnunet_env(root: Path):
    """Point nnU-Net's three folders at ``root`` for the duration (restored afterwards)."""
    names = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
    old = {n: os.environ.get(n) for n in names}
    for n in names:
        (root / n).mkdir(parents=True, exist_ok=True)
        os.environ[n] = str(root / n)
    try:
        yield root / "nnUNet_raw", root / "nnUNet_preprocessed"
    finally:
        for n, v in old.items():
            if v is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = v


_DATASET_RE = re.compile(r"^Dataset(\d{3})_([A-Za-z0-9_\-]+)$")


def check_raw_dataset(raw_dir: str | Path, expected_labels: Mapping[str, int] | None = None) -> dict:
    """Validate an nnU-Net raw dataset folder (dataset.json, imagesTr, labelsTr); returns dataset.json."""
    raw_dir = Path(raw_dir)
    if not (raw_dir / "dataset.json").is_file():
        raise InputError(raw_dir, "not an nnU-Net raw dataset (no dataset.json)")
    for sub in ("imagesTr", "labelsTr"):
        if not (raw_dir / sub).is_dir():
            raise InputError(raw_dir, f"not an nnU-Net raw dataset (no {sub}/)")
    try:
        dj = json.loads((raw_dir / "dataset.json").read_text())
    except ValueError as exc:
        raise InputError(raw_dir / "dataset.json", f"not valid JSON: {exc}") from exc
    for key in ("channel_names", "labels", "file_ending"):
        if key not in dj and not (key == "channel_names" and "modality" in dj):
            raise InputError(raw_dir / "dataset.json", f"missing '{key}'")
    _check_labels(dj, expected_labels, raw_dir)
    return dj


def _fingerprint_in_process(fpe: Any, out_file: Path) -> None:
    """nnU-Net's fingerprint (``DatasetFingerprintExtractor.analyze_case`` per case, same statistics as its
    ``run``) computed in this process: no spawn pool, so it works from any script or notebook."""

    keys = list(fpe.dataset.keys())
    if not keys:
        raise InputError(fpe.input_folder, "no training cases found in imagesTr/labelsTr")
    rw = determine_reader_writer_from_dataset_json(fpe.dataset_json, fpe.dataset[keys[0]]["images"][0])
    per_case = int(fpe.num_foreground_voxels_for_intensitystats // len(keys))
    results = [fpe.analyze_case(fpe.dataset[k]["images"], fpe.dataset[k]["label"], rw, per_case) for k in keys]
    n_channels = len(fpe.dataset_json.get("channel_names", fpe.dataset_json.get("modality", {})))
    stats = {}
    for i in range(n_channels):
        v = np.concatenate([r[2][i] for r in results])
        lo, med, hi = np.percentile(v, (0.5, 50.0, 99.5))
        stats[i] = {"mean": float(np.mean(v)), "median": float(med), "std": float(np.std(v)), "min": float(np.min(v)),
                    "max": float(np.max(v)), "percentile_99_5": float(hi), "percentile_00_5": float(lo)}
    fingerprint = {
        "spacings": [[float(x) for x in r[1]] for r in results],
        "shapes_after_crop": [[int(x) for x in r[0]] for r in results],
        "foreground_intensity_properties_per_channel": stats,
        "median_relative_size_after_cropping": float(np.median([r[4] for r in results], 0)),
    }
    out_file.parent.mkdir(parents=True, exist_ok=True)
    _write_json(out_file, fingerprint)


def plan_dataset(raw_dataset_dir: str | Path, num_processes: int = 1) -> tuple[dict, dict, dict]:
    """Run nnU-Net's fingerprint extraction and default ``ExperimentPlanner`` on a raw dataset, 2D only.

    No environment variables are needed: nnU-Net's folders point to a temporary directory for the call.

    :returns: ``(plans, dataset_json, fingerprint)`` as nnU-Net writes them (plans with only ``"2d"``).
    """

    raw_dir = Path(raw_dataset_dir).resolve()
    dataset_json = check_raw_dataset(raw_dir)
    name = raw_dir.name if _DATASET_RE.match(raw_dir.name) else "Dataset999_" + re.sub(r"[^A-Za-z0-9]", "", raw_dir.name or "data")
    with tempfile.TemporaryDirectory(prefix="rl_adapt_nnunet_") as tmp, _nnunet_env(Path(tmp)) as (raw_root, pre_root):
        (raw_root / name).symlink_to(raw_dir, target_is_directory=True)
        buf = io.StringIO()
        try:
            with contextlib.redirect_stdout(buf):
                fpe = DatasetFingerprintExtractor(name, num_processes=max(1, num_processes), verbose=False)
                fpe.show_progress_bar = False
                if num_processes > 1:
                    fpe.run()  # nnU-Net's spawn pool: needs an `if __name__ == "__main__"` guard in scripts
                else:
                    _fingerprint_in_process(fpe, pre_root / name / "dataset_fingerprint.json")
                planner = ExperimentPlanner(name)
                plans = planner.plan_experiment()
        except InputError:
            raise
        except Exception as exc:  # nnU-Net raises bare RuntimeErrors/AssertionErrors on bad datasets
            raise InputError(raw_dir, f"nnU-Net planning failed: {type(exc).__name__}: {exc}") from exc
        finally:
            log.debug("nnU-Net planner output:\n%s", buf.getvalue())
        plans = json.loads((pre_root / name / "nnUNetPlans.json").read_text())
        fingerprint = json.loads((pre_root / name / "dataset_fingerprint.json").read_text())
    if "2d" not in plans["configurations"]:
        raise InputError(raw_dir, "nnU-Net produced no 2d configuration")
    plans["configurations"] = {"2d": plans["configurations"]["2d"]}
    return plans, dataset_json, fingerprint


def shrink_plan(plans: dict, features: Sequence[int], patch_size: Sequence[int], batch_size: int,
                n_conv_per_stage: int = 2, n_conv_per_stage_decoder: int = 2, fit_median_to_patch: bool = True,
                plans_name: str = "nnUNetPlansSmall") -> dict:
    """A copy of nnU-Net 2D ``plans`` with a smaller PlainConvUNet (same plans.json schema).

    :param features: features per stage; its length is the number of stages (stride 2 after the first).
    :param patch_size: ``(P0, P1)``, divisible by ``2 ** (n_stages - 1)``.
    :param fit_median_to_patch: scale the target spacing so the median image (after cropping) is about one
        patch (``max(median / patch)`` in each axis); otherwise keep nnU-Net's target spacing.
    """
    plans = copy.deepcopy(plans)
    cfg = plans["configurations"]["2d"]
    n = len(features)
    div = 2 ** (n - 1)
    if any(int(p) % div for p in patch_size):
        raise InputError(None, f"patch size {list(patch_size)} must be divisible by 2**(stages-1) = {div}")
    if fit_median_to_patch:
        median = np.asarray(cfg["median_image_size_in_voxels"], dtype=float)
        factor = float(np.max(median / np.asarray(patch_size, dtype=float)))
        cfg["spacing"] = [float(s * factor) for s in cfg["spacing"]]
        cfg["median_image_size_in_voxels"] = [float(m / factor) for m in median]
    arch = cfg["architecture"]["arch_kwargs"]
    arch.update({
        "n_stages": n,
        "features_per_stage": [int(f) for f in features],
        "kernel_sizes": [[3, 3]] * n,
        "strides": [[1, 1]] + [[2, 2]] * (n - 1),
        "n_conv_per_stage": [int(n_conv_per_stage)] * n,
        "n_conv_per_stage_decoder": [int(n_conv_per_stage_decoder)] * (n - 1),
    })
    cfg["patch_size"] = [int(p) for p in patch_size]
    cfg["batch_size"] = int(batch_size)
    cfg["data_identifier"] = f"{plans_name}_2d"
    plans["plans_name"] = plans_name
    return plans


# ---------------------------------------------------------------------- planner-free plans
def plain_unet_plans(features: Sequence[int], patch_size: Sequence[int], spacing: float = 1.0, batch_size: int = 12,
                     n_conv_per_stage: int = 2, ndim: int = 2, dataset_name: str = "Dataset999_Synthetic") -> dict:
    """A plans.json dict in nnU-Net v2's schema (ExperimentPlanner's output) for a PlainConvUNet, without running the
    planner: for benchmarks and tests that need a model folder but no dataset.

    :param features: features per stage (its length = number of stages).
    :param patch_size: patch (rows, cols) (3 values when ``ndim`` is 3), divisible by 2**(stages-1).
    :param spacing: isotropic target spacing (mm).
    :param ndim: 2 or 3 (a 3D "2d" configuration is only useful to test that it is refused).
    """
    n, conv = len(features), ("Conv2d" if ndim == 2 else "Conv3d")
    norm = "InstanceNorm2d" if ndim == 2 else "InstanceNorm3d"
    cfg = {
        "data_identifier": "nnUNetPlans_2d", "preprocessor_name": "DefaultPreprocessor", "batch_size": batch_size,
        "patch_size": list(patch_size), "median_image_size_in_voxels": [float(p) for p in patch_size],
        "spacing": [float(spacing)] * ndim, "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
        "architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                         "arch_kwargs": {"n_stages": n, "features_per_stage": list(features),
                                         "conv_op": f"torch.nn.modules.conv.{conv}",
                                         "kernel_sizes": [[3] * ndim] * n, "strides": [[1] * ndim] + [[2] * ndim] * (n - 1),
                                         "n_conv_per_stage": [n_conv_per_stage] * n,
                                         "n_conv_per_stage_decoder": [n_conv_per_stage] * (n - 1), "conv_bias": True,
                                         "norm_op": f"torch.nn.modules.instancenorm.{norm}",
                                         "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None,
                                         "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                                         "nonlin_kwargs": {"inplace": True}},
                         "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
        "batch_dice": True,
    }
    return {"dataset_name": dataset_name, "plans_name": "nnUNetPlans",
            "original_median_spacing_after_transp": [999.0, float(spacing), float(spacing)],
            "original_median_shape_after_transp": [1, *patch_size[-2:]], "image_reader_writer": "SimpleITKIO",
            "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2], "configurations": {"2d": cfg},
            "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
            "foreground_intensity_properties_per_channel": {"0": {"max": 255.0, "mean": 100.0, "median": 100.0,
                                                                  "min": 0.0, "percentile_00_5": 0.0,
                                                                  "percentile_99_5": 255.0, "std": 50.0}}}


# ---------------------------------------------------------------------- postprocessing (nnU-Net's pickle)
def nnunet_postprocessing_functions(names: Sequence[str], ours: Mapping[str, Any]) -> list:
    """The callables a ``postprocessing.pkl`` stores for the step names of :mod:`rl_adapt.postprocessing`:
    nnU-Net's own ``remove_all_but_largest_component_from_segmentation`` for that step (so that
    ``nnUNetv2_apply_postprocessing`` runs it without rl_adapt), and ``ours[name]`` for the project's own steps
    (the anatomy-guided clean-up; passed in by the caller so that this module does not import it back)."""
    table = {"remove_all_but_largest_component_from_segmentation": remove_all_but_largest_component_from_segmentation,
             **ours}
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"no nnU-Net postprocessing function for {unknown}")
    return [table[n] for n in names]
