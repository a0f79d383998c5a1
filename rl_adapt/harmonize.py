"""Input harmonization: map each target image toward the source scanner's look before a model sees it.

The restyling of :mod:`rl_adapt.styling` run the other way round: estimated label-free from unlabelled target images
and the source images, it multiplies a target image's in-sector intensities by the source/target depth profile ratio,
multiplies its normalised spectrum by the source/target amplitude ratio (phase kept), and maps its in-sector pixels by
rank onto the source images' mean quantile function. Per image, deterministic, no label read. Stored with an adapted
model (``harmonization.npz``), it is applied by ``rl-adapt predict`` and ``rl-adapt evaluate`` before the network.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import InputError
from .io_utils import read_npz, save_npz
from .styling import (DEFAULT_QUANTILES, TargetStyle, _check_images, estimate_style, intensity_scale,
                      match_quantiles, restyle, sector_mask)

log = logging.getLogger(__name__)

FILE_NAME = "harmonization.npz"
"""The map's file name inside an adapted model's folder."""
_FORMAT_VERSION = 1
_STYLE_FIELDS = ("target_amplitude", "source_amplitude", "n_source", "target_depth", "source_depth")


WHEN: tuple[str, ...] = ("never", "always", "auto")
"""When ``rl-adapt adapt`` harmonizes (see :attr:`HarmonizeConfig.when`)."""


@dataclass
class HarmonizeConfig:
    """When and how the target images are harmonized (all label-free).

    :ivar when: ``never``; ``always``; or ``auto``: only when the fitted B-mode scanner model cannot reproduce the
        target's look, i.e. when the restyling's own choice (:func:`rl_adapt.training.styled_source.chosen_mode`, with
        ``source_teacher.pairs``' settings, on the raw target images) is ``degrade``. Where the scanner fits, the
        source images restyled through it carry the target's true look with their labels, and the map would only
        take information away from the target images.
    :ivar depth: equalise the mean in-sector intensity over depth to the source's.
    :ivar spectrum: multiply the normalised spectrum by the smoothed, clipped source/target amplitude ratio.
    :ivar histogram: map the in-sector pixels by rank onto the source images' mean quantile function.
    :ivar max_images: at most this many images per set enter the estimate (evenly spaced; 0: all).
    """

    when: str = "never"
    depth: bool = True
    spectrum: bool = True
    histogram: bool = True
    max_images: int = 256

    def __post_init__(self):
        if self.when not in WHEN:
            raise ValueError(f"harmonize.when must be one of {WHEN}, got {self.when!r}")
        if int(self.max_images) < 0:
            raise ValueError(f"harmonize.max_images must be >= 0, got {self.max_images}")


def _subset(images: list[np.ndarray], n: int) -> list[np.ndarray]:
    if n <= 0 or len(images) <= n:
        return images
    return [images[i] for i in np.linspace(0, len(images) - 1, n).round().astype(int)]


@dataclass
class Harmonizer:
    """A fitted target -> source map for single 2D images.

    :ivar style: spectra and depth profiles with the roles swapped (its "source" is the target scanner).
    :ivar source_quantiles: ``(Q,)`` float64, mean in-sector quantile function of the source images (fraction of full
        scale, probabilities evenly spaced in ``[0, 1]``).
    :ivar depth, spectrum, histogram: the steps taken (see :class:`HarmonizeConfig`).
    """

    style: TargetStyle
    source_quantiles: np.ndarray
    depth: bool = True
    spectrum: bool = True
    histogram: bool = True

    def apply(self, image: np.ndarray) -> np.ndarray:
        """Harmonize one ``(H, W)`` (or ``(1, H, W)``) image: float32 of the same shape and intensity units."""
        arr = np.asarray(image)
        if arr.ndim == 3 and arr.shape[0] == 1:
            return self.apply(arr[0])[None]
        out = restyle(arr, self.style, 0, spectrum_strength=1.0 if self.spectrum else 0.0, histogram=False,
                      mode="ratio", depth=self.depth)
        if self.histogram:
            mask = sector_mask(arr)
            if mask.any():
                out[mask] = match_quantiles(out[mask].astype(np.float64), self.source_quantiles) * intensity_scale(arr)
        return out.astype(np.float32)

    def save(self, path: str | Path) -> Path:
        """Write the map atomically as one compressed ``.npz`` (spectra, depth profiles, quantiles and steps; tens of
        kB) and return its path."""
        path = Path(path)
        save_npz(path, format_version=np.int64(_FORMAT_VERSION), source_quantiles=self.source_quantiles,
                 steps=np.array([self.depth, self.spectrum, self.histogram]),
                 **{k: np.asarray(getattr(self.style, k)) for k in _STYLE_FIELDS})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Harmonizer":
        """Read a map written by :meth:`save`.

        :raises InputError: the file is missing, unreadable or not a harmonization file.
        """
        path = Path(path)
        data = read_npz(path, "harmonization map", ("format_version", "source_quantiles", "steps", *_STYLE_FIELDS))
        if int(data["format_version"]) != _FORMAT_VERSION:
            raise InputError(path, f"harmonization format {int(data['format_version'])}, this version reads "
                                   f"{_FORMAT_VERSION}")
        quantiles = data["source_quantiles"].astype(np.float64)
        try:
            style = TargetStyle(target_quantiles=quantiles[None].astype(np.float32),
                                **{k: (int(data[k]) if k == "n_source" else data[k]) for k in _STYLE_FIELDS})
        except InputError as exc:  # inconsistent arrays: say which file holds them
            raise InputError(path, exc.problem) from exc
        steps = [bool(v) for v in data["steps"]]
        return cls(style=style, source_quantiles=quantiles, depth=steps[0], spectrum=steps[1], histogram=steps[2])


def fit_harmonizer(source_images: Sequence[np.ndarray], target_images: Sequence[np.ndarray],
                   cfg: HarmonizeConfig | None = None) -> Harmonizer:
    """Estimate the target -> source map from unlabelled images of both scanners.

    :param source_images: 2D source images (any size, uint8 or float).
    :param target_images: 2D target images.
    :param cfg: the steps and the image cap.
    :raises InputError: empty input or a bad image.
    """
    cfg = cfg or HarmonizeConfig()
    src = _subset(_check_images(source_images, "source_images"), cfg.max_images)
    tgt = _subset(_check_images(target_images, "target_images"), cfg.max_images)
    style = estimate_style(tgt, src)  # roles swapped: the map goes from the target's look to the source's
    probs = np.linspace(0.0, 1.0, DEFAULT_QUANTILES)
    quantiles = np.mean([np.quantile(im[sector_mask(im)].astype(np.float64), probs) / intensity_scale(im)
                         for im in src], axis=0)
    log.info("harmonization fitted on %d source / %d target images (depth %s, spectrum %s, histogram %s)",
             len(src), len(tgt), cfg.depth, cfg.spectrum, cfg.histogram)
    return Harmonizer(style=style, source_quantiles=quantiles, depth=cfg.depth, spectrum=cfg.spectrum,
                      histogram=cfg.histogram)
