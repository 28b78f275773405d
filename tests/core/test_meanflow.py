"""MeanFlow math (reflow.core.meanflow): the interval sampler, the identity target checked on flows whose average
velocity is known in closed form, the loss against a hand computation, and sampling in jumps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import EPS64, F32_C_ELEMENTWISE, assert_f32_close

from reflow.core.flow import Conditioned, expand_like, interpolate, regression_loss
from reflow.core.meanflow import (
    _group_norm,
    forward_ad_safe,
    mean_flow_jumps,
    mean_flow_target,
    meanflow_loss,
    sample_interval,
)
from reflow.core.sampling import sample
from reflow.core.solvers import solve, time_grid
from reflow.errors import ReflowError
from reflow.models.velocity import MLPVelocity

# ---- the interval sampler ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["uniform", "logit_normal", "u_shaped"])
def test_sample_interval_is_ordered_seeded_with_the_equal_fraction_exact(kind):
    t, s = sample_interval(1000, kind, equal_fraction=0.75, generator=torch.Generator().manual_seed(0))
    assert t.shape == s.shape == (1000,) and t.dtype == s.dtype == torch.float32
    assert bool((t <= s).all()) and bool((t >= 0).all()) and bool((s <= 1).all())
    assert int((s == t).sum()) == 750  # round(0.75 n) rows, exactly (two draws coincide with probability 0)
    again = sample_interval(1000, kind, equal_fraction=0.75, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, again[0]) and torch.equal(s, again[1])


def test_sample_interval_fraction_bounds_and_time_settings():
    gen = torch.Generator().manual_seed(1)
    t, s = sample_interval(64, equal_fraction=0.0, generator=gen)
    assert bool((s > t).all())
    t, s = sample_interval(64, equal_fraction=1.0, generator=gen)
    assert torch.equal(t, s)
    t, s = sample_interval(4000, "logit_normal", equal_fraction=0.0, generator=gen, logit_mean=3.0)
    assert float(s.mean()) > 0.9  # the keyword reached sample_time: sigmoid(3 + n) is mostly near 1
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="equal_fraction"):
            sample_interval(8, equal_fraction=bad)


# ---- the identity on analytic flows --------------------------------------------------------------------------


def straight_coupling(d=5, seed=0):
    """z1 = a z0 + c with a diagonal (not 1), so x_t = (1 - t + t a) z0 + t c: every path is a straight line at
    constant speed z1 - z0, and the average velocity over any interval is the velocity itself, in closed form
    u*(x, t, s) = (a - 1)(x - t c) / (1 - t + t a) + c (z0 recovered from x_t), for any s."""
    g = torch.Generator().manual_seed(seed)
    a = 0.3 + 2.2 * torch.rand(d, generator=g, dtype=torch.float64)  # a > 0: paths never cross
    c = torch.randn(d, generator=g, dtype=torch.float64)

    def u(x, t, s=None):
        t = expand_like(t, x)
        return (a - 1) * (x - t * c) / (1 - t + t * a) + c

    return a, c, u


def test_identity_target_on_a_straight_coupling_is_the_constant_velocity():
    a, c, u = straight_coupling()
    g = torch.Generator().manual_seed(2)
    z0 = torch.randn(64, 5, generator=g, dtype=torch.float64)
    z1 = a * z0 + c
    t, s = torch.rand(64, generator=g, dtype=torch.float64).sort(0).values, torch.ones(64, dtype=torch.float64)
    s[:32] = t[:32] + (1 - t[:32]) * torch.rand(32, generator=g, dtype=torch.float64)
    x = interpolate(z0, z1, t)
    v = z1 - z0
    tol = {"atol": 64 * EPS64 * float(v.abs().max()), "rtol": 0.0}  # float64 arithmetic of a few dozen ops
    torch.testing.assert_close(u(x, t, s), v, **tol)  # the closed form itself
    torch.testing.assert_close(mean_flow_target(u, x, t, s, v), v, **tol)
    # What the check catches: the JVP without its time tangent (1) would be off by (s - t) d/dx u* v, of order 1.
    _, du_x = torch.func.jvp(lambda x_: u(x_, t, s), (x,), (v,))
    assert float((expand_like(s - t, x) * du_x).abs().max()) > 1e9 * tol["atol"]


def test_identity_target_on_a_curved_flow_is_its_average_velocity():
    """v(x, t) = x: x_t = x_0 e^t, so u*(x, t, s) = x (e^(s - t) - 1) / (s - t), and v + (s - t) d/dt u* = u*."""

    def u(x, t, s=None):
        h = expand_like(s - t, x)
        safe = torch.where(h > 0, h, torch.ones_like(h))
        return x * torch.where(h > 0, torch.expm1(safe) / safe, torch.ones_like(h))

    g = torch.Generator().manual_seed(3)
    x = torch.randn(32, 3, 2, generator=g, dtype=torch.float64)
    t = 0.5 * torch.rand(32, generator=g, dtype=torch.float64)
    s = t + 0.5 * torch.rand(32, generator=g, dtype=torch.float64)
    s[::4] = t[::4]
    target = mean_flow_target(u, x, t, s, v=x)
    expected = u(x, t, s)
    torch.testing.assert_close(target, expected, atol=64 * EPS64 * float(expected.abs().max()), rtol=0.0)
    # Not trivially v: u* = x (e^h - 1) / h is up to 1.3 x here (h = s - t up to 0.5).
    assert float((expected - x).abs().max()) > 0.1


def test_rows_with_s_equal_t_get_v_and_never_reach_the_jvp():
    seen = []

    def u(x, t, s=None):
        seen.append(len(x))
        return x * (1 + expand_like(s, x))

    x, v = torch.randn(8, 2, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    t = torch.full((8,), 0.25, dtype=torch.float64)
    s = t.clone()
    s[[1, 6]] = 0.75
    target = mean_flow_target(u, x, t, s, v)
    assert seen == [2]
    assert torch.equal(target[s == t], v[s == t])
    assert torch.equal(mean_flow_target(u, x, t, t, v), v) and seen == [2]  # no jump rows: no model call


# ---- the loss --------------------------------------------------------------------------------------------------


def mean_flow_mlp(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    model = MLPVelocity(sample_shape=[3], hidden_dim=32, num_layers=2, time_embed_dim=8, mean_flow=True)
    return model.double() if dtype == torch.float64 else model


def batch(n=16, seed=4):
    g = torch.Generator().manual_seed(seed)
    z0, z1 = torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randn(n, 3, generator=g, dtype=torch.float64)
    t, s = sample_interval(n, equal_fraction=0.5, generator=g)
    return z0, z1, t.double(), s.double()


@pytest.mark.parametrize("kind", ["l2", "pseudo_huber"])
def test_meanflow_loss_and_gradient_match_a_hand_computation(kind):
    """Against the target built with one JVP over every row (no row selection) and a plain regression, and the
    gradient of that regression with the target held constant (the stop-gradient)."""
    model = mean_flow_mlp()
    z0, z1, t, s = batch()
    endpoint = lambda p, q: (p - q).pow(2).sum(dim=1)  # noqa: E731
    loss = meanflow_loss(model, z0, z1, t, s, kind, endpoint_loss=endpoint)
    loss.backward()
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    x = (1 - t[:, None]) * z0 + t[:, None] * z1
    v = z1 - z0
    with torch.no_grad():
        _, dudt = torch.func.jvp(lambda x_, t_: model(x_, t_, s=s), (x, t), (v, torch.ones_like(t)))
    target = v + (s - t)[:, None] * dudt
    u = model(x, t, s=s)
    h = (s - t)[:, None]
    jump = (s > t).double()
    expected = (regression_loss(u, target, kind) + jump * endpoint(x + h * u, x + h * target)).mean()
    expected.backward()
    # regression_loss computes in float32 (it casts the difference): a few float32 roundings per row, and the
    # gradients carry them through the network (tests/README.md, rule 2)
    assert_f32_close(loss, expected, c=F32_C_ELEMENTWISE)
    for mine, theirs in zip(ours, [p.grad for p in model.parameters()], strict=True):
        assert_f32_close(mine, theirs)


def test_meanflow_loss_is_zero_for_the_exact_average_velocity():
    a, c, u = straight_coupling(d=3)
    z0 = torch.randn(32, 3, dtype=torch.float64)
    t, s = sample_interval(32, equal_fraction=0.25, generator=torch.Generator().manual_seed(5))
    loss = meanflow_loss(u, z0, a * z0 + c, t.double(), s.double())
    assert loss.item() < 1e-25


# ---- forward-mode AD through group norm ------------------------------------------------------------------------


def test_group_norm_decomposition_matches_the_native_op_and_is_restored():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 8, 5, 5, generator=g, dtype=torch.float64)
    w, b = torch.randn(8, generator=g, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64)
    torch.testing.assert_close(_group_norm(x, 4, w, b), F.group_norm(x, 4, w, b), rtol=0, atol=1e-13)
    native = F.group_norm
    with pytest.raises(RuntimeError, match="inside"):
        with forward_ad_safe():
            assert F.group_norm is _group_norm
            raise RuntimeError("inside")
    assert F.group_norm is native


# ---- sampling in jumps -----------------------------------------------------------------------------------------


class Recorder:
    """A mean flow that records the (t, s) of every call; ``grid`` gives it its own Euler grid."""

    mean_flow = True

    def __init__(self, model, grid=None):
        self.model, self.calls = model, []
        if grid is not None:
            self.euler_grid = lambda k: (grid(k), grid(k)[:-1])

    def __call__(self, x, t, s=None, **cond):
        self.calls.append((t.double(), None if s is None else s.double(), cond))
        return self.model(x, t, s=s)


def test_one_step_is_one_jump_from_noise_to_data():
    model = mean_flow_mlp(dtype=torch.float32).eval()
    z0 = torch.randn(10, 3, generator=torch.Generator().manual_seed(7))
    rec = Recorder(model)
    sol = sample(rec, z0, 1)
    assert sol.nfe == 1 and len(rec.calls) == 1
    t, s, _ = rec.calls[0]
    assert bool((t == 0).all()) and bool((s == 1).all())
    with torch.no_grad():  # the same batch through the same kernels: bit for bit
        assert torch.equal(sol.z1, z0 + model(z0, torch.zeros(10), s=torch.ones(10)))


@pytest.mark.parametrize("own_grid", [False, True])
def test_k_steps_jump_over_the_models_grid(own_grid):
    model = mean_flow_mlp(dtype=torch.float32).eval()
    z0 = torch.randn(6, 3, generator=torch.Generator().manual_seed(8))
    grid = (lambda k: time_grid(k, "quadratic")) if own_grid else None
    rec = Recorder(model, grid)
    k = 3
    sol = sample(rec, z0, k)
    nodes = time_grid(k, "quadratic" if own_grid else "uniform")
    assert sol.nfe == k and len(rec.calls) == k
    for i, (t, s, _) in enumerate(rec.calls):  # float32 times of the float64 nodes
        assert bool((t == float(nodes[i].float())).all())
        assert bool((s == float(nodes[i + 1].float())).all())
    with torch.no_grad():
        assert torch.equal(sol.z1, mean_flow_jumps(model, z0, nodes))


def test_mean_flow_sampling_refuses_other_solvers_and_measures_its_velocitys_straightness():
    model = mean_flow_mlp(dtype=torch.float32).eval()
    z0 = torch.randn(6, 3, generator=torch.Generator().manual_seed(9))
    for solver in ("heun", "adaptive"):
        with pytest.raises(ReflowError, match="MeanFlow model samples in jumps \\(solver euler\\)"):
            sample(model, z0, 2, solver)
    sol = sample(model, z0, 4, measure_straightness=True)
    with torch.no_grad():
        velocity = solve(lambda x, t: model(x, t), z0, 4, "euler", measure_straightness=True)
        assert torch.equal(sol.z1, mean_flow_jumps(model, z0, time_grid(4)))
    assert sol.straightness == velocity.straightness and sol.curvature == velocity.curvature
    assert sol.nfe == 4


def test_conditioning_and_the_end_time_pass_through_conditioned():
    model = mean_flow_mlp(dtype=torch.float32).eval()
    rec = Recorder(model)
    field = Conditioned(rec, class_labels=torch.arange(4))
    assert field.mean_flow is True
    x, t, s = torch.randn(4, 3), torch.zeros(4), torch.ones(4)
    field(x, t, s=s)
    field(x, t)
    assert torch.equal(rec.calls[0][1], s.double()) and rec.calls[1][1] is None
    assert all(torch.equal(call[2]["class_labels"], torch.arange(4)) for call in rec.calls)
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    rec.calls.clear()
    sample(rec, torch.randn(6, 3), 2, batch_size=4, cond={"class_labels": labels})
    assert [len(c[2]["class_labels"]) for c in rec.calls] == [4, 4, 2, 2]
