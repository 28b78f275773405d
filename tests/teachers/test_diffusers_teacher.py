"""The diffusers-checkpoint teacher against independent plain loops over diffusers' own schedulers."""

from __future__ import annotations

import json

import pytest
import torch
from ddpm_helpers import ddim_reference, noise, reference_loop, save, tiny_unet
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
)
from helpers import assert_f32_close, threads_for_tests

from reflow.errors import ReflowError
from reflow.teachers import load_teacher
from reflow.teachers.ddpm import DiffusersTeacher

NFE = 6
# Our solver against a plain loop over diffusers' scheduler, often on another batch size (sub-batches, the guided
# [null; labels] batch): float32 noise, assert_f32_close with steps = NFE (tests/README.md). A wrong timestep or a step
# too many or too few moves these samples by 0.6-3 (c ~ 1e5-1e9), against the c = 256 allowed.


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The UNets here are tiny: one thread is fastest, and with 2 threads a busy machine makes OpenMP
    barriers cost ~1 s per forward pass. REFLOW_TEST_THREADS overrides it, as everywhere (tests/README.md)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads_for_tests())
    yield
    torch.set_num_threads(before)


CHECKPOINT_SCHEDULERS = {
    "ddpm-linear-clip": lambda: DDPMScheduler(beta_schedule="linear", clip_sample=True),
    "ddpm-v-cosine": lambda: DDPMScheduler(
        prediction_type="v_prediction", beta_schedule="squaredcos_cap_v2", clip_sample=False
    ),
    "ddpm-sample-threshold": lambda: DDPMScheduler(prediction_type="sample", clip_sample=False, thresholding=True),
    "pndm": lambda: PNDMScheduler(),
    "euler-scaled-linear": lambda: EulerDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="trailing"
    ),
}


@pytest.mark.parametrize("kind", list(CHECKPOINT_SCHEDULERS))
def test_ddim_matches_plain_diffusers_loop(tmp_path, kind):
    unet = tiny_unet()
    folder = save(tmp_path, kind, unet, CHECKPOINT_SCHEDULERS[kind]())
    teacher = load_teacher(folder, nfe=NFE, solver="ddim")
    assert isinstance(teacher, DiffusersTeacher)
    assert teacher.sample_shape == (1, 8, 8) and teacher.num_classes is None
    z0 = noise(teacher.sample_shape)
    z1 = teacher(z0)
    ref = ddim_reference(folder, unet, z0)
    assert z1.shape == z0.shape and torch.isfinite(z1).all()
    assert_f32_close(z1, ref, steps=NFE)
    assert (z1 - z0).abs().max() > 0.1  # the teacher really moved the noise
    if kind == "ddpm-linear-clip":  # clip_sample honoured: the final x0 prediction is clipped
        assert z1.abs().max() <= 1.0 + 1e-6
    d = teacher.describe()
    assert d["checkpoint_scheduler"] == type(CHECKPOINT_SCHEDULERS[kind]()).__name__
    assert d["solver_config"]["prediction_type"] == CHECKPOINT_SCHEDULERS[kind]().config.prediction_type


def test_prediction_types_change_the_result(tmp_path):
    """The checkpoint's prediction_type reaches the solver (guards against a silent default)."""
    unet = tiny_unet()
    z0 = noise((1, 8, 8))
    outs = []
    for pt in ("epsilon", "v_prediction"):
        folder = save(tmp_path, pt, unet, DDPMScheduler(prediction_type=pt, clip_sample=False))
        teacher = load_teacher(folder, nfe=NFE, solver="ddim")
        assert teacher.scheduler.config.prediction_type == pt
        outs.append(teacher(z0))
    assert (outs[0] - outs[1]).abs().max() > 1e-3


def test_class_conditional(tmp_path):
    unet = tiny_unet(num_class_embeds=10)
    folder = save(tmp_path, "cond", unet, DDPMScheduler(clip_sample=False))
    teacher = load_teacher(folder, nfe=NFE, solver="ddim")
    assert teacher.num_classes == 10
    z0 = noise(teacher.sample_shape, n=4)
    labels = torch.tensor([0, 3, 9, 3])
    z1 = teacher(z0, labels)
    assert_f32_close(z1, ddim_reference(folder, unet, z0, labels=labels), steps=NFE)
    # The label matters, and a list of ints works the same as a tensor.
    assert (teacher(z0, [1, 1, 1, 1]) - z1).abs().max() > 1e-4
    torch.testing.assert_close(teacher(z0, labels.tolist()), z1, atol=0, rtol=0)  # same batch, same kernels
    assert teacher.describe()["num_classes"] == 10
    with pytest.raises(ReflowError, match="class-conditional"):
        teacher(z0)
    with pytest.raises(ReflowError, match=r"\[0, 9\]"):
        teacher(z0, torch.tensor([0, 1, 2, 10]))
    with pytest.raises(ReflowError, match="4 class labels"):
        teacher(z0, torch.tensor([0, 1]))
    with pytest.raises(ReflowError, match="integers"):
        teacher(z0, torch.zeros(4))


def test_unconditional_refuses_labels(tmp_path):
    folder = save(tmp_path, "uncond", tiny_unet(), DDPMScheduler())
    teacher = load_teacher(folder, nfe=2, solver="ddim")
    with pytest.raises(ReflowError, match="unconditional"):
        teacher(noise(teacher.sample_shape), torch.tensor([0, 1, 2]))
    with pytest.raises(ReflowError, match="shape"):
        teacher(torch.zeros(2, 3, 8, 8))


def test_dpm_solver_pp_matches_plain_diffusers_loop(tmp_path):
    unet = tiny_unet()
    folder = save(tmp_path, "dpm", unet, DDPMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=False))
    teacher = load_teacher(folder, nfe=NFE, solver="dpm")
    z0 = noise(teacher.sample_shape)
    z1 = teacher(z0)
    scheduler = DPMSolverMultistepScheduler.from_pretrained(folder, subfolder="scheduler", algorithm_type="dpmsolver++")
    ref = reference_loop(unet, scheduler, z0, NFE)
    assert_f32_close(z1, ref, steps=NFE)
    # Multistep state is reset per call: a second call (and a sub-batch) gives the same rows.
    torch.testing.assert_close(teacher(z0), z1, atol=0, rtol=0)  # same batch, same kernels: bit for bit
    assert_f32_close(teacher(z0[1:]), z1[1:], steps=NFE)  # another batch size: float32 noise
    # ... and it differs from DDIM at the same NFE (a different solver really ran).
    ddim = load_teacher(folder, nfe=NFE, solver="ddim")(z0)
    assert (ddim - z1).abs().max() > 1e-4
    d = teacher.describe()
    assert d["solver"] == "dpm" and d["solver_scheduler"] == "DPMSolverMultistepScheduler"
    assert d["solver_config"]["algorithm_type"] == "dpmsolver++"
    json.dumps(d, allow_nan=False)  # strict JSON (lambda_min_clipped = -inf is stored as a string)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("solver", ["ddim", "dpm"])
def test_cuda_matches_cpu(tmp_path, solver):
    unet = tiny_unet(num_class_embeds=10)
    folder = save(tmp_path, "cuda", unet, DDPMScheduler())
    z0, labels = noise((1, 8, 8), n=4), torch.tensor([0, 1, 2, 3])
    cpu = load_teacher(folder, nfe=NFE, solver=solver)(z0, labels)
    gpu = load_teacher(folder, nfe=NFE, solver=solver, device="cuda")(z0, labels)
    assert gpu.device.type == "cuda"
    # Not the float32 rule: cuDNN convolutions run in TF32 by default (a 10-bit mantissa, eps 2^-10 ~ 1e-3, 8000x
    # float32's), and 1e-2 is about ten TF32 roundings of these O(1) samples; a wrong step still moves them by > 0.5.
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-2, rtol=0)


def test_overrides_are_applied_and_recorded(tmp_path):
    unet = tiny_unet()
    folder = save(tmp_path, "ov", unet, DDPMScheduler(clip_sample=True))
    teacher = load_teacher(folder, nfe=NFE, solver="ddim", timestep_spacing="trailing", clip_sample=False)
    z0 = noise(teacher.sample_shape)
    ref = ddim_reference(folder, unet, z0, timestep_spacing="trailing", clip_sample=False)
    assert_f32_close(teacher(z0), ref, steps=NFE)
    d = teacher.describe()
    assert d["overrides"] == {"timestep_spacing": "trailing", "clip_sample": False}
    assert d["solver_config"]["clip_sample"] is False and d["timesteps"][0] == 999
    plain = load_teacher(folder, nfe=NFE, solver="ddim").describe()
    assert plain["overrides"] == {} and plain["config_hash"] == d["config_hash"]
    with pytest.raises(ReflowError, match="timestep_spacing"):
        load_teacher(folder, nfe=NFE, solver="ddim", timestep_spacing="sideways")
    with pytest.raises(ReflowError, match="ddim"):
        load_teacher(folder, nfe=NFE, solver="dpm", clip_sample=True)


def test_describe_is_complete_and_json_stable(tmp_path):
    folder = save(tmp_path, "desc", tiny_unet(), PNDMScheduler())
    teacher = load_teacher(folder, nfe=4, solver="ddim")
    d = teacher.describe()
    assert d["kind"] == "diffusers" and d["teacher"] == str(folder.resolve())
    assert d["solver"] == "ddim" and d["nfe"] == 4 and d["eta"] == 0.0
    assert d["checkpoint_scheduler"] == "PNDMScheduler" and d["solver_scheduler"] == "DDIMScheduler"
    assert len(d["config_hash"]) == 16 and len(d["weights_hash"]) == 16
    assert len(d["timesteps"]) == 4
    # Pair generation compares describe() with what it read back from run.json to resume.
    assert json.loads(json.dumps(d)) == d
    assert DiffusersTeacher(folder, nfe=4).describe() == d
    # Different weights, same configs: same config hash, different weights hash.
    other_folder = save(tmp_path, "desc2", tiny_unet(seed=5), PNDMScheduler())
    other = load_teacher(other_folder, nfe=4, solver="ddim").describe()
    assert other["weights_hash"] != d["weights_hash"]


def test_tuple_sample_size_and_learned_variance(tmp_path):
    unet = tiny_unet(sample_size=(8, 16), in_channels=2, out_channels=4)
    folder = save(tmp_path, "rect", unet, DDPMScheduler(variance_type="learned_range", clip_sample=False))
    teacher = load_teacher(folder, nfe=3, solver="ddim")
    assert teacher.sample_shape == (2, 8, 16)
    z0 = noise(teacher.sample_shape, n=2)
    scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    scheduler.set_timesteps(3)
    x = z0.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = unet(x, t).sample[:, :2]  # [model_output, variance]: the ODE uses the first half
            x = scheduler.step(out, t, x, eta=0.0).prev_sample
    assert_f32_close(teacher(z0), x, steps=3)


def test_generate_pairs_with_a_diffusers_teacher(tmp_path):
    from reflow.core.noise import row_noise
    from reflow.pairs import generate_pairs, load_pairs

    unet = tiny_unet()
    folder = save(tmp_path, "gen", unet, DDPMScheduler())
    teacher = load_teacher(folder, nfe=3, solver="ddim")
    out = generate_pairs(teacher, tmp_path / "pairs", 5, seed=7, batch_size=2)
    pairs = load_pairs(out)
    assert len(pairs) == 5 and pairs.sample_shape == (1, 8, 8)
    torch.testing.assert_close(pairs.z0, row_noise(7, range(5), (1, 8, 8)), atol=0, rtol=0)  # stored noise
    ref = torch.cat([ddim_reference(folder, unet, pairs.z0[b : b + 2], nfe=3) for b in range(0, 5, 2)])
    assert_f32_close(pairs.z1, ref, steps=3)
    assert pairs.provenance["teacher"] == teacher.describe()
    # Rerunning with the same (freshly loaded) teacher is recognised as the same settings.
    generate_pairs(load_teacher(folder, nfe=3, solver="ddim"), out, 5, seed=7, batch_size=2)


# ---- bad input ---------------------------------------------------------------------------------


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_missing_folder(tmp_path):
    with pytest.raises(ReflowError, match="no such teacher") as e:
        load_teacher(tmp_path / "nope", nfe=4, solver="ddim")
    one_line(e)
    with pytest.raises(ReflowError, match="no such teacher"):
        DiffusersTeacher(tmp_path / "nope")


def test_not_a_diffusers_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ReflowError, match="model_index.json") as e:
        load_teacher(empty, nfe=4, solver="ddim")
    one_line(e)
    with pytest.raises(ReflowError, match="model_index.json"):
        DiffusersTeacher(empty)
    no_unet = tmp_path / "no_unet"
    no_unet.mkdir()
    (no_unet / "model_index.json").write_text('{"_class_name": "DDPMPipeline"}')
    with pytest.raises(ReflowError, match="unet") as e:
        load_teacher(no_unet, nfe=4, solver="ddim")
    one_line(e)


def test_bad_settings(tmp_path):
    folder = save(tmp_path, "bad", tiny_unet(), DDPMScheduler())
    with pytest.raises(ReflowError, match="unknown solver"):
        load_teacher(folder, nfe=4, solver="euler")
    with pytest.raises(ReflowError, match="--nfe"):
        load_teacher(folder, nfe=0, solver="ddim")
    with pytest.raises(ReflowError, match="--nfe 5000") as e:
        load_teacher(folder, nfe=5000, solver="ddim")
    one_line(e)


def test_pickle_only_weights(tmp_path):
    unet = tiny_unet()
    folder = save(tmp_path, "pickle", unet, DDPMScheduler(), safe_serialization=False)
    assert not list(folder.rglob("*.safetensors")) and list((folder / "unet").glob("*.bin"))
    with pytest.raises(ReflowError, match="--allow-pickle") as e:
        load_teacher(folder, nfe=NFE, solver="ddim")
    one_line(e)
    teacher = load_teacher(folder, nfe=NFE, solver="ddim", allow_pickle=True)
    z0 = noise(teacher.sample_shape)
    assert_f32_close(teacher(z0), ddim_reference(folder, unet, z0), steps=NFE)
    assert len(teacher.describe()["weights_hash"]) == 16
