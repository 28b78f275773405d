"""Class-conditional end to end: guided teacher pairs against a plain diffusers loop, conditional training
and distillation, the exported pipeline in diffusers, `reflow sample --labels`, per-class eval, round 2."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch
from ddpm_helpers import tiny_unet
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, DiffusionPipeline, UNet2DModel
from helpers import assert_f32_close, cli_ok, f32_atol
from typer.testing import CliRunner

from reflow.cli.app import app
from reflow.core.noise import row_labels, row_noise
from reflow.core.sampling import sample
from reflow.errors import ReflowError
from reflow.models.velocity import load_model
from reflow.pairs import PairsReader, load_pairs
from reflow.pipelines.class_conditional import ReflowClassConditionalPipeline
from reflow.teachers import load_teacher
from reflow.teachers.ddpm import DiffusersTeacher

runner = CliRunner()
NULL = 3  # classes 0, 1, 2 and the unconditional label 3


invoke = cli_ok  # run a command, check it exits 0


def tiny_class_unet(seed: int = 0) -> UNet2DModel:
    unet = tiny_unet(seed, num_class_embeds=NULL + 1)
    with torch.no_grad():
        unet.class_embedding.weight.mul_(3.0)  # labels must matter
    return unet


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cond") / "teacher"
    DDPMPipeline(unet=tiny_class_unet(), scheduler=DDPMScheduler(clip_sample=True)).save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["_reflow_null_class"] = NULL
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


@torch.no_grad()
def guided_ddim(folder, z0, labels, nfe, w, **step_kwargs):
    """Classifier-free guided DDIM (eta 0) written out independently of reflow."""
    unet = UNet2DModel.from_pretrained(folder / "unet").eval()
    scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    scheduler.set_timesteps(nfe)
    x = z0 * scheduler.init_noise_sigma
    null = torch.full_like(labels, NULL)
    for t in scheduler.timesteps:
        eps_c = unet(x, t, class_labels=labels).sample
        eps_u = unet(x, t, class_labels=null).sample
        x = scheduler.step(eps_u + w * (eps_c - eps_u), t, x, eta=0.0, **step_kwargs).prev_sample
    return x


def test_guided_teacher_matches_a_plain_guided_loop(teacher_dir):
    z0 = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 1])
    teacher = DiffusersTeacher(teacher_dir, nfe=5, guidance_scale=2.5)
    assert teacher.null_label == NULL and teacher.label_choices == [0, 1, 2]
    out = teacher(z0, labels)
    # Our guided teacher runs [null; labels] as one batch of 8, the plain loop two batches of 4: float32 noise only.
    # A guidance scale off by 0.1 or a step too many moves the samples by 0.7-2 (c > 1e6, 256 allowed).
    assert_f32_close(out, guided_ddim(teacher_dir, z0, labels, 5, 2.5), steps=5)
    unguided = DiffusersTeacher(teacher_dir, nfe=5)(z0, labels)
    assert (out - unguided).abs().max() > 1e-3  # guidance changes the samples
    # w = 1 is the conditional model alone
    assert_f32_close(DiffusersTeacher(teacher_dir, nfe=5, guidance_scale=1.0)(z0, labels), unguided, steps=5)
    rec = teacher.describe()
    assert rec["overrides"] == {"guidance_scale": 2.5, "null_label": NULL} and rec["null_label"] == NULL
    # the noise re-estimated from the clipped x0 at each step, recorded and reloadable
    clipped = DiffusersTeacher(teacher_dir, nfe=5, guidance_scale=2.5, clipped_model_output=True)
    want = guided_ddim(teacher_dir, z0, labels, 5, 2.5, use_clipped_model_output=True)
    got = clipped(z0, labels)
    assert_f32_close(got, want, steps=5)
    assert (want - out).abs().max() > 1e-4
    overrides = clipped.describe()["overrides"]
    assert overrides["clipped_model_output"] is True
    again = load_teacher(teacher_dir, nfe=5, solver="ddim", **overrides)
    torch.testing.assert_close(again(z0, labels), got, atol=0, rtol=0)  # the same teacher again, the same batch
    with pytest.raises(ReflowError, match="only to --solver ddim"):
        DiffusersTeacher(teacher_dir, nfe=5, solver="dpm", clipped_model_output=True)


def test_guidance_errors(tmp_path, teacher_dir):
    plain = tmp_path / "plain"
    DDPMPipeline(unet=tiny_class_unet(), scheduler=DDPMScheduler()).save_pretrained(plain)
    with pytest.raises(ReflowError, match="--null-label"):
        DiffusersTeacher(plain, nfe=2, guidance_scale=2.0)
    with pytest.raises(ReflowError, match="null_label must be a class index"):
        DiffusersTeacher(plain, nfe=2, guidance_scale=2.0, null_label=9)
    with pytest.raises(ReflowError, match="finite number"):
        DiffusersTeacher(teacher_dir, nfe=2, guidance_scale=float("nan"))
    with pytest.raises(ReflowError, match="unconditional label"):
        from reflow.pairs import generate_pairs

        generate_pairs(DiffusersTeacher(teacher_dir, nfe=2), tmp_path / "p", 4, labels=[NULL])


def test_class_conditional_end_to_end(tmp_path, teacher_dir):
    pairs, heldout = tmp_path / "pairs", tmp_path / "heldout"
    invoke("generate", "--teacher", teacher_dir, "--out", pairs, "--num-pairs", 96, "--nfe", 4, "--guidance-scale", 2)
    invoke(
        "generate", "--teacher", teacher_dir, "--out", heldout, "--num-pairs", 24, "--nfe", 4,
        "--guidance-scale", 2, "--seed", 5,
    )  # fmt: skip
    loaded = load_pairs(pairs)
    assert set(loaded.label.tolist()) == {0, 1, 2}  # never the null label
    assert torch.equal(loaded.label, row_labels(0, range(96), [0, 1, 2]))
    assert loaded.provenance["teacher"]["overrides"]["guidance_scale"] == 2.0
    # stored rows are the guided teacher's output from (seed, index) noise and the row's label
    z1 = guided_ddim(teacher_dir, row_noise(0, range(4), (1, 8, 8)), loaded.label[:4], 4, 2.0)
    # generate ran rows 0-95 as one guided batch of 192, the plain loop rows 0-3 in batches of 4: float32 noise
    assert_f32_close(loaded.z1[:4], z1, steps=4)
    reader = PairsReader(pairs)
    assert reader.conditioning == "class" and reader.num_classes == NULL + 1
    _, _, cond = reader.batch(torch.tensor([5, 0, 7]))
    assert torch.equal(cond["class_labels"], loaded.label[[5, 0, 7]])

    student, one = tmp_path / "student", tmp_path / "one"
    common = ("--batch-size", 16, "--log-with", "none", "--lr", 1e-3)
    invoke("train", "--pairs", pairs, "--init", teacher_dir, "--out", student, "--max-steps", 6, *common)
    invoke("distill", "--pairs", pairs, "--init", student, "--out", one, "--max-steps", 4, "--k", 1, *common)
    index = json.loads((one / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline", "ReflowClassConditionalPipeline"]
    assert index["_reflow_null_class"] == NULL and (one / "pipeline.py").is_file()

    # the exported pipeline gives what `reflow sample --labels` gives, from the same noise
    z0 = row_noise(0, range(6), (1, 8, 8))
    np.save(tmp_path / "z0.npy", z0.numpy())
    for k in (1, 2):
        out = tmp_path / f"s{k}.npy"
        invoke("sample", "--model", one, "--nfe", k, "--noise", tmp_path / "z0.npy", "--labels", "2,0", "--out", out)
        ours = torch.from_numpy(np.load(out))
        labels = np.load(tmp_path / f"s{k}.labels.npy")
        assert labels.tolist() == [2, 0, 2, 0, 2, 0]
        pipe = DiffusionPipeline.from_pretrained(one, trust_remote_code=True)
        assert type(pipe).__name__ == "ReflowClassConditionalPipeline"
        theirs = pipe(class_labels=labels.tolist(), num_inference_steps=k, latents=z0, output_type="pt").images
        assert_f32_close(theirs, ours, steps=k)
        direct = ReflowClassConditionalPipeline.from_pretrained(one)
        again = direct(class_labels=labels.tolist(), num_inference_steps=k, latents=z0, output_type="pt").images
        assert_f32_close(again, ours, steps=k)
    # labels matter
    model = load_model(one)
    a = sample(model, z0, 1, cond={"class_labels": torch.zeros(6, dtype=torch.long)}).z1
    b = sample(model, z0, 1, cond={"class_labels": torch.ones(6, dtype=torch.long)}).z1
    assert (a - b).abs().max() > 1e-4
    # stock diffusers refuses to run the folder's code unless asked
    with pytest.raises(ValueError, match="trust_remote_code"):
        DiffusionPipeline.from_pretrained(one)
    r = runner.invoke(app, ["sample", "--model", str(one), "--num", "2", "--out", str(tmp_path / "x.npy")])
    assert r.exit_code != 0 and "--labels" in r.output

    # eval: per class, against the teacher with the held-out pairs' guidance
    report = tmp_path / "report"
    invoke(
        "eval", "--model", teacher_dir, "--model", one, "--reference", "digits", "--heldout", heldout,
        "--nfe", "1,2", "--num-samples", 30, "--seeds", "1", "--teacher-nfe", 4, "--out", report, "--no-figures",
    )  # fmt: skip
    metrics = json.loads((report / "metrics.json").read_text())
    teacher_entry, student_entry = metrics["models"]
    assert "guidance 2" in teacher_entry["solver"]
    cell = student_entry["nfe"]["1"]
    assert set(cell["classes"]) == {"0", "1", "2"} and cell["classes"]["0"]["samples"] == 10
    assert 0.0 <= cell["agreement"] <= 1.0 and "w2_class_mean" in cell and "mse_teacher" in cell
    assert teacher_entry["reference_solve"]["nfe"] == 4 and "agreement" in teacher_entry["reference_solve"]
    # the teacher's reference solve on the held-out noise is the held-out pairs themselves
    # (up to float32 noise: eval's batch is not generate's, MSE <= max|diff|^2 = 1.5e-8; a wrong step moves samples
    # by O(1))
    assert teacher_entry["reference_solve"]["mse_teacher"] <= f32_atol(load_pairs(heldout).z1, steps=4) ** 2

    # round 2: the student teaches, conditionally, never drawing the null label
    teacher2 = load_teacher(one, nfe=2, solver="euler")
    assert teacher2.label_choices == [0, 1, 2] and teacher2.describe()["null_label"] == NULL
    pairs2 = tmp_path / "pairs2"
    invoke("generate", "--teacher", one, "--out", pairs2, "--num-pairs", 12, "--nfe", 2, "--round", 2)
    ds = datasets.load_from_disk(str(pairs2))
    assert set(ds["label"]) <= {0, 1, 2}
    got = torch.tensor(np.asarray(ds.with_format("numpy")["z1"]))
    labels = torch.tensor(ds["label"])
    want = sample(model, row_noise(0, range(12), (1, 8, 8)), 2, cond={"class_labels": labels}, clamp=False).z1
    assert_f32_close(got, want, steps=2)


def test_conditioning_mismatch_is_one_line(tmp_path, teacher_dir):
    pairs = tmp_path / "pairs"
    invoke("generate", "--teacher", teacher_dir, "--out", pairs, "--num-pairs", 8, "--nfe", 2)
    unconditional = tmp_path / "uncond"
    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler()).save_pretrained(unconditional)
    r = runner.invoke(
        app,
        [
            "train",
            "--pairs",
            str(pairs),
            "--init",
            str(unconditional),
            "--out",
            str(tmp_path / "s"),
            "--max-steps",
            "2",
        ],
    )
    assert r.exit_code != 0 and "unconditional but the pairs are class-conditional" in r.output
