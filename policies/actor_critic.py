"""A stable-baselines3 actor-critic policy around a segmentation network, with per-pixel actions and values.

The actor is any ``nn.Module`` mapping images (B, C, H, W) to logits (B, K, H, W) -- in this project the
nnU-Net ``PlainConvUNet`` (deep supervision off). Actions are one label per pixel, drawn from
:class:`~rl_adapt.policies.distribution.PixelCategorical`. The critic predicts one value per pixel, either

* ``value_head="shared"`` (default): a 1x1 convolution on the last decoder features of the actor (captured
  by a forward pre-hook on the network's final segmentation convolution), almost free; by default the
  features are detached for the value loss, so the critic never moves the pretrained actor; or
* ``value_head="separate"``: a small separate U-Net critic on the image, which costs an extra forward and
  backward pass but keeps value-loss gradients out of the segmentation network.

The SB3 action space is ``MultiDiscrete([K] * H * W)`` (1-D, as SB3's checkers want); internally actions
are (B, H, W). SB3-shaped methods (``forward``, ``evaluate_actions``, ``predict_values``) reduce over
pixels (joint log-prob = sum, value = mean) for compatibility; :class:`rl_adapt.engine.ppo.PixelPPO` uses the
per-pixel methods (:meth:`PixelActorCriticPolicy.act`, :meth:`PixelActorCriticPolicy.evaluate`).

A frozen copy of the source network (``reference_network``: no gradients, always in eval mode) gives the
reference log-probabilities of the KL penalty.

Why the default critic is the detached shared 1x1 head (measured on the CI oracle task, 32x32 blobs,
3 classes, tiny U-Net, 1 CPU thread): pixel accuracy after 64/128/192 images was 0.725/0.885/0.942 with the
detached head, identical with a separate (8,16,32) U-Net critic, and 0.720/0.832/0.912 when value-loss
gradients flow into the shared features; the separate critic costs an extra forward+backward per image
(2-3x slower at that size). Detached-shared is the cheapest and learns as fast per image.
"""
from __future__ import annotations

import copy
import logging
from contextlib import nullcontext
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.policies import ActorCriticPolicy
from torch import nn

from rl_adapt.policies.distribution import PixelCategorical
from dynamic_network_architectures.architectures.unet import PlainConvUNet

log = logging.getLogger(__name__)

ValueHead = Literal["shared", "separate"]


def plain_unet(
    input_channels: int = 1,
    num_classes: int = 4,
    features: Sequence[int] = (8, 16, 32),
    n_conv_per_stage: int = 2,
) -> nn.Module:
    """Build a 2D ``PlainConvUNet`` the way nnU-Net does (InstanceNorm affine, LeakyReLU, stride-2 stages).

    Picklable as ``functools.partial(plain_unet, ...)``: used as the separate critic and in tests.

    :param input_channels: image channels C.
    :param num_classes: output channels K (logits (B, K, H, W)); H and W must be divisible by
        ``2 ** (len(features) - 1)``.
    :param features: channels per stage (one entry per resolution stage).
    :param n_conv_per_stage: convolutions per encoder stage (decoder: one fewer stage, same count).
    """

    n = len(features)
    return PlainConvUNet(
        input_channels=input_channels,
        n_stages=n,
        features_per_stage=list(features),
        conv_op=nn.Conv2d,
        kernel_sizes=[[3, 3]] * n,
        strides=[[1, 1]] + [[2, 2]] * (n - 1),
        n_conv_per_stage=[n_conv_per_stage] * n,
        num_classes=num_classes,
        n_conv_per_stage_decoder=[n_conv_per_stage] * (n - 1),
        conv_bias=True,
        norm_op=nn.InstanceNorm2d,
        norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=nn.LeakyReLU,
        nonlin_kwargs={"inplace": True},
        deep_supervision=False,
    )


def find_segmentation_head(network: nn.Module, num_classes: int) -> nn.Conv2d:
    """The network's final 1x1 segmentation convolution (its input = the last decoder features).

    ``network.decoder.seg_layers[-1]`` for nnU-Net/dynamic_network_architectures U-Nets, else the last
    ``nn.Conv2d`` with ``out_channels == num_classes``.
    """
    seg_layers = getattr(getattr(network, "decoder", None), "seg_layers", None)
    if seg_layers is not None and len(seg_layers) > 0 and isinstance(seg_layers[-1], nn.Conv2d):
        return seg_layers[-1]
    found = None
    for module in network.modules():
        if isinstance(module, nn.Conv2d) and module.out_channels == num_classes:
            found = module
    if found is None:
        raise ValueError(f"no Conv2d with {num_classes} output channels in the network: use value_head='separate'")
    return found


class FeatureTap:
    """Forward pre-hook that keeps the input of a layer (the last decoder features) for the value head."""
    def __init__(self) -> None:
        self.features: torch.Tensor | None = None

    def __call__(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        self.features = inputs[0]

    def pop(self) -> torch.Tensor:
        """Return the captured features and forget them (no reference kept between calls)."""
        feats, self.features = self.features, None
        if feats is None:
            raise RuntimeError("the segmentation head was not called during the forward pass")
        return feats

    def __getstate__(self) -> dict:
        return {"features": None}


def _attach_tap(layer: nn.Module) -> FeatureTap:
    """Register a fresh :class:`FeatureTap` on ``layer``, removing any tap left by a previous policy."""
    for key, hook in list(layer._forward_pre_hooks.items()):
        if isinstance(hook, FeatureTap):
            del layer._forward_pre_hooks[key]
    tap = FeatureTap()
    layer.register_forward_pre_hook(tap)
    return tap


def freeze(network: nn.Module) -> nn.Module:
    """Put ``network`` in eval mode with ``requires_grad=False`` on every parameter; returns it."""
    network.eval()
    for p in network.parameters():
        p.requires_grad_(False)
    return network


class PixelActorCriticPolicy(ActorCriticPolicy):
    """SB3 actor-critic policy with per-pixel categorical actions and per-pixel values.

    :param observation_space: ``Box`` (C, H, W) float32, images already normalised (no SB3 scaling).
    :param action_space: ``MultiDiscrete([K] * H * W)``.
    :param lr_schedule: SB3 learning-rate schedule (``lr_schedule(1)`` is the initial rate).
    :param network: the segmentation network (B, C, H, W) -> logits (B, K, H, W); trained in place (the
        policy keeps this very object as ``self.network``). Give this or ``network_fn``.
    :param network_fn: picklable zero-argument callable returning the network (e.g. a
        ``functools.partial`` of a top-level builder). Ignored when ``network`` is given.
    :param reference_network: frozen reference policy for the KL penalty; default: a copy of the network
        as it is when the policy is built (the source policy).
    :param value_head: "shared" (1x1 conv on the last decoder features) or "separate" (small U-Net critic).
    :param detach_value_features: with "shared", stop value-loss gradients at the shared features.
    :param critic_features: channels per stage of the separate critic.
    :param use_bf16: bf16 autocast for the networks on CUDA (ignored on CPU).
    :param optimizer_class: optimizer; :param optimizer_kwargs: its arguments except the learning rate.
    :param kwargs: other SB3 ``ActorCriticPolicy`` arguments (``use_sde`` must be False).
    """

    def __init__(
        self,
        observation_space: spaces.Box,
        action_space: spaces.MultiDiscrete,
        lr_schedule: Callable[[float], float],
        network: nn.Module | None = None,
        network_fn: Callable[[], nn.Module] | None = None,
        reference_network: nn.Module | None = None,
        value_head: ValueHead = "shared",
        detach_value_features: bool = True,
        critic_features: Sequence[int] = (8, 16, 32),
        use_bf16: bool = True,
        optimizer_class: type[torch.optim.Optimizer] = torch.optim.Adam,
        optimizer_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        if not isinstance(action_space, spaces.MultiDiscrete) or action_space.nvec.ndim != 1:
            raise ValueError(f"action_space must be a 1-D MultiDiscrete([K]*H*W), got {action_space}")
        if not isinstance(observation_space, spaces.Box) or len(observation_space.shape) != 3:
            raise ValueError(f"observation_space must be a Box (C, H, W), got {observation_space}")
        nvec = np.asarray(action_space.nvec)
        if not np.all(nvec == nvec[0]):
            raise ValueError("every pixel must have the same number of classes")
        c, h, w = observation_space.shape
        if h * w != nvec.size:
            raise ValueError(f"action space has {nvec.size} entries, observation has {h}x{w} pixels")
        if network is None and network_fn is None:
            raise ValueError("give the segmentation network or a network_fn that builds it")
        if value_head not in ("shared", "separate"):
            raise ValueError(f"value_head must be 'shared' or 'separate', got {value_head!r}")
        if kwargs.get("use_sde"):
            raise ValueError("gSDE does not apply to per-pixel categorical actions")
        kwargs.pop("use_sde", None)
        kwargs.setdefault("normalize_images", False)
        # Plain attributes (not nn.Module) may be set before nn.Module.__init__; modules wait for _build.
        self._pending_modules = (network, reference_network)
        self.network_fn = network_fn
        self.value_head_kind: ValueHead = value_head
        self.detach_value_features = bool(detach_value_features)
        self.critic_features = tuple(int(f) for f in critic_features)
        self.use_bf16 = bool(use_bf16)
        self.num_classes = int(nvec[0])
        self.image_shape = (int(c), int(h), int(w))
        super().__init__(
            observation_space,
            action_space,
            lr_schedule,
            optimizer_class=optimizer_class,
            optimizer_kwargs=optimizer_kwargs,
            **kwargs,
        )

    # ------------------------------------------------------------------ construction
    def _build(self, lr_schedule: Callable[[float], float]) -> None:
        """Create actor, frozen reference, value head and optimizer (replaces SB3's MLP construction)."""
        network, reference = self._pending_modules
        self._pending_modules = (None, None)
        if network is None:
            network = self.network_fn()  # type: ignore[misc]
        # copy the reference before any hook is attached to the network
        if reference is None:
            reference = copy.deepcopy(network)
        self.network = network
        self.reference_network = freeze(reference)
        self._tap: FeatureTap | None = None
        if self.value_head_kind == "shared":
            head = find_segmentation_head(network, self.num_classes)
            self._tap = _attach_tap(head)
            self.value_net = nn.Conv2d(head.in_channels, 1, kernel_size=1)
            self.critic = None
        else:
            self.value_net = None
            self.critic = plain_unet(self.image_shape[0], 1, self.critic_features)
        # start from V = 0 everywhere with small weights: advantages begin as the shaped rewards
        last = self.value_net if self.value_net is not None else find_segmentation_head(self.critic, 1)
        nn.init.normal_(last.weight, std=1e-3)
        nn.init.zeros_(last.bias)
        trainable = [p for p in self.parameters() if p.requires_grad]
        self.optimizer = self.optimizer_class(trainable, lr=lr_schedule(1), **self.optimizer_kwargs)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        for key in ("net_arch", "activation_fn", "ortho_init", "log_std_init", "squash_output", "full_std", "use_expln",
                    "use_sde"):
            data.pop(key, None)
        data.update(
            network=self.network if self.network_fn is None else None,
            network_fn=self.network_fn,
            value_head=self.value_head_kind,
            detach_value_features=self.detach_value_features,
            critic_features=self.critic_features,
            use_bf16=self.use_bf16,
        )
        return data

    def train(self, mode: bool = True) -> "PixelActorCriticPolicy":
        """Set train/eval mode; the reference network always stays in eval mode."""
        super().train(mode)
        self.reference_network.eval()
        return self

    # ------------------------------------------------------------------ per-pixel API
    def autocast(self, device: torch.device):
        """bf16 autocast context on CUDA when enabled, else a no-op."""
        if self.use_bf16 and device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return nullcontext()

    def _as_images(self, obs: torch.Tensor) -> torch.Tensor:
        if obs.dim() == 2:  # flattened observations
            obs = obs.reshape(-1, *self.image_shape)
        return obs if obs.dtype == torch.float32 else obs.float()

    def logits_and_values(self, obs: torch.Tensor, with_values: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run actor (and critic) on images.

        :param obs: images (B, C, H, W) float32.
        :param with_values: also compute the per-pixel values.
        :return: logits (B, K, H, W) (bf16 under CUDA autocast) and values (B, H, W) float32 or None.
        """
        obs = self._as_images(obs)
        with self.autocast(obs.device):
            logits = self.network(obs)
            values = None
            if self._tap is not None:
                feats = self._tap.pop()
                if with_values:
                    if self.detach_value_features:
                        feats = feats.detach()
                    values = self.value_net(feats)
            elif with_values:
                values = self.critic(obs)
        if values is not None:
            values = values[:, 0].float()
        return logits, values

    def act(
        self, obs: torch.Tensor, deterministic: bool = False, generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, PixelCategorical]:
        """Sample (or take the mode of) one label per pixel.

        :param noise: optional ``Exp(1)`` draws (B, K, H, W) of the sampling (see :meth:`PixelCategorical.sample`).
        :return: actions (B, H, W) int64, values (B, H, W) float32, log-probs (B, H, W) float32, distribution.
        """
        logits, values = self.logits_and_values(obs)
        dist = PixelCategorical(logits)
        actions = dist.mode() if deterministic else dist.sample(generator, noise)
        return actions, values, dist.log_prob(actions), dist

    def evaluate(self, obs: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, PixelCategorical]:
        """Per-pixel values (B, H, W), log-probs of ``actions`` (B, H, W) and the distribution, with gradients."""
        logits, values = self.logits_and_values(obs)
        dist = PixelCategorical(logits)
        return values, dist.log_prob(self._as_actions(actions)), dist

    @torch.no_grad()
    def reference_log_prob(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Log-probabilities (B, H, W) float32 of ``actions`` (B, H, W) under the frozen reference network."""
        obs = self._as_images(obs)
        with self.autocast(obs.device):
            logits = self.reference_network(obs)
        return PixelCategorical(logits).log_prob(self._as_actions(actions))

    def _as_actions(self, actions: torch.Tensor) -> torch.Tensor:
        _, h, w = self.image_shape
        return actions.reshape(-1, h, w).long()

    # ------------------------------------------------------------------ SB3 API (reduced over pixels)
    def forward(self, obs: torch.Tensor, deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """SB3 shape: flattened actions (B, H*W) int64, mean value (B, 1), joint log-prob (B,)."""
        actions, values, logp, _ = self.act(obs, deterministic)
        return actions.reshape(actions.shape[0], -1), values.mean(dim=(1, 2)).unsqueeze(1), logp.sum(dim=(1, 2))

    def evaluate_actions(self, obs: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """SB3 shape: mean value (B, 1), joint log-prob (B,), summed entropy (B,) of flattened ``actions``."""
        values, logp, dist = self.evaluate(obs, actions)
        return values.mean(dim=(1, 2)).unsqueeze(1), logp.sum(dim=(1, 2)), dist.entropy("sum")

    def get_distribution(self, obs: torch.Tensor) -> PixelCategorical:  # type: ignore[override]
        """The per-pixel distribution for images (B, C, H, W)."""
        logits, _ = self.logits_and_values(obs, with_values=False)
        return PixelCategorical(logits)

    def predict_values(self, obs: torch.Tensor) -> torch.Tensor:
        """SB3 shape: mean per-pixel value per image, (B, 1)."""
        _, values = self.logits_and_values(obs)
        return values.mean(dim=(1, 2)).unsqueeze(1)

    def _predict(self, observation: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
        """Labels (B, H, W) int64: argmax when deterministic, else sampled (SB3 flattens them)."""
        return self.get_distribution(observation).get_actions(deterministic)
