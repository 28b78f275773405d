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

Flows sample with Euler on their own grid (an exported student's scheduler grid); a diffusers DDPM
checkpoint samples with DDIM (eta = 0) at k steps, so the teacher's row shows what its own solver does
with the same budget.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reflow.core.flow import Conditioned
from reflow.core.noise import row_noise
from reflow.core.sampling import is_image, sample
from reflow.core.solvers import solve
from reflow.errors import ReflowError
from reflow.folders.data import load_source
from reflow.folders.kinds import is_diffusers_checkpoint, is_flow_pipeline, is_text_pipeline, read_index
from reflow.models.velocity import load_model
from reflow.version import __version__

STRAIGHTNESS_STEPS = 100
GRID_COLUMNS = 16  # samples per row of a picture grid
SCATTER_POINTS = 2000
TRAJECTORIES = 200

Progress = Callable[[str, int, int], None]


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


class _Model:
    """One model under evaluation: a flow of ours, or a diffusers checkpoint sampled with its solver.

    ``conditioning`` is None, "class" or "text"; ``sample`` then takes the rows' class labels or prompt
    embeddings. Latent (text-to-image) samples are not clamped.
    """

    def __init__(self, path: Path, settings: EvalSettings, device: torch.device | str, guidance: dict[str, Any]):
        self.path = path
        self.settings = settings
        self.device = device
        if not path.exists():
            raise ReflowError(f"no such model: {path} (pass a `reflow train` folder or a diffusers pipeline folder)")
        if is_diffusers_checkpoint(path):
            from reflow.teachers.base import load_teacher

            self.kind = "diffusers"
            self.teacher = load_teacher(
                path,
                nfe=settings.teacher_nfe,
                solver=settings.teacher_solver,
                device=device,
                allow_pickle=settings.allow_pickle,
                **guidance,
            )
            self.conditioning = getattr(self.teacher, "conditioning", None) or (
                "class" if self.teacher.num_classes is not None else None
            )
            self.label_choices = getattr(self.teacher, "label_choices", None)
            self.sample_shape = tuple(self.teacher.sample_shape)
            self.solver = f"{settings.teacher_solver} (the checkpoint's scheduler)"
            if guidance.get("guidance_scale") is not None:
                self.solver += f", guidance {guidance['guidance_scale']:g}"
        else:
            self.kind = "flow"
            self.model = load_model(path, allow_pickle=settings.allow_pickle).to(device).eval()
            self.conditioning = getattr(self.model, "conditioning", None)
            self.label_choices = None
            if self.conditioning == "class":
                null = read_index(path).get("_reflow_null_class")
                self.label_choices = [c for c in range(self.model.num_classes) if c != null]
            self.sample_shape = tuple(self.model.sample_shape)
            grid = "its scheduler's grid" if hasattr(self.model, "euler_grid") else "uniform grid"
            self.solver = f"euler ({grid})"
        self.clamp = is_image(self.sample_shape) and self.conditioning != "text"

    def _finish(self, z1: torch.Tensor) -> torch.Tensor:
        return z1.clamp(-1, 1) if self.clamp else z1

    def sample(self, z0: torch.Tensor, k: int, cond: torch.Tensor | None = None) -> torch.Tensor:
        """z1 from z0 in k network calls (k-step Euler for a flow, k-step DDPM solver for a checkpoint);
        ``cond``: the rows' class labels or prompt embeddings for a conditional model."""
        bs = self.settings.batch_size
        if self.kind == "flow":
            keyword = {"class": "class_labels", "text": "encoder_hidden_states"}.get(self.conditioning)
            kw = {keyword: cond} if keyword else None
            return sample(self.model, z0, k, "euler", batch_size=bs, device=self.device, clamp=self.clamp, cond=kw).z1
        self.teacher.nfe = k  # the teacher resets its scheduler to self.nfe steps on every call
        outs = []
        for b in range(0, len(z0), bs):
            args = (z0[b : b + bs],) if cond is None else (z0[b : b + bs], cond[b : b + bs])
            outs.append(self.teacher(*args).float().cpu())
        return self._finish(torch.cat(outs))

    def _field(self, cond: torch.Tensor | None, b: int, e: int):
        if cond is None or self.conditioning is None:
            return self.model
        keyword = "class_labels" if self.conditioning == "class" else "encoder_hidden_states"
        return Conditioned(self.model, **{keyword: cond[b:e].to(self.device)})

    def _adaptive(self, z0: torch.Tensor, cond: torch.Tensor | None = None):
        tol = self.settings.adaptive_tol
        outs, nfe = [], 0
        bs = self.settings.batch_size
        for b in range(0, len(z0), bs):
            field = self._field(cond, b, b + bs)
            sol = solve(field, z0[b : b + bs].to(self.device), 0, "adaptive", rtol=tol, atol=tol)
            outs.append(sol.z1.float().cpu())
            nfe = max(nfe, sol.nfe)
        return self._finish(torch.cat(outs)), nfe

    def reference_solve(
        self, z0: torch.Tensor, cond: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, int, str] | None:
        if self.kind == "diffusers":
            nfe = self.settings.teacher_nfe
            return self.sample(z0, nfe, cond), nfe, self.settings.teacher_solver
        adaptive = self.settings.adaptive
        if adaptive is False or (adaptive is None and is_image(self.sample_shape)):
            return None
        z1, nfe = self._adaptive(z0, cond)
        return z1, nfe, "adaptive"

    def diagnostics(self, z0: torch.Tensor, cond: torch.Tensor | None = None) -> dict[str, Any] | None:
        if self.kind != "flow":
            return None
        steps = self.settings.straightness_steps
        keyword = {"class": "class_labels", "text": "encoder_hidden_states"}.get(self.conditioning)
        sol = sample(
            self.model, z0, steps, "euler", batch_size=self.settings.batch_size, device=self.device,
            measure_straightness=True, clamp=self.clamp, cond={keyword: cond} if keyword else None,
        )  # fmt: skip
        _, nfe = self._adaptive(z0, cond)
        return {
            "straightness": sol.straightness,
            "curvature": sol.curvature,
            "adaptive_nfe": nfe,
            "steps": steps,
            "samples": len(z0),
        }

    @torch.inference_mode()
    def trajectories(self, z0: torch.Tensor, steps: int = 50) -> np.ndarray | None:
        """(steps + 1, n, 2) paths of a 2-D flow, for the trajectory plot."""
        if self.kind != "flow":
            return None
        sol = solve(self.model, z0.to(self.device), steps, "euler", return_trajectory=True)
        return torch.stack([x.float().cpu() for x in sol.trajectory]).numpy()


def _feature_spaces(shape: tuple[int, ...], settings: EvalSettings, notes: list[str]) -> dict[str, Callable]:
    """Feature extractors for the Fréchet and kernel distances of images: name -> f(images) -> (N, D)."""
    spaces: dict[str, Callable] = {}
    if not is_image(shape):
        return spaces
    if shape == (1, 8, 8):
        spaces["digits"] = digits_feature_extractor()
    if settings.inception_weights is not None:
        from reflow.eval.metrics import inception_features

        weights = settings.inception_weights
        spaces["inception"] = lambda x: inception_features(x, weights)
    else:
        notes.append("Inception FID/KID skipped: it needs --inception-weights PATH (nothing can be downloaded here)")
    return spaces


def digits_feature_extractor() -> Callable[[torch.Tensor], np.ndarray]:
    """f(images (N, 1, 8, 8) in [-1, 1]) -> (N, 64) features of the bundled digits network, scaled by one
    constant so that the 1797 real digits have unit variance per dimension on average (FD and KID then
    read in units of the real digits' spread rather than of the network's arbitrary activation scale)."""
    from reflow.eval.features import bundled_digits_net, extract_features
    from reflow.folders.data import load_digits_array

    net = bundled_digits_net()
    real = extract_features(net, load_digits_array())
    scale = 1.0 / float(np.sqrt(real.var(axis=0, ddof=1).mean()))
    return lambda x: extract_features(net, x) * scale


def _quality(
    x: torch.Tensor,
    ref: torch.Tensor,
    ref_features: dict[str, np.ndarray],
    spaces: dict[str, Callable],
    settings: EvalSettings,
    seed: int,
) -> dict[str, float]:
    from reflow.eval.metrics import frechet_distance, kernel_distance, w2

    out: dict[str, float] = {}
    if len(x) * len(ref) <= settings.w2_max_cells:
        out["w2"] = w2(x, ref)
    for name, extract in spaces.items():
        f = extract(x)
        out[f"fd_{name}"] = frechet_distance(f, ref_features[name])
        out[f"kid_{name}"] = kernel_distance(
            f, ref_features[name], subsets=settings.kid_subsets, subset_size=settings.kid_subset_size, seed=seed
        )[0]
    return out


def _over_seeds(per_seed: list[dict[str, float]]) -> dict[str, Any]:
    """Mean, spread (sample standard deviation; 0 for one seed) and the values of each metric."""
    out: dict[str, Any] = {}
    for key in per_seed[0]:
        values = [d[key] for d in per_seed]
        out[key] = float(np.mean(values))
        out[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        out[f"{key}_seeds"] = values
    return out


@dataclass
class _Heldout:
    path: str
    z0: torch.Tensor
    z1: torch.Tensor
    provenance: dict[str, Any]
    cond: torch.Tensor | None  # the rows' class labels or prompt embeddings
    conditioning: str | None


def _fidelity_pairs(settings: EvalSettings, shape: tuple[int, ...]) -> _Heldout:
    from reflow.pairs.generate import PairsReader

    reader = PairsReader(settings.heldout, max_rows=settings.num_fidelity)
    if tuple(reader.sample_shape) != shape:
        raise ReflowError(
            f"held-out pairs {settings.heldout} hold samples of shape {tuple(reader.sample_shape)}, "
            f"the models make {shape}"
        )
    if reader.conditioning == "text" and not reader.has_embeddings:
        from reflow.models.text import PromptEncoder

        teacher = (reader.provenance.get("teacher") or {}).get("teacher", "")
        encoder = PromptEncoder(teacher, allow_pickle=settings.allow_pickle)
        reader.attach_prompt_embeddings(encoder(reader.unique_prompts()))
    z0, z1, cond = reader.batch(torch.arange(len(reader)))
    if is_image(shape) and reader.conditioning != "text":
        z1 = z1.clamp(-1, 1)
    value = next(iter(cond.values())) if cond else None
    return _Heldout(settings.heldout, z0, z1, reader.provenance, value, reader.conditioning)


def _guidance(path: Path, settings: EvalSettings, heldout: _Heldout | None) -> dict[str, Any]:
    """The guidance settings a diffusers checkpoint is sampled with: the command line's, else those the
    held-out pairs were made with (so the teacher row is the teacher the student learned from)."""
    if not (path / "model_index.json").is_file() or is_flow_pipeline(path):
        return {}
    text = is_text_pipeline(path)
    recorded: dict[str, Any] = {}
    if heldout is not None:
        teacher = heldout.provenance.get("teacher") or {}
        recorded = {**(teacher.get("overrides") or {})}
        for key in ("guidance_scale", "negative_prompt"):
            if key in teacher:
                recorded.setdefault(key, teacher[key])
    given = {"guidance_scale": settings.guidance_scale, "null_label": settings.null_label}
    given["negative_prompt"] = settings.negative_prompt
    keys = ("guidance_scale", "negative_prompt") if text else ("guidance_scale", "null_label")
    out = {}
    for key in keys:
        value = given[key] if given[key] is not None else recorded.get(key)
        if value is not None:
            out[key] = value
    return out


def _conditions(model: _Model, n: int, heldout: _Heldout | None, source_labels: torch.Tensor | None):
    """The conditioning of the n quality samples: class labels cycling over the classes (balanced), or the
    held-out pairs' prompt embeddings cycling over their rows."""
    if model.conditioning is None:
        return None
    if model.conditioning == "class":
        if heldout is not None and heldout.conditioning == "class":
            choices = sorted(set(heldout.cond.tolist()))
        elif source_labels is not None:
            choices = sorted(set(source_labels.tolist()) & set(model.label_choices))
        else:
            choices = list(model.label_choices)
        return torch.tensor([choices[i % len(choices)] for i in range(n)], dtype=torch.long)
    if heldout is None or heldout.conditioning != "text":
        raise ReflowError("a text-to-image model is evaluated on prompts: pass --heldout PAIRS made by its teacher")
    idx = torch.arange(n) % len(heldout.cond)
    return heldout.cond[idx]


def _per_class(
    x: torch.Tensor, labels: torch.Tensor, ref: torch.Tensor, ref_labels: torch.Tensor | None, digits: bool
) -> dict[str, Any]:
    """Classifier agreement (the bundled digits network, for digits) and W2 to the reference rows of the same
    class (where the reference is labelled), per requested class and overall."""
    from reflow.eval.metrics import w2

    out: dict[str, Any] = {}
    predicted = None
    if digits:
        from reflow.eval.features import bundled_digits_net, classify

        predicted = torch.from_numpy(classify(bundled_digits_net(), x))
        out["agreement"] = float((predicted == labels).double().mean())
    classes: dict[str, Any] = {}
    for c in sorted(set(labels.tolist())):
        mine = labels == c
        cell: dict[str, float] = {"samples": int(mine.sum())}
        if predicted is not None:
            cell["agreement"] = float((predicted[mine] == c).double().mean())
        if ref_labels is not None and int((ref_labels == c).sum()) >= 2 and int(mine.sum()) >= 2:
            cell["w2"] = w2(x[mine], ref[ref_labels == c])
        classes[str(c)] = cell
    out["classes"] = classes
    if predicted is not None:
        out["agreement_min_class"] = min(v["agreement"] for v in classes.values())
    if classes and all("w2" in v for v in classes.values()):
        out["w2_class_mean"] = float(np.mean([v["w2"] for v in classes.values()]))
    return out


def _is_pairs(path: str) -> bool:
    """A folder written by `reflow generate` (its reflow_pairs.json); a damaged one is opened later and
    refused with its own line rather than taken for a data source."""
    p = Path(path)
    if not p.is_dir():
        return False
    if (p / "reflow_pairs.json").is_file():
        return True
    from reflow.pairs.generate import _open_pairs_dataset

    try:  # a folder with z0 and z1 columns made elsewhere
        _open_pairs_dataset(p)
    except ReflowError:
        return False
    return True


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
    """Evaluate every model on the same noise, reference and held-out pairs (see the module docstring)."""
    settings.check()
    paths = [Path(m) for m in ([models] if isinstance(models, (str, Path)) else models)]
    if not paths:
        raise ReflowError("pass at least one --model")
    if settings.heldout is None and _is_pairs(settings.reference):
        settings.heldout = settings.reference
    notes: list[str] = []
    names = model_names(paths)

    def report(stage: str, done: int, total: int) -> None:
        if progress:
            progress(stage, done, total)

    source = load_source(settings.reference)
    shape = tuple(source.sample_shape)
    ref = source.reference(settings.num_samples).float()
    ref_labels = source.reference_labels(settings.num_samples)
    # per-class W2 compares with every labelled row of the class, however few samples the overall W2 uses
    class_ref = source.data if source.labels is not None else ref
    class_labels = source.labels
    spaces = _feature_spaces(shape, settings, notes)
    ref_features = {name: extract(ref) for name, extract in spaces.items()}
    if len(ref) * settings.num_samples > settings.w2_max_cells:
        notes.append(
            f"exact W2 skipped: {settings.num_samples} x {len(ref)} samples exceed the {settings.w2_max_cells:,}-cell "
            "cost matrix limit; lower --num-samples for it"
        )
    fidelity = None
    if settings.heldout is not None:
        fidelity = _fidelity_pairs(settings, shape)
    else:
        notes.append("fidelity to the teacher skipped: pass held-out pairs with --heldout PAIRS")

    noise = {s: row_noise(s, range(settings.num_samples), shape) for s in settings.seeds}
    diag_z0 = noise[settings.seeds[0]][: settings.diagnostics_samples]
    grid_z0 = fidelity.z0[:GRID_COLUMNS] if fidelity is not None else noise[settings.seeds[0]][:GRID_COLUMNS]
    results, pictures = [], {"sample_shape": list(shape), "models": {}}
    latent = fidelity is not None and fidelity.conditioning == "text"
    if is_image(shape) and not latent:
        pictures["teacher_row"] = fidelity.z1[:GRID_COLUMNS].numpy() if fidelity is not None else None
    else:
        pictures["reference"] = ref[:SCATTER_POINTS].numpy()

    total = len(paths) * (len(settings.nfes) + 2)
    done = 0
    digits = shape == (1, 8, 8)
    for name, path in zip(names, paths, strict=True):
        model = _Model(path, settings, device, _guidance(path, settings, fidelity))
        if model.sample_shape != shape:
            raise ReflowError(
                f"{path} makes samples of shape {model.sample_shape} but {settings.reference} holds {shape}"
            )
        if fidelity is not None and model.conditioning != fidelity.conditioning:
            raise ReflowError(
                f"{path} is {model.conditioning or 'unconditional'} but the held-out pairs {fidelity.path} are "
                f"{fidelity.conditioning or 'unconditional'}; pass matching pairs with --heldout"
            )
        cond = _conditions(model, settings.num_samples, fidelity, ref_labels)
        held_cond = fidelity.cond if fidelity is not None else None
        grid_cond = (
            held_cond[:GRID_COLUMNS] if held_cond is not None else (cond[:GRID_COLUMNS] if cond is not None else None)
        )
        entry: dict[str, Any] = {"name": name, "model": str(path), "kind": model.kind, "solver": model.solver}
        if model.conditioning is not None:
            entry["conditioning"] = model.conditioning
        entry["nfe"] = {}
        pics: dict[str, Any] = {"rows": {}, "scatter": {}}
        for k in settings.nfes:
            t0 = time.perf_counter()
            per_seed, per_class = [], []
            for s in settings.seeds:
                x = model.sample(noise[s], k, cond)
                per_seed.append(_quality(x, ref, ref_features, spaces, settings, s))
                if model.conditioning == "class":
                    per_class.append(_per_class(x, cond, class_ref, class_labels, digits))
                if s == settings.seeds[0] and not is_image(shape):
                    pics["scatter"][str(k)] = x[:SCATTER_POINTS].numpy()
            if per_class:
                for d, c in zip(per_seed, per_class, strict=True):
                    d.update({key: v for key, v in c.items() if key != "classes"})
            cell = _over_seeds(per_seed)
            if per_class:
                cell["classes"] = per_class[0]["classes"]  # the first seed's breakdown
            if fidelity is not None:
                cell["mse_teacher"] = float(((model.sample(fidelity.z0, k, held_cond) - fidelity.z1) ** 2).mean())
            cell["seconds"] = time.perf_counter() - t0
            entry["nfe"][str(k)] = cell
            if is_image(shape) and not latent:  # latents would need the VAE to be pictures
                pics["rows"][str(k)] = model.sample(grid_z0, k, grid_cond).numpy()
            done += 1
            report(f"eval {name}", done, total)
        seed = settings.seeds[0]
        solved = model.reference_solve(noise[seed], cond)
        if solved is not None:
            quality = _quality(solved[0], ref, ref_features, spaces, settings, seed)
            if model.conditioning == "class":
                quality.update(
                    {
                        k: v
                        for k, v in _per_class(solved[0], cond, class_ref, class_labels, digits).items()
                        if k != "classes"
                    }
                )
            cell = {"solver": solved[2], "nfe": solved[1], "seed": seed, **quality}
            if fidelity is not None:
                z1 = model.reference_solve(fidelity.z0, held_cond)[0]
                cell["mse_teacher"] = float(((z1 - fidelity.z1) ** 2).mean())
            entry["reference_solve"] = cell
        done += 1
        report(f"eval {name}", done, total)
        diag = model.diagnostics(diag_z0, cond[: len(diag_z0)] if cond is not None else None)
        if diag is not None:
            entry.update(
                straightness=diag["straightness"],
                curvature=diag["curvature"],
                adaptive_nfe=diag["adaptive_nfe"],
                adaptive_tol=settings.adaptive_tol,
                straightness_steps=diag["steps"],
                straightness_samples=diag["samples"],
            )
            if not is_image(shape) and shape == (2,):
                pics["trajectories"] = model.trajectories(diag_z0[:TRAJECTORIES])
        done += 1
        report(f"eval {name}", done, total)
        results.append(entry)
        pictures["models"][name] = pics

    settings_out = asdict(settings)
    settings_out.pop("inception_weights")
    metrics = {
        "reflow_version": __version__,
        "settings": settings_out,
        "inception_weights": settings.inception_weights,
        "sample_shape": list(shape),
        "num_reference": len(ref),
        "feature_spaces": {
            name: (
                "reflow's bundled digits CNN (64-d penultimate layer, scaled to unit mean variance on the real digits)"
                if name == "digits"
                else "Inception-v3 pool3 (2048-d)"
            )
            for name in spaces
        },
        "fidelity": None
        if fidelity is None
        else {"pairs": fidelity.path, "rows": len(fidelity.z0), "teacher": fidelity.provenance.get("teacher")},
        "notes": notes,
        "models": results,
    }
    return Evaluation(metrics=metrics, pictures=pictures)


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"
