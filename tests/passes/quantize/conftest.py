"""Fixtures of the scheme tests."""
import numpy as np
import pytest


@pytest.fixture(scope="module")
def weight_and_input():
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((48, 128)).astype(np.float32) * 0.05
    weight[3, 7] = 0.9  # an outlier, so that blocks differ in scale
    return weight, rng.standard_normal((5, 128)).astype(np.float32)
