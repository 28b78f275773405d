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


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0, scale: float = 1000.0) -> torch.Tensor:
    """Sinusoidal embedding of t in [0, 1] (scaled by ``scale``, 1000 as in DDPM), shape (B, dim); float32, or
    float64 for float64 t (so float64 checks of derivatives in t see float64 features)."""
    half = dim // 2
    dtype = torch.promote_types(t.dtype, torch.float32)
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=dtype) / half)
    args = scale * t.to(dtype)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


class MLPVelocity(ModelMixin, ConfigMixin):
    """An MLP velocity field for small data (2-D toys, 8x8 digits): flattens x, concatenates a
    sinusoidal embedding of t, and maps back to x's shape.

    ``mean_flow=True`` makes it a MeanFlow model (``reflow.core.meanflow``): ``forward(x, t, s)`` is the
    average velocity from t to s >= t, the first layer also taking a sinusoidal embedding of the gap s - t
    (same size as t's); s = None means s = t, the instantaneous velocity.

    ``time_scale`` multiplies t (and s - t) before the sinusoids: 1000 (DDPM's) resolves t finely, but a fresh
    network is then rough in t, and a MeanFlow target, which differentiates the network in t, blows up (moons
    from data, 1000 steps: loss 2 -> 14 and one-jump W2 1.22 at 1000, against a steady loss and W2 0.50 at 1).
    A fresh MeanFlow MLP is built with 1; a velocity MLP keeps 1000. The gap s - t is embedded at
    ``interval_scale`` (1), for the same reason, whatever the scale of t."""

    @register_to_config
    def __init__(
        self,
        sample_shape: tuple[int, ...] | list[int] = (2,),
        hidden_dim: int = 256,
        num_layers: int = 4,
        time_embed_dim: int = 64,
        mean_flow: bool = False,
        time_scale: float = 1000.0,
        interval_scale: float = 1.0,
    ):
        super().__init__()
        dim = math.prod(sample_shape)
        embed_dim = time_embed_dim * (2 if mean_flow else 1)
        layers: list[nn.Module] = [nn.Linear(dim + embed_dim, hidden_dim), nn.SiLU()]
        for _ in range(num_layers - 1):
            layers += [nn.Linear(hidden_dim, hidden_dim), nn.SiLU()]
        layers.append(nn.Linear(hidden_dim, dim))
        self.net = nn.Sequential(*layers)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.config.sample_shape)

    @property
    def mean_flow(self) -> bool:
        return bool(self.config.mean_flow)

    def forward(self, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor | None = None) -> torch.Tensor:
        dim, scale = self.config.time_embed_dim, self.config.time_scale
        embs = [timestep_embedding(t, dim, scale=scale).to(x.dtype)]
        if self.mean_flow:
            gap = torch.zeros_like(t) if s is None else s - t
            embs.append(timestep_embedding(gap, dim, scale=self.config.interval_scale).to(x.dtype))
        elif s is not None:
            raise ReflowError("this MLPVelocity is a velocity field, not a mean flow: it takes no s (see to_mean_flow)")
        h = torch.cat([x.flatten(1), *embs], dim=1)
        return self.net(h).view_as(x)


MODEL_CLASSES: dict[str, type[ModelMixin]] = {"MLPVelocity": MLPVelocity}


def _unet_conditioning(unet: ModelMixin) -> tuple[str | None, int | None]:
    """(conditioning, number of classes) of a UNet, or one line saying why reflow cannot use it."""
    config = unet.config
    if type(unet).__name__ == "UNet2DConditionModel":
        if config.class_embed_type is not None or config.addition_embed_type is not None:
            raise ReflowError(
                "this UNet2DConditionModel needs extra conditioning (class_embed_type / addition_embed_type, "
                "e.g. SDXL); reflow supports the Stable Diffusion 1.x/2.x layout (text embeddings only)"
            )
        return "text", None
    if config.class_embed_type == "timestep":  # a mean flow (UNetFlow's docstring): the embedding holds s - t
        return None, None
    if config.num_class_embeds is not None:
        return "class", int(config.num_class_embeds)
    if config.class_embed_type is not None:
        raise ReflowError(
            f"class_embed_type {config.class_embed_type!r} is not supported; only integer class labels "
            "(num_class_embeds), or 'timestep' for a mean flow's s - t"
        )
    return None, None


def _cast_to_weight_dtype(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Forward pre-hook: cast a module's input to its weights' dtype (diffusers' UNet2DModel feeds its
    ``class_embed_type="timestep"`` embedding a float32 sinusoid even when the UNet is float16 or float64)."""
    dtype = next(module.parameters()).dtype
    return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


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

    Mean flow (``reflow.core.meanflow``): an unconditional ``UNet2DModel`` with ``class_embed_type="timestep"``
    (``mean_flow`` is True) predicts the average velocity from t to s >= t, ``forward(x, t, s)``, its second
    timestep embedding fed the gap in flow time,

        class_labels = s - t  (in [0, 1]),      unet(x_t, timestep, class_labels) = -u(x_t, t, s)

    0 for s = t, and s = None means s = t. Not in timestep units (x num_train_timesteps): the MeanFlow target
    differentiates the network in t, and a time input at DDPM's scale made a fresh MLP's target blow up
    (``MLPVelocity``); at flow-time scale the gap's sinusoids are smooth. (On the digits UNet from a
    round-1 student, both scales gave the same loss over the first 200 steps; docs/results.md.)

    diffusers feeds that embedding the float32 sinusoid whatever the UNet's dtype; a
    forward pre-hook casts it to the embedding's dtype so float16 / float64 UNets run. See :func:`to_mean_flow`.
    """

    def __init__(self, unet: ModelMixin, num_train_timesteps: int = 1000):
        super().__init__()
        self.conditioning, self.num_classes = _unet_conditioning(unet)
        self.unet = unet
        self.num_train_timesteps = int(num_train_timesteps)
        if self.mean_flow and _cast_to_weight_dtype not in unet.class_embedding._forward_pre_hooks.values():
            unet.class_embedding.register_forward_pre_hook(_cast_to_weight_dtype)

    @property
    def mean_flow(self) -> bool:
        return self.unet.config.class_embed_type == "timestep"

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
        s: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        from reflow.core.flow import to_diffusers_timestep, velocity_from_diffusers

        timestep = to_diffusers_timestep(t, self.num_train_timesteps)
        kw = self._keywords(x, class_labels, encoder_hidden_states)
        if self.mean_flow:
            kw["class_labels"] = torch.zeros_like(t) if s is None else s - t
        elif s is not None:
            raise ReflowError("this model is a velocity field, not a mean flow: it takes no s (see to_mean_flow)")
        return velocity_from_diffusers(self.unet(x, timestep, **kw).sample)

    def _keywords(
        self, x: torch.Tensor, class_labels: torch.Tensor | None, encoder_hidden_states: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """The UNet's conditioning keywords, checked against ``conditioning``."""
        if self.conditioning == "text":
            if encoder_hidden_states is None:
                raise ReflowError("this model is text-conditional: pass prompt embeddings (encoder_hidden_states)")
            return {"encoder_hidden_states": encoder_hidden_states.to(x.dtype)}
        if self.conditioning == "class":
            if class_labels is None:
                raise ReflowError(f"this model is class-conditional ({self.num_classes} classes): pass class labels")
            return {"class_labels": class_labels}
        if class_labels is not None or encoder_hidden_states is not None:
            raise ReflowError("this model is unconditional; drop the labels / prompts")
        return {}

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


def to_mean_flow(model: nn.Module) -> nn.Module:
    """The MeanFlow version of a velocity model (``reflow.core.meanflow``): a model ``u(x, t, s)`` of the average
    velocity from t to s >= t whose output, at initialisation, is the velocity model's v(x, t) for EVERY s.

    Every weight of ``model`` is copied exactly (``model`` itself is left untouched); the weights that read the
    gap s - t start at zero, so the student starts from its teacher's instantaneous velocity:

    - ``MLPVelocity``: the first layer's new input columns (the embedding of s - t);
    - an unconditional ``UNetFlow`` (``UNet2DModel``): the same UNet with ``class_embed_type="timestep"``, a
      second timestep embedding added to the time embedding, with its output layer (``linear_2``) zero.

    A model that is already a mean flow comes back as it is. A class-conditional UNet2DModel cannot take a
    second embedding in stock diffusers (its one class embedding holds the labels), and a text-conditional one
    would not sample in a stock Stable Diffusion pipeline: both raise ReflowError.
    """
    if getattr(model, "mean_flow", False):
        return model
    if isinstance(model, MLPVelocity):
        new = _like(MLPVelocity.from_config(model.config, mean_flow=True), model)
        state = model.state_dict()
        w = state["net.0.weight"]
        state["net.0.weight"] = torch.cat([w, w.new_zeros(w.shape[0], model.config.time_embed_dim)], dim=1)
    elif isinstance(model, UNetFlow):
        if model.conditioning == "class":
            raise ReflowError(
                "no mean flow of a class-conditional UNet: stock diffusers has one class embedding per UNet2DModel, "
                "and a mean flow needs it for s - t; use an unconditional image model"
            )
        if model.conditioning == "text":
            raise ReflowError(
                "no mean flow of a text-conditional UNet yet: a stock Stable Diffusion pipeline would not pass it "
                "s - t; use an unconditional image model"
            )
        unet = model.unet
        new_unet = _like(type(unet).from_config(unet.config, class_embed_type="timestep"), unet)
        state = {f"unet.{k}": v for k, v in unet.state_dict().items()}
        state.update({f"unet.{k}": v for k, v in new_unet.state_dict().items() if k.startswith("class_embedding.")})
        state["unet.class_embedding.linear_2.weight"] = torch.zeros_like(state["unet.class_embedding.linear_2.weight"])
        state["unet.class_embedding.linear_2.bias"] = torch.zeros_like(state["unet.class_embedding.linear_2.bias"])
        new = UNetFlow(new_unet, model.num_train_timesteps)
        new.training = model.training  # the wrapper's flag only: the UNet keeps its own mode (_like)
    else:
        raise ReflowError(f"no mean-flow version of a {type(model).__name__}; use an MLPVelocity or a UNetFlow")
    new.load_state_dict(state)
    return new


def _like(new: ModelMixin, old: ModelMixin) -> ModelMixin:
    """``new`` on ``old``'s device, in its dtype and train / eval mode (on CPU a UNet's convolutions round
    differently in the two modes, so a copy keeps the mode to give bit-identical outputs)."""
    new.to(old.device)
    if new.dtype != old.dtype:
        new.to(old.dtype)
    return new.train(old.training)


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
