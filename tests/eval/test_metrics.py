import numpy as np
import pytest
import torch
from helpers import import_or_skip
from scipy.linalg import sqrtm
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist

from reflow.eval.metrics import frechet_distance, frechet_distance_gaussians, kernel_distance, w2


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


# ----------------------------------------------------------------------------------------------------------------------
# Fréchet distance
# ----------------------------------------------------------------------------------------------------------------------


def _random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.5 * np.eye(d)


def test_frechet_gaussians_diagonal_and_commuting_closed_form():
    # Commuting covariances share eigenvectors Q: (C1 C2)^1/2 = Q diag(sqrt(s1 s2)) Q^T, so the trace term is
    # sum(s1 + s2 - 2 sqrt(s1 s2)) = sum((sqrt(s1) - sqrt(s2))^2).
    rng = np.random.default_rng(0)
    d = 6
    s1, s2 = rng.uniform(0.1, 3.0, size=d), rng.uniform(0.1, 3.0, size=d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance_gaussians(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    c1, c2 = q @ np.diag(s1) @ q.T, q @ np.diag(s2) @ q.T
    assert frechet_distance_gaussians(mu1, c1, mu2, c2) == pytest.approx(expected, rel=1e-10)


def test_frechet_gaussians_general_pair_against_scipy_sqrtm():
    rng = np.random.default_rng(1)
    d = 7
    c1, c2 = _random_spd(rng, d), _random_spd(rng, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    # The textbook FID formula with scipy's general (Schur-based) square root of the non-symmetric C1 C2.
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(c1 + c2 - 2 * np.real(sqrtm(c1 @ c2)))
    got = frechet_distance_gaussians(torch.from_numpy(mu1), torch.from_numpy(c1), mu2, c2)
    assert got == pytest.approx(expected, rel=1e-9)


def test_frechet_gaussians_rank_deficient_covariances():
    # FID covariances of 2048 features from fewer samples are singular; the eigh form must stay finite and exact:
    # both covariances of rank 2 in R^5 on the same plane, identity there -> trace term 0.
    p = np.zeros((5, 5))
    p[0, 0] = p[1, 1] = 1.0
    assert frechet_distance_gaussians(np.zeros(5), p, np.zeros(5), p) == pytest.approx(0.0, abs=1e-12)
    assert frechet_distance_gaussians(np.zeros(5), p, np.ones(5), 4 * p) == pytest.approx(5.0 + 2.0, rel=1e-12)


def test_frechet_distance_of_large_samples_approaches_true_parameters():
    rng = np.random.default_rng(123)
    d, n = 4, 20_000
    c1, c2 = _random_spd(rng, d), _random_spd(rng, d)
    mu1, mu2 = np.zeros(d), np.full(d, 0.5)
    x = mu1 + rng.normal(size=(n, d)) @ np.linalg.cholesky(c1).T
    y = mu2 + rng.normal(size=(n, d)) @ np.linalg.cholesky(c2).T
    true = frechet_distance_gaussians(mu1, c1, mu2, c2)  # 1.95
    # Sampling error: the mean term alone fluctuates by 2 sqrt(dmu^T (C1 + C2) dmu / n) (delta method) = 0.022 here;
    # with the covariance terms the estimator's std over 300 seeds was 0.025 (bias 0.003). 0.125 is 5 of those.
    sigma_mean_term = 2 * np.sqrt((mu2 - mu1) @ (c1 + c2) @ (mu2 - mu1) / n)
    assert 0.015 < sigma_mean_term < 0.03
    assert frechet_distance(x, y) == pytest.approx(true, abs=0.125)


def test_frechet_distance_identity_symmetry_and_input_types():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(300, 10)), 2.0 * rng.normal(size=(200, 10)) + 0.3
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(x, y) == pytest.approx(frechet_distance(y, x), rel=1e-10)
    assert frechet_distance(torch.from_numpy(x).float(), y) == pytest.approx(
        frechet_distance(x.astype(np.float32), y), rel=1e-12
    )
    assert frechet_distance(x, y) > 1.0


def test_frechet_distance_rejects_bad_shapes():
    rng = np.random.default_rng(3)
    with pytest.raises(ValueError, match="dimension"):
        frechet_distance(rng.normal(size=(10, 3)), rng.normal(size=(10, 4)))
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(rng.normal(size=(1, 3)), rng.normal(size=(10, 3)))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        frechet_distance(rng.normal(size=(10,)), rng.normal(size=(10,)))
    with pytest.raises(ValueError, match="shape"):
        frechet_distance_gaussians(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ----------------------------------------------------------------------------------------------------------------------
# Kernel distance
# ----------------------------------------------------------------------------------------------------------------------


def _naive_unbiased_mmd2(x, y, degree, gamma, coef):
    def k(a, b):
        return (gamma * float(np.dot(a, b)) + coef) ** degree

    m = len(x)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


@pytest.mark.parametrize(("degree", "gamma", "coef"), [(3, None, 1.0), (2, 0.3, 0.5)])
def test_kernel_distance_equals_naive_double_loop_on_whole_set(degree, gamma, coef):
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(12, 3)), rng.normal(size=(12, 3)) + 0.7
    expected = _naive_unbiased_mmd2(x, y, degree, 1 / 3 if gamma is None else gamma, coef)
    # subset_size >= n: every subset is the whole set (in some order), so one subset gives the full-set estimate.
    mean, std = kernel_distance(x, y, subsets=1, subset_size=50, degree=degree, gamma=gamma, coef=coef)
    assert mean == pytest.approx(expected, rel=1e-10)
    assert std == 0.0
    mean3, std3 = kernel_distance(x, y, subsets=3, subset_size=12, degree=degree, gamma=gamma, coef=coef)
    assert mean3 == pytest.approx(expected, rel=1e-10)
    assert std3 == pytest.approx(0.0, abs=1e-12)


def test_kernel_distance_same_vs_shifted_distribution():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(2000, 8)), rng.normal(size=(2000, 8))
    same, _ = kernel_distance(x, y, subsets=20, subset_size=500)
    shifted, shifted_std = kernel_distance(x, y + 0.3, subsets=20, subset_size=500)
    # Over 5 seeds |same| stayed below 0.006 and the 0.3 shift gave 0.31-0.35 (subset std about 0.04).
    assert abs(same) < 0.02
    assert shifted > 0.2 and shifted > 4 * shifted_std
    # Seeded: the same seed gives the same subsets, another seed other subsets.
    assert kernel_distance(x, y, subsets=5, subset_size=100, seed=1) == kernel_distance(
        x, y, subsets=5, subset_size=100, seed=1
    )
    assert kernel_distance(x, y, subsets=5, subset_size=100, seed=1) != kernel_distance(
        x, y, subsets=5, subset_size=100, seed=2
    )


def test_kernel_distance_rejects_bad_arguments():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(10, 3))
    with pytest.raises(ValueError, match="dimension"):
        kernel_distance(x, rng.normal(size=(10, 4)))
    with pytest.raises(ValueError, match="at least 2"):
        kernel_distance(x[:1], x)
    with pytest.raises(ValueError, match="subsets"):
        kernel_distance(x, x, subsets=0)


# ----------------------------------------------------------------------------------------------------------------------
# Independent reference: torchmetrics' FID and KID fed the features directly (optional extra "fid")
# ----------------------------------------------------------------------------------------------------------------------


class _Precomputed(torch.nn.Module):
    """A torchmetrics 'feature extractor' that is the identity: update() is handed the features themselves."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_frechet_distance_matches_torchmetrics():
    fid_module = import_or_skip("torchmetrics.image.fid")
    rng = np.random.default_rng(7)
    d = 16
    x = rng.normal(size=(500, d)) @ rng.normal(size=(d, d)) / 4
    y = 1.5 * rng.normal(size=(400, d)) + 0.2
    metric = fid_module.FrechetInceptionDistance(feature=_Precomputed(d))
    metric.update(torch.from_numpy(x), real=True)
    metric.update(torch.from_numpy(y), real=False)
    assert frechet_distance(x, y) == pytest.approx(float(metric.compute()), rel=1e-4)


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save")
@pytest.mark.parametrize(("degree", "gamma", "coef"), [(3, None, 1.0), (2, 0.1, 0.5)])
def test_kernel_distance_matches_torchmetrics(degree, gamma, coef):
    kid_module = import_or_skip("torchmetrics.image.kid")
    rng = np.random.default_rng(8)
    n, d = 200, 16
    x, y = rng.normal(size=(n, d)), 1.2 * rng.normal(size=(n, d)) + 0.1
    # torchmetrics draws its subsets with torch.randperm; with subset_size == n both sides use the whole sets, so the
    # per-subset values are the full-set estimate whatever the permutation, and the two must agree.
    metric = kid_module.KernelInceptionDistance(
        feature=_Precomputed(d), subsets=3, subset_size=n, degree=degree, gamma=gamma, coef=coef
    )
    metric.update(torch.from_numpy(x), real=True)
    metric.update(torch.from_numpy(y), real=False)
    ref_mean, ref_std = (float(v) for v in metric.compute())
    mean, std = kernel_distance(x, y, subsets=3, subset_size=n, degree=degree, gamma=gamma, coef=coef)
    assert mean == pytest.approx(ref_mean, rel=1e-4)
    assert std == pytest.approx(ref_std, abs=1e-10)
