"""A diffusers checkpoint (``model_index.json``, ``unet/``, ``scheduler/``) as a deterministic teacher.

The checkpoint's own scheduler config (any diffusers scheduler type: DDPM, DDIM, PNDM, Euler,
DPM-Solver, ...) is turned into a deterministic ODE solver with ``from_config``, so the prediction
type, beta schedule, clip_sample / thresholding and the rest carry over:

- ``"ddim"`` (default): ``DDIMScheduler.from_config(config)``, stepped with eta = 0;
- ``"dpm"``: ``DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")``.

Each call runs the loop DDIMPipeline runs inside (set_timesteps, scale_model_input, unet, step) from
``z0 * scheduler.init_noise_sigma``: z0 is the unit Gaussian the teacher started from. The output is
the final sample in model space, with no clamping or rescaling. Only ``UNet2DModel`` networks are
loaded, weights come from safetensors unless ``allow_pickle``, and no remote or custom code is run.

Speed settings, all off on the CPU by default (CPU results are those of the plain loop, bit for bit):

- ``channels_last`` (default: on for CUDA): the UNet's weights and inputs in NHWC memory format;
- ``autocast`` ("bfloat16" / "float16"): the UNet's forward pass under ``torch.autocast``; it changes
  the samples, so it is recorded in ``describe()["overrides"]`` (absent when off);
- ``compile``: the UNet wrapped in ``torch.compile``.

The UNet's timesteps are moved to the device once, and a pinned z0 is uploaded asynchronously, so
a call queues its GPU work without waiting for the previous call's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from reflow.errors import ReflowError
from reflow.folders.files import config_hash, weights_hash
from reflow.folders.files import first_line as _first_line
from reflow.folders.files import json_clean as _json_clean
from reflow.folders.files import read_json as _read_json
from reflow.models.velocity import load_unet

DiffusersSolver = Literal["ddim", "dpm"]
"""Deterministic ODE solvers of a DDPM-family checkpoint: DDIM with eta = 0, DPM-Solver++."""
DIFFUSERS_SOLVERS: tuple[str, ...] = get_args(DiffusersSolver)
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")
AUTOCAST_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def _autocast_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    if value is None:
        return None
    if isinstance(value, torch.dtype) and value in AUTOCAST_DTYPES.values():
        return value
    if isinstance(value, str) and value.lower() in AUTOCAST_DTYPES:
        return AUTOCAST_DTYPES[value.lower()]
    raise ReflowError(f"autocast must be one of bfloat16, float16 (or bf16, fp16), got {value!r}")


def solver_overrides(solver: str, nfe: int, timestep_spacing: str | None, clip_sample: bool | None) -> dict[str, Any]:
    """Check a DDPM-family teacher's solver settings; returns the scheduler-config overrides they make."""
    if solver not in DIFFUSERS_SOLVERS:
        choices = ", ".join(DIFFUSERS_SOLVERS)
        raise ReflowError(f"unknown solver {solver!r} for a diffusers teacher (choose one of {choices})")
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
        raise ReflowError(f"--nfe must be a positive integer, got {nfe!r}")
    overrides: dict[str, Any] = {}
    if timestep_spacing is not None:
        if timestep_spacing not in TIMESTEP_SPACINGS:
            choices = ", ".join(TIMESTEP_SPACINGS)
            raise ReflowError(f"timestep_spacing must be one of {choices}, got {timestep_spacing!r}")
        overrides["timestep_spacing"] = timestep_spacing
    if clip_sample is not None:
        if solver != "ddim":
            raise ReflowError(
                "clip_sample applies only to --solver ddim (DPM-Solver++ does not clip); drop it or use ddim"
            )
        overrides["clip_sample"] = bool(clip_sample)
    return overrides


def build_solver(path: Path, solver: str, nfe: int, overrides: dict[str, Any]) -> tuple[Any, str | None]:
    """(the deterministic solver set to ``nfe`` steps, the checkpoint's scheduler class) from the scheduler
    config of the pipeline folder ``path``: DDIM (eta 0 at step time) or DPM-Solver++, read the way
    from_pretrained reads it, with ``overrides`` applied. Flow-matching schedulers are refused."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    scheduler_dir = path / "scheduler"
    scheduler_config = _read_json(scheduler_dir / "scheduler_config.json")
    checkpoint_scheduler = scheduler_config.get("_class_name")
    if str(checkpoint_scheduler).startswith("FlowMatch") or scheduler_config.get("prediction_type") == (
        "flow_prediction"
    ):
        raise ReflowError(
            f"{path}: {checkpoint_scheduler} is a flow-matching scheduler (a reflow student? use it as a flow "
            "teacher); only noise-prediction (DDPM-family) schedulers are supported here"
        )
    try:
        config = DDIMScheduler.load_config(str(scheduler_dir))
        if solver == "ddim":
            scheduler = DDIMScheduler.from_config(config, **overrides)
        else:
            scheduler = DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", **overrides)
    except (NotImplementedError, ValueError, TypeError, OSError) as e:
        why = _first_line(e)
        raise ReflowError(f"{path}: cannot build the {solver} solver from its scheduler config: {why}") from None
    try:
        scheduler.set_timesteps(nfe)
    except ValueError as e:
        raise ReflowError(f"--nfe {nfe} does not fit this scheduler: {_first_line(e)}") from None
    return scheduler, checkpoint_scheduler


class DiffusersTeacher:
    """A diffusers ``UNet2DModel`` pipeline folder sampled with a deterministic ODE solver.

    ``__call__(z0, labels=None) -> z1``: z0 of shape (B, *sample_shape), unit Gaussian; labels (B,)
    class indices for a class-conditional UNet (``num_classes`` is not None), else None.

    Classifier-free guidance (class-conditional UNets): with ``guidance_scale`` w the UNet's noise
    prediction is eps(null) + w (eps(label) - eps(null)) at every step, the null label being the class the
    checkpoint was trained with for "no label" (``null_label``, or the ``"_reflow_null_class"`` entry of its
    model_index.json). The null label is never drawn as a pair's label (``label_choices``). Both go into
    ``describe()["overrides"]``, so pairs record the guidance they were made with.
    ``clipped_model_output`` (DDIM): recompute each step's noise estimate from the clipped x0, diffusers'
    ``use_clipped_model_output``; with ``clip_sample`` and guidance it keeps samples from over-saturating.
    ``timestep_spacing`` and ``clip_sample`` override the checkpoint's scheduler config and are
    recorded in ``describe()``, as is ``autocast`` when set. ``channels_last`` (None: on for CUDA only) and
    ``compile`` are speed settings, not recorded (see the module docstring).
    """

    def __init__(
        self,
        path: str | Path,
        nfe: int = 50,
        solver: str = "ddim",
        device: torch.device | str = "cpu",
        allow_pickle: bool = False,
        *,
        timestep_spacing: str | None = None,
        clip_sample: bool | None = None,
        autocast: str | torch.dtype | None = None,
        channels_last: bool | None = None,
        compile: bool = False,
        guidance_scale: float | None = None,
        null_label: int | None = None,
        clipped_model_output: bool | None = None,
    ):
        path = Path(path)
        if not path.exists():
            raise ReflowError(f"no such teacher: {path} (pass a diffusers pipeline folder)")
        if not path.is_dir() or not (path / "model_index.json").is_file():
            raise ReflowError(
                f"{path} is not a diffusers pipeline folder (no model_index.json); pass one saved with save_pretrained"
            )
        unet_dir, scheduler_dir = path / "unet", path / "scheduler"
        if not (unet_dir / "config.json").is_file():
            raise ReflowError(
                f"{path} is not a diffusers UNet pipeline folder (no unet/config.json); pass one with a unet/"
            )
        if not (scheduler_dir / "scheduler_config.json").is_file():
            raise ReflowError(f"{path} has no scheduler/scheduler_config.json; add the checkpoint's scheduler config")
        overrides = solver_overrides(solver, nfe, timestep_spacing, clip_sample)
        autocast_dtype = _autocast_dtype(autocast)

        model_index = _read_json(path / "model_index.json")
        unet_config = _read_json(unet_dir / "config.json")
        unet_class = unet_config.get("_class_name")
        if unet_class != "UNet2DModel":
            raise ReflowError(f"{unet_dir} holds a {unet_class}; only UNet2DModel teachers are supported")
        scheduler, checkpoint_scheduler = build_solver(path, solver, nfe, overrides)

        # UNet: safetensors unless pickle is allowed explicitly. Never DiffusionPipeline (no custom code).
        unet = load_unet(unet_dir, allow_pickle=allow_pickle)

        self.device = torch.device(device)
        self.unet = unet.to(self.device).eval()
        self.unet.requires_grad_(False)
        self.channels_last = self.device.type == "cuda" if channels_last is None else bool(channels_last)
        if self.channels_last:
            self.unet.to(memory_format=torch.channels_last)
        self.autocast_dtype = autocast_dtype
        self._forward = torch.compile(self.unet) if compile else self.unet
        self.scheduler = scheduler
        # The UNet's copy of the timesteps, on the device once (a per-step upload would wait for the GPU).
        self._timesteps = scheduler.timesteps.clone()
        self._unet_timesteps = self._timesteps.to(self.device)
        self.path = path
        self.nfe = nfe
        self.solver = solver
        self.scheduler_overrides = overrides
        # What describe() records and load_teacher(**overrides) takes back (verify-pairs reruns with it).
        self.overrides = dict(overrides)
        self.clipped_model_output = bool(clipped_model_output)
        if self.clipped_model_output:
            if solver != "ddim":
                raise ReflowError("--clipped-model-output applies only to --solver ddim; drop it or use ddim")
            self.overrides["clipped_model_output"] = True
        if autocast_dtype is not None:
            self.overrides["autocast"] = str(autocast_dtype).removeprefix("torch.")
        self.checkpoint_scheduler = checkpoint_scheduler
        self.components = sorted(k for k in model_index if not k.startswith("_"))

        cfg = self.unet.config
        size = cfg.sample_size
        if isinstance(size, int):
            height = width = size
        elif isinstance(size, (list, tuple)) and len(size) == 2:
            height, width = (int(s) for s in size)
        else:
            raise ReflowError(f"{unet_dir}: sample_size {size!r} is neither an int nor (height, width)")
        self.sample_shape = (int(cfg.in_channels), height, width)

        # Learned-variance UNets (out_channels = 2 * in_channels) predict [model_output, variance].
        out_channels = cfg.out_channels
        if out_channels == 2 * cfg.in_channels:
            self._split_output = True
        elif out_channels == cfg.in_channels:
            self._split_output = False
        else:
            raise ReflowError(
                f"{unet_dir}: out_channels {out_channels} must equal in_channels {cfg.in_channels} (or twice it)"
            )

        if self.unet.class_embedding is not None and cfg.num_class_embeds is None:
            raise ReflowError(
                f"{unet_dir}: class_embed_type {cfg.class_embed_type!r} is not supported; "
                "only integer class labels (num_class_embeds)"
            )
        self.num_classes: int | None = int(cfg.num_class_embeds) if cfg.num_class_embeds is not None else None
        declared = model_index.get("_reflow_null_class")
        if null_label is None and declared is not None:
            null_label = declared
        if null_label is not None:
            if self.num_classes is None:
                raise ReflowError("null_label applies to class-conditional teachers; this one is unconditional")
            bad_type = isinstance(null_label, bool) or not isinstance(null_label, int)
            if bad_type or not 0 <= null_label < self.num_classes:
                top = self.num_classes - 1
                raise ReflowError(f"null_label must be a class index in [0, {top}], got {null_label!r}")
        if guidance_scale is not None:
            if self.num_classes is None:
                raise ReflowError(
                    "--guidance-scale needs a class-conditional teacher (or a text-to-image one); this one is "
                    "unconditional"
                )
            if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
                raise ReflowError(f"--guidance-scale must be a number, got {guidance_scale!r}")
            if not math.isfinite(guidance_scale) or guidance_scale < 0:
                raise ReflowError(f"--guidance-scale must be a finite number >= 0, got {guidance_scale}")
            if null_label is None:
                raise ReflowError(
                    "classifier-free guidance needs the checkpoint's unconditional class: pass --null-label N "
                    '(or add "_reflow_null_class": N to its model_index.json)'
                )
            self.overrides["guidance_scale"] = float(guidance_scale)
            self.overrides["null_label"] = int(null_label)
        self.guidance_scale = None if guidance_scale is None else float(guidance_scale)
        self.null_label = null_label
        self.label_choices: list[int] | None = (
            [c for c in range(self.num_classes) if c != null_label] if self.num_classes is not None else None
        )
        self._hashes: tuple[str, str] | None = None

    def describe(self) -> dict[str, Any]:
        if self._hashes is None:
            self._hashes = (config_hash(self.path), weights_hash(self.path, ("unet",)))
        solver_config = {k: v for k, v in dict(self.scheduler.config).items() if not k.startswith("_")}
        return _json_clean(
            {
                "kind": "diffusers",
                "teacher": str(self.path.resolve()),
                "config_hash": self._hashes[0],
                "weights_hash": self._hashes[1],
                "solver": self.solver,
                "solver_scheduler": type(self.scheduler).__name__,
                "nfe": self.nfe,
                "eta": 0.0 if self.solver == "ddim" else None,
                "checkpoint_scheduler": self.checkpoint_scheduler,
                "overrides": self.overrides,
                "solver_config": solver_config,
                "timesteps": [int(t) for t in self.scheduler.timesteps],
                "num_classes": self.num_classes,
                **({"null_label": self.null_label} if self.null_label is not None else {}),
                "components": self.components,
            }
        )

    def _check_labels(self, labels: torch.Tensor | Sequence[int] | None, batch: int) -> torch.Tensor | None:
        if self.num_classes is None:
            if labels is not None:
                raise ReflowError("this teacher is unconditional; drop the class labels")
            return None
        if labels is None:
            raise ReflowError(f"this teacher is class-conditional ({self.num_classes} classes); pass labels")
        labels = torch.as_tensor(labels)
        if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
            raise ReflowError(f"class labels must be integers, got dtype {labels.dtype}")
        labels = labels.reshape(-1) if labels.ndim == 0 else labels
        if labels.shape != (batch,):
            raise ReflowError(f"expected {batch} class labels (one per sample), got shape {tuple(labels.shape)}")
        if batch:
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= self.num_classes:
                raise ReflowError(f"class labels must be in [0, {self.num_classes - 1}], got {lo}..{hi}")
        non_blocking = self.device.type == "cuda" and labels.device.type == "cpu" and labels.is_pinned()
        return labels.to(self.device, torch.long, non_blocking=non_blocking)

    @torch.inference_mode()
    def __call__(self, z0: torch.Tensor, labels: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
        if tuple(z0.shape[1:]) != self.sample_shape:
            want = ", ".join(map(str, self.sample_shape))
            raise ReflowError(f"z0 has shape {tuple(z0.shape)}; this teacher takes (B, {want})")
        class_labels = self._check_labels(labels, z0.shape[0])
        scheduler = self.scheduler
        # Timesteps stay on the CPU, as in DDIMPipeline (DDIM indexes its CPU alphas with them); this
        # also resets the multistep solver's state, so every call starts fresh.
        scheduler.set_timesteps(self.nfe)
        if not torch.equal(scheduler.timesteps, self._timesteps):  # never expected: set_timesteps is pure
            self._timesteps = scheduler.timesteps.clone()
            self._unet_timesteps = self._timesteps.to(self.device)
        dtype = self.unet.dtype
        # A pinned z0 (as generate_pairs passes on CUDA) is uploaded without waiting for queued GPU work.
        non_blocking = self.device.type == "cuda" and z0.device.type == "cpu" and z0.is_pinned()
        x = z0.to(self.device, dtype, non_blocking=non_blocking) * scheduler.init_noise_sigma
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        if self.channels_last:
            x = x.contiguous(memory_format=memory_format)
        step_kwargs = {"eta": 0.0} if self.solver == "ddim" else {}
        if self.clipped_model_output:
            step_kwargs["use_clipped_model_output"] = True
        guided = self.guidance_scale is not None
        if guided:  # one UNet call on [null; labels], as diffusers' guided pipelines batch it
            class_labels = torch.cat([torch.full_like(class_labels, self.null_label), class_labels])
        for t, unet_t in zip(scheduler.timesteps, self._unet_timesteps, strict=True):
            model_input = scheduler.scale_model_input(x, t)
            if guided:
                model_input = torch.cat([model_input, model_input])
            if self.channels_last:
                model_input = model_input.contiguous(memory_format=memory_format)
            if self.autocast_dtype is not None:
                with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                    out = self._forward(model_input, unet_t, class_labels=class_labels).sample
            else:
                out = self._forward(model_input, unet_t, class_labels=class_labels).sample
            if self._split_output:
                out = out[:, : self.sample_shape[0]]
            if guided:
                uncond, cond = out.chunk(2)
                out = uncond + self.guidance_scale * (cond - uncond)
            if out.dtype != x.dtype:  # autocast: step the solver in the sample's precision
                out = out.to(x.dtype)
            x = scheduler.step(out, t, x, **step_kwargs).prev_sample
        return x.contiguous() if self.channels_last else x
