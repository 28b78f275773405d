"""Evaluation: flow diagnostics against closed forms, the multi-model report on a 2-D toy and on the digits
(bundled DDPM teacher vs an image student from the same noise), checked against independent computations."""

import json
import math

import numpy as np
import pytest
import torch
from helpers import F32_C_ELEMENTWISE, f32_atol

from reflow.core.noise import row_noise
from reflow.core.solvers import solve, solve_fixed, time_grid
from reflow.errors import ReflowError
from reflow.eval.evaluate import EvalSettings, evaluate, model_names
from reflow.eval.report import write_report

TEACHER = "data/teachers/digits-ddpm"


def test_straight_flow_has_zero_straightness_and_curvature():
    # v(x, t) = c: every path is the straight line z0 + t c at constant speed.
    c = torch.tensor([[1.5, -0.5, 2.0]])
    z0 = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    sol = solve(lambda x, t: c.expand_as(x), z0, 50, "euler", measure_straightness=True)
    # float32: the chord x1 - z0 is c up to a few roundings per step; S sums |chord - c|^2 over the 3 coordinates
    # (a wrong S, e.g. the chord not divided by the time span, is O(1))
    assert sol.straightness == pytest.approx(0.0, abs=3 * f32_atol(sol.z1, steps=50, c=F32_C_ELEMENTWISE) ** 2)
    assert sol.curvature == 0.0  # the same velocity tensor at every step: no turn at all


@pytest.mark.parametrize("theta", [math.pi / 2, math.pi])
def test_rotation_flow_matches_its_integrals(theta):
    # v(x) = theta J x moves x on a circle of radius r by the angle theta over t in [0, 1]:
    # |dZ/dt| = theta r, the chord is 2 r sin(theta / 2), so
    #   S = int |chord - v|^2 dt = theta^2 r^2 - |chord|^2 = theta^2 r^2 - 2 r^2 (1 - cos theta)
    # (the cross term integrates to chord . (Z1 - Z0) = |chord|^2), and K = int |dv/dt| dt = theta^2 r.
    J = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=torch.float64)
    r = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    z0 = torch.stack([r, torch.zeros_like(r)], dim=1)
    sol = solve_fixed(lambda x, t: theta * x @ J.T, z0, time_grid(4000), measure_straightness=True)
    s_exact = float((theta**2 * r**2 - 2 * r**2 * (1 - math.cos(theta))).mean())
    k_exact = float((theta**2 * r).mean())
    assert sol.straightness == pytest.approx(s_exact, rel=2e-3)
    assert sol.curvature == pytest.approx(k_exact, rel=2e-3)


def test_model_names_are_unique():
    from pathlib import Path

    assert model_names([Path("a/x"), Path("b/y")]) == ["x", "y"]
    assert model_names([Path("/r/a/student"), Path("/r/b/student")]) == ["a/student", "b/student"]


def test_toy_report_two_models(tmp_path, tiny_flow):
    import ot

    from reflow.folders.data import load_source
    from reflow.models.velocity import load_model

    # The same model twice under two names: identical rows are a check that nothing depends on order.
    other = tmp_path / "copy" / "tiny"
    import shutil

    shutil.copytree(tiny_flow, other)
    settings = EvalSettings(nfes=[1, 2], reference="moons", num_samples=200, seeds=[3, 4], diagnostics_samples=64)
    result = evaluate([tiny_flow, other], settings)
    path = write_report(tmp_path / "report", result)
    metrics = json.loads(path.read_text())
    a, b = metrics["models"]
    assert a["name"] != b["name"]
    ref = load_source("moons").reference(200).numpy().astype(np.float64)
    model = load_model(tiny_flow).eval()
    for k in (1, 2):
        w = []
        for seed in (3, 4):
            x = solve(model, row_noise(seed, range(200), (2,)), k, "euler").z1.numpy().astype(np.float64)
            w.append(np.sqrt(ot.emd2(ot.unif(200), ot.unif(200), ot.dist(x, ref))))
        cell = a["nfe"][str(k)]
        # the same samples bit for bit (the same solve on the same batch), W2 in float64 by POT and by us
        assert cell["w2_seeds"] == pytest.approx(w, rel=1e-6)
        assert cell["w2"] == pytest.approx(np.mean(w), rel=1e-6)
        assert cell["w2_std"] == pytest.approx(np.std(w, ddof=1), rel=1e-6)
        assert b["nfe"][str(k)]["w2_seeds"] == cell["w2_seeds"]
    assert a["reference_solve"]["solver"] == "adaptive" and a["reference_solve"]["nfe"] > 2
    assert a["adaptive_nfe"] > 2 and a["reference_solve"]["seed"] == 3
    assert a["straightness"] > 0 and a["curvature"] > 0 and a["straightness_samples"] == 64
    assert "mse_teacher" not in a["nfe"]["1"] and any("--heldout" in n for n in metrics["notes"])
    md = (tmp_path / "report" / "report.md").read_text()
    assert "W2 to data" in md and a["name"] in md and b["name"] in md
    for f in metrics["figures"]:
        png = tmp_path / "report" / f
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"({f})" in md
    assert {"quality_vs_nfe.png", f"scatter_{a['name']}.png", f"trajectories_{a['name']}.png"} <= set(
        metrics["figures"]
    )
    assert not list((tmp_path / "report").glob(".*tmp*"))


@pytest.fixture(scope="module")
def digits_setup(tmp_path_factory):
    """Held-out pairs from the bundled DDPM (DDIM-4) and an image student initialised from it (no training)."""
    from reflow.models.velocity import init_model
    from reflow.pairs import generate_pairs
    from reflow.pipelines.export import save_student as save
    from reflow.teachers import load_teacher

    root = tmp_path_factory.mktemp("digits-eval")
    teacher = load_teacher(TEACHER, nfe=4, solver="ddim")
    generate_pairs(teacher, root / "heldout", 48, seed=5, batch_size=48)
    save(init_model(TEACHER), root / "student")
    return root


def test_digits_report_teacher_vs_student(tmp_path, digits_setup):
    from reflow.eval.features import bundled_digits_net, digits_feature_extractor, extract_features
    from reflow.eval.metrics import frechet_distance
    from reflow.folders.data import load_source
    from reflow.teachers import load_teacher

    settings = EvalSettings(
        nfes=[1, 4],
        reference="digits",
        heldout=str(digits_setup / "heldout"),
        num_samples=96,
        seeds=[1],
        teacher_nfe=4,
        num_fidelity=32,
        diagnostics_samples=16,
        straightness_steps=10,
        kid_subsets=5,
        kid_subset_size=50,
        adaptive=False,
    )
    result = evaluate([TEACHER, digits_setup / "student"], settings)
    path = write_report(tmp_path / "report", result)
    metrics = json.loads(path.read_text())
    teacher_m, student_m = metrics["models"]
    assert teacher_m["kind"] == "diffusers" and student_m["kind"] == "flow"
    # The teacher's DDIM-4 from the pairs' z0 is the pairs' z1: fidelity 0 at its own NFE.
    # (up to float32 noise if eval's batches are not generate's: MSE <= max|diff|^2; DDIM-1 gives 1e-3 and more)
    mse_tol = f32_atol(1.0, steps=4) ** 2  # samples in [-1, 1]
    assert teacher_m["nfe"]["4"]["mse_teacher"] == pytest.approx(0.0, abs=mse_tol)
    assert teacher_m["reference_solve"]["mse_teacher"] == pytest.approx(0.0, abs=mse_tol)
    assert teacher_m["nfe"]["1"]["mse_teacher"] > 1e-3
    # FD in the digits feature space, recomputed independently from the same DDIM-1 samples.
    ddim = load_teacher(TEACHER, nfe=1, solver="ddim")
    x = ddim(row_noise(1, range(96), (1, 8, 8))).clamp(-1, 1)
    net = bundled_digits_net()
    ref = load_source("digits").reference(96)
    scale = extract_features(net, load_source("digits").data).std(axis=0, ddof=1)
    scale = 1 / np.sqrt((scale**2).mean())
    fd = frechet_distance(extract_features(net, x) * scale, extract_features(net, ref) * scale)
    assert digits_feature_extractor()(x) == pytest.approx(extract_features(net, x) * scale)
    # the same DDIM-1 samples bit for bit (eval runs them as one batch too), features and FD in float64
    assert teacher_m["nfe"]["1"]["fd_digits"] == pytest.approx(fd, rel=1e-6)
    assert "w2" in teacher_m["nfe"]["1"] and "kid_digits" in teacher_m["nfe"]["1"]
    assert "straightness" not in teacher_m and student_m["straightness"] > 0
    assert "reference_solve" not in student_m  # adaptive off
    assert student_m["adaptive_nfe"] > 0
    assert any("--inception-weights" in n for n in metrics["notes"])
    assert {"samples_digits-ddpm.png", "samples_student.png", "quality_vs_nfe.png"} <= set(metrics["figures"])
    md = (tmp_path / "report" / "report.md").read_text()
    assert "MSE to teacher" in md and "FD (digits net)" in md


def test_eval_errors(tmp_path, tiny_flow, digits_setup):
    with pytest.raises(ReflowError, match="--seeds"):
        evaluate(tiny_flow, EvalSettings(nfes=[1], reference="moons", seeds=[]))
    with pytest.raises(ReflowError, match="held-out pairs"):
        evaluate(tiny_flow, EvalSettings(nfes=[1], reference="moons", heldout=str(digits_setup / "heldout")))
    with pytest.raises(ReflowError, match="no such model"):
        evaluate(tmp_path / "missing", EvalSettings(nfes=[1], reference="moons"))


def test_progress_counts_network_calls_from_inside_every_solve(tiny_flow, monkeypatch):
    import sys

    # the module, not the function reflow.eval re-exports under its name
    monkeypatch.setattr(sys.modules["reflow.eval.evaluate"], "PROGRESS_SECONDS", 0.0)  # report at every call
    updates = []
    settings = EvalSettings(nfes=[1, 4], reference="moons", num_samples=100, seeds=[1], diagnostics_samples=32)
    evaluate([tiny_flow], settings, progress=updates.append)
    assert all(u.stage == "eval" and u.unit == "calls" for u in updates)
    done = [u.done for u in updates]
    assert done[0] == 0 and done == sorted(done) and updates[-1].done == updates[-1].total
    # NFE 1 and 4 on 100 samples, then the diagnostics' 100-step solve of 32 draws, call by call
    assert 100 in done and 500 in done
    straightness = [u.done for u in updates if u.info.endswith("straightness")]
    assert len(straightness) >= 100
    # adaptive solves are planned at a guess and counted as they run: the total ends at what was done
    assert updates[-1].total == updates[-1].done != updates[0].total
