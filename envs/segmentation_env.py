"""One-step segmentation environment: observe an image, answer with a label map, get a pixel reward map.

``SegmentationEnv`` is the plain Gymnasium form (numpy in and out, one image per episode) that passes the
Gymnasium and stable-baselines3 environment checkers; the training path uses the batched, device-resident
:class:`rl_adapt.envs.vector_env.TorchSegmentationVecEnv`, which shares the same spaces and reward contract.

Reward contract (everywhere in the project)::

    reward_fn(images (B, 1, H, W) float32 tensor, actions (B, H, W) int64 tensor,
              indices (B,) int64 tensor: which images of the set these are) -> (B, H, W) float in [0, 1]

The indices let a reward look up per-image data (e.g. the corrected mask of each image) without reaching into
the environment.
"""
from __future__ import annotations

from typing import Any, Callable

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

RewardFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


#: bound of the observation Box: preprocessed (z-scored) intensities stay far inside +-1e4.
OBS_BOUND = 1.0e4


def image_space(shape: tuple[int, int, int]) -> spaces.Box:
    """Observation space of one preprocessed image: Box (C, H, W) float32 in [-OBS_BOUND, OBS_BOUND]."""
    return spaces.Box(low=-OBS_BOUND, high=OBS_BOUND, shape=tuple(int(s) for s in shape), dtype=np.float32)


def label_space(num_classes: int, height: int, width: int) -> spaces.MultiDiscrete:
    """Action space of one label map, flattened row-major: MultiDiscrete([K] * H * W) (1-D, as SB3 wants)."""
    return spaces.MultiDiscrete(np.full(height * width, int(num_classes), dtype=np.int64))


class SegmentationEnv(gym.Env):
    """One episode = one image; one step = one label map; ``terminated=True`` after it.

    :param images: image set, (N, 1, H, W) float32 (numpy or torch), already normalised.
    :param num_classes: K, labels per pixel (0..K-1).
    :param reward_fn: pixel reward function (see module docstring); called with batch size 1 on ``device``.
    :param device: torch device for the reward function.
    """

    metadata = {"render_modes": []}

    def __init__(self, images: np.ndarray | torch.Tensor, num_classes: int, reward_fn: RewardFn,
                 device: str | torch.device = "cpu"):
        super().__init__()
        if isinstance(images, torch.Tensor):
            images = images.detach().cpu().numpy()
        images = np.asarray(images, dtype=np.float32)
        if images.ndim != 4 or images.shape[1] != 1 or images.shape[0] == 0:
            raise ValueError(f"images must be (N, 1, H, W) with N >= 1, got {images.shape}")
        self.images = images
        self.reward_fn = reward_fn
        self.device = torch.device(device)
        _, c, h, w = images.shape
        self.observation_space = image_space((c, h, w))
        self.action_space = label_space(num_classes, h, w)
        self._index: int | None = None

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        """Draw an image uniformly (``options={"index": i}`` picks one); returns (obs (1,H,W) float32, info)."""
        super().reset(seed=seed)
        if options and "index" in options:
            self._index = int(options["index"])
        else:
            self._index = int(self.np_random.integers(len(self.images)))
        return self.images[self._index].copy(), {"index": self._index}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        """Score a flattened label map (H*W,) int; returns (obs, mean reward, terminated, truncated, info).

        ``info["reward_map"]`` is the (H, W) float32 pixel reward map.
        """
        if self._index is None:
            raise RuntimeError("call reset() before step()")
        _, _, h, w = self.images.shape
        image = torch.from_numpy(self.images[self._index : self._index + 1]).to(self.device)
        labels = torch.as_tensor(np.asarray(action), dtype=torch.int64, device=self.device).reshape(1, h, w)
        with torch.no_grad():
            index = torch.tensor([self._index], dtype=torch.int64, device=self.device)
            reward_map = self.reward_fn(image, labels, index)[0].float().cpu().numpy()
        obs = self.images[self._index].copy()
        info = {"reward_map": reward_map, "index": self._index}
        self._index = None
        return obs, float(reward_map.mean()), True, False, info
