"""Evaluation: few-step quality against data, fidelity to the teacher and the geometry of the flow, for one
model or a comparison of several (teacher, 1-RF, 2-RF, distilled) from the same noise.

For each model and each NFE k in ``nfes``:

- **quality** against the reference data, from noise ``row_noise(seed, 0..n-1)`` for every seed in
  ``seeds`` (mean and spread over seeds): exact W2 (POT) where the n x m cost matrix fits; for images a
  Fréchet distance and a KID-style kernel distance in a feature space: the bundled digits network for
  (1, 8, 8) samples, Inception-v3 when ``inception_weights`` is given;
- **fidelity** to the teacher: on held-out pairs, the model's k-step output from the pair's z0 against the
  teacher's z1 (MSE per element; images clamped to [-1, 1]);

and once per model the reference solve on the first seed's noise (the DDPM's own solver at ``teacher_nfe``
steps for a diffusers checkpoint; adaptive dopri5 for a flow, by default for vectors only, since it costs
~100 calls per sample) and, for flows, on ``diagnostics_samples`` noise draws: the straightness S and
curvature K along a ``straightness_steps``-step Euler solve (see ``reflow.core.solvers``) and the calls the
adaptive solver needs.

Progress is counted in network calls (one call advancing one sample), so that a 50-step reference solve
weighs what it costs; the plan of each model's work is :func:`expected_calls`.

How each model is sampled (Euler on a flow's grid, a checkpoint's own solver) is
:class:`reflow.eval.candidates.Candidate`'s.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reflow.core.noise import row_noise
from reflow.core.progress import Progress, Throttle, Update
from reflow.core.sampling import is_image
from reflow.errors import ReflowError
from reflow.eval.candidates import Candidate, checkpoint_guidance
from reflow.eval.features import FEATURE_SPACES, FeatureSpace, digits_classifier, feature_spaces
from reflow.eval.heldout import Heldout, is_pairs, load_heldout
from reflow.eval.metrics import over_seeds, per_class, sample_quality
from reflow.folders.data import load_source
from reflow.folders.kinds import is_diffusers_checkpoint
from reflow.version import __version__

STRAIGHTNESS_STEPS = 100
GRID_COLUMNS = 16  # samples per row of a picture grid
SCATTER_POINTS = 2000
TRAJECTORIES = 200
ADAPTIVE_GUESS = 100  # network calls per sample an adaptive solve is planned with, before it has run
PROGRESS_SECONDS = 0.5  # how often an evaluation reports from inside a solve, at most


@dataclass
class EvalSettings:
    """What ``evaluate`` measures, and on how many samples."""

    nfes: list[int]
    reference: str  # a SOURCE (built-in name, .npy, save_to_disk folder) or a pairs folder (its z1)
    heldout: str | None = None  # pairs for fidelity (default: ``reference`` when it is a pairs folder)
    num_samples: int = 4000
    seeds: list[int] = field(default_factory=lambda: [1])
    adaptive: bool | None = None  # quality of flows solved adaptively (dopri5); None: for vectors, not images
    adaptive_tol: float = 1e-4  # rtol = atol of every adaptive solve
    teacher_nfe: int = 50  # the reference solve of a diffusers checkpoint
    teacher_solver: str = "ddim"
    # conditional diffusers checkpoints: their guidance (default: what the held-out pairs were made with)
    guidance_scale: float | None = None
    null_label: int | None = None
    negative_prompt: str | None = None
    num_fidelity: int = 1024
    diagnostics_samples: int = 512
    straightness_steps: int = STRAIGHTNESS_STEPS
    inception_weights: str | None = None
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    w2_max_cells: int = 25_000_000  # exact W2 when num_samples x reference rows is at most this
    batch_size: int = 1024
    allow_pickle: bool = False  # load pickle (.bin) weights of models you trust

    def check(self) -> None:
        if not self.nfes or any(k < 1 for k in self.nfes):
            raise ReflowError(f"--nfe needs positive step counts like 1,2,4; got {self.nfes}")
        if self.num_samples < 2:
            raise ReflowError(f"--num-samples must be at least 2, got {self.num_samples}")
        if not self.seeds:
            raise ReflowError("--seeds needs at least one seed, like 1,2,3")
        if self.num_fidelity < 1 or self.diagnostics_samples < 1:
            raise ReflowError("--num-fidelity and the diagnostics sample count must be at least 1")
        if self.teacher_nfe < 1:
            raise ReflowError(f"--teacher-nfe must be at least 1, got {self.teacher_nfe}")


@dataclass
class Evaluation:
    """``metrics`` (JSON-ready: settings, notes and one entry per model) and ``pictures`` (arrays for the
    figures: per model the grid rows or scatter points and trajectories)."""

    metrics: dict[str, Any]
    pictures: dict[str, Any]


@dataclass
class _Reference:
    """The reference data in model space: the rows quality is measured against, with their features."""

    shape: tuple[int, ...]
    rows: torch.Tensor  # (m, *shape) float32
    labels: torch.Tensor | None  # the rows' class labels, or None for unlabelled data
    class_rows: torch.Tensor  # per-class W2 compares with every labelled row of the class
    class_labels: torch.Tensor | None
    spaces: dict[str, FeatureSpace]  # name -> f(images) -> (N, D)
    features: dict[str, np.ndarray]  # the rows' features in each space


@dataclass
class _Work:
    """The evaluation's progress in network calls (one call advancing one sample), reported as Updates of
    stage "eval" with what is being drawn as their ``info``."""

    progress: Progress | None
    total: int
    done: int = 0
    info: str = ""
    busy: bool = False  # within a phase: not done before it ends, whatever the count says
    tick: Throttle = field(default_factory=lambda: Throttle(PROGRESS_SECONDS))

    def on_call(self, rows: int) -> None:
        self.done += rows
        if self.tick():
            self.report()

    def report(self) -> None:
        if self.progress:
            total = max(self.total, self.done + 1 if self.busy else self.done)
            self.progress(Update("eval", self.done, total, "calls", self.info))

    @contextmanager
    def phase(self, info: str, expected: int) -> Iterator[None]:
        """A piece of work planned at ``expected`` calls; the total follows what it really took (an
        adaptive solve's calls are known only once it has run)."""
        self.info, self.busy, start = info, True, self.done
        yield
        self.total += (self.done - start) - expected
        self.info, self.busy = "", False
        self.report()


@dataclass
class _Run:
    """What every model of one evaluation shares: settings, reference data, held-out pairs and noise."""

    settings: EvalSettings
    reference: _Reference
    heldout: Heldout | None
    noise: dict[int, torch.Tensor]  # seed -> (num_samples, *shape) noise row_noise(seed, 0..n-1)
    device: torch.device | str
    classifier: Callable[[torch.Tensor], np.ndarray] | None  # digits: predicted labels, for agreement
    work: _Work = field(default_factory=lambda: _Work(None, 0))

    @property
    def first_noise(self) -> torch.Tensor:
        return self.noise[self.settings.seeds[0]]

    @property
    def grid(self) -> bool:
        """Whether models get picture rows: images, not latents (they would need the VAE)."""
        latent = self.heldout is not None and self.heldout.conditioning == "text"
        return is_image(self.reference.shape) and not latent

    def quality(self, x: torch.Tensor, seed: int) -> dict[str, float]:
        s, ref = self.settings, self.reference
        return sample_quality(
            x, ref.rows, ref.features, ref.spaces,
            w2_max_cells=s.w2_max_cells, kid_subsets=s.kid_subsets, kid_subset_size=s.kid_subset_size, seed=seed,
        )  # fmt: skip

    def per_class(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
        return per_class(x, labels, self.reference.class_rows, self.reference.class_labels, self.classifier)


def _load_reference(settings: EvalSettings, notes: list[str]) -> _Reference:
    """The reference rows, their labels and their features in every feature space of their shape."""
    source = load_source(settings.reference)
    shape = tuple(source.sample_shape)
    rows = source.reference(settings.num_samples).float()
    labels = source.reference_labels(settings.num_samples)
    spaces = feature_spaces(shape, settings.inception_weights)
    if is_image(shape) and settings.inception_weights is None:
        notes.append("Inception FID/KID skipped: it needs --inception-weights PATH (nothing can be downloaded here)")
    features = {name: extract(rows) for name, extract in spaces.items()}
    if len(rows) * settings.num_samples > settings.w2_max_cells:
        notes.append(
            f"exact W2 skipped: {settings.num_samples} x {len(rows)} samples exceed the {settings.w2_max_cells:,}-cell "
            "cost matrix limit; lower --num-samples for it"
        )
    class_rows = source.data if source.labels is not None else rows
    return _Reference(shape, rows, labels, class_rows, source.labels, spaces, features)


def _load_heldout(settings: EvalSettings, shape: tuple[int, ...], notes: list[str]) -> Heldout | None:
    if settings.heldout is None:
        notes.append("fidelity to the teacher skipped: pass held-out pairs with --heldout PAIRS")
        return None
    return load_heldout(settings.heldout, shape, max_rows=settings.num_fidelity, allow_pickle=settings.allow_pickle)


def _candidate(run: _Run, path: Path) -> Candidate:
    """The model at ``path``, checked against the reference's shape and the held-out pairs' conditioning."""
    s, heldout = run.settings, run.heldout
    given = {"guidance_scale": s.guidance_scale, "null_label": s.null_label, "negative_prompt": s.negative_prompt}
    model = Candidate(
        path, device=run.device, batch_size=s.batch_size, teacher_nfe=s.teacher_nfe, teacher_solver=s.teacher_solver,
        guidance=checkpoint_guidance(path, given, heldout.teacher if heldout is not None else {}),
        adaptive_tol=s.adaptive_tol, allow_pickle=s.allow_pickle, on_call=run.work.on_call,
    )  # fmt: skip
    shape = run.reference.shape
    if model.sample_shape != shape:
        raise ReflowError(f"{path} makes samples of shape {model.sample_shape} but {s.reference} holds {shape}")
    if heldout is not None and model.conditioning != heldout.conditioning:
        raise ReflowError(
            f"{path} is {model.conditioning or 'unconditional'} but the held-out pairs {heldout.path} are "
            f"{heldout.conditioning or 'unconditional'}; pass matching pairs with --heldout"
        )
    return model


def _conditions(model: Candidate, run: _Run) -> torch.Tensor | None:
    """The conditioning of the quality samples: class labels cycling over the classes (balanced), or the
    held-out pairs' prompt embeddings cycling over their rows."""
    n, heldout, labels = run.settings.num_samples, run.heldout, run.reference.labels
    if model.conditioning is None:
        return None
    if model.conditioning == "class":
        if heldout is not None and heldout.conditioning == "class":
            choices = sorted(set(heldout.cond.tolist()))
        elif labels is not None:
            choices = sorted(set(labels.tolist()) & set(model.label_choices))
        else:
            choices = list(model.label_choices)
        return torch.tensor([choices[i % len(choices)] for i in range(n)], dtype=torch.long)
    if heldout is None or heldout.conditioning != "text":
        raise ReflowError("a text-to-image model is evaluated on prompts: pass --heldout PAIRS made by its teacher")
    idx = torch.arange(n) % len(heldout.cond)
    return heldout.cond[idx]


def _mse(z1: torch.Tensor, teacher_z1: torch.Tensor) -> float:
    return float(((z1 - teacher_z1) ** 2).mean())


def _grid(run: _Run, cond: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The noise and conditioning of a model's picture row: the held-out pairs' first rows (under the
    teacher's row), else the first quality samples'."""
    if run.heldout is not None:
        held = run.heldout.cond
        return run.heldout.z0[:GRID_COLUMNS], held[:GRID_COLUMNS] if held is not None else None
    return run.first_noise[:GRID_COLUMNS], cond[:GRID_COLUMNS] if cond is not None else None


def _nfe_cell(run: _Run, model: Candidate, k: int, cond: torch.Tensor | None, pics: dict[str, Any]) -> dict[str, Any]:
    """Quality over the seeds (and per class), fidelity and the picture row of ``model`` at k calls."""
    s, t0 = run.settings, time.perf_counter()
    per_seed, classes = [], None
    for seed in s.seeds:
        x = model.sample(run.noise[seed], k, cond)
        scores = run.quality(x, seed)
        if model.conditioning == "class":
            breakdown = run.per_class(x, cond)
            scores.update({key: v for key, v in breakdown.items() if key != "classes"})
            if classes is None:
                classes = breakdown["classes"]  # the first seed's breakdown
        per_seed.append(scores)
        if seed == s.seeds[0] and not is_image(run.reference.shape):
            pics["scatter"][str(k)] = x[:SCATTER_POINTS].numpy()
    cell = over_seeds(per_seed)
    if classes is not None:
        cell["classes"] = classes
    if run.heldout is not None:
        cell["mse_teacher"] = _mse(model.sample(run.heldout.z0, k, run.heldout.cond), run.heldout.z1)
    cell["seconds"] = time.perf_counter() - t0
    if run.grid:
        z0, grid_cond = _grid(run, cond)
        pics["rows"][str(k)] = model.sample(z0, k, grid_cond).numpy()
    return cell


def _reference_solve_cell(run: _Run, model: Candidate, cond: torch.Tensor | None) -> dict[str, Any] | None:
    """Quality (and fidelity) of the model's reference solve on the first seed's noise; None without one."""
    seed, adaptive, heldout = run.settings.seeds[0], run.settings.adaptive, run.heldout
    solved = model.reference_solve(run.noise[seed], cond, adaptive)
    if solved is None:
        return None
    z1, nfe, solver = solved
    quality = run.quality(z1, seed)
    if model.conditioning == "class":
        quality.update({k: v for k, v in run.per_class(z1, cond).items() if k != "classes"})
    cell = {"solver": solver, "nfe": nfe, "seed": seed, **quality}
    if heldout is not None:
        cell["mse_teacher"] = _mse(model.reference_solve(heldout.z0, heldout.cond, adaptive)[0], heldout.z1)
    return cell


def _flow_cell(run: _Run, model: Candidate, cond: torch.Tensor | None, pics: dict[str, Any]) -> dict[str, Any]:
    """A flow's straightness, curvature and adaptive calls on the diagnostics noise (and its trajectories
    in 2-D); {} for a checkpoint."""
    s = run.settings
    z0 = run.first_noise[: s.diagnostics_samples]
    diag = model.diagnostics(z0, cond[: len(z0)] if cond is not None else None, s.straightness_steps)
    if diag is None:
        return {}
    if run.reference.shape == (2,):
        pics["trajectories"] = model.trajectories(z0[:TRAJECTORIES])
    return {
        "straightness": diag["straightness"],
        "curvature": diag["curvature"],
        "adaptive_nfe": diag["adaptive_nfe"],
        "adaptive_tol": s.adaptive_tol,
        "straightness_steps": diag["steps"],
        "straightness_samples": diag["samples"],
    }


def planned_calls(
    settings: EvalSettings, *, checkpoint: bool, adaptive: bool, fidelity: int, grid: int
) -> dict[str, int]:
    """The network calls (one call advancing one sample) planned for one model: per NFE k (``"nfe k"``:
    every seed's samples, ``fidelity`` held-out pairs and a picture row of ``grid``), its reference solve
    (a ``checkpoint``'s own solver; a flow's ``adaptive`` solve at ``ADAPTIVE_GUESS`` calls per sample)
    and a flow's diagnostics."""
    s = settings
    plan = {f"nfe {k}": k * (len(s.seeds) * s.num_samples + fidelity + grid) for k in s.nfes}
    if checkpoint:
        return {**plan, "reference": s.teacher_nfe * (s.num_samples + fidelity), "diagnostics": 0}
    reference = ADAPTIVE_GUESS * (s.num_samples + fidelity) if adaptive else 0
    diagnostics = min(s.diagnostics_samples, s.num_samples) * (s.straightness_steps + ADAPTIVE_GUESS)
    return {**plan, "reference": reference, "diagnostics": diagnostics}


def expected_calls(run: _Run, path: Path) -> dict[str, int]:
    """:func:`planned_calls` for the model at ``path`` in this evaluation."""
    s, heldout = run.settings, run.heldout
    fidelity = len(heldout.z0) if heldout is not None else 0
    grid = min(GRID_COLUMNS, fidelity or s.num_samples) if run.grid else 0
    adaptive = s.adaptive if s.adaptive is not None else not is_image(run.reference.shape)
    return planned_calls(s, checkpoint=is_diffusers_checkpoint(path), adaptive=adaptive, fidelity=fidelity, grid=grid)


def _evaluate_model(run: _Run, name: str, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """One model's entry of the metrics (per NFE, reference solve, flow diagnostics) and its pictures."""
    model = _candidate(run, path)
    run.work.report()  # the model is loaded and checked
    cond = _conditions(model, run)
    entry: dict[str, Any] = {"name": name, "model": str(path), "kind": model.kind, "solver": model.solver}
    if model.conditioning is not None:
        entry["conditioning"] = model.conditioning
    entry["nfe"] = {}
    pics: dict[str, Any] = {"rows": {}, "scatter": {}}
    plan = expected_calls(run, path)
    for k in run.settings.nfes:
        with run.work.phase(f"{name}, NFE {k}", plan[f"nfe {k}"]):
            entry["nfe"][str(k)] = _nfe_cell(run, model, k, cond, pics)
    with run.work.phase(f"{name}, reference solve", plan["reference"]):
        solved = _reference_solve_cell(run, model, cond)
    if solved is not None:
        entry["reference_solve"] = solved
    with run.work.phase(f"{name}, straightness", plan["diagnostics"]):
        entry.update(_flow_cell(run, model, cond, pics))
    return entry, pics


def _pictures(run: _Run) -> dict[str, Any]:
    """The pictures shared by every model: the teacher's row of images, or the reference points."""
    pictures: dict[str, Any] = {"sample_shape": list(run.reference.shape), "models": {}}
    if run.grid:
        pictures["teacher_row"] = run.heldout.z1[:GRID_COLUMNS].numpy() if run.heldout is not None else None
    else:
        pictures["reference"] = run.reference.rows[:SCATTER_POINTS].numpy()
    return pictures


def _metrics(run: _Run, notes: list[str], results: list[dict[str, Any]]) -> dict[str, Any]:
    settings, heldout = run.settings, run.heldout
    settings_out = asdict(settings)
    settings_out.pop("inception_weights")
    fidelity = None
    if heldout is not None:
        fidelity = {"pairs": heldout.path, "rows": len(heldout.z0), "teacher": heldout.provenance.get("teacher")}
    return {
        "reflow_version": __version__,
        "settings": settings_out,
        "inception_weights": settings.inception_weights,
        "sample_shape": list(run.reference.shape),
        "num_reference": len(run.reference.rows),
        "feature_spaces": {name: FEATURE_SPACES[name] for name in run.reference.spaces},
        "fidelity": fidelity,
        "notes": notes,
        "models": results,
    }


def model_names(paths: list[Path]) -> list[str]:
    """Short unique names for the report: the folder name, with parents added where two collide."""
    depth = 1
    while True:
        names = ["/".join(p.resolve().parts[-depth:]) for p in paths]
        if len(set(names)) == len(names) or depth > 8:
            return names
        depth += 1


def evaluate(
    models: list[str | Path] | str | Path,
    settings: EvalSettings,
    *,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
) -> Evaluation:
    """Evaluate every model on the same noise, reference and held-out pairs (see the module docstring).
    ``progress`` receives :class:`reflow.core.progress.Update` s of stage "eval" in network calls (one call
    advancing one sample), from inside every solve (at most every ``PROGRESS_SECONDS``) and after each
    NFE, reference solve and diagnostics of a model."""
    settings.check()
    paths = [Path(m) for m in ([models] if isinstance(models, (str, Path)) else models)]
    if not paths:
        raise ReflowError("pass at least one --model")
    if settings.heldout is None and is_pairs(settings.reference):
        settings.heldout = settings.reference
    # 1. the reference data and its feature spaces, then the held-out pairs
    notes: list[str] = []
    reference = _load_reference(settings, notes)
    heldout = _load_heldout(settings, reference.shape, notes)
    # 2. the noise every model starts from
    noise = {s: row_noise(s, range(settings.num_samples), reference.shape) for s in settings.seeds}
    classifier = digits_classifier() if reference.shape == (1, 8, 8) else None
    run = _Run(settings, reference, heldout, noise, device, classifier)
    run.work = _Work(progress, total=sum(sum(expected_calls(run, p).values()) for p in paths))
    # 3. each model: quality and fidelity per NFE, reference solve, flow diagnostics, pictures
    pictures = _pictures(run)
    results = []
    for name, path in zip(model_names(paths), paths, strict=True):
        entry, pics = _evaluate_model(run, name, path)
        results.append(entry)
        pictures["models"][name] = pics
    return Evaluation(metrics=_metrics(run, notes, results), pictures=pictures)


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"
