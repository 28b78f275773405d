"""reflow.core.perceptual: the LPIPS distance against plain loops, its symmetry and gradients, and the losses."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import F32_C_ELEMENTWISE, assert_f32_close

from reflow.core.flow import default_huber_c, regression_loss
from reflow.core.perceptual import PERCEPTUAL_LOSSES, perceptual_distance, perceptual_loss
from reflow.errors import ReflowError


class TwoTaps:
    """A fixed random feature network: conv 3x3 - ReLU - tap (C=5, 6x6), conv 3x3 stride 2 - ReLU - tap (C=4, 3x3).
    Its ReLUs zero whole feature vectors at some positions (the case where sqrt's gradient would be NaN)."""

    def __init__(self, channel_weights: bool, dtype=torch.float32, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.randn(5, 2, 3, 3, generator=g, dtype=dtype)
        self.b1 = torch.randn(5, generator=g, dtype=dtype) - 1.0  # negative biases: many zero vectors
        self.w2 = torch.randn(4, 5, 3, 3, generator=g, dtype=dtype) / 3
        self.channel_weights = [torch.rand(5, generator=g), torch.rand(4, generator=g)] if channel_weights else None

    def __call__(self, img: torch.Tensor) -> list[torch.Tensor]:
        h1 = F.relu(F.conv2d(img, self.w1, self.b1, padding=1))
        h2 = F.relu(F.conv2d(h1, self.w2, stride=2, padding=1))
        return [h1, h2]


def lpips_by_loops(maps_x: list[np.ndarray], maps_y: list[np.ndarray], weights) -> np.ndarray:
    """LPIPS written out in float64 loops over samples, taps and positions (Zhang et al. 2018, eq. 1, with the
    ``lin`` weights applied to squared differences as the reference code does; 1 without them, as the lpips
    package's lpips=False)."""
    b = maps_x[0].shape[0]
    out = np.zeros(b)
    for i in range(b):
        for tap, (fx, fy) in enumerate(zip(maps_x, maps_y, strict=True)):
            c, h, w = fx.shape[1:]
            wl = np.ones(c) if weights is None else np.asarray(weights[tap], dtype=np.float64)
            total = 0.0
            for r in range(h):
                for s in range(w):
                    vx, vy = fx[i, :, r, s], fy[i, :, r, s]
                    vx = vx / (np.sqrt((vx**2).sum()) + 1e-10)
                    vy = vy / (np.sqrt((vy**2).sum()) + 1e-10)
                    total += float((wl * (vx - vy) ** 2).sum())
            out[i] += total / (h * w)
    return out


@pytest.mark.parametrize("calibrated", [False, True])
def test_distance_matches_plain_loops(calibrated):
    torch.manual_seed(0)
    net = TwoTaps(calibrated)
    x, y = torch.randn(3, 2, 6, 6), torch.randn(3, 2, 6, 6)
    ours = perceptual_distance(net, x, y)
    # the reference sees each image set's maps from its own forward pass, in float64
    as64 = [[m.double().numpy() for m in net(v)] for v in (x, y)]
    weights = None if net.channel_weights is None else [w.double().numpy() for w in net.channel_weights]
    reference = lpips_by_loops(*as64, weights)
    assert ours.shape == (3,) and ours.dtype == torch.float32
    assert (reference > 0.05).all()  # a real distance, far above the tolerance
    assert_f32_close(ours, reference, steps=2)


def test_identical_images_are_at_distance_zero_and_distance_is_symmetric():
    torch.manual_seed(1)
    net = TwoTaps(channel_weights=True)
    x, y = torch.randn(4, 2, 6, 6), torch.randn(4, 2, 6, 6)
    assert_f32_close(perceptual_distance(net, x, x), torch.zeros(4), steps=2, c=F32_C_ELEMENTWISE)
    d_xy, d_yx = perceptual_distance(net, x, y), perceptual_distance(net, y, x)
    assert_f32_close(d_yx, d_xy, steps=2)


def test_gradients_reach_both_images_and_are_finite():
    torch.manual_seed(2)
    net = TwoTaps(channel_weights=False)
    x = torch.randn(3, 2, 6, 6, requires_grad=True)
    y = torch.randn(3, 2, 6, 6, requires_grad=True)
    assert any((m == 0).all(dim=1).any() for m in net(x.detach()))  # all-zero feature vectors are present
    gx, gy = torch.autograd.grad(perceptual_distance(net, x, y).sum(), (x, y))
    assert torch.isfinite(gx).all() and torch.isfinite(gy).all()
    assert gx.abs().sum() > 0 and gy.abs().sum() > 0


def test_gradients_match_finite_differences():
    """torch.autograd.gradcheck in float64: the analytic gradient of the distance is the numerical one."""
    torch.manual_seed(3)
    net = TwoTaps(channel_weights=True, dtype=torch.float64)
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 2, 6, 6, dtype=torch.float64, requires_grad=True)

    assert perceptual_distance(net, x, y).dtype == torch.float64  # float64 maps are summed in float64
    assert torch.autograd.gradcheck(lambda a, b: perceptual_distance(net, a, b), (x, y))


def test_lpips_huber_is_pseudo_huber_plus_lpips():
    torch.manual_seed(4)
    net = TwoTaps(channel_weights=False)
    p, y = torch.randn(5, 2, 6, 6), torch.randn(5, 2, 6, 6)
    distance = perceptual_distance(net, p, y)
    assert_f32_close(perceptual_loss(p, y, "lpips", features=net), distance, c=F32_C_ELEMENTWISE)
    for c in (None, 0.3):
        expected = regression_loss(p, y, "pseudo_huber", c) + distance
        assert_f32_close(perceptual_loss(p, y, "lpips_huber", c, net), expected, c=F32_C_ELEMENTWISE)
    # the default c is the pseudo-Huber constant of the data's dimension, written out
    c0 = default_huber_c((2, 6, 6))
    by_hand = torch.sqrt((p - y).pow(2).flatten(1).sum(1) + c0**2) - c0 + distance
    assert_f32_close(perceptual_loss(p, y, "lpips_huber", None, net), by_hand, c=F32_C_ELEMENTWISE)


def test_losses_take_half_precision_images():
    net = TwoTaps(channel_weights=False)
    p, y = torch.randn(2, 2, 6, 6).half(), torch.randn(2, 2, 6, 6)
    loss = perceptual_loss(p.float(), y, "lpips_huber", features=net)
    assert loss.dtype == torch.float32 and loss.shape == (2,)
    assert torch.equal(perceptual_loss(p, y, "lpips_huber", features=net), loss)


def test_bad_kinds_and_missing_network_are_refused():
    assert PERCEPTUAL_LOSSES == ("lpips", "lpips_huber")
    x = torch.zeros(1, 2, 6, 6)
    with pytest.raises(ValueError, match="unknown perceptual loss"):
        perceptual_loss(x, x, "l2", features=TwoTaps(False))
    with pytest.raises(ReflowError, match="--perceptual-weights PATH") as e:
        perceptual_loss(x, x, "lpips_huber")
    assert "\n" not in str(e.value)
    net = TwoTaps(channel_weights=True)
    net.channel_weights = net.channel_weights[:1]
    with pytest.raises(ValueError, match="1 channel weights for 2 taps"):
        perceptual_distance(net, x, x)
