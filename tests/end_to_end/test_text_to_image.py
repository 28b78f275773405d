"""Latent text-to-image end to end on tiny random Stable Diffusion components: guided pairs against a plain
StableDiffusionPipeline DDIM run, training and distillation from the teacher's UNet, the student as a stock
StableDiffusionPipeline, `reflow sample --prompts [--decode]`, eval, and prompts-only pairs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, StableDiffusionPipeline
from helpers import assert_f32_close, cli_ok, f32_atol
from tiny_sd import TINY_SD_EMBED_SHAPE, make_tiny_sd
from typer.testing import CliRunner

from reflow.cli.app import app
from reflow.core.noise import row_noise
from reflow.models.text import PromptEncoder
from reflow.models.velocity import load_model
from reflow.pairs import PairsReader, load_pairs

runner = CliRunner()
PROMPTS = ["a cat", "the red house at night", "an owl"]
LATENT = (4, 8, 8)


invoke = cli_ok  # run a command, check it exits 0


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i")
    sd = make_tiny_sd(root / "sd")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n\n")  # a blank line is skipped
    guided = ("--nfe", 4, "--guidance-scale", 3.0, "--negative-prompt", "blurry", "--prompts", prompts)
    invoke("generate", "--teacher", sd, "--out", root / "pairs", "--num-pairs", 24, *guided)
    invoke("generate", "--teacher", sd, "--out", root / "heldout", "--num-pairs", 6, "--seed", 5, *guided)
    return root, sd, prompts


@torch.no_grad()
def test_pairs_match_a_plain_guided_pipeline(run):
    root, sd, _ = run
    pairs = load_pairs(root / "pairs")
    assert pairs.prompt[:4] == [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[0]]  # row i: prompt i mod 3
    assert pairs.sample_shape == LATENT and tuple(pairs.prompt_embeds.shape[1:]) == TINY_SD_EMBED_SHAPE
    prov = pairs.provenance
    assert prov["teacher"]["guidance_scale"] == 3.0 and prov["teacher"]["negative_prompt"] == "blurry"
    assert prov["prompts"]["count"] == 3 and prov["embed_shape"] == list(TINY_SD_EMBED_SHAPE)
    pipe = StableDiffusionPipeline.from_pretrained(sd)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    rows = [0, 1, 2, 4]
    z0 = row_noise(0, rows, LATENT)
    torch.testing.assert_close(pairs.z0[rows], z0, atol=0, rtol=0)  # the stored noise is row_noise's, bit for bit
    want = pipe(
        prompt=[pairs.prompt[i] for i in rows], negative_prompt=["blurry"] * 4, guidance_scale=3.0,
        num_inference_steps=4, latents=z0, output_type="latent", eta=0.0,
    ).images  # fmt: skip
    # generate ran all 24 rows in one batch, the pipeline these 4: float32 noise (tests/README.md)
    assert_f32_close(pairs.z1[rows], want, steps=4)
    embeds = pipe.encode_prompt([pairs.prompt[i] for i in rows], "cpu", 1, False)[0]
    assert_f32_close(pairs.prompt_embeds[rows], embeds)


def test_train_distill_export_sample_eval(run):
    root, sd, prompts = run
    student, one = root / "student", root / "one"
    common = ("--batch-size", 8, "--log-with", "none", "--lr", 1e-4)
    invoke("train", "--pairs", root / "pairs", "--init", sd, "--out", student, "--max-steps", 3, *common)
    invoke("distill", "--pairs", root / "pairs", "--init", student, "--out", one, "--max-steps", 2, "--k", 1, *common)
    index = json.loads((one / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert {"vae", "text_encoder", "tokenizer", "unet", "scheduler"} <= set(index)
    model = load_model(one)
    assert model.conditioning == "text" and model.sample_shape == LATENT

    # the student in stock diffusers gives what `reflow sample` gives from the same noise and prompts
    z0 = row_noise(3, range(4), LATENT)
    np.save(root / "z0.npy", z0.numpy())
    pipe = DiffusionPipeline.from_pretrained(one)
    assert isinstance(pipe, StableDiffusionPipeline)
    texts = [PROMPTS[i % 3] for i in range(4)]
    for k in (1, 2):
        out = root / f"latents{k}.npy"
        invoke("sample", "--model", one, "--nfe", k, "--noise", root / "z0.npy", "--prompts", prompts, "--out", out)
        ours = torch.from_numpy(np.load(out))
        assert (root / f"latents{k}.prompts.txt").read_text().splitlines() == texts
        theirs = pipe(prompt=texts, num_inference_steps=k, guidance_scale=1.0, latents=z0, output_type="latent").images
        assert_f32_close(theirs, ours, steps=k)
    images = root / "images.npy"
    invoke(
        "sample", "--model", one, "--nfe", 1, "--noise", root / "z0.npy", "--prompts", prompts, "--decode",
        "--out", images,
    )  # fmt: skip
    decoded = torch.from_numpy(np.load(images))
    pixels = pipe(prompt=texts, num_inference_steps=1, guidance_scale=1.0, latents=z0, output_type="pt").images
    assert decoded.shape == (4, 3, 16, 16) and decoded.min() >= -1 and decoded.max() <= 1
    assert_f32_close(decoded, pixels * 2 - 1, steps=2)  # one UNet step, one VAE pass

    # eval on the held-out pairs' prompts, against the teacher run with the pairs' own guidance
    report = root / "report"
    invoke(
        "eval", "--model", sd, "--model", one, "--reference", root / "heldout", "--nfe", "1,2", "--num-samples", 12,
        "--seeds", 1, "--teacher-nfe", 4, "--num-fidelity", 6, "--out", report,
    )  # fmt: skip
    metrics = json.loads((report / "metrics.json").read_text())
    teacher_entry, student_entry = metrics["models"]
    assert teacher_entry["conditioning"] == student_entry["conditioning"] == "text"
    # the pairs are the teacher's own output, up to float32 noise (eval's batch is not generate's): MSE <= max|diff|^2
    heldout_z1 = load_pairs(root / "heldout").z1
    assert teacher_entry["reference_solve"]["mse_teacher"] <= f32_atol(heldout_z1, steps=4) ** 2
    assert student_entry["nfe"]["1"]["mse_teacher"] > 0 and "w2" in student_entry["nfe"]["1"]
    assert student_entry["straightness"] >= 0


def test_prompts_only_pairs_train_with_recomputed_embeddings(run):
    root, sd, prompts = run
    only = root / "prompts-only"
    invoke(
        "generate", "--teacher", sd, "--out", only, "--num-pairs", 24, "--nfe", 4, "--guidance-scale", 3.0,
        "--negative-prompt", "blurry", "--prompts", prompts, "--store-prompts-only",
    )  # fmt: skip
    reader, stored = PairsReader(only), PairsReader(root / "pairs")
    assert not reader.has_embeddings and reader.embed_shape == TINY_SD_EMBED_SHAPE
    reader.attach_prompt_embeddings(PromptEncoder(sd)(reader.unique_prompts()))
    idx = torch.tensor([7, 0, 23, 5])
    z0, z1, cond = reader.batch(idx)
    z0s, z1s, conds = stored.batch(idx)
    assert torch.equal(z0, z0s) and torch.equal(z1, z1s)
    # recomputed for the 3 unique prompts against generate's embeddings: another batch, float32 noise
    assert_f32_close(cond["encoder_hidden_states"], conds["encoder_hidden_states"])
    invoke(
        "train", "--pairs", only, "--init", sd, "--out", root / "s2", "--max-steps", 2, "--batch-size", 8,
        "--log-with", "none",
    )  # fmt: skip
    assert load_model(root / "s2").conditioning == "text"


def test_text_errors(run, tmp_path):
    root, sd, prompts = run
    r = runner.invoke(app, ["generate", "--teacher", str(sd), "--out", str(tmp_path / "p"), "--num-pairs", "2"])
    assert r.exit_code != 0 and "--prompts" in r.output
    r = runner.invoke(app, ["sample", "--model", str(root / "one"), "--num", "2", "--out", str(tmp_path / "x.npy")])
    assert r.exit_code != 0 and "--prompts" in r.output
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    r = runner.invoke(
        app,
        ["generate", "--teacher", str(sd), "--out", str(tmp_path / "p"), "--num-pairs", "2", "--prompts", str(empty)],
    )
    assert r.exit_code != 0 and "no prompts" in r.output
