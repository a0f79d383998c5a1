"""Labelled source images restyled toward the target scanner: supervision that needs no target label.

The target's look is estimated from the unlabelled target images (:func:`rl_adapt.styling.estimate_style`: mean
amplitude spectrum and in-sector histograms); each chosen source image is restyled toward it and keeps its own,
true label map. The pairs are brought to the policy's patch geometry (nnU-Net preprocessing, centre pad/crop), as
the target images are. Used by the ``styled-source`` baseline (supervised fine-tuning) and by the adaptation loop
(supervision in the PPO update, and what the reward network learns where masks are wrong).
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import astuple, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from rl_adapt.config import bounded
from rl_adapt.data.case import Case
from rl_adapt.errors import InputError
from rl_adapt.io_utils import save_npz
from rl_adapt.policies.inference import centre_pad_crop
from rl_adapt.scanner_fit import ScannerFit, ScannerFitConfig, ScannerObjective, fit_scanner
from rl_adapt.styling import MODES, estimate_style, restyle, sector_mask
from rl_adapt.synth.domains import apply_vendor_shift, shifted_spacing

PAIR_MODES = MODES + ("scanner", "auto")
"""``ratio`` and ``degrade`` (:data:`rl_adapt.styling.MODES`) change grey levels and texture only; ``scanner`` sends
the source image (and its label) through a B-mode scanner model fitted to the target images
(:func:`rl_adapt.scanner_fit.fit_scanner`): speckle, noise, gain and blur in the echo envelope, geometry from the
target's pixel spacing; ``auto`` takes ``scanner`` or ``degrade``, whichever brings source images closer to the target
images' statistics (:func:`chosen_mode`, label-free)."""

AUTO_REPEATS = 4
"""Restylings of each of the fit's source images when ``auto`` scores ``degrade`` (their mean statistics are
compared, so more repeats mean less noise)."""

log = logging.getLogger(__name__)


@dataclass
class StyledSourceConfig:
    """Which source images are restyled, and how."""

    images: int = bounded(0, ge=0)
    """Source images used (a seeded subset; 0: all)."""
    styled_fraction: float = bounded(0.5, ge=0.0, le=1.0)
    """Fraction of the pairs whose image is restyled toward the target (the others keep the source look, so the
    model does not forget it)."""
    style_images: int = bounded(200, ge=2)
    """Source and target images (each, seeded subsets) the target style is estimated from."""
    spectrum_strength: float = bounded(1.0, ge=0.0, le=1.0)
    """How far the amplitude spectrum moves toward the target's (0: histogram only)."""
    histogram: bool = True
    """Match each restyled image's in-sector histogram to a random target image's."""
    histogram_bands: int = bounded(1, ge=1, le=32)
    """Depth bands of that match (``ratio`` and ``degrade``): with 2 or more each band of the restyled image takes
    the drawn target image's grey levels in the same band, blended between band centres
    (:func:`rl_adapt.styling.match_quantiles_by_depth`), so a grey map that changes with depth (near-field haze, a
    depth-dependent gain) is imitated where it acts; 1 matches the whole sector at once."""
    mode: str = bounded("ratio", choices=PAIR_MODES)
    """How the look moves toward the target's (:data:`PAIR_MODES`): ``ratio`` (the source's own spectrum
    re-weighted), ``degrade`` (low-pass plus independent noise estimated from the spectra), ``scanner`` (a fitted
    scanner model; ``spectrum_strength``, ``histogram``, ``depth``, ``angular`` and ``beam`` do not apply) or ``auto``
    (``scanner`` or ``degrade``, whichever matches the target's image statistics better: a scanner unlike the model
    is not forced through it)."""
    depth: bool = False
    """Also give the restyled images the target's mean intensity profile over depth (attenuation, gain)."""
    angular: bool = False
    """Also give each restyled image one target image's dips over the beam angle (shadows, dropouts)."""
    beam: bool = False
    """Do the spectral step in beam space (:class:`rl_adapt.styling.BeamGrid`: depth x beam angle), where a scanner's
    blur and speckle grain are the same all over the fan."""
    fit: ScannerFitConfig = field(default_factory=ScannerFitConfig)
    """How the scanner model is fitted (``mode: scanner`` and ``auto``; ``auto`` scores ``degrade`` on the fit's
    source images and target statistics)."""


@dataclass
class StyledPairs:
    """Source patches (some restyled toward the target) with their true label maps, in the policy's geometry."""

    images: torch.Tensor
    """(M, 1, P0, P1) float32 preprocessed patches."""
    labels: torch.Tensor
    """(M, P0, P1) int64 label maps (0..3)."""
    styled: np.ndarray
    """(M,) bool: the image was restyled."""
    names: list[str]
    """(M,) source case names."""
    held_out: np.ndarray | None = None
    """(M,) bool: kept out of training (e.g. to judge the adaptation), when a split was made."""

    def __len__(self) -> int:
        return len(self.names)

    def split(self, fraction: float, seed: int) -> "StyledPairs":
        """A copy with a seeded ``held_out`` mask of ``round(fraction * M)`` pairs (by source patient when the
        names are CAMUS-like, so one patient's views stay on one side)."""
        patients = [n.split("_")[0] for n in self.names]
        keys = sorted(set(patients))
        rng = np.random.default_rng(seed)
        n_out = int(round(fraction * len(keys)))
        out_keys = set(np.asarray(keys)[rng.permutation(len(keys))[:n_out]].tolist()) if n_out else set()
        held = np.array([p in out_keys for p in patients], bool)
        return StyledPairs(self.images, self.labels, self.styled, self.names, held)

    def subset(self, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, labels) of the pairs where ``mask`` (M,) is true."""
        idx = torch.as_tensor(np.flatnonzero(mask))
        return self.images[idx], self.labels[idx]

    def picture(self, target: torch.Tensor | np.ndarray, path: Path, n: int = 6) -> Path:
        """A PNG to look at the restyling: ``n`` source patches as the source scanner shows them (top row), ``n``
        restyled toward the target (middle row) and ``n`` target patches (bottom row), each as the policy sees it
        (preprocessed, stretched between its 1st and 99th percentiles), evenly spread over the sets.

        :param target: (N, 1, P0, P1) or (N, P0, P1) preprocessed target patches.
        :returns: ``path`` (written atomically).
        """
        from PIL import Image

        from rl_adapt.evaluation.overlays import image_to_uint8
        from rl_adapt.io_utils import atomic_path

        def row(stack, idx) -> np.ndarray:  # only the chosen patches leave the device
            tiles = [image_to_uint8(torch.as_tensor(stack[int(i)]).detach().float().cpu().numpy()
                                    .reshape(stack.shape[-2:])) for i in idx]
            blank = np.zeros(tuple(stack.shape[-2:]), np.uint8)
            return np.concatenate(tiles + [blank] * (n - len(tiles)), axis=1)

        def spread(k: int) -> np.ndarray:
            return np.unique(np.linspace(0, k - 1, min(n, k)).round().astype(int)) if k else np.zeros(0, int)

        plain, styled = np.flatnonzero(~self.styled), np.flatnonzero(self.styled)
        sep = np.full((2, n * self.images.shape[-1]), 255, np.uint8)
        grid = np.concatenate([row(self.images, plain[spread(len(plain))]), sep,
                               row(self.images, styled[spread(len(styled))]), sep,
                               row(target, spread(len(target)))], axis=0)
        with atomic_path(path) as tmp:
            Image.fromarray(grid).save(tmp, format="PNG")
        return Path(path)

    def save(self, path: Path) -> None:
        """Write the pairs to one compressed ``.npz`` atomically."""
        held = np.zeros(len(self), bool) if self.held_out is None else self.held_out
        save_npz(path, images=self.images.numpy(), labels=self.labels.numpy().astype(np.uint8), styled=self.styled,
                 names=np.asarray(self.names), held_out=held)

    @classmethod
    def load(cls, path: Path) -> "StyledPairs":
        """Read pairs written by :meth:`save`."""
        with np.load(path) as d:
            return cls(images=torch.from_numpy(d["images"]), labels=torch.from_numpy(d["labels"].astype(np.int64)),
                       styled=d["styled"], names=d["names"].tolist(), held_out=d["held_out"])


_FITS: dict[tuple, ScannerFit] = {}
"""Fitted scanners of this process, by (source images, target images, fit config): the restyling draws of one
adaptation share one fit (it does not depend on the draw's seed)."""


def _cache_key(source: Sequence[Case], target: Sequence[Case], *configs) -> tuple:
    """Key of a fit or choice: a digest of both sets' names, pixels and spacings (files of the same name at two sites
    are told apart), and the configs' values."""
    digest = hashlib.blake2b(digest_size=16)
    for cases in (source, target):
        digest.update(str(len(cases)).encode())
        for c in cases:
            image = np.ascontiguousarray(c.image)
            digest.update(f"{c.name}|{image.shape}|{image.dtype}|{tuple(np.asarray(c.spacing, float))}".encode())
            digest.update(image.tobytes())
    return (digest.hexdigest(), *(astuple(c) for c in configs))


def fitted_scanner(source: Sequence[Case], target: Sequence[Case], cfg: ScannerFitConfig,
                   progress: bool = False) -> ScannerFit:
    """The target scanner fitted to the unlabelled ``target`` images (:func:`rl_adapt.scanner_fit.fit_scanner`),
    from the median pixel spacings of both sets; computed once per process for the same inputs."""
    key = _cache_key(source, target, cfg)
    if key not in _FITS:
        _FITS[key] = fit_scanner([c.image for c in source], [c.image for c in target],
                                 np.median([c.spacing for c in source], axis=0),
                                 np.median([c.spacing for c in target], axis=0), cfg,
                                 source_labels=[c.label for c in source], progress=progress)
    return _FITS[key]


_CHOICES: dict[tuple, dict] = {}
"""``auto`` mode choices of this process, keyed like :data:`_FITS` (with the whole styled-source config)."""


def chosen_mode(source: Sequence[Case], target: Sequence[Case], cfg: StyledSourceConfig) -> dict:
    """For ``mode: auto``: ``scanner`` or ``degrade``, whichever brings source images closer to the target's look.

    Both are scored by the scanner fit's mismatch (:class:`rl_adapt.scanner_fit.ScannerObjective`: grey-level
    quantiles, depth profile, spectra and angular dips against the spread over the target images) on the fit's own
    source images: the fitted scanner's score is the fit's; ``degrade`` (with this config's ``depth``, ``angular``,
    ``histogram``, ``spectrum_strength`` and ``beam``) restyles each of them :data:`AUTO_REPEATS` times with a style
    estimated from ``style_images`` images of each set, all seeded by ``cfg.fit.seed``. No label is read. Computed
    once per process for the same inputs; it does not depend on a draw's seed.

    :returns: ``{"mode": "scanner" | "degrade", "scanner_mismatch": float, "degrade_mismatch": float}``.
    """
    key = _cache_key(source, target, cfg)
    if key not in _CHOICES:
        fit = fitted_scanner(source, target, cfg.fit)
        objective = ScannerObjective([c.image for c in source], [c.image for c in target], cfg.fit,
                                     [c.label for c in source])
        degrade = objective.score_images(*restyled_for_scoring(objective.source, source, target, cfg, "degrade"))
        mode = "scanner" if fit.score <= degrade else "degrade"
        _CHOICES[key] = {"mode": mode, "scanner_mismatch": float(fit.score), "degrade_mismatch": float(degrade)}
        log.info("restyling mode auto: mismatch with the target's statistics, fitted scanner %.3f, degrade %.3f; "
                 "restyling with %s", fit.score, degrade, mode)
    return _CHOICES[key]


def restyled_for_scoring(images: Sequence[np.ndarray], source: Sequence[Case], target: Sequence[Case],
                         cfg: StyledSourceConfig, mode: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """What :func:`chosen_mode` scores for a texture restyling: ``images`` ((H, W) uint8 source images) restyled
    :data:`AUTO_REPEATS` times each in ``mode`` (``ratio`` or ``degrade``, with ``cfg``'s other restyling keys), as
    (H, W) uint8 images, with their (H, W) bool sector masks. The style is estimated from ``cfg.style_images`` images
    of ``source`` and of ``target``; everything is drawn from one generator seeded by ``cfg.fit.seed``."""
    rng = np.random.default_rng(cfg.fit.seed)
    style = estimate_style([source[i].image for i in _subset(len(source), cfg.style_images, rng)],
                           [target[i].image for i in _subset(len(target), cfg.style_images, rng)], beam=cfg.beam,
                           histogram_bands=cfg.histogram_bands)
    styled, masks = [], []
    for image in images:
        for _ in range(AUTO_REPEATS):
            out = restyle(image, style, rng, cfg.spectrum_strength, cfg.histogram, mode=mode,
                          depth=cfg.depth, angular=cfg.angular, beam=cfg.beam, histogram_bands=cfg.histogram_bands)
            styled.append(np.clip(np.rint(out), 0, 255).astype(np.uint8))
            masks.append(sector_mask(image))
    return styled, masks


def restyling_record(source: Sequence[Case], target: Sequence[Case], cfg: StyledSourceConfig) -> dict:
    """What a run records of its restyling: ``{"mode"}`` as restyled, with ``"scanner"`` (the fit,
    :meth:`ScannerFit.to_dict`) whenever a scanner was fitted (``mode: scanner``, and ``auto`` whichever mode it
    chose) and ``"mode_choice"`` (:func:`chosen_mode`) for ``auto``. Both are cached, so this only reads them back
    after :func:`styled_source_pairs`; :func:`remember_restyling` puts them back in a later process."""
    source = [c for c in source if c.label is not None]  # as styled_source_pairs keeps them: the same cache keys
    if not restyles(cfg):
        return {"mode": NO_RESTYLING}
    record: dict = {"mode": cfg.mode}
    if cfg.mode == "auto":
        record["mode_choice"] = chosen_mode(source, target, cfg)
        record["mode"] = record["mode_choice"]["mode"]
    if cfg.mode in ("scanner", "auto"):
        record["scanner"] = fitted_scanner(source, target, cfg.fit).to_dict()
    return record


def remember_restyling(source: Sequence[Case], target: Sequence[Case], cfg: StyledSourceConfig,
                       record: dict) -> bool:
    """Put what :func:`restyling_record` returned in an earlier process, for the same ``source``, ``target`` and
    ``cfg``, back in this process's caches: a resumed run restyles its remaining draws without fitting the scanner
    (minutes) or choosing the mode again. The caller vouches that the inputs and config are those of the record
    (a run's resume checks both); a record without a fit or choice changes nothing.

    :returns: whether anything was put back.
    """
    source = [c for c in source if c.label is not None]  # the keys styled_source_pairs uses
    found = False
    if isinstance(record.get("scanner"), dict) and cfg.mode in ("scanner", "auto"):
        _FITS.setdefault(_cache_key(source, target, cfg.fit), ScannerFit.from_dict(record["scanner"]))
        found = True
    if isinstance(record.get("mode_choice"), dict) and cfg.mode == "auto":
        _CHOICES.setdefault(_cache_key(source, target, cfg), dict(record["mode_choice"]))
        found = True
    return found


NO_RESTYLING = "none"
"""The restyling mode recorded when ``styled_fraction`` is 0 (every pair keeps the source look)."""


def restyles(cfg: StyledSourceConfig) -> bool:
    """Whether ``cfg`` restyles any image (``styled_fraction`` > 0): with none, no scanner is fitted and no style
    estimated (minutes saved on CAMUS-sized sets)."""
    return cfg.styled_fraction > 0


def _subset(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    return np.arange(n) if k <= 0 or k >= n else np.sort(rng.choice(n, k, replace=False))


def styled_source_pairs(model, source: Sequence[Case], target: Sequence[Case], cfg: StyledSourceConfig,
                        seed: int, progress: bool = False) -> StyledPairs:
    """Restyle labelled ``source`` cases toward the look of the unlabelled ``target`` cases.

    :param model: the policy's :class:`~rl_adapt.policies.nnunet.NnUNetModel` (its preprocessing and patch size).
    :param source: labelled source cases; :param target: target cases (images only are read).
    :param seed: seed of the subsets, the restyled ones and the restyling.
    :param progress: show a progress bar over the scanner fit (``mode: scanner`` or ``auto``; minutes on CAMUS-sized
        sets).
    :raises InputError: no labelled source case or no target image.
    """
    source = [c for c in source if c.label is not None]
    if not source:
        raise InputError(None, "styled source: the source data has no label maps")
    if not target:
        raise InputError(None, "styled source: no target images")
    rng = np.random.default_rng(seed)
    chosen = [source[i] for i in _subset(len(source), cfg.images, rng)]
    # drawn in every mode (scanner mode does not use them) so the same seed restyles the same source images in all
    style_sub = _subset(len(source), cfg.style_images, rng), _subset(len(target), cfg.style_images, rng)
    mode = cfg.mode if restyles(cfg) else NO_RESTYLING  # nothing is restyled: no scanner fit, no style
    if mode in ("scanner", "auto"):
        scanner = fitted_scanner(source, target, cfg.fit, progress=progress).preset
    if mode == "auto":  # its own seeded draws: the pairs are those of the chosen mode with the same seed
        mode = chosen_mode(source, target, cfg)["mode"]
    if mode in MODES:
        style = estimate_style([source[i].image for i in style_sub[0]], [target[i].image for i in style_sub[1]],
                               beam=cfg.beam, histogram_bands=cfg.histogram_bands)
    styled = rng.random(len(chosen)) < cfg.styled_fraction
    images, labels = [], []
    for case, on in zip(chosen, styled):
        image, label, spacing = case.image, case.label, case.spacing
        if on and mode == "scanner":
            image, label = apply_vendor_shift(image, scanner, seed=int(rng.integers(2 ** 31)), label=label)
            spacing = shifted_spacing(spacing, scanner)
        elif on:
            image = restyle(case.image, style, rng, cfg.spectrum_strength, cfg.histogram, mode=mode,
                            depth=cfg.depth, angular=cfg.angular, beam=cfg.beam,
                            histogram_bands=cfg.histogram_bands)
        data, seg, _ = model.preprocess_pair(image, label, spacing)
        patch, _ = centre_pad_crop(data, model.patch_size, 0.0)
        label, _ = centre_pad_crop(np.maximum(seg, 0)[None], model.patch_size, 0)
        images.append(np.asarray(patch, np.float32))
        labels.append(np.asarray(label)[0].astype(np.int64))
    log.info("styled source: %d source images, %d restyled toward the target", len(chosen), int(styled.sum()))
    return StyledPairs(images=torch.from_numpy(np.stack(images)), labels=torch.from_numpy(np.stack(labels)),
                       styled=styled, names=[c.name for c in chosen])
