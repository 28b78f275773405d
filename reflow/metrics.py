"""Sample-quality metrics."""

from __future__ import annotations

import numpy as np
import torch


def w2(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray, max_iter: int = 10_000_000) -> float:
    """Exact 2-Wasserstein distance between two empirical distributions (uniform weights), by POT's
    network simplex: W2 = sqrt(min_P sum_ij P_ij ||x_i - y_j||^2). Samples are flattened to vectors."""
    import ot

    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    y = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"samples of dimension {x.shape[1]} and {y.shape[1]} cannot be compared")
    a = np.full(len(x), 1.0 / len(x))
    b = np.full(len(y), 1.0 / len(y))
    cost = ot.dist(x, y, metric="sqeuclidean")
    return float(np.sqrt(max(ot.emd2(a, b, cost, numItermax=max_iter), 0.0)))
