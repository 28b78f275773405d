"""MeanFlow models (reflow.models.velocity): to_mean_flow starts from the velocity model exactly, the end time s
reaches the network, and the JVP the MeanFlow target needs matches finite differences through an MLP and
through a diffusers UNet with attention (forward-mode AD there needs reflow.core.meanflow.forward_ad_safe)."""

from __future__ import annotations

import math

import diffusers.models.embeddings
import pytest
import torch
from ddpm_helpers import tiny_unet
from diffusers import UNet2DConditionModel
from helpers import EPS64, assert_f32_close

from reflow.core.meanflow import forward_ad_safe, mean_velocity_jvp
from reflow.errors import ReflowError
from reflow.models.velocity import MLPVelocity, UNetFlow, init_model, load_model, to_mean_flow

ATTENTION_UNET = dict(
    block_out_channels=(32, 64),
    norm_num_groups=32,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
)


def velocity_mlp(seed=0) -> MLPVelocity:
    torch.manual_seed(seed)
    return MLPVelocity(sample_shape=[1, 4, 4], hidden_dim=32, num_layers=2, time_embed_dim=8).eval()


def velocity_unet(seed=0, **kw) -> UNetFlow:
    return UNetFlow(tiny_unet(seed, **{**ATTENTION_UNET, **kw})).eval()


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def wake_gap_embedding(model: torch.nn.Module, seed: int = 1) -> None:
    """Give the zero-initialised weights that read s - t random values, so outputs depend on s."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if isinstance(model, UNetFlow):
            for p in model.unet.class_embedding.linear_2.parameters():
                p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        else:
            w, d = model.net[0].weight, model.config.time_embed_dim
            w[:, -d:] = 0.3 * torch.randn(w.shape[0], d, generator=g)


@pytest.mark.parametrize("kind", ["mlp", "unet"])
def test_to_mean_flow_starts_as_the_velocity_for_every_s_and_leaves_the_model_alone(kind):
    velocity = velocity_mlp() if kind == "mlp" else velocity_unet()
    before = state(velocity)
    mean = to_mean_flow(velocity)
    assert mean.mean_flow and not velocity.mean_flow and mean is not velocity
    assert to_mean_flow(mean) is mean  # already a mean flow
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(5, *velocity.sample_shape, generator=g), torch.rand(5, generator=g)
    with torch.no_grad():
        v = velocity(x, t)
        for s in (t, t + (1 - t) * torch.rand(5, generator=g), torch.ones(5), None):
            if kind == "mlp":  # more (zero) input columns in the first layer: a matmul may sum in another order
                assert_f32_close(mean(x, t, s=s), v)
            else:  # an exact zero added to the time embedding, the rest the same kernels: bit for bit
                assert torch.equal(mean(x, t, s=s), v)
    after = state(velocity)
    assert all(torch.equal(after[name], value) for name, value in before.items())
    copied = state(mean.unet if kind == "unet" else mean)
    for name, value in state(velocity.unet if kind == "unet" else velocity).items():  # every old weight, exactly
        new = copied.pop(name)
        assert torch.equal(new[:, : value.shape[1]] if name == "net.0.weight" else new, value), name
        if name == "net.0.weight":
            assert not new[:, value.shape[1] :].any()  # the s - t columns start at zero
    if kind == "unet":  # what is left is the new embedding, its output layer zero
        assert set(copied) == {f"class_embedding.linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}
        assert not copied["class_embedding.linear_2.weight"].any() and not copied["class_embedding.linear_2.bias"].any()
    wake_gap_embedding(mean)  # and s does reach the network once those weights move
    with torch.no_grad():
        assert float((mean(x, t, s=torch.ones(5)) - mean(x, t, s=t)).abs().max()) > 1e-3


def test_velocity_models_take_no_end_time_and_unsupported_unets_say_why():
    t = torch.rand(2)
    for model in (velocity_mlp(), velocity_unet()):
        with pytest.raises(ReflowError, match="not a mean flow"):
            model(torch.randn(2, *model.sample_shape), t, s=t)
    with pytest.raises(ReflowError, match="class-conditional UNet: stock diffusers has one class embedding"):
        to_mean_flow(UNetFlow(tiny_unet(num_class_embeds=3)))
    text_unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=16,
        attention_head_dim=8,
    )
    with pytest.raises(ReflowError, match="no mean flow of a text-conditional UNet yet"):
        to_mean_flow(UNetFlow(text_unet))
    with pytest.raises(ReflowError, match="no mean-flow version of a Linear"):
        to_mean_flow(torch.nn.Linear(2, 2))
    with pytest.raises(ReflowError, match="class_embed_type 'identity' is not supported"):
        UNetFlow(tiny_unet(class_embed_type="identity"))


def test_a_unet_with_a_timestep_class_embedding_is_an_unconditional_mean_flow():
    model = UNetFlow(tiny_unet(class_embed_type="timestep"))
    assert model.mean_flow and model.conditioning is None
    with pytest.raises(ReflowError, match="unconditional"):
        model(torch.randn(2, 1, 8, 8), torch.rand(2), class_labels=torch.zeros(2))


def test_mean_flow_mlp_saves_and_loads_as_one(tmp_path):
    mean = to_mean_flow(velocity_mlp())
    wake_gap_embedding(mean)
    mean.save_pretrained(tmp_path / "m")
    for loaded in (load_model(tmp_path / "m"), init_model(tmp_path / "m")):
        loaded.eval()
        assert isinstance(loaded, MLPVelocity) and loaded.mean_flow
        x, t, s = torch.randn(3, 1, 4, 4), torch.zeros(3), torch.ones(3)
        with torch.no_grad():
            assert torch.equal(loaded(x, t, s=s), mean(x, t, s=s))


# ---- the JVP against central finite differences, in float64 ------------------------------------------------------


def float64_timestep_embedding(
    timesteps, embedding_dim, flip_sin_to_cos=False, downscale_freq_shift=1, scale=1, max_period=10000
):
    """diffusers' get_timestep_embedding in the timesteps' own dtype (the original casts them to float32, which
    would bury a float64 finite difference in t under float32 rounding)."""
    half = embedding_dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=timesteps.dtype, device=timesteps.device)
    emb = scale * timesteps[:, None] * torch.exp(exponent / (half - downscale_freq_shift))[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    return torch.nn.functional.pad(emb, (0, embedding_dim % 2))


def central_difference(model, x, t, s, v, h):
    """(u(x + h v, t + h, s) - u(x - h v, t - h, s)) / 2h: the derivative along the tangent (v, 1, 0)."""
    with torch.no_grad():
        return (model(x + h * v, t + h, s=s) - model(x - h * v, t - h, s=s)) / (2 * h)


@pytest.mark.parametrize("kind", ["mlp", "unet"])
def test_jvp_matches_central_finite_differences(kind, monkeypatch):
    if kind == "unet":
        monkeypatch.setattr(diffusers.models.embeddings, "get_timestep_embedding", float64_timestep_embedding)
    mean = to_mean_flow(velocity_mlp() if kind == "mlp" else velocity_unet()).double()
    wake_gap_embedding(mean)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, *mean.sample_shape, generator=g, dtype=torch.float64)
    v = torch.randn(4, *mean.sample_shape, generator=g, dtype=torch.float64)
    t = 0.1 + 0.4 * torch.rand(4, generator=g, dtype=torch.float64)
    s = t + 0.4 * torch.rand(4, generator=g, dtype=torch.float64)
    with torch.no_grad():
        u, dudt = mean_velocity_jvp(mean, x, t, s, v)
        torch.testing.assert_close(u, mean(x, t, s=s), rtol=0, atol=1e3 * EPS64 * float(u.abs().max()))
    # Central differences err by h^2/6 |u'''| + eps64 |u| / h. The fastest time feature turns once per timestep
    # (1000 per unit t), so |u'''| ~ 1e9 |u'|: with h = 1e-7 both terms stay near 1e-9 relative (measured: 2e-9 for
    # both models), and 1e-6 relative leaves room while a wrong tangent is off by order 1.
    fd = central_difference(mean, x, t, s, v, 1e-7)
    scale = float(fd.abs().max())
    torch.testing.assert_close(dudt, fd, rtol=0, atol=1e-6 * scale)
    # What the check catches: the derivative in x alone (a JVP without the time tangent) is far from it.
    with torch.no_grad(), forward_ad_safe():
        _, only_x = torch.func.jvp(lambda x_: mean(x_, t, s=s), (x,), (v,))
    assert float((only_x - fd).abs().max()) > 1e-3 * scale
