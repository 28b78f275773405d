"""reflow rounds: a two-round recipe on a 2-D toy end to end, killed midway with SIGKILL and rerun."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from datasets import load_from_disk
from helpers import cli_ok, free_port
from typer.testing import CliRunner

from reflow.cli.app import app
from reflow.errors import ReflowError
from reflow.pairs import with_z0
from reflow.rounds import Recipe

RECIPE = """
name = "tiny-moons"
rounds = 2
[teacher]
data = "moons"
[pairs]
num_pairs = 512
solver = "euler"
nfe = 8
batch_size = 256
[train]
max_steps = 30
batch_size = 64
hidden_dim = 32
num_layers = 2
time_embed_dim = 16
checkpoint_every = 10
log_with = "none"
[train.round2]
lr = 5e-4
[distill]
k = 1
max_steps = 10
batch_size = 64
[eval]
nfes = [1, 2]
num_samples = 200
seeds = [1]
diagnostics_samples = 64
"""

KILL = textwrap.dedent(
    """
    import os, signal, sys
    from reflow.rounds.run import run_rounds
    def progress(update):
        if update.stage == "round-2/student" and update.done >= 15:
            os.kill(os.getpid(), signal.SIGKILL)
    run_rounds(sys.argv[1], sys.argv[2], progress=progress)
    """
)


@pytest.mark.slow  # SIGKILL / torchrun: runs in CI's second step (pytest -m slow)
def test_two_rounds_killed_midway_resume_and_complete(tmp_path):
    recipe, run = tmp_path / "recipe.toml", tmp_path / "run"
    recipe.write_text(RECIPE)
    killed = subprocess.run([sys.executable, "-c", KILL, str(recipe), str(run)], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    before = json.loads((run / "manifest.json").read_text())
    assert not before["complete"]
    assert {"round-1/student", "round-1/report", "round-2/pairs"} <= set(before["stages"])
    # the killed stage is not done (it may hold a running record: its time so far)
    assert before["stages"].get("round-2/student", {}).get("status") in (None, "running")
    assert (run / "round-2" / "student.checkpoints").is_dir()  # killed after the step-10 checkpoint

    r = CliRunner().invoke(app, ["rounds", "--config", str(recipe), "--out", str(run)])
    assert r.exit_code == 0, r.output
    after = json.loads((run / "manifest.json").read_text())
    assert after["complete"] and after["recipe_digest"] == before["recipe_digest"]
    # finished stages were skipped, not redone
    for name in ("round-1/student", "round-1/report", "round-2/pairs"):
        assert after["stages"][name] == before["stages"][name]
    stages = {"round-1/student", "heldout", "round-1/report", "round-2/pairs", "round-2/student", "round-2/report"}
    assert stages | {"distill/student", "distill/report"} == set(after["stages"])
    assert all(s["status"] == "done" for s in after["stages"].values())
    assert after["stages"]["round-2/student"]["steps"] == 30
    assert not (run / "round-2" / "student.checkpoints").exists()
    # round 2 learned from round 1's pairs, initialised from round 1, with its own override
    card = (run / "round-2" / "student" / "README.md").read_text()
    assert str(run / "round-1" / "student") in card and '"lr": 0.0005' in card
    provenance = json.loads((run / "round-2" / "pairs" / "reflow_pairs.json").read_text())
    assert provenance["teacher"]["teacher"] == str((run / "round-1" / "student").resolve())
    for k in (1, 2):
        m = json.loads((run / f"round-{k}" / "manifest.json").read_text())
        assert m["round"] == k and all(n.startswith(f"round-{k}/") for n in m["stages"])
    table = json.loads((run / "report" / "metrics.json").read_text())
    assert [m["name"] for m in table["models"]] == ["round-1", "round-2", "distill-k1"]
    # From data, fidelity is to 1-RF (the teacher of every later round): its held-out Euler-8 pairs,
    # drawn from other noise than round 2's pairs; checked against a plain `reflow sample` of round 2.
    held = json.loads((run / "heldout" / "reflow_pairs.json").read_text())
    assert held["teacher"]["teacher"] == str((run / "round-1" / "student").resolve())
    assert (held["teacher"]["solver"], held["teacher"]["nfe"]) == ("euler", 8)
    ds, r2 = with_z0(load_from_disk(str(run / "heldout")))[:], with_z0(load_from_disk(str(run / "round-2" / "pairs")))
    z0, z1 = ds["z0"].numpy(), ds["z1"].numpy()
    assert not np.isin(z0[:, 0], r2[:]["z0"][:, 0].numpy()).any()
    np.save(tmp_path / "z0.npy", z0)
    out = tmp_path / "x.npy"
    cli_ok("sample", "--model", run / "round-2" / "student", "--nfe", 1, "--noise", tmp_path / "z0.npy", "--out", out)
    mse = float(((np.load(out) - z1) ** 2).mean())
    assert 0 < mse < 0.5
    assert table["models"][1]["nfe"]["1"]["mse_teacher"] == pytest.approx(mse, rel=1e-4)
    assert table["models"][1]["cpu_minutes"] is not None  # the resumed stage is timed from the rerun
    assert "round-2" in r.output and "distill-k1" in r.output
    assert (run / "report" / "report.md").is_file() and (run / "report" / "quality_vs_nfe.png").is_file()

    # A third run finds everything done and changes nothing; another recipe is refused.
    r = CliRunner().invoke(app, ["rounds", "--config", str(recipe), "--out", str(run)])
    assert r.exit_code == 0 and json.loads((run / "manifest.json").read_text()) == after
    other = tmp_path / "other.toml"
    other.write_text(RECIPE.replace("rounds = 2", "rounds = 3"))
    r = CliRunner().invoke(app, ["rounds", "--config", str(other), "--out", str(run)])
    assert r.exit_code == 2 and "another recipe" in r.output


@pytest.mark.parametrize(
    "text, msg",
    [
        ("rounds = 1\n[teacher]\n", "exactly one of data"),
        ('rounds = 0\n[teacher]\ndata = "moons"\n', "rounds must be"),
        ('[teacher]\ndata = "moons"\n[train]\nmax_stepz = 3\n', "max_stepz"),
        ('[teacher]\ncheckpoint = "x"\n', "reference"),
        ('[teacher]\ndata = "moons"\n[train]\ninit = "teacher"\n', "init must be"),
        (
            'rounds = 2\n[teacher]\ndata = "moons"\n[train]\ncoupling = "ot"\n',
            "\\[train\\] coupling ot pairs noise with data",
        ),
        ('[teacher]\ndata = "moons"\n[train]\npairs_in_memory = "always"\n', "pairs_in_memory must be one of"),
        ('[teacher]\ndata = "moons"\n[pairs]\nstore_z0 = "no"\n', "store_z0"),
    ],
)
def test_bad_recipes(tmp_path, text, msg):
    path = tmp_path / "r.toml"
    path.write_text(text)
    with pytest.raises(ReflowError, match=msg):
        Recipe.from_toml(path)


def test_recipes_take_the_coupling_the_pair_reading_and_store_z0(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text(
        'rounds = 2\n[teacher]\ndata = "moons"\n[pairs]\nstore_z0 = true\n[train]\npairs_in_memory = "no"\n'
        '[train.round1]\ncoupling = "ot"\n[distill]\npairs_in_memory = "yes"\n'
    )
    recipe = Recipe.from_toml(path)
    assert recipe.pairs.store_z0 and recipe.distill.train["pairs_in_memory"] == "yes"
    assert recipe.train.for_round(1, 0)[0]["coupling"] == "ot" and "coupling" not in recipe.train.for_round(2, 0)[0]
    assert recipe.train.for_round(2, 0)[0]["pairs_in_memory"] == "no"


def test_shipped_recipes_parse():
    from pathlib import Path

    recipes = sorted(Path("data/recipes").glob("*.toml"))
    assert {r.stem for r in recipes} >= {"checkerboard", "moons", "digits", "template-32x32-gpu"}
    for r in recipes:
        recipe = Recipe.from_toml(r)
        assert recipe.rounds >= 1 and recipe.eval["nfes"]


@pytest.mark.slow  # SIGKILL / torchrun: runs in CI's second step (pytest -m slow)
def test_rounds_under_torchrun_match_one_process(tmp_path):
    """The same recipe under `torchrun --nproc_per_node 2` (gloo on CPU): pairs split by shard, training
    on the same global batches, reports on the main process; the models equal a one-process run's."""
    import os

    import torch
    from safetensors.torch import load_file

    bindir = os.path.dirname(sys.executable)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(RECIPE.replace("max_steps = 30", "max_steps = 12").replace("ema_decay", "ema_decay"))
    runs = {}
    for name, launcher in [
        ("one", [os.path.join(bindir, "reflow")]),
        ("two", [os.path.join(bindir, "torchrun"), "--nproc_per_node", "2", "--master_port", free_port(),
                 os.path.join(bindir, "reflow")]),
    ]:  # fmt: skip
        out = tmp_path / name
        r = subprocess.run(
            [*launcher, "rounds", "--config", str(recipe), "--out", str(out)],
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"},
        )
        assert r.returncode == 0, r.stderr[-4000:]
        assert json.loads((out / "manifest.json").read_text())["complete"]
        runs[name] = out
    pairs = [json.loads((runs[n] / "round-2" / "pairs" / "reflow_pairs.json").read_text()) for n in runs]
    assert pairs[0]["num_pairs"] == pairs[1]["num_pairs"] == 512
    for model in ("round-1/student", "round-2/student", "distill/student"):
        a, b = (load_file(next((runs[n] / model).glob("*.safetensors"))) for n in runs)
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-3)


def test_checkpoint_recipe_pairs_nfe_and_several_distilled_students(tmp_path):
    """A diffusers checkpoint teacher whose round-1 pairs use another NFE than its reference (the held-out
    pairs and the teacher's report keep ``nfe``), distilled to one and to two steps in one run."""
    from ddpm_helpers import save, tiny_unet
    from diffusers import DDPMScheduler

    teacher = save(tmp_path, "ddpm", tiny_unet(), DDPMScheduler(num_train_timesteps=100))
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(
        textwrap.dedent(
            f"""
            rounds = 1
            [teacher]
            checkpoint = "{teacher}"
            solver = "ddim"
            nfe = 6
            pairs_nfe = 3
            [pairs]
            num_pairs = 64
            heldout = 32
            batch_size = 32
            [train]
            max_steps = 4
            batch_size = 16
            log_with = "none"
            [distill]
            k = [1, 2]
            max_steps = 3
            batch_size = 16
            [eval]
            nfes = [1, 2]
            reference = "digits"
            num_samples = 48
            seeds = [1]
            diagnostics_samples = 16
            num_fidelity = 32
            """
        )
    )
    r = CliRunner().invoke(app, ["rounds", "--config", str(recipe), "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    run = tmp_path / "run"

    def pairs_nfe(folder):
        return json.loads((run / folder / "reflow_pairs.json").read_text())["teacher"]["nfe"]

    assert (pairs_nfe("round-1/pairs"), pairs_nfe("heldout")) == (3, 6)
    teacher_report = json.loads((run / "teacher" / "report" / "metrics.json").read_text())
    assert teacher_report["models"][0]["reference_solve"]["nfe"] == 6
    manifest = json.loads((run / "manifest.json").read_text())
    assert {f"distill-k{k}/{part}" for k in (1, 2) for part in ("student", "report")} <= set(manifest["stages"])
    assert not (run / "distill").exists()
    for k in (1, 2):
        card = (run / f"distill-k{k}" / "student" / "README.md").read_text()
        assert f'"distill_k": {k}' in card
    table = json.loads((run / "report" / "metrics.json").read_text())
    rows = {m["name"]: m for m in table["models"]}
    assert list(rows) == ["teacher", "round-1", "distill-k1", "distill-k2"]
    # each distilled student costs the round plus its own distillation, not the other's
    own = {k: manifest["stages"][f"distill-k{k}/student"]["cpu_seconds"] / 60 for k in (1, 2)}
    for k in (1, 2):
        assert rows[f"distill-k{k}"]["cpu_minutes"] == pytest.approx(rows["round-1"]["cpu_minutes"] + own[k])


@pytest.mark.parametrize("k", ["0", "[1, 1]", "[]", "1.5", "true"])
def test_bad_distill_k(tmp_path, k):
    path = tmp_path / "r.toml"
    path.write_text(f'[teacher]\ndata = "moons"\n[distill]\nk = {k}\n')
    with pytest.raises(ReflowError, match="k"):
        Recipe.from_toml(path)


SMALL = """
rounds = 1
[teacher]
data = "moons"
[pairs]
heldout = 64
solver = "euler"
nfe = 4
[train]
max_steps = 10
batch_size = 32
hidden_dim = 32
num_layers = 2
time_embed_dim = 16
checkpoint_every = 4
log_every = 1
log_with = "none"
[eval]
nfes = [1]
num_samples = 64
seeds = [1]
diagnostics_samples = 16
num_fidelity = 64
adaptive = false
"""


def test_a_killed_stage_records_its_time_and_the_rerun_adds_its_own(tmp_path, monkeypatch):
    """The manifest holds a running stage's wall and CPU seconds as it goes; the run that resumes it adds its own,
    so the stage's time counts every run that worked on it. Every update names the stage and its place in the run."""
    import reflow.rounds.stages
    from reflow.rounds.run import run_rounds

    monkeypatch.setattr(reflow.rounds.stages, "CLOCK_SECONDS", 0.0)  # record at every update
    recipe, run = tmp_path / "recipe.toml", tmp_path / "run"
    recipe.write_text(SMALL)

    class Stop(Exception):
        pass

    def stop(update):
        if update.stage == "round-1/student" and update.done >= 6:
            raise Stop  # after the step-4 checkpoint, as a kill would

    with pytest.raises(Stop):
        run_rounds(recipe, run, progress=stop)
    killed = json.loads((run / "manifest.json").read_text())["stages"]["round-1/student"]
    assert killed["status"] == "running" and killed["wall_seconds"] > 0 and killed["cpu_seconds"] > 0

    updates = []
    run_rounds(recipe, run, progress=updates.append)
    done = json.loads((run / "manifest.json").read_text())["stages"]["round-1/student"]
    assert done["status"] == "done" and done["resumed"] and done["steps"] == 10
    assert done["wall_seconds"] > killed["wall_seconds"] and done["cpu_seconds"] > killed["cpu_seconds"]
    student = [u for u in updates if u.stage == "round-1/student"]
    assert student[0].done == 4 and student[-1].done == 10 and student[0].unit == "steps"  # resumed at its checkpoint
    assert [u.stage for u in updates if u.index == 2][:1] == ["heldout"]
    assert {(u.index, u.count) for u in updates} == {(1, 3), (2, 3), (3, 3)}
    overall = [u.overall for u in updates]
    assert overall == sorted(overall) and overall[-1] == pytest.approx(1.0)
