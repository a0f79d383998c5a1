"""Shape prior: a convolutional autoencoder on label maps that projects a mask onto plausible anatomy.

Trained on SOURCE-domain label maps only (no images), in the spirit of Painchaud et al. (anatomically
constrained cardiac segmentation): masks are resized to ``size x size`` one-hot maps, passed through a
narrow latent bottleneck, and decoded; training pairs are (randomly corrupted mask -> clean mask) under
small random affine transforms, so the decoder learns to output the nearest plausible shape.
:meth:`ShapePrior.project` returns label maps at the input resolution.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Literal
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from rl_adapt.config import from_dict, to_dict
from rl_adapt.errors import InputError
from rl_adapt.io_utils import atomic_path
from rl_adapt.training.loop import fit

log = logging.getLogger(__name__)

_FORMAT_VERSION = 1


@dataclass
class ShapePriorConfig:
    """Shape autoencoder: internal resolution, architecture, training schedule and augmentation."""

    num_classes: int = 4
    """K, number of labels (bg, LV, MYO, LA)"""
    size: int = 64
    """masks are resized to size x size inside (a multiple of 2**downsamplings)"""
    features: int = 16
    """channels of the first encoder stage (doubled at each stride-2 stage)"""
    downsamplings: int = 3
    """stride-2 stages in the encoder (and transposed ones in the decoder)"""
    latent: Literal["spatial", "vector"] = "vector"
    """bottleneck: one ``latent_dim`` vector (a global shape code, as Painchaud et al.; removes defects) or a
    coarse feature map of ``latent_channels`` (learns faster but copies more of the input's defects)"""
    latent_channels: int = 4
    """channels of the spatial bottleneck ((size / 2**downsamplings)^2 * latent_channels numbers)"""
    latent_dim: int = 32
    """width of the vector bottleneck"""
    steps: int = 1500
    """optimizer steps"""
    batch_size: int = 32
    """masks per step"""
    lr: float = 5e-3
    """AdamW learning rate (one-cycle schedule)"""
    rotate_deg: float = 10.0
    """augmentation: rotations up to this many degrees"""
    scale: float = 0.1
    """augmentation: isotropic scaling by up to this fraction"""
    shift: float = 0.06
    """augmentation: translations up to this fraction of the image size"""
    corrupt_prob: float = 0.7
    """probability that a training input is corrupted (blobs, holes) while its target stays clean"""
    seed: int = 0
    """seed of the initial weights, batch order and augmentation"""


def _norm(ch: int) -> nn.Module:
    return nn.GroupNorm(math.gcd(4, ch), ch)


def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy + (1 - soft Dice over the foreground labels, pooled over the batch)."""
    k = logits.shape[1]
    p = logits.softmax(1)
    oh = F.one_hot(target, k).permute(0, 3, 1, 2).float()
    inter = (p * oh).sum((0, 2, 3))[1:]
    denom = (p + oh).sum((0, 2, 3))[1:]
    return F.cross_entropy(logits, target) + 1 - (2 * inter / (denom + 1.0)).mean()


class ShapeAutoencoder(nn.Module):
    """(B, K, S, S) one-hot -> (B, K, S, S) logits through a narrow bottleneck (spatial map or vector)."""

    def __init__(self, num_classes: int, size: int, features: int, downsamplings: int, latent_dim: int,
                 latent: str = "vector", latent_channels: int = 4):
        super().__init__()
        if size % (2 ** downsamplings):
            raise ValueError(f"size {size} is not a multiple of 2**{downsamplings}")
        enc: list[nn.Module] = []
        c = num_classes
        chans = [features * 2 ** i for i in range(downsamplings)]
        for ch in chans:
            enc += [nn.Conv2d(c, ch, 3, stride=2, padding=1), _norm(ch), nn.LeakyReLU(0.1, inplace=True),
                    nn.Conv2d(ch, ch, 3, padding=1), _norm(ch), nn.LeakyReLU(0.1, inplace=True)]
            c = ch
        self.encoder = nn.Sequential(*enc)
        self.bottom = size // 2 ** downsamplings
        self.bottom_ch = c
        self.latent = latent
        if latent == "spatial":
            self.to_latent = nn.Conv2d(c, latent_channels, 1)
            self.from_latent = nn.Conv2d(latent_channels, c, 1)
        else:
            flat = c * self.bottom ** 2
            self.to_latent = nn.Linear(flat, latent_dim)
            self.from_latent = nn.Linear(latent_dim, flat)
        dec: list[nn.Module] = []
        outs = list(reversed(chans[:-1])) + [features]
        for ch in outs:
            dec += [nn.ConvTranspose2d(c, ch, 4, stride=2, padding=1), _norm(ch), nn.LeakyReLU(0.1, inplace=True),
                    nn.Conv2d(ch, ch, 3, padding=1), _norm(ch), nn.LeakyReLU(0.1, inplace=True)]
            c = ch
        dec.append(nn.Conv2d(c, num_classes, 1))
        self.decoder = nn.Sequential(*dec)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, K, S, S) -> (B, latent_dim) or (B, latent_channels, S / 2**d, S / 2**d)."""
        h = self.encoder(x)
        return self.to_latent(h if self.latent == "spatial" else h.flatten(1))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent code -> (B, K, S, S) logits."""
        h = F.leaky_relu(self.from_latent(z), 0.1).view(-1, self.bottom_ch, self.bottom, self.bottom)
        return self.decoder(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def _to_onehot_small(masks: torch.Tensor, k: int, size: int) -> torch.Tensor:
    """(B, H, W) int -> (B, K, size, size) soft one-hot (area averaging when shrinking, bilinear otherwise)."""
    oh = F.one_hot(masks.long().clamp(0, k - 1), k).permute(0, 3, 1, 2).float()
    if oh.shape[-2:] == (size, size):
        return oh
    if oh.shape[-2] >= size and oh.shape[-1] >= size:
        return F.adaptive_avg_pool2d(oh, (size, size))
    return F.interpolate(oh, size=(size, size), mode="bilinear", align_corners=False)


def _random_affine(oh: torch.Tensor, cfg: ShapePriorConfig, gen: torch.Generator) -> torch.Tensor:
    """Apply a random small affine transform to one-hot maps (B, K, S, S); outside -> background."""
    b = oh.shape[0]
    dev = oh.device
    u = torch.rand(b, 4, generator=gen, device=dev) * 2 - 1
    ang = u[:, 0] * math.radians(cfg.rotate_deg)
    sc = 1 + u[:, 1] * cfg.scale
    tx, ty = u[:, 2] * cfg.shift * 2, u[:, 3] * cfg.shift * 2  # grid coordinates span [-1, 1]
    cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(oh.shape), align_corners=False)
    out = F.grid_sample(oh, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out[:, 0] += 1 - out.sum(1)  # what came from outside the image is background
    return out


def _corrupt(labels: torch.Tensor, k: int, prob: float, gen: torch.Generator) -> torch.Tensor:
    """Paint 1-3 random ellipses (random label or background) into (B, S, S) label maps with probability ``prob``."""
    b, s, _ = labels.shape
    dev = labels.device
    out = labels.clone()
    yy, xx = torch.meshgrid(torch.arange(s, device=dev, dtype=torch.float32),
                            torch.arange(s, device=dev, dtype=torch.float32), indexing="ij")
    apply = torch.rand(b, generator=gen, device=dev) < prob
    for n in range(3):
        keep = apply & (torch.rand(b, generator=gen, device=dev) < (1.0 if n == 0 else 0.5))
        fg = (labels > 0).float()
        # centres near the foreground: a random foreground pixel (or anywhere if empty)
        w = fg.flatten(1) + 1e-6
        idx = torch.multinomial(w, 1, generator=gen).squeeze(1)
        cy = (idx // s).float() + (torch.rand(b, generator=gen, device=dev) - 0.5) * s * 0.15
        cx = (idx % s).float() + (torch.rand(b, generator=gen, device=dev) - 0.5) * s * 0.15
        anywhere = torch.rand(b, generator=gen, device=dev) < 0.4  # some blobs far from the heart
        cy = torch.where(anywhere, torch.rand(b, generator=gen, device=dev) * s, cy)
        cx = torch.where(anywhere, torch.rand(b, generator=gen, device=dev) * s, cx)
        ry = s * (0.04 + 0.10 * torch.rand(b, generator=gen, device=dev))
        rx = s * (0.04 + 0.10 * torch.rand(b, generator=gen, device=dev))
        lab = torch.randint(0, k, (b,), generator=gen, device=dev)
        ell = ((yy[None] - cy[:, None, None]) / ry[:, None, None]) ** 2 + \
              ((xx[None] - cx[:, None, None]) / rx[:, None, None]) ** 2 <= 1
        ell &= keep[:, None, None]
        out = torch.where(ell, lab[:, None, None].expand_as(out), out)
    return out


class ShapePrior:
    """A trained shape autoencoder.

    :param config: :class:`ShapePriorConfig`.
    :param network: the :class:`ShapeAutoencoder` (built from the config when None).
    :param device: where projection runs.
    """

    def __init__(self, config: ShapePriorConfig, network: ShapeAutoencoder | None = None,
                 device: str | torch.device = "cpu", stats: dict | None = None):
        self.config = config
        self.device = torch.device(device)
        self.network = (network or ShapeAutoencoder(config.num_classes, config.size, config.features,
                                                    config.downsamplings, config.latent_dim, config.latent,
                                                    config.latent_channels)).to(self.device)
        self.stats = dict(stats or {})

    @torch.no_grad()
    def project_logits(self, masks: torch.Tensor) -> torch.Tensor:
        """(B, H, W) int label maps -> (B, K, H, W) float32 logits of the nearest plausible shape."""
        k, s = self.config.num_classes, self.config.size
        h, w = masks.shape[-2:]
        self.network.eval()
        oh = _to_onehot_small(masks.to(self.device), k, s)
        logits = self.network(oh)
        return F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)

    def project(self, masks: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Project label maps onto the learnt shape space.

        :param masks: (N, H, W) integer label maps (0..K-1), numpy or torch.
        :returns: (N, H, W) uint8 label maps (argmax of the decoded shape, at the input resolution).
        :raises InputError: not (N, H, W).
        """
        arr = masks.cpu().numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)
        if arr.ndim != 3:
            raise InputError(None, f"masks: expected (N, H, W) label maps, got shape {arr.shape}")
        out = np.empty(arr.shape, dtype=np.uint8)
        for st in range(0, len(arr), batch_size):
            m = torch.from_numpy(arr[st : st + batch_size].astype(np.int64))
            out[st : st + batch_size] = self.project_logits(m).argmax(1).cpu().numpy().astype(np.uint8)
        return out

    def save(self, path: str | Path) -> None:
        """Write weights and config to ``path`` atomically."""
        payload = {"format": "rl_adapt.engine.shape_prior", "version": _FORMAT_VERSION, "config": to_dict(self.config),
                   "state_dict": {k: v.detach().cpu() for k, v in self.network.state_dict().items()},
                   "stats": self.stats}
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "ShapePrior":
        """Load a prior written by :meth:`save`.

        :raises InputError: missing file, or (in one line) any file that is not a shape prior saved by rl-adapt.
        """
        path = Path(path)
        if not path.is_file():
            raise InputError(path, "shape prior file not found")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - torch's own message runs over many lines
            raise InputError(path, "not a shape prior saved by rl-adapt (not a readable torch file)") from None
        try:
            if not isinstance(payload, dict) or payload.get("format") != "rl_adapt.engine.shape_prior":
                raise ValueError("another file format")
            cfg = from_dict(ShapePriorConfig, payload["config"], str(path))
            prior = cls(cfg, device=device, stats=payload.get("stats"))
            prior.network.load_state_dict(payload["state_dict"])
        except Exception as exc:  # noqa: BLE001 - a foreign payload fails in many ways
            first = (str(exc).strip().splitlines() or [""])[0][:160]
            raise InputError(path, f"not a shape prior saved by rl-adapt ({type(exc).__name__}: {first})") from None
        prior.network.eval()
        return prior


def train_shape_prior(masks: np.ndarray, cfg: ShapePriorConfig | None = None, device: str | torch.device = "cpu",
                      progress: bool = False) -> ShapePrior:
    """Train the shape autoencoder on source label maps (denoising, with random affine augmentation).

    :param masks: (N, H, W) integer label maps of the SOURCE domain (0..K-1).
    :param cfg: :class:`ShapePriorConfig`.
    :param device: torch device.
    :param progress: show a tqdm bar.
    :returns: :class:`ShapePrior` (``.stats``: final loss, pixel accuracy of clean reconstructions, seconds).
    :raises InputError: no masks or wrong shape. :raises TrainingDiverged: NaN/Inf loss.
    """
    cfg = cfg or ShapePriorConfig()
    masks = np.asarray(masks)
    if masks.ndim != 3 or len(masks) == 0:
        raise InputError(None, f"shape prior: expected (N, H, W) label maps with N >= 1, got {masks.shape}")
    if masks.min() < 0 or masks.max() >= cfg.num_classes:
        raise InputError(None, f"shape prior: labels must be in 0..{cfg.num_classes - 1}")
    device = torch.device(device)
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    prior = ShapePrior(cfg, device=device)
    net = prior.network
    k, s = cfg.num_classes, cfg.size
    # all masks resized once (soft one-hot at the internal resolution), kept on the device
    small = torch.cat([_to_onehot_small(torch.from_numpy(masks[i : i + 256].astype(np.int64)).to(device), k, s)
                       for i in range(0, len(masks), 256)])
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(cfg.steps, 1), pct_start=0.1)
    net.train()

    def loss_at(step: int) -> torch.Tensor:
        idx = torch.randint(0, len(small), (cfg.batch_size,), generator=gen, device=device)
        oh = _random_affine(small[idx], cfg, gen)
        target = oh.argmax(1)
        noisy = _corrupt(target, k, cfg.corrupt_prob, gen)
        return _loss(net(F.one_hot(noisy, k).permute(0, 3, 1, 2).float()), target)

    losses = fit(loss_at, opt, net.parameters(), cfg.steps, what="shape prior", grad_clip=1.0, scheduler=sched,
                 progress=progress, postfix_every=20)
    net.eval()
    with torch.no_grad():
        n_eval = min(len(small), 256)
        rec = net(small[:n_eval]).argmax(1)
        acc = float((rec == small[:n_eval].argmax(1)).float().mean())
    prior.stats = {"loss": float(np.mean(losses[-max(1, len(losses) // 10):])) if losses else float("nan"),
                   "reconstruction_pixel_accuracy": acc, "n_masks": int(len(masks)), "steps": int(cfg.steps),
                   "seconds": float(time.time() - t0)}
    log.info("shape prior: %s", prior.stats)
    return prior
