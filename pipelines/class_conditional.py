"""A class-conditional few-step pipeline for reflow students (pixel space, ``UNet2DModel`` with
``num_class_embeds``).

This file imports only torch and diffusers: ``reflow.pipelines.export`` copies it into every exported
class-conditional student as ``pipeline.py`` and names it in ``model_index.json``, so

    pipe = DiffusionPipeline.from_pretrained(MODEL, trust_remote_code=True)   # stock diffusers, our file
    pipe = ReflowClassConditionalPipeline.from_pretrained(MODEL)              # with reflow installed

both load it (diffusers runs a folder's own code only when asked to with ``trust_remote_code``). The
loop is ``DDPMPipeline``'s with the labels passed to the UNet: k Euler steps of the flow on the exported
scheduler's grid (see ``reflow.pipelines.export``). Classifier-free guidance was baked into the teacher's
pairs, so the student runs one UNet call per step and takes no guidance scale.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler, ImagePipelineOutput, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor


class ReflowClassConditionalPipeline(DiffusionPipeline):
    """``pipe(class_labels=[3, 7], num_inference_steps=1)``: one image per label.

    ``latents`` (B, C, H, W) replaces the drawn noise (unit Gaussian, as ``reflow sample --noise``);
    ``output_type`` is "pil", "np" (HWC in [0, 1]) or "pt" (NCHW in [-1, 1], the model space).
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler: DPMSolverMultistepScheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

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

    @property
    def num_classes(self) -> int:
        return int(self.unet.config.num_class_embeds)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | list[int] | torch.Tensor,
        num_inference_steps: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        labels = torch.as_tensor([class_labels] if isinstance(class_labels, int) else class_labels)
        if labels.ndim != 1 or labels.dtype.is_floating_point:
            raise ValueError("class_labels must be an int or a 1-D sequence of ints")
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"class_labels must be in [0, {self.num_classes - 1}]")
        size = self.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        shape = (len(labels), self.unet.config.in_channels, height, width)
        if latents is None:
            image = randn_tensor(shape, generator=generator, device=self._execution_device, dtype=self.unet.dtype)
        else:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
            image = latents.to(self._execution_device, self.unet.dtype)
        image = image * self.scheduler.init_noise_sigma
        labels = labels.to(self._execution_device)
        self.scheduler.set_timesteps(num_inference_steps)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_output = self.unet(image, t, class_labels=labels).sample
            image = self.scheduler.step(model_output, t, image, generator=generator).prev_sample
        if output_type == "pt":
            image = image.clamp(-1, 1)
        else:
            image = (image / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                image = self.numpy_to_pil(image)
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
