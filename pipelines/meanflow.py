"""A few-step pipeline for reflow's MeanFlow students (pixel space, unconditional ``UNet2DModel`` with
``class_embed_type="timestep"``).

This file imports only torch and diffusers: ``reflow.pipelines.export`` copies it into every exported
mean-flow student as ``pipeline.py`` and names it in ``model_index.json``, so

    pipe = DiffusionPipeline.from_pretrained(MODEL, trust_remote_code=True)   # stock diffusers, our file
    pipe = ReflowMeanFlowPipeline.from_pretrained(MODEL)                      # with reflow installed

both load it. A mean flow predicts the AVERAGE velocity u over a jump from time t to a later time s (t = 0
noise, t = 1 data), in diffusers' flow-matching convention (sigma = 1 - t, the UNet predicts -u):

    unet(x_t, timestep = sigma_t T, class_labels = sigma_t - sigma_s) = -u(x_t, t, s)
    x_s = x_t + (s - t) u = x_t + (sigma_s - sigma_t) unet(...)

with T = num_train_timesteps. ``num_inference_steps=k`` makes k such jumps between the k + 1 sigmas of the
folder's scheduler (``set_timesteps(k)``), the grid ``reflow sample --nfe k`` jumps over: the same noise gives
the same images. The scheduler only supplies the grid; a jump is not one of its steps.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler, ImagePipelineOutput, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor


def _cast_to_weight_dtype(module: torch.nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: UNet2DModel feeds its timestep class embedding a float32 sinusoid whatever its own
    dtype; cast it so a float16 UNet runs."""
    dtype = next(module.parameters()).dtype
    return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


class ReflowMeanFlowPipeline(DiffusionPipeline):
    """``pipe(batch_size=4, num_inference_steps=1)``: k jumps of the mean flow from unit Gaussian noise.

    ``batch_size`` images (default 1); ``latents`` (B, C, H, W) replaces the drawn noise (unit Gaussian, as
    ``reflow sample --noise``; B images unless ``batch_size`` says otherwise); ``output_type``
    is "pil", "np" (HWC in [0, 1]) or "pt" (NCHW in [-1, 1], the model space).
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler: DPMSolverMultistepScheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        if unet.class_embedding is not None and not unet.class_embedding._forward_pre_hooks:
            unet.class_embedding.register_forward_pre_hook(_cast_to_weight_dtype)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs):  # noqa: D102
        """Load an exported folder without running its ``pipeline.py`` (this class is the same code)."""
        path = Path(pretrained_model_name_or_path)
        if not path.is_dir():
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        torch_dtype = kwargs.pop("torch_dtype", None)
        unet = UNet2DModel.from_pretrained(path / "unet", torch_dtype=torch_dtype, use_safetensors=True)
        scheduler = DPMSolverMultistepScheduler.from_pretrained(path / "scheduler")
        return cls(unet=unet, scheduler=scheduler)

    def _noise(self, batch_size: int | None, generator, latents: torch.Tensor | None) -> torch.Tensor:
        """The starting noise: ``latents`` (their batch size unless ``batch_size`` is given), else drawn."""
        size = self.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        if batch_size is None:
            batch_size = 1 if latents is None else len(latents)
        shape = (batch_size, self.unet.config.in_channels, height, width)
        if latents is None:
            return randn_tensor(shape, generator=generator, device=self._execution_device, dtype=self.unet.dtype)
        if tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        return latents.to(self._execution_device, self.unet.dtype)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int | None = None,
        num_inference_steps: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
        image = self._noise(batch_size, generator, latents)
        self.scheduler.set_timesteps(num_inference_steps)
        sigmas = self.scheduler.sigmas.to(self._execution_device, torch.float32)
        scale = self.scheduler.config.num_train_timesteps
        ones = torch.ones(len(image), device=image.device, dtype=torch.float32)
        for i in self.progress_bar(range(num_inference_steps)):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            gap = (sigma - sigma_next) * ones  # the jump's length in flow time, not in timesteps
            model_output = self.unet(image, sigma * scale * ones, class_labels=gap).sample
            image = image + (sigma_next - sigma).to(image.dtype) * model_output
        if output_type == "pt":
            image = image.clamp(-1, 1)
        else:
            image = (image / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                image = self.numpy_to_pil(image)
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
