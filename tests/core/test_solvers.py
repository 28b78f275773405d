import math

import pytest
import torch
from helpers import F32_C_ELEMENTWISE, f32_tol

from reflow.core.solvers import heun_steps_for_nfe, solve, solve_adaptive, solve_fixed, time_grid


def rotation(x, t):
    """dx/dt = A x with A a rotation generator: x(1) = expm(A) x(0), known in closed form."""
    return torch.stack([-x[:, 1], x[:, 0]], dim=1)


def exact_rotation(x0):
    c, s = math.cos(1.0), math.sin(1.0)
    return torch.stack([c * x0[:, 0] - s * x0[:, 1], s * x0[:, 0] + c * x0[:, 1]], dim=1)


def time_dependent(x, t):
    """dx/dt = 2 t x: x(1) = e x(0)."""
    return 2 * t[:, None].to(x.dtype) * x


X0 = torch.tensor([[1.0, 0.0], [0.3, -2.0]], dtype=torch.float64)


def _error(f, exact, method, steps):
    z1 = solve_fixed(f, X0, time_grid(steps), method).z1
    return (z1 - exact).abs().max().item()


@pytest.mark.parametrize(
    "f,exact", [(rotation, exact_rotation(X0)), (time_dependent, math.e * X0)], ids=["rotation", "time-dependent"]
)
@pytest.mark.parametrize("method,order", [("euler", 1), ("heun", 2)])
def test_order_of_accuracy(f, exact, method, order):
    # Halving the step divides the global error by about 2^order.
    e1, e2 = _error(f, exact, method, 64), _error(f, exact, method, 128)
    observed = math.log2(e1 / e2)
    assert observed == pytest.approx(order, abs=0.15)


def test_nfe_accounting():
    assert solve(rotation, X0, 4, "euler").nfe == 4
    assert heun_steps_for_nfe(7) == 4
    assert solve(rotation, X0, 7, "heun").nfe == 7
    assert solve(rotation, X0, 1, "heun").nfe == 1


def test_adaptive_is_accurate_and_counts_calls():
    sol = solve_adaptive(rotation, X0.float(), rtol=1e-7, atol=1e-7)
    # float32 steps on 2-vectors (no network): a few roundings of |x| <= 2 per step, sol.nfe steps (50 here: 4.4e-5);
    # the solver's own error is ~1e-7, while a fixed grid of the same 50 calls is 2e-3 (Heun) or 2e-2 (Euler) off
    exact = exact_rotation(X0)
    torch.testing.assert_close(sol.z1.double(), exact, **f32_tol(exact, steps=sol.nfe, c=F32_C_ELEMENTWISE))
    assert sol.nfe > 6


def test_quadratic_grid():
    g = time_grid(4, "quadratic")
    assert g[0] == 0 and g[-1] == 1 and torch.all(g[1:] > g[:-1])
    assert (g[1] - g[0]) > (g[-1] - g[-2])


def test_straightness_of_straight_flow_is_zero():
    z1_target = torch.tensor([[2.0, -1.0], [0.5, 3.0]])

    def straight(x, t):  # the velocity of x_t = (1 - t) z0 + t z1 when z0 is known
        return (z1_target - x) / (1 - t[:, None]).clamp_min(1e-6)

    z0 = torch.zeros(2, 2)
    sol = solve_fixed(straight, z0, time_grid(10), "euler", measure_straightness=True)
    torch.testing.assert_close(sol.z1, z1_target, **f32_tol(z1_target, steps=10, c=F32_C_ELEMENTWISE))
    assert sol.straightness == pytest.approx(0.0, abs=1e-10)


def test_straightness_of_rotation_matches_integral():
    # Along x(t) = R(t) x0 (|x0| = 1) the chord is c = R(1) x0 - x0 and dx/dt = R(t) J x0;
    # ||c - v(t)||^2 = |c|^2 + 1 - 2 c.v(t). Integrated over [0, 1] in closed form:
    # |c|^2 = 2 - 2 cos 1, int c.v dt = c.(R(1) x0 - x0) = |c|^2, so S = 1 - |c|^2 = 2 cos 1 - 1.
    x0 = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    sol = solve_fixed(rotation, x0, time_grid(2000), "heun", measure_straightness=True)
    assert sol.straightness == pytest.approx(2 * math.cos(1.0) - 1, abs=2e-3)
