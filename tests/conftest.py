"""Shared fixtures: the real CAMUS folder (skips when absent) and seeded, single-threaded torch."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
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
    """One torch thread: on a 2-core CI box OpenMP oversubscription made these small networks 3-8x slower."""
    os.environ.setdefault("nnUNet_compile", "f")
    try:
        import torch
    except ImportError:  # pragma: no cover
        yield
        return
    torch.set_num_threads(1)
    yield
