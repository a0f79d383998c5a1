"""The adaptation loop (RL4Seg): rollout -> correct -> reward network -> pixel-wise PPO, repeated.

One run folder holds everything a run produces::

    RUN/config.yaml            the exact configuration used
    RUN/state.json             finished stages (see :mod:`rl_adapt.run_state`)
    RUN/metrics.jsonl          one JSON line per finished stage with its figures
    RUN/iter{k}/rollout.npz    argmax + sampled masks of the policy on every target image (uint8)
    RUN/iter{k}/corrected.npz  corrected masks, which correction path was used, pseudo-label acceptance
    RUN/iter{k}/reward_net.pt  the reward network of iteration k
    RUN/iter{k}/policy.pt      the policy network's weights after PPO of iteration k
    RUN/shape_prior.pt         the shape autoencoder (trained once on source label maps, if given)
    RUN/tensorboard/           PPO and reward-net logs
    RUN/model/<Dataset>/nnUNetTrainer__<Plans>__2d/   the adapted model, an nnU-Net results folder (with
                               postprocessing.json/.pkl when ``postprocessing`` names candidates)
    RUN/reward_net.pt          the final reward network (its ``1 - score`` is the uncertainty map)

Every stage writes its outputs atomically and only then is marked finished, so ``--resume`` after a
``kill -9`` at any moment redoes at most the stage that was running. Target labels are never read.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from rl_adapt.config import save_config, to_dict
from rl_adapt.corrector import CleanupConfig, CorrectorConfig
from rl_adapt.devices import pick_device
from rl_adapt.errors import ConfigError, InputError, RLAdaptError
from rl_adapt.io_utils import append_jsonl, atomic_path, write_json_atomic
from rl_adapt.ppo import PPOConfig
from rl_adapt.reward_net import RewardNetConfig
from rl_adapt.run_state import RunState, config_sha
from rl_adapt.shape_prior import ShapePriorConfig

log = logging.getLogger(__name__)


@dataclass
class RolloutConfig:
    """How the policy's outputs on the target set are gathered for correction and reward training."""

    samples_per_image: int = 2
    """Policy samples per target image added to the reward-net training set (besides the argmax)."""
    batch_size: int = 16
    """Images per forward pass."""


@dataclass
class AdaptConfig:
    """Everything an adaptation run needs besides its inputs. Loaded from ``configs/adapt*.yaml``."""

    seed: int = 0
    """Master seed; each stage derives its own seed from it (same seed, same run on CPU)."""
    device: str = "auto"
    """"cpu", "cuda", "cuda:1" or "auto" (CUDA when available)."""
    threads: int = 0
    """torch CPU threads (0: leave torch's default)."""
    iterations: int = 4
    """Rounds of rollout -> correct -> reward -> PPO."""
    max_target_images: int = 0
    """Use at most this many target images (0: all), picked with the seed."""
    ppo_images_per_iteration: int = 512
    """Target images (one-step episodes) PPO consumes per iteration."""
    correction_reward_weight: float = 0.0
    """Weight w of the corrected masks in the PPO reward: per pixel r = w * 1[label == corrected] + (1 - w) *
    reward_net, for target images whose correction is anatomically valid (w = 0 elsewhere). 0 is RL4Seg's
    pure learned reward; see README (measured: PPO exploits a small CPU-trained reward network)."""
    myo_la_contact_penalty: float = 0.0
    """Subtracted from the per-pixel reward of every MYO pixel touching an LA pixel and every LA pixel touching a
    MYO pixel (8-neighbourhood) in the sampled segmentation: the anatomy check ``frontier_myo_la`` as a
    per-pixel penalty. 0: off."""
    lv_bg_contact_penalty: float = 0.0
    """Subtracted from the per-pixel reward of every LV pixel touching a background pixel (8-neighbourhood) in the
    sampled segmentation: the anatomy check ``frontier_lv_bg`` as a per-pixel penalty. 0: off."""
    keep_if_closer: bool = True
    """Guard against reward hacking: keep an iteration's PPO weights only if the policy's argmax agrees better
    (mean Dice over LV/MYO/LA) with that iteration's corrected masks than before PPO; otherwise the iteration
    keeps the previous weights (logged as ``rejected``). Judged on the images with expert masks when ``--expert``
    gives any (the masks users trust most), else on the whole target set (label-free)."""
    trusted_corrections: str = "valid"
    """Which corrections the reward network learns from, the PPO reward blends in
    (``correction_reward_weight``) and the export's postprocessing is decided against: ``valid`` (only the
    anatomically valid ones; RL4Seg) or ``all`` (every correction, valid or not: for a source model whose outputs
    the corrector cannot make valid, e.g. at a coarse patch size or briefly trained). With fewer than 2 trusted
    corrections the first iteration stops with an error saying what to try; a later iteration keeps the previous
    weights (recorded as ``rejected`` with the reason, as the guard does) and the run goes on."""
    train_on: str = "all"
    """Which target images the loop trains on: ``all`` (every image given as ``--target``; the expert masks, if
    any, override the automatic corrections of their images) or ``expert`` (only the images with an expert mask;
    needs ``--expert``). Measured on real CAMUS (CPU, small plan, low-gain shift, expert masks for 10 of 50
    patients, Dice on the other 40): ``all`` +0.014, ``expert`` +0.046 (+0.041 / +0.077 with
    ``ppo.supervised_coef`` 1.0): on real images the automatic corrections of the other images carry no boundary
    information and dilute the expert signal (results/camus_shift.md)."""
    postprocessing: tuple[str, ...] = ()
    """Postprocessing candidates (of :data:`rl_adapt.postprocessing.CANDIDATES`) tried at export, nnU-Net's greedy
    way but label-free: a step is kept when it raises the final policy's agreement with the last iteration's
    anatomically valid corrections (no label worse). The kept steps are stored with the adapted model as
    ``postprocessing.json``/``.pkl`` (nnU-Net's format), which ``predict`` and ``evaluate`` apply. Empty: none."""
    postprocessing_validity_tolerance: float = 0.01
    """The ``anatomical_cleanup`` candidate is also kept when it raises the anatomical validity of the final
    policy's outputs on all target images and no label's agreement with the trusted corrections falls by more
    than this (Dice). 0: agreement alone decides, as nnU-Net's Dice does."""
    postprocessing_cleanup: CleanupConfig = field(default_factory=lambda: CleanupConfig(myo_la_frontier_max=0.11))
    """Clean-up parameters of the ``anatomical_cleanup`` candidate (the corrector's clean-up, with the MYO-LA
    separation on: measured, it is what leaves cleaned CPU-adapted outputs invalid otherwise)."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Rollout settings."""
    corrector: CorrectorConfig = field(default_factory=CorrectorConfig)
    """Automatic correction (clean-up, shape prior, pseudo-label acceptance)."""
    shape_prior: ShapePriorConfig = field(default_factory=ShapePriorConfig)
    """Shape autoencoder trained on the label maps of ``--source-data`` (or read from ``--shape-prior``); a run
    with ``corrector.use_shape_prior`` and neither input is refused before it starts."""
    reward: RewardNetConfig = field(default_factory=RewardNetConfig)
    """Reward network and its training."""
    ppo: PPOConfig = field(default_factory=lambda: PPOConfig(beta_kl_final=0.0125, ent_coef_final=0.0375))
    """Pixel-wise PPO; ``beta_kl``/``ent_coef`` go linearly to ``*_final`` over the iterations (RL4Seg: 4x smaller)."""

    def __post_init__(self) -> None:
        from rl_adapt.postprocessing import CANDIDATES

        if self.trusted_corrections not in ("valid", "all"):
            raise ValueError(f"trusted_corrections must be 'valid' or 'all', got {self.trusted_corrections!r}")
        if self.train_on not in ("all", "expert"):
            raise ValueError(f"train_on must be 'all' or 'expert', got {self.train_on!r}")
        unknown = [c for c in self.postprocessing if c not in CANDIDATES]
        if unknown:
            raise ValueError(f"postprocessing: unknown candidate(s) {unknown}; valid: {list(CANDIDATES)}")


@dataclass
class AdaptInputs:
    """The files a run reads (never written).

    :param model_dir: the source nnU-Net results folder.
    :param target_dir: unlabelled target images (any reader format; labels, if any, are ignored).
    :param source_data: optional labelled source dataset (its label maps train the shape prior).
    :param expert_dir: optional folder of expert-corrected masks named like the target cases.
    :param val_dir: optional labelled target set, only to report progress (never trained on).
    :param shape_prior: optional trained shape prior (``shape_prior.pt`` of an earlier run on the same source
        domain); used instead of training one from ``source_data``.
    """

    model_dir: Path
    target_dir: Path
    source_data: Path | None = None
    expert_dir: Path | None = None
    val_dir: Path | None = None
    shape_prior: Path | None = None


def _stage_seed(seed: int, iteration: int, stage: int) -> int:
    return int(seed) * 1000 + iteration * 10 + stage


def _save_npz(target: Path, **arrays: np.ndarray) -> None:
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)


def _save_torch(path: Path, obj) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


@torch.no_grad()
def policy_outputs(
    network: torch.nn.Module,
    images: torch.Tensor,
    samples: int,
    batch_size: int,
    generator: torch.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Argmax masks and ``samples`` sampled masks of ``network`` on ``images``.

    :param images: (N, 1, H, W) float32 preprocessed target patches (on the network's device).
    :returns: argmax (N, H, W) uint8 and samples (N, S, H, W) uint8.
    """
    from rl_adapt.policies.distribution import PixelCategorical

    network.eval()
    n = images.shape[0]
    argmax = np.empty((n,) + tuple(images.shape[2:]), np.uint8)
    sampled = np.empty((n, samples) + tuple(images.shape[2:]), np.uint8)
    for start in range(0, n, batch_size):
        batch = images[start : start + batch_size]
        logits = network(batch).float()
        dist = PixelCategorical(logits)
        argmax[start : start + len(batch)] = dist.mode().cpu().numpy().astype(np.uint8)
        for s in range(samples):
            sampled[start : start + len(batch), s] = dist.sample(generator=generator).cpu().numpy().astype(np.uint8)
    return argmax, sampled


class BlendedReward:
    """Per-pixel PPO reward mixing the corrected masks with the reward network (see
    ``AdaptConfig.correction_reward_weight``).

    :param reward_net: the :class:`~rl_adapt.reward_net.RewardNet` (its ``score`` is the learned reward).
    :param corrected: (N, H, W) int64 corrected masks aligned with the env's images, on the device.
    :param trusted: (N,) bool, images whose correction is anatomically valid.
    :param weight: w in [0, 1].
    """

    def __init__(self, reward_net, corrected: torch.Tensor, trusted: torch.Tensor, weight: float,
                 myo_la_penalty: float = 0.0, lv_bg_penalty: float = 0.0):
        self.reward_net = reward_net
        self.corrected = corrected
        self.trusted = trusted
        self.weight = float(weight)
        self.myo_la_penalty = float(myo_la_penalty)
        self.lv_bg_penalty = float(lv_bg_penalty)
        self.env = None  # set once the vector env exists (it tells which images are being scored)

    def __call__(self, images: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) images and (B, H, W) int64 labels -> (B, H, W) reward (in [0, 1] without penalty)."""
        learned = self.reward_net.score(images, actions)
        if self.weight <= 0 or self.env is None or self.env.current_indices is None:
            out = learned
        else:
            idx = self.env.current_indices.to(self.corrected.device)
            w = self.weight * self.trusted[idx].to(learned.dtype)[:, None, None]
            agree = (actions == self.corrected[idx]).to(learned.dtype)
            out = w * agree + (1 - w) * learned
        if self.myo_la_penalty > 0:
            out = out - self.myo_la_penalty * (
                (touching(actions, 2, 3) | touching(actions, 3, 2)).to(out.dtype))
        if self.lv_bg_penalty > 0:
            out = out - self.lv_bg_penalty * touching(actions, 1, 0).to(out.dtype)
        return out


def touching(labels: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """(B, H, W) bool: pixels of label ``a`` with a pixel of label ``b`` in their 8-neighbourhood (the image's
    outside counts as neither), as the anatomy module's frontier checks count them."""
    import torch.nn.functional as F

    near_b = F.max_pool2d((labels == b).float()[:, None], 3, stride=1, padding=1)[:, 0] > 0
    return (labels == a) & near_b


def agreement(masks: np.ndarray, corrected: np.ndarray) -> float:
    """Mean over images of the mean Dice (LV, MYO, LA) between (N, H, W) ``masks`` and ``corrected``."""
    from rl_adapt.corrector import mean_dice

    return float(np.mean([mean_dice(a, b) for a, b in zip(masks, corrected)]))


def _validity_rate(masks: np.ndarray) -> float:
    """Fraction of (B, H, W) label maps that pass the anatomical checks."""
    from rl_adapt.anatomy import is_valid

    return float(np.mean([is_valid(m) for m in masks])) if len(masks) else float("nan")


def train_policy(
    network: torch.nn.Module,
    reference: torch.nn.Module,
    images: torch.Tensor,
    reward_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    cfg: PPOConfig,
    total_images: int,
    iteration: int = 0,
    n_iterations: int = 1,
    tensorboard_log: str | None = None,
    tb_name: str = "ppo",
    progress: bool = False,
    supervised: tuple[torch.Tensor, torch.Tensor] | None = None,
    seed: int = 0,
) -> tuple[torch.nn.Module, dict]:
    """One PPO phase of the loop: fine-tune ``network`` in place against ``reward_fn``.

    :param network: the policy network, (B, 1, H, W) -> logits (B, K, H, W); trained in place.
    :param reference: frozen source network for the KL term.
    :param images: (N, 1, H, W) float32 preprocessed target patches on the training device.
    :param reward_fn: per-pixel reward ``(images, actions) -> (B, H, W)`` in [0, 1].
    :param total_images: one-step episodes (images) to consume.
    :param iteration: adaptation iteration (0-based), for the beta/entropy schedule of ``cfg``.
    :param supervised: (M, 1, H, W) float32 images and (M, H, W) int64 masks for ``cfg.supervised_coef``.
    :param seed: seed of the phase's image order, action sampling and minibatches.
    :returns: ``(network, stats)`` with the last update's logged values (reward, KL, entropy, clip fraction...);
        with ``cfg.weight_average_decay`` > 0 the network holds the phase's weight average.
    """
    from rl_adapt.ppo import PixelPPO

    model = PixelPPO.from_network(network, images, reward_fn, cfg, reference_network=reference,
                                  validity_fn=_validity_rate, tensorboard_log=tensorboard_log,
                                  device=images.device, seed=seed)
    if hasattr(reward_fn, "env"):
        reward_fn.env = model.env
    model.supervised = supervised
    model.set_adaptation_iteration(iteration, n_iterations)
    model.learn(total_timesteps=int(total_images), tb_log_name=tb_name, progress_bar=progress)
    stats: dict = {"beta_kl": float(model.beta_kl), "ent_coef": float(model.ent_coef)}
    averaged = model.averaged_network_state()
    if averaged is not None:  # export the weight average of the phase instead of its last iterate
        model.policy.network.load_state_dict(averaged, strict=False)
        stats["weight_averaged"] = 1.0
    if model.history:
        first, last = model.history[0], model.history[-1]
        stats.update({f"first_{k}": float(v) for k, v in first.items() if isinstance(v, (int, float))})
        stats.update({f"last_{k}": float(v) for k, v in last.items() if isinstance(v, (int, float))})
    return model.policy.network, stats


class Adapter:
    """Runs (or resumes) one adaptation run. See the module docstring for the run folder.

    :param inputs: what the run reads.
    :param cfg: the run configuration.
    :param run_dir: the run folder; must not exist unless ``resume``.
    :param resume: continue a run in ``run_dir`` (same configuration).
    :param progress: show progress bars.
    """

    def __init__(self, inputs: AdaptInputs, cfg: AdaptConfig, run_dir: str | Path, resume: bool = False,
                 progress: bool = True):
        self.inputs = inputs
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.progress = progress
        self._check_inputs()
        if self.run_dir.exists() and any(self.run_dir.iterdir()) and not resume:
            raise RLAdaptError(f"{self.run_dir}: run folder exists and is not empty (use --resume to continue it)")
        if resume and not (self.run_dir / "state.json").exists():
            log.info("%s: nothing to resume, starting a new run", self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.state = RunState(self.run_dir, config_sha({"cfg": to_dict(cfg), "inputs": self._inputs_dict()}))
        if not (self.run_dir / "config.yaml").exists():
            save_config(cfg, self.run_dir / "config.yaml")
            write_json_atomic(self.run_dir / "inputs.json", self._inputs_dict())
        self.device = pick_device(cfg.device)
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self.metrics_path = self.run_dir / "metrics.jsonl"

    # ------------------------------------------------------------------ inputs
    def _inputs_dict(self) -> dict:
        return {k: (None if v is None else str(Path(v).resolve())) for k, v in dataclasses.asdict(self.inputs).items()}

    def _check_inputs(self) -> None:
        if self.cfg.train_on == "expert" and self.inputs.expert_dir is None:
            raise InputError(self.inputs.target_dir, "train_on: expert needs expert masks (--expert DIR)")
        for name in ("model_dir", "target_dir", "source_data", "expert_dir", "val_dir", "shape_prior"):
            p = getattr(self.inputs, name)
            if p is not None and not Path(p).exists():
                raise InputError(p, f"{name.replace('_', ' ')} does not exist")
        if (self.cfg.corrector.use_shape_prior and self.inputs.source_data is None
                and self.inputs.shape_prior is None):
            raise ConfigError("the configuration corrects masks with a shape prior (corrector.use_shape_prior: true) "
                              "but none can be had: give the labelled source dataset (--source-data DIR) or a "
                              "trained prior (--shape-prior FILE), or turn it off (--set "
                              "corrector.use_shape_prior=false)")
        if self.inputs.shape_prior is not None:
            from rl_adapt.shape_prior import ShapePrior

            try:
                ShapePrior.load(self.inputs.shape_prior, device="cpu")
            except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input error
                raise InputError(self.inputs.shape_prior,
                                 f"not a shape prior saved by rl-adapt ({type(exc).__name__}: {exc})") from exc
        try:
            if self.run_dir.resolve().is_relative_to(Path(self.inputs.model_dir).resolve()):
                raise InputError(self.run_dir, "the run folder may not be inside the source model folder")
        except OSError:
            pass

    def _log_metrics(self, stage: str, record: dict) -> None:
        append_jsonl(self.metrics_path, {"stage": stage, "time": time.time(), **record})
        log.info("%s: %s", stage, {k: v for k, v in record.items() if not isinstance(v, (list, dict))})

    # ------------------------------------------------------------------ loading
    def _load(self) -> None:
        from rl_adapt.data.readers import read_dataset
        from rl_adapt.policies.nnunet import load_model_folder

        self.model = load_model_folder(self.inputs.model_dir, device=str(self.device))
        cases = read_dataset(self.inputs.target_dir, with_labels=False)
        if not cases:
            raise InputError(self.inputs.target_dir, "no target images found")
        if self.cfg.max_target_images and len(cases) > self.cfg.max_target_images:
            rng = np.random.default_rng(self.cfg.seed)
            keep = sorted(rng.choice(len(cases), self.cfg.max_target_images, replace=False))
            cases = [cases[i] for i in keep]
        self.target_cases = cases
        patches = [self.model.to_patch(c.image, c.spacing)[0] for c in cases]
        self.images = torch.stack([torch.as_tensor(p) for p in patches]).float().to(self.device)
        log.info("target: %d images -> patches %s", len(cases), tuple(self.images.shape))
        self.source_network = copy.deepcopy(self.model.network).to(self.device).eval()
        for p in self.source_network.parameters():
            p.requires_grad_(False)
        self.val_cases = None
        if self.inputs.val_dir is not None:
            self.val_cases = [c for c in read_dataset(self.inputs.val_dir, with_labels=True) if c.label is not None]
            if not self.val_cases:
                raise InputError(self.inputs.val_dir, "validation set has no labelled cases")
        self.expert = self._load_expert()
        if self.cfg.train_on == "expert":
            keep = self._expert_indices()
            if not keep:
                raise InputError(self.inputs.expert_dir, "train_on: expert, but no expert mask is named like a "
                                                         "target image")
            log.info("train_on expert: training on the %d of %d target images with an expert mask",
                     len(keep), len(self.target_cases))
            self.target_cases = [self.target_cases[i] for i in keep]
            self.images = self.images[torch.as_tensor(keep, device=self.images.device)]

    def _load_expert(self) -> dict[str, np.ndarray]:
        if self.inputs.expert_dir is None:
            return {}
        from rl_adapt.data.readers import read_dataset

        names = {c.name: i for i, c in enumerate(self.target_cases)}
        out = {}
        for case in read_dataset(self.inputs.expert_dir, with_labels=False):
            key = case.name
            if key not in names:
                continue
            tc = self.target_cases[names[key]]
            mask = np.asarray(case.image)
            if mask.shape != tc.image.shape:
                raise InputError(case.source or self.inputs.expert_dir,
                                 f"expert mask shape {mask.shape} != target image shape {tc.image.shape}")
            if mask.min() < 0 or mask.max() > 3:
                raise InputError(case.source or self.inputs.expert_dir, "expert mask has labels outside 0..3")
            out[key] = self._label_patch(tc.image, mask, tc.spacing)
        log.info("expert corrections: %d of %d target images", len(out), len(self.target_cases))
        return out

    def _label_patch(self, image: np.ndarray, label: np.ndarray, spacing) -> np.ndarray:
        """A label map (H, W) brought to the policy's patch geometry, (P0, P1) uint8 (as ``to_patch`` does images)."""
        from rl_adapt.policies.inference import centre_pad_crop

        _, seg, _ = self.model.preprocess_pair(image, label, spacing)
        patch, _ = centre_pad_crop(np.maximum(seg, 0)[None], self.model.patch_size, 0)
        return np.asarray(patch)[0].astype(np.uint8)

    def _network_at(self, iteration: int) -> torch.nn.Module:
        """Policy network as it stands at the start of ``iteration`` (source weights for 0)."""
        net = copy.deepcopy(self.model.network).to(self.device)
        if iteration > 0:
            state = torch.load(self.run_dir / f"iter{iteration - 1}" / "policy.pt", map_location=self.device)
            net.load_state_dict(state)
        return net

    # ------------------------------------------------------------------ stages
    def _shape_prior(self):
        if not self.cfg.corrector.use_shape_prior:
            return None
        if self.inputs.shape_prior is not None:
            return self._given_shape_prior()
        if self.inputs.source_data is None:
            return None
        from rl_adapt.data.readers import read_dataset
        from rl_adapt.shape_prior import ShapePrior, train_shape_prior

        path = self.run_dir / "shape_prior.pt"
        if self.state.done("shape_prior"):
            return ShapePrior.load(path, device=self.device)
        t0 = time.time()
        cases = [c for c in read_dataset(self.inputs.source_data, with_labels=True) if c.label is not None]
        if not cases:
            raise InputError(self.inputs.source_data, "source dataset has no label maps for the shape prior")
        masks = np.stack([self._label_patch(c.image, c.label, c.spacing) for c in cases])
        prior = train_shape_prior(masks, self.cfg.shape_prior, device=self.device)
        prior.save(path)
        self.state.mark("shape_prior", {"n_masks": len(masks), "seconds": time.time() - t0})
        self._log_metrics("shape_prior", {"n_masks": len(masks), "seconds": time.time() - t0})
        return prior

    def _given_shape_prior(self):
        """The user's trained shape prior, copied into the run folder once (the run stays self-contained)."""
        from rl_adapt.shape_prior import ShapePrior

        path = self.run_dir / "shape_prior.pt"
        if not self.state.done("shape_prior"):
            src = Path(self.inputs.shape_prior)
            with atomic_path(path) as tmp:
                shutil.copyfile(src, tmp)
            self.state.mark("shape_prior", {"from": str(src.resolve())})
            self._log_metrics("shape_prior", {"from": str(src.resolve())})
        return ShapePrior.load(path, device=self.device)

    def _rollout(self, k: int, net: torch.nn.Module) -> dict[str, np.ndarray]:
        path = self.run_dir / f"iter{k}" / "rollout.npz"
        stage = f"iter{k}/rollout"
        if not self.state.done(stage):
            t0 = time.time()
            gen = torch.Generator(device=self.device).manual_seed(_stage_seed(self.cfg.seed, k, 1))
            argmax, sampled = policy_outputs(net, self.images, self.cfg.rollout.samples_per_image,
                                             self.cfg.rollout.batch_size, gen)
            _save_npz(path, argmax=argmax, samples=sampled)
            from rl_adapt.anatomy import is_valid

            validity = float(np.mean([is_valid(m) for m in argmax]))
            info = {"n": int(len(argmax)), "validity_argmax": validity, "seconds": time.time() - t0}
            self.state.mark(stage, info)
            self._log_metrics(stage, info)
        data = np.load(path)
        return {"argmax": data["argmax"], "samples": data["samples"]}

    def _correct(self, k: int, argmax: np.ndarray, prior) -> dict[str, np.ndarray]:
        from rl_adapt.corrector import Corrector

        path = self.run_dir / f"iter{k}" / "corrected.npz"
        stage = f"iter{k}/correct"
        if not self.state.done(stage):
            t0 = time.time()
            corrector = Corrector(self.cfg.corrector, shape_prior=prior, expert=self.expert)
            names = [c.name for c in self.target_cases]
            res = corrector.correct(argmax, names=names)
            _save_npz(path, corrected=res.corrected, accepted=np.asarray(res.accepted, bool),
                      valid=np.asarray(res.valid_after, bool), correction_path=np.asarray(res.path))
            info = {**res.summary(), "seconds": time.time() - t0}
            self.state.mark(stage, info)
            self._log_metrics(stage, info)
        data = np.load(path)
        out = {k2: data[k2] for k2 in ("corrected", "accepted", "valid", "correction_path")}
        out["trusted"] = self._trusted(out["valid"])
        return out

    def _trusted(self, valid: np.ndarray) -> np.ndarray:
        """(N,) bool: the corrections the run trusts (see ``AdaptConfig.trusted_corrections``)."""
        return np.asarray(valid, bool) if self.cfg.trusted_corrections == "valid" else np.ones(len(valid), bool)

    def _too_few_trusted(self, k: int, trusted: np.ndarray) -> str:
        """Why iteration ``k`` cannot train a reward network: counts, the checks failed most, what to try."""
        info = self.state.info(f"iter{k}/correct")
        failed = sorted(((v, c[len("failed_"):]) for c, v in info.items() if c.startswith("failed_")), reverse=True)
        worst = ", ".join(f"{name} ({count})" for count, name in failed[:3]) or "none recorded"
        hints = []
        if self.inputs.source_data is None and self.inputs.shape_prior is None:
            hints.append("a shape prior (--source-data DIR or --shape-prior FILE) makes more corrections valid")
        hints += ["expert masks (--expert DIR) replace the automatic corrections of their images",
                  "--set trusted_corrections=all trains on every correction, valid or not",
                  "a source model this far from valid anatomy may need more training or a finer plan"]
        return (f"iteration {k}: {int(trusted.sum())} of {len(trusted)} target images have an anatomically valid "
                f"correction; at least 2 are needed to train the reward network. Checks the corrections failed "
                f"most: {worst}. Try: " + "; ".join(hints) + ".")

    def _reward(self, k: int, roll: dict, corr: dict):
        from rl_adapt.reward_net import RewardNet, build_reward_dataset, train_reward_net

        path = self.run_dir / f"iter{k}" / "reward_net.pt"
        stage = f"iter{k}/reward"
        if not self.state.done(stage):
            t0 = time.time()
            use = corr["trusted"]
            if use.sum() < 2:
                why = self._too_few_trusted(k, use)
                if k == 0:
                    raise RLAdaptError(why)
                # a later iteration falls back as the guard does: the previous weights and reward network stay
                log.warning("%s; keeping the weights of iteration %d", why, k - 1)
                with atomic_path(path) as tmp:
                    shutil.copyfile(self.run_dir / f"iter{k - 1}" / "reward_net.pt", tmp)
                info = {"skipped": True, "reason": "fewer than 2 trusted corrections",
                        "n_trusted": int(use.sum()), "seconds": time.time() - t0}
                self.state.mark(stage, info)
                self._log_metrics(stage, info)
                return RewardNet.load(path, device=self.device)
            idx = np.flatnonzero(use)
            images = self.images[idx].cpu().numpy()
            segs = [roll["argmax"][idx]] + [roll["samples"][idx, s] for s in range(roll["samples"].shape[1])]
            dataset = build_reward_dataset(images, segs, corr["corrected"][idx],
                                           seed=_stage_seed(self.cfg.seed, k, 3))
            init = None
            if k > 0:
                init = RewardNet.load(self.run_dir / f"iter{k - 1}" / "reward_net.pt", device=self.device)
            reward_net, stats = train_reward_net(dataset, self.cfg.reward, device=self.device, init=init,
                                                 progress=self.progress, seed=_stage_seed(self.cfg.seed, k, 3))
            reward_net.save(path)
            info = {**stats, "n_images": int(len(idx)), "seconds": time.time() - t0}
            self.state.mark(stage, info)
            self._log_metrics(stage, info)
        return RewardNet.load(path, device=self.device)

    def _ppo(self, k: int, net: torch.nn.Module, reward_net, corr: dict,
             argmax_before: np.ndarray) -> None:
        """PPO phase of iteration ``k``; writes ``iter{k}/policy.pt`` (the next iteration reads it)."""
        path = self.run_dir / f"iter{k}" / "policy.pt"
        stage = f"iter{k}/ppo"
        if not self.state.done(stage):
            t0 = time.time()
            if self.state.info(f"iter{k}/reward").get("skipped"):
                _save_torch(path, {k2: v.detach().cpu() for k2, v in net.state_dict().items()})
                info = {"rejected": True, "reason": self.state.info(f"iter{k}/reward")["reason"],
                        "seconds": time.time() - t0}
                self.state.mark(stage, info)
                self._log_metrics(stage, info)
                return
            before_state = {k2: v.detach().clone() for k2, v in net.state_dict().items()}
            corrected = corr["corrected"]
            reward_fn = BlendedReward(reward_net, torch.as_tensor(corrected, dtype=torch.int64, device=self.device),
                                      torch.as_tensor(corr["trusted"], device=self.device),
                                      self.cfg.correction_reward_weight, self.cfg.myo_la_contact_penalty,
                                      self.cfg.lv_bg_contact_penalty)
            net, stats = train_policy(
                network=net, reference=self.source_network, images=self.images, reward_fn=reward_fn,
                cfg=self.cfg.ppo, total_images=self.cfg.ppo_images_per_iteration, iteration=k,
                n_iterations=self.cfg.iterations, tensorboard_log=str(self.run_dir / "tensorboard"),
                tb_name=f"ppo_iter{k}", progress=self.progress, supervised=self._expert_pairs(),
                seed=_stage_seed(self.cfg.seed, k, 4))
            for name, p in net.state_dict().items():
                if torch.is_floating_point(p) and not torch.isfinite(p).all():
                    raise RLAdaptError(f"iteration {k}: non-finite weights in {name}; last good checkpoint kept")
            gen = torch.Generator(device=self.device).manual_seed(_stage_seed(self.cfg.seed, k, 5))
            argmax_after, _ = policy_outputs(net, self.images, 0, self.cfg.rollout.batch_size, gen)
            judged = self._guard_images()
            agree_before = agreement(argmax_before[judged], corrected[judged])
            agree_after = agreement(argmax_after[judged], corrected[judged])
            rejected = bool(self.cfg.keep_if_closer and agree_after < agree_before)
            if rejected:
                log.warning("iteration %d: PPO moved the policy away from the corrected masks (agreement %.4f -> "
                            "%.4f); keeping the previous weights", k, agree_before, agree_after)
                net.load_state_dict(before_state)
            _save_torch(path, {k2: v.detach().cpu() for k2, v in net.state_dict().items()})
            info = {**stats, "agreement_before": agree_before, "agreement_after": agree_after,
                    "guard_images": int(len(judged)), "rejected": rejected,
                    "seconds": time.time() - t0}
            if self.val_cases is not None:
                info.update(self.validate(net))
            self.state.mark(stage, info)
            self._log_metrics(stage, info)

    def rejected_iterations(self) -> list[int]:
        """Iterations (0-based) whose finished PPO phase the ``keep_if_closer`` guard rejected."""
        return [k for k in range(self.cfg.iterations)
                if self.state.done(f"iter{k}/ppo") and self.state.info(f"iter{k}/ppo").get("rejected")]

    def _expert_indices(self) -> list[int]:
        """Indices (into ``target_cases``/``images``) of the target images with an expert mask."""
        return [i for i, c in enumerate(self.target_cases) if c.name in self.expert]

    def _expert_pairs(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(M, 1, H, W) target patches with an expert mask and the (M, H, W) int64 masks, for the PPO update's
        supervised term (``ppo.supervised_coef``); None when the term is off or no image has an expert mask."""
        idx = self._expert_indices()
        if self.cfg.ppo.supervised_coef <= 0 or not idx:
            return None
        masks = np.stack([self.expert[self.target_cases[i].name] for i in idx])
        return (self.images[torch.as_tensor(idx, device=self.images.device)],
                torch.as_tensor(masks, dtype=torch.int64, device=self.images.device))

    def _guard_images(self) -> np.ndarray:
        """Indices of the target images the ``keep_if_closer`` guard is judged on (see :class:`AdaptConfig`)."""
        with_expert = self._expert_indices()
        return np.asarray(with_expert if with_expert else range(len(self.target_cases)), dtype=np.int64)

    # ------------------------------------------------------------------ validation / export
    def validate(self, net: torch.nn.Module) -> dict[str, float]:
        """Mean Dice (LV/MYO/LA) and validity on the ``--val`` set with ``net`` (reporting only)."""
        from rl_adapt.anatomy import is_valid
        from rl_adapt.metrics import segmentation_metrics

        saved = self.model.networks
        self.model.networks = [net.eval()]
        try:
            dices, valid = [], []
            for case in self.val_cases:
                pred = self.model.predict(case.image, case.spacing)
                m = segmentation_metrics(pred, case.label, case.spacing)
                dices.append(np.nanmean([m[s]["dice"] for s in ("LV", "MYO", "LA")]))
                valid.append(is_valid(pred))
        finally:
            self.model.networks = saved
        return {"val_dice": float(np.mean(dices)), "val_validity": float(np.mean(valid))}

    def _postprocessing_files(self, net: torch.nn.Module) -> dict:
        """Decide the postprocessing label-free (see ``AdaptConfig.postprocessing``); the files to export."""
        from rl_adapt.postprocessing import decide, postprocessing_files

        t0 = time.time()
        last = self.run_dir / f"iter{self.cfg.iterations - 1}" / "corrected.npz"
        corr = np.load(last)
        trusted = np.flatnonzero(self._trusted(corr["valid"]))
        gen = torch.Generator(device=self.device).manual_seed(_stage_seed(self.cfg.seed, self.cfg.iterations, 6))
        argmax, _ = policy_outputs(net, self.images, 0, self.cfg.rollout.batch_size, gen)
        rule, info = decide(argmax[trusted], corr["corrected"][trusted], self.cfg.postprocessing,
                            cleanup=to_dict(self.cfg.postprocessing_cleanup), all_masks=argmax,
                            validity_tolerance=self.cfg.postprocessing_validity_tolerance)
        info = {**info, "reference": str(last.relative_to(self.run_dir)), "rule": rule.describe()}
        self._log_metrics("postprocessing", {**info, "seconds": time.time() - t0})
        return postprocessing_files(rule, info)

    def _export(self, net: torch.nn.Module, reward_net) -> Path:
        from rl_adapt.policies.nnunet import export_model_folder

        stage = "export"
        model_root = self.run_dir / "model"
        if not self.state.done(stage):
            extra = self._postprocessing_files(net) if self.cfg.postprocessing else None
            out = export_model_folder(net, self.model, model_root, overwrite=True,
                                      extra_meta={"rl_adapt_run": str(self.run_dir.resolve())}, extra_files=extra)
            reward_net.save(self.run_dir / "reward_net.pt")
            self.state.mark(stage, {"model_folder": str(out), "model_relpath": os.path.relpath(out, self.run_dir)})
        info = self.state.info(stage)
        if "model_relpath" in info:  # relative to the run folder: still right after the folder is moved
            return self.run_dir / info["model_relpath"]
        return Path(info["model_folder"])  # runs exported before the relative path was stored

    # ------------------------------------------------------------------ main
    def run(self) -> Path:
        """Run every unfinished stage; returns the adapted nnU-Net model folder."""
        self._load()
        if self.val_cases is not None and not self.state.done("val_source"):
            info = self.validate(self.source_network)
            self.state.mark("val_source", info)
            self._log_metrics("val_source", info)
        prior = self._shape_prior()
        reward_net = None
        for k in range(self.cfg.iterations):
            if self.state.done(f"iter{k}/ppo"):
                continue
            net = self._network_at(k)
            roll = self._rollout(k, net)
            corr = self._correct(k, roll["argmax"], prior)
            reward_net = self._reward(k, roll, corr)
            self._ppo(k, net, reward_net, corr, roll["argmax"])
        rejected = self.rejected_iterations()
        if rejected and len(rejected) == self.cfg.iterations:
            log.warning("every PPO phase (%d of %d) was rejected by the keep_if_closer guard: the adapted network is "
                        "the source network, only the stored postprocessing differs. The automatic corrections "
                        "gave PPO nothing it could agree with better; expert masks (--expert, train_on: expert) are "
                        "what helped on real images (README, results/camus_shift.md)", len(rejected),
                        self.cfg.iterations)
        net = self._network_at(self.cfg.iterations)
        if reward_net is None:
            from rl_adapt.reward_net import RewardNet

            reward_net = RewardNet.load(self.run_dir / f"iter{self.cfg.iterations - 1}" / "reward_net.pt",
                                        device=self.device)
        return self._export(net, reward_net)
