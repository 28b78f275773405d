"""Minibatch OT coupling: the exact plan is the cost-minimising permutation (checked against scipy's assignment
solver), deterministic; Sinkhorn draws partners from its plan."""

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from reflow.core.coupling import couple, ot_assignment, squared_distances


@pytest.mark.parametrize("n, dim, seed", [(2, 2, 0), (7, 2, 1), (64, 2, 2), (50, 5, 3), (128, 2, 4)])
def test_the_exact_plan_is_a_permutation_of_least_total_cost(n, dim, seed):
    g = torch.Generator().manual_seed(seed)
    z0, z1 = torch.randn(n, dim, generator=g), torch.rand(n, dim, generator=g) * 8 - 4
    cost = squared_distances(z0, z1)
    # independent: the cost matrix by broadcasting, the optimum by the Hungarian-style solver
    want_cost = ((z0.double()[:, None, :] - z1.double()[None, :, :]) ** 2).sum(-1).numpy()
    np.testing.assert_allclose(cost, want_cost, rtol=1e-12, atol=1e-12)
    pi = ot_assignment(cost)
    assert sorted(pi.tolist()) == list(range(n))  # a permutation: every z1 used once
    rows, cols = linear_sum_assignment(want_cost)
    best = want_cost[rows, cols].sum()
    assert want_cost[np.arange(n), pi].sum() == pytest.approx(best, rel=1e-12)
    paired = couple(z0, z1, "ot")
    torch.testing.assert_close(paired, z1[torch.from_numpy(pi)], rtol=0, atol=0)
    # no pair can be improved by swapping partners (a consequence of optimality)
    d = ((z0 - paired) ** 2).sum(1)
    assert d.sum() <= ((z0 - z1) ** 2).sum(1).sum() + 1e-9


def test_images_are_compared_as_vectors_and_the_pairing_is_deterministic():
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(16, 1, 4, 4, generator=g), torch.randn(16, 1, 4, 4, generator=g)
    a, b = couple(z0, z1, "ot"), couple(z0.clone(), z1.clone(), "ot")
    assert a.shape == z1.shape and torch.equal(a, b)
    rows, cols = linear_sum_assignment(squared_distances(z0, z1))
    torch.testing.assert_close(a, z1[torch.from_numpy(cols)], rtol=0, atol=0)


def test_independent_returns_the_batch_and_sinkhorn_draws_partners_from_its_plan():
    g = torch.Generator().manual_seed(1)
    z0, z1 = torch.randn(200, 2, generator=g), torch.randn(200, 2, generator=g) + 3
    assert couple(z0, z1, "independent") is z1
    a = couple(z0, z1, "sinkhorn", reg=0.01, generator=torch.Generator().manual_seed(5))
    b = couple(z0, z1, "sinkhorn", reg=0.01, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == z1.shape
    assert all(any(torch.equal(row, other) for other in z1) for row in a[:20])  # rows of z1
    # a small regularisation is close to the exact plan's cost, far below independent pairing's
    cost = lambda pair: float(((z0 - pair) ** 2).sum(1).mean())  # noqa: E731
    exact, independent = cost(couple(z0, z1, "ot")), cost(z1)
    assert cost(a) < exact + 0.25 * (independent - exact)
    with pytest.raises(ValueError, match="coupling must be one of"):
        couple(z0, z1, "nearest")
