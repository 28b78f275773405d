"""A diffusers pixel-space checkpoint (``model_index.json``, ``unet/`` holding a ``UNet2DModel``, ``scheduler/``)
as a deterministic teacher, unconditional or class-conditional with classifier-free guidance.

It runs the loop DDIMPipeline runs inside (set_timesteps, scale_model_input, unet, step) with the checkpoint's
own scheduler config turned into a deterministic solver: see ``reflow.teachers.scheduler`` for the solvers,
the loop and the speed settings. Only ``UNet2DModel`` networks are loaded, weights come from safetensors
unless ``allow_pickle``, and no remote or custom code is run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from reflow.errors import ReflowError
from reflow.folders.files import read_json, weights_hash
from reflow.models.velocity import load_unet
from reflow.teachers.scheduler import (
    SchedulerTeacher,
    autocast_dtype,
    require_scheduler_config,
    solver_overrides,
    unet_sample_shape,
)


def _check_folder(path: Path) -> None:
    """Refuse anything but a diffusers pipeline folder with a UNet2DModel and a scheduler config."""
    if not path.exists():
        raise ReflowError(f"no such teacher: {path} (pass a diffusers pipeline folder)")
    if not path.is_dir() or not (path / "model_index.json").is_file():
        raise ReflowError(
            f"{path} is not a diffusers pipeline folder (no model_index.json); pass one saved with save_pretrained"
        )
    if not (path / "unet" / "config.json").is_file():
        raise ReflowError(
            f"{path} is not a diffusers UNet pipeline folder (no unet/config.json); pass one with a unet/"
        )
    require_scheduler_config(path)


def _check_unet_class(unet_dir: Path) -> None:
    unet_class = read_json(unet_dir / "config.json").get("_class_name")
    if unet_class != "UNet2DModel":
        raise ReflowError(f"{unet_dir} holds a {unet_class}; only UNet2DModel teachers are supported")


def _check_guidance_scale(guidance_scale: Any, num_classes: int | None, null_label: int | None) -> None:
    if num_classes is None:
        raise ReflowError(
            "--guidance-scale needs a class-conditional teacher (or a text-to-image one); this one is unconditional"
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


class DiffusersTeacher(SchedulerTeacher):
    """A diffusers ``UNet2DModel`` pipeline folder sampled with a deterministic ODE solver.

    ``__call__(z0, cond=None) -> z1``: z0 of shape (B, *sample_shape), unit Gaussian; cond the (B,) class
    labels for a class-conditional UNet (``conditioning == "class"``, ``num_classes`` set), else None.

    Classifier-free guidance (class-conditional UNets): with ``guidance_scale`` w the UNet's noise
    prediction is eps(null) + w (eps(label) - eps(null)) at every step, the null label being the class the
    checkpoint was trained with for "no label" (``null_label``, or the ``"_reflow_null_class"`` entry of its
    model_index.json). The null label is never drawn as a pair's label (``label_choices``). Both go into
    ``describe()["overrides"]``, so pairs record the guidance they were made with.
    ``clipped_model_output`` (DDIM): recompute each step's noise estimate from the clipped x0, diffusers'
    ``use_clipped_model_output``; with ``clip_sample`` and guidance it keeps samples from over-saturating.
    ``timestep_spacing`` and ``clip_sample`` override the checkpoint's scheduler config and are
    recorded in ``describe()``, as is ``autocast`` when set. ``channels_last`` (None: on for CUDA only) and
    ``compile`` are speed settings, not recorded (see ``reflow.teachers.scheduler``).
    """

    kind = "diffusers"

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
        _check_folder(path)
        overrides = solver_overrides(solver, nfe, timestep_spacing, clip_sample)
        dtype = autocast_dtype(autocast)
        model_index = read_json(path / "model_index.json")
        _check_unet_class(path / "unet")
        self._init_solver(path, solver, nfe, overrides)
        # UNet: safetensors unless pickle is allowed explicitly. Never DiffusionPipeline (no custom code).
        unet = load_unet(path / "unet", allow_pickle=allow_pickle)
        self._init_unet(unet, device, channels_last=channels_last, autocast=dtype, compile=compile)
        self._init_overrides(clipped_model_output)
        self.components = sorted(k for k in model_index if not k.startswith("_"))
        self._init_shapes()
        self._init_classes(null_label, model_index.get("_reflow_null_class"))
        self._init_guidance(guidance_scale)

    def _init_overrides(self, clipped_model_output: bool | None) -> None:
        """What describe() records and load_teacher(**overrides) takes back (verify-pairs reruns with it)."""
        self.overrides = dict(self.scheduler_overrides)
        self.clipped_model_output = bool(clipped_model_output)
        if self.clipped_model_output:
            if self.solver != "ddim":
                raise ReflowError("--clipped-model-output applies only to --solver ddim; drop it or use ddim")
            self.overrides["clipped_model_output"] = True
            self.step_kwargs["use_clipped_model_output"] = True
        self._record_autocast()

    def _init_shapes(self) -> None:
        cfg = self.unet.config
        self.sample_shape = unet_sample_shape(cfg, self.path / "unet")
        # Learned-variance UNets (out_channels = 2 * in_channels) predict [model_output, variance].
        if cfg.out_channels not in (cfg.in_channels, 2 * cfg.in_channels):
            raise ReflowError(
                f"{self.path / 'unet'}: out_channels {cfg.out_channels} must equal in_channels {cfg.in_channels} "
                "(or twice it)"
            )
        self.split_output = cfg.out_channels == 2 * cfg.in_channels

    def _init_classes(self, null_label: int | None, declared: int | None) -> None:
        """Class conditioning: the UNet's classes and its null class (``null_label``, else ``declared`` in
        model_index.json)."""
        cfg = self.unet.config
        if self.unet.class_embedding is not None and cfg.num_class_embeds is None:
            raise ReflowError(
                f"{self.path / 'unet'}: class_embed_type {cfg.class_embed_type!r} is not supported; "
                "only integer class labels (num_class_embeds)"
            )
        self.num_classes = int(cfg.num_class_embeds) if cfg.num_class_embeds is not None else None
        self.conditioning = "class" if self.num_classes is not None else None
        if null_label is None and declared is not None:
            null_label = declared
        if null_label is not None:
            if self.num_classes is None:
                raise ReflowError("null_label applies to class-conditional teachers; this one is unconditional")
            bad_type = isinstance(null_label, bool) or not isinstance(null_label, int)
            if bad_type or not 0 <= null_label < self.num_classes:
                top = self.num_classes - 1
                raise ReflowError(f"null_label must be a class index in [0, {top}], got {null_label!r}")
        self.null_label = null_label
        if self.num_classes is not None:
            self.label_choices = [c for c in range(self.num_classes) if c != null_label]

    def _init_guidance(self, guidance_scale: float | None) -> None:
        """Classifier-free guidance against the null class, recorded in ``overrides``."""
        if guidance_scale is not None:
            _check_guidance_scale(guidance_scale, self.num_classes, self.null_label)
            self.overrides["guidance_scale"] = float(guidance_scale)
            self.overrides["null_label"] = int(self.null_label)
        self.guidance_scale = None if guidance_scale is None else float(guidance_scale)
        self.guided = guidance_scale is not None

    def _weights_hash(self) -> str:
        return weights_hash(self.path, ("unet",))

    def _model_record(self) -> dict[str, Any]:
        return {
            "num_classes": self.num_classes,
            **({"null_label": self.null_label} if self.null_label is not None else {}),
            "components": self.components,
        }

    def _check_cond(self, cond: torch.Tensor | Sequence[int] | None, batch: int) -> torch.Tensor | None:
        """The class labels (B,) as long integers on the device."""
        if self.num_classes is None:
            if cond is not None:
                raise ReflowError("this teacher is unconditional; drop the class labels")
            return None
        if cond is None:
            raise ReflowError(f"this teacher is class-conditional ({self.num_classes} classes); pass labels")
        labels = torch.as_tensor(cond)
        if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
            raise ReflowError(f"class labels must be integers, got dtype {labels.dtype}")
        labels = labels.reshape(-1) if labels.ndim == 0 else labels
        if labels.shape != (batch,):
            raise ReflowError(f"expected {batch} class labels (one per sample), got shape {tuple(labels.shape)}")
        if batch:
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= self.num_classes:
                raise ReflowError(f"class labels must be in [0, {self.num_classes - 1}], got {lo}..{hi}")
        return self._upload(labels, torch.long)

    def _null_cond(self, cond: torch.Tensor) -> torch.Tensor:
        return torch.full_like(cond, self.null_label)
