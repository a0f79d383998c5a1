"""Sliding-window inference for 2D segmentation networks, numerically matching nnU-Net v2, in plain torch.

No nnunetv2 import here: :mod:`rl_adapt.policies.nnunet` owns that. Everything works on preprocessed data
(z-scored, at the plan spacing) of shape ``(C, h, w)`` float32 and returns logits ``(K, h, w)``.

Conventions copied from nnU-Net v2 (``nnUNetPredictor``) so label maps agree bit for bit:

* images smaller than the patch are zero-padded, centred, with the odd extra pixel after the content;
* tiles start at ``round(i * (size - patch) / (n - 1))`` with ``n = ceil((size - patch) / (patch * step)) + 1``;
* every tile's logits are multiplied by a Gaussian importance map (sigma = patch / 8, peak 10, rounded to
  float16 as nnU-Net does) and the weighted sum is divided by the summed weights;
* mirroring averages the network over every non-empty subset of the allowed axes.

nnU-Net accumulates the tile sums in float16; :func:`sliding_window_logits` does the same when
``accumulate_dtype=torch.float16`` (exact parity) and accumulates in float32 by default (more precise).
"""
from __future__ import annotations

import contextlib
import itertools
import math
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch
from scipy.ndimage import gaussian_filter


@lru_cache(maxsize=8)
def _gaussian_np(patch_size: tuple[int, ...], sigma_scale: float, value_scaling_factor: float) -> np.ndarray:
    tmp = np.zeros(patch_size)
    tmp[tuple(i // 2 for i in patch_size)] = 1
    g = gaussian_filter(tmp, [i * sigma_scale for i in patch_size], 0, mode="constant", cval=0)
    g /= np.max(g) / value_scaling_factor
    g = g.astype(np.float16)  # nnU-Net keeps the map in half precision
    g[g == 0] = g[g != 0].min()
    return g.astype(np.float32)


def gaussian_importance_map(patch_size: Sequence[int], sigma_scale: float = 1.0 / 8,
                            value_scaling_factor: float = 10.0, device: torch.device | str = "cpu") -> torch.Tensor:
    """Tile weighting map ``(P0, P1)`` float32 (values of nnU-Net's float16 map), peak ``value_scaling_factor``."""
    g = _gaussian_np(tuple(int(p) for p in patch_size), float(sigma_scale), float(value_scaling_factor))
    return torch.from_numpy(g).to(device)


def sliding_window_steps(image_size: Sequence[int], patch_size: Sequence[int], step: float = 0.5) -> list[list[int]]:
    """Tile start offsets per axis, as nnU-Net's ``compute_steps_for_sliding_window``.

    :param image_size: ``(h, w)`` with every entry >= the patch size (pad first).
    :param step: tile step as a fraction of the patch size, in (0, 1].
    """
    if not 0 < step <= 1:
        raise ValueError(f"tile step must be in (0, 1], got {step}")
    steps = []
    for size, patch in zip(image_size, patch_size):
        if size < patch:
            raise ValueError(f"image size {tuple(image_size)} smaller than patch {tuple(patch_size)}: pad first")
        n = int(math.ceil((size - patch) / (patch * step))) + 1
        actual = (size - patch) / (n - 1) if n > 1 else 0.0
        steps.append([int(np.round(actual * i)) for i in range(n)])
    return steps


def pad_to_min_size(data: torch.Tensor, min_size: Sequence[int], value: float = 0.0
                    ) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Pad the last two axes of ``data`` to at least ``min_size`` (centred, extra pixel after).

    :returns: the padded tensor and the slices (over the last two axes) that undo the padding.
    """
    old = data.shape[-2:]
    new = [max(int(m), int(o)) for m, o in zip(min_size, old)]
    before = [(n - o) // 2 for n, o in zip(new, old)]
    after = [n - o - b for n, o, b in zip(new, old, before)]
    if any(before) or any(after):
        data = torch.nn.functional.pad(data, (before[1], after[1], before[0], after[0]), value=value)
    return data, tuple(slice(b, b + o) for b, o in zip(before, old))


def centre_pad_crop(x: torch.Tensor | np.ndarray, size: Sequence[int], value: float = 0.0):
    """Centre-pad and/or centre-crop the last two axes of ``x`` to exactly ``size``.

    Padding follows :func:`pad_to_min_size` (extra pixel after); cropping removes ``(old - new) // 2``
    before. Returns ``(out, offsets)`` where ``offsets[i]`` = position of the input's row/col 0 in the output
    (negative when cropped); :func:`undo_centre_pad_crop` inverts it.
    """
    old = x.shape[-2:]
    offsets = []
    for o, n in zip(old, size):
        offsets.append((n - o) // 2 if n >= o else -((o - n) // 2))
    out_shape = (*x.shape[:-2], int(size[0]), int(size[1]))
    if isinstance(x, torch.Tensor):
        out = torch.full(out_shape, value, dtype=x.dtype, device=x.device)
    else:
        out = np.full(out_shape, value, dtype=x.dtype)
    src, dst = [], []
    for o, n, off in zip(old, size, offsets):
        s0 = max(0, -off)
        d0 = max(0, off)
        length = min(o - s0, n - d0)
        src.append(slice(s0, s0 + length))
        dst.append(slice(d0, d0 + length))
    out[(..., *dst)] = x[(..., *src)]
    return out, tuple(offsets)


def undo_centre_pad_crop(x: torch.Tensor | np.ndarray, original_size: Sequence[int], offsets: Sequence[int],
                         value: float | Sequence[float] = 0.0):
    """Inverse of :func:`centre_pad_crop`: back to ``original_size`` (cropped-away parts filled with ``value``).

    ``value`` may be one number or one per leading channel (e.g. logits favouring background).
    """
    out_shape = (*x.shape[:-2], int(original_size[0]), int(original_size[1]))
    if isinstance(x, torch.Tensor):
        out = torch.zeros(out_shape, dtype=x.dtype, device=x.device)
    else:
        out = np.zeros(out_shape, dtype=x.dtype)
    if np.ndim(value) == 0:
        out[...] = value
    else:
        for c, v in enumerate(value):
            out[c] = v
    src, dst = [], []
    for o, n, off in zip(original_size, x.shape[-2:], offsets):
        d0 = max(0, off)      # where original pixel 0 sits inside x
        s0 = max(0, -off)     # first original pixel present in x
        length = min(o - s0, n - d0)
        src.append(slice(d0, d0 + length))
        dst.append(slice(s0, s0 + length))
    out[(..., *dst)] = x[(..., *src)]
    return out


def mirrored_forward(network: torch.nn.Module, x: torch.Tensor, mirror_axes: Sequence[int] | None) -> torch.Tensor:
    """Network logits ``(B, K, h, w)`` averaged over flips along every non-empty subset of ``mirror_axes``.

    :param mirror_axes: spatial axes (0 = rows, 1 = cols) as in nnU-Net's ``inference_allowed_mirroring_axes``;
        ``None`` or empty = no mirroring.
    """
    pred = network(x)
    if mirror_axes:
        axes = [int(a) + 2 for a in mirror_axes]
        combos = [c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)]
        for c in combos:
            pred = pred + torch.flip(network(torch.flip(x, c)), c)
        pred = pred / (len(combos) + 1)
    return pred


@torch.inference_mode()
def sliding_window_logits(network: torch.nn.Module | Sequence[torch.nn.Module], data: torch.Tensor | np.ndarray,
                          patch_size: Sequence[int], step: float = 0.5, mirror_axes: Sequence[int] | None = None,
                          use_gaussian: bool = True, device: torch.device | str = "cpu",
                          accumulate_dtype: torch.dtype = torch.float32, tile_batch: int = 1,
                          autocast: bool | None = None) -> torch.Tensor:
    """Logits ``(K, h, w)`` in ``accumulate_dtype`` (float32 by default), on CPU, for preprocessed ``data`` ``(C, h, w)`` float32.

    :param network: one network, or several (an ensemble of folds: logits are averaged, as nnU-Net).
    :param patch_size: the plan's 2D patch size ``(P0, P1)`` in pixels.
    :param step: tile step as a fraction of the patch (nnU-Net: 0.5).
    :param mirror_axes: axes for test-time mirroring (``None``: off).
    :param accumulate_dtype: dtype of the running weighted sums; ``torch.float16`` reproduces nnU-Net exactly.
    :param tile_batch: tiles per forward call (1 = nnU-Net's order; larger is faster on a GPU).
    :param autocast: bf16/fp16 autocast on CUDA; ``None`` = on for CUDA (as nnU-Net), off on CPU.
    """
    nets = list(network) if isinstance(network, (list, tuple)) else [network]
    device = torch.device(device)
    x = torch.as_tensor(np.asarray(data) if not isinstance(data, torch.Tensor) else data, dtype=torch.float32)
    if x.ndim != 3:
        raise ValueError(f"expected preprocessed data (C, h, w), got shape {tuple(x.shape)}")
    x, unpad = pad_to_min_size(x, patch_size)
    steps = sliding_window_steps(x.shape[1:], patch_size, step)
    tiles = [(r, c) for r in steps[0] for c in steps[1]]
    p0, p1 = int(patch_size[0]), int(patch_size[1])
    gauss = gaussian_importance_map(patch_size, device=device) if use_gaussian else torch.ones((p0, p1), device=device)
    use_autocast = (device.type == "cuda") if autocast is None else autocast
    x = x.to(device)
    total = None
    for net in nets:
        net.eval()
        acc = None
        weight = torch.zeros(x.shape[1:], dtype=accumulate_dtype, device=device)
        for start in range(0, len(tiles), max(1, tile_batch)):
            chunk = tiles[start:start + max(1, tile_batch)]
            batch = torch.stack([x[:, r:r + p0, c:c + p1] for r, c in chunk])
            ctx = torch.autocast(device.type, enabled=True) if use_autocast else contextlib.nullcontext()
            with ctx:
                pred = mirrored_forward(net, batch, mirror_axes)
            pred = pred.float()
            if acc is None:
                acc = torch.zeros((pred.shape[1], *x.shape[1:]), dtype=accumulate_dtype, device=device)
            for k, (r, c) in enumerate(chunk):
                tile = pred[k] * gauss if use_gaussian else pred[k]
                acc[:, r:r + p0, c:c + p1] += tile
                weight[r:r + p0, c:c + p1] += gauss
        torch.div(acc, weight, out=acc)
        logits = acc[(slice(None), *unpad)].cpu()
        total = logits if total is None else total + logits
    if len(nets) > 1:
        total /= len(nets)
    return total
