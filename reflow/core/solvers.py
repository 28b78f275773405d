"""ODE solvers for dx/dt = v(x, t) from t = 0 (noise) to t = 1 (data).

A solver knows nothing about where its velocity comes from (an MLP, a UNet, a DDPM converted to a
velocity): it integrates any ``v(x, t)`` with x of shape (B, ...) and t of shape (B,).

Fixed-grid solvers (Euler, Heun) run over a time grid 0 = t_0 < t_1 < ... < t_N = 1 and can measure
the straightness of their own trajectory (Liu et al. 2023):

    S(Z) = int_0^1 E || (Z_1 - Z_0) - dZ_t/dt ||^2 dt
         ~ sum_i (t_{i+1} - t_i) E || (Z_1 - Z_0) - v_i ||^2

where v_i is the slope the solver used on step i and ||.||^2 sums over every dimension of a sample.
With it they report the curvature, the total turning of the velocity along a path:

    K(Z) = E int_0^1 || d/dt dZ_t/dt || dt ~ E sum_i || v_{i+1} - v_i ||

(0 for a straight path at constant speed; theta^2 r for an arc of angle theta on a circle of radius r).
The adaptive solver (torchdiffeq's dopri5) is for reference runs; it counts its network calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch

from reflow.core.flow import Velocity, per_sample_sq_norm
from reflow.core.progress import OnCall

Solver = Literal["euler", "heun", "adaptive"]
"""ODE solvers of our flows: fixed-step Euler or Heun, or adaptive dopri5 (torchdiffeq)."""
TimeGrid = Literal["uniform", "quadratic"]
SOLVERS: tuple[str, ...] = get_args(Solver)
FIXED_SOLVERS = SOLVERS[:2]
TIME_GRIDS: tuple[str, ...] = get_args(TimeGrid)


@dataclass
class ODESolution:
    """The result of one solve: the end point z1, the network calls spent and, if asked, S and the path."""

    z1: torch.Tensor
    nfe: int
    straightness: float | None = None
    curvature: float | None = None
    trajectory: list[torch.Tensor] | None = None


def time_grid(steps: int, kind: str = "uniform", device: torch.device | str = "cpu") -> torch.Tensor:
    """A grid of ``steps + 1`` times from 0 to 1 (float64 on ``device``).

    ``uniform``: t_i = i / N.  ``quadratic``: t_i = 1 - (1 - i / N)^2, denser near the data end.
    """
    if steps < 1:
        raise ValueError(f"a solve needs at least one step, got {steps}")
    s = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64, device=device)
    if kind == "uniform":
        return s
    if kind == "quadratic":
        return 1.0 - (1.0 - s) ** 2
    raise ValueError(f"unknown time grid {kind!r} (choose one of {', '.join(TIME_GRIDS)})")


def heun_steps_for_nfe(nfe: int) -> int:
    """Number of Heun intervals that fits in ``nfe`` calls (2 per interval, the last one is Euler: 2N - 1)."""
    return max(1, (nfe + 1) // 2)


def _at(t: float, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), t, dtype=torch.float32, device=x.device)


@torch.no_grad()
def solve_fixed(
    velocity: Velocity,
    z0: torch.Tensor,
    grid: torch.Tensor,
    method: str = "euler",
    *,
    query: torch.Tensor | None = None,
    measure_straightness: bool = False,
    return_trajectory: bool = False,
    on_call: OnCall | None = None,
) -> ODESolution:
    """Integrate from z0 over ``grid`` (t_0 ... t_N = 1) with Euler or Heun; ``measure_straightness`` also
    measures the curvature K, ``return_trajectory`` keeps every node of the path, ``on_call(rows)`` is
    called after each network call (progress; see ``reflow.core.progress``).

    Heun (Karras et al. 2022, Alg. 1) averages the slopes at both ends of a step and takes a plain
    Euler step on the last interval, so N intervals cost 2N - 1 calls. ``query`` (Euler only): the time
    each step's velocity is read at, when a model's grid says so (default: the step's start, grid[i]).
    """
    if method not in FIXED_SOLVERS:
        raise ValueError(f"unknown fixed-grid solver {method!r} (choose one of {', '.join(FIXED_SOLVERS)})")
    ts = [float(t) for t in grid]
    qs = ts[:-1] if query is None else [float(t) for t in query]
    if query is not None and (method != "euler" or len(qs) != len(ts) - 1):
        raise ValueError("query times need the euler method and one time per step")
    x = z0
    slopes: list[torch.Tensor] = []
    path = [z0] if return_trajectory else None
    nfe = 0
    for i in range(len(ts) - 1):
        t, t_next = ts[i], ts[i + 1]
        dt = t_next - t
        d = velocity(x, _at(qs[i], x))
        nfe += 1
        if on_call is not None:
            on_call(x.shape[0])
        if method == "heun" and i < len(ts) - 2:
            x_euler = x + dt * d
            d = 0.5 * (d + velocity(x_euler, _at(t_next, x)))
            nfe += 1
            if on_call is not None:
                on_call(x.shape[0])
        x = x + dt * d
        if measure_straightness:
            slopes.append(d)
        if path is not None:
            path.append(x)
    s = k = None
    if measure_straightness:
        chord = (x - z0).float()
        s = sum((ts[i + 1] - ts[i]) * per_sample_sq_norm(chord - d.float()).mean().item() for i, d in enumerate(slopes))
        turns = zip(slopes[:-1], slopes[1:], strict=True)
        k = sum(per_sample_sq_norm((b - a).float()).sqrt().mean().item() for a, b in turns)
    return ODESolution(z1=x, nfe=nfe, straightness=s, curvature=k, trajectory=path)


def solve(
    velocity: Velocity,
    z0: torch.Tensor,
    nfe: int,
    method: str = "euler",
    *,
    grid: str = "uniform",
    measure_straightness: bool = False,
    return_trajectory: bool = False,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    on_call: OnCall | None = None,
) -> ODESolution:
    """Solve from z0 with a budget of ``nfe`` network calls (``adaptive`` ignores the budget).

    Euler uses ``nfe`` steps on the model's own grid when it has one (``velocity.euler_grid(k)`` returns
    nodes and query times, e.g. an exported student's scheduler grid) and on ``grid`` otherwise; Heun the
    largest number of intervals whose 2N - 1 calls fit. ``on_call(rows)`` is called after each network call.
    """
    if method == "adaptive":
        return solve_adaptive(velocity, z0, rtol=rtol, atol=atol, on_call=on_call)
    steps = nfe if method == "euler" else heun_steps_for_nfe(nfe)
    model_grid = getattr(velocity, "euler_grid", None)
    if method == "euler" and grid == "uniform" and model_grid is not None:
        nodes, query = model_grid(steps)
        return solve_fixed(
            velocity,
            z0,
            nodes,
            method,
            query=query,
            measure_straightness=measure_straightness,
            return_trajectory=return_trajectory,
            on_call=on_call,
        )
    return solve_fixed(
        velocity,
        z0,
        time_grid(steps, grid),
        method,
        measure_straightness=measure_straightness,
        return_trajectory=return_trajectory,
        on_call=on_call,
    )


@torch.no_grad()
def solve_adaptive(
    velocity: Velocity,
    z0: torch.Tensor,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "dopri5",
    on_call: OnCall | None = None,
) -> ODESolution:
    """Reference solve with torchdiffeq's adaptive Runge-Kutta (dopri5); reports the calls it needed
    (and each one to ``on_call(rows)``)."""
    from torchdiffeq import odeint

    calls = 0

    def f(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        v = velocity(x, t.to(torch.float32).expand(x.shape[0]))
        if on_call is not None:
            on_call(x.shape[0])
        return v

    span = torch.tensor([0.0, 1.0], dtype=torch.float32, device=z0.device)
    out = odeint(f, z0.float(), span, rtol=rtol, atol=atol, method=method)
    return ODESolution(z1=out[-1].to(z0.dtype), nfe=calls)
