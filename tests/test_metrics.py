import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist

from reflow.metrics import w2


def test_w2_equals_optimal_assignment():
    # For two clouds of equal size with uniform weights the optimal plan is a permutation (Birkhoff),
    # so W2^2 is the mean cost of scipy's optimal assignment: an independent computation.
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(200, 2)), rng.normal(size=(200, 2)) + 1.0
    cost = cdist(x, y, "sqeuclidean")
    r, c = linear_sum_assignment(cost)
    assert w2(x, y) == pytest.approx(np.sqrt(cost[r, c].mean()), rel=1e-9)


def test_w2_of_shift_and_identity():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(100, 1, 2, 2))
    assert w2(x, x) == pytest.approx(0.0, abs=1e-6)
    # Translating a cloud by a vector v moves it exactly |v| in W2.
    assert w2(x, x + 0.5) == pytest.approx(0.5 * np.sqrt(4), rel=1e-9)


def test_w2_unequal_sizes_against_scipy_replication():
    # 60 vs 30 points: duplicating each of the 30 twice makes the problem a 60 x 60 assignment.
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(60, 2)), rng.normal(size=(30, 2))
    cost = cdist(x, np.repeat(y, 2, axis=0), "sqeuclidean")
    r, c = linear_sum_assignment(cost)
    assert w2(x, y) == pytest.approx(np.sqrt(cost[r, c].mean()), rel=1e-9)
