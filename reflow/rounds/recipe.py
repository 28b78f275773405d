"""A recipe: what ``reflow rounds --config recipe.toml`` runs, read into nested dataclasses and checked once.

A recipe (TOML) names where round 1 starts, how many rounds to run, how pairs are drawn, how every round
trains, whether to distil the last student, and how to evaluate::

    rounds = 2
    [teacher]            # exactly one of: data (round 1 is 1-RF from data) or checkpoint
    checkpoint = "data/teachers/digits-ddpm"   # a diffusers DDPM checkpoint or one of our flows
    solver = "ddim"      # its solver and NFE: round 1's pairs, the held-out pairs and the teacher's report
    nfe = 50
    pairs_nfe = 10       # optional: round 1's pairs with another NFE (pairs_solver: another solver)
    [pairs]              # every round's pairs (the solver/NFE of flow teachers: the previous student)
    num_pairs = 16384
    solver = "euler"
    nfe = 16
    heldout = 1024       # held-out pairs of the starting teacher (from data: of 1-RF), for fidelity
    [train]              # reflow.student.TrainConfig names, for every round; [train.round2] overrides
    max_steps = 2000
    [distill]            # optional: distil the last round's student on its pairs
    k = 1                # or a list, k = [1, 2]: one distilled student per k, in distill-k1/, distill-k2/
    [eval]               # reflow.eval.evaluate.EvalSettings names
    nfes = [1, 2, 4]
    reference = "digits"

:meth:`Recipe.from_toml` checks every name and value before any work: types with
:mod:`reflow.folders.settings`, ranges and choices with the checks training and evaluation make when they
start. Each bad name or value is one :class:`ReflowError` line that starts with the recipe's path and names
its table, e.g. ``run.toml: [train] max_steps must be an integer, got 'abc'``.

:meth:`Recipe.digest` identifies a recipe in its run's manifest: it hashes the tables as the recipe wrote
them (with the defaults of [pairs] and [eval] filled in), so a recipe keeps the digest it always had.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

from reflow.core.noise import MAX_SEED
from reflow.core.solvers import SOLVERS, Solver
from reflow.errors import ReflowError
from reflow.eval import EvalSettings
from reflow.folders.settings import check_types, check_values, field_types, plain
from reflow.student import TrainConfig, check_config, read_toml
from reflow.teachers.scheduler import DiffusersSolver

TeacherSolver = Literal[DiffusersSolver, Solver]
"""The starting checkpoint's solver: DDIM or DPM-Solver++ for a diffusers DDPM, an ODE solver for a flow of ours."""
TEACHER_SOLVERS: tuple[str, ...] = get_args(TeacherSolver)
PairsDtype = Literal["float32", "float16"]
PAIRS_DTYPES: tuple[str, ...] = get_args(PairsDtype)
Init = Literal["auto", "fresh"]
"""Where a round's student starts: ``auto``, from the round's teacher (a flow, or a DDPM's UNet); ``fresh``."""

GUIDANCE = ("guidance_scale", "null_label", "negative_prompt", "clipped_model_output")
# The TrainConfig names a recipe leaves to the run, which sets them per round.
_SET_BY_RUN = {"out", "data", "pairs", "init", "resume", "distill_k"}
_DISTILL = {
    "k",
    "max_steps",
    "batch_size",
    "lr",
    "loss",
    "time_sampler",
    "ema_decay",
    "warmup_steps",
    "seed",
    "drop_farthest",
    "perceptual_weights",
    "pairs_in_memory",
}
_PAIRS_RECORDED = ("num_pairs", "solver", "nfe", "heldout", "batch_size")  # in the digest, written or not
_TABLES = ("teacher", "pairs", "train", "distill", "eval")
_TOP_TYPES: dict[str, Any] = {"rounds": int, "seed": int, "name": str, **dict.fromkeys(_TABLES, dict)}


@dataclass(frozen=True, kw_only=True)
class _Table:
    """A recipe table; ``written`` names the settings its digest records: those the recipe gave, and the
    defaults earlier versions recorded."""

    written: tuple[str, ...] = field(default=(), repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.written}


@dataclass(frozen=True)
class TeacherSpec(_Table):
    """[teacher]: where round 1 starts, ``data`` (round 1 is 1-RF from it) or ``checkpoint``."""

    data: str | None = None
    checkpoint: str | None = None  # a diffusers checkpoint or a flow of ours
    solver: TeacherSolver = "ddim"  # the checkpoint's: its held-out pairs, its report, round 1's pairs
    nfe: int = 50
    pairs_solver: TeacherSolver | None = None  # round 1's pairs with another solver (default: solver)
    pairs_nfe: int | None = None  # round 1's pairs with another NFE (default: nfe)
    # the checkpoint's guidance, in the pairs it draws (a student of ours has it baked in)
    guidance_scale: float | None = None
    null_label: int | None = None
    negative_prompt: str | None = None
    clipped_model_output: bool | None = None

    @classmethod
    def from_table(cls, table: dict[str, Any], where: str) -> TeacherSpec:
        _check_table(cls, table, where, "teacher")
        spec = cls(**table, written=tuple(table))
        spec.check(where)
        return spec

    def check(self, where: str) -> None:
        if (self.data is None) == (self.checkpoint is None):
            raise ReflowError(f"{where}: [teacher] needs exactly one of data = SOURCE or checkpoint = PATH")
        if self.data is not None and (self.pairs_solver is not None or self.pairs_nfe is not None):
            raise ReflowError(f"{where}: [teacher] pairs_solver / pairs_nfe need checkpoint = PATH, not data")
        for key in ("solver", "pairs_solver"):
            if getattr(self, key) not in (*TEACHER_SOLVERS, None):
                choices = ", ".join(TEACHER_SOLVERS)
                raise ReflowError(f"{where}: [teacher] {key} must be one of {choices}, got {getattr(self, key)!r}")
        for key in ("nfe", "pairs_nfe"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ReflowError(f"{where}: [teacher] {key} must be at least 1, got {getattr(self, key)}")
        scale, null = self.guidance_scale, self.null_label
        if scale is not None and not 0 <= scale < math.inf:
            raise ReflowError(f"{where}: [teacher] guidance_scale must be a finite number >= 0, got {scale}")
        if null is not None and null < 0:
            raise ReflowError(f"{where}: [teacher] null_label must be a class index >= 0, got {null}")

    def round1_pairs(self) -> tuple[str, int]:
        """The solver and NFE of round 1's pairs."""
        solver = self.solver if self.pairs_solver is None else self.pairs_solver
        return solver, self.nfe if self.pairs_nfe is None else self.pairs_nfe

    def guidance(self) -> dict[str, Any]:
        """The guidance settings the recipe gives, as ``load_teacher`` takes them."""
        return {key: getattr(self, key) for key in GUIDANCE if getattr(self, key) is not None}


@dataclass(frozen=True)
class PairsSpec(_Table):
    """[pairs]: every round's pairs (round 1 from a checkpoint: with the teacher's solver and NFE)."""

    num_pairs: int = 10_000
    solver: Solver = "euler"  # a flow teacher's (the previous round's student)
    nfe: int = 16
    heldout: int = 1024  # held-out pairs of the starting teacher (from data: of 1-RF); 0: none
    batch_size: int = 1024
    dtype: PairsDtype = "float32"
    labels: list[int] | None = None  # a class-conditional teacher's labels (default: all its classes)
    prompts: str | None = None  # a text-to-image teacher's prompts: a text file or a datasets folder
    store_embeddings: bool = True
    store_z0: bool = False  # z0 is rebuilt from (seed, index) unless stored

    @classmethod
    def from_table(cls, table: dict[str, Any], where: str) -> PairsSpec:
        _check_table(cls, table, where, "pairs")
        spec = cls(**table, written=tuple(dict.fromkeys([*_PAIRS_RECORDED, *table])))
        spec.check(where)
        return spec

    def check(self, where: str) -> None:
        for key in ("num_pairs", "nfe", "batch_size"):
            if getattr(self, key) < 1:
                raise ReflowError(f"{where}: [pairs] {key} must be at least 1, got {getattr(self, key)}")
        if self.heldout < 0:
            raise ReflowError(f"{where}: [pairs] heldout must be 0 (no held-out pairs) or more, got {self.heldout}")
        if self.solver not in SOLVERS:
            raise ReflowError(f"{where}: [pairs] solver must be one of {', '.join(SOLVERS)}, got {self.solver!r}")
        if self.dtype not in PAIRS_DTYPES:
            raise ReflowError(f"{where}: [pairs] dtype must be {' or '.join(PAIRS_DTYPES)}, got {self.dtype!r}")
        if any(label < 0 for label in self.labels or []):
            raise ReflowError(f"{where}: [pairs] labels must be class indices >= 0, got {self.labels}")


@dataclass(frozen=True)
class TrainSpec:
    """[train]: TrainConfig keywords for every round (and ``init``: auto or fresh), and [train.roundK]: those
    round K changes."""

    every_round: dict[str, Any] = field(default_factory=dict)
    per_round: dict[int, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_table(cls, table: dict[str, Any], rounds: int, where: str, from_data: bool = True) -> TrainSpec:
        """``from_data``: round 1 trains from data (the teacher is a data source), else on pairs."""
        every_round, per_round = dict(table), {}
        for key in [k for k in every_round if k.startswith("round")]:
            value = every_round.pop(key)
            if not key[5:].isdigit() or not isinstance(value, dict):
                raise ReflowError(f"{where}: [train.{key}] must be a table named round1, round2, ...")
            if not 1 <= int(key[5:]) <= rounds:
                raise ReflowError(f"{where}: [train.{key}] never applies: rounds = {rounds}; drop it or raise rounds")
            per_round[int(key[5:])] = value
        source = "data" if from_data else "pairs"
        _check_train_table(every_round, where, "train", source=source)
        if from_data and any(k not in per_round for k in range(2, rounds + 1)):  # later rounds train on pairs
            _check_train_table(every_round, where, "train", source="pairs")
        for k, overrides in per_round.items():
            _check_train_table(
                overrides, where, f"train.round{k}", every_round, "data" if k == 1 and from_data else "pairs"
            )
        return cls(every_round, per_round)

    def for_round(self, k: int, seed: int) -> tuple[dict[str, Any], Init]:
        """Round k's TrainConfig keywords (``seed`` unless the recipe sets one) and where its student starts."""
        settings = {**self.every_round, **self.per_round.get(k, {})}
        init = settings.pop("init", "auto")
        settings.setdefault("seed", seed)
        return settings, init


@dataclass(frozen=True)
class DistillSpec:
    """[distill]: the last round's student distilled on its pairs into a k-step student, for each k."""

    k: list[int]
    train: dict[str, Any]  # TrainConfig keywords
    k_as_written: int | list[int] | None = None  # 1, [1, 2] or absent (k = 1): the digest records it so

    @classmethod
    def from_table(cls, table: dict[str, Any], where: str) -> DistillSpec:
        _unknown(table, _DISTILL, where, "distill")
        ks = table.get("k", 1)
        listed = ks if isinstance(ks, list) else [ks]
        if not listed or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in listed):
            raise ReflowError(f"{where}: [distill] k must be a positive integer or a list of them, got {ks!r}")
        if len(set(listed)) != len(listed):
            raise ReflowError(f"{where}: [distill] k lists {ks!r} with a repeat; name each k once")
        rest = {key: value for key, value in table.items() if key != "k"}
        check_values(TrainConfig, rest, where, "distill", choices=False)
        _check_training(rest, where, "distill", pairs="recipe", init="recipe", distill_k=listed[0])
        return cls(k=listed, train=rest, k_as_written=table.get("k"))

    def folder(self, k: int) -> str:
        """The run folder of the k-step student: ``distill`` for one k, ``distill-kK`` per K of a list."""
        return f"distill-k{k}" if isinstance(self.k_as_written, list) else "distill"

    def as_dict(self) -> dict[str, Any]:
        return {**self.train, **({} if self.k_as_written is None else {"k": self.k_as_written})}


@dataclass(frozen=True)
class Recipe:
    """A checked recipe; ``Recipe.from_toml(path)`` reads one. ``eval`` holds EvalSettings keywords."""

    teacher: TeacherSpec
    pairs: PairsSpec
    train: TrainSpec
    eval: dict[str, Any]
    distill: DistillSpec | None = None
    rounds: int = 1
    seed: int = 0
    name: str = "run"

    @classmethod
    def from_toml(cls, path: str | Path) -> Recipe:
        path = Path(path)
        if not path.is_file():
            raise ReflowError(f"no such recipe: {path} (see data/recipes/ for examples)")
        return cls.from_dict(read_toml(path), where=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "recipe") -> Recipe:
        """Check every name and value before any work; every error line starts with ``where``, the recipe's
        path."""
        rounds, seed = _check_top(raw, where)
        teacher = TeacherSpec.from_table(dict(raw.get("teacher", {})), where)
        pairs = PairsSpec.from_table(raw.get("pairs", {}), where)
        train = TrainSpec.from_table(raw.get("train", {}), rounds, where, from_data=teacher.data is not None)
        distill = None
        if raw.get("distill") is not None:
            distill = DistillSpec.from_table(raw["distill"], where)
            if teacher.data is not None and rounds < 2:
                raise ReflowError(
                    f"{where}: [distill] needs pairs, and round 1 from data trains without: set rounds >= 2"
                )
        settings = _eval_settings(raw.get("eval", {}), teacher.data, where)
        name = str(raw.get("name", "run"))
        return cls(teacher, pairs, train, settings, distill, rounds=rounds, seed=int(seed), name=name)

    def as_dict(self) -> dict[str, Any]:
        """The recipe as its manifest records it."""
        return {
            "name": self.name,
            "rounds": self.rounds,
            "seed": self.seed,
            "teacher": self.teacher.as_dict(),
            "pairs": self.pairs.as_dict(),
            "train": self.train.every_round,
            "round_train": {str(k): v for k, v in sorted(self.train.per_round.items())},
            "distill": None if self.distill is None else self.distill.as_dict(),
            "eval": self.eval,
        }

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()[:16]


def _unknown(table: dict[str, Any], known: set[str], where: str, label: str = "") -> None:
    extra = sorted(set(table) - known)
    if extra:
        names, choices = ", ".join(extra), ", ".join(sorted(known))
        place = f"[{label}]" if label else "top level:"
        raise ReflowError(f"{where}: {place} unknown setting(s) {names} (known: {choices})")


def _check_table(spec: type, table: dict[str, Any], where: str, label: str) -> None:
    """Names and types of a table that fills dataclass ``spec``: a choice is checked as a string here and
    named by the spec's own check; TOML has no null."""
    types = {name: plain(tp, optional=False) for name, tp in field_types(spec).items() if name != "written"}
    _unknown(table, set(types), where, label)
    check_types(table, types, where, label)


def _check_top(raw: dict[str, Any], where: str) -> tuple[int, int]:
    """The top-level names and types; returns the number of rounds and the seed."""
    _unknown(raw, {"rounds", "seed", "name", *_TABLES}, where)
    check_types(raw, _TOP_TYPES, where)
    rounds = raw.get("rounds", 1)
    if rounds < 1:
        raise ReflowError(f"{where}: rounds must be a positive integer, got {rounds!r}")
    seed = raw.get("seed", 0)
    if not 0 <= seed <= MAX_SEED - rounds:
        raise ReflowError(f"{where}: seed must be in [0, {MAX_SEED - rounds}], got {seed}")
    return rounds, seed


def _names(message: str) -> str:
    """A training or evaluation error as a recipe names things: ``--max-steps`` -> ``max_steps``."""
    return re.sub(r"--([a-z][a-z-]*)", lambda m: m[1].replace("-", "_"), message)


def _check_train_table(
    table: dict[str, Any], where: str, label: str, every_round: dict[str, Any] | None = None, source: str = "data"
) -> None:
    """[train] (or [train.roundK], checked merged with ``every_round``): TrainConfig's names and types, init,
    and the checks training makes before it starts (``source``: ``data`` or ``pairs``, what it trains on)."""
    known = {f.name for f in fields(TrainConfig)} - _SET_BY_RUN
    _unknown(table, known | {"init"}, where, label)
    check_values(TrainConfig, table, where, label, choices=False)
    if table.get("init", "auto") not in get_args(Init):
        raise ReflowError(f"{where}: [{label}] init must be auto (the round's teacher) or fresh")
    merged = {**(every_round or {}), **table}
    _check_training({k: v for k, v in merged.items() if k != "init"}, where, label, **{source: "recipe"})


def _check_training(values: dict[str, Any], where: str, label: str, **paths: Any) -> None:
    """The checks training makes of its settings before it starts (ranges, choices), made now."""
    try:
        check_config(TrainConfig(out="recipe", **paths, **values))
    except ReflowError as e:
        raise ReflowError(f"{where}: [{label}] {_names(str(e))}") from None


def _eval_settings(table: dict[str, Any], data: str | None, where: str) -> dict[str, Any]:
    """[eval] as EvalSettings keywords, with the default NFEs and reference (the teacher's data)."""
    settings = dict(table)
    _unknown(settings, {f.name for f in fields(EvalSettings)} - {"heldout"}, where, "eval")
    check_values(EvalSettings, settings, where, "eval", choices=False)
    settings.setdefault("nfes", [1, 2, 4])
    settings.setdefault("reference", data)
    if settings["reference"] is None:
        raise ReflowError(f"{where}: [eval] needs reference = SOURCE (the real data to compare with)")
    try:
        EvalSettings(**settings).check()
    except ReflowError as e:
        raise ReflowError(f"{where}: [eval] {_names(str(e))}") from None
    return settings
