"""One training loop for round 1 (independent coupling from data), round k (teacher pairs) and k-step
distillation.

Plain torch on Accelerate (one CPU, many GPUs, many nodes): ``prepare`` once, ``accumulate``,
``backward``. Checkpoints are safetensors + JSON (``reflow.student.checkpoints``): a resume never unpickles
anything, and resumes only the run that wrote them (same data, model and result-determining settings,
recorded in every checkpoint). The batch of step s is a function of (seed, s) alone: every
process draws the same global batch and keeps its own slice, so a resumed run and an N-process run
see exactly the rows an uninterrupted one-process run sees. The next batch is drawn on a background
thread while the current step runs, and the loss stays on the device between log steps (no host sync
per step); it is checked for NaN/inf at every log and checkpoint step, so every checkpoint is good.
"""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from reflow.core.flow import LOSSES, distillation_loss, flow_matching_loss
from reflow.core.noise import MAX_SEED
from reflow.core.solvers import time_grid
from reflow.core.timesteps import TIME_SAMPLERS, sample_time
from reflow.errors import ReflowError
from reflow.folders.data import load_source
from reflow.folders.io import (
    MARKER,
    atomic_dir,
    atomic_write_json,
    atomic_write_text,
    claim_output,
    mark_output,
    output_owner,
)
from reflow.folders.runtime import use_cpu
from reflow.models.velocity import build_model, check_conditioning, init_model, model_card
from reflow.pairs.generate import PairsReader
from reflow.student.checkpoints import (
    checkpoint_kind,
    load_rng_state,
    load_training_state,
    read_meta,
    save_rng_state,
    save_training_state,
)
from reflow.version import __version__

MIXED_PRECISION = ("no", "fp16", "bf16")
TRACKERS = ("auto", "none", "tensorboard", "wandb", "all")


@dataclass
class TrainConfig:
    """Every training setting. TOML files given with ``--config`` use these names."""

    out: str = ""
    data: str | None = None  # round 1: a data source, independent coupling z0 ~ N(0, I), z1 ~ data
    pairs: str | None = None  # round k: a pairs dataset from `reflow generate`
    init: str | None = None  # a model folder or a diffusers DDPM checkpoint to start from (default: fresh)
    model_config: str | None = None  # JSON config of a fresh model (UNet2DModel or MLPVelocity)
    max_pairs: int | None = None  # train on the first N pairs only
    distill_k: int | None = None  # k-step distillation: regress the k-step Euler output onto z1
    log_with: str = "auto"  # Accelerate trackers: auto = tensorboard when installed
    allow_pickle: bool = False
    max_steps: int = 5000
    batch_size: int = 512  # global batch per optimizer step, over all processes
    lr: float = 1e-3
    seed: int = 0
    checkpoint_every: int = 1000
    resume: bool = False
    mixed_precision: str = "no"
    gradient_accumulation_steps: int = 1
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    warmup_steps: int = 100
    time_sampler: str = "uniform"
    # auto: l2 from data (independent coupling: only the mean of the many velocities through x_t is the
    # flow's), pseudo_huber on pairs (one target per z0; measured on the digits teacher, README)
    loss: str = "auto"
    huber_c: float | None = None
    ema_decay: float = 0.999
    hidden_dim: int = 256
    num_layers: int = 4
    time_embed_dim: int = 64
    log_every: int = 25
    extra: dict[str, Any] = field(default_factory=dict)  # recorded in the model card

    @classmethod
    def from_toml(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        """Read a TOML file of TrainConfig names (dashes or underscores), then apply non-None overrides."""
        values = read_toml(path)
        values = {k.replace("-", "_"): v for k, v in values.items()}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ReflowError(f"{path}: unknown setting(s) {', '.join(unknown)}")
        from reflow.folders.settings import check_values

        values = check_values(cls, values, str(path))
        given = {k: str(v) if hasattr(v, "__fspath__") else v for k, v in overrides.items() if v is not None}
        values.update(check_values(cls, given, "command line"))
        return cls(**values)


def read_toml(path: str | Path) -> dict[str, Any]:
    """A TOML file as a dict; one ReflowError line for a missing, unreadable, non-UTF-8 or invalid file."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    path = Path(path)
    if not path.is_file():
        raise ReflowError(f"no such config file: {path}")
    try:
        return tomllib.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise ReflowError(f"cannot read {path} ({e.strerror}); check its permissions") from None
    except UnicodeDecodeError:
        raise ReflowError(f"{path} is not UTF-8 text; save the TOML file as UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise ReflowError(f"{path} is not valid TOML: {e}") from None


@dataclass
class TrainResult:
    out: Path
    steps: int
    loss: float
    seconds: float
    samples_per_second: float
    already_complete: bool = False  # ``out`` held this very training, finished: nothing was trained


ProgressFn = Callable[[int, int, float, float], None]
"""``progress(step, max_steps, loss, samples_per_second)``."""


def _check(config: TrainConfig) -> None:
    if not config.out:
        raise ReflowError("--out is required: the model folder to write")
    if (config.data is None) == (config.pairs is None):
        raise ReflowError("give exactly one of --data (round 1 from data) or --pairs (reflow from pairs)")
    if not 0 <= config.seed <= MAX_SEED:
        raise ReflowError(f"--seed must be in [0, {MAX_SEED}], got {config.seed}")
    for name in ("max_steps", "batch_size", "checkpoint_every", "gradient_accumulation_steps", "log_every"):
        if getattr(config, name) < 1:
            raise ReflowError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(config, name)}")
    if not config.lr > 0:
        raise ReflowError(f"--lr must be positive, got {config.lr}")
    if config.mixed_precision not in MIXED_PRECISION:
        raise ReflowError(f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)}")
    if config.time_sampler not in TIME_SAMPLERS:
        raise ReflowError(f"--time-sampler must be one of {', '.join(TIME_SAMPLERS)}")
    if config.loss not in (*LOSSES, "auto"):
        raise ReflowError(f"--loss must be one of auto, {', '.join(LOSSES)}")
    if not 0 <= config.ema_decay < 1:
        raise ReflowError(f"--ema-decay must be in [0, 1), got {config.ema_decay}")
    if config.log_with not in TRACKERS:
        raise ReflowError(f"--log-with must be one of {', '.join(TRACKERS)}")
    if config.distill_k is not None:
        if config.distill_k < 1:
            raise ReflowError(f"--k must be at least 1, got {config.distill_k}")
        if config.pairs is None or config.init is None:
            raise ReflowError("distillation needs --pairs (the teacher's couplings) and --init (the reflow student)")


def checkpoint_root(out: Path) -> Path:
    return out.parent / f"{out.name}.checkpoints"


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint folder (they appear by rename, so a listed one is complete)."""
    root = checkpoint_root(out)
    if not root.is_dir():
        return None
    found = [p for p in root.iterdir() if re.fullmatch(r"step-\d+", p.name) and (p / "reflow_step.json").is_file()]
    return max(found, key=lambda p: int(p.name.split("-")[1]), default=None)


RESULT_SETTINGS = (
    "seed",
    "lr",
    "batch_size",
    "max_steps",  # the cosine schedule's length
    "loss",
    "huber_c",
    "time_sampler",
    "ema_decay",
    "weight_decay",
    "warmup_steps",
    "grad_clip",
    "gradient_accumulation_steps",
    "distill_k",
    "max_pairs",
    "mixed_precision",
)
"""TrainConfig names that change the trained weights; a resume or a rerun must keep them. The rest
(``checkpoint_every``, ``log_with``, ``log_every``, ...) may change."""


def _local(path: str | None) -> str | None:
    """An existing local path as an absolute one; anything else (a built-in name, a Hub id) as given."""
    if path is None or not Path(path).exists():
        return path
    return str(Path(path).resolve())


def _json_value(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def run_settings(config: TrainConfig) -> dict[str, Any]:
    """What determines the result of ``config`` (``loss`` already resolved from auto), JSON-able: the data
    or pairs (paths resolved), the model asked for and :data:`RESULT_SETTINGS`. Recorded in every
    checkpoint and in the finished output; a resume or rerun that changes any of them is refused."""
    settings: dict[str, Any] = {"data": _local(config.data), "pairs": _local(config.pairs), "init": _local(config.init)}
    if config.init is None and config.model_config is not None:
        settings["model_config"] = _read_model_config(config.model_config)
    elif config.init is None:
        settings |= {k: getattr(config, k) for k in ("hidden_dim", "num_layers", "time_embed_dim")}
    settings |= {k: getattr(config, k) for k in RESULT_SETTINGS}
    return _json_value(settings)


def _read_model_config(path: str) -> dict[str, Any]:
    file = Path(path)
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ReflowError(f"--model-config {file}: cannot read a JSON config ({type(e).__name__})") from None


def architecture(model: torch.nn.Module) -> dict[str, Any]:
    """The model's class and config (its UNet's for a UNetFlow), JSON-able: what its weights' shapes follow."""
    inner = getattr(model, "unet", model)
    config = {k: v for k, v in dict(getattr(inner, "config", {})).items() if not k.startswith("_")}
    arch = {"class": type(inner).__name__, **config}
    if inner is not model:
        arch["wrapper"] = type(model).__name__
    return _json_value(arch)


def _differences(recorded: dict[str, Any], now: dict[str, Any], prefix: str = "--") -> list[str]:
    """``NAME RECORDED (now NOW)`` for every setting that differs; nested dicts (a model config) by key."""
    found = []
    for key in sorted(set(recorded) | set(now), key=str):
        a, b = recorded.get(key), now.get(key)
        if a == b:
            continue
        name = f"{prefix}{key}".replace("_", "-") if prefix == "--" else f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            found += _differences(a, b, f"{name} ")
        else:
            found.append(f"{name} {'none' if a is None else a} (now {'none' if b is None else b})")
    return found


def _finished_run(out: Path) -> dict[str, Any] | None:
    """What a finished training in ``out`` recorded (``settings``, ``steps``, ``loss``; ``settings`` None when
    unknown), or None when ``out`` is not a finished reflow training (absent, someone else's, empty)."""
    if not out.is_dir():
        return None
    if output_owner(out) == "train":
        return json.loads((out / MARKER).read_text())
    # written before outputs carried a marker: our model card over a model folder
    try:
        card = (out / "README.md").read_text()
    except (OSError, UnicodeDecodeError):
        return None
    has_model = (out / "config.json").is_file() or (out / "model_index.json").is_file()
    if not has_model or "\n# reflow velocity model " not in card:
        return None
    try:
        provenance = json.loads(card.split("```json\n", 1)[1].split("\n```", 1)[0])
        recorded = provenance["train_config"]
        known = {f.name for f in fields(TrainConfig)}
        config = TrainConfig(**{k: v for k, v in recorded.items() if k in known})
        return {"settings": run_settings(config), "steps": config.max_steps, "loss": float("nan")}
    except (IndexError, KeyError, TypeError, ValueError, ReflowError):
        return {"settings": None, "steps": 0, "loss": float("nan")}


def _already_complete(out: Path, finished: dict[str, Any], settings: dict[str, Any]) -> TrainResult:
    """The result of a rerun of the finished training in ``out``; its stale checkpoints are removed."""
    from reflow.folders.runtime import partial_state

    recorded = finished.get("settings")
    diffs = _differences(recorded, settings) if recorded is not None else []
    if diffs:
        raise ReflowError(
            f"{out} holds a finished training with other settings: {', '.join(diffs)}; pick a new --out "
            f"(or delete {out} to train again)"
        )
    if partial_state().is_main_process:
        shutil.rmtree(checkpoint_root(out), ignore_errors=True)
    loss = finished.get("loss")
    return TrainResult(
        out=out,
        steps=int(finished.get("steps") or 0),
        loss=float("nan") if loss is None else float(loss),
        seconds=0.0,
        samples_per_second=0.0,
        already_complete=True,
    )


def _check_resumable(ckpt: Path, settings: dict[str, Any], allow_pickle: bool) -> None:
    """Refuse, before any work, a checkpoint that is not ours to load or was made by other settings."""
    root = ckpt.parent
    kind = checkpoint_kind(ckpt)
    if kind == "pickle" and not allow_pickle:
        raise ReflowError(
            f"{ckpt} was written by an older reflow with pickle state; pass --allow-pickle to load it if you "
            f"trust it, or delete {root} and restart"
        )
    if kind == "none":
        raise ReflowError(f"{ckpt} holds no reflow checkpoint state; delete {root} and restart")
    if kind == "safe":
        recorded = read_meta(ckpt).get("info", {}).get("settings")
        diffs = _differences(recorded, settings) if recorded is not None else []
        if diffs:
            raise ReflowError(
                f"{ckpt} was made with other settings: {', '.join(diffs)}; resume with the same settings, "
                f"or delete {root} to start over"
            )


def _resume(ckpt: Path, accelerator: Any, model: torch.nn.Module, optimizer: Any, scheduler: Any, ema: Any) -> int:
    """Load ``ckpt`` into the live objects (``model`` unwrapped); returns its step. A folder of an older
    reflow (pickle state, allowed by ``--allow-pickle``) goes through Accelerate's ``load_state``."""
    if checkpoint_kind(ckpt) == "pickle":
        accelerator.register_for_checkpointing(scheduler)
        accelerator.register_for_checkpointing(ema)
        accelerator.load_state(str(ckpt))
        return json.loads((ckpt / "reflow_step.json").read_text())["step"]
    recorded = read_meta(ckpt).get("info", {}).get("architecture")
    diffs = _differences(recorded, architecture(model), "") if recorded is not None else []
    if diffs:
        raise ReflowError(
            f"{ckpt} holds another model architecture: {', '.join(diffs)}; resume with the same model, "
            f"or delete {ckpt.parent} to start over"
        )
    meta = load_training_state(
        ckpt, model=model, optimizer=optimizer, scheduler=scheduler, ema=ema, scaler=accelerator.scaler
    )
    load_rng_state(ckpt, accelerator.process_index)
    accelerator.step = meta["accelerator_step"]
    return meta["step"]


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed << 32) + step)


def _trackers(log_with: str) -> list[str] | None:
    import importlib.util

    if log_with == "none":
        return None
    if log_with == "auto":
        have = importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX")
        return ["tensorboard"] if have else None
    return [log_with]


def _tracker_config(config: TrainConfig) -> dict[str, Any]:
    """Hyperparameters as trackers take them (scalars and strings only)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in asdict(config).items()}


def _attach_prompt_embeddings(pairs: PairsReader, allow_pickle: bool) -> None:
    """Text pairs stored as prompts only: encode each distinct prompt once with the teacher's text encoder
    (on the CPU), keep the table, and free the encoder before the UNet is built."""
    from reflow.models.text import PromptEncoder

    teacher = (pairs.provenance.get("teacher") or {}).get("teacher")
    if not teacher:
        raise ReflowError(f"{pairs.path} stores prompts only and records no teacher; regenerate with embeddings")
    encoder = PromptEncoder(teacher, allow_pickle=allow_pickle)
    pairs.attach_prompt_embeddings(encoder(pairs.unique_prompts()))
    del encoder


def train(config: TrainConfig, progress: ProgressFn | None = None) -> TrainResult:
    """Train a velocity model by conditional flow matching (or k-step distillation when
    ``config.distill_k``) and write it (EMA weights) to ``config.out``: a diffusers pipeline folder for an
    image UNet, a ``save_pretrained`` folder for an MLP."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    from reflow.pipelines.export import save_student

    _check(config)
    if config.loss == "auto":
        config = replace(config, loss="l2" if config.data is not None else "pseudo_huber")
    out = Path(config.out)
    settings = run_settings(config)
    finished = _finished_run(out)
    if finished is not None:
        return _already_complete(out, finished, settings)
    # before any work: not into an input, not over someone else's folder, writable; a killed save's debris goes
    claim_output(out, "train", inputs=[_local(config.data), _local(config.pairs), _local(config.init)])
    ckpt = latest_checkpoint(out)
    if ckpt is not None and not config.resume:
        raise ReflowError(f"{checkpoint_root(out)} holds checkpoints of an earlier run; pass --resume to continue it")
    if ckpt is not None:
        _check_resumable(ckpt, settings, config.allow_pickle)

    # Data: a source to draw z1 from (independent coupling), or stored pairs streamed from Arrow.
    source = pairs = None
    if config.data is not None:
        source = load_source(config.data)
        sample_shape = tuple(source.sample_shape)
    else:
        pairs = PairsReader(config.pairs, max_rows=config.max_pairs)
        sample_shape = pairs.sample_shape

    if pairs is not None and pairs.conditioning == "text" and not pairs.has_embeddings:
        _attach_prompt_embeddings(pairs, config.allow_pickle)

    set_seed(config.seed)  # before the model is built: a fresh model's init depends on it
    if config.init is not None:
        model = init_model(config.init, allow_pickle=config.allow_pickle)
        if tuple(model.sample_shape) != sample_shape:
            raise ReflowError(
                f"--init model takes samples of shape {tuple(model.sample_shape)}, the data has {sample_shape}"
            )
        if pairs is not None:
            check_conditioning(model, pairs.num_classes, pairs.embed_shape, f"--init {config.init}")
        elif getattr(model, "conditioning", None) is not None:
            raise ReflowError(f"--init {config.init} is conditional; training from --data is unconditional")
    else:
        model = build_model(
            sample_shape,
            settings.get("model_config"),
            num_classes=pairs.num_classes if pairs is not None else None,
            embed_shape=pairs.embed_shape if pairs is not None else None,
            hidden_dim=config.hidden_dim,
            num_layers=config.num_layers,
            time_embed_dim=config.time_embed_dim,
        )

    trackers = _trackers(config.log_with)
    accelerator = Accelerator(
        cpu=use_cpu(),
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=trackers,
        project_dir=str(out.parent / f"{out.name}.logs"),
    )
    world, rank = accelerator.num_processes, accelerator.process_index
    micro = config.gradient_accumulation_steps
    if config.batch_size % (world * micro):
        raise ReflowError(
            f"--batch-size {config.batch_size} must divide evenly over {world} process(es) "
            f"x {micro} accumulation step(s)"
        )
    local = config.batch_size // (world * micro)

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(
        optimizer,
        num_warmup_steps=min(config.warmup_steps, config.max_steps // 10),
        num_training_steps=config.max_steps,
    )
    # The scheduler is not prepared: Accelerate would step it once per process per step (it assumes the
    # data is split by length); ours steps once per optimizer step, whatever the number of processes.
    model, optimizer = accelerator.prepare(model, optimizer)
    raw = accelerator.unwrap_model(model)
    ema = EMAModel(raw.parameters(), decay=config.ema_decay, foreach=True)
    if trackers:
        accelerator.init_trackers("reflow", config=_tracker_config(config))
    info = {"settings": settings, "architecture": architecture(raw)}

    step = 0
    if ckpt is not None:
        step = _resume(ckpt, accelerator, raw, optimizer, scheduler, ema)

    def save_checkpoint(at: int) -> Path:
        """Write the state after step ``at`` as ``OUT.checkpoints/step-N`` (safetensors + JSON, no pickle):
        every process its random states, the main process the rest; the folder appears by rename."""
        root = checkpoint_root(out)
        final = root / f"step-{at:07d}"
        tmp = root / f".step-{at:07d}.tmp"
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            # made here, before the barrier: every process writes its own RNG state into it
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        try:
            save_rng_state(tmp, rank)
            if accelerator.is_main_process:
                save_training_state(
                    tmp,
                    model=raw,
                    optimizer=optimizer,
                    scheduler=scheduler,
                    ema=ema,
                    scaler=accelerator.scaler,
                    step=at,
                    accelerator_step=accelerator.step,
                    info=info,
                )
                atomic_write_json(tmp / "reflow_step.json", {"step": at})
        except BaseException:  # a full disk, say: no half checkpoint stays behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        accelerator.wait_for_everyone()  # every process's random states are in
        if accelerator.is_main_process:
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            ckpts = sorted(p for p in root.iterdir() if re.fullmatch(r"step-\d+", p.name))
            for p in ckpts[:-2]:  # keep the two newest
                shutil.rmtree(p, ignore_errors=True)
        accelerator.wait_for_everyone()
        return final

    # Distillation runs the student's own k-step Euler grid (an exported student's scheduler grid).
    grid = None
    if config.distill_k is not None:
        model_grid = getattr(raw, "euler_grid", None)
        nodes, query = model_grid(config.distill_k) if model_grid else (time_grid(config.distill_k),) * 2
        grid = (nodes.tolist(), query[: config.distill_k].tolist())

    device = accelerator.device
    pin = device.type == "cuda"

    def draw(at: int) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
        """This process's micro-batches of step ``at``: (z0, z1, t), each (micro, local, ...), and the
        conditioning keywords, each (micro, local, ...)."""
        g = _step_generator(config.seed, at)
        cond: dict[str, torch.Tensor] = {}
        if pairs is not None:
            z0, z1, cond = pairs.batch(torch.randint(0, len(pairs), (config.batch_size,), generator=g))
        else:
            z1 = source.sample(config.batch_size, g)
            z0 = torch.randn(config.batch_size, *sample_shape, generator=g)
        t = sample_time(config.batch_size, config.time_sampler, generator=g)
        mine = slice(rank * micro * local, (rank + 1) * micro * local)

        def split(x: torch.Tensor) -> torch.Tensor:
            x = x[mine].reshape(micro, local, *x.shape[1:])
            return x.pin_memory() if pin else x

        return tuple(split(x) for x in (z0, z1, t)), {k: split(v) for k, v in cond.items()}

    def check(loss: torch.Tensor, at: int) -> float:
        value = accelerator.reduce(loss, "mean").item()
        if not math.isfinite(value):
            last = latest_checkpoint(out)
            kept = f"; the last good checkpoint is {last}" if last else ""
            raise ReflowError(f"loss became {value} by step {at}{kept}; lower --lr or check the data")
        return value

    start_time, start_step = time.perf_counter(), step
    loss_value = float("nan")
    loss_sum = torch.zeros((), device=device)
    loss_count = 0
    with ThreadPoolExecutor(max_workers=1) as prefetch:
        upcoming = prefetch.submit(draw, step) if step < config.max_steps else None
        while step < config.max_steps:
            (z0s, z1s, ts), conds = upcoming.result()
            if step + 1 < config.max_steps:
                upcoming = prefetch.submit(draw, step + 1)
            for m in range(micro):
                z0 = z0s[m].to(device, non_blocking=True)
                z1 = z1s[m].to(device, non_blocking=True)
                cond = {k: v[m].to(device, non_blocking=True) for k, v in conds.items()}
                with accelerator.accumulate(model):
                    with accelerator.autocast():
                        if grid is None:
                            t = ts[m].to(device, non_blocking=True)
                            loss = flow_matching_loss(model, z0, z1, t, config.loss, config.huber_c, cond)
                        else:
                            loss = distillation_loss(model, z0, z1, *grid, config.loss, config.huber_c, cond)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and config.grad_clip > 0:
                        accelerator.clip_grad_norm_(model.parameters(), config.grad_clip)
                    optimizer.step()
                    if accelerator.sync_gradients:
                        scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                loss_sum += loss.detach().float() / micro
            ema.step(raw.parameters())
            step += 1
            loss_count += 1
            at_checkpoint = step % config.checkpoint_every == 0 and step < config.max_steps
            if step % config.log_every == 0 or step == config.max_steps or at_checkpoint:
                loss_value = check(loss_sum / loss_count, step)
                loss_sum.zero_()
                loss_count = 0
                sps = (step - start_step) * config.batch_size / max(time.perf_counter() - start_time, 1e-9)
                if trackers:
                    accelerator.log(
                        {"loss": loss_value, "lr": scheduler.get_last_lr()[0], "samples_per_second": sps}, step=step
                    )
                if progress and accelerator.is_local_main_process:
                    progress(step, config.max_steps, loss_value, sps)
            if at_checkpoint:
                save_checkpoint(step)

    seconds = time.perf_counter() - start_time
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = copy.deepcopy(raw).float()
        ema.copy_to(final.parameters())
        if config.distill_k is not None:
            kind = f"{config.distill_k}-step distillation of {config.init} on {config.pairs}"
        elif pairs is None:
            kind = "1 (independent coupling)"
        else:
            kind = f"reflow on {config.pairs}"
        provenance = {
            "reflow_version": __version__,
            "round": kind,
            "init": config.init,
            "pairs_provenance": pairs.provenance if pairs is not None else None,
            "train_config": {k: v for k, v in asdict(config).items() if k != "extra"} | config.extra,
            "weights": "EMA",
        }
        empty = out.is_dir() and not any(out.iterdir())  # an empty folder given as --out counts as new
        with atomic_dir(out, overwrite=empty) as tmp:
            teacher = (pairs.provenance.get("teacher") or {}) if pairs is not None else {}
            # the VAE / text encoder of the pairs' teacher; its unconditional class, if it had one
            components = teacher.get("teacher") if getattr(final, "conditioning", None) == "text" else None
            save_student(final, tmp, components=components, null_label=teacher.get("null_label"))
            atomic_write_text(tmp / "README.md", model_card(f"reflow velocity model {out.name}", provenance))
            # a rerun of this very training finds it complete (and one with other settings is refused)
            mark_output(tmp, "train", settings=settings, steps=step, loss=loss_value)
        shutil.rmtree(checkpoint_root(out), ignore_errors=True)
    accelerator.wait_for_everyone()
    # Not end_training(): it also destroys the process group, and a caller may go on under the same launch
    # (reflow rounds trains, generates and evaluates in one process per rank).
    for tracker in accelerator.trackers:
        tracker.finish()
    sps = (config.max_steps - start_step) * config.batch_size / max(seconds, 1e-9)
    return TrainResult(out=out, steps=step, loss=loss_value, seconds=seconds, samples_per_second=sps)
