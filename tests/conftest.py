"""Shared fixtures: the real CAMUS folder (skips when absent) and seeded, single-threaded torch."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

TEST_THREADS = int(os.environ.get("RL_ADAPT_TEST_THREADS", "1"))
"""torch CPU threads the tests run with (1 by default; ``RL_ADAPT_TEST_THREADS=2`` shows nothing depends on it)."""
CAMUS_CANDIDATES = [REPO.parent / "shared" / "data" / "Dataset501_CAMUS224"]


@pytest.fixture(scope="session")
def camus_dir() -> Path:
    """The real CAMUS nnU-Net raw dataset next to the checkout; the test is skipped when absent."""
    for cand in CAMUS_CANDIDATES:
        if (cand / "dataset.json").is_file():
            return cand
    pytest.skip("real CAMUS data (../shared/data/Dataset501_CAMUS224) not present")


@pytest.fixture(autouse=True, scope="session")
def _quiet_threads():
    """One torch thread by default (on a 2-core CI box OpenMP oversubscription made these small networks 3-8x
    slower); ``RL_ADAPT_TEST_THREADS=2`` runs the suite with two, to show it does not depend on the count."""
    os.environ.setdefault("nnUNet_compile", "f")
    try:
        import torch
    except ImportError:  # pragma: no cover
        yield
        return
    torch.set_num_threads(TEST_THREADS)
    yield
