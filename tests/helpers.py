"""Helpers shared by several test modules."""

import importlib
import importlib.util
import os

import pytest


def threads_for_tests() -> int:
    """Torch threads for the tests: REFLOW_TEST_THREADS, default 1 (see conftest.py and tests/README.md)."""
    value = os.environ.get("REFLOW_TEST_THREADS", "1")
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"REFLOW_TEST_THREADS must be a whole number >= 1, got {value!r}")
    return int(value)


def import_or_skip(name: str):
    # Not pytest.importorskip: a torchvision wheel built for another torch (CUDA wheel with a +cpu torch) breaks
    # the import of torch_fidelity with a RuntimeError ("operator torchvision::nms does not exist"), not an ImportError.
    # torch_fidelity imports torchvision in its __init__; when that fails, the submodules imported before stay in
    # sys.modules and a second import "succeeds", so torchvision goes first to make the skip independent of test order.
    names = ("torchvision", name) if importlib.util.find_spec("torch_fidelity") else (name,)
    try:
        return [importlib.import_module(n) for n in names][-1]
    except (ImportError, RuntimeError, OSError) as e:
        pytest.skip(f"{name} unavailable: {type(e).__name__}: {e}")


def cli_ok(*args):
    """Run the reflow CLI in-process with these arguments (stringified) and check it exits 0."""
    from typer.testing import CliRunner

    from reflow.cli.app import app

    r = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r


def one_error_line(result, *needles) -> str:
    """A CliRunner ``result`` that failed as a user error should: exit code 2 and one line, ``error: ...``,
    containing every one of ``needles``; returns that line."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def free_port() -> str:
    """A TCP port free right now, for torchrun's --master_port (a fixed one collides with any other run)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


# ---- float32 tolerances (the rule is written out in tests/README.md) ---------------------------------------------

EPS32 = 2.0**-23  # float32 machine epsilon (torch.finfo(torch.float32).eps), 1.19e-7
EPS64 = 2.0**-52  # float64's, 2.2e-16
# For chains that go through networks: c covers one pass through the networks these tests use (up to ~20 layers of
# sums whose order a kernel is free to change: the tiny UNets, CLIP text encoder and VAE, the digits CNN, the toy
# MLPs) and what a DDPM solver step does to a noise-prediction error at high noise (x0 = (x - sqrt(1 - a) eps) /
# sqrt(a) multiplies it by up to 1 / sqrt(a) ~ 100 at t = 999). Calibrated: the largest c seen for any of them, over
# batch sizes 1-192, 1 or 2 threads and AVX512 / AVX2 / SSE4.1 kernels, was 69 (clipped DDIM-6 on a sub-batch); a
# wrong timestep, a missing or extra step, a wrong guidance scale gave c of 1.7e5 to 7e9.
F32_C = 256
# For elementwise float32 arithmetic with no reductions and no network (an interpolation, a loss on a few numbers,
# a type conversion): every step rounds a handful of times, half an ulp each.
F32_C_ELEMENTWISE = 4


def _max_abs(values) -> float:
    import numpy as np

    if isinstance(values, (list, tuple)):
        return max((_max_abs(v) for v in values), default=0.0)
    if hasattr(values, "detach"):  # a torch tensor
        values = values.detach().cpu().double().numpy()
    arr = np.abs(np.asarray(values, dtype=np.float64))
    return float(arr.max()) if arr.size else 0.0


def f32_atol(values, steps: int = 1, c: float = F32_C) -> float:
    """What float32 can promise for a result of magnitude max|values| (a tensor, array, number, or a list of them)
    after ``steps`` sequential steps (solver steps / network evaluations): ``c * EPS32 * max|values| * steps``."""
    if steps < 1:
        raise ValueError("steps >= 1")
    return c * EPS32 * _max_abs(values) * steps


def f32_tol(values, steps: int = 1, c: float = F32_C) -> dict[str, float]:
    """``atol`` / ``rtol`` keywords for torch.testing.assert_close and np.testing.assert_allclose: the f32_atol of
    ``values`` and no relative part (the absolute part already scales with the values)."""
    return {"atol": f32_atol(values, steps, c), "rtol": 0.0}


def f64_tol(values, steps: int = 1, c: float = F32_C) -> dict[str, float]:
    """f32_tol's rule with float64's epsilon, for computations done in float64 (the digits features)."""
    return {"atol": f32_atol(values, steps, c) * EPS64 / EPS32, "rtol": 0.0}


def assert_f32_close(actual, expected, steps: int = 1, c: float = F32_C, msg: str = "") -> None:
    """``actual`` and ``expected`` (tensors or arrays) agree within f32_atol(expected, steps, c). The failure says
    which c the difference would have needed; with REFLOW_TEST_TOL_LOG=path every call appends that c to the file
    (how F32_C was calibrated)."""
    import numpy as np

    def as_array(x):
        return x.detach().cpu().double().numpy() if hasattr(x, "detach") else np.asarray(x, dtype=np.float64)

    a, e = as_array(actual), as_array(expected)
    assert a.shape == e.shape, f"shapes differ: {a.shape} vs {e.shape} {msg}"
    diff = float(np.abs(a - e).max()) if a.size else 0.0
    unit = f32_atol(e, steps, c=1)
    needed = diff / unit if unit else (0.0 if diff == 0 else float("inf"))
    log = os.environ.get("REFLOW_TEST_TOL_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{os.environ.get('PYTEST_CURRENT_TEST', '?').split(' ')[0]}\t{needed:.3g}\t{c:g}\t{msg}\n")
    assert diff <= c * unit, (  # a NaN diff fails too
        f"max |diff| {diff:.3g} > {c * unit:.3g} = {c:g} * eps32 * max|expected| {_max_abs(e):.3g} * steps {steps}"
        f" (the difference is c = {needed:.3g}) {msg}"
    )
