import math

import pytest
import torch
from scipy import integrate

from reflow.core.timesteps import sample_time

N = 400_000


def _moments(kind, **kw):
    t = sample_time(N, kind, generator=torch.Generator().manual_seed(0), **kw).double()
    assert t.min() >= 0 and t.max() <= 1
    return t.mean().item(), t.var().item()


def test_uniform_moments():
    mean, var = _moments("uniform")
    assert mean == pytest.approx(0.5, abs=3e-3)
    assert var == pytest.approx(1 / 12, abs=2e-3)


@pytest.mark.parametrize("a", [2.0, 4.0])
def test_u_shaped_moments_match_density(a):
    # p(t) = (exp(a t) + exp(a (1 - t))) * a / (2 (e^a - 1)), integrated independently by scipy.
    norm = 2 * math.expm1(a) / a
    density = lambda t: (math.exp(a * t) + math.exp(a * (1 - t))) / norm  # noqa: E731
    assert integrate.quad(density, 0, 1)[0] == pytest.approx(1.0)
    m1 = integrate.quad(lambda t: t * density(t), 0, 1)[0]
    m2 = integrate.quad(lambda t: t * t * density(t), 0, 1)[0]
    mean, var = _moments("u_shaped", u_shape_a=a)
    assert mean == pytest.approx(m1, abs=3e-3)
    assert var == pytest.approx(m2 - m1 * m1, abs=2e-3)
    assert var > 1 / 12  # more mass at the ends than uniform


def test_logit_normal_moments():
    # E[sigmoid(m + s n)] by quadrature against the normal density.
    m, s = 0.3, 1.2
    pdf = lambda z: math.exp(-z * z / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    sig = lambda z: 1 / (1 + math.exp(-(m + s * z)))  # noqa: E731
    m1 = integrate.quad(lambda z: sig(z) * pdf(z), -12, 12)[0]
    m2 = integrate.quad(lambda z: sig(z) ** 2 * pdf(z), -12, 12)[0]
    mean, var = _moments("logit_normal", logit_mean=m, logit_std=s)
    assert mean == pytest.approx(m1, abs=3e-3)
    assert var == pytest.approx(m2 - m1 * m1, abs=2e-3)


def test_seeded_and_unknown():
    a = sample_time(10, "u_shaped", generator=torch.Generator().manual_seed(5))
    b = sample_time(10, "u_shaped", generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="unknown time sampler"):
        sample_time(3, "beta")
