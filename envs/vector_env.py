"""Batched, device-resident one-step segmentation environment (the PPO training path).

Holds the image set as one torch tensor on the training device, serves ``num_envs`` images per step and
scores all label maps with the reward function in one batched call. Observations, rewards, flags and
reward maps are torch tensors on that device: no numpy round trip on the hot path.

Every episode lasts one step, so autoreset is "same step": ``step`` returns the *next* batch of images as
observations, with the scored images in ``info["final_obs"]``. Images are drawn without replacement
within an epoch over the set (a seeded permutation, renewed when exhausted).
"""
from __future__ import annotations

from typing import Any

import torch
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from rl_adapt.envs.segmentation_env import RewardFn, image_space, label_space


class TorchSegmentationVecEnv(VectorEnv):
    """``num_envs`` one-step segmentation episodes at a time, as torch tensors on ``device``.

    :param images: image set, (N, 1, H, W) float32 tensor (or array), already normalised; moved to ``device``.
    :param num_classes: K, labels per pixel.
    :param reward_fn: ``(images (B,1,H,W) float32, actions (B,H,W) int64, indices (B,) int64) -> (B,H,W) float in
        [0, 1]`` (the indices of the scored images in ``images``, on ``device``).
    :param num_envs: B, images per step.
    :param device: where images, actions and rewards live.
    :param seed: seed of the image order (also settable through ``reset(seed=...)``).
    :param rank: this process's rank in a data-parallel job, and ``world_size`` the number of processes: every
        process draws the same image order, takes global batches of ``num_envs * world_size`` images and serves its
        own slice of each (``num_envs`` images), so the processes together serve what one process with
        ``num_envs * world_size`` would. Defaults: one process.
    """

    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP}

    def __init__(self, images: torch.Tensor, num_classes: int, reward_fn: RewardFn, num_envs: int = 8,
                 device: str | torch.device = "cpu", seed: int | None = None, rank: int = 0, world_size: int = 1):
        images = torch.as_tensor(images)
        if images.dim() != 4 or images.shape[1] != 1 or images.shape[0] == 0:
            raise ValueError(f"images must be (N, 1, H, W) with N >= 1, got {tuple(images.shape)}")
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        self.device = torch.device(device)
        self.images = images.to(self.device, torch.float32).contiguous()
        self.reward_fn = reward_fn
        self.num_envs = int(num_envs)
        self.num_classes = int(num_classes)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        self.rank, self.world_size = int(rank), int(world_size)
        _, c, h, w = self.images.shape
        self.single_observation_space = image_space((c, h, w))
        self.single_action_space = label_space(num_classes, h, w)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self._order_gen = torch.Generator(device="cpu")
        self._order_gen.manual_seed(0 if seed is None else int(seed))
        self._order = torch.empty(0, dtype=torch.int64)
        self._cursor = 0
        self._indices: torch.Tensor | None = None
        self._obs: torch.Tensor | None = None

    # ------------------------------------------------------------------ sampling
    def seed(self, seed: int | None) -> None:
        """Re-seed the image order (restarts the epoch)."""
        if seed is not None:
            self._order_gen.manual_seed(int(seed))
            self._order = torch.empty(0, dtype=torch.int64)
            self._cursor = 0

    def _next_indices(self) -> torch.Tensor:
        """Next B image indices (CPU int64): without replacement within each pass over the set (this rank's slice of
        the next global batch in a data-parallel job)."""
        batch = self._next_global_indices(self.num_envs * self.world_size)
        return batch if self.world_size == 1 else batch[self.rank * self.num_envs:(self.rank + 1) * self.num_envs]

    def _next_global_indices(self, need: int) -> torch.Tensor:
        parts = []
        while need > 0:
            if self._cursor >= len(self._order):
                self._order = torch.randperm(len(self.images), generator=self._order_gen)
                self._cursor = 0
            take = self._order[self._cursor : self._cursor + need]
            self._cursor += len(take)
            need -= len(take)
            parts.append(take)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _serve(self) -> torch.Tensor:
        self._indices = self._next_indices()
        self._obs = self.images.index_select(0, self._indices.to(self.device))
        return self._obs

    # ------------------------------------------------------------------ gymnasium API
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[torch.Tensor, dict]:
        """Start B new episodes: returns (obs (B,1,H,W) float32 tensor, {"index": (B,) int64 CPU tensor})."""
        self.seed(seed)
        obs = self._serve()
        return obs, {"index": self._indices}

    @torch.no_grad()
    def step(self, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """Score label maps for the current images and serve the next batch.

        :param actions: labels (B, H, W) or flattened (B, H*W), integer tensor.
        :return: next obs (B,1,H,W); reward (B,) float32 = mean of the reward map; terminated (B,) all True;
            truncated (B,) all False; info with "reward_map" (B,H,W) float32, "final_obs" (the scored images
            (B,1,H,W)), "index" (B,) of the scored images and "next_index" (B,) of the images served next.
        """
        if self._obs is None:
            raise RuntimeError("call reset() before step()")
        images, indices = self._obs, self._indices
        _, _, h, w = images.shape
        labels = torch.as_tensor(actions, device=self.device).reshape(self.num_envs, h, w).long()
        reward_map = self.reward_fn(images, labels, indices.to(self.device)).float()
        if reward_map.shape != labels.shape:
            raise ValueError(f"reward_fn returned shape {tuple(reward_map.shape)}, expected {tuple(labels.shape)}")
        reward = reward_map.mean(dim=(1, 2))
        terminated = torch.ones(self.num_envs, dtype=torch.bool, device=self.device)
        truncated = torch.zeros_like(terminated)
        obs = self._serve()
        info = {"reward_map": reward_map, "final_obs": images, "index": indices, "next_index": self._indices}
        return obs, reward, terminated, truncated, info

    def close_extras(self, **kwargs: Any) -> None:
        self._obs = None
