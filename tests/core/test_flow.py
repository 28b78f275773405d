import math

import pytest
import torch
from helpers import F32_C_ELEMENTWISE, f32_tol

from reflow.core.flow import (
    default_huber_c,
    expand_like,
    flow_matching_loss,
    interpolate,
    regression_loss,
    target_velocity,
)


def test_path_endpoints_and_midpoint():
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(5, 3, 4, 4, generator=g), torch.randn(5, 3, 4, 4, generator=g)
    # elementwise float32 arithmetic: a few roundings of values up to max|z0|, max|z1| (tests/README.md)
    tol = f32_tol([z0, z1], c=F32_C_ELEMENTWISE)
    torch.testing.assert_close(interpolate(z0, z1, torch.zeros(5)), z0, **tol)
    torch.testing.assert_close(interpolate(z0, z1, torch.ones(5)), z1, **tol)
    t = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    xt = interpolate(z0, z1, t)
    for i, ti in enumerate(t.tolist()):
        torch.testing.assert_close(xt[i], (1 - ti) * z0[i] + ti * z1[i], **tol)


def test_target_is_time_derivative_of_path():
    g = torch.Generator().manual_seed(1)
    z0, z1 = torch.randn(4, 2, generator=g), torch.randn(4, 2, generator=g)
    t = torch.rand(4, generator=g, dtype=torch.float64).to(torch.float32)
    h = 1e-3
    fd = (
        interpolate(z0.double(), z1.double(), t.double() + h) - interpolate(z0.double(), z1.double(), t.double() - h)
    ) / (2 * h)
    # fd is z1 - z0 to ~1e-13 (the path is linear), rounded to float32: an ulp or two from the float32 z1 - z0
    torch.testing.assert_close(fd.float(), target_velocity(z0, z1), **f32_tol(fd, c=F32_C_ELEMENTWISE))


def test_expand_like_broadcasts_per_sample():
    x = torch.zeros(3, 2, 5, 7)
    assert expand_like(torch.arange(3.0), x).shape == (3, 1, 1, 1)


def test_losses_against_hand_computation():
    p = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    y = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    tol = f32_tol(25.0, c=F32_C_ELEMENTWISE)  # a few float32 roundings of sums up to 25
    torch.testing.assert_close(regression_loss(p, y, "l2"), torch.tensor([2.5, 12.5]), **tol)
    c = 0.5
    expected = torch.tensor([math.sqrt(5 + c * c) - c, math.sqrt(25 + c * c) - c])
    torch.testing.assert_close(regression_loss(p, y, "pseudo_huber", huber_c=c), expected, **tol)
    assert default_huber_c((3, 32, 32)) == pytest.approx(0.00054 * math.sqrt(3072))
    with pytest.raises(ValueError):
        regression_loss(p, y, "l1")


def test_exact_velocity_has_zero_loss():
    g = torch.Generator().manual_seed(2)
    z0, z1 = torch.randn(8, 2, generator=g), torch.randn(8, 2, generator=g)
    t = torch.rand(8, generator=g)

    def oracle(x, tt):  # knows the pairing: the straight-line velocity
        return z1 - z0

    assert flow_matching_loss(oracle, z0, z1, t).item() == 0.0  # the same z1 - z0 on both sides: exactly 0
