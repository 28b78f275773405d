"""Drawing samples from a model folder (t = 0 noise, t = 1 data): what `reflow sample` does, as functions.

:func:`sample` loads the model (a flow of ours, or a diffusers DDPM checkpoint sampled as an evaluation
samples it, by :class:`reflow.eval.candidates.Candidate` with its own DDIM at ``nfe`` steps), takes its
noise (seeded rows ``row_noise(seed, i)``, or an array or .npy file of noise), its conditioning (class
labels or prompts, sample i taking entry i mod count), solves in ``nfe`` steps and returns float32 samples
in model space (images clamped to [-1, 1]; latents as they are, or decoded by the VAE).
:func:`check_sample_output` checks before the work that the samples may be written where asked;
:func:`write_samples` writes them (and a PNG grid of image samples)::

    check_sample_output(out, model, noise)
    write_samples(sample(model, nfe=2, num=64, seed=0), out)
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reflow.core.noise import row_noise
from reflow.core.progress import OnCall, Progress, RowsProgress
from reflow.core.sampling import is_image
from reflow.core.sampling import sample as solve_batches
from reflow.core.solvers import SOLVERS, heun_steps_for_nfe
from reflow.errors import ReflowError
from reflow.eval.candidates import Candidate
from reflow.folders.io import claim_output, mark_output, output_owner
from reflow.folders.kinds import is_diffusers_checkpoint
from reflow.folders.runtime import partial_state
from reflow.models.velocity import load_model
from reflow.teachers.scheduler import DIFFUSERS_SOLVERS

PathLike = str | os.PathLike


@dataclass
class SampleResult:
    """What :func:`sample` drew.

    ``samples``: float32 (N, *sample_shape) in model space: (N, 2) for 2-D, (N, C, H, W) in [-1, 1] for
    images, latents for a text-to-image model (decoded images in [-1, 1] with ``decode``). ``labels``: the
    int64 (N,) class labels used, ``prompts``: the N prompts used (None when unconditional). ``nfe``: the
    network calls of the solve. ``record``: the settings the samples were drawn with (model, nfe, solver,
    seed, noise), as :func:`write_samples` records them next to the samples.
    """

    samples: np.ndarray
    labels: np.ndarray | None = None
    prompts: list[str] | None = None
    nfe: int = 0
    record: dict[str, Any] = field(default_factory=dict)


def check_sample_settings(
    nfe: int, *, num: int | None, noise: Any, solver: str | None = None, batch_size: int = 4096
) -> None:
    """The settings of :func:`sample` that need no model: a known solver (None: the model's default), nfe
    and batch size of at least 1, exactly one of ``num`` and ``noise``."""
    if solver is not None and solver not in (*SOLVERS, *DIFFUSERS_SOLVERS):
        raise ReflowError(
            f"--solver must be one of {', '.join(SOLVERS)} (flows) or {', '.join(DIFFUSERS_SOLVERS)} (diffusers)"
        )
    if nfe < 1:
        raise ReflowError(f"--nfe must be at least 1, got {nfe}")
    if (num is None) == (noise is None):
        raise ReflowError("give exactly one of --num (with --seed) or --noise z0.npy")
    if batch_size < 1:
        raise ReflowError(f"--batch-size must be at least 1, got {batch_size}")


def _extras(out: Path) -> list[Path]:
    """The files written next to ``out``: the labels or the prompts used."""
    return [out.with_suffix(".labels.npy"), out.with_suffix(".prompts.txt")]


def check_sample_output(
    out: PathLike, model: PathLike, noise: PathLike | None = None, grid: PathLike | None = None
) -> Path:
    """Check, before the work, that samples may be written to ``out`` (a .npy file), and their picture to
    ``grid`` (a .png file): not an input (the model, the noise file), and neither them nor the .labels.npy /
    .prompts.txt beside ``out`` a file `reflow sample` did not write. Removes the debris of killed earlier
    runs; returns ``out`` as a Path."""
    out = Path(out)
    if out.suffix != ".npy":
        raise ReflowError(f"--out must end in .npy, got {out}")
    claim_output(out, "sample", kind="file", inputs=[model, noise])
    if grid is not None:
        if Path(grid).suffix.lower() != ".png":
            raise ReflowError(f"--grid must end in .png, got {grid}")
        claim_output(grid, "sample", kind="file", inputs=[model, noise], flag="--grid")
    for extra in _extras(out):
        if noise is not None and extra.resolve() == Path(noise).resolve():
            raise ReflowError(f"--out {out} would write {extra}, the --noise input; pick another --out")
        if extra.exists() and output_owner(out, "file") != "sample":
            raise ReflowError(f"{extra} exists and was not written by `reflow sample`; pick a new --out")
    return out


def _read_noise(noise: PathLike) -> np.ndarray:
    path = Path(noise)
    if not path.is_file():
        raise ReflowError(f"no such file: {noise} (pass a .npy array of noise)")
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as e:
        raise ReflowError(f"{noise}: not a plain numeric .npy array ({e})") from None


def _noise(noise: PathLike | np.ndarray | torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """z0 (N, *shape) float32 from a .npy file or an array, checked: numeric, finite, of shape (N, *shape)
    with N >= 1."""
    if isinstance(noise, (np.ndarray, torch.Tensor)):
        name, arr = "the noise array", noise.numpy(force=True) if isinstance(noise, torch.Tensor) else noise
    else:
        name, arr = str(noise), _read_noise(noise)
    if arr.ndim < 1 or tuple(arr.shape[1:]) != shape:
        raise ReflowError(f"{name} has shape {arr.shape}; this model needs (N, {', '.join(map(str, shape))})")
    if len(arr) == 0:
        raise ReflowError(f"{name} holds no rows (shape {arr.shape}); pass at least one noise row")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise ReflowError(f"{name} holds {arr.dtype} values; pass real-valued float noise")
    if not np.isfinite(arr).all():
        raise ReflowError(f"{name} contains NaN or inf values; pass finite noise")
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


def _given(value: Any) -> bool:
    return value is not None and len(value) > 0


def _class_labels(labels: Sequence[int] | str, n: int, num_classes: int) -> torch.Tensor:
    """(n,) int64 labels: sample i gets ``labels[i mod count]``; a string is comma-separated integers."""
    if isinstance(labels, str):
        try:
            classes = [int(v) for v in labels.split(",") if v.strip()]
        except ValueError:
            raise ReflowError(f"--labels takes comma-separated integers like 1,2,4; got {labels!r}") from None
        if not classes:
            raise ReflowError(f"--labels takes comma-separated integers like 1,2,4; got {labels!r}")
    else:
        classes = [int(c) for c in labels]
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ReflowError(f"--labels {bad} out of range: this model has classes 0..{num_classes - 1}")
    return torch.tensor([classes[i % len(classes)] for i in range(n)], dtype=torch.long)


def _prompt_list(prompts: Sequence[str] | PathLike, n: int) -> list[str]:
    """n prompts: sample i gets prompt i mod count; a str or path is a prompts file (.txt, one per line)."""
    from reflow.folders.prompts import read_prompts

    texts = read_prompts(prompts) if isinstance(prompts, (str, os.PathLike)) else list(prompts)
    if not texts:
        raise ReflowError("no prompts given; pass at least one prompt")
    return [texts[i % len(texts)] for i in range(n)]


def _conditioning(
    m: Any, model: PathLike, n: int, labels: Any, prompts: Any, allow_pickle: bool
) -> tuple[dict[str, torch.Tensor] | None, torch.Tensor | None, list[str] | None]:
    """(model keywords, labels used, prompts used) for n samples of the model ``m`` loaded from ``model``."""
    conditioning = getattr(m, "conditioning", None)
    if conditioning == "class":
        if not _given(labels):
            raise ReflowError(f"{model} is class-conditional ({m.num_classes} classes): pass --labels 0,1,2")
        y = _class_labels(labels, n, m.num_classes)
        return {"class_labels": y}, y, None
    if conditioning == "text":
        if prompts is None:
            raise ReflowError(f"{model} is a text-to-image model: pass --prompts FILE (one prompt per line)")
        from reflow.models.text import PromptEncoder

        texts = _prompt_list(prompts, n)
        return {"encoder_hidden_states": PromptEncoder(model, allow_pickle=allow_pickle)(texts)}, None, texts
    if _given(labels) or prompts is not None:
        raise ReflowError(f"{model} is unconditional; drop --labels / --prompts")
    return None, None, None


def _open_model(
    model: PathLike, nfe: int, solver: str | None, batch_size: int, device: Any, allow_pickle: bool
) -> tuple[Any, str]:
    """The model to sample and its solver: a flow of ours (euler, heun or adaptive; default euler), or a
    diffusers checkpoint as an evaluation samples it (its own ddim or dpm at ``nfe`` steps; default ddim)."""
    if is_diffusers_checkpoint(model):
        solver = solver or "ddim"
        if solver not in DIFFUSERS_SOLVERS:
            raise ReflowError(f"{model} is a diffusers checkpoint: it samples with --solver ddim or dpm, not {solver}")
        m = Candidate(
            model, device=device, batch_size=batch_size, teacher_nfe=nfe, teacher_solver=solver,
            allow_pickle=allow_pickle,
        )  # fmt: skip
        return m, solver
    solver = solver or "euler"
    if solver not in SOLVERS:
        raise ReflowError(f"{model} is a flow: it samples with --solver {', '.join(SOLVERS)}, not {solver}")
    flow = load_model(model, allow_pickle=allow_pickle).to(device).eval()
    if getattr(flow, "mean_flow", False) and solver != "euler":
        raise ReflowError(f"{model} is a MeanFlow model: it samples in jumps (solver euler), not {solver}")
    return flow, solver


def _calls_per_sample(m: Any, nfe: int, solver: str) -> int | None:
    """The network calls one sample takes (None for an adaptive solve: not known ahead)."""
    if isinstance(m, Candidate) or solver == "euler":
        return nfe
    return 2 * heun_steps_for_nfe(nfe) - 1 if solver == "heun" else None


def _counting(tell: RowsProgress, n: int, calls: int | None) -> OnCall | None:
    """An ``on_call`` that reports the samples done (network calls over their count per sample)."""
    if tell.sink is None or not calls:
        return None
    done = 0

    def on_call(rows: int) -> None:
        nonlocal done
        done += rows
        if tell.tick():
            tell(min(n, done // calls))

    return on_call


def _solve(m: Any, z0: torch.Tensor, nfe: int, solver: str, cond: dict | None, on_call: OnCall | None, **kw: Any):
    """(z1, network calls) of the model from z0: a checkpoint through its Candidate, a flow in batches."""
    if isinstance(m, Candidate):
        return m.sample(z0, nfe, None if cond is None else next(iter(cond.values()))), nfe
    sol = solve_batches(m, z0, nfe, solver, cond=cond, on_call=on_call, **kw)
    return sol.z1, sol.nfe


def _check_grid(model: PathLike, shape: tuple[int, ...], latent: bool, decode: bool) -> None:
    """A picture grid needs images: (C, H, W) samples in [-1, 1] (a text-to-image model's with --decode)."""
    if not is_image(shape):
        raise ReflowError(f"--grid draws image samples; {model} makes samples of shape {shape}: drop --grid")
    if latent and not decode:
        raise ReflowError(f"--grid draws images; {model} makes latents: add --decode")


def sample(
    model: PathLike,
    nfe: int = 1,
    *,
    num: int | None = None,
    seed: int = 0,
    noise: PathLike | np.ndarray | torch.Tensor | None = None,
    labels: Sequence[int] | str | None = None,
    prompts: Sequence[str] | PathLike | None = None,
    solver: str | None = None,
    batch_size: int = 4096,
    device: torch.device | str | None = None,
    decode: bool = False,
    allow_pickle: bool = False,
    grid: bool = False,
    progress: Progress | None = None,
) -> SampleResult:
    """Draw samples from the model folder ``model`` (a `reflow train` folder, an exported student, or a
    diffusers DDPM checkpoint) in ``nfe`` steps of ``solver``: euler (the default), heun or adaptive for a
    flow; ddim (the default) or dpm, the checkpoint's own scheduler, for a checkpoint.

    Args:
        num, seed: draw ``num`` samples, sample i from ``row_noise(seed, i)``; or
        noise: start from this z0 instead, (N, *sample_shape), an array or a .npy file.
        labels: class-conditional models: the classes (a sequence, or comma-separated "2,0");
            sample i gets label i mod count.
        prompts: text-to-image models: the prompts (a sequence of strings, or a .txt file with one per
            line); sample i gets prompt i mod count.
        batch_size: samples solved at a time; device: where (default: Accelerate's device).
        decode: text-to-image models: return VAE-decoded images in [-1, 1], not latents.
        allow_pickle: load pickle (.bin) weights of a model you trust.
        grid: the samples will be drawn as a picture (:func:`write_samples`): refuse, before solving, a
            model whose samples are not images.
        progress: receives Updates of stage "sample" in samples, from inside the solve.

    Raises :class:`ReflowError` for bad settings or noise, missing or unwanted conditioning, and samples
    with NaN or inf.
    """
    check_sample_settings(nfe, num=num, noise=noise, solver=solver, batch_size=batch_size)
    device = partial_state().device if device is None else device
    m, solver = _open_model(model, nfe, solver, batch_size, device, allow_pickle)
    shape = tuple(m.sample_shape)
    if noise is None and num < 1:
        raise ReflowError(f"--num must be at least 1, got {num}")
    z0 = row_noise(seed, range(num), shape) if noise is None else _noise(noise, shape)
    cond, y, texts = _conditioning(m, model, len(z0), labels, prompts, allow_pickle)
    latent = getattr(m, "conditioning", None) == "text"
    if decode and not latent:
        raise ReflowError("--decode applies to text-to-image (latent) models only")
    if grid:
        _check_grid(model, shape, latent, decode)
    tell = RowsProgress(progress, "sample", len(z0), "samples")
    tell(0)
    on_call = _counting(tell, len(z0), _calls_per_sample(m, nfe, solver))
    if isinstance(m, Candidate):
        m.on_call = on_call
    z1, calls = _solve(m, z0, nfe, solver, cond, on_call, batch_size=batch_size, device=device, clamp=not latent)
    tell(len(z0))
    if decode:
        from reflow.models.text import decode_latents

        z1 = decode_latents(model, z1, allow_pickle=allow_pickle)
    bad = int((~torch.isfinite(z1)).flatten(1).any(1).sum())
    if bad:
        raise ReflowError(f"{model} produced NaN or inf in {bad} of {len(z1)} samples; nothing written (check it)")
    source = None if noise is None else str(noise) if isinstance(noise, (str, os.PathLike)) else "<array>"
    record = {"model": str(model), "nfe": nfe, "solver": solver, "seed": seed if noise is None else None}
    return SampleResult(
        samples=z1.numpy().astype(np.float32),
        labels=None if y is None else y.numpy(),
        prompts=texts,
        nfe=calls,
        record={**record, "noise": source},
    )


def write_samples(result: SampleResult, out: PathLike, grid: PathLike | None = None) -> Path:
    """Write ``result`` to ``out`` (.npy, float32), its labels to .labels.npy or its prompts to .prompts.txt
    beside it (one per line), each atomically, and the marker that `reflow sample` wrote them (with
    ``result.record`` and the count); with ``grid``, also a PNG of the images there (rows of
    ``GRID_COLUMNS``, see :func:`reflow.eval.report.grid_png`). Check ``out`` (and ``grid``) first with
    :func:`check_sample_output`."""
    from reflow.eval.report import grid_png
    from reflow.folders.io import atomic_write_bytes  # looked up at call time: tests replace it

    out = Path(out)
    if grid is not None:
        if not is_image(tuple(result.samples.shape[1:])):
            raise ReflowError(f"--grid draws image samples; these have shape {result.samples.shape[1:]}: drop --grid")
        atomic_write_bytes(Path(grid), grid_png(result.samples))
    labels_file, prompts_file = _extras(out)
    if result.labels is not None:
        atomic_write_bytes(labels_file, _npy_bytes(result.labels))
    if result.prompts is not None:
        atomic_write_bytes(prompts_file, ("\n".join(result.prompts) + "\n").encode())
    atomic_write_bytes(out, _npy_bytes(result.samples))
    record = result.record
    info = {
        "model": record.get("model"), "nfe": record.get("nfe"), "solver": record.get("solver"),
        "count": len(result.samples), "seed": record.get("seed"), "noise": record.get("noise"),
    }  # fmt: skip
    mark_output(out, "sample", kind="file", **info)
    if grid is not None:
        mark_output(grid, "sample", kind="file", **info)
    return out


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()
