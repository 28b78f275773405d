"""Few-step quality of a flow model against reference data, and the straightness of its flow."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .data import load_source
from .errors import ReflowError
from .io import atomic_write_json
from .metrics import w2
from .models import load_model
from .noise import row_noise
from .sampling import sample

STRAIGHTNESS_STEPS = 100


def evaluate(
    model_path: str | Path,
    reference: str,
    nfes: list[int],
    *,
    num_samples: int = 4000,
    seed: int = 1,
    adaptive: bool = True,
    device: torch.device | str = "cpu",
    batch_size: int = 4096,
) -> dict[str, Any]:
    """Metrics of one model: W2 to ``num_samples`` reference samples at each NFE (Euler, uniform grid)
    and with the adaptive solver, and the straightness S measured along a 100-step Euler solve.

    The noise is row_noise(seed, 0..n-1); toy references are fresh draws held out from training.
    """
    if not nfes or any(k < 1 for k in nfes):
        raise ReflowError(f"--nfe needs positive step counts like 1,2,4; got {nfes}")
    if num_samples < 2:
        raise ReflowError(f"--num-samples must be at least 2, got {num_samples}")
    model = load_model(model_path).to(device).eval()
    source = load_source(reference)
    shape = tuple(model.sample_shape)
    if tuple(source.sample_shape) != shape:
        raise ReflowError(
            f"the model makes samples of shape {shape} but {reference} holds {tuple(source.sample_shape)}"
        )
    ref = source.reference(num_samples)
    z0 = row_noise(seed, range(num_samples), shape)
    result: dict[str, Any] = {
        "model": str(model_path),
        "reference": reference,
        "num_samples": num_samples,
        "num_reference": len(ref),
        "seed": seed,
        "solver": "euler",
        "reflow_version": __version__,
        "nfe": {},
    }
    for k in nfes:
        t0 = time.perf_counter()
        sol = sample(model, z0, k, "euler", batch_size=batch_size, device=device)
        result["nfe"][str(k)] = {"w2": w2(sol.z1, ref), "seconds": time.perf_counter() - t0}
    if adaptive:
        sol = sample(model, z0, 0, "adaptive", batch_size=batch_size, device=device)
        result["adaptive"] = {"w2": w2(sol.z1, ref), "nfe": sol.nfe}
    sol = sample(
        model, z0, STRAIGHTNESS_STEPS, "euler", batch_size=batch_size, device=device, measure_straightness=True
    )
    result["straightness"] = sol.straightness
    result["straightness_steps"] = STRAIGHTNESS_STEPS
    return result


def write_report(report: str | Path, metrics: dict[str, Any]) -> Path:
    out = Path(report)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "metrics.json", metrics)
    return out / "metrics.json"
