"""Segmentation environments: the Gymnasium and SB3 checkers, and the batched torch env's contract."""
import warnings

import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

from rl_adapt.envs.segmentation_env import SegmentationEnv
from rl_adapt.envs.vector_env import TorchSegmentationVecEnv


def _images(n=6, size=16, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).normal(size=(n, 1, size, size)).astype(np.float32))


def _foreground_reward(images, actions, indices=None):
    """Oracle: label 1 where the image is positive, 0 elsewhere."""
    return (actions == (images[:, 0] > 0).long()).float()


def test_segmentation_env_passes_gymnasium_and_sb3_checkers():
    env = SegmentationEnv(_images(), num_classes=3, reward_fn=_foreground_reward)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SB3 warns that float images are not uint8: intended
        gym_check_env(env, skip_render_check=True)
        sb3_check_env(env, warn=False)


def test_segmentation_env_step_reward_is_mean_of_reward_map():
    images = _images()
    env = SegmentationEnv(images.numpy(), num_classes=2, reward_fn=_foreground_reward)
    obs, info = env.reset(seed=3)
    assert obs.shape == (1, 16, 16) and obs.dtype == np.float32
    truth = (obs[0] > 0).astype(np.int64)
    _, r, terminated, truncated, info = env.step(truth.reshape(-1))
    assert r == 1.0 and terminated and not truncated
    assert info["reward_map"].shape == (16, 16) and info["reward_map"].dtype == np.float32
    env.reset(seed=3)
    _, r, _, _, info = env.step(1 - truth.reshape(-1))
    assert r == 0.0 and float(info["reward_map"].mean()) == r
    # seeding: same seed, same image
    a, _ = env.reset(seed=7)
    b, _ = env.reset(seed=7)
    assert np.array_equal(a, b)
    with pytest.raises(ValueError):
        SegmentationEnv(np.zeros((2, 16, 16), np.float32), 2, _foreground_reward)


def test_vector_env_serves_batches_without_replacement_and_scores_in_one_call():
    images = _images(n=10)
    calls, scored = [], []

    def reward(imgs, actions, indices):
        calls.append(imgs.shape[0])
        scored.append(indices.cpu())
        return _foreground_reward(imgs, actions)

    env = TorchSegmentationVecEnv(images, num_classes=2, reward_fn=reward, num_envs=4, seed=1)
    obs, info = env.reset()
    seen = [info["index"]]
    assert isinstance(obs, torch.Tensor) and obs.shape == (4, 1, 16, 16)
    assert torch.equal(obs, images[info["index"]])
    truth = (obs[:, 0] > 0).long()
    nxt, rew, term, trunc, info = env.step(truth.reshape(4, -1))  # flattened actions accepted
    assert calls == [4]
    assert torch.equal(rew, torch.ones(4)) and bool(term.all()) and not bool(trunc.any())
    assert info["reward_map"].shape == (4, 16, 16) and torch.equal(info["final_obs"], obs)
    # same-step autoreset: the next observations are the next images
    assert torch.equal(info["index"], seen[0])
    assert torch.equal(scored[0], seen[0])  # the reward is told which images it scores
    for _ in range(2):
        _, _, _, _, info = env.step(torch.zeros(4, 16, 16, dtype=torch.long))
        seen.append(info["index"])  # the images scored in this step
    idx = torch.cat(seen).tolist()
    assert sorted(idx[:10]) == list(range(10))  # first epoch: every image once
    # seeded order: the same seed replays the same sequence
    a = TorchSegmentationVecEnv(images, 2, reward, num_envs=3, seed=5)
    b = TorchSegmentationVecEnv(images, 2, reward, num_envs=3, seed=5)
    assert torch.equal(a.reset()[1]["index"], b.reset()[1]["index"])
    assert a.single_action_space.shape == (256,) and a.observation_space.shape == (3, 1, 16, 16)


def test_vector_env_rejects_wrong_reward_shape():
    env = TorchSegmentationVecEnv(_images(), 2, lambda i, a, idx: torch.zeros(2, 2), num_envs=2)
    env.reset()
    with pytest.raises(ValueError, match="reward_fn returned shape"):
        env.step(torch.zeros(2, 16, 16, dtype=torch.long))
