"""MeanFlow (Geng et al. 2025, "Mean Flows for One-step Generative Modeling"): a model of the AVERAGE
velocity over a jump, so one network call can cross the whole path.

Convention (fixed project-wide): t = 0 is noise z0, t = 1 is data z1, x_t = (1 - t) z0 + t z1. A mean-flow
model ``u(x, t, s=s)`` predicts the average velocity from time t to a later time s >= t,

    u(x_t, t, s) = 1 / (s - t) * int_t^s v(x_tau, tau) dtau,      x_s = x_t + (s - t) u(x_t, t, s),

and u(x, t, t) = v(x, t), the instantaneous velocity. Differentiating (s - t) u = int_t^s v dtau in t
(s fixed, x = x_t moving along the path) gives the MeanFlow identity

    u(x_t, t, s) = v(x_t, t) + (s - t) d/dt u(x_t, t, s),      d/dt u = (du/dx) v + du/dt,

the total derivative being the JVP of u in its inputs (x, t, s) with tangent (v, 1, 0). Training regresses
u_theta onto the right-hand side with v = z1 - z0 (the conditional velocity) and the JVP taken on the current
weights under a stop-gradient (the paper's Eq. 10-11).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

from reflow.core.flow import expand_like, interpolate, regression_loss, target_velocity
from reflow.core.timesteps import sample_time

EndpointLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""A per-sample loss between jump end points, ``(pred_end, tgt_end) -> (B,)`` (e.g. LPIPS in pixel space)."""


def sample_interval(
    n: int,
    kind: str = "uniform",
    *,
    equal_fraction: float = 0.75,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    **time_kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """n training intervals (t, s) with 0 <= t <= s <= 1, float32 (n,) each, on ``device``.

    Two times are drawn from ``sample_time(kind, **time_kwargs)`` and sorted (t the smaller, the noise side);
    then ``round(equal_fraction * n)`` rows, picked by a permutation from the same ``generator``, get s = t:
    plain flow matching on those rows (the paper's "r = t" fraction, 75% its best). As in the reference
    implementation, an equal row keeps the noise-side time of its sorted pair.
    """
    if not 0.0 <= equal_fraction <= 1.0:
        raise ValueError(f"equal_fraction must be in [0, 1], got {equal_fraction}")
    a = sample_time(n, kind, generator=generator, device=device, **time_kwargs)
    b = sample_time(n, kind, generator=generator, device=device, **time_kwargs)
    t, s = torch.minimum(a, b), torch.maximum(a, b)
    gen_device = generator.device if generator is not None else "cpu"
    equal = torch.randperm(n, generator=generator, device=gen_device)[: int(equal_fraction * n + 0.5)]
    s[equal.to(device)] = t[equal.to(device)]
    return t, s


def _group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``F.group_norm`` written out in plain ops, which forward-mode AD supports (the native CPU kernel's
    forward AD fails with "view size is not compatible"): per sample and group, (x - mean) / sqrt(var + eps)
    with the biased variance, then the per-channel affine."""
    groups = x.reshape(x.shape[0], num_groups, -1)
    mean = groups.mean(dim=-1, keepdim=True)
    var = groups.var(dim=-1, unbiased=False, keepdim=True)
    out = ((groups - mean) * torch.rsqrt(var + eps)).reshape(x.shape)
    channel = (1, -1) + (1,) * (x.ndim - 2)
    if weight is not None:
        out = out * weight.reshape(channel)
    if bias is not None:
        out = out + bias.reshape(channel)
    return out


@contextlib.contextmanager
def forward_ad_safe() -> Iterator[None]:
    """Make diffusers UNets differentiable in forward mode (``torch.func.jvp``) for the duration:

    - attention runs the math SDPA kernel (the flash kernels have no forward-AD formula);
    - ``torch.nn.functional.group_norm`` is swapped for a decomposition into plain ops (:func:`_group_norm`),
      which ``nn.GroupNorm`` looks up at call time; restored on exit, also on error. The swap is process-wide,
      so do not run other GroupNorm code in other threads meanwhile.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    native = F.group_norm
    F.group_norm = _group_norm
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        F.group_norm = native


def mean_velocity_jvp(
    model: Callable[..., torch.Tensor],
    x: torch.Tensor,
    t: torch.Tensor,
    s: torch.Tensor,
    v: torch.Tensor,
    cond: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, du/dt): the model's average velocity u(x, t, s) and its total derivative along the path,
    d/dt u = (du/dx) v + du/dt, the JVP with tangent (v, 1, 0) in (x, t, s). Run inside
    :func:`forward_ad_safe`; ``cond`` are the model's conditioning keywords, held fixed."""
    cond = cond or {}

    def u(x_: torch.Tensor, t_: torch.Tensor, s_: torch.Tensor) -> torch.Tensor:
        return model(x_, t_, s=s_, **cond)

    with forward_ad_safe():
        return torch.func.jvp(u, (x, t, s), (v, torch.ones_like(t), torch.zeros_like(s)))


def mean_flow_target(
    model: Callable[..., torch.Tensor],
    x: torch.Tensor,
    t: torch.Tensor,
    s: torch.Tensor,
    v: torch.Tensor,
    cond: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The MeanFlow regression target u_tgt = v + (s - t) d/dt u(x, t, s), detached, shape of x.

    Rows with s = t get v exactly (no JVP: with the paper's 75% of equal rows that saves 3/4 of its cost);
    the JVP of the others runs on the current weights with no graph and autocast off (in the model's own dtype,
    float32 for a mixed-precision run: a half-precision JVP of a sinusoidal time embedding is mostly rounding).
    """
    target = v.detach().clone()
    jump = (s > t).nonzero().squeeze(1)
    if len(jump) == 0:
        return target
    sub = {k: c[jump] for k, c in (cond or {}).items()}
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        _, dudt = mean_velocity_jvp(model, x[jump], t[jump], s[jump], v[jump], sub)
    gap = expand_like(s[jump] - t[jump], x).to(x.dtype)
    target[jump] = v[jump] + gap * dudt.to(v.dtype)
    return target.detach()


def meanflow_loss(
    model: Callable[..., torch.Tensor],
    z0: torch.Tensor,
    z1: torch.Tensor,
    t: torch.Tensor,
    s: torch.Tensor,
    kind: str = "l2",
    huber_c: float | None = None,
    cond: dict[str, torch.Tensor] | None = None,
    endpoint_loss: EndpointLoss | None = None,
    jvp_model: Callable[..., torch.Tensor] | None = None,
) -> torch.Tensor:
    """The MeanFlow loss on the straight path x_t = (1 - t) z0 + t z1, a scalar:

        L = 1/B sum_i [ l(u_theta(x_i, t_i, s_i), u_tgt_i) + 1[s_i > t_i] e(x_i + h_i u_theta_i, x_i + h_i u_tgt_i) ]

    with h_i = s_i - t_i, u_tgt = (z1 - z0) + h d/dt u (:func:`mean_flow_target`, stop-gradient), l the
    regression loss ``kind`` (l2 or pseudo_huber, see ``reflow.core.flow.regression_loss``) and e the optional
    per-sample ``endpoint_loss`` on the jump end points, evaluated only on rows with s > t (on the others both
    end points are x_i) and averaged over the whole batch like l. One forward pass with gradient covers every row.
    ``jvp_model``: the same weights to take the target's JVP through (default ``model``); a distributed
    training passes the unwrapped model, since forward-mode AD through DDP's wrapper is not supported.
    """
    cond = cond or {}
    x_t = interpolate(z0, z1, t)
    u_tgt = mean_flow_target(jvp_model or model, x_t, t, s, target_velocity(z0, z1), cond)
    u = model(x_t, t, s=s, **cond)
    total = regression_loss(u, u_tgt, kind, huber_c).sum()
    jump = (s > t).nonzero().squeeze(1)
    if endpoint_loss is not None and len(jump) > 0:
        x, h = x_t[jump], expand_like(s[jump] - t[jump], x_t).to(x_t.dtype)
        total = total + endpoint_loss(x + h * u[jump], x + h * u_tgt[jump]).sum()
    return total / len(z0)


def mean_flow_jumps(
    model: Callable[..., torch.Tensor],
    z0: torch.Tensor,
    grid: torch.Tensor | list[float],
    cond: dict[str, torch.Tensor] | None = None,
    on_call: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Sample with k jumps over a grid g_0 < ... < g_k (k = len(grid) - 1 network calls):

        x_{i+1} = x_i + (g_{i+1} - g_i) u(x_i, g_i, g_{i+1}),      x_0 = z0,

    and returns x_k. ``cond``: the model's conditioning keywords; ``on_call(rows)`` after each jump (progress).
    Differentiable (no ``no_grad`` here).
    """
    nodes = [float(g) for g in grid]
    x = z0
    for g, g_next in zip(nodes[:-1], nodes[1:], strict=True):
        t = torch.full((x.shape[0],), g, dtype=torch.float32, device=x.device)
        s = torch.full((x.shape[0],), g_next, dtype=torch.float32, device=x.device)
        x = x + (g_next - g) * model(x, t, s=s, **(cond or {}))
        if on_call is not None:
            on_call(x.shape[0])
    return x
