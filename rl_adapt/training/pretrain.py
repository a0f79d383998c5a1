"""Supervised pretraining of a source nnU-Net v2 2D model, written as an nnU-Net results folder.

Steps: nnU-Net's own planner (fingerprint + ``ExperimentPlanner``, 2D) on the raw dataset, optionally shrunk to
a small CPU plan (:func:`rl_adapt.policies.nnunet.shrink_plan`); nnU-Net preprocessing of every case; training of
the plan's network with nnU-Net's loss (soft Dice without background + cross-entropy, deep supervision weights
1/2^i) and echo-suitable augmentation (affine, gamma, brightness/contrast, noise, blur; no flips: apex-up and
the left/right layout of the chambers carry meaning); held-out Dice per structure in the input geometry;
export as ``OUT/<Dataset>/nnUNetTrainer__<Plans>__2d/fold_F/checkpoint_final.pth``.

Deterministic on CPU for a given seed and thread count; bf16 autocast on CUDA.
"""
from __future__ import annotations

import contextlib
import logging
import math
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from rl_adapt import distributed as dist
from rl_adapt.config import bounded, to_dict
from rl_adapt.devices import pick_device
from rl_adapt.engine.run_state import finished_record
from rl_adapt.errors import InputError
from rl_adapt.labels import STRUCTURE_NAMES
from rl_adapt.measures.metrics import dice_per_label
from rl_adapt.policies.inference import pad_to_min_size
from rl_adapt.policies.nnunet import plan_dataset, shrink_plan
from rl_adapt.training.loop import fit
from rl_adapt.data.readers import read_dataset
from rl_adapt.policies.nnunet import (_DATASET_RE, DEFAULT_TRAINER, NnUNetModel, build_network,
                                      export_model_folder)
from rl_adapt.preflight import check_output
from rl_adapt.training.pretrain_resume import (CHECKPOINT, PretrainCheckpoint, discard_if_empty, open_unfinished,
                                               remove_unfinished, save_checkpoint, unfinished_folder, what_it_trains)
import yaml
from torch.utils.tensorboard import SummaryWriter

log = logging.getLogger(__name__)

SMALL_PLANS_NAME = "nnUNetPlansSmall"
"""Plans name of a ``small`` plan (:func:`rl_adapt.policies.nnunet.shrink_plan`'s default)."""
SUMMARY_FILE = "pretrain_summary.json"
"""A finished run's record in its fold folder: held-out Dice, history, the settings it ran with."""
DEFAULT_PLANS_NAME = "nnUNetPlans"
"""Plans name of nnU-Net's own planner (``default`` plan)."""


@dataclass
class PlanConfig:
    """How the network and preprocessing are planned."""
    kind: Literal["small", "default"] = "small"
    """``default``: nnU-Net's 2D plan as its planner makes it; ``small``: that plan with the network below."""
    features: list[int] = bounded(default_factory=lambda: [16, 32, 64, 128, 128], ge=1)
    """Features per stage of the small plan (its length = number of stages)."""
    patch_size: list[int] = bounded(default_factory=lambda: [128, 128], ge=8)
    """Small plan patch size (rows, cols), divisible by 2**(stages-1)."""
    batch_size: int = bounded(12, ge=1)
    """Small plan batch size (the default plan keeps nnU-Net's)."""
    n_conv_per_stage: int = bounded(2, ge=1)
    """Convolutions per encoder stage (small plan)."""
    n_conv_per_stage_decoder: int = bounded(2, ge=1)
    """Convolutions per decoder stage (small plan)."""
    fit_median_to_patch: bool = True
    """Small plan: coarsen the target spacing so the median image fits one patch."""

@dataclass
class TrainConfig:
    """Optimisation schedule."""
    epochs: int = bounded(20, ge=1)
    """Training epochs."""
    iterations_per_epoch: int = bounded(0, ge=0)
    """Batches per epoch (nnU-Net: 250, whatever the dataset's size); 0 = one pass over the training cases, so that
    a smaller dataset gets fewer updates: every preset in ``configs/`` fixes it."""
    optimizer: Literal["sgd", "adamw"] = "adamw"
    """``sgd`` (nnU-Net: momentum 0.99, Nesterov) or ``adamw``; both with nnU-Net's poly decay."""
    lr: float = bounded(3e-3, gt=0, le=10)
    """Initial learning rate (nnU-Net's SGD uses 1e-2)."""
    weight_decay: float = bounded(3e-5, ge=0)
    """Weight decay."""
    momentum: float = bounded(0.99, ge=0, lt=1)
    """SGD momentum."""
    grad_clip: float = bounded(12.0, ge=0)
    """Gradient-norm clip (nnU-Net: 12)."""
    deep_supervision: bool = True
    """Train with nnU-Net's deep-supervision loss (the exported network has it off)."""
    seed: int = bounded(0, ge=0)
    """Seed of the split, initialisation, batches and augmentation."""
    val_fraction: float = bounded(0.1, ge=0, lt=1)
    """Fraction of patients held out for the reported Dice."""
    val_every: int = bounded(5, ge=1)
    """Held-out Dice every N epochs (and after the last)."""
    fold: int = bounded(0, ge=0)
    """Fold number of the written results folder."""
    checkpoint_every: int = bounded(1, ge=1)
    """Save the resume checkpoint every N epochs (and after the last): a killed run continues from it with
    ``--resume`` (:mod:`rl_adapt.training.pretrain_resume`)."""
    device: str = "auto"
    """``auto`` (CUDA if available), ``cpu``, ``cuda``, ``cuda:1``..."""
    bf16: bool = True
    """bf16 autocast on CUDA (ignored on CPU)."""
    channels_last: bool = False
    """channels_last memory format on CUDA."""
    num_threads: int = bounded(1, ge=0)
    """torch CPU threads (0 = leave torch's default). On a busy shared 2-core machine 1 thread was 8x faster
    than 2 (OpenMP oversubscription); raise it on an idle many-core machine."""


@dataclass
class AugmentConfig:
    """Echo-suitable augmentation, applied on the fly in torch (no flips)."""
    p_affine: float = bounded(0.7, ge=0, le=1)
    """Probability of a random rotation/scale/translation."""
    rotation_deg: float = bounded(15.0, ge=0, le=180)
    """Maximum absolute rotation in degrees."""
    scale: list[float] = bounded(default_factory=lambda: [0.85, 1.2], gt=0)
    """Zoom range (isotropic)."""
    translate: float = bounded(0.08, ge=0, le=1)
    """Maximum translation as a fraction of the patch."""
    p_gamma: float = bounded(0.3, ge=0, le=1)
    """Probability of a gamma change (on the image rescaled to [0, 1])."""
    gamma: list[float] = bounded(default_factory=lambda: [0.7, 1.5], gt=0)
    """Gamma range."""
    p_brightness: float = bounded(0.3, ge=0, le=1)
    """Probability of multiplicative brightness."""
    brightness: list[float] = bounded(default_factory=lambda: [0.75, 1.25], ge=0)
    """Brightness factor range."""
    p_contrast: float = bounded(0.3, ge=0, le=1)
    """Probability of a contrast change around the mean."""
    contrast: list[float] = bounded(default_factory=lambda: [0.75, 1.25], ge=0)
    """Contrast factor range."""
    p_noise: float = bounded(0.15, ge=0, le=1)
    """Probability of additive Gaussian noise."""
    noise_std: float = bounded(0.1, ge=0)
    """Maximum noise standard deviation (image units: z-scored)."""
    p_blur: float = bounded(0.15, ge=0, le=1)
    """Probability of Gaussian blur."""
    blur_sigma: list[float] = bounded(default_factory=lambda: [0.5, 1.0], gt=0)
    """Blur sigma range in pixels."""

    def __post_init__(self) -> None:
        for name in ("scale", "gamma", "brightness", "contrast", "blur_sigma"):
            pair = getattr(self, name)
            if len(pair) != 2 or pair[0] > pair[1]:
                raise ValueError(f"{name}: expected a range [low, high] with low <= high, got {list(pair)}")

@dataclass
class PretrainConfig:
    """``rl-adapt pretrain`` configuration (configs/pretrain_cpu.yaml, configs/pretrain_gpu.yaml)."""
    plan: PlanConfig = field(default_factory=PlanConfig)
    """Planning."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """Augmentation."""

@dataclass
class PretrainResult:
    """What a pretraining run produced."""
    model_dir: Path
    """The written nnU-Net model folder."""
    dice: dict[str, float]
    """Held-out mean Dice per structure (LV, MYO, LA) and ``mean``."""
    seconds: float
    """Wall time of the whole run."""
    n_train: int
    """Training cases."""
    n_val: int
    """Held-out cases."""
    history: list[dict] = field(default_factory=list)
    """Per-epoch records (loss, lr, seconds, dice when evaluated)."""

# ---------------------------------------------------------------------- data
def split_cases(cases: Sequence, val_fraction: float, seed: int) -> tuple[list, list]:
    """Split by patient (``meta["patient"]``, else case name), seeded; at least one case each side."""
    keys = sorted({(c.meta or {}).get("patient") or c.name for c in cases})
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(keys))
    n_val = int(round(len(keys) * val_fraction)) if val_fraction > 0 else 0
    if val_fraction > 0 and len(keys) > 1:
        n_val = min(max(n_val, 1), len(keys) - 1)
    val_keys = {keys[i] for i in order[:n_val]}
    train = [c for c in cases if ((c.meta or {}).get("patient") or c.name) not in val_keys]
    val = [c for c in cases if ((c.meta or {}).get("patient") or c.name) in val_keys]
    return train, val


def _prepare(model, cases) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Preprocess cases; pad each to at least the patch size. Returns images (1,h,w) and labels (h,w) int64."""
    images, labels = [], []
    for c in cases:
        data, seg, _ = model.preprocess_pair(c.image, c.label, c.spacing)
        seg = np.where(seg < 0, 0, seg)
        x, _ = pad_to_min_size(torch.from_numpy(data), model.patch_size, 0.0)
        y, _ = pad_to_min_size(torch.from_numpy(seg.astype(np.int64))[None], model.patch_size, 0)
        images.append(x.contiguous())
        labels.append(y[0].contiguous())
    return images, labels


def _batch(images, labels, idx, patch, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """Random patch-size crops of the chosen cases -> (B,1,P0,P1) float32, (B,P0,P1) int64."""
    xs, ys = [], []
    for i in idx:
        x, y = images[i], labels[i]
        h, w = x.shape[-2:]
        r = int(torch.randint(0, h - patch[0] + 1, (1,), generator=gen)) if h > patch[0] else 0
        c = int(torch.randint(0, w - patch[1] + 1, (1,), generator=gen)) if w > patch[1] else 0
        xs.append(x[:, r:r + patch[0], c:c + patch[1]])
        ys.append(y[r:r + patch[0], c:c + patch[1]])
    return torch.stack(xs), torch.stack(ys)


# ---------------------------------------------------------------------- augmentation
def _uniform(gen, n, lo, hi, device) -> torch.Tensor:
    return (torch.rand(n, generator=gen) * (hi - lo) + lo).to(device)


def _chosen(gen, n, p, device) -> torch.Tensor:
    return (torch.rand(n, generator=gen) < p).to(device)


def augment(x: torch.Tensor, y: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment a batch: ``x`` (B,1,H,W) float32, ``y`` (B,H,W) int64 -> same shapes.

    Random parameters are drawn from ``gen`` (CPU generator) so a seed replays the same batch.
    """
    b, dev = x.shape[0], x.device
    if cfg.p_affine > 0:
        on = _chosen(gen, b, cfg.p_affine, dev)
        ang = _uniform(gen, b, -cfg.rotation_deg, cfg.rotation_deg, dev) * math.pi / 180 * on
        scl = torch.where(on, _uniform(gen, b, cfg.scale[0], cfg.scale[1], dev), torch.ones(b, device=dev))
        tx = _uniform(gen, b, -cfg.translate, cfg.translate, dev) * 2 * on
        ty = _uniform(gen, b, -cfg.translate, cfg.translate, dev) * 2 * on
        cos, sin = torch.cos(ang) / scl, torch.sin(ang) / scl
        theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        y = F.grid_sample(y[:, None].float(), grid, mode="nearest", padding_mode="zeros",
                          align_corners=False)[:, 0].long()
    if cfg.p_brightness > 0:
        f = torch.where(_chosen(gen, b, cfg.p_brightness, dev), _uniform(gen, b, *cfg.brightness, dev),
                        torch.ones(b, device=dev))
        x = x * f.view(b, 1, 1, 1)
    if cfg.p_contrast > 0:
        f = torch.where(_chosen(gen, b, cfg.p_contrast, dev), _uniform(gen, b, *cfg.contrast, dev),
                        torch.ones(b, device=dev)).view(b, 1, 1, 1)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * f + mean
    if cfg.p_gamma > 0:
        on = _chosen(gen, b, cfg.p_gamma, dev)
        g = _uniform(gen, b, *cfg.gamma, dev)
        if bool(on.any()):
            lo = x.amin(dim=(1, 2, 3), keepdim=True)
            hi = x.amax(dim=(1, 2, 3), keepdim=True)
            rng = (hi - lo).clamp_min(1e-6)
            xg = ((x - lo) / rng).clamp(0, 1) ** g.view(b, 1, 1, 1) * rng + lo
            x = torch.where(on.view(b, 1, 1, 1), xg, x)
    if cfg.p_noise > 0:
        on = _chosen(gen, b, cfg.p_noise, dev)
        std = _uniform(gen, b, 0.0, cfg.noise_std, dev) * on
        noise = torch.randn(x.shape, generator=gen).to(dev)
        x = x + noise * std.view(b, 1, 1, 1)
    if cfg.p_blur > 0:
        on = _chosen(gen, b, cfg.p_blur, dev)
        sig = _uniform(gen, b, *cfg.blur_sigma, dev)
        for i in torch.nonzero(on).flatten().tolist():
            s = float(sig[i])
            rad = max(1, int(math.ceil(3 * s)))
            t = torch.arange(-rad, rad + 1, dtype=x.dtype, device=dev)
            k = torch.exp(-0.5 * (t / s) ** 2)
            k = k / k.sum()
            xi = F.conv2d(F.pad(x[i:i + 1], (rad, rad, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
            xi = F.conv2d(F.pad(xi, (0, 0, rad, rad), mode="replicate"), k.view(1, 1, -1, 1))
            x = torch.cat([x[:i], xi, x[i + 1:]])
    return x.contiguous(), y.contiguous()


# ---------------------------------------------------------------------- loss
def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, batch_dice: bool, smooth: float = 1e-5,
                   world: dist.World = dist.SINGLE) -> torch.Tensor:
    """nnU-Net's soft Dice loss (softmax, background excluded): ``-mean Dice`` over classes (and samples).

    :param logits: (B, K, H, W); :param target: (B, H, W) int64.
    :param world: a data-parallel job where each rank holds a slice of the global batch: with ``batch_dice`` the
        overlap sums are added over ranks (a collective that carries gradients), so every rank's loss is the
        global batch's; per-sample Dice needs no exchange (the ranks' gradients are averaged).
    """
    probs = torch.softmax(logits.float(), 1)[:, 1:]
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].float()
    axes = (0, 2, 3) if batch_dice else (2, 3)
    inter = (probs * onehot).sum(axes)
    denom = probs.sum(axes) + onehot.sum(axes)
    if batch_dice and world.active:
        inter, denom = dist.all_reduce_sum_with_grad(torch.stack([inter, denom]), world)
    dc = (2 * inter + smooth) / (denom + smooth).clamp_min(1e-8)
    return -dc.mean()


def dc_ce_loss(logits: torch.Tensor, target: torch.Tensor, batch_dice: bool,
               world: dist.World = dist.SINGLE) -> torch.Tensor:
    """Cross-entropy + soft Dice, weights 1:1 (nnU-Net's ``DC_and_CE_loss``); ``world`` as in :func:`soft_dice_loss`."""
    return F.cross_entropy(logits.float(), target) + soft_dice_loss(logits, target, batch_dice, world=world)


def deep_supervision_weights(n: int) -> list[float]:
    """nnU-Net's weights: 1/2^i, lowest resolution dropped, normalised to sum 1."""
    w = np.array([1 / (2 ** i) for i in range(n)])
    if n > 1:
        w[-1] = 0
    return (w / w.sum()).tolist()


def training_loss(outputs, target: torch.Tensor, batch_dice: bool, world: dist.World = dist.SINGLE) -> torch.Tensor:
    """Loss for one output (B,K,H,W) or a deep-supervision list (highest resolution first); ``world`` as in
    :func:`soft_dice_loss`."""
    if isinstance(outputs, torch.Tensor):
        return dc_ce_loss(outputs, target, batch_dice, world)
    weights = deep_supervision_weights(len(outputs))
    total = 0.0
    for w, out in zip(weights, outputs):
        if w == 0:
            continue
        t = target if out.shape[-2:] == target.shape[-2:] else \
            F.interpolate(target[:, None].float(), size=out.shape[-2:], mode="nearest")[:, 0].long()
        total = total + w * dc_ce_loss(out, t, batch_dice, world)
    return total


# ---------------------------------------------------------------------- metrics
def dice_per_structure(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """Dice of LV, MYO, LA for two (H, W) label maps (1.0 when a structure is absent from both)."""
    return dict(zip(STRUCTURE_NAMES, dice_per_label(pred, gt, tuple(STRUCTURE_NAMES.values()))))


def evaluate_dice(model, cases) -> dict[str, float]:
    """Mean held-out Dice per structure and overall ``mean``, predicted in the input geometry."""
    if not cases:
        return {}
    scores = [dice_per_structure(model.predict(c.image, c.spacing), c.label) for c in cases]
    out = {k: float(np.mean([s[k] for s in scores])) for k in STRUCTURE_NAMES}
    out["mean"] = float(np.mean([out[k] for k in STRUCTURE_NAMES]))
    return out


# ---------------------------------------------------------------------- driver
def make_plans(data_dir: str | Path, cfg: PlanConfig) -> tuple[dict, dict, dict]:
    """nnU-Net's 2D plan for the raw dataset, shrunk when ``cfg.kind == "small"``."""
    plans, dataset_json, fingerprint = plan_dataset(data_dir)
    if cfg.kind == "small":
        plans = shrink_plan(plans, cfg.features, cfg.patch_size, cfg.batch_size, cfg.n_conv_per_stage,
                            cfg.n_conv_per_stage_decoder, cfg.fit_median_to_patch)
    return plans, dataset_json, fingerprint


def fold_folder(data_dir: str | Path, out_dir: str | Path, cfg: PretrainConfig) -> Path:
    """The fold folder :func:`pretrain` writes, known before planning:
    ``out_dir/<Dataset>/nnUNetTrainer__<Plans>__2d/fold_<fold>`` (the dataset named as :func:`plan_dataset` names
    it, the plans as the plan kind does)."""
    raw = Path(data_dir).resolve()
    name = raw.name if _DATASET_RE.match(raw.name) else "Dataset999_" + re.sub(r"[^A-Za-z0-9]", "", raw.name or "data")
    plans_name = SMALL_PLANS_NAME if cfg.plan.kind == "small" else DEFAULT_PLANS_NAME
    return Path(out_dir) / name / f"{DEFAULT_TRAINER}__{plans_name}__2d" / f"fold_{cfg.train.fold}"


def pretrain(data_dir: str | Path, out_dir: str | Path, cfg: PretrainConfig, progress: bool = True,
             resume: bool = False) -> PretrainResult:
    """Plan, train and export a source model; see the module docstring.

    :param data_dir: nnU-Net raw dataset (dataset.json, imagesTr, labelsTr).
    :param out_dir: results root (new, or an existing nnUNet_results-style root); the model folder is
        ``out_dir/<Dataset>/nnUNetTrainer__<Plans>__2d``.
    :param resume: continue the unfinished run of this model under ``out_dir`` from its last epoch checkpoint
        (:mod:`rl_adapt.training.pretrain_resume`); without one, start a new run; a model folder this run finished
        with the same settings: its result, nothing redone.
    :raises InputError: bad dataset, an output that touches the dataset or cannot be written, the target fold
        already exists (all checked before planning), or an unfinished run of this model exists without ``resume``.
    :raises RLAdaptError: ``resume`` of a run started (or finished) with other settings.

    Under ``torchrun`` (see :mod:`rl_adapt.distributed`) every rank draws the same global batch of
    ``world.size x batch_size`` crops (the same permutation, crops and augmentation) and trains on its slice, the
    batch Dice summed over ranks and the gradients averaged, so the ranks take the steps one process would take
    with the global batch; rank 0 validates and exports.
    """
    t0 = time.time()
    tc = cfg.train
    world = dist.current()
    out_is_new = not Path(out_dir).exists()
    dist.on_main(lambda: check_output(out_dir, {"--data": data_dir}, may_exist=True, command="rl-adapt pretrain"),
                 world)
    target = fold_folder(data_dir, out_dir, cfg)
    settings = {"config": to_dict(cfg), "data": str(Path(data_dir).resolve()), "processes": world.size}
    if target.exists() and resume and (target / SUMMARY_FILE).is_file():
        return _finished(target, finished_record(target / SUMMARY_FILE, what_it_trains(settings), "pretraining"))
    if target.exists():
        raise InputError(target, "already exists; choose another --out")
    if not resume:  # refuse a run over an unfinished one before planning (minutes on a large dataset)
        guess = unfinished_folder(out_dir, target.parent.parent.name, target.parent.name, tc.fold)
        dist.on_main(lambda: open_unfinished(guess, {"config": to_dict(cfg)}, resume=False), world)
    device = pick_device(dist.device_of(world, tc.device))
    if tc.num_threads > 0:
        torch.set_num_threads(tc.num_threads)
    plans, dataset_json, fingerprint = make_plans(data_dir, cfg.plan)
    model = NnUNetModel.from_plans(plans, dataset_json, device="cpu", seed=tc.seed, mirror_axes=None)
    planned = Path(out_dir) / model.dataset_name / f"{DEFAULT_TRAINER}__{model.plans_name}__2d" / f"fold_{tc.fold}"
    if planned.exists():  # fold_folder guessed another name than the planner gave
        raise InputError(planned, "already exists; choose another --out")

    cases = [c for c in read_dataset(data_dir, fmt="nnunet") if c.label is not None]
    if len(cases) < 2:
        raise InputError(data_dir, f"need at least 2 labelled cases, found {len(cases)}")
    train_cases, val_cases = split_cases(cases, tc.val_fraction, tc.seed)
    log.info("pretrain: %d training / %d held-out cases; plan %s, patch %s, spacing %s", len(train_cases),
             len(val_cases), model.plans_name, model.patch_size, model.spacing)
    work = unfinished_folder(out_dir, model.dataset_name, planned.parent.name, tc.fold)
    resuming = dist.on_main(lambda: open_unfinished(work, settings, resume) is not None, world)
    ckpt = PretrainCheckpoint.load(work / CHECKPOINT) if resuming else None  # every rank reads it
    try:
        return _train(model, dataset_json, fingerprint, train_cases, val_cases, cfg, data_dir, out_dir, work,
                      settings, ckpt, device, world, progress, t0)
    except BaseException:
        if world.main:  # a run that failed before its first checkpoint leaves nothing behind
            discard_if_empty(work)
            if out_is_new and Path(out_dir).is_dir() and not any(Path(out_dir).iterdir()):
                Path(out_dir).rmdir()
        raise


def _train(model: NnUNetModel, dataset_json: dict, fingerprint: dict, train_cases: list, val_cases: list,
           cfg: PretrainConfig, data_dir: str | Path, out_dir: str | Path, work: Path, settings: dict,
           ckpt: PretrainCheckpoint | None, device: torch.device, world: dist.World, progress: bool,
           t0: float) -> PretrainResult:
    """Train from scratch or from ``ckpt``, checkpoint into ``work``, export, remove ``work``; see :func:`pretrain`."""
    tc = cfg.train
    images, labels = _prepare(model, train_cases)

    torch.manual_seed(tc.seed)
    net = build_network(model.plans_manager, model.configuration_manager, dataset_json,
                        deep_supervision=tc.deep_supervision)
    net.load_state_dict(model.network.state_dict())
    dist.broadcast_module(net, world)  # the same start on every rank, whatever their seeds did
    net = net.to(device)
    if device.type == "cuda" and tc.channels_last:
        net = net.to(memory_format=torch.channels_last)
    batch_size = int(model.configuration_manager.batch_size) * world.size  # the global batch
    mine = dist.rank_slice(batch_size, world)  # this rank's part of it
    batch_dice = bool(model.configuration_manager.batch_dice)
    iters = tc.iterations_per_epoch or max(1, math.ceil(len(images) / batch_size))
    total_steps = tc.epochs * iters
    if tc.optimizer == "sgd":
        opt = torch.optim.SGD(net.parameters(), lr=tc.lr, momentum=tc.momentum, nesterov=True,
                              weight_decay=tc.weight_decay)
    else:
        opt = torch.optim.AdamW(net.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    gen = torch.Generator().manual_seed(tc.seed)
    use_bf16 = device.type == "cuda" and tc.bf16
    history: list[dict] = []
    dice: dict[str, float] = {}
    start, seconds_before = 0, 0.0
    if ckpt is not None:
        net.load_state_dict(ckpt.network)
        opt.load_state_dict(ckpt.optimizer)
        gen.set_state(ckpt.generator)
        torch.set_rng_state(ckpt.torch_rng)
        history, dice, start, seconds_before = list(ckpt.history), dict(ckpt.dice), ckpt.epochs_done, ckpt.seconds
        log.info("pretrain: continuing after epoch %d/%d", start, tc.epochs)

    with contextlib.ExitStack() as stack:
        # rank 0 logs into the unfinished folder (a resume appends; purge_step hides what an interrupted epoch logged
        # after the checkpoint); the other ranks' writers go to a temporary folder; closing() stops the writer's
        # thread, also on Ctrl-C or an error mid-training
        tb_dir = work / "tensorboard" if world.main else Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="rl_adapt_tb_")))
        writer = stack.enter_context(contextlib.closing(
            SummaryWriter(str(tb_dir), purge_step=start * iters + 1 if start else None)))
        for epoch in range(start, tc.epochs):
            net.train()
            te = time.time()
            perm = torch.randperm(len(images), generator=gen)
            first = epoch * iters  # optimizer steps before this epoch

            def loss_at(it: int, perm: torch.Tensor = perm) -> torch.Tensor:
                start = (it * batch_size) % len(images)
                idx = perm[start:start + batch_size].tolist()
                if len(idx) < batch_size:
                    idx += perm[:batch_size - len(idx)].tolist()
                x, y = _batch(images, labels, idx, model.patch_size, gen)
                x, y = augment(x, y, cfg.augment, gen)
                x, y = x[mine].to(device, non_blocking=True), y[mine].to(device, non_blocking=True)
                if device.type == "cuda" and tc.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
                    out = net(x)
                return training_loss(out, y, batch_dice, world)

            def lr_at(it: int, first: int = first) -> float:  # nnU-Net's poly decay over all steps
                return tc.lr * (1 - (first + it) / total_steps) ** 0.9

            losses = fit(loss_at, opt, net.parameters(), iters, what=f"epoch {epoch + 1}/{tc.epochs}",
                         grad_clip=tc.grad_clip, lr_at=lr_at, progress=progress, postfix_every=1,
                         on_step=lambda it, v, first=first: writer.add_scalar("train/loss", v, first + it + 1),
                         world=world)
            lr = lr_at(iters - 1)
            rec = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "lr": lr, "seconds": time.time() - te}
            if val_cases and ((epoch + 1) % max(1, tc.val_every) == 0 or epoch + 1 == tc.epochs):
                model.networks[0].load_state_dict(net.state_dict())
                model.networks[0].to(device)
                model.device = device
                dice = dist.on_main(lambda: evaluate_dice(model, val_cases), world)
                rec["dice"] = dice
                for k, v in dice.items():
                    writer.add_scalar(f"val/dice_{k}", v, epoch + 1)
            history.append(rec)
            writer.add_scalar("train/epoch_loss", rec["loss"], epoch + 1)
            writer.add_scalar("train/lr", lr, epoch + 1)
            log.info("epoch %d/%d loss %.4f (%.1fs)%s", epoch + 1, tc.epochs, rec["loss"], rec["seconds"],
                     f" held-out Dice {dice.get('mean', float('nan')):.3f}" if "dice" in rec else "")
            if (epoch + 1) % tc.checkpoint_every == 0 or epoch + 1 == tc.epochs:
                writer.flush()
                state = PretrainCheckpoint(
                    epochs_done=epoch + 1, network={k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
                    optimizer=opt.state_dict(), generator=gen.get_state(), torch_rng=torch.get_rng_state(),
                    history=list(history), dice=dict(dice), seconds=seconds_before + time.time() - t0)
                dist.on_main(lambda: save_checkpoint(work, state, settings), world)
        writer.close()
        seconds = seconds_before + time.time() - t0  # every process of the run, up to the checkpoint resumed from
        summary = {"dice_heldout": dice, "seconds": seconds, "n_train": len(train_cases), "n_val": len(val_cases),
                   "val_cases": [c.name for c in val_cases], "history": history, "config": to_dict(cfg),
                   "processes": world.size,
                   "device": str(device), "data": str(data_dir), "settings": what_it_trains(settings)}
        fold = f"fold_{tc.fold}"

        extra = {"dataset_fingerprint.json": fingerprint, f"{fold}/{SUMMARY_FILE}": summary,
                 f"{fold}/pretrain_config.yaml": yaml.safe_dump(to_dict(cfg), sort_keys=False),
                 f"{fold}/tensorboard": Path(tb_dir)}
        net_cpu = net.to("cpu")
        model_dir = dist.on_main(lambda: export_model_folder(
            net_cpu.state_dict(), model, out_dir, fold=tc.fold, mirror_axes=None,
            extra_meta={"epochs": tc.epochs, "source": "rl-adapt pretrain", "dice_heldout": dice},
            extra_files=extra), world)
    dist.on_main(lambda: remove_unfinished(work), world)
    return PretrainResult(model_dir=model_dir, dice=dice, seconds=seconds, n_train=len(train_cases),
                          n_val=len(val_cases), history=history)



def _finished(fold_dir: Path, record: dict) -> PretrainResult:
    """The result of the pretraining that finished in ``fold_dir`` (``record``: its :data:`SUMMARY_FILE`)."""
    return PretrainResult(model_dir=fold_dir.parent, dice=dict(record.get("dice_heldout") or {}),
                          seconds=float(record.get("seconds", 0.0)), n_train=int(record.get("n_train", 0)),
                          n_val=int(record.get("n_val", 0)), history=list(record.get("history", [])))

__all__ = ["PretrainConfig", "PlanConfig", "TrainConfig", "AugmentConfig", "PretrainResult", "pretrain",
           "augment", "training_loss", "dice_per_structure", "evaluate_dice", "split_cases", "make_plans",
           ]
