"""Reward network: a small U-Net that scores, per pixel, whether a segmentation's label is right.

Input: the image (1 channel) and the one-hot segmentation (K channels); output: one logit per pixel,
``sigmoid(logit / T)`` = probability that the pixel's label equals the corrected mask's label (T is a
temperature fitted on held-out images). Trained with binary cross-entropy on ``segmentation == corrected``
over policy samples, argmax predictions and deliberately wrong masks (:func:`build_reward_dataset`).
:meth:`RewardNet.score` is the ``reward_fn(images, actions)`` that the PPO environment calls;
``1 - score`` is the uncertainty map shown to users.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from rl_adapt.measures.calibration import error_detection_report
from rl_adapt.config import bounded, from_dict, to_dict
from rl_adapt.errors import InputError
from rl_adapt.distributed import SINGLE, World, rank_slice
from rl_adapt.engine.reward.dataset import RewardDataset
from rl_adapt.io_utils import atomic_path
from rl_adapt.training.loop import fit

log = logging.getLogger(__name__)

_FORMAT_VERSION = 1


@dataclass
class RewardNetConfig:
    """Reward network architecture, training schedule and calibration."""

    num_classes: int = 4
    """K, number of labels of the segmentations (one-hot input channels)"""
    features: int = bounded(16, ge=1)
    """channels of the first U-Net stage (doubled at each stage down)"""
    depth: int = bounded(3, ge=1)
    """number of U-Net stages (depth - 1 poolings by 2)"""
    lr: float = bounded(2e-3, gt=0.0, le=1.0)
    """AdamW learning rate"""
    weight_decay: float = bounded(1e-4, ge=0.0)
    """AdamW weight decay"""
    steps: int = bounded(400, ge=0)
    """optimizer steps (batches) of training"""
    batch_size: int = bounded(16, ge=1)
    """(image, segmentation) pairs per batch"""
    val_fraction: float = bounded(0.2, ge=0.0, lt=1.0)
    """fraction of the images held out (half to fit the temperature, half to report ECE/AUROC)"""
    class_balanced: bool = False
    """weight the BCE so right and wrong pixels count equally (biases raw probabilities; off by default)"""
    border_weight: float = bounded(1.0, ge=0.0)
    """BCE weight of the pixels within ``border_px`` of a label change in the scored segmentation (its own
    borders, known without labels: where most wrong pixels are); 1.0: every pixel alike"""
    border_px: int = bounded(3, ge=1)
    """half-width (policy pixels) of the border band that ``border_weight`` weights"""
    flip_augment: bool = True
    """randomly mirror image and segmentation left-right during training"""
    calibrate: bool = True
    """fit a temperature on held-out images after training (LBFGS on one scalar)"""
    ece_bins: int = bounded(15, ge=1)
    """bins of the expected calibration error"""
    max_eval_pixels: int = 2_000_000
    """held-out pixels kept (random subsample) for the temperature fit and the reported metrics"""
    grad_clip: float = bounded(1.0, ge=0.0)
    """gradient norm clipping"""
    bf16: bool = True
    """bf16 autocast on CUDA devices (ignored on CPU)"""


# ------------------------------------------------------------------------------------------------ network
class _Block(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        groups = math.gcd(8, cout)
        self.net = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(groups, cout), nn.LeakyReLU(0.1, inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.GroupNorm(groups, cout), nn.LeakyReLU(0.1, inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class RewardUNet(nn.Module):
    """U-Net: (B, 1 + K, H, W) -> (B, 1, H, W) logits; any H, W (padded internally to a multiple of 2^(depth-1))."""

    def __init__(self, in_channels: int, features: int = 16, depth: int = 3):
        super().__init__()
        if depth < 1:
            raise ValueError("depth must be >= 1")
        chans = [features * 2 ** i for i in range(depth)]
        self.down = nn.ModuleList()
        c = in_channels
        for ch in chans:
            self.down.append(_Block(c, ch))
            c = ch
        self.up = nn.ModuleList()
        self.upconv = nn.ModuleList()
        for ch in reversed(chans[:-1]):
            self.upconv.append(nn.ConvTranspose2d(c, ch, 2, stride=2))
            self.up.append(_Block(2 * ch, ch))
            c = ch
        self.head = nn.Conv2d(c, 1, 1)
        self.multiple = 2 ** (depth - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ph = (-h) % self.multiple
        pw = (-w) % self.multiple
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        skips = []
        for i, blk in enumerate(self.down):
            if i > 0:
                x = F.max_pool2d(x, 2)
            x = blk(x)
            skips.append(x)
        for upc, blk, skip in zip(self.upconv, self.up, reversed(skips[:-1])):
            x = blk(torch.cat([upc(x), skip], dim=1))
        return self.head(x)[..., :h, :w]


def _normalize(images: torch.Tensor) -> torch.Tensor:
    """Per-image z-score of (B, 1, H, W) images (robust to raw 0..255 or already normalised input)."""
    mean = images.mean(dim=(-2, -1), keepdim=True)
    std = images.std(dim=(-2, -1), keepdim=True).clamp_min(1e-6)
    return (images - mean) / std


class RewardNet:
    """A trained reward network with its temperature.

    :param config: the :class:`RewardNetConfig` it was built with.
    :param network: the :class:`RewardUNet` (built from ``config`` when None).
    :param temperature: logits are divided by it before the sigmoid.
    :param device: where :meth:`score` runs.
    """

    def __init__(self, config: RewardNetConfig, network: RewardUNet | None = None, temperature: float = 1.0,
                 device: str | torch.device = "cpu", stats: dict | None = None):
        self.config = config
        self.device = torch.device(device)
        self.network = (network or RewardUNet(1 + config.num_classes, config.features, config.depth)).to(self.device)
        self.temperature = float(temperature)
        self.stats = dict(stats or {})

    # -- inference
    def _inputs(self, images: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        k = self.config.num_classes
        onehot = F.one_hot(actions.long().clamp(0, k - 1), k).permute(0, 3, 1, 2).to(images.dtype)
        return torch.cat([_normalize(images), onehot], dim=1)

    def logits(self, images: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Raw (uncalibrated) logits (B, H, W) float32 for images (B, 1, H, W) and actions (B, H, W); keeps grad."""
        x = self._inputs(images.float(), actions)
        use_bf16 = self.config.bf16 and x.device.type == "cuda"
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=use_bf16):
            out = self.network(x)
        return out[:, 0].float()

    @torch.no_grad()
    def score(self, images: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Per-pixel reward: probability that each pixel's label is right.

        This is the ``reward_fn`` of the PPO environment.

        :param images: (B, 1, H, W) float tensor (any intensity scale; z-scored per image inside).
        :param actions: (B, H, W) int64 label maps in 0..K-1.
        :returns: (B, H, W) float32 in [0, 1], on the device of ``images`` moved to the network's device.
        """
        was_training = self.network.training
        self.network.eval()
        try:
            images = images.to(self.device, non_blocking=True)
            actions = actions.to(self.device, non_blocking=True)
            return torch.sigmoid(self.logits(images, actions) / self.temperature)
        finally:
            self.network.train(was_training)

    __call__ = score

    def uncertainty_map(self, images: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """``1 - score``: (B, H, W) float32 in [0, 1], high where the label is probably wrong."""
        return 1.0 - self.score(images, actions)

    def score_numpy(self, images: np.ndarray, segs: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """:meth:`score` over numpy arrays in batches: images (N, 1, H, W), segs (N, H, W) -> (N, H, W) float32."""
        out = []
        for s in range(0, len(segs), batch_size):
            im = torch.from_numpy(np.ascontiguousarray(images[s : s + batch_size], dtype=np.float32))
            sg = torch.from_numpy(np.ascontiguousarray(segs[s : s + batch_size]).astype(np.int64))
            out.append(self.score(im, sg).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0,) + tuple(segs.shape[1:]), np.float32)

    # -- persistence
    def save(self, path: str | Path) -> None:
        """Write weights, config, temperature and stats to ``path`` atomically (a torch file)."""
        payload = {
            "format": "rl_adapt.engine.reward.network",
            "version": _FORMAT_VERSION,
            "config": to_dict(self.config),
            "state_dict": {k: v.detach().cpu() for k, v in self.network.state_dict().items()},
            "temperature": self.temperature,
            "stats": self.stats,
        }
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "RewardNet":
        """Load a network written by :meth:`save`.

        :raises InputError: missing file or not a reward-network file.
        """
        path = Path(path)
        if not path.is_file():
            raise InputError(path, "reward network file not found")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file
            raise InputError(path, f"not a readable reward network file ({exc})") from exc
        if not isinstance(payload, dict) or payload.get("format") != "rl_adapt.engine.reward.network":
            raise InputError(path, "not a reward network file written by rl_adapt")
        cfg = from_dict(RewardNetConfig, payload["config"], str(path))
        net = cls(cfg, temperature=payload["temperature"], device=device, stats=payload.get("stats"))
        net.network.load_state_dict(payload["state_dict"])
        net.network.eval()
        return net


# ------------------------------------------------------------------------------------------------ training
def _split_images(n: int, val_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image indices for (train, calibration, evaluation); the last two split the held-out part in halves.

    Fewer than 3 images, or ``val_fraction <= 0``: everything is training, nothing is held out.
    """
    perm = rng.permutation(n)
    if n < 3 or val_fraction <= 0:
        return np.sort(perm), perm[:0], perm[:0]
    n_val = min(max(2, int(round(n * val_fraction))), n - 1)
    half = n_val // 2
    return np.sort(perm[n_val:]), np.sort(perm[:half]), np.sort(perm[half:n_val])


def border_band(segs: torch.Tensor, px: int, num_classes: int) -> torch.Tensor:
    """Pixels within ``px`` pixels (Chebyshev distance) of a label change.

    :param segs: label maps (B, H, W), int64 in ``[0, num_classes)``.
    :returns: bool (B, H, W): True where another label occurs in the (2 px + 1)² window around the pixel.
    """
    onehot = F.one_hot(segs, num_classes).permute(0, 3, 1, 2).float()
    present = F.max_pool2d(onehot, kernel_size=2 * px + 1, stride=1, padding=px)
    return present.sum(1) > 1.5


def _batch(ds: RewardDataset, idx: np.ndarray, device: torch.device, flip: np.ndarray | None = None):
    im = torch.from_numpy(ds.images[ds.image_index[idx]])
    sg = torch.from_numpy(ds.segs[idx].astype(np.int64))
    tg = torch.from_numpy(ds.targets(idx).astype(np.float32))
    if flip is not None and flip.any():
        f = torch.from_numpy(flip)
        im[f] = im[f].flip(-1)
        sg[f] = sg[f].flip(-1)
        tg[f] = tg[f].flip(-1)
    return im.to(device), sg.to(device), tg.to(device)


@torch.no_grad()
def _collect_logits(net: RewardNet, ds: RewardDataset, pairs: np.ndarray, batch: int, max_pixels: int,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Held-out logits and targets (flattened, subsampled to at most ``max_pixels``)."""
    net.network.eval()
    logits, targets = [], []
    for s in range(0, len(pairs), batch):
        idx = pairs[s : s + batch]
        im, sg, tg = _batch(ds, idx, net.device)
        logits.append(net.logits(im, sg).cpu().numpy().ravel())
        targets.append(tg.cpu().numpy().ravel())
    lg = np.concatenate(logits) if logits else np.zeros(0, np.float32)
    tg = np.concatenate(targets) if targets else np.zeros(0, np.float32)
    if lg.size > max_pixels:
        keep = rng.choice(lg.size, size=max_pixels, replace=False)
        lg, tg = lg[keep], tg[keep]
    return lg.astype(np.float32), tg.astype(np.float32)


def fit_temperature(logits: np.ndarray, targets: np.ndarray, max_iter: int = 100) -> float:
    """Temperature T > 0 minimising the BCE of ``sigmoid(logits / T)`` (LBFGS on log T).

    :param logits: (P,) float raw logits; :param targets: (P,) 0/1.
    :returns: T (1.0 when the input is empty or has one class only).
    """
    if logits.size == 0 or targets.min() == targets.max():
        return 1.0
    lg = torch.from_numpy(np.asarray(logits, np.float32))
    tg = torch.from_numpy(np.asarray(targets, np.float32))
    log_t = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(lg / log_t.exp(), tg)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    if not math.isfinite(t) or t <= 0:
        return 1.0
    return min(max(t, 0.05), 20.0)


def train_reward_net(
    dataset: RewardDataset,
    cfg: RewardNetConfig | None = None,
    device: str | torch.device = "cpu",
    init: RewardNet | None = None,
    progress: bool = False,
    seed: int = 0,
    world: World = SINGLE,
) -> tuple[RewardNet, dict]:
    """Train (or refine, from ``init``) a reward network with per-pixel BCE, then calibrate it.

    Images are split (seeded) into train / calibration / evaluation parts; the temperature is fitted on
    the calibration part and ECE (``cfg.ece_bins`` bins, per pixel) and the AUROC of ``1 - reward`` as a
    detector of wrong pixels are reported on the evaluation part, before and after calibration.

    :param dataset: :class:`RewardDataset` from :func:`build_reward_dataset`.
    :param cfg: :class:`RewardNetConfig`.
    :param device: torch device.
    :param init: a previous :class:`RewardNet` whose weights are the starting point (its config must
        have the same architecture).
    :param progress: show a tqdm progress bar.
    :param seed: seed of the split, the batch order, the augmentation and the initial weights (the adaptation loop
        derives one per iteration from its master seed).
    :param world: a data-parallel job: ``cfg.batch_size`` pairs per rank, each rank its slice of every global batch,
        gradients averaged (every rank ends with the same network).
    :returns: ``(reward_net, stats)``; stats: train_loss, eval_loss, temperature, ece_before, ece_after,
        auroc, eval_error_rate, eval_mean_reward, n_pairs_* , steps, seconds.
    :raises TrainingDiverged: the loss became NaN/Inf.
    """
    cfg = cfg or RewardNetConfig()
    device = torch.device(device)
    t0 = time.time()
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    n_img = len(dataset.images)
    if len(dataset) == 0 or n_img == 0:
        raise InputError(None, "reward dataset is empty")
    train_img, cal_img, eval_img = _split_images(n_img, cfg.val_fraction, rng)
    train_pairs = np.flatnonzero(np.isin(dataset.image_index, train_img))
    cal_pairs = np.flatnonzero(np.isin(dataset.image_index, cal_img))
    eval_pairs = np.flatnonzero(np.isin(dataset.image_index, eval_img))
    if len(train_pairs) == 0:
        train_pairs = np.arange(len(dataset))

    if init is not None:
        if (init.config.features, init.config.depth, init.config.num_classes) != (cfg.features, cfg.depth, cfg.num_classes):
            raise InputError(None, "init reward network has a different architecture than the config")
        net = RewardNet(cfg, device=device)
        net.network.load_state_dict(init.network.state_dict())
    else:
        net = RewardNet(cfg, device=device)
    net.temperature = 1.0

    pos_weight = None
    if cfg.class_balanced:
        sample = train_pairs[rng.choice(len(train_pairs), size=min(len(train_pairs), 256), replace=False)]
        frac_right = float(dataset.targets(sample).mean())
        frac_right = min(max(frac_right, 1e-3), 1 - 1e-3)
        pos_weight = torch.tensor((1 - frac_right) / frac_right, device=device)

    opt = torch.optim.AdamW(net.network.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.steps >= 20:
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    else:  # OneCycleLR divides by zero when its warm-up rounds to one step (e.g. 10 steps): keep lr constant
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    net.network.train()
    batches = {"order": rng.permutation(train_pairs), "pos": 0}
    global_batch = cfg.batch_size * world.size
    mine = rank_slice(global_batch, world)

    def loss_at(step: int) -> torch.Tensor:
        if batches["pos"] + global_batch > len(batches["order"]):
            batches["order"], batches["pos"] = rng.permutation(train_pairs), 0
        idx = batches["order"][batches["pos"] : batches["pos"] + global_batch]
        batches["pos"] += global_batch
        if world.active and len(idx) < global_batch:  # fewer pairs than a global batch: repeat them
            idx = np.resize(idx, global_batch)
        flip = rng.random(len(idx)) < 0.5 if cfg.flip_augment else None
        if world.active:
            idx, flip = idx[mine], None if flip is None else flip[mine]
        im, sg, tg = _batch(dataset, idx, device, flip)
        weight = None
        if cfg.border_weight != 1.0:
            weight = 1.0 + (cfg.border_weight - 1.0) * border_band(sg, cfg.border_px, cfg.num_classes).float()
        return F.binary_cross_entropy_with_logits(net.logits(im, sg), tg, weight=weight, pos_weight=pos_weight)

    losses = fit(loss_at, opt, net.network.parameters(), cfg.steps, what="reward net", grad_clip=cfg.grad_clip,
                 scheduler=sched, progress=progress, world=world)
    net.network.eval()

    stats: dict = {
        "train_loss": float(np.mean(losses[-max(1, len(losses) // 10):])) if losses else float("nan"),
        "steps": int(cfg.steps),
        "n_images_train": int(len(train_img)),
        "n_images_cal": int(len(cal_img)),
        "n_images_eval": int(len(eval_img)),
        "n_pairs_train": int(len(train_pairs)),
    }
    # temperature on the calibration part
    if cfg.calibrate and len(cal_pairs):
        lg, tg = _collect_logits(net, dataset, cal_pairs, cfg.batch_size, cfg.max_eval_pixels, rng)
        net.temperature = fit_temperature(lg, tg)
    stats["temperature"] = float(net.temperature)
    # report on the evaluation part
    if len(eval_pairs):
        lg, tg = _collect_logits(net, dataset, eval_pairs, cfg.batch_size, cfg.max_eval_pixels, rng)
        p_raw = 1 / (1 + np.exp(-lg.astype(np.float64)))
        p_cal = 1 / (1 + np.exp(-lg.astype(np.float64) / net.temperature))
        before = error_detection_report(p_raw, tg > 0.5, cfg.ece_bins)
        after = error_detection_report(p_cal, tg > 0.5, cfg.ece_bins)
        eps = 1e-7
        stats.update({
            "eval_loss": float(-np.mean(tg * np.log(p_cal + eps) + (1 - tg) * np.log(1 - p_cal + eps))),
            "ece_before": before["ece"],
            "ece_after": after["ece"],
            "auroc": after["auroc"],
            "eval_error_rate": after["error_rate"],
            "eval_mean_reward": after["mean_reward"],
            "n_pairs_eval": int(len(eval_pairs)),
        })
    stats["seconds"] = float(time.time() - t0)
    net.stats = stats
    log.info("reward net: %s", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in stats.items()})
    return net, stats
