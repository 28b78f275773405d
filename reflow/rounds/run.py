"""Iterated reflow from one recipe: teacher -> pairs -> student -> report, round after round.

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
    [train]              # reflow.student.loop.TrainConfig names, for every round; [train.round2] overrides
    max_steps = 2000
    [distill]            # optional: distil the last round's student on its pairs
    k = 1                # or a list, k = [1, 2]: one distilled student per k, in distill-k1/, distill-k2/
    [eval]               # reflow.eval.evaluate.EvalSettings names
    nfes = [1, 2, 4]
    reference = "digits"

Layout of RUN: ``round-k/{pairs, student, report, manifest.json}`` (round 1 from data has no pairs),
``heldout/`` (the starting teacher's held-out pairs; from data, 1-RF's with the [pairs] solver),
``teacher/report`` (a checkpoint teacher at its own solver's NFEs), ``distill/{student, report}``
(``distill-kK/`` per K for a list of k), ``report/`` (one table across rounds) and ``manifest.json``. The
student of round k is the teacher of round k + 1. Every stage writes its output atomically or resumes
itself (pairs by shard, training from its last checkpoint), so a run killed at any point and rerun with
the same command skips what is finished and resumes what is not.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from reflow.errors import ReflowError
from reflow.eval.evaluate import EvalSettings, Evaluation, evaluate
from reflow.eval.report import write_report
from reflow.folders.io import atomic_write_json, claim_output, mark_output
from reflow.folders.kinds import is_diffusers_checkpoint
from reflow.folders.settings import check_types, check_values
from reflow.student.loop import TrainConfig, latest_checkpoint, read_toml, train
from reflow.version import __version__

Progress = Callable[..., None]
"""``progress(stage, done, total, info="")``."""

_TOP = {"rounds", "seed", "teacher", "pairs", "train", "distill", "eval", "name"}
_GUIDANCE = ("guidance_scale", "null_label", "negative_prompt", "clipped_model_output")  # the starting checkpoint's
_TEACHER = {"data", "checkpoint", "solver", "nfe", "pairs_solver", "pairs_nfe", *_GUIDANCE}
_PAIRS = {"num_pairs", "solver", "nfe", "heldout", "batch_size", "dtype", "labels", "prompts", "store_embeddings"}
_DISTILL = {"k", "max_steps", "batch_size", "lr", "loss", "time_sampler", "ema_decay", "warmup_steps", "seed"}
# The type of each setting outside [train], [distill] and [eval] (those take TrainConfig's and EvalSettings').
_TYPES: dict[str, dict[str, Any]] = {
    "": {
        "rounds": int,
        "seed": int,
        "name": str,
        **dict.fromkeys(["teacher", "pairs", "train", "distill", "eval"], dict),
    },
    "teacher": {
        **dict.fromkeys(["data", "checkpoint", "solver", "pairs_solver", "negative_prompt"], str),
        **dict.fromkeys(["nfe", "pairs_nfe", "null_label"], int),
        "guidance_scale": float,
        "clipped_model_output": bool,
    },
    "pairs": {
        **dict.fromkeys(["num_pairs", "nfe", "heldout", "batch_size"], int),
        **dict.fromkeys(["solver", "dtype", "prompts"], str),
        "labels": list[int],
        "store_embeddings": bool,
    },
}


def _unknown(table: dict[str, Any], known: set[str], where: str, label: str = "") -> None:
    extra = sorted(set(table) - known)
    if extra:
        names, choices = ", ".join(extra), ", ".join(sorted(known))
        place = f"[{label}]" if label else "top level:"
        raise ReflowError(f"{where}: {place} unknown setting(s) {names} (known: {choices})")


def _names(message: str) -> str:
    """A training or evaluation error as a recipe names things: ``--max-steps`` -> ``max_steps``."""
    return re.sub(r"--([a-z][a-z-]*)", lambda m: m[1].replace("-", "_"), message)


def _check_train(values: dict[str, Any], where: str, label: str, **paths: Any) -> None:
    """The checks training makes of its settings before it starts (ranges, choices), made now."""
    from reflow.core.noise import MAX_SEED
    from reflow.student.loop import _check

    try:
        config = TrainConfig(out="recipe", **paths, **values)
        _check(config)
    except ReflowError as e:
        raise ReflowError(f"{where}: [{label}] {_names(str(e))}") from None
    if not 0 <= config.seed <= MAX_SEED:
        raise ReflowError(f"{where}: [{label}] seed must be in [0, {MAX_SEED}], got {config.seed}")


def _check_teacher(teacher: dict[str, Any], where: str) -> None:
    from reflow.core.solvers import SOLVERS
    from reflow.teachers.ddpm import DIFFUSERS_SOLVERS

    if ("data" in teacher) == ("checkpoint" in teacher):
        raise ReflowError(f"{where}: [teacher] needs exactly one of data = SOURCE or checkpoint = PATH")
    if "data" in teacher and ({"pairs_solver", "pairs_nfe"} & set(teacher)):
        raise ReflowError(f"{where}: [teacher] pairs_solver / pairs_nfe need checkpoint = PATH, not data")
    for key in ("solver", "pairs_solver"):
        if key in teacher and teacher[key] not in (*DIFFUSERS_SOLVERS, *SOLVERS):
            choices = ", ".join((*DIFFUSERS_SOLVERS, *SOLVERS))
            raise ReflowError(f"{where}: [teacher] {key} must be one of {choices}, got {teacher[key]!r}")
    for key in ("nfe", "pairs_nfe"):
        if teacher.get(key, 1) < 1:
            raise ReflowError(f"{where}: [teacher] {key} must be at least 1, got {teacher[key]}")
    if not 0 <= teacher.get("guidance_scale", 0) < math.inf:
        scale = teacher["guidance_scale"]
        raise ReflowError(f"{where}: [teacher] guidance_scale must be a finite number >= 0, got {scale}")
    if teacher.get("null_label", 0) < 0:
        raise ReflowError(f"{where}: [teacher] null_label must be a class index >= 0, got {teacher['null_label']}")


def _check_pairs(pairs: dict[str, Any], where: str) -> None:
    from reflow.core.solvers import SOLVERS

    for key in ("num_pairs", "nfe", "batch_size"):
        if pairs[key] < 1:
            raise ReflowError(f"{where}: [pairs] {key} must be at least 1, got {pairs[key]}")
    if pairs["heldout"] < 0:
        raise ReflowError(f"{where}: [pairs] heldout must be 0 (no held-out pairs) or more, got {pairs['heldout']}")
    if pairs["solver"] not in SOLVERS:
        raise ReflowError(f"{where}: [pairs] solver must be one of {', '.join(SOLVERS)}, got {pairs['solver']!r}")
    if pairs.get("dtype", "float32") not in ("float32", "float16"):
        raise ReflowError(f"{where}: [pairs] dtype must be float32 or float16, got {pairs['dtype']!r}")
    if any(label < 0 for label in pairs.get("labels") or []):
        raise ReflowError(f"{where}: [pairs] labels must be class indices >= 0, got {pairs['labels']}")


@dataclass
class Recipe:
    """A parsed recipe; ``Recipe.from_toml(path)`` checks every name and value."""

    rounds: int
    teacher: dict[str, Any]
    pairs: dict[str, Any]
    train: dict[str, Any]
    eval: dict[str, Any]
    distill: dict[str, Any] | None = None
    seed: int = 0
    name: str = "run"
    round_train: dict[int, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "recipe") -> Recipe:
        """Check every name and value before any work (types against the tables above, TrainConfig and
        EvalSettings; the ranges training and evaluation check when they start); every error line starts
        with ``where``, the recipe's path."""
        from reflow.core.noise import MAX_SEED

        _unknown(raw, _TOP, where)
        check_types(raw, _TYPES[""], where)
        rounds = raw.get("rounds", 1)
        if rounds < 1:
            raise ReflowError(f"{where}: rounds must be a positive integer, got {rounds!r}")
        seed = raw.get("seed", 0)
        if not 0 <= seed <= MAX_SEED - rounds:
            raise ReflowError(f"{where}: seed must be in [0, {MAX_SEED - rounds}], got {seed}")
        teacher = dict(raw.get("teacher", {}))
        _unknown(teacher, _TEACHER, where, "teacher")
        check_types(teacher, _TYPES["teacher"], where, "teacher")
        _check_teacher(teacher, where)
        pairs = {"num_pairs": 10_000, "solver": "euler", "nfe": 16, "heldout": 1024, "batch_size": 1024}
        pairs.update(raw.get("pairs", {}))
        _unknown(pairs, _PAIRS, where, "pairs")
        check_types(pairs, _TYPES["pairs"], where, "pairs")
        _check_pairs(pairs, where)
        train_table = dict(raw.get("train", {}))
        round_train = {}
        for key in [k for k in train_table if k.startswith("round")]:
            value = train_table.pop(key)
            if not key[5:].isdigit() or not isinstance(value, dict):
                raise ReflowError(f"{where}: [train.{key}] must be a table named round1, round2, ...")
            if not 1 <= int(key[5:]) <= rounds:
                raise ReflowError(f"{where}: [train.{key}] never applies: rounds = {rounds}; drop it or raise rounds")
            round_train[int(key[5:])] = value
        known_train = {f.name for f in fields(TrainConfig)} - {"out", "data", "pairs", "init", "resume", "distill_k"}
        for table, label in [(train_table, "train"), *((v, f"train.round{k}") for k, v in round_train.items())]:
            _unknown(table, known_train | {"init"}, where, label)
            check_values(TrainConfig, table, where, label)
            if table.get("init", "auto") not in ("auto", "fresh"):
                raise ReflowError(f"{where}: [{label}] init must be auto (the round's teacher) or fresh")
            merged = {**train_table, **table} if label != "train" else table
            _check_train({k: v for k, v in merged.items() if k != "init"}, where, label, data="recipe")
        distill = raw.get("distill")
        if distill is not None:
            _unknown(distill, _DISTILL, where, "distill")
            ks = distill.get("k", 1)
            listed = ks if isinstance(ks, list) else [ks]
            if not listed or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in listed):
                raise ReflowError(f"{where}: [distill] k must be a positive integer or a list of them, got {ks!r}")
            if len(set(listed)) != len(listed):
                raise ReflowError(f"{where}: [distill] k lists {ks!r} with a repeat; name each k once")
            rest = {k: v for k, v in distill.items() if k != "k"}
            check_values(TrainConfig, rest, where, "distill")
            _check_train(rest, where, "distill", pairs="recipe", init="recipe", distill_k=listed[0])
            if "data" in teacher and rounds < 2:
                raise ReflowError(
                    f"{where}: [distill] needs pairs, and round 1 from data trains without: set rounds >= 2"
                )
        ev = dict(raw.get("eval", {}))
        _unknown(ev, {f.name for f in fields(EvalSettings)} - {"heldout"}, where, "eval")
        check_values(EvalSettings, ev, where, "eval")
        ev.setdefault("nfes", [1, 2, 4])
        ev.setdefault("reference", teacher.get("data"))
        if ev["reference"] is None:
            raise ReflowError(f"{where}: [eval] needs reference = SOURCE (the real data to compare with)")
        try:
            EvalSettings(**ev).check()
        except ReflowError as e:
            raise ReflowError(f"{where}: [eval] {_names(str(e))}") from None
        return cls(
            rounds=rounds,
            teacher=teacher,
            pairs=pairs,
            train=train_table,
            eval=ev,
            distill=distill,
            seed=int(seed),
            name=str(raw.get("name", "run")),
            round_train=round_train,
        )

    @classmethod
    def from_toml(cls, path: str | Path) -> Recipe:
        path = Path(path)
        if not path.is_file():
            raise ReflowError(f"no such recipe: {path} (see data/recipes/ for examples)")
        return cls.from_dict(read_toml(path), where=str(path))

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "rounds": self.rounds,
            "seed": self.seed,
            "teacher": self.teacher,
            "pairs": self.pairs,
            "train": self.train,
            "round_train": {str(k): v for k, v in sorted(self.round_train.items())},
            "distill": self.distill,
            "eval": self.eval,
        }

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()[:16]


class _Manifest:
    """RUN/manifest.json: the recipe, and per stage its output, status and the time it took."""

    def __init__(self, run: Path, recipe: Recipe):
        self.path = run / "manifest.json"
        if self.path.is_file():
            self.data = json.loads(self.path.read_text())
            if self.data.get("recipe_digest") != recipe.digest():
                raise ReflowError(f"{run} was made with another recipe; rerun with the same recipe or pick a new --out")
        else:
            self.data = {
                "reflow_version": __version__,
                "recipe": recipe.as_dict(),
                "recipe_digest": recipe.digest(),
                "stages": {},
                "complete": False,
            }
            self.save()

    def save(self) -> None:
        atomic_write_json(self.path, self.data)

    def done(self, stage: str) -> bool:
        return self.data["stages"].get(stage, {}).get("status") == "done"

    def record(self, stage: str, output: Path, wall: float | None, cpu: float | None, **info: Any) -> None:
        self.data["stages"][stage] = {
            "status": "done",
            "output": str(output),
            "wall_seconds": wall,
            "cpu_seconds": cpu,
            **info,
        }
        self.save()


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def run_rounds(
    recipe: Recipe | str | Path,
    out: str | Path,
    *,
    device: Any = "cpu",
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Run (or resume) a recipe into ``out``; returns the metrics of the table across rounds
    (``out/report/metrics.json``)."""
    from reflow.folders.runtime import partial_state
    from reflow.pairs.generate import generate_pairs
    from reflow.teachers.base import load_teacher

    if not isinstance(recipe, Recipe):
        recipe = Recipe.from_toml(recipe)
    run = Path(out)
    state = partial_state()
    if state.is_main_process:
        # an existing folder is used only when it is a run of ours (its marker; manifest.json before markers)
        inputs = [recipe.teacher.get("checkpoint"), recipe.teacher.get("data")]
        claim_output(run, "rounds", inputs=[i for i in inputs if i and Path(i).exists()], legacy=("manifest.json",))
        run.mkdir(parents=True, exist_ok=True)
        mark_output(run, "rounds", recipe=recipe.name)
    state.wait_for_everyone()
    manifest = _Manifest(run, recipe) if state.is_main_process else None
    state.wait_for_everyone()
    if manifest is None:
        manifest = _Manifest(run, recipe)  # read back what the main process wrote

    def note(stage: str, done: int = 0, total: int = 1, info: str = "") -> None:
        if progress:
            progress(stage, done, total, info)

    def stage(name: str, output: Path, work: Callable[[], dict[str, Any] | None], exists: Callable[[], bool]) -> None:
        """Run ``work`` unless ``name`` is recorded done (or its output is complete), then record it."""
        if manifest.done(name) and exists():
            return
        if exists():  # finished but killed before the manifest was written: keep it, time unknown
            if state.is_main_process:
                manifest.record(name, output, None, None, resumed=True)
            return
        wall, cpu = _clock()
        info = work() or {}
        state.wait_for_everyone()
        if state.is_main_process:
            w2, c2 = _clock()
            manifest.record(name, output, w2 - wall, c2 - cpu, **info)

    pairs_cfg = recipe.pairs
    eval_cfg = dict(recipe.eval)
    start = recipe.teacher
    heldout: Path | None = None

    prompts = None
    if pairs_cfg.get("prompts") is not None:
        from reflow.folders.prompts import read_prompts

        prompts = read_prompts(pairs_cfg["prompts"])

    def pairs_of(teacher_path: str, solver: str, nfe: int, dest: Path, n: int, seed: int, round_: int) -> None:
        # guidance is the starting checkpoint's; a student of ours has it baked in
        guidance = {k: start[k] for k in _GUIDANCE if k in start} if teacher_path == start.get("checkpoint") else {}
        teacher = load_teacher(teacher_path, nfe=nfe, solver=solver, device=device, **guidance)
        generate_pairs(
            teacher,
            dest,
            n,
            seed=seed,
            batch_size=int(pairs_cfg["batch_size"]),
            dtype=str(pairs_cfg.get("dtype", "float32")),
            round_=round_,
            labels=pairs_cfg.get("labels"),
            prompts=prompts,
            store_embeddings=bool(pairs_cfg.get("store_embeddings", True)),
            progress=lambda d, t: note(f"{dest.parent.name}/{dest.name}", d, t),
        )

    def pairs_done(dest: Path) -> Callable[[], bool]:
        return lambda: (dest / "reflow_pairs.json").is_file()  # the folder appears by rename, complete

    def eval_model(models: list[Path], report: Path, name: str, teacher_nfe: int | None = None) -> None:
        settings = EvalSettings(**eval_cfg, heldout=None if heldout is None else str(heldout))
        if teacher_nfe is not None:
            settings.teacher_nfe = teacher_nfe
            settings.teacher_solver = str(start.get("solver", "ddim"))
        if state.is_main_process:
            result = evaluate(models, settings, device=device, progress=lambda s, d, t: note(name, d, t))
            write_report(report, result)

    def heldout_of(teacher: str, solver: str, nfe: int) -> Path | None:
        """The held-out pairs every report measures fidelity on (None when the recipe asks for none)."""
        n = int(pairs_cfg["heldout"])
        if n <= 0:
            return None
        dest = run / "heldout"
        stage("heldout", dest, lambda: pairs_of(teacher, solver, nfe, dest, n, recipe.seed + 1, 1), pairs_done(dest))
        return dest

    # The starting teacher: its held-out pairs (fidelity of every round to it) and its own report.
    teacher_path = start.get("checkpoint")
    teacher_report = None
    if teacher_path is not None:
        solver, nfe = str(start.get("solver", "ddim")), int(start.get("nfe", 50))
        heldout = heldout_of(teacher_path, solver, nfe)
        if is_diffusers_checkpoint(teacher_path):
            teacher_report = run / "teacher" / "report"
            stage(
                "teacher/report",
                teacher_report,
                lambda: eval_model([Path(teacher_path)], teacher_report, "eval teacher", teacher_nfe=nfe),
                lambda: (teacher_report / "metrics.json").is_file(),
            )

    previous: str | None = teacher_path
    students: list[Path] = []
    for k in range(1, recipe.rounds + 1):
        folder = run / f"round-{k}"
        folder.mkdir(exist_ok=True)
        student = folder / "student"
        cfg = {**recipe.train, **recipe.round_train.get(k, {})}
        init = cfg.pop("init", "auto")
        cfg.setdefault("seed", recipe.seed + k - 1)
        if previous is None:  # round 1 from data: independent coupling
            config = TrainConfig(out=str(student), data=str(start["data"]), **cfg)
        else:
            pairs = folder / "pairs"
            if k == 1:
                solver = str(start.get("pairs_solver", start.get("solver", "ddim")))
                nfe = int(start.get("pairs_nfe", start.get("nfe", 50)))
            else:
                solver, nfe = str(pairs_cfg["solver"]), int(pairs_cfg["nfe"])
            stage(
                f"round-{k}/pairs",
                pairs,
                lambda p=previous, s=solver, n=nfe, d=pairs, r=k: pairs_of(
                    p, s, n, d, int(pairs_cfg["num_pairs"]), recipe.seed, r
                ),
                pairs_done(pairs),
            )
            config = TrainConfig(out=str(student), pairs=str(pairs), init=None if init == "fresh" else previous, **cfg)
        config.extra = {"recipe": recipe.name, "round": k}

        def do_train(config: TrainConfig = config, k: int = k) -> dict[str, Any]:
            config.resume = latest_checkpoint(Path(config.out)) is not None
            result = train(config, progress=lambda s, t, loss, sps: note(f"train round {k}", s, t, f"loss {loss:.4g}"))
            return {"steps": result.steps, "final_loss": result.loss}

        stage(f"round-{k}/student", student, do_train, lambda s=student: (s / "README.md").is_file())
        if previous is None:
            # Round 1 from data has no teacher to be faithful to; 1-RF is the teacher of every later round,
            # so its held-out pairs (the [pairs] solver and NFE, seeds apart from round 2's) are theirs.
            heldout = heldout_of(str(student), str(pairs_cfg["solver"]), int(pairs_cfg["nfe"]))
        report = folder / "report"
        stage(
            f"round-{k}/report",
            report,
            lambda s=student, r=report, k=k: eval_model([s], r, f"eval round {k}"),
            lambda r=report: (r / "metrics.json").is_file(),
        )
        if state.is_main_process:
            atomic_write_json(
                folder / "manifest.json",
                {
                    "round": k,
                    "teacher": previous,
                    "stages": {n: v for n, v in manifest.data["stages"].items() if n.startswith(f"round-{k}/")},
                },
            )
        students.append(student)
        previous = str(student)

    reports = ([teacher_report] if teacher_report is not None else []) + [
        run / f"round-{k}" / "report" for k in range(1, recipe.rounds + 1)
    ]
    names = (["teacher"] if teacher_report is not None else []) + [f"round-{k}" for k in range(1, recipe.rounds + 1)]
    prefixes = list(names)  # each table row's stage names start with "<prefix>/"
    if recipe.distill is not None:
        last = run / f"round-{recipe.rounds}"
        if not (last / "pairs").exists():
            raise ReflowError("[distill] needs pairs: the last round must train on pairs (rounds >= 2 from data)")
        dcfg = dict(recipe.distill)
        ks = dcfg.pop("k", 1)
        for k_steps in ks if isinstance(ks, list) else [ks]:
            prefix = f"distill-k{k_steps}" if isinstance(ks, list) else "distill"
            dest = run / prefix / "student"
            dest.parent.mkdir(exist_ok=True)
            config = TrainConfig(
                out=str(dest), pairs=str(last / "pairs"), init=str(last / "student"), distill_k=int(k_steps), **dcfg
            )
            config.extra = {"recipe": recipe.name, "round": f"distill k={k_steps}"}

            def do_distill(config: TrainConfig = config) -> dict[str, Any]:
                config.resume = latest_checkpoint(Path(config.out)) is not None
                result = train(config, progress=lambda s, t, loss, sps: note("distill", s, t, f"loss {loss:.4g}"))
                return {"steps": result.steps, "final_loss": result.loss}

            stage(f"{prefix}/student", dest, do_distill, lambda d=dest: (d / "README.md").is_file())
            report = run / prefix / "report"
            stage(
                f"{prefix}/report",
                report,
                lambda d=dest, r=report: eval_model([d], r, "eval distill"),
                lambda r=report: (r / "metrics.json").is_file(),
            )
            reports.append(report)
            names.append(f"distill-k{k_steps}")
            prefixes.append(prefix)

    table = run / "report"
    if state.is_main_process:
        combined = combine_reports(reports, names, manifest.data, prefixes)
        write_report(table, Evaluation(metrics=combined, pictures={"models": {}}))
        manifest.data["complete"] = True
        manifest.data["report"] = str(table)
        manifest.save()
    state.wait_for_everyone()
    return json.loads((table / "metrics.json").read_text())


def combine_reports(
    reports: list[Path], names: list[str], manifest: dict[str, Any], prefixes: list[str] | None = None
) -> dict[str, Any]:
    """One table across rounds from the per-round reports (same noise, reference and held-out pairs), each
    model renamed after its round, with ``cpu_minutes``: the CPU time spent making it (pairs and training
    of its round and of every round before it; a distilled student adds its own distillation to the
    rounds', not another distillation's; None for the starting teacher or when a stage was finished by a
    run that was killed before it could record its time). ``prefixes``: each row's stage-name prefix in
    the manifest (default: its name; "distill" for a row named distill-kK)."""
    if prefixes is None:
        prefixes = ["distill" if n.startswith("distill") else n for n in names]
    combined: dict[str, Any] | None = None
    rounds_spent: float | None = 0.0
    for report, name, prefix in zip(reports, names, prefixes, strict=True):
        metrics = json.loads((report / "metrics.json").read_text())
        model = dict(metrics["models"][0], name=name)
        if name == "teacher":
            model["cpu_minutes"] = None
        else:
            spent = [
                s.get("cpu_seconds")
                for n, s in manifest["stages"].items()
                if n.startswith(f"{prefix}/") and not n.endswith("/report")
            ]
            total = None if rounds_spent is None or None in spent else rounds_spent + sum(spent) / 60
            if not name.startswith("distill"):
                rounds_spent = total
            model["cpu_minutes"] = total
        if combined is None:
            combined = {k: v for k, v in metrics.items() if k not in ("models", "figures")}
            combined["models"] = []
        combined["models"].append(model)
    assert combined is not None
    return combined
