"""reflow: turn slow diffusion models into fast few-step generators by rectified-flow distillation.

Time convention everywhere: t = 0 is noise, t = 1 is data.

Progress shows as a live bar on a terminal, and as timestamped lines (each stage's start, every 10% or
30 s with its rate and ETA, its end) when output goes to a file or a pipe; --quiet shows none, --log-file
keeps the lines. Under torchrun or accelerate launch only the main process prints.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TextIO

import typer
from rich.console import Console
from rich.table import Table

from reflow.cli.progress import Reporter, is_main
from reflow.core.progress import Progress, StageProgress
from reflow.errors import ReflowError
from reflow.version import __version__

app = typer.Typer(
    help=__doc__,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    # click's plain help: it wraps to any width (rich's option table cuts long option names at 80 columns)
    rich_markup_mode=None,
)
console = Console(soft_wrap=True)  # a path or figure line is never broken mid-word
err_console = Console(stderr=True)


@dataclass
class _Output:
    """The global options of this invocation: ``--quiet``, and the ``--log-file`` with a console on it."""

    quiet: bool = False
    log: TextIO | None = None
    log_console: Console | None = None


OUTPUT = _Output()


def show(*objects: Any) -> None:
    """Print results on stdout (the launch's main process only) and into the --log-file."""
    if is_main():
        console.print(*objects)
    if OUTPUT.log_console is not None:
        OUTPUT.log_console.print(*objects)


@contextmanager
def progress_shown() -> Iterator[Progress]:
    """The progress callback of a command: a live bar when stderr is a terminal, timestamped lines when it
    is not, nothing on screen with --quiet, lines into the --log-file; only on the launch's main process (rank 0)."""
    if not is_main():
        yield lambda update: None
        return
    terminal = err_console.is_terminal
    live = err_console if terminal and not OUTPUT.quiet else None
    streams = [] if terminal or OUTPUT.quiet else [sys.stderr]
    if OUTPUT.log is not None:
        streams.append(OUTPUT.log)
    reporter = Reporter(live, streams)
    finished = False
    try:
        yield reporter
        finished = True
    finally:
        reporter.close(finished)


def _quiet_libraries() -> None:
    import datasets
    import diffusers

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


def _fail(message: str) -> typer.Exit:
    from rich.markup import escape

    err_console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    if OUTPUT.log_console is not None:
        OUTPUT.log_console.print(f"error: {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code=2)


def user_errors(fn):
    """Show a ReflowError, a full disk or a read-only file system as one red line and exit with code 2;
    anything else is a bug with a traceback. Outputs are written through temporary names, so a failed
    write leaves nothing half-written; finished shards and checkpoints are kept for a rerun."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from reflow.folders.io import disk_error_reason, is_disk_error

        try:
            _quiet_libraries()
            return fn(*args, **kwargs)
        except ReflowError as e:
            raise _fail(str(e)) from None
        except Exception as e:
            if not is_disk_error(e):
                raise
            where = f": {e.filename}" if getattr(e, "filename", None) else ""
            raise _fail(
                f"{disk_error_reason(e)}{where}; free disk space or pick a location you can write, then rerun "
                "the same command (finished work is kept)"
            ) from None

    return wrapper


def _device():
    from reflow.folders.runtime import partial_state

    return partial_state().device


def _parse_ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ReflowError(f"{flag} takes comma-separated integers like 1,2,4; got {text!r}") from None
    if not values:
        raise ReflowError(f"{flag} takes comma-separated integers like 1,2,4; got {text!r}")
    return values


def _parse_nfes(text: str) -> list[int]:
    values = _parse_ints(text, "--nfe")
    if any(v < 1 for v in values):
        raise ReflowError(f"--nfe takes positive step counts like 1,2,4; got {text!r}")
    return values


# Options shared by the training commands.
MaxSteps = Annotated[int | None, typer.Option(help="Optimizer steps.", rich_help_panel="Training")]
BatchSize = Annotated[
    int | None, typer.Option(help="Global batch per step (all processes).", rich_help_panel="Training")
]
Lr = Annotated[
    float | None, typer.Option(help="Peak learning rate (AdamW, warmup then cosine).", rich_help_panel="Training")
]
Seed = Annotated[int | None, typer.Option(help="Seed of the data order, noise and times.", rich_help_panel="Training")]
CheckpointEvery = Annotated[
    int | None, typer.Option(help="Save a resumable checkpoint every N steps.", rich_help_panel="Training")
]
Resume = Annotated[
    bool,
    typer.Option("--resume", help="Continue from the newest checkpoint of this --out.", rich_help_panel="Training"),
]
MixedPrecision = Annotated[
    str | None, typer.Option(help="no, fp16 or bf16 (a no-op on CPU).", rich_help_panel="Training")
]
ConfigFile = Annotated[
    Path | None,
    typer.Option(
        "--config", help="TOML file with any training setting; flags override it.", rich_help_panel="Training"
    ),
]
TimeSampler = Annotated[
    str | None,
    typer.Option(help="Training-time distribution: uniform, logit_normal, u_shaped.", rich_help_panel="Method"),
]
Loss = Annotated[
    str | None,
    typer.Option(
        help="auto (l2 from --data, pseudo_huber on pairs), l2, pseudo_huber; to distill or with --objective "
        "meanflow also lpips or lpips_huber (need --perceptual-weights).",
        rich_help_panel="Method",
    ),
]
PerceptualWeights = Annotated[
    Path | None,
    typer.Option(
        help="Feature network of --loss lpips / lpips_huber: a folder with config.json and model.safetensors "
        "(data/perceptual/digits-lpips for 8x8 digits). Nothing is downloaded.",
        rich_help_panel="Method",
    ),
]
DropFarthest = Annotated[
    float | None,
    typer.Option(
        help="Pairs: drop this fraction with the largest |z1 - z0| (decided once over all pairs; recorded).",
        rich_help_panel="Method",
    ),
]
PairsInMemory = Annotated[
    str | None,
    typer.Option(
        help="Pairs: auto (read into memory when they fit a quarter of the available memory), yes, or no "
        "(stream from the memory-mapped files); the batches are the same either way.",
        rich_help_panel="Training",
    ),
]
EmaDecay = Annotated[float | None, typer.Option(help="EMA decay of the saved weights.", rich_help_panel="Method")]
MaxPairs = Annotated[
    int | None, typer.Option(help="Train on the first N pairs only (default: all).", rich_help_panel="Method")
]
LogWith = Annotated[
    str | None,
    typer.Option(
        help="Accelerate trackers: auto (tensorboard when installed), none, tensorboard, wandb, all. "
        "Logs go to OUT.logs/.",
        rich_help_panel="Training",
    ),
]
AllowPickle = Annotated[
    bool,
    typer.Option("--allow-pickle", help="Load pickle (.bin) weights of --init you trust.", rich_help_panel="Model"),
]
AllowPickleModels = Annotated[
    bool,
    typer.Option("--allow-pickle", help="Load pickle (.bin) weights of models you trust (ours never need it)."),
]


def _training_config(flags: dict, **renamed: str):
    """A TrainConfig from a training command's flags (its ``locals()``): paths as strings; flags left unset
    (None, or False for --resume / --allow-pickle) come from the --config file or the defaults; set flags
    win over the file. ``renamed``: flag name -> TrainConfig name (distill's --k is ``distill_k``)."""
    from reflow.student import TrainConfig

    flags = dict(flags)
    config_file = flags.pop("config")
    for flag, name in renamed.items():
        flags[name] = flags.pop(flag)
    overrides = {k: str(v) if isinstance(v, Path) else v for k, v in flags.items() if v is not None and v is not False}
    if config_file is not None:
        return TrainConfig.from_toml(config_file, **overrides)
    return TrainConfig(**overrides)


def _run_training(config, stage: str) -> None:
    from reflow.student import train

    with progress_shown() as progress:
        result = train(config, progress=StageProgress(progress, stage).steps)
    if result.already_complete:
        show(
            f"[bold]{result.out}[/bold] already complete: {result.steps} steps, final loss {result.loss:.4g}; "
            "nothing to do"
        )
        return
    show(
        f"wrote [bold]{result.out}[/bold]: {result.steps} steps, final loss {result.loss:.4g}, "
        f"{result.samples_per_second:,.0f} samples/s"
    )


@app.command("train", short_help="Train a flow from data (round 1) or from teacher pairs.")
@user_errors
def train_cmd(
    out: Annotated[Path, typer.Option(help="Model folder to write (an image model: a diffusers pipeline).")],
    data: Annotated[
        str | None,
        typer.Option(
            help="Round 1 from data: checkerboard, moons, 8gaussians, digits, a .npy file or a save_to_disk folder."
        ),
    ] = None,
    pairs: Annotated[Path | None, typer.Option(help="Reflow round: a pairs folder from `reflow generate`.")] = None,
    init: Annotated[
        Path | None,
        typer.Option(
            help="Start from a reflow model or a diffusers DDPM checkpoint (its UNet becomes the velocity model).",
            rich_help_panel="Model",
        ),
    ] = None,
    model_config: Annotated[
        Path | None,
        typer.Option(
            help="JSON config of a fresh model (a UNet2DModel or MLPVelocity config.json) when there is no --init.",
            rich_help_panel="Model",
        ),
    ] = None,
    max_steps: MaxSteps = None,
    batch_size: BatchSize = None,
    lr: Lr = None,
    seed: Seed = None,
    checkpoint_every: CheckpointEvery = None,
    resume: Resume = False,
    mixed_precision: MixedPrecision = None,
    log_with: LogWith = None,
    config: ConfigFile = None,
    time_sampler: TimeSampler = None,
    loss: Loss = None,
    ema_decay: EmaDecay = None,
    max_pairs: MaxPairs = None,
    objective: Annotated[
        str | None,
        typer.Option(
            help="velocity (flow matching) or meanflow (the average velocity over [t, s]: one jump is exact).",
            rich_help_panel="Method",
        ),
    ] = None,
    equal_fraction: Annotated[
        float | None,
        typer.Option(
            help="MeanFlow: fraction of rows with s = t (default 0.75); the rest s > t.", rich_help_panel="Method"
        ),
    ] = None,
    drop_farthest: DropFarthest = None,
    perceptual_weights: PerceptualWeights = None,
    pairs_in_memory: PairsInMemory = None,
    coupling: Annotated[
        str | None,
        typer.Option(
            help="From --data: independent (default), ot (exact minibatch OT per batch, POT) or sinkhorn "
            "(entropic OT, for large batches).",
            rich_help_panel="Method",
        ),
    ] = None,
    sinkhorn_reg: Annotated[
        float | None,
        typer.Option(help="--coupling sinkhorn: regularisation, relative to the mean cost.", rich_help_panel="Method"),
    ] = None,
    allow_pickle: AllowPickle = False,
) -> None:
    """Train a flow: from data (round 1, independent or minibatch-OT coupling) or from teacher pairs (reflow);
    --objective meanflow trains a MeanFlow student."""
    _run_training(_training_config(locals()), "train")


@app.command("distill", short_help="Distill a student into a k-step generator.")
@user_errors
def distill_cmd(
    pairs: Annotated[Path, typer.Option(help="The teacher's pairs (z0 -> z1) to distill onto.")],
    init: Annotated[Path, typer.Option(help="The reflow student to start from.", rich_help_panel="Model")],
    out: Annotated[Path, typer.Option(help="Model folder to write.")],
    k: Annotated[int, typer.Option(help="Steps of the distilled sampler (its Euler grid is the student's).")] = 1,
    max_steps: MaxSteps = None,
    batch_size: BatchSize = None,
    lr: Lr = None,
    seed: Seed = None,
    checkpoint_every: CheckpointEvery = None,
    resume: Resume = False,
    mixed_precision: MixedPrecision = None,
    log_with: LogWith = None,
    config: ConfigFile = None,
    loss: Loss = None,
    ema_decay: EmaDecay = None,
    max_pairs: MaxPairs = None,
    drop_farthest: DropFarthest = None,
    perceptual_weights: PerceptualWeights = None,
    pairs_in_memory: PairsInMemory = None,
    allow_pickle: AllowPickle = False,
) -> None:
    """Distill a student into a k-step generator: regress its k-step Euler output from z0 onto the teacher's z1."""
    _run_training(_training_config(locals(), k="distill_k"), "distill")


@app.command("generate", short_help="Run a teacher on seeded noise and store the pairs.")
@user_errors
def generate_cmd(
    teacher: Annotated[Path, typer.Option(help="Teacher: a reflow model folder or a diffusers pipeline folder.")],
    out: Annotated[Path, typer.Option(help="Pairs folder to write (datasets save_to_disk).")],
    num_pairs: Annotated[int, typer.Option(help="Number of (z0, z1) pairs.")],
    nfe: Annotated[
        int | None, typer.Option(help="Teacher network calls per sample (default: 50 diffusers, 100 flow).")
    ] = None,
    solver: Annotated[
        str | None,
        typer.Option(
            help="Diffusers: ddim (eta=0) or dpm (DPM-Solver++). Flow: euler, heun or adaptive. (default: ddim / euler)"
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Noise seed: z0 of row i depends on (seed, i) only.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Rows per teacher batch.")] = 256,
    dtype: Annotated[str, typer.Option(help="Storage dtype: float32 or float16.")] = "float32",
    shard_size: Annotated[int | None, typer.Option(help="Rows per shard (the unit of resume).")] = None,
    labels: Annotated[
        str | None,
        typer.Option(help="Class-conditional teachers: comma-separated classes to draw from (default: all)."),
    ] = None,
    timestep_spacing: Annotated[
        str | None,
        typer.Option(help="Diffusers: override the scheduler's timestep spacing (leading, trailing, linspace)."),
    ] = None,
    clip_sample: Annotated[
        bool | None, typer.Option("--clip-sample/--no-clip-sample", help="Diffusers DDIM: override clipping of x0.")
    ] = None,
    autocast: Annotated[
        str | None,
        typer.Option(help="Diffusers on GPU: run the UNet under bf16 or fp16 autocast (recorded: it changes samples)."),
    ] = None,
    compile_: Annotated[bool, typer.Option("--compile", help="Diffusers: torch.compile the UNet.")] = False,
    guidance_scale: Annotated[
        float | None,
        typer.Option(help="Conditional diffusers teachers: classifier-free guidance scale baked into the pairs."),
    ] = None,
    null_label: Annotated[
        int | None,
        typer.Option(help="Class-conditional guidance: the checkpoint's unconditional class (if not declared)."),
    ] = None,
    clipped_model_output: Annotated[
        bool,
        typer.Option(
            "--clipped-model-output",
            help="Diffusers DDIM: recompute the noise from the clipped x0 each step (keeps guidance from saturating).",
        ),
    ] = False,
    prompts: Annotated[
        Path | None,
        typer.Option(help="Text-to-image teachers: prompts, a .txt file (one per line) or a datasets folder."),
    ] = None,
    prompt_column: Annotated[str, typer.Option(help="The prompt column of a --prompts datasets folder.")] = "prompt",
    negative_prompt: Annotated[
        str | None, typer.Option(help="Text-to-image teachers: the negative prompt of guidance (default: empty).")
    ] = None,
    store_embeddings: Annotated[
        bool,
        typer.Option(
            "--store-embeddings/--store-prompts-only",
            help="Text pairs: store each row's prompt embeddings (default) or only the prompt (re-encoded).",
        ),
    ] = True,
    store_z0: Annotated[
        bool,
        typer.Option(
            "--store-z0", help="Also store z0 (default: readers rebuild it from the seed and each row's index)."
        ),
    ] = False,
    round_: Annotated[int, typer.Option("--round", help="Reflow round these pairs train (recorded).")] = 1,
    push_to_hub: Annotated[
        str | None, typer.Option(help="Also upload the finished pairs to this Hub dataset repo.")
    ] = None,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Load pickle weights you trust.")] = False,
) -> None:
    """Run a teacher on seeded noise and store the coupled pairs (sharded; rerun the same command to resume)."""
    from reflow.folders.prompts import read_prompts
    from reflow.pairs import check_generate_args, generate_pairs
    from reflow.teachers import load_teacher

    check_generate_args(num_pairs=num_pairs, batch_size=batch_size, shard_size=shard_size, dtype=dtype, seed=seed)
    if nfe is not None and nfe < 1:
        raise ReflowError(f"--nfe must be at least 1, got {nfe}")
    settings = (
        ("timestep_spacing", timestep_spacing),
        ("clip_sample", clip_sample),
        ("autocast", autocast),
        ("guidance_scale", guidance_scale),
        ("null_label", null_label),
        ("negative_prompt", negative_prompt),
    )
    overrides = {k: v for k, v in settings if v is not None}
    if compile_:
        overrides["compile"] = True
    if clipped_model_output:
        overrides["clipped_model_output"] = True
    prompt_list = read_prompts(prompts, prompt_column) if prompts is not None else None
    t = load_teacher(teacher, nfe=nfe, solver=solver, device=_device(), allow_pickle=allow_pickle, **overrides)
    with progress_shown() as progress:
        path = generate_pairs(
            t,
            out,
            num_pairs,
            seed=seed,
            batch_size=batch_size,
            dtype=dtype,
            shard_size=shard_size,
            round_=round_,
            labels=_parse_ints(labels, "--labels") if labels else None,
            prompts=prompt_list,
            store_embeddings=store_embeddings,
            store_z0=store_z0,
            push_to_hub=push_to_hub,
            progress=StageProgress(progress, "generate").pairs,
        )
    show(f"wrote [bold]{path}[/bold]: {num_pairs} pairs")


@app.command("verify-pairs", short_help="Re-run the recorded teacher on some rows and compare.")
@user_errors
def verify_pairs_cmd(
    pairs: Annotated[Path, typer.Argument(help="Pairs folder written by `reflow generate`.")],
    rows: Annotated[int, typer.Option(help="Rows to re-run through the teacher.")] = 16,
    seed: Annotated[int, typer.Option(help="Which rows: a random choice with this seed.")] = 0,
    atol: Annotated[
        float | None, typer.Option(help="Largest difference accepted (default: 1e-4 float32, 2e-3 float16).")
    ] = None,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Load pickle weights you trust.")] = False,
) -> None:
    """Re-run the recorded teacher on sampled rows and report the largest difference (exit 1 if too large)."""
    from reflow.pairs import verify_pairs

    with progress_shown() as progress:
        report = verify_pairs(pairs, rows, seed=seed, device=_device(), allow_pickle=allow_pickle, progress=progress)
    if report["files_checked"]:
        show(f"files: {report['files_checked']} match their recorded sha256")
    tol = atol if atol is not None else (1e-4 if report["dtype"] == "float32" else 2e-3)
    table = Table(title=f"{pairs}: {report['rows']} rows re-run ({report['solver']}, nfe {report['nfe']})")
    table.add_column("column")
    table.add_column("max |stored - recomputed|", justify="right")
    z0_diff = report["max_abs_diff_z0"]
    table.add_row("z0", "not stored (rebuilt)" if z0_diff is None else f"{z0_diff:.3g}")
    table.add_row("z1", f"{report['max_abs_diff_z1']:.3g}")
    show(table)
    worst = max(z0_diff or 0.0, report["max_abs_diff_z1"])
    if worst > tol:
        err_console.print(f"[red]mismatch:[/red] {worst:.3g} > {tol:.3g}")
        if OUTPUT.log_console is not None:
            OUTPUT.log_console.print(f"mismatch: {worst:.3g} > {tol:.3g}")
        raise typer.Exit(code=1)
    show(f"ok: within {tol:.3g}")


@app.command("sample", short_help="Draw samples from a model in K network calls.")
@user_errors
def sample_cmd(
    model: Annotated[Path, typer.Option(help="Model folder: ours, or a diffusers DDPM checkpoint.")],
    out: Annotated[Path, typer.Option(help="Where to write the samples (.npy, float32, model space).")],
    nfe: Annotated[
        int,
        typer.Option(
            help="Network calls: Euler steps on the model's grid (uniform; for an image student, its "
            "scheduler's); a diffusers checkpoint's own DDIM steps."
        ),
    ] = 1,
    num: Annotated[int | None, typer.Option(help="Number of samples (with --seed).")] = None,
    seed: Annotated[int, typer.Option(help="Noise seed: sample i starts from row_noise(seed, i).")] = 0,
    noise: Annotated[Path | None, typer.Option(help="Start from this z0 array (.npy) instead of --num/--seed.")] = None,
    solver: Annotated[
        str | None,
        typer.Option(help="Flows: euler (default), heun or adaptive. Diffusers checkpoints: ddim (default) or dpm."),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Samples per batch.")] = 4096,
    labels: Annotated[
        str | None,
        typer.Option(help="Class-conditional models: comma-separated classes; sample i gets label i mod count."),
    ] = None,
    prompts: Annotated[
        Path | None,
        typer.Option(help="Text-to-image models: prompts (.txt, one per line); sample i gets prompt i mod count."),
    ] = None,
    decode: Annotated[
        bool, typer.Option("--decode", help="Text-to-image models: write VAE-decoded images in [-1, 1], not latents.")
    ] = False,
    grid: Annotated[
        Path | None, typer.Option(help="Also draw the image samples into this PNG (16 per row, enlarged).")
    ] = None,
    allow_pickle: AllowPickleModels = False,
) -> None:
    """Draw samples from a model in K network calls: a flow with Euler, or a diffusers DDPM checkpoint with
    its own DDIM (conditional models: with --labels or --prompts; the labels or prompts used go to OUT with
    .labels.npy / .prompts.txt in place of .npy)."""
    from reflow.eval import check_sample_output, check_sample_settings, sample, write_samples

    check_sample_settings(nfe, num=num, noise=noise, solver=solver, batch_size=batch_size)
    check_sample_output(out, model, noise, grid)
    with progress_shown() as progress:
        result = sample(
            model, nfe, num=num, seed=seed, noise=noise, labels=labels, prompts=prompts, solver=solver,
            batch_size=batch_size, device=_device(), decode=decode, allow_pickle=allow_pickle,
            grid=grid is not None, progress=progress,
        )  # fmt: skip
    write_samples(result, out, grid)
    count, shape = len(result.samples), result.samples.shape[1:]
    show(f"wrote [bold]{out}[/bold]: {count} samples of shape {shape}, {result.nfe} network calls")
    if grid is not None:
        show(f"  picture: {grid}")


# Table headers as the library names them -> as a terminal shows them in 80 columns.
SHORT_HEADERS = {
    "reference solve (NFE)": "reference\nsolve",
    "straightness S": "S",
    "curvature K": "K",
    "adaptive NFE": "adaptive\nNFE",
    "CPU minutes (cumulative)": "CPU min\n(total)",
}


def _cell(text: str) -> str:
    """A figure cell on two short lines: the mean over its spread, a value over its (solver, NFE)."""
    return text.replace(" ± ", "\n± ").replace(" (", "\n(")


def report_tables(metrics: dict) -> list[Table]:
    """Rich tables of an evaluation, each fitting 80 columns: one per quality metric (a row per model, a
    column per NFE), then the flow's straightness S and curvature K."""
    from reflow.eval.report import LABELS, flow_table, metric_keys, metric_table

    tables = []
    for title, (header, rows) in [
        *((LABELS[k] + " (lower is better)", metric_table(metrics, k)) for k in metric_keys(metrics)),
        ("Flow: straightness S, curvature K (0 = straight)", flow_table(metrics)),
    ]:
        table = Table(title=title)
        for i, h in enumerate(header):
            figure = h != "solver" and i > 0  # figures never wrap; model names and solvers do
            table.add_column(SHORT_HEADERS.get(h, h), justify="right" if figure else "left", no_wrap=figure)
        for r in rows:
            table.add_row(r[0], *(_cell(c) if header[i + 1] != "solver" else c for i, c in enumerate(r[1:])))
        if "CPU minutes (cumulative)" in header:
            table.caption = "CPU min (total): CPU minutes spent on the model and every stage before it"
        tables.append(table)
    return tables


def _print_report(report: Path) -> None:
    """Print the tables, notes and picture paths of REPORT/metrics.json."""
    import json

    metrics = json.loads((report / "metrics.json").read_text())
    for table in report_tables(metrics):
        show(table)
    for note in metrics.get("notes", []):
        show(f"[yellow]note:[/yellow] {note}")
    show(f"wrote [bold]{report / 'metrics.json'}[/bold], [bold]{report / 'report.md'}[/bold]")
    for f in metrics.get("figures", []):
        show(f"  picture: {report / f}")


@app.command("eval", short_help="Few-step quality, fidelity and straightness of models.")
@user_errors
def eval_cmd(
    model: Annotated[
        list[Path], typer.Option(help="Model folder (ours, or a diffusers DDPM checkpoint); repeat to compare.")
    ],
    reference: Annotated[str, typer.Option(help="Reference data: a SOURCE or a pairs folder (its z1).")],
    out: Annotated[Path, typer.Option(help="Report folder: metrics.json, report.md, PNG figures.")],
    nfe: Annotated[str, typer.Option(help="Comma-separated network-call counts.")] = "1,2,4",
    heldout: Annotated[
        Path | None,
        typer.Option(help="Held-out pairs for fidelity to the teacher (default: --reference if it is pairs)."),
    ] = None,
    num_samples: Annotated[int, typer.Option(help="Samples per model, NFE and seed.")] = 4000,
    seeds: Annotated[str, typer.Option(help="Noise seeds; figures are the mean and spread over them.")] = "1,2,3",
    num_fidelity: Annotated[int, typer.Option(help="Held-out pairs used for fidelity.")] = 1024,
    diagnostics_samples: Annotated[
        int, typer.Option(help="Noise draws for each flow's straightness, curvature and adaptive calls.")
    ] = 512,
    teacher_nfe: Annotated[
        int, typer.Option(help="Steps of a diffusers checkpoint's reference solve (its own solver).")
    ] = 50,
    adaptive: Annotated[
        bool | None,
        typer.Option(help="Also score flows solved adaptively (dopri5; default: for 2-D/vectors, not images)."),
    ] = None,
    inception_weights: Annotated[
        Path | None, typer.Option(help="Inception-v3 weights (pt_inception-2015-12-05) for FID/KID of images.")
    ] = None,
    figures: Annotated[bool, typer.Option(help="Write PNG figures.")] = True,
    guidance_scale: Annotated[
        float | None,
        typer.Option(help="Conditional diffusers checkpoints: guidance scale (default: the held-out pairs')."),
    ] = None,
    null_label: Annotated[
        int | None, typer.Option(help="Class-conditional checkpoints: the unconditional class for guidance.")
    ] = None,
    allow_pickle: AllowPickleModels = False,
) -> None:
    """Few-step quality (W2; FD/KID in a feature space), fidelity to the teacher and straightness, as one
    report comparing every --model from the same noise. Class-conditional models: samples cycle through the
    classes, with per-class W2 and (digits) classifier agreement; text-to-image models: the prompts of the
    --heldout pairs, quality in latent space against --reference (the pairs' z1)."""
    from reflow.eval import EvalSettings, evaluate, write_report
    from reflow.folders.io import claim_output

    settings = EvalSettings(
        nfes=_parse_nfes(nfe),
        reference=reference,
        heldout=None if heldout is None else str(heldout),
        num_samples=num_samples,
        seeds=_parse_ints(seeds, "--seeds"),
        adaptive=adaptive,
        teacher_nfe=teacher_nfe,
        num_fidelity=num_fidelity,
        diagnostics_samples=diagnostics_samples,
        inception_weights=None if inception_weights is None else str(inception_weights),
        guidance_scale=guidance_scale,
        null_label=null_label,
        allow_pickle=allow_pickle,
    )
    inputs = [*model, heldout, inception_weights, reference if Path(reference).exists() else None]
    claim_output(out, "eval", inputs=inputs)
    if inception_weights is not None and not inception_weights.is_file():
        raise ReflowError(f"no such file: {inception_weights} (--inception-weights takes the Inception weights file)")
    with progress_shown() as progress:
        result = evaluate(model, settings, device=_device(), progress=progress)
    write_report(out, result, figures=figures)
    _print_report(out)


@app.command("rounds", short_help="Teacher -> pairs -> student -> report, N rounds, one recipe.")
@user_errors
def rounds_cmd(
    config: Annotated[Path, typer.Option(help="Recipe TOML (see data/recipes/).")],
    out: Annotated[Path, typer.Option(help="Run folder: round-k/{pairs,student,report}, report/, manifest.json.")],
) -> None:
    """Teacher -> pairs -> student -> report, round after round, from one recipe; a rerun resumes."""
    from reflow.rounds.run import run_rounds

    with progress_shown() as progress:
        run_rounds(config, out, device=_device(), progress=progress)
    _print_report(out / "report")


@app.command("quickstart", short_help="Distil the bundled digits DDPM into a one-step student.")
@user_errors
def quickstart_cmd(
    out: Annotated[Path, typer.Option(help="Run folder.")] = Path("quickstart-out"),
    steps: Annotated[int, typer.Option(help="Reflow training steps (distillation takes half as many).")] = 600,
    num_pairs: Annotated[int, typer.Option(help="DDIM-20 pairs drawn from the bundled teacher.")] = 8192,
    eval_samples: Annotated[int, typer.Option(help="Samples per model and NFE in the report.")] = 1000,
) -> None:
    """The embedded default: distil the bundled digits DDPM into a one-step student and evaluate it."""
    from reflow.rounds.quickstart import run_quickstart

    with progress_shown() as progress:
        run_quickstart(
            out, steps=steps, num_pairs=num_pairs, num_eval=eval_samples, device=_device(), progress=progress
        )
    _print_report(out / "report")
    pictures = sorted(out.glob("*/report/samples_*.png"))
    for p in pictures:
        show(f"  picture: {p}")
    show(f"models, pairs and reports are in [bold]{out}[/bold]")


def version_callback(value: bool) -> None:
    if value:
        console.print(f"reflow {__version__}")
        raise typer.Exit()


def _open_log(ctx: typer.Context, log_file: Path) -> None:
    """Append this command's progress lines, results and errors to ``log_file`` (the main process)."""
    try:
        log = open(log_file, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 (closed with the context)
    except OSError as e:
        raise _fail(f"cannot write --log-file {log_file}: {e.strerror or e}") from None
    ctx.call_on_close(log.close)
    OUTPUT.log = log
    OUTPUT.log_console = Console(file=log, width=80, color_system=None, soft_wrap=True)


@app.callback()
def root(
    ctx: typer.Context,
    version: Annotated[
        bool, typer.Option("--version", callback=version_callback, is_eager=True, help="Show the version and exit.")
    ] = False,
    quiet: Annotated[
        bool,
        typer.Option("--quiet", "-q", help="No progress on screen; results and errors are still printed."),
    ] = False,
    log_file: Annotated[
        Path | None,
        typer.Option(
            help="Also append timestamped progress lines, results and errors to this file (with --quiet too)."
        ),
    ] = None,
) -> None:
    """The options every command shares (the app's help is the module docstring)."""
    OUTPUT.quiet, OUTPUT.log, OUTPUT.log_console = quiet, None, None
    if log_file is not None and is_main():
        _open_log(ctx, log_file)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
