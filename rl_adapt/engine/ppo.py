"""Pixel-wise PPO for segmentation policies, on stable-baselines3's on-policy frame.

Episodes last one step (image -> label map -> reward map). Per pixel i of image n:

* shaped return   ``R = r - beta * (log pi_old(a) - log pi_ref(a))``  (pi_ref: frozen source policy)
* advantage       ``A = R - V``                                       (V: per-pixel value head)
* ratio           ``rho = exp(log pi(a) - log pi_old(a))``
* loss = ``-mean(min(rho*A, clip(rho, 1-eps, 1+eps)*A)) - c_ent * mean(H) + c_v * mean((V - R)^2)``

all means over pixels and images. Ratios, clipping and advantages are per pixel: the joint-ratio form
(product of H*W ratios) clips almost every sample and barely learns.

SB3 supplies the learn loop, callbacks, logger (stdout/TensorBoard/CSV) and save/load; this module
replaces the data path: images, actions, log-probs, reward maps and values stay torch tensors on the
training device (:class:`~rl_adapt.envs.vector_env.TorchSegmentationVecEnv`,
:class:`~rl_adapt.engine.rollout_buffer.PixelRolloutBuffer`).

Typical use::

    model = PixelPPO.from_network(network, images, reward_fn, config=PPOConfig(...))
    model.learn(total_timesteps=n_images)        # n_images = images to roll out (rounded up to rollouts)
    adapted = model.policy.network               # the same nn.Module, trained in place
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from gymnasium import spaces
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import Image, Logger
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from torch import nn

from rl_adapt.envs.segmentation_env import RewardFn
from rl_adapt.envs.vector_env import TorchSegmentationVecEnv
from rl_adapt.config import bounded
from rl_adapt.distributed import SINGLE, World, all_reduce_gradients, all_reduce_sum
from rl_adapt.errors import TrainingDiverged
from rl_adapt.io_utils import save_torch
from rl_adapt.measures.anatomy import validity_rate
from rl_adapt.policies.actor_critic import PixelActorCriticPolicy
from rl_adapt.engine.rollout_buffer import PixelRolloutBuffer
from stable_baselines3.common.utils import get_device

log = logging.getLogger(__name__)

ValidityFn = Callable[[np.ndarray], float]

#: RGB colours of labels 0..3 (background, LV, MYO, LA) for TensorBoard overlays; more labels cycle.
_PALETTE = np.array([[0, 0, 0], [230, 60, 60], [60, 200, 90], [70, 110, 240], [240, 200, 40], [200, 80, 220]],
                    dtype=np.float32) / 255.0


@dataclass
class PPOConfig:
    """Hyperparameters of pixel-wise PPO (one-step episodes, per-pixel ratios and advantages)."""
    lr: float = bounded(1e-4, gt=0.0, le=1.0)
    """Adam learning rate of actor and value head (constant)."""
    n_envs: int = bounded(8, ge=1)
    """Images per environment step (the vector env's batch B)."""
    n_steps: int = bounded(4, ge=1)
    """Environment steps per rollout; a rollout holds n_envs * n_steps images."""
    n_epochs: int = bounded(5, ge=1)
    """PPO epochs (passes over the rollout) per rollout: RL4Seg's K = 5."""
    batch_size: int = bounded(8, ge=1)
    """Images per minibatch in the PPO epochs."""
    clip_range: float = bounded(0.2, gt=0.0, lt=1.0)
    """PPO clip epsilon on the per-pixel ratio."""
    beta_kl: float = bounded(0.05, ge=0.0)
    """Weight of the KL-to-reference penalty in the shaped reward, r - beta*(log pi_old - log pi_ref)."""
    beta_kl_final: float | None = None
    """beta at the last adaptation iteration (linear schedule from beta_kl; RL4Seg 0.05 -> 0.0125); None: constant."""
    ent_coef: float = bounded(0.15, ge=0.0)
    """Weight of the mean per-pixel entropy bonus (nats)."""
    ent_coef_final: float | None = None
    """Entropy weight at the last adaptation iteration (linear from ent_coef; RL4Seg 0.15 -> 0.0375); None: constant."""
    vf_coef: float = bounded(0.5, ge=0.0)
    """Weight of the per-pixel value MSE."""
    supervised_coef: float = bounded(0.0, ge=0.0)
    """Weight of a cross-entropy term on supervised (image, mask) pairs added to every minibatch loss (the loop
    passes the target images that have an expert mask); 0 or no pairs: pure PPO."""
    max_grad_norm: float = bounded(0.5, gt=0.0)
    """Global gradient-norm clip."""
    target_kl: float | None = None
    """Stop the epochs of a rollout early when the approximate KL to the rollout policy exceeds 1.5x this; None: never."""
    normalize_advantage: bool = False
    """Standardise advantages per minibatch (zero mean, unit variance over pixels)."""
    value_head: Literal["shared", "separate"] = "shared"
    """Critic: "shared" 1x1 conv on the actor's last decoder features, or "separate" small U-Net."""
    detach_value_features: bool = True
    """With the shared head: keep value-loss gradients out of the actor's features (measured: learns faster)."""
    bf16: bool = True
    """bf16 autocast for the networks on CUDA (no effect on CPU)."""
    log_images_every: int = bounded(0, ge=0)
    """Log an image/sample/reward overlay to TensorBoard every this many rollouts; 0: never."""
    validity_max_masks: int = bounded(32, ge=0)
    """At most this many sampled masks per rollout are passed to validity_fn (it runs on CPU numpy)."""
    sampling: str = bounded("stream", choices=("stream", "per_image"))
    """How the per-pixel actions are drawn: ``stream`` (one seeded generator for every batch) or ``per_image``
    (noise seeded by the image and the environment step, so an image draws the same actions whatever the batch
    holds: what makes a data-parallel run equal to a one-process run with the global batch; always used with more
    than one process)."""
    weight_average_decay: float = bounded(0.0, ge=0.0, lt=1.0)
    """Keep an exponential moving average of the policy network's floating-point state (parameters and buffers)
    over the optimizer steps of a ``learn`` call (decay per step, e.g. 0.95 averages over ~20 steps);
    :meth:`PixelPPO.averaged_network_state` returns it and the adaptation loop exports it instead of the last
    iterate. 0: off."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.weight_average_decay < 1.0:
            raise ValueError(f"weight_average_decay must be in [0, 1), got {self.weight_average_decay}")

    def coefficients(self, iteration: int, n_iterations: int) -> tuple[float, float]:
        """(beta_kl, ent_coef) for adaptation iteration ``iteration`` of ``n_iterations`` (0-based, linear)."""
        t = 0.0 if n_iterations <= 1 else min(max(iteration, 0), n_iterations - 1) / (n_iterations - 1)
        beta = self.beta_kl if self.beta_kl_final is None else self.beta_kl + t * (self.beta_kl_final - self.beta_kl)
        ent = self.ent_coef if self.ent_coef_final is None else self.ent_coef + t * (self.ent_coef_final - self.ent_coef)
        return float(beta), float(ent)


def _num_classes_of(network: nn.Module, image: torch.Tensor) -> int:
    """K from the network's segmentation head, or from one forward pass on ``image`` (1, C, H, W)."""
    seg_layers = getattr(getattr(network, "decoder", None), "seg_layers", None)
    if seg_layers is not None and len(seg_layers) > 0:
        return int(seg_layers[-1].out_channels)
    was_training = network.training
    network.eval()
    with torch.no_grad():
        k = int(network(image).shape[1])
    network.train(was_training)
    return k


class _UpdateSnapshot:
    """Parameters and optimizer state saved at the start of a PPO update, to undo the whole update on divergence.

    The copies live in buffers allocated once and refilled with one fused copy per update: a fresh clone of the
    parameters plus a deep copy of the optimizer state cost ~25 % of the update time on a GPU (33 M parameters,
    2 minibatches per update).
    """

    def __init__(self) -> None:
        self._live: list[torch.Tensor] = []
        self._saved: list[torch.Tensor] = []
        self._fresh: list[torch.Tensor] = []  # parameters without optimizer state yet (first step)

    def take(self, params: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
        """Save ``params`` and the tensors of ``optimizer.state`` for them."""
        live = [p.detach() for p in params]
        live += [t for p in params for t in optimizer.state.get(p, {}).values() if torch.is_tensor(t)]
        self._fresh = [p for p in params if not optimizer.state.get(p)]
        if [(t.shape, t.dtype, t.device) for t in live] != [(t.shape, t.dtype, t.device) for t in self._saved]:
            self._saved = [t.clone() for t in live]
        else:
            _copy_all(self._saved, live)
        self._live = live

    @torch.no_grad()
    def restore(self, optimizer: torch.optim.Optimizer) -> None:
        """Put the saved values back; optimizer state created since :meth:`take` is dropped."""
        _copy_all(self._live, self._saved)
        for p in self._fresh:
            optimizer.state.pop(p, None)


@torch.no_grad()
def _copy_all(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """dst[i].copy_(src[i]) for all i, fused per (device, dtype) group."""
    groups: dict[tuple, tuple[list, list]] = {}
    for d, s in zip(dst, src):
        pair = groups.setdefault((d.device, d.dtype), ([], []))
        pair[0].append(d)
        pair[1].append(s)
    for d_list, s_list in groups.values():
        torch._foreach_copy_(d_list, s_list)


class _WeightAverage:
    """Exponential moving average of a module's floating-point parameters and buffers, updated in place."""
    def __init__(self, module: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"weight_average_decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        tracked = {k: t for k, t in module.state_dict(keep_vars=True).items() if torch.is_floating_point(t)}
        self._names, self._live = list(tracked), list(tracked.values())
        self._avg = [t.detach().clone() for t in self._live]
        self.steps = 0

    @torch.no_grad()
    def update(self) -> None:
        """avg <- decay * avg + (1 - decay) * live, for every tracked tensor (one fused op per group)."""
        torch._foreach_lerp_(self._avg, [t.detach() for t in self._live], 1.0 - self.decay)
        self.steps += 1

    def state(self) -> dict[str, torch.Tensor]:
        """{name: averaged tensor} for the tracked entries of the module's state dict."""
        return dict(zip(self._names, self._avg))


class PixelPPO(OnPolicyAlgorithm):
    """Pixel-wise PPO with a KL-to-reference shaped reward (RL4Seg) on a torch-resident data path.

    :param policy: policy class (default :class:`PixelActorCriticPolicy`).
    :param env: the batched training environment (:class:`TorchSegmentationVecEnv`), or None (e.g. when
        loading for prediction; attach one later with :meth:`set_env`).
    :param config: hyperparameters; ``n_envs`` must equal ``env.num_envs``.
    :param policy_kwargs: arguments of the policy: ``network`` or ``network_fn``, optional
        ``reference_network``, ``critic_features`` ... (``value_head`` and ``use_bf16`` come from config).
    :param validity_fn: optional ``masks (B, H, W) uint8 numpy -> fraction valid``, logged per rollout.
    :param tensorboard_log: TensorBoard log folder (None: no TensorBoard).
    :param verbose: SB3 verbosity (1: print the logger table per rollout).
    :param device: "auto", "cpu", "cuda", ...
    :param seed: seed of parameters initialised here, action sampling and minibatch order (the adaptation loop
        derives one per PPO phase from its master seed).
    :param world: the data-parallel job this process belongs to (:mod:`rl_adapt.distributed`): ``env`` serves this
        rank's slice of each global batch, gradients are summed over ranks with losses normalised by the global
        minibatch, so every rank keeps the same weights. One process by default.
    """

    policy: PixelActorCriticPolicy
    rollout_buffer: PixelRolloutBuffer  # type: ignore[assignment]

    def __init__(
        self,
        policy: type[PixelActorCriticPolicy] = PixelActorCriticPolicy,
        env: TorchSegmentationVecEnv | None = None,
        config: PPOConfig | None = None,
        policy_kwargs: dict[str, Any] | None = None,
        validity_fn: ValidityFn | None = None,
        tensorboard_log: str | None = None,
        verbose: int = 0,
        device: torch.device | str = "auto",
        seed: int = 0,
        world: World = SINGLE,
        _init_setup_model: bool = True,
    ):
        cfg = config if config is not None else PPOConfig()
        policy_kwargs = dict(policy_kwargs or {})
        policy_kwargs.setdefault("value_head", cfg.value_head)
        policy_kwargs.setdefault("use_bf16", cfg.bf16)
        policy_kwargs.setdefault("detach_value_features", cfg.detach_value_features)
        super().__init__(
            policy=policy,
            env=None,
            learning_rate=cfg.lr,
            n_steps=cfg.n_steps,
            gamma=1.0,
            gae_lambda=1.0,
            ent_coef=cfg.ent_coef,
            vf_coef=cfg.vf_coef,
            max_grad_norm=cfg.max_grad_norm,
            use_sde=False,
            sde_sample_freq=-1,
            tensorboard_log=tensorboard_log,
            monitor_wrapper=False,
            policy_kwargs=policy_kwargs,
            verbose=verbose,
            seed=seed,
            device=device,
            _init_setup_model=False,
            supported_action_spaces=(spaces.MultiDiscrete,),
        )
        self.config = cfg
        self.world = world
        self.beta_kl = cfg.beta_kl
        self.validity_fn = validity_fn
        self.history: list[dict[str, float]] = []
        self._rollouts = 0
        self._rollout_stats: dict[str, float] = {}
        if env is not None:
            self._attach_env(env)
        if _init_setup_model:
            self._setup_model()

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_network(
        cls,
        network: nn.Module | None,
        images: torch.Tensor,
        reward_fn: RewardFn,
        config: PPOConfig | None = None,
        *,
        network_fn: Callable[[], nn.Module] | None = None,
        reference_network: nn.Module | None = None,
        num_classes: int | None = None,
        validity_fn: ValidityFn | None = None,
        tensorboard_log: str | None = None,
        verbose: int = 0,
        device: torch.device | str = "auto",
        policy_kwargs: dict[str, Any] | None = None,
        seed: int = 0,
        world: World = SINGLE,
    ) -> "PixelPPO":
        """Build env + policy + algorithm around a segmentation network.

        :param network: (B,1,H,W) -> logits (B,K,H,W); trained in place (or None with ``network_fn``).
        :param images: target images (N, 1, H, W) float32, preprocessed; H, W fixed (the patch size).
        :param reward_fn: ``(images (B,1,H,W), actions (B,H,W) int64) -> (B,H,W) in [0, 1]``.
        :param config: hyperparameters (``n_envs`` images per env step).
        :param network_fn: picklable builder used instead of ``network`` (then saves hold no module pickle).
        :param reference_network: frozen KL reference; default: a copy of ``network`` as given (the source).
        :param num_classes: K; inferred from the network when None.
        :param seed: seed of the image order, the action sampling and the minibatch order.
        :param world: the data-parallel job (``config.n_envs`` and ``batch_size`` are per process).
        """
        cfg = config if config is not None else PPOConfig()
        images = torch.as_tensor(images)

        dev = get_device(device)
        if network is None and network_fn is None:
            raise ValueError("give network or network_fn")
        if num_classes is None:
            probe = network if network is not None else network_fn()  # type: ignore[misc]
            num_classes = _num_classes_of(probe, images[:1].float())
        env = TorchSegmentationVecEnv(images, num_classes, reward_fn, num_envs=cfg.n_envs, device=dev, seed=seed,
                                      rank=world.rank, world_size=world.size)
        kwargs = dict(policy_kwargs or {})
        if network is not None:
            kwargs["network"] = network
        else:
            kwargs["network_fn"] = network_fn
        if reference_network is not None:
            kwargs["reference_network"] = reference_network
        return cls(PixelActorCriticPolicy, env, cfg, policy_kwargs=kwargs, validity_fn=validity_fn,
                   tensorboard_log=tensorboard_log, verbose=verbose, device=dev, seed=seed, world=world)

    def _attach_env(self, env: TorchSegmentationVecEnv) -> None:
        if not isinstance(env, TorchSegmentationVecEnv):
            raise TypeError(f"PixelPPO trains on a TorchSegmentationVecEnv, got {type(env).__name__}")
        if env.num_envs != self.config.n_envs:
            raise ValueError(f"env serves {env.num_envs} images per step, config.n_envs is {self.config.n_envs}")
        obs_space, act_space = env.single_observation_space, env.single_action_space
        if getattr(self, "observation_space", None) is not None:
            if obs_space.shape != self.observation_space.shape or not np.array_equal(act_space.nvec, self.action_space.nvec):
                raise ValueError(f"env spaces {obs_space.shape}/{act_space.nvec[:1]}x{act_space.nvec.size} do not "
                                 f"match the model's {self.observation_space.shape}")
        self.observation_space = obs_space
        self.action_space = act_space
        self.n_envs = env.num_envs
        self.env = env  # type: ignore[assignment]
        self._last_obs = None

    def set_env(self, env: TorchSegmentationVecEnv, force_reset: bool = True) -> None:  # type: ignore[override]
        """Attach a (new) training environment with the same image size and classes.

        Overridden because SB3's ``set_env`` wraps the env in its numpy ``VecEnv`` machinery; the torch vector env
        serves device tensors and is attached as it is."""
        self._attach_env(env)

    @classmethod
    def load(cls, path: Any, env: TorchSegmentationVecEnv | None = None, device: torch.device | str = "auto",
             validity_fn: ValidityFn | None = None, **kwargs: Any) -> "PixelPPO":  # type: ignore[override]
        """Load a model saved by :meth:`save`; attach ``env`` to continue training.

        Overridden because ``validity_fn`` (a callable, not saved) is given again here, and ``env`` is attached
        through :meth:`set_env` rather than SB3's wrappers."""
        model = super().load(path, env=None, device=device, **kwargs)
        model.validity_fn = validity_fn
        if env is not None:
            model.set_env(env)
        return model

    def _excluded_save_params(self) -> list[str]:
        return super()._excluded_save_params() + ["validity_fn", "_last_obs", "_last_episode_starts",
                                                  "_sample_gen", "_batch_gen", "_rollout_stats", "world", "_served",
                                                  "_snapshot", "_average", "supervised"]

    def _setup_model(self) -> None:
        """Build the policy, a device-resident :class:`PixelRolloutBuffer` and the seeded generators.

        Overridden because SB3's version builds its numpy ``RolloutBuffer`` from the spaces (H*W int64 actions cast
        to float32 per sample) and draws from the global RNG."""
        self._setup_lr_schedule()
        self.set_random_seed(self.seed)
        if self.observation_space is None:
            raise ValueError("PixelPPO needs an environment (or a loaded model) to know the image size")
        self.policy = self.policy_class(  # type: ignore[assignment]
            self.observation_space, self.action_space, self.lr_schedule, **self.policy_kwargs
        ).to(self.device)
        c, h, w = self.observation_space.shape
        self.rollout_buffer = PixelRolloutBuffer(self.n_steps * self.n_envs, (c, h, w), self.policy.num_classes,
                                                 self.device)
        seed = 0 if self.seed is None else int(self.seed)
        self._sample_gen = torch.Generator(device=self.device)
        self._sample_gen.manual_seed(seed + 1)
        self._batch_gen = torch.Generator(device="cpu")
        self._batch_gen.manual_seed(seed + 2)
        self._env_steps = 0  # environment steps taken (the per-image sampling noise is seeded with it)
        self._served: torch.Tensor | None = None  # indices of the images behind the current observations
        self._snapshot = _UpdateSnapshot()
        self._average: _WeightAverage | None = None
        self.supervised: tuple[torch.Tensor, torch.Tensor] | None = None
        """Optional (M, C, H, W) float32 images and (M, H, W) int64 masks for ``PPOConfig.supervised_coef``."""

    def averaged_network_state(self) -> dict[str, torch.Tensor] | None:
        """The moving average of the policy network's floating-point state over the last :meth:`learn` call's
        optimizer steps (names as in ``policy.network.state_dict()``), or None when averaging is off or no
        step was taken."""
        if self._average is None or self._average.steps == 0:
            return None
        return self._average.state()

    def set_adaptation_iteration(self, iteration: int, n_iterations: int) -> None:
        """Apply the config's beta/entropy schedules for adaptation iteration ``iteration`` (0-based)."""
        self.beta_kl, self.ent_coef = self.config.coefficients(iteration, n_iterations)

    # ------------------------------------------------------------------ the loop
    def learn(self, total_timesteps: int, callback: Any = None, log_interval: int = 1, tb_log_name: str = "PixelPPO",
              reset_num_timesteps: bool = True, progress_bar: bool = False) -> "PixelPPO":
        """Roll out and train until ``total_timesteps`` images have been rolled out (whole rollouts).

        Overridden: SB3's loop, except that logs are dumped after each update (so the last update is logged too),
        and with ``config.weight_average_decay`` > 0 the weight average restarts from the network's current
        parameters.
        """
        iteration = 0
        decay = self.config.weight_average_decay
        self._average = _WeightAverage(self.policy.network, decay) if decay > 0 else None
        if self.tensorboard_log is None and self.verbose == 0 and not self._custom_logger:
            # SB3 would otherwise make an empty /tmp/SB3-<date> folder for a logger that writes nothing
            self.set_logger(Logger(folder=None, output_formats=[]))
        total_timesteps, callback = self._setup_learn(total_timesteps, callback, reset_num_timesteps, tb_log_name,
                                                      progress_bar)
        callback.on_training_start(locals(), globals())
        assert self.env is not None
        while self.num_timesteps < total_timesteps:
            if not self.collect_rollouts(self.env, callback, self.rollout_buffer, n_rollout_steps=self.n_steps):
                break
            iteration += 1
            self._update_current_progress_remaining(self.num_timesteps, total_timesteps)
            self.train()
            if log_interval is not None and iteration % log_interval == 0:
                self.dump_logs(iteration)
        callback.on_training_end()
        return self

    def collect_rollouts(self, env: TorchSegmentationVecEnv, callback: BaseCallback,  # type: ignore[override]
                         rollout_buffer: PixelRolloutBuffer, n_rollout_steps: int) -> bool:
        """Fill the buffer with ``n_rollout_steps`` batches: sample per pixel, score, keep everything on device.

        Overridden because SB3's version moves observations and actions through numpy, samples from its
        distribution classes (one Categorical per pixel: seconds per image) and has no reference log-probability
        for the KL term."""
        policy = self.policy
        policy.set_training_mode(False)
        rollout_buffer.reset()
        callback.on_rollout_start()
        obs = self._last_obs
        if isinstance(obs, tuple):  # gymnasium reset() -> (obs, info)
            obs, info = obs
            self._served = info["index"]
        if obs is None:
            obs, info = env.reset()
            self._served = info["index"]
        per_image = self.config.sampling == "per_image" or self.world.active
        for _ in range(n_rollout_steps):
            with torch.no_grad():
                noise = self._per_image_noise(obs) if per_image else None
                actions, values, log_prob, _ = policy.act(obs, generator=self._sample_gen, noise=noise)
                ref_log_prob = policy.reference_log_prob(obs, actions)
            new_obs, rewards, dones, _, infos = env.step(actions)
            self._served = infos["next_index"]
            self._env_steps += 1
            self.num_timesteps += env.num_envs
            callback.update_locals(locals())
            if not callback.on_step():
                self._last_obs = new_obs
                return False
            rollout_buffer.add(obs, actions, infos["reward_map"], values, log_prob, ref_log_prob)
            obs = new_obs
        self._last_obs = obs
        rollout_buffer.compute_returns_and_advantages(self.beta_kl)
        self._rollouts += 1
        self._record_rollout_stats(rollout_buffer)
        callback.update_locals(locals())
        callback.on_rollout_end()
        return True

    def _minibatches(self, buf: PixelRolloutBuffer):
        """``(minibatch, None)`` over the stored rollout for one process (SB3's shuffled minibatches); in a
        data-parallel job ``(this rank's part, images in the global minibatch)``: one permutation of the global
        rollout, shared by the ranks, cut into global minibatches of ``batch_size * world`` images. A rank with no
        image in a global minibatch gets a stand-in image and the count negated: its loss is then taken times 0, so
        its (zero) gradient still joins the reduction."""
        if not self.world.active:
            for mb in buf.minibatches(self.config.batch_size, self._batch_gen):
                yield mb, None
            return
        b, size = self.n_envs, self.world.size
        n_global = buf.pos * size
        perm = torch.randperm(n_global, generator=self._batch_gen)
        per_step = b * size
        for start in range(0, n_global, self.config.batch_size * size):
            gids = perm[start : start + self.config.batch_size * size]
            step, slot = gids // per_step, gids % per_step
            mine = (slot // b) == self.world.rank
            local = (step * b + slot % b)[mine].to(buf.device)
            if len(local) == 0:  # all of it on other ranks: a stand-in image whose loss is multiplied by 0
                yield buf.batch(torch.zeros(1, dtype=torch.int64, device=buf.device)), -len(gids)
                continue
            yield buf.batch(local), len(gids)

    def _globally_normalised(self, adv: torch.Tensor) -> torch.Tensor:
        """``adv`` standardised with the mean and (unbiased) std of the whole global minibatch."""
        s = all_reduce_sum(torch.stack([adv.sum(), (adv * adv).sum(),
                                        torch.tensor(float(adv.numel()), device=adv.device)]).double(), self.world)
        mean = s[0] / s[2]
        std = ((s[1] - s[2] * mean * mean) / (s[2] - 1).clamp_min(1)).clamp_min(0).sqrt()
        return (adv - mean.float()) / (std.float() + 1e-8)

    def _per_image_noise(self, obs: torch.Tensor) -> torch.Tensor:
        """``Exp(1)`` sampling noise (B, K, H, W), each image's seeded by (seed, environment step, image index)."""
        b, _, h, w = obs.shape
        k = self.policy.num_classes
        out = torch.empty((b, k, h, w), dtype=torch.float32)
        for i, index in enumerate(self._served.tolist()):
            seed = int(np.random.SeedSequence([int(self.seed or 0), self._env_steps, int(index)]).generate_state(1)[0])
            out[i].exponential_(generator=torch.Generator().manual_seed(seed))
        return out.to(obs.device)

    def _record_rollout_stats(self, buf: PixelRolloutBuffer) -> None:
        n = buf.pos
        stats = torch.stack([
            buf.rewards[:n].mean(),
            (buf.log_prob[:n] - buf.ref_log_prob[:n]).mean(),
            buf.returns[:n].mean(),
            buf.values[:n].mean(),
        ]).tolist()
        reward, kl_ref, ret, value = stats
        if not all(math.isfinite(v) for v in (reward, ret, value)):
            raise TrainingDiverged(f"non-finite rollout statistics (reward {reward}, return {ret}, value {value}); "
                                   "parameters left unchanged")
        y = buf.returns[:n].flatten()
        var_y = torch.var(y)
        ev = float("nan") if var_y.item() == 0 else float(1 - torch.var(y - buf.values[:n].flatten()) / var_y)
        self._rollout_stats = {"reward_mean": reward, "kl_ref": kl_ref, "shaped_return_mean": ret,
                               "value_mean": value, "explained_variance": ev}
        for key, val in self._rollout_stats.items():
            self.logger.record(f"rollout/{key}", val)
        if self.validity_fn is not None:
            masks = buf.actions[: min(n, self.config.validity_max_masks)].cpu().numpy().astype(np.uint8)
            self._rollout_stats["validity"] = float(self.validity_fn(masks))
            self.logger.record("rollout/validity", self._rollout_stats["validity"])
        every = self.config.log_images_every
        if every > 0 and self._rollouts % every == 0:
            self.logger.record("images/rollout", Image(self._overlay(buf), "HWC"),
                               exclude=("stdout", "log", "json", "csv"))

    def _overlay(self, buf: PixelRolloutBuffer) -> np.ndarray:
        """(H, 3W, 3) float image: first image | sampled labels over it | reward map (gray)."""
        img = buf.obs[0, 0].float().cpu().numpy()
        img = (img - img.min()) / max(float(img.max() - img.min()), 1e-6)
        gray = np.repeat(img[..., None], 3, axis=2)
        labels = buf.actions[0].cpu().numpy().astype(np.int64)
        colour = _PALETTE[labels % len(_PALETTE)]
        over = np.where(labels[..., None] > 0, 0.5 * gray + 0.5 * colour, gray)
        rew = np.repeat(np.clip(buf.rewards[0].cpu().numpy(), 0, 1)[..., None], 3, axis=2)
        return np.concatenate([gray, over, rew], axis=1).astype(np.float32)

    def train(self) -> None:
        """K epochs of minibatch updates on the stored rollout with per-pixel clipped ratios.

        Overridden because SB3's PPO loss uses the joint log-probability of an action (the product of H*W pixel
        ratios), which clips most samples and barely learns; ratios, clipping and advantages are per pixel here.

        Every hyperparameter comes from ``self.config``; ``self.beta_kl`` and ``self.ent_coef`` are the current
        points of its schedules (:meth:`set_adaptation_iteration`). SB3's own copies (``self.vf_coef``,
        ``self.max_grad_norm``) are not read."""
        cfg = self.config
        policy = self.policy
        policy.set_training_mode(True)
        self._update_learning_rate(policy.optimizer)
        clip = cfg.clip_range
        buf = self.rollout_buffer
        params = [p for g in policy.optimizer.param_groups for p in g["params"]]
        # snapshot so that a divergence rolls back the whole update, not only the failing step
        self._snapshot.take(params, policy.optimizer)
        sums = torch.zeros(7, device=self.device)  # pg, value, entropy, approx_kl, clip_frac, count, supervised
        sup = self.supervised if cfg.supervised_coef > 0 and self.supervised is not None else None
        continue_training = True
        for epoch in range(cfg.n_epochs):
            epoch_kl = torch.zeros(2, device=self.device)
            for mb, n_global in self._minibatches(buf):
                values, log_prob, dist = policy.evaluate(mb.obs, mb.actions)
                adv = mb.advantages
                log_ratio = log_prob - mb.old_log_prob
                ratio = torch.exp(log_ratio)
                if n_global is None:  # one process: means over the minibatch
                    if cfg.normalize_advantage and adv.numel() > 1:
                        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
                    pg_loss = -torch.min(adv * ratio, adv * torch.clamp(ratio, 1 - clip, 1 + clip)).mean()
                    entropy = dist.entropy().mean()
                    value_loss = F.mse_loss(values, mb.returns)
                else:  # this rank's share of the means over the global minibatch (the gradients are summed)
                    if cfg.normalize_advantage:
                        adv = self._globally_normalised(adv if n_global > 0 else adv[:0])
                        adv = adv if n_global > 0 else torch.zeros_like(mb.advantages)
                    per_pixel = abs(n_global) * adv[0].numel()
                    pg_loss = -torch.min(adv * ratio, adv * torch.clamp(ratio, 1 - clip, 1 + clip)).sum() / per_pixel
                    entropy = dist.entropy().sum() / per_pixel
                    value_loss = ((values - mb.returns) ** 2).sum() / per_pixel
                loss = pg_loss - self.ent_coef * entropy + cfg.vf_coef * value_loss
                if n_global is not None and n_global < 0:
                    loss = loss * 0.0
                sup_loss = torch.zeros((), device=self.device)
                if sup is not None:
                    pick = torch.randint(0, sup[0].shape[0], (min(cfg.batch_size, sup[0].shape[0]),),
                                         generator=self._batch_gen).to(sup[0].device)
                    sup_logits, _ = policy.logits_and_values(sup[0][pick], with_values=False)
                    sup_loss = F.cross_entropy(sup_logits.float(), sup[1][pick])
                    loss = loss + cfg.supervised_coef * sup_loss / self.world.size  # every rank draws the same pairs
                policy.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                all_reduce_gradients(params, self.world, average=False)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                finite = torch.isfinite(loss.detach() + grad_norm)
                if self.world.active:  # every rank stops together, or none does
                    finite = all_reduce_sum((~finite).float().reshape(1), self.world)[0] == 0
                if not bool(finite):  # one sync per minibatch
                    policy.optimizer.zero_grad(set_to_none=True)
                    self._snapshot.restore(policy.optimizer)
                    raise TrainingDiverged(
                        f"non-finite PPO loss (policy {pg_loss.item()}, value {value_loss.item()}, "
                        f"entropy {entropy.item()}, grad norm {grad_norm.item()}) at epoch {epoch}; "
                        "parameters and optimizer state restored to their values before this update")
                policy.optimizer.step()
                if self._average is not None:
                    self._average.update()
                with torch.no_grad():
                    approx_kl = ((ratio - 1) - log_ratio).mean()
                    clip_frac = ((ratio - 1).abs() > clip).float().mean()
                    sums += torch.stack([pg_loss.detach(), value_loss.detach(), entropy.detach(), approx_kl,
                                         clip_frac, torch.ones((), device=self.device), sup_loss.detach()])
                    epoch_kl += torch.stack([approx_kl, torch.ones((), device=self.device)])
            self._n_updates += 1
            if cfg.target_kl is not None:
                all_reduce_sum(epoch_kl, self.world)  # the ranks decide together
                kl = float(epoch_kl[0] / epoch_kl[1])
                if kl > 1.5 * cfg.target_kl:
                    log.info("early stop at epoch %d: approx KL %.4f > 1.5 x target %.4f", epoch, kl, cfg.target_kl)
                    continue_training = False
            if not continue_training:
                break
        pg, vl, ent, akl, cf, cnt, sl = (sums / sums[5].clamp(min=1)).tolist()
        stats = dict(self._rollout_stats, policy_loss=pg, value_loss=vl, entropy=ent, approx_kl=akl,
                     clip_fraction=cf, supervised_loss=sl, beta_kl=float(self.beta_kl),
                     ent_coef=float(self.ent_coef),
                     learning_rate=float(self.lr_schedule(self._current_progress_remaining)),
                     images=float(self.num_timesteps))
        self.history.append(stats)
        for key in ("policy_loss", "value_loss", "entropy", "approx_kl", "clip_fraction", "supervised_loss",
                    "beta_kl", "ent_coef", "learning_rate"):
            self.logger.record(f"train/{key}", stats[key])
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        if self.verbose >= 1:
            log.info("update %d: reward %.4f kl_ref %.4f entropy %.4f clip %.3f", self._n_updates,
                     stats["reward_mean"], stats["kl_ref"], ent, cf)


# ---------------------------------------------------------------------------------------------- the loop's stage
@dataclass
class PolicyWeights:
    """The PPO stage's result: the policy weights an iteration hands on (``iter{k}/policy.pt``)."""
    state: dict[str, torch.Tensor]
    """The policy network's state dict (CPU tensors): the phase's (averaged) weights, or the previous ones when
    the phase was rejected."""
    argmax: np.ndarray | None = None
    """(N, H, W) uint8 argmax of these weights on the target patches, when known (not saved)."""
    def save(self, path: Path) -> None:
        """``torch.save`` the state dict to ``path`` atomically."""
        save_torch(path, self.state)

    @classmethod
    def load(cls, path: Path) -> "PolicyWeights":
        """Read weights written by :meth:`save` (on the CPU)."""
        return cls(state=torch.load(path, map_location="cpu"))

    @classmethod
    def of(cls, network: nn.Module, argmax: np.ndarray | None = None) -> "PolicyWeights":
        """A CPU copy of ``network``'s state dict."""
        return cls(state={k: v.detach().cpu().clone() for k, v in network.state_dict().items()}, argmax=argmax)


def ppo_phase(
    network: nn.Module,
    reference: nn.Module,
    images: torch.Tensor,
    reward_fn: RewardFn,
    cfg: PPOConfig,
    total_images: int,
    iteration: int = 0,
    n_iterations: int = 1,
    tensorboard_log: str | None = None,
    tb_name: str = "ppo",
    progress: bool = False,
    supervised: tuple[torch.Tensor, torch.Tensor] | None = None,
    seed: int = 0,
    world: World = SINGLE,
) -> dict:
    """One PPO phase of the adaptation loop: fine-tune ``network`` in place against ``reward_fn``.

    :param network: the policy network, (B, 1, H, W) -> logits (B, K, H, W); trained in place.
    :param reference: frozen source network for the KL term.
    :param images: (N, 1, H, W) float32 preprocessed target patches on the training device.
    :param reward_fn: per-pixel reward ``(images, actions, indices) -> (B, H, W)`` in [0, 1].
    :param total_images: one-step episodes (images) to consume.
    :param iteration: adaptation iteration (0-based), for the beta/entropy schedule of ``cfg``.
    :param supervised: (M, 1, H, W) float32 images and (M, H, W) int64 masks for ``cfg.supervised_coef``.
    :param seed: seed of the phase's image order, action sampling and minibatches.
    :param world: the data-parallel job (``total_images`` and ``cfg``'s batches are per process).
    :returns: the figures of the phase (the first and last update's logged values: reward, KL, entropy, clip
        fraction...); with ``cfg.weight_average_decay`` > 0 the network holds the phase's weight average.
    """
    model = PixelPPO.from_network(network, images, reward_fn, cfg, reference_network=reference,
                                  validity_fn=validity_rate, tensorboard_log=tensorboard_log,
                                  device=images.device, seed=seed, world=world)
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
    return stats
