"""Sample-quality metrics: exact W2, the Fréchet distance and KID of feature sets, Inception features, and the
scores of one sample set as an evaluation reports them (quality, spread over seeds, per class)."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reflow.errors import ReflowError


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


# ----------------------------------------------------------------------------------------------------------------------
# Feature-space distances (FID / KID conventions)
# ----------------------------------------------------------------------------------------------------------------------

#: Where the Inception weights file comes from (torch-fidelity's conversion of the TF FID graph inception-2015-12-05;
#: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` holds the same network under the same parameter names).
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)


def _float64(a: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().to("cpu", torch.float64).numpy()
    return np.asarray(a, dtype=np.float64)


def _features(a: torch.Tensor | np.ndarray, name: str) -> np.ndarray:
    """A feature set as a float64 (N, D) numpy array; ValueError unless 2-D, finite, with N >= 2."""
    a = _float64(a)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a feature set of shape (N, D), got shape {a.shape}")
    if len(a) < 2:
        raise ValueError(f"{name} has {len(a)} sample(s); at least 2 are needed")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return a


def _psd_sqrt(c: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (tiny negative eigenvalues clipped to 0)."""
    w, v = np.linalg.eigh((c + c.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance_gaussians(
    mu1: np.ndarray | torch.Tensor,
    cov1: np.ndarray | torch.Tensor,
    mu2: np.ndarray | torch.Tensor,
    cov2: np.ndarray | torch.Tensor,
) -> float:
    """Squared Fréchet (2-Wasserstein) distance between N(mu1, cov1) and N(mu2, cov2), in float64:

        ||mu1 - mu2||^2 + Tr(cov1 + cov2 - 2 (cov1^1/2 cov2 cov1^1/2)^1/2)

    ``mu`` has shape (D,), ``cov`` (D, D), symmetric positive semi-definite. The trace term is evaluated through the
    symmetric matrix ``cov1^1/2 cov2 cov1^1/2`` (eigh, not a general sqrtm or the eigenvalues of the non-symmetric
    ``cov1 cov2``), with round-off negative eigenvalues clipped to 0, so it is stable for the rank-deficient
    covariances of FID (D = 2048 features from fewer samples). Tr((cov1^1/2 cov2 cov1^1/2)^1/2) equals the
    Tr((cov1 cov2)^1/2) of the usual FID formula. The result is clipped at 0 (it is a squared distance).
    """
    m1, c1, m2, c2 = (_float64(a) for a in (mu1, cov1, mu2, cov2))
    d = m1.shape[0] if m1.ndim == 1 else -1
    if m1.ndim != 1 or m2.shape != (d,) or c1.shape != (d, d) or c2.shape != (d, d):
        raise ValueError(
            f"expected mu1, mu2 of shape (D,) and cov1, cov2 of shape (D, D), got "
            f"{m1.shape}, {c1.shape}, {m2.shape}, {c2.shape}"
        )
    s1 = _psd_sqrt(c1)
    inner = s1 @ c2 @ s1
    eig = np.linalg.eigvalsh((inner + inner.T) / 2)
    tr_covmean = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    diff = m1 - m2
    fd = float(diff @ diff) + float(np.trace(c1)) + float(np.trace(c2)) - 2.0 * tr_covmean
    return max(fd, 0.0)


def frechet_distance(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> float:
    """Fréchet distance (squared, as FID reports it) between Gaussians fitted to two feature sets x (N, D) and
    y (M, D): FID when the features are Inception pool features. Means and unbiased covariances (ddof=1, as
    torchmetrics and pytorch-fid) in float64; see :func:`frechet_distance_gaussians`. ValueError for mismatched D or
    fewer than 2 samples."""
    x, y = _features(x, "x"), _features(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature sets of dimension {x.shape[1]} and {y.shape[1]} cannot be compared")
    stats = []
    for a in (x, y):
        mu = a.mean(axis=0)
        centered = a - mu
        stats.append((mu, centered.T @ centered / (len(a) - 1)))
    (mu1, cov1), (mu2, cov2) = stats
    return frechet_distance_gaussians(mu1, cov1, mu2, cov2)


def _poly_kernel(a: np.ndarray, b: np.ndarray, degree: int, gamma: float, coef: float) -> np.ndarray:
    return (gamma * (a @ b.T) + coef) ** degree


def _mmd2_unbiased(kxx: np.ndarray, kxy: np.ndarray, kyy: np.ndarray) -> float:
    """Unbiased MMD^2 of two samples of equal size m from their kernel matrices (Binkowski et al. 2018):
    off-diagonal means of Kxx and Kyy, minus twice the full mean of Kxy."""
    m = kxx.shape[0]
    within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(within - 2.0 * kxy.sum() / (m * m))


def kernel_distance(
    x: torch.Tensor | np.ndarray,
    y: torch.Tensor | np.ndarray,
    *,
    subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    gamma: float | None = None,
    coef: float = 1.0,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel distance (KID when the features are Inception pool features) between feature sets x (N, D), y (M, D).

    The unbiased MMD^2 estimator with the polynomial kernel k(a, b) = (gamma * a.b + coef)^degree (gamma defaults to
    1/D), averaged over ``subsets`` pairs of random subsets of size m = min(subset_size, N, M), each drawn without
    replacement from x and from y by a ``numpy.random.default_rng(seed)`` generator: the convention of Binkowski et al.
    2018, torch-fidelity and torchmetrics' KernelInceptionDistance (defaults 100 subsets of 1000, degree 3, coef 1).
    Unlike torchmetrics, fewer than ``subset_size`` samples shrink the subsets instead of raising.

    Returns ``(mean, std)`` over the subsets, std with ddof=0 as torchmetrics reports it. MMD^2 estimates are
    unbiased, so the mean can be slightly negative for samples of the same distribution.
    """
    x, y = _features(x, "x"), _features(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature sets of dimension {x.shape[1]} and {y.shape[1]} cannot be compared")
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    if subset_size < 2:
        raise ValueError(f"subset_size must be >= 2, got {subset_size}")
    if degree < 1:
        raise ValueError(f"degree must be >= 1, got {degree}")
    if gamma is not None and gamma <= 0:
        raise ValueError(f"gamma must be positive, got {gamma}")
    gamma = 1.0 / x.shape[1] if gamma is None else float(gamma)
    m = min(subset_size, len(x), len(y))
    rng = np.random.default_rng(seed)
    scores = np.empty(subsets)
    for i in range(subsets):
        xs = x[rng.choice(len(x), m, replace=False)]
        ys = y[rng.choice(len(y), m, replace=False)]
        scores[i] = _mmd2_unbiased(
            _poly_kernel(xs, xs, degree, gamma, coef),
            _poly_kernel(xs, ys, degree, gamma, coef),
            _poly_kernel(ys, ys, degree, gamma, coef),
        )
    return float(scores.mean()), float(scores.std())


# ----------------------------------------------------------------------------------------------------------------------
# The scores of one sample set, as an evaluation reports them
# ----------------------------------------------------------------------------------------------------------------------


def sample_quality(
    x: torch.Tensor,
    ref: torch.Tensor,
    ref_features: dict[str, np.ndarray],
    spaces: dict[str, Callable[[torch.Tensor], np.ndarray]],
    *,
    w2_max_cells: int,
    kid_subsets: int,
    kid_subset_size: int,
    seed: int,
) -> dict[str, float]:
    """Quality of samples ``x`` against the reference rows ``ref``: ``w2`` (exact, when the len(x) x len(ref)
    cost matrix has at most ``w2_max_cells`` cells) and, per feature space ``name`` of ``spaces`` (images ->
    (N, D) features; ``ref_features[name]`` are the reference's), ``fd_name`` and ``kid_name`` (the KID mean
    over ``kid_subsets`` subsets of ``kid_subset_size`` drawn with ``seed``)."""
    out: dict[str, float] = {}
    if len(x) * len(ref) <= w2_max_cells:
        out["w2"] = w2(x, ref)
    for name, extract in spaces.items():
        f = extract(x)
        out[f"fd_{name}"] = frechet_distance(f, ref_features[name])
        out[f"kid_{name}"] = kernel_distance(
            f, ref_features[name], subsets=kid_subsets, subset_size=kid_subset_size, seed=seed
        )[0]
    return out


def over_seeds(per_seed: list[dict[str, float]]) -> dict[str, Any]:
    """Mean, spread (sample standard deviation; 0 for one seed) and the values of each metric: ``key``,
    ``key_std`` and ``key_seeds`` for every key of the per-seed dicts."""
    out: dict[str, Any] = {}
    for key in per_seed[0]:
        values = [d[key] for d in per_seed]
        out[key] = float(np.mean(values))
        out[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        out[f"{key}_seeds"] = values
    return out


def per_class(
    x: torch.Tensor,
    labels: torch.Tensor,
    ref: torch.Tensor,
    ref_labels: torch.Tensor | None,
    classifier: Callable[[torch.Tensor], np.ndarray] | None = None,
) -> dict[str, Any]:
    """Class-conditional samples ``x`` drawn for ``labels`` (N,): the classifier's agreement with the labels
    (when a ``classifier``, images -> (N,) predicted labels, is given) and W2 to the reference rows of the same
    class (where the reference is labelled by ``ref_labels``), per requested class (``classes``) and overall
    (``agreement``, ``agreement_min_class``, ``w2_class_mean``)."""
    out: dict[str, Any] = {}
    predicted = None
    if classifier is not None:
        predicted = torch.from_numpy(classifier(x))
        out["agreement"] = float((predicted == labels).double().mean())
    classes: dict[str, Any] = {}
    for c in sorted(set(labels.tolist())):
        mine = labels == c
        cell: dict[str, float] = {"samples": int(mine.sum())}
        if predicted is not None:
            cell["agreement"] = float((predicted[mine] == c).double().mean())
        if ref_labels is not None and int((ref_labels == c).sum()) >= 2 and int(mine.sum()) >= 2:
            cell["w2"] = w2(x[mine], ref[ref_labels == c])
        classes[str(c)] = cell
    out["classes"] = classes
    if predicted is not None:
        out["agreement_min_class"] = min(v["agreement"] for v in classes.values())
    if classes and all("w2" in v for v in classes.values()):
        out["w2_class_mean"] = float(np.mean([v["w2"] for v in classes.values()]))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Inception features
# ----------------------------------------------------------------------------------------------------------------------


def _one_line(e: BaseException, limit: int = 300) -> str:
    """An exception as one line of at most ``limit`` characters (load_state_dict lists every missing key)."""
    text = f"{type(e).__name__}: {' '.join(str(e).split())}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def images_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Model-space images (N, C, H, W) in [-1, 1] -> uint8 RGB (N, 3, H, W) in [0, 255], as images are saved for FID:
    round((x + 1) * 127.5), clipped (EDM's ``x * 127.5 + 128`` then truncation; torchvision's ``save_image`` on
    (x + 1) / 2 gives the same bytes). One grey channel is repeated to three."""
    u8 = (images.to(torch.float64) * 127.5 + 128.0).clamp(0, 255).to(torch.uint8)
    return u8.repeat(1, 3, 1, 1) if u8.shape[1] == 1 else u8


def _check_images(x: torch.Tensor, batch_size: int) -> None:
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape (N, C, H, W) with C = 1 or 3, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"images must be floating point in [-1, 1], got dtype {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError("images contain NaN or infinite values")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def _inception_state_dict(path: Path) -> io.BytesIO:
    """The Inception weights file read safely (``weights_only=True``), as an in-memory file of its tensors."""
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors of every kind: the file is the user's
        raise ReflowError(
            f"cannot read Inception weights from {path} ({_one_line(e)}); expected the state dict file "
            f"weights-inception-2015-12-05-6726825d.pth from {INCEPTION_WEIGHTS_URL}"
        ) from e
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ReflowError(f"{path} is not a state dict of tensors; expected weights-inception-2015-12-05-6726825d.pth")
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)  # only tensors we loaded with weights_only=True: safe for torch-fidelity's load
    buffer.seek(0)
    return buffer


def _inception_network(path: Path, device: str | torch.device):
    """torch-fidelity's FID Inception-v3 with the weights of ``path``, on ``device``."""
    buffer = _inception_state_dict(path)
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as e:
        raise ReflowError(f'Inception features need torch-fidelity ({_one_line(e)}): pip install "reflow[fid]"') from e
    except (RuntimeError, OSError) as e:  # typically a torchvision wheel built for another torch (CUDA vs CPU)
        raise ReflowError(
            f"torch-fidelity could not be imported ({_one_line(e)}): install the torchvision build that matches "
            f"torch {torch.__version__}"
        ) from e
    try:
        model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=buffer)
    except RuntimeError as e:  # load_state_dict: missing/unexpected keys or shape mismatch
        raise ReflowError(f"{path} does not hold FID Inception-v3 weights ({_one_line(e)})") from e
    return model.to(device)


def inception_features(
    images: torch.Tensor | np.ndarray,
    weights_path: str | os.PathLike[str] | None,
    *,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Inception-v3 pool features (N, 2048) float64 of model-space images (N, C, H, W) in [-1, 1], C = 1 or 3, any
    H and W: the features FID and KID are computed on.

    Images go to uint8 RGB as saved images would (:func:`images_to_uint8`) and through torch-fidelity's
    ``FeatureExtractorInceptionV3`` (the network of torchmetrics' FrechetInceptionDistance), which resizes them to
    299 x 299 with TensorFlow-1 compatible bilinear interpolation as the original TF FID code does. This equals
    torchmetrics' feature path with ``antialias=False``; torchmetrics' default ``antialias=True`` resizes differently.

    ``weights_path`` is the state dict file ``weights-inception-2015-12-05-6726825d.pth`` (see
    ``INCEPTION_WEIGHTS_URL``; pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` is the same network). Nothing is
    downloaded, and the file is read with ``torch.load(weights_only=True)``: torch-fidelity itself would unpickle it
    with ``weights_only=False``, so the extractor is handed an in-memory copy of the tensors that were loaded safely.
    """
    if weights_path is None:
        raise ReflowError(
            "Inception FID needs the Inception weights file and nothing can be downloaded here: pass "
            "--inception-weights PATH, the file weights-inception-2015-12-05-6726825d.pth from "
            f"{INCEPTION_WEIGHTS_URL} (pytorch-fid's pt_inception-2015-12-05-6726825d.pth also works)"
        )
    path = Path(weights_path)
    if not path.is_file():
        raise ReflowError(
            f"no such Inception weights file: {path} (pass --inception-weights with the path of "
            f"weights-inception-2015-12-05-6726825d.pth, from {INCEPTION_WEIGHTS_URL})"
        )
    x = torch.as_tensor(images)
    _check_images(x, batch_size)
    model = _inception_network(path, device)
    out = np.empty((len(x), 2048), dtype=np.float64)
    with torch.inference_mode():
        for start in range(0, len(x), batch_size):
            batch = images_to_uint8(x[start : start + batch_size]).to(device)
            (feats,) = model(batch)
            out[start : start + len(batch)] = feats.to("cpu", torch.float64).numpy()
    return out
