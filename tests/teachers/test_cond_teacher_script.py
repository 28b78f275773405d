"""data/train_digits_cond_teacher.py trains a class-conditional DDPM with a null class, saved as a stock
DDPMPipeline folder; the bundled result (data/teachers/digits-cond-ddpm) is there and recognisable."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline
from helpers import assert_f32_close

from reflow.core.noise import row_noise
from reflow.teachers.ddpm import DiffusersTeacher

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "data" / "train_digits_cond_teacher.py"
BUNDLED = REPO / "data" / "teachers" / "digits-cond-ddpm"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("train_digits_cond_teacher", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trained(script, tmp_path_factory):
    out = tmp_path_factory.mktemp("cond") / "tiny-cond-ddpm"
    script.main(
        [
            "--out",
            str(out),
            "--steps",
            "4",
            "--batch-size",
            "16",
            "--channels",
            "32",
            "--layers-per-block",
            "1",
            "--log-every",
            "2",
            "--eval-samples",
            "20",
            "--eval-steps",
            "2",
            "--guidance-scales",
            "1,2",
        ]
    )
    return out


def test_script_saves_a_conditional_pipeline_with_a_null_class(trained):
    pipe = DDPMPipeline.from_pretrained(trained, use_safetensors=True)
    assert type(pipe).__name__ == "DDPMPipeline"
    assert pipe.unet.config.num_class_embeds == 11 and list(pipe.unet.config.block_out_channels) == [32]
    assert pipe.scheduler.config.prediction_type == "epsilon" and pipe.scheduler.config.clip_sample
    index = json.loads((trained / "model_index.json").read_text())
    assert index["_reflow_null_class"] == 10 and index["_class_name"] == "DDPMPipeline"
    assert list((trained / "unet").glob("*.safetensors")) and not list(trained.rglob("*.bin"))
    assert not list(trained.parent.glob(".*"))  # no temporary folder left behind

    quality = json.loads((trained / "quality.json").read_text())
    assert quality["training"]["num_class_embeds"] == 11 and quality["null_class"] == 10
    for key in ("guidance", "guidance_clipped_model_output"):
        assert set(quality[key]) == {"1", "2"}
        for r in quality[key].values():
            assert 0 <= r["agreement_min_class"] <= r["agreement"] <= 1 and r["w2"] > 0
    card = (trained / "README.md").read_text()
    assert "class 10 is the unconditional label; pass guidance_scale > 1 to reflow generate" in card.lower()
    assert "train_digits_cond_teacher.py" in card and "| guidance scale w |" in card


def test_guided_loop_matches_the_teacher_at_w1_and_the_null_label_at_w0(script, trained):
    pipe = DDPMPipeline.from_pretrained(trained, use_safetensors=True)
    z0 = row_noise(1, range(6), (1, 8, 8))
    y = torch.arange(6) % 10
    teacher = DiffusersTeacher(trained, nfe=3, solver="ddim")
    for w, labels in ((1.0, y), (0.0, torch.full_like(y, 10))):
        got = script.guided_ddim(pipe.unet, DDIMScheduler.from_config(pipe.scheduler.config), z0, y, w, 3)
        # the script's guided loop against our unguided teacher (other batches, other code): float32 noise
        assert_f32_close(got, teacher(z0, labels), steps=3)


def test_bundled_cond_teacher_is_there():
    assert (BUNDLED / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((BUNDLED / "model_index.json").read_text())["_reflow_null_class"] == 10
    assert json.loads((BUNDLED / "unet" / "config.json").read_text())["num_class_embeds"] == 11
    quality = json.loads((BUNDLED / "quality.json").read_text())
    best = quality["guidance_clipped_model_output"][f"{quality['recommended_guidance_scale']:g}"]
    assert 1.5 <= best["guidance_scale"] <= 3 and best["agreement"] >= 0.98
    assert sum(f.stat().st_size for f in BUNDLED.rglob("*") if f.is_file()) < 5 * 2**20
    assert "class 10 is the unconditional label" in (BUNDLED / "README.md").read_text().lower()
