"""Adaptation baselines on unlabelled target images: TENT, entropy minimisation, pseudo-labels, styled source.

All of them start from a source nnU-Net model, work on the target images as network patches
(:meth:`NnUNetModel.to_patch`: nnU-Net preprocessing, then centre pad/crop to the patch size), share one
set of budget knobs (:class:`BaselineConfig`) and write a new nnU-Net results folder that
``rl-adapt evaluate`` scores like any model:

* ``tent`` (Wang et al., ICLR 2021): minimise the mean per-pixel Shannon entropy of the softmax, updating
  only the affine weights and biases of the normalisation layers. nnU-Net uses InstanceNorm with affine
  parameters and no running statistics, so there are no statistics to re-estimate: the affine parameters
  are the whole adaptation.
* ``entropy``: the same loss, every parameter trainable (prone to collapse; reported as a control).
* ``pseudo-label``: self-training. Each round freezes a copy of the current network, labels every target
  pixel with its argmax where the softmax probability is at least ``confidence``, then trains ``steps``
  steps of cross-entropy on those pixels only (unconfident pixels are ignored).
* ``styled-source``: supervised fine-tuning of the whole network on the labelled source images, a fraction of
  them restyled toward the target's look estimated from the unlabelled target images
  (:mod:`rl_adapt.training.styled_source`), with nnU-Net's loss (soft Dice + cross-entropy) and the pretraining
  augmentation. Needs the source data (``--source-data``); no target label is read.

Same config and seed give the same weights (batches are drawn from a seeded ``torch.Generator``).
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rl_adapt.errors import InputError
from rl_adapt.config import bounded, bounds_problem, save_config, to_dict
from rl_adapt.data.readers import read_dataset
from rl_adapt.evaluation.inputs import load_model
from rl_adapt.harmonize import FILE_NAME as HARMONIZATION_FILE
from rl_adapt.harmonize import Harmonizer, HarmonizeConfig, fit_harmonizer
from rl_adapt.engine.run_state import finished_record, without_keys
from rl_adapt.engine.stages import Stages, kept_stages
from rl_adapt.io_utils import atomic_dir, save_torch, write_json_atomic
from rl_adapt.policies.nnunet import export_model_folder
from rl_adapt.preflight import check_device, check_output
from rl_adapt.training.finetune import FineTuneConfig, fine_tune, index_batches
from rl_adapt.training.loop import fit
from rl_adapt.training.pretrain import AugmentConfig
from rl_adapt.training.styled_source import StyledPairs, StyledSourceConfig, restyling_record, styled_source_pairs

log = logging.getLogger(__name__)

TARGET_METHODS: tuple[str, ...] = ("tent", "entropy", "pseudo-label")
"""The baselines that train on the target images alone (:func:`adapt_network`)."""
SOURCE_METHODS: tuple[str, ...] = ("styled-source", "harmonize")
"""The baselines that need the labelled source dataset (``--source-data``)."""
METHODS: tuple[str, ...] = (*TARGET_METHODS, *SOURCE_METHODS)
"""Baseline names accepted by :class:`BaselineConfig.method` and ``rl-adapt baseline --method``."""

IGNORE = -1
"""Pseudo-label value of pixels below the confidence threshold (ignored by the loss)."""


@dataclass
class BaselineConfig:
    """Budget and optimiser of a test-time adaptation baseline (the same knobs for every method)."""
    method: Literal["tent", "entropy", "pseudo-label", "styled-source", "harmonize"] = "tent"
    """Which baseline: tent (norm affine only), entropy (whole network), pseudo-label (self-training),
    styled-source (supervised fine-tuning on source images restyled toward the target; needs --source-data),
    harmonize (the source weights unchanged, with the target -> source image map of :mod:`rl_adapt.harmonize`
    stored beside them; needs --source-data)."""
    rounds: int = bounded(1, ge=1)
    """Rounds; pseudo-label re-labels the target set with the current network at the start of each round.
    tent/entropy simply run rounds * steps steps."""
    steps: int = bounded(100, ge=0)
    """Optimiser steps per round."""
    batch_size: int = bounded(8, ge=1)
    """Target patches per step."""
    lr: float = bounded(1e-4, gt=0, le=10)
    """Learning rate."""
    optimizer: Literal["adam", "sgd"] = "adam"
    """Optimiser: Adam (betas 0.9/0.999) or SGD with Nesterov momentum."""
    momentum: float = bounded(0.9, ge=0, lt=1)
    """SGD momentum (ignored by Adam)."""
    weight_decay: float = bounded(0.0, ge=0)
    """L2 weight decay."""
    grad_clip: float = bounded(12.0, ge=0)
    """Gradient norm clipping (0: off)."""
    confidence: float = bounded(0.9, ge=0, le=1)
    """pseudo-label: minimum softmax probability of the argmax class for a pixel to be trained on."""
    max_images: int = bounded(0, ge=0)
    """Use at most this many target images, chosen with the seed (0: all)."""
    seed: int = bounded(0, ge=0)
    """Seed of batch sampling, image subsetting and torch."""
    device: str = "cpu"
    """Torch device ("cpu", "cuda")."""
    threads: int = bounded(1, ge=0)
    """torch CPU threads (0: leave torch's default)."""
    styled: StyledSourceConfig = field(default_factory=StyledSourceConfig)
    """styled-source: which source images are restyled, and how."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """styled-source: the augmentation of the supervised batches (the pretraining one by default)."""
    harmonize: HarmonizeConfig = field(default_factory=HarmonizeConfig)
    """harmonize: the steps of the image map (``when`` is ignored: the method is the map)."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        problem = bounds_problem(self, "BaselineConfig")  # configs built in code; loaded ones are checked on load
        if problem:
            raise ValueError(problem)


# --------------------------------------------------------------------------------------------- pieces
NORM_TYPES: tuple[type[nn.Module], ...] = (nn.modules.instancenorm._InstanceNorm, nn.modules.batchnorm._BatchNorm,
                                          nn.GroupNorm, nn.LayerNorm)
"""Normalisation layers whose affine parameters TENT adapts."""


def norm_parameters(network: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every normalisation layer's affine weight and bias, in module order."""
    out = []
    for mname, module in network.named_modules():
        if isinstance(module, NORM_TYPES):
            for pname, p in module.named_parameters(recurse=False):
                out.append((f"{mname}.{pname}" if mname else pname, p))
    return out


def trainable_parameters(network: nn.Module, method: str) -> list[nn.Parameter]:
    """Set ``requires_grad`` for ``method`` and return the parameters to optimise.

    tent: only normalisation affine parameters (every other parameter frozen); entropy / pseudo-label: all.
    :raises InputError: tent on a network without affine normalisation layers.
    """
    if method == "tent":
        params = [p for _, p in norm_parameters(network)]
        if not params:
            raise InputError(None, "TENT needs normalisation layers with affine parameters; this network has none")
        keep = {id(p) for p in params}
        for p in network.parameters():
            p.requires_grad_(id(p) in keep)
        return params
    for p in network.parameters():
        p.requires_grad_(True)
    return list(network.parameters())


def logits_of(network: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Full-resolution logits ``(B, K, H, W)`` (first output when the network returns deep-supervision lists)."""
    out = network(x)
    if isinstance(out, (list, tuple)):
        out = out[0]
    return out


def entropy_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean per-pixel Shannon entropy (nats) of ``softmax(logits)``; logits ``(B, K, H, W)`` -> scalar."""
    logp = F.log_softmax(logits.float(), dim=1)
    return -(logp.exp() * logp).sum(dim=1).mean()


@torch.no_grad()
def pseudo_labels(network: nn.Module, patches: torch.Tensor, confidence: float, batch_size: int = 8
                  ) -> torch.Tensor:
    """Argmax labels of ``network`` on ``patches`` ``(N, 1, H, W)``; :data:`IGNORE` where max prob < confidence.

    :returns: ``(N, H, W)`` int64 on the device of ``patches``.
    """
    was_training = network.training
    network.eval()
    out = []
    for i in range(0, patches.shape[0], batch_size):
        prob = torch.softmax(logits_of(network, patches[i:i + batch_size]).float(), dim=1)
        conf, lab = prob.max(dim=1)
        lab[conf < confidence] = IGNORE
        out.append(lab)
    network.train(was_training)
    return torch.cat(out) if out else torch.empty((0,) + tuple(patches.shape[2:]), dtype=torch.long)


def pseudo_label_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over pixels whose target is not :data:`IGNORE`; 0 (with grad) when there are none."""
    if not bool((targets != IGNORE).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE)


def _optimizer(params: Sequence[nn.Parameter], cfg: BaselineConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
                               weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def adapt_network(network: nn.Module, patches: torch.Tensor | np.ndarray, cfg: BaselineConfig,
                  progress: bool = True) -> list[dict]:
    """Adapt ``network`` in place on target ``patches`` with the method of ``cfg``.

    :param network: segmentation network returning logits ``(B, K, H, W)``.
    :param patches: ``(N, 1, H, W)`` float32 preprocessed target patches.
    :returns: history, one dict per step: ``{"round", "step", "loss", "confident"}`` (``confident`` =
        fraction of pseudo-labelled pixels in the round; NaN for tent/entropy).
    :raises TrainingDiverged: a loss became NaN/Inf.
    :raises ValueError: ``cfg.method`` is not one of :data:`TARGET_METHODS`.
    """
    if cfg.method not in TARGET_METHODS:
        raise ValueError(f"adapt_network runs {TARGET_METHODS}, not {cfg.method!r} (see fine_tune_supervised)")

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    x_all = torch.as_tensor(np.asarray(patches, dtype=np.float32) if not torch.is_tensor(patches) else patches)
    x_all = x_all.float().to(device)
    if x_all.ndim != 4 or x_all.shape[0] == 0:
        raise InputError(None, f"expected target patches (N, C, H, W) with N > 0, got {tuple(x_all.shape)}")
    network.to(device)
    params = trainable_parameters(network, cfg.method)
    opt = _optimizer(params, cfg)
    history: list[dict] = []
    for rnd in range(cfg.rounds):
        targets, confident = None, float("nan")
        if cfg.method == "pseudo-label":
            targets = pseudo_labels(network, x_all, cfg.confidence, cfg.batch_size)
            confident = float((targets != IGNORE).float().mean())
            log.info("round %d: %.1f%% of target pixels pseudo-labelled", rnd, 100 * confident)
        network.train()
        stream = index_batches(x_all.shape[0], cfg.batch_size, gen)

        def loss_at(step: int, stream=stream, targets=targets) -> torch.Tensor:
            idx = next(stream).to(device)
            logits = logits_of(network, x_all[idx])
            return entropy_loss(logits) if targets is None else pseudo_label_loss(logits, targets[idx])

        losses = fit(loss_at, opt, params, cfg.steps, what=f"baseline {cfg.method}, round {rnd + 1}/{cfg.rounds}",
                     grad_clip=cfg.grad_clip, progress=progress, postfix_every=1)
        history += [{"round": rnd, "step": step, "loss": v, "confident": confident} for step, v in enumerate(losses)]
    for p in network.parameters():
        p.requires_grad_(True)
    network.eval()
    return history


def fine_tune_supervised(network: nn.Module, pairs: StyledPairs, cfg: BaselineConfig, progress: bool = True
                         ) -> list[dict]:
    """Fine-tune every parameter of ``network`` in place on labelled ``pairs`` with nnU-Net's loss (soft Dice +
    cross-entropy) and ``cfg.augment``, ``cfg.rounds * cfg.steps`` steps of ``cfg.batch_size``
    (:func:`rl_adapt.training.finetune.fine_tune` with the baseline's optimizer).

    :returns: history, one dict per step: ``{"step", "loss"}``.
    """
    budget = FineTuneConfig(steps=cfg.rounds * cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
                            weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip, augment=cfg.augment)
    losses = fine_tune(network, pairs.images, pairs.labels, budget, seed=cfg.seed, device=cfg.device,
                       what="baseline styled-source", progress=progress,
                       make_optimizer=lambda params: _optimizer(params, cfg))
    return [{"step": i, "loss": v} for i, v in enumerate(losses)]


# --------------------------------------------------------------------------------------------- end to end
def target_patches(model, cases, max_images: int = 0, seed: int = 0) -> np.ndarray:
    """Stack ``model.to_patch`` of each case: ``(N, 1, P0, P1)`` float32 (a seeded subset if ``max_images``)."""
    cases = list(cases)
    if max_images and len(cases) > max_images:
        keep = np.sort(np.random.default_rng(seed).choice(len(cases), size=max_images, replace=False))
        cases = [cases[i] for i in keep]
    return np.stack([np.asarray(model.to_patch(c.image, c.spacing)[0], dtype=np.float32) for c in cases])


UNFINISHED = "unfinished"
"""The folder inside ``OUT`` where an unfinished baseline keeps its finished stages (``state.json``, the restyled
pairs, the trained weights) until the model folder is written; ``--resume`` continues from it."""
HISTORY_FILE = "baseline_history.json"
"""A finished baseline's record: its figures, its model folder, the settings it ran with."""
WHERE_IT_RUNS = ("cfg.device", "cfg.threads")
"""Settings a finished baseline's record leaves out: a requeued ``--resume`` may run elsewhere."""


@dataclass
class TrainedWeights:
    """The training stage's result: the adapted network's weights and the loss history."""
    state: dict[str, torch.Tensor]
    """The network's state dict (CPU tensors)."""
    history: list[dict]
    """One dict per step: ``{"step", "loss"}`` (and ``round`` for pseudo-labels)."""

    def save(self, path: Path) -> None:
        """Write both to ``path`` atomically."""
        save_torch(path, {"state": self.state, "history": self.history})

    @classmethod
    def load(cls, path: Path) -> "TrainedWeights":
        """Read what :meth:`save` wrote (on the CPU)."""
        data = torch.load(path, map_location="cpu", weights_only=False)
        return cls(state=data["state"], history=data["history"])


def run_baseline(model_dir: str | Path, target: str | Path, out_dir: str | Path, cfg: BaselineConfig,
                 progress: bool = True, source_data: str | Path | None = None, resume: bool = False) -> Path:
    """Adapt the source model in ``model_dir`` to the unlabelled images in ``target``; write a new model folder.

    ``out_dir`` holds ``baseline_config.yaml``, ``baseline_history.json`` and the nnU-Net results folder
    written by ``export_model_folder`` (``out_dir/<Dataset>/nnUNetTrainer__<Plans>__2d``, returned), all written
    together at the end (a temporary sibling renamed onto ``out_dir``). Until then ``out_dir/unfinished/`` keeps the
    finished stages (the restyled source pairs with the scanner fit, the trained weights;
    :mod:`rl_adapt.engine.stages`), so a killed run continues with ``resume`` and loses no finished stage. The source
    folder is only read.

    :param source_data: the labelled source dataset (``styled-source`` and ``harmonize``).
    :param resume: continue the unfinished run in ``out_dir`` (same inputs and config); a new run if there is none;
        the model folder of a run that finished there with the same settings, nothing redone.
    :raises InputError: unloadable model, empty/unreadable target, ``out_dir`` already exists without ``resume`` (or
        is, is inside or holds an input, or cannot be written), a source method without source data, unavailable
        device.
    :raises RLAdaptError: ``resume`` with other inputs or config than the unfinished or finished run's (the keys are
        named).
    """
    inputs = {"--model": model_dir, "--target": target, "--source-data": source_data}
    settings = {"cfg": to_dict(cfg), "inputs": {k: None if v is None else str(Path(v).resolve()) for k, v in
                                                (("model_dir", model_dir), ("target_dir", target),
                                                 ("source_data", source_data))}}
    if resume and (Path(out_dir) / HISTORY_FILE).is_file():
        record = finished_record(Path(out_dir) / HISTORY_FILE, without_keys(settings, WHERE_IT_RUNS), "baseline")
        return _finished_model_folder(Path(out_dir), record)
    out_dir = check_output(out_dir, inputs, may_exist=resume, earlier_output=(UNFINISHED,),
                           command="rl-adapt baseline",
                           exists_hint="choose a new output folder (models are never overwritten), or pass --resume "
                                       "to continue an interrupted run in it")
    if cfg.method in SOURCE_METHODS and source_data is None:
        raise InputError(None, f"the {cfg.method} baseline needs the labelled source data (--source-data DIR)")
    check_device(cfg.device)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    model = load_model(model_dir, cfg.device)
    if model.harmonizer is not None:
        raise InputError(model_dir, f"carries {HARMONIZATION_FILE} (an adapted model): adapt from the original source "
                                    "model folder")
    cases = read_dataset(target, with_labels=False, progress=progress)
    if not cases:
        raise InputError(target, "no target images found")
    with kept_stages(out_dir, out_dir / UNFINISHED, settings, "baseline") as stages:
        folder = _run_stages(model, cases, target, out_dir, cfg, stages, progress, model_dir, source_data,
                             settings)
    log.info("baseline model written to %s", folder)
    return folder


def _finished_model_folder(out_dir: Path, record: dict) -> Path:
    """The model folder of the finished baseline in ``out_dir`` (``record``: its :data:`HISTORY_FILE`)."""
    folder = out_dir / str(record.get("model_folder", ""))
    if not record.get("model_folder") or not (folder / "plans.json").is_file():
        raise InputError(out_dir, "this baseline has finished, but its model folder is missing")
    log.info("baseline model in %s", folder)
    return folder


def _run_stages(model, cases, target, out_dir: Path, cfg: BaselineConfig, stages: Stages, progress: bool,
                model_dir, source_data, settings: dict) -> Path:
    """The stages of :func:`run_baseline` (each skipped when an earlier process finished it), then the export."""
    network = copy.deepcopy(model.network)
    extra, harmonizer, history = {}, None, []
    if cfg.method == "harmonize":
        def fit_map():
            source = read_dataset(source_data, with_labels=False, progress=progress)
            return fit_harmonizer([c.image for c in source], [c.image for c in cases], cfg.harmonize), {}

        harmonizer = stages.run("harmonize", out_dir / UNFINISHED / HARMONIZATION_FILE, fit_map, Harmonizer.load)
        n_images = len(cases)
    else:
        if cfg.method == "styled-source":
            def restyle():
                source = read_dataset(source_data, with_labels=True, progress=progress)
                pairs = styled_source_pairs(model, source, cases, cfg.styled, seed=cfg.seed, progress=progress)
                return pairs, {"n_pairs": len(pairs), "n_styled": int(pairs.styled.sum()),
                               **restyling_record(source, cases, cfg.styled)}  # cached: reads the fit back

            pairs = stages.run("styled_source", out_dir / UNFINISHED / "styled_source.npz", restyle, StyledPairs.load)
            record = stages.info("styled_source")
            extra["restyling_mode"] = record["mode"]
            if "scanner" in record:
                extra["fitted_scanner"] = record["scanner"]
            if "mode_choice" in record:
                extra["restyling_mode_choice"] = record["mode_choice"]
            n_images = len(pairs)
            train = lambda: fine_tune_supervised(network, pairs, cfg, progress=progress)  # noqa: E731
        else:
            patches = target_patches(model, cases, cfg.max_images, cfg.seed)
            log.info("%s on %d target patches of %s", cfg.method, patches.shape[0], tuple(patches.shape[2:]))
            n_images = int(patches.shape[0])
            train = lambda: adapt_network(network, patches, cfg, progress=progress)  # noqa: E731

        def trained():
            steps = train()
            weights = TrainedWeights({k: v.detach().cpu().clone() for k, v in network.state_dict().items()}, steps)
            losses = [h["loss"] for h in steps if isinstance(h.get("loss"), float) and math.isfinite(h["loss"])]
            return weights, {"steps": len(steps), "last_loss": losses[-1] if losses else None}

        weights = stages.run("train", out_dir / UNFINISHED / "weights.pt", trained, TrainedWeights.load)
        network.load_state_dict(weights.state)
        history = weights.history
    network.cpu()
    with atomic_dir(out_dir, overwrite=True) as tmp:  # the finished folder replaces the unfinished one at once
        files = {}
        if harmonizer is not None:
            files[HARMONIZATION_FILE] = harmonizer.save(Path(tmp) / HARMONIZATION_FILE)
        model_dir_tmp = export_model_folder(network, model, tmp, extra_meta={"baseline": to_dict(cfg), **extra},
                                            extra_files=files)
        rel = Path(model_dir_tmp).relative_to(tmp)
        save_config(cfg, Path(tmp) / "baseline_config.yaml")
        write_json_atomic(Path(tmp) / HISTORY_FILE,
                          {"method": cfg.method, "source": str(model_dir), "target": str(target),
                           "n_images": n_images, "source_data": None if source_data is None else str(source_data),
                           "model_folder": rel.as_posix(), "settings": without_keys(settings, WHERE_IT_RUNS),
                           "history": [{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                        for k, v in h.items()} for h in history]})
    return out_dir / rel
