"""The Stable Diffusion (latent text-to-image) teacher against diffusers' own StableDiffusionPipeline on a tiny
random folder."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)
from helpers import assert_f32_close
from tiny_sd import TINY_SD_EMBED_SHAPE, TINY_SD_VAE_SCALE, make_tiny_sd

from reflow.errors import ReflowError
from reflow.models.text import PromptEncoder, decode_latents, is_text_to_image_folder
from reflow.teachers import load_teacher
from reflow.teachers.text import TextToImageTeacher

PROMPTS = ["a red cat", "the blue dog on a mat, 42!", ""]
NEGATIVE = "blurry"
NFE = 4
# Ours against StableDiffusionPipeline: other code, often other batch sizes, so float32 noise: assert_f32_close with
# steps = NFE for samples, 1 for one pass of the text encoder or the VAE (tests/README.md).


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return make_tiny_sd(tmp_path_factory.mktemp("tiny-sd") / "sd", latent_size=8, seed=0)


@pytest.fixture(scope="module")
def pipe(sd_folder):
    pipe = StableDiffusionPipeline.from_pretrained(str(sd_folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def noise(n: int = len(PROMPTS), seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def run_pipe(pipe, scheduler_cls, guidance_scale: float, z0: torch.Tensor, **kw) -> torch.Tensor:
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config, **kw)
    step = {"eta": 0.0} if scheduler_cls is DDIMScheduler else {}
    with torch.no_grad():
        out = pipe(
            prompt=PROMPTS,
            # StableDiffusionPipeline refuses a str negative prompt with a list of prompts (TypeError).
            negative_prompt=[NEGATIVE] * len(PROMPTS),
            guidance_scale=guidance_scale,
            num_inference_steps=NFE,
            latents=z0.clone(),
            output_type="latent",
            **step,
        )
    return out.images


def test_tiny_folder_layout(sd_folder):
    assert is_text_to_image_folder(sd_folder)
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (sd_folder / name).is_dir()
    assert not list(sd_folder.rglob("*.bin"))
    scheduler = json.loads((sd_folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "DDPMScheduler"
    assert scheduler["beta_schedule"] == "scaled_linear" and scheduler["steps_offset"] == 1
    assert scheduler["set_alpha_to_one"] is False and scheduler["clip_sample"] is False


@pytest.mark.parametrize(
    "solver, scheduler_cls, kw",
    [("ddim", DDIMScheduler, {}), ("dpm", DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"})],
)
def test_guided_sampling_matches_pipeline(sd_folder, pipe, solver, scheduler_cls, kw):
    teacher = TextToImageTeacher(sd_folder, nfe=NFE, solver=solver, guidance_scale=3.0, negative_prompt=NEGATIVE)
    assert teacher.sample_shape == (4, 8, 8)
    assert teacher.embed_shape == TINY_SD_EMBED_SHAPE
    assert teacher.vae_scale_factor == TINY_SD_VAE_SCALE
    assert teacher.conditioning == "text" and teacher.num_classes is None
    z0 = noise()
    z1 = teacher(z0, teacher.encode_prompts(PROMPTS))
    assert z1.dtype == torch.float32 and z1.shape == z0.shape
    ref = run_pipe(pipe, scheduler_cls, 3.0, z0, **kw)
    assert_f32_close(z1, ref, steps=NFE)
    # The prompt matters (the comparison is not vacuous), and each call starts fresh.
    assert (z1[0] - z1[1]).abs().max() > 1e-3
    torch.testing.assert_close(teacher(z0, teacher.encode_prompts(PROMPTS)), z1, atol=0, rtol=0)  # same batch


def test_encode_prompts_matches_pipeline(sd_folder, pipe):
    teacher = TextToImageTeacher(sd_folder, nfe=NFE, guidance_scale=3.0, negative_prompt=NEGATIVE)
    with torch.no_grad():
        embeds, negative = pipe.encode_prompt(PROMPTS, "cpu", 1, True, [NEGATIVE] * len(PROMPTS))
    got = teacher.encode_prompts(PROMPTS)
    assert got.shape == (len(PROMPTS), *TINY_SD_EMBED_SHAPE) and got.dtype == torch.float32
    assert_f32_close(got, embeds)
    assert_f32_close(teacher._negative_embeds.expand_as(negative), negative)  # encoded once, not once per row
    encoder = PromptEncoder(sd_folder, batch_size=2)  # batching changes nothing but float32 noise
    assert_f32_close(encoder(PROMPTS), embeds)
    assert encoder.max_length == TINY_SD_EMBED_SHAPE[0]
    assert encoder([]).shape == (0, *TINY_SD_EMBED_SHAPE)


def test_unguided_sampling_matches_pipeline(sd_folder, pipe):
    teacher = TextToImageTeacher(sd_folder, nfe=NFE, guidance_scale=1.0, negative_prompt=NEGATIVE)
    batches = []
    hook = teacher.unet.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    try:
        z0 = noise(seed=1)
        z1 = teacher(z0, teacher.encode_prompts(PROMPTS))
    finally:
        hook.remove()
    assert batches == [len(PROMPTS)] * NFE  # no unconditional half
    assert_f32_close(z1, run_pipe(pipe, DDIMScheduler, 1.0, z0), steps=NFE)


def test_decode_matches_pipeline(sd_folder, pipe):
    teacher = TextToImageTeacher(sd_folder, nfe=NFE, guidance_scale=3.0, negative_prompt=NEGATIVE)
    z0 = noise(seed=2)
    embeds = teacher.encode_prompts(PROMPTS)
    z1 = teacher(z0, embeds)
    images = teacher.decode(z1, batch_size=2)
    assert images.shape == (len(PROMPTS), 3, 8 * TINY_SD_VAE_SCALE, 8 * TINY_SD_VAE_SCALE)
    assert images.min() >= -1 and images.max() <= 1
    with torch.no_grad():
        ref = pipe.vae.decode(z1 / pipe.vae.config.scaling_factor).sample.clamp(-1, 1)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pt = pipe(
            prompt_embeds=embeds,
            negative_prompt_embeds=teacher._negative_embeds.expand_as(embeds),
            guidance_scale=3.0,
            num_inference_steps=NFE,
            latents=z0.clone(),
            output_type="pt",
            eta=0.0,
        ).images
    assert_f32_close(images, ref)  # decoded in batches of 2 against one batch of 3
    assert_f32_close(images, pt * 2 - 1, steps=NFE + 1)  # the pipeline's [0, 1] images: its own sampling + decode
    assert_f32_close(decode_latents(sd_folder, z1), images)


def test_describe_round_trips_through_load_teacher(sd_folder):
    teacher = load_teacher(
        sd_folder, nfe=NFE, solver="ddim", guidance_scale=2.0, negative_prompt=NEGATIVE, timestep_spacing="trailing"
    )
    assert isinstance(teacher, TextToImageTeacher)
    rec = teacher.describe()
    assert json.loads(json.dumps(rec)) == rec
    assert rec["kind"] == "diffusers-text" and rec["solver"] == "ddim" and rec["nfe"] == NFE
    assert rec["guidance_scale"] == 2.0 and rec["negative_prompt"] == NEGATIVE
    assert rec["overrides"] == {"guidance_scale": 2.0, "negative_prompt": NEGATIVE, "timestep_spacing": "trailing"}
    assert rec["embed_shape"] == list(TINY_SD_EMBED_SHAPE) and rec["sample_shape"] == [4, 8, 8]
    assert rec["timesteps"] == [999, 749, 499, 249]
    assert rec["components"]["text_encoder"] == "CLIPTextModel"
    again = load_teacher(rec["teacher"], nfe=rec["nfe"], solver=rec["solver"], **rec["overrides"])
    assert again.describe() == rec
    z0 = noise(seed=3)
    embeds = teacher.encode_prompts(PROMPTS)
    torch.testing.assert_close(again(z0, embeds), teacher(z0, embeds), atol=0, rtol=0)  # same batch, same kernels


def test_pickle_unet_needs_allow_pickle(sd_folder, tmp_path):
    copy = tmp_path / "pickled"
    shutil.copytree(sd_folder, copy)
    unet = UNet2DConditionModel.from_pretrained(str(copy / "unet"), local_files_only=True)
    shutil.rmtree(copy / "unet")
    unet.save_pretrained(str(copy / "unet"), safe_serialization=False)
    assert list((copy / "unet").glob("*.bin")) and not list((copy / "unet").glob("*.safetensors"))
    with pytest.raises(ReflowError, match="allow-pickle"):
        TextToImageTeacher(copy, nfe=NFE)
    trusted = TextToImageTeacher(copy, nfe=NFE, allow_pickle=True, guidance_scale=3.0)
    reference = TextToImageTeacher(sd_folder, nfe=NFE, guidance_scale=3.0)
    z0, embeds = noise(seed=4), reference.encode_prompts(PROMPTS)
    torch.testing.assert_close(trusted(z0, embeds), reference(z0, embeds), atol=0, rtol=0)  # same weights, batch
    assert trusted.describe()["weights_hash"] != reference.describe()["weights_hash"]


def test_missing_tokenizer_and_bad_settings(sd_folder, tmp_path):
    copy = tmp_path / "no-tokenizer"
    shutil.copytree(sd_folder, copy)
    shutil.rmtree(copy / "tokenizer")
    with pytest.raises(ReflowError, match="no tokenizer/ folder"):
        TextToImageTeacher(copy, nfe=NFE)
    with pytest.raises(ReflowError, match="no tokenizer/ folder"):
        PromptEncoder(copy)
    with pytest.raises(ReflowError, match="guidance-scale"):
        TextToImageTeacher(sd_folder, nfe=NFE, guidance_scale=0.5)
    with pytest.raises(ReflowError, match="unknown solver"):
        TextToImageTeacher(sd_folder, nfe=NFE, solver="euler")
    teacher = TextToImageTeacher(sd_folder, nfe=NFE, guidance_scale=1.0)
    with pytest.raises(ReflowError, match="prompt embeddings"):
        teacher(noise(2), torch.zeros(2, 10, TINY_SD_EMBED_SHAPE[1]))
    with pytest.raises(ReflowError, match="pass prompt embeddings"):
        teacher(noise(2))
    with pytest.raises(ReflowError, match="z0 has shape"):
        teacher(torch.zeros(2, 4, 4, 4), torch.zeros(2, *TINY_SD_EMBED_SHAPE))
    with pytest.raises(ReflowError, match="no text-to-image teacher folder"):
        PromptEncoder("")


def test_non_sd_folders_are_refused(tmp_path):
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(32, 32),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    ddpm = tmp_path / "ddpm"
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(str(ddpm), safe_serialization=True)
    assert not is_text_to_image_folder(ddpm)
    with pytest.raises(ReflowError, match="UNet2DConditionModel"):
        TextToImageTeacher(ddpm, nfe=NFE)
    plain = tmp_path / "plain"
    plain.mkdir()
    assert not is_text_to_image_folder(plain)
    with pytest.raises(ReflowError, match="model_index.json"):
        TextToImageTeacher(plain, nfe=NFE)
    with pytest.raises(ReflowError, match="no such"):
        TextToImageTeacher(tmp_path / "missing", nfe=NFE)


def test_pickle_text_encoder_needs_allow_pickle(sd_folder, tmp_path):
    from safetensors.torch import load_file

    copy = tmp_path / "pickled-text"
    shutil.copytree(sd_folder, copy)
    weights = copy / "text_encoder" / "model.safetensors"
    torch.save(load_file(str(weights)), copy / "text_encoder" / "pytorch_model.bin")
    weights.unlink()
    with pytest.raises(ReflowError, match="allow-pickle"):
        PromptEncoder(copy)
    # the same weights from a pickle, the same batch and kernels: bit for bit
    torch.testing.assert_close(
        PromptEncoder(copy, allow_pickle=True)(PROMPTS), PromptEncoder(sd_folder)(PROMPTS), atol=0, rtol=0
    )


def test_missing_transformers_names_the_install(sd_folder, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` raise ImportError
    with pytest.raises(ReflowError, match="pip install transformers"):
        PromptEncoder(sd_folder)
