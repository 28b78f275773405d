"""Settings from TOML files are checked, value by value, before any work: one ReflowError line that names the
file, the table and the key (reflow.folders.settings, TrainConfig.from_toml, Recipe.from_toml)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
from helpers import one_error_line
from typer.testing import CliRunner

from reflow.cli.app import app
from reflow.errors import ReflowError
from reflow.folders.settings import check_values, plain
from reflow.rounds import Recipe
from reflow.rounds.quickstart import quickstart_recipe
from reflow.student import TrainConfig, read_toml

runner = CliRunner()
RECIPE = 'name = "t"\nrounds = 2\n[teacher]\ndata = "moons"\n'


@dataclass
class Example:
    count: int = 1
    rate: float = 0.1
    name: str = "x"
    flag: bool = False
    limit: int | None = None
    nfes: list[int] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    mode: Literal["a", "b"] = "a"


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("count", "abc", "count must be an integer, got 'abc'"),
        ("count", True, "count must be an integer, got true"),  # a bool is no integer here
        ("count", 1.5, "count must be an integer, got 1.5"),
        ("rate", "0.1", "rate must be a number, got '0.1'"),
        ("rate", False, "rate must be a number, got false"),
        ("name", ["a"], "name must be a string, got ['a']"),
        ("flag", 1, "flag must be true or false, got 1"),
        ("limit", "3", "limit must be an integer, got '3'"),
        ("nfes", 4, "nfes must be a list of integers, got 4"),
        ("nfes", [1, "2"], "nfes must be a list of integers, got [1, '2']"),
        ("nfes", [1, True], "nfes must be a list of integers, got [1, True]"),
        ("extra", "x", "extra must be a table, got 'x'"),
        ("mode", "c", "mode must be one of 'a', 'b', got 'c'"),
        ("mode", 3, "mode must be a string, got 3"),  # not even a string: told the type, not the choices
    ],
)
def test_check_values_refuses(key, value, words):
    with pytest.raises(ReflowError) as e:
        check_values(Example, {key: value}, "f.toml", "t")
    assert str(e.value) == f"f.toml: [t] {words}"


def test_check_values_accepts_and_converts():
    values = {"count": 3, "rate": 1, "name": "n", "flag": True, "limit": None, "nfes": [1, 2], "extra": {"a": 1}}
    out = check_values(Example, {**values, "mode": "b", "not_a_field": object}, "f.toml")
    assert out["rate"] == 1.0 and isinstance(out["rate"], float)  # an integer where a float is wanted
    assert {k: out[k] for k in values} == {**values, "rate": 1.0}
    assert check_values(Example, {"limit": 4}, "f.toml") == {"limit": 4}


def test_plain_leaves_the_choice_to_its_owner():
    assert check_values(Example, {"mode": "c"}, "f.toml", choices=False) == {"mode": "c"}
    with pytest.raises(ReflowError, match=r"^f.toml: mode must be a string, got 3$"):
        check_values(Example, {"mode": 3}, "f.toml", choices=False)
    assert plain(Literal["a", "b"] | None) == (str | None) and plain(Literal["a"] | None, optional=False) is str
    assert plain(list[int] | None, optional=False) == list[int]


def test_every_bad_value_of_a_table_in_one_line():
    with pytest.raises(ReflowError) as e:
        check_values(Example, {"count": "a", "rate": "b"}, "f.toml")
    assert str(e.value) == "f.toml: count must be an integer, got 'a'; rate must be a number, got 'b'"


# --- reflow train --config -------------------------------------------------------------------------------


def test_train_config_types(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('max-steps = 3\nlr = 1\nlog_with = "none"\nhuber_c = 2\n')
    config = TrainConfig.from_toml(path, out="m", batch_size=8, seed=None)
    assert (config.max_steps, config.lr, config.batch_size, config.seed, config.huber_c) == (3, 1.0, 8, 0, 2.0)
    assert isinstance(config.lr, float) and isinstance(config.huber_c, float)
    for text, words in [
        ('max_steps = "abc"', "max_steps must be an integer, got 'abc'"),
        ("max_steps = true", "max_steps must be an integer, got true"),
        ('log_with = ["none"]', "log_with must be a string, got ['none']"),
        ("resume = 1", "resume must be true or false, got 1"),
        ('lr = "1e-3"', "lr must be a number, got '1e-3'"),
        ('huber_c = "x"', "huber_c must be a number, got 'x'"),
    ]:
        path.write_text(text + "\n")
        with pytest.raises(ReflowError) as e:
            TrainConfig.from_toml(path, out="m")
        assert str(e.value) == f"{path}: {words}"
    path.write_text("")
    with pytest.raises(ReflowError, match="^command line: max_steps must be an integer, got '3'$"):
        TrainConfig.from_toml(path, out="m", max_steps="3")


def test_read_toml_one_line(tmp_path):
    path = tmp_path / "c.toml"
    path.write_bytes(b"lr = '\xff'\n")
    with pytest.raises(ReflowError, match="not UTF-8"):
        read_toml(path)
    path.write_text("lr = \n")
    with pytest.raises(ReflowError, match="not valid TOML"):
        read_toml(path)


def test_cli_train_bad_config(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('max_steps = "abc"\n')
    out = tmp_path / "model"
    r = runner.invoke(app, ["train", "--config", str(config), "--data", "moons", "--out", str(out)])
    assert one_error_line(r) == f"error: {config}: max_steps must be an integer, got 'abc'"
    assert not out.exists()


# --- reflow rounds --config --------------------------------------------------------------------------------

BAD_RECIPES = [
    ('[train]\nmax_steps = "abc"\n', "[train] max_steps must be an integer, got 'abc'"),
    ("[train]\nmax_steps = true\n", "[train] max_steps must be an integer, got true"),
    ("[train]\nmax_steps = 0\n", "[train] max_steps must be at least 1, got 0"),
    ('[train]\nlr = "fast"\n', "[train] lr must be a number, got 'fast'"),
    ("[train]\nlr = -1.0\n", "[train] lr must be positive, got -1.0"),
    ('[train]\nmixed_precision = "fp8"\n', "[train] mixed_precision must be one of no, fp16, bf16"),
    ("[train]\nseed = -1\n", "[train] seed must be in [0, 4294967295], got -1"),
    ('[train.round2]\nbatch_size = "8"\n', "[train.round2] batch_size must be an integer, got '8'"),
    ("[train.round2]\nema_decay = 1.5\n", "[train.round2] ema_decay must be in [0, 1), got 1.5"),
    ("[train.round3]\nlr = 0.1\n", "[train.round3] never applies: rounds = 2"),
    ("[train]\nmax_stepz = 3\n", "[train] unknown setting(s) max_stepz"),
    ("[pairs]\nnum_pairs = 0\n", "[pairs] num_pairs must be at least 1, got 0"),
    ('[pairs]\nnfe = "16"\n', "[pairs] nfe must be an integer, got '16'"),
    ("[pairs]\nheldout = -1\n", "[pairs] heldout must be 0 (no held-out pairs) or more, got -1"),
    ("[pairs]\nbatch_size = 2.5\n", "[pairs] batch_size must be an integer, got 2.5"),
    ('[pairs]\nsolver = "rk4"\n', "[pairs] solver must be one of euler, heun, adaptive, got 'rk4'"),
    ('[pairs]\ndtype = "bfloat16"\n', "[pairs] dtype must be float32 or float16, got 'bfloat16'"),
    ('[pairs]\nlabels = [1, "2"]\n', "[pairs] labels must be a list of integers, got [1, '2']"),
    ('[pairs]\nstore_embeddings = "yes"\n', "[pairs] store_embeddings must be true or false, got 'yes'"),
    ("[pairs]\nprompts = 3\n", "[pairs] prompts must be a string, got 3"),
    ("[pairs]\nnum_pairz = 3\n", "[pairs] unknown setting(s) num_pairz"),
    ("[distill]\nk = 1\nlr = 0.0\n", "[distill] lr must be positive, got 0.0"),
    ('[distill]\nk = 1\nmax_steps = "9"\n', "[distill] max_steps must be an integer, got '9'"),
    ('[distill]\nk = 1\nloss = "l1"\n', "[distill] loss must be one of auto"),
    ("[eval]\nnfes = 1\n", "[eval] nfes must be a list of integers, got 1"),
    ("[eval]\nnfes = [0, 1]\n", "[eval] nfe needs positive step counts"),
    ('[eval]\nnum_samples = "many"\n', "[eval] num_samples must be an integer, got 'many'"),
    ("[eval]\nnum_samples = 1\n", "[eval] num_samples must be at least 2, got 1"),
    ("[eval]\nreference = 3\n", "[eval] reference must be a string, got 3"),
    ("[eval]\nadaptive = 1\n", "[eval] adaptive must be true or false, got 1"),
    ("[eval]\nnfez = [1]\n", "[eval] unknown setting(s) nfez"),
]


@pytest.mark.parametrize("table, words", BAD_RECIPES)
def test_bad_recipe_values(tmp_path, table, words):
    path = tmp_path / "bad.toml"
    path.write_text(RECIPE + table)
    with pytest.raises(ReflowError) as e:
        Recipe.from_toml(path)
    assert str(e.value).startswith(f"{path}: {words}"), str(e.value)


@pytest.mark.parametrize(
    "text, words",
    [
        ('rounds = "2"\n[teacher]\ndata = "moons"\n', "rounds must be an integer, got '2'"),
        ('rounds = true\n[teacher]\ndata = "moons"\n', "rounds must be an integer, got true"),
        ('seed = 1.0\n[teacher]\ndata = "moons"\n', "seed must be an integer, got 1.0"),
        ('seed = -1\n[teacher]\ndata = "moons"\n', "seed must be in [0, "),
        ('name = 7\n[teacher]\ndata = "moons"\n', "name must be a string, got 7"),
        ('eval = 3\n[teacher]\ndata = "moons"\n', "eval must be a table, got 3"),
        ('roundz = 2\n[teacher]\ndata = "moons"\n', "top level: unknown setting(s) roundz"),
        ("[teacher]\ndata = 3\n", "[teacher] data must be a string, got 3"),
        ('[teacher]\ncheckpoint = "x"\nnfe = "50"\n', "[teacher] nfe must be an integer, got '50'"),
        ('[teacher]\ncheckpoint = "x"\nnfe = 0\n', "[teacher] nfe must be at least 1, got 0"),
        ('[teacher]\ncheckpoint = "x"\nsolver = "ddpm"\n', "[teacher] solver must be one of ddim, dpm, euler"),
        ('[teacher]\ncheckpoint = "x"\nguidance_scale = "2"\n', "[teacher] guidance_scale must be a number"),
        ('[teacher]\ncheckpoint = "x"\nguidance_scale = -1\n', "[teacher] guidance_scale must be a finite"),
        ('[teacher]\ncheckpoint = "x"\nnull_label = 1.0\n', "[teacher] null_label must be an integer, got 1.0"),
        ('[teacher]\ncheckpoint = "x"\nclipped_model_output = 1\n', "[teacher] clipped_model_output must be true"),
        ('[teacher]\ncheckpoint = "x"\nsteps = 1\n', "[teacher] unknown setting(s) steps"),
        ('[teacher]\ndata = "moons"\n[distill]\nk = 1\n', "[distill] needs pairs"),  # round 1 from data: no pairs
    ],
)
def test_bad_recipe_top_and_teacher(tmp_path, text, words):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ReflowError) as e:
        Recipe.from_toml(path)
    assert str(e.value).startswith(f"{path}: {words}"), str(e.value)


def test_recipe_errors_name_the_caller():
    with pytest.raises(ReflowError, match=r"^quickstart: \[train\] max_steps must be an integer"):
        Recipe.from_dict({"teacher": {"data": "moons"}, "train": {"max_steps": "3"}}, where="quickstart")


def bad_round_2(tmp_path):
    recipe = tmp_path / "bad.toml"
    tiny = "[pairs]\nnum_pairs = 64\nheldout = 0\n[train]\nmax_steps = 2\nbatch_size = 16\nlog_with = 'none'\n"
    recipe.write_text(RECIPE + tiny + "[train.round2]\nlr = 'x'\n[eval]\nnum_samples = 16\n")
    out = tmp_path / "run"
    return recipe, out, runner.invoke(app, ["rounds", "--config", str(recipe), "--out", str(out)])


def test_cli_rounds_refuses_before_round_1(tmp_path):
    """A bad value of round 2 is found before round 1 trains: nothing is trained or written."""
    recipe, out, r = bad_round_2(tmp_path)
    line = one_error_line(r)
    assert line.startswith(f"error: {recipe}: ") and line.endswith("lr must be a number, got 'x'")
    assert not (out / "round-1" / "student").exists() and not list(out.rglob("*.safetensors"))


def test_cli_error_keeps_the_table_name(tmp_path):
    recipe, _, r = bad_round_2(tmp_path)
    assert one_error_line(r) == f"error: {recipe}: [train.round2] lr must be a number, got 'x'"


@pytest.mark.parametrize(
    "raw, digest",
    [
        ({"name": "t", "rounds": 2, "teacher": {"data": "moons"}}, "c2376fa7152a7129"),
        (
            {
                "teacher": {"checkpoint": "x", "solver": "dpm", "nfe": 6, "pairs_nfe": 3, "pairs_solver": "ddim"},
                "pairs": {"labels": [1, 2], "dtype": "float16", "store_embeddings": False},
                "distill": {"k": [1, 2], "seed": 4},
                "eval": {"reference": "digits", "nfes": [1]},
            },
            "1b8f445e482d2301",
        ),
        (  # integers where numbers are wanted are recorded as written
            {
                "rounds": 2,
                "teacher": {"data": "moons", "guidance_scale": 2},
                "train": {"lr": 1, "grad_clip": 2, "round2": {"seed": 3, "init": "fresh"}},
                "distill": {"k": 2, "lr": 1},
                "pairs": {"batch_size": 7},
            },
            "12fd9782ac22001b",
        ),
    ],
)
def test_recipe_digest_never_changes(raw, digest):
    """A run's manifest holds its recipe's digest and a rerun with another digest is refused, so the digest of a
    recipe must stay what earlier versions computed (these were computed before the recipe became dataclasses)."""
    assert Recipe.from_dict(raw).digest() == digest


def test_shipped_recipes_and_quickstart_parse():
    recipes = sorted((Path(__file__).resolve().parents[2] / "data" / "recipes").glob("*.toml"))
    assert len(recipes) >= 5
    for path in recipes:
        Recipe.from_toml(path)
    quickstart_recipe()
    quickstart_recipe(steps=1, num_pairs=1, num_eval=2)  # the smallest budgets the CLI accepts
