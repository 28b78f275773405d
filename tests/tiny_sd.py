"""A tiny random Stable Diffusion folder (the layout ``StableDiffusionPipeline.save_pretrained`` writes), built
offline in a second or two: UNet2DConditionModel, AutoencoderKL, CLIPTextModel, a CLIP tokenizer over a
byte-level BPE vocabulary written here, and SD's own scheduler config.

Shapes: latents (4, latent_size, latent_size); the VAE has two blocks, so images are 2 * latent_size pixels
a side (``TINY_SD_VAE_SCALE``); prompt embeddings are (77, 32).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

TINY_SD_VAE_SCALE = 2  # 2 ** (len(vae block_out_channels) - 1)
TINY_SD_EMBED_SHAPE = (77, 32)
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# A few merges, so words become multi-byte tokens as in CLIP's real vocabulary.
MERGES = [
    ("t", "h"),
    ("th", "e</w>"),
    ("a", "n"),
    ("i", "n"),
    ("o", "n</w>"),
    ("e", "r</w>"),
    ("a", "t</w>"),
    ("c", "a"),
    ("ca", "t</w>"),
    ("d", "o"),
    ("do", "g</w>"),
    ("r", "e"),
    ("re", "d</w>"),
    ("b", "l"),
    ("bl", "u"),
    ("blu", "e</w>"),
]


def _bytes_to_unicode() -> list[str]:
    """The 256 printable stand-ins GPT-2 / CLIP byte-level BPE uses for bytes 0..255, in CLIP's order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_clip_tokenizer_files(folder: Path) -> int:
    """vocab.json and merges.txt of a small CLIP byte-level BPE (every byte alone and word-final, the merges
    above, then the two special tokens, as CLIP orders its vocabulary). Returns the vocabulary size."""
    chars = _bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in MERGES] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES))
    return len(vocab)


def make_tiny_sd(folder: Path, *, latent_size: int = 8, seed: int = 0) -> Path:
    """Write a tiny random Stable Diffusion pipeline folder to ``folder`` and return it."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    hidden = TINY_SD_EMBED_SHAPE[1]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=hidden,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        sample_size=latent_size * TINY_SD_VAE_SCALE,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
    )
    with tempfile.TemporaryDirectory() as tmp:
        vocab_size = write_clip_tokenizer_files(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp, model_max_length=TINY_SD_EMBED_SHAPE[0], local_files_only=True)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=TINY_SD_EMBED_SHAPE[0],
            projection_dim=hidden,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    ).eval()
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        prediction_type="epsilon",
        steps_offset=1,
    )
    # DDIM reads set_alpha_to_one from the shared config (as SD's scheduler_config.json carries it).
    scheduler.register_to_config(set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder
