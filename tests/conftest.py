"""Shared, generic fixtures for the whole test tree."""
import os

import numpy as np
import pytest


@pytest.fixture
def rng():
    """A fresh random generator per test; its seed is printed (shown on failure).

    Set GLORO_TEST_SEED=<int> to replay a failing run.
    """
    env = os.environ.get("GLORO_TEST_SEED")
    seed = int(env) if env else int(np.random.SeedSequence().entropy % (2**63))
    print(f"rng seed: {seed} (replay with GLORO_TEST_SEED={seed})")
    return np.random.default_rng(seed)
