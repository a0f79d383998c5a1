"""Pixel-wise PPO: the policy's SB3 surface, oracle learning, determinism, save/load, NaN guard, logging."""
import functools
import time

import numpy as np
import pytest
from stable_baselines3.common.logger import Logger
import torch
from gymnasium import spaces

from rl_adapt.errors import TrainingDiverged
from rl_adapt.policies.actor_critic import PixelActorCriticPolicy, plain_unet
from rl_adapt.engine.ppo import PixelPPO, PPOConfig
from conftest import TEST_THREADS  # noqa: E402

SIZE = 32
K = 3


def blobs(n, size=SIZE, noise=0.9, seed=0):
    """Noisy synthetic 'cavity + wall' images: label 1 a disc, 2 a ring around it, 0 background."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images = np.zeros((n, 1, size, size), np.float32)
    labels = np.zeros((n, size, size), np.int64)
    for i in range(n):
        cy, cx = g.uniform(10, size - 10, 2)
        r = g.uniform(5, 9)
        d = np.hypot(yy - cy, xx - cx)
        lab = np.zeros((size, size), np.int64)
        lab[d < r + 3] = 2
        lab[d < r] = 1
        img = np.select([lab == 1, lab == 2], [0.2, 1.0], -0.6) + g.normal(0, noise, (size, size))
        images[i, 0] = (img - img.mean()) / img.std()
        labels[i] = lab
    return torch.from_numpy(images), torch.from_numpy(labels)


def oracle_reward(images_all, labels_all):
    """reward_fn scoring actions against the true labels of the served images (found by exact pixel match)."""
    keys = images_all[:, 0, 0, :8]

    def reward(images, actions, indices):
        idx = (images[:, None, 0, 0, :8] == keys[None]).all(-1).float().argmax(1)
        return (actions == labels_all.to(actions.device)[idx]).float()

    return reward


def tiny_net(seed=0):
    torch.manual_seed(seed)
    return plain_unet(1, K, (4, 8, 16))


def pixel_accuracy(model, images, labels):
    with torch.no_grad():
        return float((model.policy.get_distribution(images).mode() == labels).float().mean())


def make_model(images, labels, network=None, seed=0, **cfg_kwargs):
    cfg = dict(lr=1e-3, n_envs=8, n_steps=2, batch_size=8)
    cfg.update(cfg_kwargs)
    return PixelPPO.from_network(tiny_net() if network is None else network, images, oracle_reward(images, labels),
                                 PPOConfig(**cfg), device="cpu", seed=seed)


@pytest.fixture(scope="module")
def data():
    return blobs(64)


def test_policy_sb3_surface(data):
    images, _ = data
    obs_space = spaces.Box(-1e4, 1e4, (1, SIZE, SIZE), np.float32)
    act_space = spaces.MultiDiscrete([K] * SIZE * SIZE)
    net = tiny_net()
    policy = PixelActorCriticPolicy(obs_space, act_space, lambda _: 1e-3, network=net)
    assert policy.network is net and policy.normalize_images is False
    ref_params = list(policy.reference_network.parameters())
    assert ref_params and not any(p.requires_grad for p in ref_params)
    assert not any(p is q for p in policy.optimizer.param_groups[0]["params"] for q in ref_params)
    policy.set_training_mode(True)
    assert policy.network.training and not policy.reference_network.training
    x = images[:4]
    actions, values, logp = policy(x)
    assert actions.shape == (4, SIZE * SIZE) and values.shape == (4, 1) and logp.shape == (4,)
    v, lp, ent = policy.evaluate_actions(x, actions)
    assert torch.allclose(lp, logp, atol=1e-4) and ent.shape == (4,) and v.shape == (4, 1)
    assert policy.predict_values(x).shape == (4, 1)
    # per-pixel API
    a, vals, lpp, dist = policy.act(x, deterministic=True)
    assert a.shape == vals.shape == lpp.shape == (4, SIZE, SIZE)
    assert torch.equal(a, net(x).argmax(1))
    # SB3 predict: flattened argmax, batched and single
    pred, _ = policy.predict(x.numpy(), deterministic=True)
    assert pred.shape == (4, SIZE * SIZE) and np.array_equal(pred, a.reshape(4, -1).numpy())
    single, _ = policy.predict(x[0].numpy(), deterministic=True)
    assert single.shape == (SIZE * SIZE,)
    # reference equals the source at construction
    assert torch.allclose(policy.reference_log_prob(x, a), lpp, atol=1e-5)
    # separate critic works too
    sep = PixelActorCriticPolicy(obs_space, act_space, lambda _: 1e-3, network=tiny_net(), value_head="separate")
    assert sep.act(x)[1].shape == (4, SIZE, SIZE)


def test_oracle_reward_raises_pixel_accuracy(data):
    """CI learning test: tiny net, 32x32 blobs, 3 classes, true-label reward, RL4Seg coefficients."""
    torch.set_num_threads(TEST_THREADS)
    images, labels = data
    model = make_model(images, labels, ent_coef=0.15, beta_kl=0.05)
    before = pixel_accuracy(model, images, labels)
    start = time.perf_counter()
    model.learn(total_timesteps=256)
    elapsed = time.perf_counter() - start
    after = pixel_accuracy(model, images, labels)
    print(f"oracle pixel accuracy {before:.3f} -> {after:.3f} in {elapsed:.1f} s, 256 images")
    assert after >= before + 0.2 and after > 0.85
    h = model.history[-1]
    assert h["reward_mean"] > model.history[0]["reward_mean"]
    for key in ("kl_ref", "entropy", "approx_kl", "clip_fraction", "explained_variance", "value_loss"):
        assert np.isfinite(h[key]), key
    assert h["kl_ref"] > 0  # the policy moved away from the frozen source


def test_same_seed_same_parameters(data):
    images, labels = data
    params = []
    for _ in range(2):
        model = make_model(images, labels)
        model.learn(32)
        params.append(torch.cat([p.detach().flatten() for p in model.policy.parameters()]))
    assert torch.equal(params[0], params[1])
    other = make_model(images, labels, seed=1)
    other.learn(32)
    assert not torch.equal(params[0], torch.cat([p.detach().flatten() for p in other.policy.parameters()]))


@pytest.mark.parametrize("how", ["module", "network_fn"])
def test_save_load_round_trip(data, tmp_path, how):
    images, labels = data
    if how == "module":
        model = make_model(images, labels)
    else:
        cfg = PPOConfig(lr=1e-3, n_envs=8, n_steps=2, batch_size=8)
        model = PixelPPO.from_network(None, images, oracle_reward(images, labels), cfg, device="cpu",
                                      network_fn=functools.partial(plain_unet, 1, K, (4, 8, 16)))
    model.learn(16)
    path = tmp_path / "model.zip"
    model.save(path)
    loaded = PixelPPO.load(path, device="cpu")
    x = images[:6].numpy()
    assert np.array_equal(model.predict(x, deterministic=True)[0], loaded.predict(x, deterministic=True)[0])
    for (k, a), (_, b) in zip(model.policy.state_dict().items(), loaded.policy.state_dict().items()):
        assert torch.equal(a, b), k
    assert loaded.config == model.config and loaded.num_timesteps == model.num_timesteps
    # continue training after load with a fresh env
    loaded.set_env(model.env)
    loaded.learn(16, reset_num_timesteps=False)
    assert loaded.num_timesteps == 32


def test_non_finite_reward_raises_before_any_update(data):
    images, labels = data
    model = PixelPPO.from_network(tiny_net(), images, lambda i, a, idx: torch.full(a.shape, float("nan")),
                                  PPOConfig(n_envs=8, n_steps=1), device="cpu")
    before = [p.detach().clone() for p in model.policy.parameters()]
    with pytest.raises(TrainingDiverged):
        model.learn(8)
    assert all(torch.equal(a, b) for a, b in zip(before, model.policy.parameters()))


def test_non_finite_loss_rolls_back_the_whole_update(data):
    images, labels = data
    model = make_model(images, labels, n_epochs=3)
    model.learn(16)
    model.train()  # a second update: the snapshot buffers are refilled, not reallocated
    before = [p.detach().clone() for p in model.policy.parameters()]
    model.rollout_buffer.advantages[5, 0, 0] = float("inf")  # e.g. an overflow inside an update
    optim_before = model.policy.optimizer.state_dict()["state"][0]["exp_avg"].clone()
    with pytest.raises(TrainingDiverged, match="non-finite PPO loss"):
        model.train()
    assert all(torch.equal(a, b) for a, b in zip(before, model.policy.parameters()))
    assert torch.equal(model.policy.optimizer.state_dict()["state"][0]["exp_avg"], optim_before)


def test_schedules_validity_and_tensorboard(data, tmp_path):
    images, labels = data
    cfg = PPOConfig(beta_kl=0.05, beta_kl_final=0.0125, ent_coef=0.15, ent_coef_final=0.0375)
    assert cfg.coefficients(0, 4) == (0.05, 0.15)
    assert np.allclose(cfg.coefficients(3, 4), (0.0125, 0.0375))
    assert np.allclose(cfg.coefficients(1, 4), (0.0375, 0.1125))
    seen = []

    def validity(masks):
        seen.append(masks.shape)
        assert masks.dtype == np.uint8
        return 0.5

    cfg.n_envs, cfg.n_steps, cfg.log_images_every, cfg.validity_max_masks = 8, 1, 1, 4
    model = PixelPPO.from_network(tiny_net(), images, oracle_reward(images, labels), cfg,
                                  device="cpu", validity_fn=validity, tensorboard_log=str(tmp_path))
    model.set_adaptation_iteration(3, 4)
    model.learn(16)
    assert seen == [(4, SIZE, SIZE)] * 2 and model.history[-1]["validity"] == 0.5
    assert model.history[-1]["beta_kl"] == pytest.approx(0.0125)
    assert list(tmp_path.rglob("events.out.tfevents*"))


def test_learning_without_tensorboard_leaves_no_sb3_temp_folder(data, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    images, labels = data
    model = make_model(images, labels)
    model.learn(8)
    assert not list(tmp_path.glob("SB3-*"))


def test_divergence_in_the_first_update_drops_the_new_optimizer_state(data):
    images, labels = data
    model = make_model(images, labels)
    model.set_logger(Logger(folder=None, output_formats=[]))
    model._last_obs, _ = model.env.reset()
    model.collect_rollouts(model.env, _nop_callback(model), model.rollout_buffer, model.n_steps)
    before = [p.detach().clone() for p in model.policy.parameters()]
    model.rollout_buffer.advantages[3, 0, 0] = float("nan")
    with pytest.raises(TrainingDiverged):
        model.train()
    assert all(torch.equal(a, b) for a, b in zip(before, model.policy.parameters()))
    assert not model.policy.optimizer.state_dict()["state"]


def _nop_callback(model):
    from stable_baselines3.common.callbacks import BaseCallback

    class Nop(BaseCallback):
        def _on_step(self) -> bool:
            return True

    cb = Nop()
    cb.init_callback(model)
    return cb


def test_supervised_term_teaches_the_masks_an_uninformative_reward_cannot(data):
    """A constant reward carries no information; the cross-entropy term on (image, mask) pairs alone must move
    the policy toward the masks, and only when its coefficient is on."""
    torch.set_num_threads(TEST_THREADS)
    images, labels = data

    def constant(imgs, actions, indices):
        return torch.full(actions.shape, 0.5)

    accs = {}
    for coef in (0.0, 1.0):
        model = PixelPPO.from_network(tiny_net(), images, constant,
                                      PPOConfig(lr=1e-3, n_envs=8, n_steps=2, batch_size=8,
                                                supervised_coef=coef), device="cpu", seed=0)
        model.supervised = (images[:16], labels[:16].long())
        before = pixel_accuracy(model, images[16:], labels[16:])
        model.learn(128)
        accs[coef] = (before, pixel_accuracy(model, images[16:], labels[16:]))
        assert all(np.isfinite(h["supervised_loss"]) for h in model.history)
        if coef == 0:
            assert all(h["supervised_loss"] == 0 for h in model.history)
        else:
            assert model.history[-1]["supervised_loss"] < model.history[0]["supervised_loss"]
    print("held-out pixel accuracy before -> after, by supervised_coef:", accs)
    # held-out images (not among the 16 supervised ones) are segmented better only with the term on
    assert accs[1.0][1] >= accs[1.0][0] + 0.1, accs
    assert accs[1.0][1] > accs[0.0][1] + 0.1, accs


def test_weight_average_is_the_moving_average_of_the_optimizer_iterates(data):
    """``weight_average_decay`` keeps avg <- d * avg + (1 - d) * w after every optimizer step of a learn call,
    starting from the weights the call began with; it does not change the training path itself."""
    torch.set_num_threads(TEST_THREADS)
    images, labels = data
    decay = 0.8
    plain = make_model(images, labels)
    plain.learn(32)
    assert plain.averaged_network_state() is None  # off by default

    model = make_model(images, labels, weight_average_decay=decay)
    net = model.policy.network
    expected = {k: v.detach().clone() for k, v in net.state_dict().items() if torch.is_floating_point(v)}
    steps = []

    def after_step(optimizer, args, kwargs):
        live = net.state_dict()
        for k in expected:
            expected[k].mul_(decay).add_(live[k].detach(), alpha=1 - decay)
        steps.append(1)

    model.policy.optimizer.register_step_post_hook(after_step)
    model.learn(32)
    averaged = model.averaged_network_state()
    assert len(steps) == 2 * 2 * 5  # 2 rollouts of 16 images x 2 minibatches x 5 epochs
    assert averaged is not None and set(averaged) == set(expected)
    for k in expected:
        torch.testing.assert_close(averaged[k], expected[k], rtol=1e-5, atol=1e-6)
    # the last iterate is not the average, and averaging did not alter the iterates (same seed, same path)
    assert any(not torch.equal(averaged[k], v) for k, v in net.state_dict().items() if k in averaged)
    for (k, a), b in zip(net.state_dict().items(), plain.policy.network.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
    with pytest.raises(ValueError, match="weight_average_decay"):
        make_model(images, labels, weight_average_decay=1.0).learn(32)
