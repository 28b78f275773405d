"""Velocity models: v(x, t) with t in [0, 1] (t = 0 noise, t = 1 data).

A velocity model is any module whose ``forward(x, t)`` takes x of shape (B, *sample_shape) and t of
shape (B,) and returns a tensor shaped like x. Every model is a diffusers ``ModelMixin`` +
``ConfigMixin``, so a folder written by ``save_pretrained`` (safetensors) is the unit of exchange.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from reflow.errors import ReflowError
from reflow.folders.files import first_line, read_json
from reflow.folders.kinds import is_diffusers_checkpoint, is_flow_pipeline
from reflow.folders.weights import check_weights, use_safetensors


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of t in [0, 1] (scaled by 1000 as in DDPM), shape (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


class MLPVelocity(ModelMixin, ConfigMixin):
    """An MLP velocity field for small data (2-D toys, 8x8 digits): flattens x, concatenates a
    sinusoidal embedding of t, and maps back to x's shape."""

    @register_to_config
    def __init__(
        self,
        sample_shape: tuple[int, ...] | list[int] = (2,),
        hidden_dim: int = 256,
        num_layers: int = 4,
        time_embed_dim: int = 64,
    ):
        super().__init__()
        dim = math.prod(sample_shape)
        layers: list[nn.Module] = [nn.Linear(dim + time_embed_dim, hidden_dim), nn.SiLU()]
        for _ in range(num_layers - 1):
            layers += [nn.Linear(hidden_dim, hidden_dim), nn.SiLU()]
        layers.append(nn.Linear(hidden_dim, dim))
        self.net = nn.Sequential(*layers)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.config.sample_shape)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t, self.config.time_embed_dim).to(x.dtype)
        h = torch.cat([x.flatten(1), emb], dim=1)
        return self.net(h).view_as(x)


MODEL_CLASSES: dict[str, type[ModelMixin]] = {"MLPVelocity": MLPVelocity}


class UNetFlow(nn.Module):
    """A diffusers UNet used as a velocity model, in diffusers' flow-matching convention.

    The UNet sees what a flow-matching scheduler feeds it and predicts what that scheduler expects
    (``reflow.core.flow.to_diffusers_timestep`` / ``velocity_from_diffusers``):

        timestep = (1 - t) * num_train_timesteps,      unet(x_t, timestep) = z0 - z1 = -v(x_t, t)

    so its folder (``reflow.pipelines.export``) runs in stock diffusers. A DDPM's UNet initialises it
    with the same time mapping: the DDPM's timestep T - 1 is its noise end, as (1 - 0) * T is ours.
    ``euler_grid(k)`` is the k-step grid of the exported scheduler, so ``reflow sample --nfe k`` and
    ``pipe(num_inference_steps=k)`` make the same samples from the same noise.

    Conditioning: a ``UNet2DModel`` with ``num_class_embeds`` takes ``class_labels`` (B,) int64; a
    ``UNet2DConditionModel`` (Stable Diffusion layout) takes ``encoder_hidden_states`` (B, seq, dim), the
    text encoder's prompt embeddings. ``conditioning`` says which: None, "class" or "text".
    """

    def __init__(self, unet: ModelMixin, num_train_timesteps: int = 1000):
        super().__init__()
        config = unet.config
        self.conditioning: str | None = None
        self.num_classes: int | None = None
        if type(unet).__name__ == "UNet2DConditionModel":
            self.conditioning = "text"
            if config.class_embed_type is not None or config.addition_embed_type is not None:
                raise ReflowError(
                    "this UNet2DConditionModel needs extra conditioning (class_embed_type / addition_embed_type, "
                    "e.g. SDXL); reflow supports the Stable Diffusion 1.x/2.x layout (text embeddings only)"
                )
        elif config.num_class_embeds is not None:
            self.conditioning = "class"
            self.num_classes = int(config.num_class_embeds)
        elif config.class_embed_type is not None:
            raise ReflowError(
                f"class_embed_type {config.class_embed_type!r} is not supported; only integer class labels "
                "(num_class_embeds)"
            )
        self.unet = unet
        self.num_train_timesteps = int(num_train_timesteps)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (self.unet.config.in_channels, h, w)

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        from reflow.core.flow import to_diffusers_timestep, velocity_from_diffusers

        timestep = to_diffusers_timestep(t, self.num_train_timesteps)
        if self.conditioning == "text":
            if encoder_hidden_states is None:
                raise ReflowError("this model is text-conditional: pass prompt embeddings (encoder_hidden_states)")
            out = self.unet(x, timestep, encoder_hidden_states=encoder_hidden_states.to(x.dtype)).sample
        elif self.conditioning == "class":
            if class_labels is None:
                raise ReflowError(f"this model is class-conditional ({self.num_classes} classes): pass class labels")
            out = self.unet(x, timestep, class_labels=class_labels).sample
        else:
            if class_labels is not None or encoder_hidden_states is not None:
                raise ReflowError("this model is unconditional; drop the labels / prompts")
            out = self.unet(x, timestep).sample
        return velocity_from_diffusers(out)

    def euler_grid(self, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(nodes, query): the k-step Euler grid of the exported scheduler, as flow times (float64)."""
        return scheduler_grid(student_scheduler(self.num_train_timesteps), steps)


def scheduler_grid(scheduler: Any, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The Euler grid a flow-matching diffusers scheduler runs for ``steps`` calls, in flow time.

    ``nodes`` (steps + 1 values) are 1 - sigma (sigma = 1 is noise, so t = 0); ``query`` (steps values) are
    the times the UNet is called at, 1 - timestep / num_train_timesteps (schedulers may round timesteps).
    """
    from reflow.core.flow import from_diffusers_sigma

    scheduler.set_timesteps(steps)
    nodes = from_diffusers_sigma(scheduler.sigmas.double())
    query = from_diffusers_sigma(scheduler.timesteps.double() / scheduler.config.num_train_timesteps)
    return nodes, query


def default_unet_config(sample_shape: tuple[int, ...]) -> dict[str, Any]:
    """A UNet2DModel config for a fresh image student of shape (C, H, W): one resolution level per halving
    H and W allow (2 to 4 levels), attention at the coarsest."""
    c, h, w = sample_shape
    levels = 1
    while levels < 4 and h % (2**levels) == 0 and w % (2**levels) == 0 and min(h, w) // (2**levels) >= 2:
        levels += 1
    if levels < 2:
        raise ReflowError(
            f"a fresh UNet needs H and W divisible by 2 and at least 4, got {h}x{w}; pass --model-config or --init"
        )
    channels = (64, 128, 256, 256)[:levels]
    return {
        "sample_size": [h, w] if h != w else h,
        "in_channels": c,
        "out_channels": c,
        "layers_per_block": 2,
        "block_out_channels": list(channels),
        "down_block_types": ["DownBlock2D"] * (levels - 1) + ["AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D"] + ["UpBlock2D"] * (levels - 1),
        "norm_num_groups": 32,
    }


def build_model(
    sample_shape: tuple[int, ...],
    config: dict[str, Any] | None = None,
    *,
    num_classes: int | None = None,
    embed_shape: tuple[int, int] | None = None,
    **mlp: Any,
) -> nn.Module:
    """A fresh velocity model: a UNetFlow for images (C, H, W), an MLPVelocity otherwise.

    ``config`` is a model config (a UNet2DModel, UNet2DConditionModel or MLPVelocity ``config.json``, e.g. a
    teacher's ``unet/config.json`` for the same architecture); ``mlp`` are MLPVelocity settings for the
    default MLP. ``num_classes`` (class-labelled pairs) gives the default UNet a class embedding;
    ``embed_shape`` (pairs with prompt embeddings) needs a UNet2DConditionModel ``config`` whose
    ``cross_attention_dim`` matches.
    """
    import diffusers

    sample_shape = tuple(sample_shape)
    if embed_shape is not None and config is None:
        raise ReflowError(
            "a fresh text-conditional student needs --model-config (a UNet2DConditionModel config.json); "
            "or pass --init with the teacher"
        )
    if config is not None:
        config = dict(config)
        class_name = config.pop("_class_name", "UNet2DModel" if len(sample_shape) == 3 else "MLPVelocity")
        config = {k: v for k, v in config.items() if not k.startswith("_")}
        if class_name == "MLPVelocity":
            if num_classes is not None or embed_shape is not None:
                raise ReflowError("an MLPVelocity is unconditional; use a UNet config for conditional pairs")
            config["sample_shape"] = list(sample_shape)
            return MLPVelocity.from_config(config)
        if class_name not in UNET_CLASSES:
            raise ReflowError(f"--model-config names a {class_name}; use a UNet2DModel or MLPVelocity config")
        if class_name == "UNet2DModel" and num_classes is not None and config.get("num_class_embeds") is None:
            config["num_class_embeds"] = num_classes
        try:
            unet = getattr(diffusers, class_name).from_config(config)
        except (TypeError, ValueError) as e:
            raise ReflowError(f"--model-config is not a valid {class_name} config: {e}") from None
        model = UNetFlow(unet)
        if model.sample_shape != sample_shape:
            raise ReflowError(
                f"--model-config makes samples of shape {model.sample_shape}, the data has {sample_shape}; "
                "fix sample_size / in_channels"
            )
        if unet.config.out_channels != unet.config.in_channels:
            raise ReflowError("--model-config must have out_channels equal to in_channels (a velocity has x's shape)")
        check_conditioning(model, num_classes, embed_shape, "--model-config")
        return model
    if len(sample_shape) == 3:
        unet_config = default_unet_config(sample_shape)
        if num_classes is not None:
            unet_config["num_class_embeds"] = num_classes
        return UNetFlow(diffusers.UNet2DModel.from_config(unet_config))
    if num_classes is not None:
        raise ReflowError("class-labelled pairs need an image model (C, H, W); 1-D samples train an unconditional MLP")
    return MLPVelocity(sample_shape=list(sample_shape), **mlp)


def check_conditioning(
    model: nn.Module, num_classes: int | None, embed_shape: tuple[int, int] | None, what: str = "the model"
) -> None:
    """That a model takes the conditioning its pairs carry: class labels 0..num_classes-1, or prompt
    embeddings of shape ``embed_shape`` (seq, dim); one line naming the mismatch otherwise."""
    kind = getattr(model, "conditioning", None)
    want = "class" if num_classes is not None else "text" if embed_shape is not None else None
    if kind != want:
        names = {None: "unconditional", "class": "class-conditional", "text": "text-conditional"}
        raise ReflowError(f"{what} is {names[kind]} but the pairs are {names[want]}; pick a matching model")
    if want == "class" and num_classes > model.num_classes:
        top = num_classes - 1
        raise ReflowError(f"{what} has {model.num_classes} class embeddings; the pairs use labels up to {top}")
    if want == "text":
        dim = model.unet.config.cross_attention_dim
        if dim != embed_shape[-1]:
            raise ReflowError(
                f"{what} attends to {dim}-d text embeddings; the pairs hold {embed_shape[-1]}-d prompt embeddings"
            )


UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")


def load_unet(unet_dir: Path, *, allow_pickle: bool = False) -> ModelMixin:
    """A ``UNet2DModel`` or ``UNet2DConditionModel`` from a folder: safetensors unless ``allow_pickle``;
    never custom code."""
    import diffusers

    config = read_json(unet_dir / "config.json")
    class_name = config.get("_class_name")
    if class_name not in UNET_CLASSES:
        raise ReflowError(f"{unet_dir} holds a {class_name}; only {' and '.join(UNET_CLASSES)} are supported")
    has_safetensors = use_safetensors(unet_dir, allow_pickle)
    check_weights(unet_dir)
    try:
        return getattr(diffusers, class_name).from_pretrained(
            str(unet_dir), use_safetensors=has_safetensors, local_files_only=True
        )
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        raise ReflowError(f"could not load the UNet from {unet_dir}: {_why(e)}; re-save or re-download it") from None


def _why(error: BaseException) -> str:
    """The first line of a loading error; diffusers' "Unable to load weights from checkpoint file ..." (any
    failure of safetensors to read the file) said plainly."""
    text = str(error).strip()
    if text.startswith("Unable to load weights from checkpoint file"):
        return "its weights file is damaged or truncated"
    return first_line(error)


def load_pipeline_flow(path: Path, *, allow_pickle: bool = False) -> UNetFlow:
    """The velocity model of a flow pipeline folder (one written by ``reflow.pipelines.export``)."""
    scheduler = read_json(path / "scheduler" / "scheduler_config.json")
    return UNetFlow(load_unet(path / "unet", allow_pickle=allow_pickle), scheduler.get("num_train_timesteps", 1000))


def init_model(path: str | Path, *, allow_pickle: bool = False) -> nn.Module:
    """The starting point of a student: one of our models, or a diffusers DDPM checkpoint whose UNet
    initialises a UNetFlow of the same architecture (time mapped as in ``UNetFlow``)."""
    path = Path(path)
    if is_diffusers_checkpoint(path):
        if not (path / "unet" / "config.json").is_file():
            raise ReflowError(f"{path} has no unet/config.json; --init takes a UNet2DModel pipeline or a reflow model")
        scheduler_file = path / "scheduler" / "scheduler_config.json"
        steps = read_json(scheduler_file).get("num_train_timesteps", 1000) if scheduler_file.is_file() else 1000
        unet = load_unet(path / "unet", allow_pickle=allow_pickle)
        if unet.config.out_channels != unet.config.in_channels:
            raise ReflowError(
                f"{path}: the UNet has {unet.config.out_channels} output channels for {unet.config.in_channels} "
                "input channels (learned variance?); a velocity needs as many as the input"
            )
        return UNetFlow(unet, steps)
    return load_model(path, allow_pickle=allow_pickle)


def load_model(path: str | Path, *, allow_pickle: bool = False) -> nn.Module:
    """Load a velocity model: a folder written by ``reflow train`` (an MLP's ``save_pretrained`` folder, or
    an image student's diffusers pipeline folder); safetensors unless ``allow_pickle``."""
    path = Path(path)
    config_file = path / "config.json"
    if not path.is_dir():
        raise ReflowError(f"no such model folder: {path} (pass a folder written by `reflow train`)")
    if is_flow_pipeline(path):
        return load_pipeline_flow(path, allow_pickle=allow_pickle)
    if (path / "model_index.json").is_file():
        raise ReflowError(
            f"{path} is a diffusers DDPM pipeline, not a flow; use it as --teacher or --init, or pass a reflow model"
        )
    if not config_file.is_file():
        raise ReflowError(f"{path} has no config.json: not a model folder (pass a folder written by `reflow train`)")
    try:
        class_name = json.loads(config_file.read_text()).get("_class_name")
    except json.JSONDecodeError as e:
        raise ReflowError(f"{config_file} is not valid JSON ({e}); re-export the model") from None
    cls = MODEL_CLASSES.get(class_name)
    if cls is None:
        known = ", ".join(MODEL_CLASSES)
        raise ReflowError(f"{path}: model class {class_name!r} is not a reflow velocity model (known: {known})")
    has_safetensors = use_safetensors(path, allow_pickle)
    check_weights(path)
    try:
        return cls.from_pretrained(path, use_safetensors=has_safetensors, low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError) as e:
        raise ReflowError(f"could not load model from {path}: {_why(e)}; re-export or re-train the model") from None


def student_scheduler(num_train_timesteps: int = 1000) -> Any:
    """The scheduler of an exported image student: k-step Euler on a uniform grid (see the module docstring)."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(
        num_train_timesteps=num_train_timesteps,
        use_flow_sigmas=True,
        flow_shift=1.0,
        prediction_type="flow_prediction",
        algorithm_type="dpmsolver++",
        solver_order=1,
        final_sigmas_type="zero",
    )
