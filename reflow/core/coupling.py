"""How a batch of noise is paired with a batch of data in round 1 from data.

``independent``: z0 ~ N(0, I) and z1 ~ data drawn apart, row i with row i (Liu et al. 2023, 1-RF).

``ot``: minibatch optimal transport (Tong et al. 2024, OT-CFM; Pooladian et al. 2023): the rows of z1 are
permuted to the assignment that minimises the total squared Euclidean cost,
``pi = argmin_pi sum_i ||z0_i - z1_pi(i)||^2``, the exact OT plan between the two uniform empirical
distributions (a permutation: with equal weights the plan's vertices are permutation matrices), found by
POT's network simplex (``ot.emd``). Its paths cross less, so the learned flow is straighter. Each z0 and
each z1 is used once, unlike torchcfm's sampler, which draws pairs from the plan with replacement.

``sinkhorn``: entropic OT (``ot.sinkhorn``, regularisation ``reg`` relative to the mean cost) for batches too
large for the exact plan: row i's partner is drawn from row i of the plan with the batch's generator, so
the pairing is still a function of the batch and the generator, but rows of z1 may repeat.

Both are deterministic: the same (z0, z1) bits (and generator state) give the same pairing. Exact OT is
computed in float64 from the float32 batch; ties (e.g. two equal data rows) change nothing, as the rows
they swap are equal.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np
import torch

Coupling = Literal["independent", "ot", "sinkhorn"]
COUPLINGS: tuple[str, ...] = get_args(Coupling)


def squared_distances(z0: torch.Tensor, z1: torch.Tensor) -> np.ndarray:
    """The cost matrix C_ij = ||z0_i - z1_j||^2 (N, M), float64, samples flattened to vectors."""
    import ot

    a = z0.reshape(len(z0), -1).double().numpy()
    b = z1.reshape(len(z1), -1).double().numpy()
    return ot.dist(a, b, metric="sqeuclidean")


def ot_assignment(cost: np.ndarray) -> np.ndarray:
    """The permutation ``pi`` (N,) minimising sum_i cost[i, pi[i]] for a square ``cost``: the exact OT plan
    between uniform weights (``ot.emd``), a permutation matrix scaled by 1/N, read row by row."""
    import ot

    n = len(cost)
    weights = np.full(n, 1.0 / n)
    plan = ot.emd(weights, weights, cost, numItermax=max(100_000, 100 * n * n))
    pi = plan.argmax(axis=1)
    if len(np.unique(pi)) != n:  # not a vertex (never seen): the assignment solver gives one
        from scipy.optimize import linear_sum_assignment

        pi = linear_sum_assignment(cost)[1]
    return pi


def sinkhorn_partners(cost: np.ndarray, reg: float, generator: torch.Generator) -> np.ndarray:
    """For each row i, a column drawn from row i of the entropic OT plan between uniform weights, with
    regularisation ``reg`` times the mean cost (so ``reg`` does not depend on the data's scale)."""
    import ot

    n, m = cost.shape
    plan = ot.sinkhorn(np.full(n, 1.0 / n), np.full(m, 1.0 / m), cost / cost.mean(), reg, numItermax=10_000)
    rows = torch.from_numpy(np.maximum(plan, 0.0))
    return torch.multinomial(rows, 1, generator=generator).squeeze(1).numpy()


def couple(
    z0: torch.Tensor,
    z1: torch.Tensor,
    coupling: Coupling = "independent",
    *,
    reg: float = 0.05,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``z1`` reordered to pair with ``z0`` row by row under ``coupling`` (see the module docstring):
    ``independent`` returns it as it is; ``ot`` permutes it by the exact minibatch OT plan; ``sinkhorn`` draws
    each row's partner from the entropic plan (with ``generator``). Shapes (N, *sample_shape), CPU."""
    if coupling == "independent":
        return z1
    cost = squared_distances(z0, z1)
    if coupling == "ot":
        index = ot_assignment(cost)
    elif coupling == "sinkhorn":
        index = sinkhorn_partners(cost, reg, generator if generator is not None else torch.Generator())
    else:
        raise ValueError(f"coupling must be one of {', '.join(COUPLINGS)}, got {coupling!r}")
    return z1[torch.from_numpy(index)]
