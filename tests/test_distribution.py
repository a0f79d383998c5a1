"""PixelCategorical: exact against torch.distributions.Categorical, and sampling matches the probabilities."""
import numpy as np
import pytest
import torch
from torch.distributions import Categorical

from rl_adapt.policies.distribution import PixelCategorical


def _logits(b=2, k=4, h=3, w=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, k, h, w, generator=g, dtype=torch.float64) * 2


def test_log_prob_and_entropy_match_torch_categorical():
    logits = _logits()
    ref = Categorical(logits=logits.permute(0, 2, 3, 1))  # batch (B,H,W), classes last
    dist = PixelCategorical(logits)
    actions = torch.randint(0, 4, (2, 3, 5), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(dist.log_prob(actions), ref.log_prob(actions), atol=1e-6)
    assert torch.allclose(dist.entropy(), ref.entropy(), atol=1e-6)
    assert torch.allclose(dist.log_prob(actions, reduce="sum"), ref.log_prob(actions).sum((1, 2)), atol=1e-6)
    assert torch.allclose(dist.entropy("sum"), ref.entropy().sum((1, 2)), atol=1e-6)
    assert torch.allclose(dist.entropy("mean"), ref.entropy().mean((1, 2)), atol=1e-6)
    assert dist.log_prob(actions, "sum").shape == (2,)


def test_mode_shapes_dtypes_and_bad_input():
    logits = _logits().float()
    dist = PixelCategorical(logits)
    mode = dist.mode()
    assert mode.shape == (2, 3, 5) and mode.dtype == torch.int64
    assert torch.equal(mode, logits.argmax(1))
    s = dist.sample()
    assert s.shape == (2, 3, 5) and s.dtype == torch.int64 and int(s.min()) >= 0 and int(s.max()) < 4
    with pytest.raises(ValueError):
        PixelCategorical(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError):
        dist.entropy("max")


def test_bf16_logits_are_evaluated_in_float32():
    logits = _logits().float()
    a = PixelCategorical(logits.bfloat16())
    assert a.log_probs.dtype == torch.float32
    assert torch.allclose(a.log_probs, PixelCategorical(logits.bfloat16().float()).log_probs)


def test_gumbel_max_sample_frequencies_match_probabilities():
    # one pixel distribution replicated over many pixels: the label histogram must follow the probabilities
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1], dtype=torch.float64)
    n_pix = 200 * 200
    logits = probs.log().view(1, 4, 1, 1).expand(1, 4, 200, 200).contiguous()
    gen = torch.Generator().manual_seed(123)
    samples = PixelCategorical(logits).sample(generator=gen)
    counts = torch.bincount(samples.flatten(), minlength=4).double()
    expected = probs * n_pix
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 16.27  # chi-square, 3 dof, p = 0.001
    # seeded: same generator seed -> same samples; different seed -> different samples
    again = PixelCategorical(logits).sample(generator=torch.Generator().manual_seed(123))
    other = PixelCategorical(logits).sample(generator=torch.Generator().manual_seed(124))
    assert torch.equal(samples, again) and not torch.equal(samples, other)


def test_per_pixel_probabilities_are_respected():
    # different distribution at each pixel: empirical frequencies over repeated draws match per pixel
    logits = _logits(b=1, k=3, h=2, w=2, seed=5).float()
    dist = PixelCategorical(logits)
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([dist.sample(gen) for _ in range(4000)])  # (T,1,2,2)
    freq = torch.stack([(draws == k).float().mean(0) for k in range(3)], dim=1)  # (1,3,2,2)
    assert np.allclose(freq.numpy(), dist.probs.numpy(), atol=0.03)
