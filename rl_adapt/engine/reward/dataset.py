"""What the reward network learns from: (image, segmentation) pairs with per-pixel targets
``segmentation == corrected``, from the policy's argmax and samples, the corrections themselves, and deliberately
wrong masks (:func:`perturb_mask`: erosion, dilation, shifts, rotations, label swaps, blobs, holes; another image's
mask), as RL4Seg builds its negatives.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from scipy import ndimage as ndi

from rl_adapt.errors import InputError

@dataclass
class RewardDataset:
    """(image, segmentation) pairs with per-pixel targets ``segmentation == corrected``."""

    images: np.ndarray
    """(N, 1, H, W) float32 images"""
    corrected: np.ndarray
    """(N, H, W) uint8 corrected masks (the targets' reference)"""
    segs: np.ndarray
    """(M, H, W) uint8 segmentations to score"""
    image_index: np.ndarray
    """(M,) int64: the image each segmentation belongs to"""
    kind: list[str] = field(default_factory=list)
    """(M,) where each segmentation came from: "given<j>", "corrected", "perturbed", "other_image\""""

    def __len__(self) -> int:
        return len(self.segs)

    def targets(self, idx: np.ndarray | slice | int) -> np.ndarray:
        """(m, H, W) uint8: 1 where ``segs[idx] == corrected[image_index[idx]]``."""
        return (self.segs[idx] == self.corrected[self.image_index[idx]]).astype(np.uint8)

    def concat(self, other: "RewardDataset", prefix: str = "") -> "RewardDataset":
        """This dataset followed by ``other`` (its images appended, its kinds prefixed with ``prefix``)."""
        return RewardDataset(images=np.concatenate([self.images, other.images]),
                             corrected=np.concatenate([self.corrected, other.corrected]),
                             segs=np.concatenate([self.segs, other.segs]),
                             image_index=np.concatenate([self.image_index, other.image_index + len(self.images)]),
                             kind=list(self.kind) + [prefix + k for k in other.kind])


def _nearest_other(mask: np.ndarray, region: np.ndarray, label: int) -> np.ndarray:
    """Labels for ``region`` pixels taken from the nearest pixel whose label is not ``label``."""
    src = mask != label
    if not src.any():
        return np.zeros(int(region.sum()), np.uint8)
    _, (iy, ix) = ndi.distance_transform_edt(~src, return_indices=True)
    return mask[iy[region], ix[region]]


def _ellipse(shape: tuple[int, int], cy: float, cx: float, ry: float, rx: float, angle: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    y, x = yy - cy, xx - cx
    c, s = math.cos(angle), math.sin(angle)
    u, v = c * x + s * y, -s * x + c * y
    return (u / max(rx, 0.5)) ** 2 + (v / max(ry, 0.5)) ** 2 <= 1.0


PERTURBATIONS = ("erode", "dilate", "shift", "rotate", "scale", "swap", "blob", "hole")
"""Kinds of deliberate negatives made by :func:`perturb_mask`."""


def perturb_mask(mask: np.ndarray, rng: np.random.Generator, kind: str | None = None) -> np.ndarray:
    """A deliberately wrong version of a label map (a negative example for the reward network).

    :param mask: (H, W) uint8 label map.
    :param rng: numpy Generator (all randomness comes from it).
    :param kind: one of :data:`PERTURBATIONS`, or None for a random one.
    :returns: (H, W) uint8 perturbed map (a new array).
    """
    h, w = mask.shape
    size = min(h, w)
    out = mask.copy()
    present = [int(v) for v in np.unique(mask) if v != 0]
    kind = kind or str(rng.choice(PERTURBATIONS))
    if kind in ("erode", "dilate") and present:
        lab = int(rng.choice(present))
        r = int(rng.integers(1, max(2, size // 20) + 1))
        se = ndi.generate_binary_structure(2, 1)
        region = mask == lab
        if kind == "erode":
            eroded = ndi.binary_erosion(region, se, iterations=r)
            lost = region & ~eroded
            out[lost] = _nearest_other(mask, lost, lab)
        else:
            grown = ndi.binary_dilation(region, se, iterations=r)
            out[grown] = lab
    elif kind == "shift":
        m = max(2, size // 12)
        dy, dx = (int(v) for v in rng.integers(-m, m + 1, size=2))
        if dy == 0 and dx == 0:
            dx = m
        out = ndi.shift(mask, (dy, dx), order=0, mode="constant", cval=0).astype(np.uint8)
    elif kind == "rotate":
        ang = float(rng.uniform(8, 25)) * (1 if rng.random() < 0.5 else -1)
        out = ndi.rotate(mask, ang, reshape=False, order=0, mode="constant", cval=0).astype(np.uint8)
    elif kind == "scale":
        z = float(rng.uniform(0.8, 0.9) if rng.random() < 0.5 else rng.uniform(1.1, 1.25))
        cy, cx = (h - 1) / 2, (w - 1) / 2
        mat = np.diag([1 / z, 1 / z])
        off = np.array([cy, cx]) - mat @ np.array([cy, cx])
        out = ndi.affine_transform(mask, mat, offset=off, order=0, mode="constant", cval=0).astype(np.uint8)
    elif kind == "swap" and len(present) >= 1:
        a = int(rng.choice(present))
        b = int(rng.choice([v for v in range(4) if v != a]))
        out[mask == a] = b
        out[mask == b] = a
    elif kind in ("blob", "hole") or not present:
        fg = np.argwhere(mask > 0)
        if kind == "hole" and len(fg):
            cy, cx = fg[rng.integers(len(fg))]
            lab = 0
        else:
            if len(fg):
                cy, cx = fg[rng.integers(len(fg))] + rng.normal(0, size / 8, 2)
            else:
                cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            lab = int(rng.integers(1, 4))
        ry, rx = rng.uniform(size / 20, size / 7, 2)
        blob = _ellipse((h, w), cy, cx, ry, rx, float(rng.uniform(0, math.pi)))
        out[blob] = lab
    if np.array_equal(out, mask):  # the perturbation was a no-op (e.g. empty structure): force a change
        blob = _ellipse((h, w), h / 2, w / 2, size / 8, size / 8, 0.0)
        out[blob] = (mask[blob].astype(np.int64) + 1) % 4
    return out


def build_reward_dataset(
    images: np.ndarray,
    masks_list: Sequence[np.ndarray],
    corrected: np.ndarray,
    seed: int = 0,
    n_perturbed: int = 2,
    n_other_image: int = 1,
    include_corrected: bool = True,
) -> RewardDataset:
    """Pairs (image, segmentation) for reward training, with deliberate negatives.

    :param images: (N, 1, H, W) float32 images (or (N, H, W)).
    :param masks_list: segmentations aligned with ``images``, each (N, H, W) integer: argmax predictions,
        policy samples, predictions under altered contrast/noise or perturbed weights (made by the caller).
    :param corrected: (N, H, W) corrected masks; the per-pixel target is ``segmentation == corrected``.
    :param seed: seed of the generated negatives.
    :param n_perturbed: perturbed copies of each corrected mask (:func:`perturb_mask`; also applied to
        a given segmentation half of the time).
    :param n_other_image: segmentations of another image (another image's first given mask, or its
        correction) paired with each image.
    :param include_corrected: add each corrected mask itself (an all-right example).
    :returns: :class:`RewardDataset`.
    :raises InputError: inconsistent shapes.
    """
    images = np.asarray(images, dtype=np.float32)
    if images.ndim == 3:
        images = images[:, None]
    corrected = np.asarray(corrected).astype(np.uint8)
    if images.ndim != 4 or images.shape[1] != 1:
        raise InputError(None, f"images: expected (N, 1, H, W), got {images.shape}")
    n, _, h, w = images.shape
    if corrected.shape != (n, h, w):
        raise InputError(None, f"corrected: expected {(n, h, w)}, got {corrected.shape}")
    given = []
    for j, m in enumerate(masks_list):
        m = np.asarray(m)
        if m.shape != (n, h, w):
            raise InputError(None, f"masks_list[{j}]: expected {(n, h, w)}, got {m.shape}")
        given.append(m.astype(np.uint8))
    rng = np.random.default_rng(seed)
    segs: list[np.ndarray] = []
    index: list[int] = []
    kind: list[str] = []
    for j, m in enumerate(given):
        segs.extend(m)
        index.extend(range(n))
        kind.extend([f"given{j}"] * n)
    if include_corrected:
        segs.extend(corrected)
        index.extend(range(n))
        kind.extend(["corrected"] * n)
    for i in range(n):
        for _ in range(n_perturbed):
            base = corrected[i] if (not given or rng.random() < 0.5) else given[int(rng.integers(len(given)))][i]
            segs.append(perturb_mask(base, rng))
            index.append(i)
            kind.append("perturbed")
        if n > 1:
            for _ in range(n_other_image):
                j = int(rng.integers(n - 1))
                j = j + 1 if j >= i else j
                segs.append(given[0][j] if given else corrected[j])
                index.append(i)
                kind.append("other_image")
    return RewardDataset(images=images, corrected=corrected, segs=np.stack(segs).astype(np.uint8),
                         image_index=np.asarray(index, dtype=np.int64), kind=kind)
