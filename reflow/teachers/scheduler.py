"""The scheduler-driven teacher: a diffusers checkpoint's UNet sampled with a deterministic ODE solver built
from the checkpoint's own scheduler config, in one loop shared by every such teacher.

The scheduler config (any diffusers scheduler type: DDPM, DDIM, PNDM, Euler, DPM-Solver, ...) is turned into a
deterministic solver with ``from_config``, so the prediction type, beta schedule, clip_sample / thresholding
and the rest carry over:

- ``"ddim"`` (default): ``DDIMScheduler.from_config(config)``, stepped with eta = 0;
- ``"dpm"``: ``DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")``.

Each call runs the loop diffusers' pipelines run inside, from ``z0 * scheduler.init_noise_sigma`` (z0 is the
unit Gaussian the teacher started from): for each timestep, ``scale_model_input``, one UNet call (on the batch
[unconditional; conditional] under classifier-free guidance, as diffusers' guided pipelines batch it), the
guided prediction eps_uncond + w (eps_cond - eps_uncond), ``scheduler.step``. The output is the final sample
in model space, with no clamping or rescaling. Subclasses say only how the UNet is conditioned.

Speed settings, all off on the CPU by default (CPU results are those of the plain loop, bit for bit):

- ``channels_last`` (default: on for CUDA): the UNet's weights and inputs in NHWC memory format;
- ``autocast`` ("bfloat16" / "float16"): the UNet's forward pass under ``torch.autocast``; it changes
  the samples, so it is recorded in ``describe()["overrides"]`` (absent when off);
- ``compile``: the UNet wrapped in ``torch.compile``.

The UNet's timesteps are moved to the device once, and a pinned z0 is uploaded asynchronously, so
a call queues its GPU work without waiting for the previous call's.
"""

from __future__ import annotations

import contextlib
from abc import abstractmethod
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from reflow.core.conditioning import keywords
from reflow.core.progress import OnCall
from reflow.errors import ReflowError
from reflow.folders.files import config_hash, first_line, json_clean, read_json
from reflow.teachers.base import Teacher

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


def autocast_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """The dtype of an ``autocast`` setting (a name or a torch dtype), None when off."""
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
    scheduler_config = read_json(scheduler_dir / "scheduler_config.json")
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
        why = first_line(e)
        raise ReflowError(f"{path}: cannot build the {solver} solver from its scheduler config: {why}") from None
    try:
        scheduler.set_timesteps(nfe)
    except ValueError as e:
        raise ReflowError(f"--nfe {nfe} does not fit this scheduler: {first_line(e)}") from None
    return scheduler, checkpoint_scheduler


def require_scheduler_config(path: Path) -> None:
    """Refuse a pipeline folder without ``scheduler/scheduler_config.json``."""
    if not (path / "scheduler" / "scheduler_config.json").is_file():
        raise ReflowError(f"{path} has no scheduler/scheduler_config.json; add the checkpoint's scheduler config")


def unet_sample_shape(config: Any, unet_dir: Path) -> tuple[int, int, int]:
    """(in_channels, height, width) of the samples a UNet config makes (``sample_size`` an int or a pair)."""
    size = config.sample_size
    if isinstance(size, int):
        height = width = size
    elif isinstance(size, (list, tuple)) and len(size) == 2:
        height, width = (int(s) for s in size)
    else:
        raise ReflowError(f"{unet_dir}: sample_size {size!r} is neither an int nor (height, width)")
    return int(config.in_channels), height, width


class SchedulerTeacher(Teacher):
    """A diffusers checkpoint's UNet stepped by a deterministic solver: owns the sampling loop.

    ``__call__(z0, cond) -> z1`` as the module docstring says. A subclass checks and loads its folder, calls
    ``_init_solver`` then ``_init_unet``, sets ``sample_shape``, ``conditioning``, ``guided`` (and
    ``guidance_scale``), ``overrides`` (what ``describe()`` records and ``load_teacher(**overrides)`` takes
    back), and overrides only what differs between checkpoints:

    - ``_check_cond(cond, batch)``: the conditioning, checked and on the device (None when unconditional);
    - ``_null_cond(cond)``: the unconditional side of classifier-free guidance, one row per row of ``cond``;
    - ``_weights_hash()``, ``_settings_record()``, ``_model_record()``: its parts of ``describe()``;
    - ``_finish(x)``: the last latents as returned.
    """

    kind: str
    """``describe()["kind"]``."""
    guided = False
    guidance_scale: float | None = None
    split_output = False
    """Learned-variance UNets (out_channels = 2 * in_channels) predict [model_output, variance]."""

    def _init_solver(self, path: Path, solver: str, nfe: int, overrides: dict[str, Any]) -> None:
        """The deterministic solver from the checkpoint's scheduler config (see ``build_solver``)."""
        self.scheduler, self.checkpoint_scheduler = build_solver(path, solver, nfe, overrides)
        self.path = path
        self.nfe = nfe
        self.solver = solver
        self.scheduler_overrides = overrides
        self.step_kwargs: dict[str, Any] = {"eta": 0.0} if solver == "ddim" else {}
        self._hashes: tuple[str, str] | None = None

    def _init_unet(
        self,
        unet: Any,
        device: torch.device | str,
        *,
        channels_last: bool | None,
        autocast: torch.dtype | None,
        compile: bool,
    ) -> None:
        """The UNet on ``device``, frozen, with the speed settings (see the module docstring)."""
        self.device = torch.device(device)
        self.unet = unet.to(self.device).eval()
        self.unet.requires_grad_(False)
        self.channels_last = self.device.type == "cuda" if channels_last is None else bool(channels_last)
        if self.channels_last:
            self.unet.to(memory_format=torch.channels_last)
        self.autocast_dtype = autocast
        self._forward = torch.compile(self.unet) if compile else self.unet
        # The UNet's copy of the timesteps, on the device once (a per-step upload would wait for the GPU).
        self._timesteps = self.scheduler.timesteps.clone()
        self._unet_timesteps = self._timesteps.to(self.device)

    def _record_autocast(self) -> None:
        """Autocast changes the samples: recorded in ``overrides`` when on."""
        if self.autocast_dtype is not None:
            self.overrides["autocast"] = str(self.autocast_dtype).removeprefix("torch.")

    # --- what subclasses say ------------------------------------------------------------------------

    @abstractmethod
    def _check_cond(self, cond: Any, batch: int) -> torch.Tensor | None:
        """``cond`` checked for a batch of ``batch`` samples and on the device; None when unconditional."""

    @abstractmethod
    def _null_cond(self, cond: torch.Tensor) -> torch.Tensor:
        """The unconditional conditioning of classifier-free guidance, one row per row of ``cond``."""

    @abstractmethod
    def _weights_hash(self) -> str:
        """Fingerprint of the weights that decide z1."""

    def _settings_record(self) -> dict[str, Any]:
        """Settings recorded in ``describe()`` before ``overrides``."""
        return {}

    @abstractmethod
    def _model_record(self) -> dict[str, Any]:
        """What ``describe()`` records about the model, after the solver."""

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        """The last latents as returned: in the default memory format."""
        return x.contiguous() if self.channels_last else x

    # --- the loop -----------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        if self._hashes is None:
            self._hashes = (config_hash(self.path), self._weights_hash())
        solver_config = {k: v for k, v in dict(self.scheduler.config).items() if not k.startswith("_")}
        return json_clean(
            {
                "kind": self.kind,
                "teacher": str(self.path.resolve()),
                "config_hash": self._hashes[0],
                "weights_hash": self._hashes[1],
                "solver": self.solver,
                "solver_scheduler": type(self.scheduler).__name__,
                "nfe": self.nfe,
                "eta": 0.0 if self.solver == "ddim" else None,
                "checkpoint_scheduler": self.checkpoint_scheduler,
                **self._settings_record(),
                "overrides": self.overrides,
                "solver_config": solver_config,
                "timesteps": [int(t) for t in self.scheduler.timesteps],
                **self._model_record(),
            }
        )

    def _upload(self, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``tensor`` on the device as ``dtype``; a pinned CPU tensor (as generate_pairs passes on CUDA) is
        uploaded without waiting for queued GPU work."""
        non_blocking = self.device.type == "cuda" and tensor.device.type == "cpu" and tensor.is_pinned()
        return tensor.to(self.device, dtype, non_blocking=non_blocking)

    def _reset_timesteps(self) -> None:
        """Every call starts fresh: set_timesteps also resets the multistep solver's state. Timesteps stay on
        the CPU, as in the pipelines (DDIM indexes its CPU alphas with them)."""
        self.scheduler.set_timesteps(self.nfe)
        if not torch.equal(self.scheduler.timesteps, self._timesteps):  # never expected: set_timesteps is pure
            self._timesteps = self.scheduler.timesteps.clone()
            self._unet_timesteps = self._timesteps.to(self.device)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _prediction(self, model_input: torch.Tensor, unet_t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """The UNet's prediction at one step; guided: eps_uncond + w (eps_cond - eps_uncond) from the batch
        [unconditional; conditional]."""
        if self.channels_last:
            model_input = model_input.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            out = self._forward(model_input, unet_t, **keywords(self.conditioning, cond)).sample
        if self.split_output:
            out = out[:, : self.sample_shape[0]]
        if self.guided:
            uncond, conditional = out.chunk(2)
            out = uncond + self.guidance_scale * (conditional - uncond)
        return out

    @property
    def network_calls(self) -> int:
        return self.nfe  # one UNet call per timestep (a guided one batches both halves)

    @torch.inference_mode()
    def __call__(
        self, z0: torch.Tensor, cond: torch.Tensor | None = None, *, on_call: OnCall | None = None
    ) -> torch.Tensor:
        if tuple(z0.shape[1:]) != self.sample_shape:
            want = ", ".join(map(str, self.sample_shape))
            raise ReflowError(f"z0 has shape {tuple(z0.shape)}; this teacher takes (B, {want})")
        cond = self._check_cond(cond, z0.shape[0])
        if self.guided:  # one UNet call on [unconditional; conditional], as diffusers' guided pipelines batch it
            cond = torch.cat([self._null_cond(cond), cond])
        self._reset_timesteps()
        x = self._upload(z0, self.unet.dtype) * self.scheduler.init_noise_sigma
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        for t, unet_t in zip(self.scheduler.timesteps, self._unet_timesteps, strict=True):
            # The pipelines' order: duplicate for guidance, then scale_model_input.
            model_input = self.scheduler.scale_model_input(torch.cat([x, x]) if self.guided else x, t)
            out = self._prediction(model_input, unet_t, cond)
            if out.dtype != x.dtype:  # autocast: step the solver in the sample's precision
                out = out.to(x.dtype)
            x = self.scheduler.step(out, t, x, **self.step_kwargs).prev_sample
            if on_call is not None:
                on_call(x.shape[0])
        return self._finish(x)
