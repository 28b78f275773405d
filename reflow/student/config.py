"""The settings of a training: :class:`TrainConfig` (every setting, typed, readable from TOML), the checks made
of it before any work, and the run settings recorded for resume (what determines the trained weights).

A checkpoint and a finished output record :func:`run_settings`; a resume or a rerun whose run settings
differ is refused, each difference named by :func:`differences` (``--lr 0.001 (now 0.01)``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, get_args

from reflow.core.coupling import COUPLINGS, Coupling
from reflow.core.flow import LOSSES, Loss
from reflow.core.noise import MAX_SEED
from reflow.core.timesteps import TIME_SAMPLERS, TimeSampler
from reflow.errors import ReflowError
from reflow.pairs.reader import IN_MEMORY, InMemory

MixedPrecision = Literal["no", "fp16", "bf16"]
"""Accelerate's ``mixed_precision``: autocast to fp16 (with a grad scaler) or bf16; a no-op on CPU."""
MIXED_PRECISION: tuple[str, ...] = get_args(MixedPrecision)
LogWith = Literal["auto", "none", "tensorboard", "wandb", "all"]
"""Accelerate trackers; ``auto``: tensorboard when installed, else none."""
TRACKERS: tuple[str, ...] = get_args(LogWith)
PerceptualLoss = Literal["lpips", "lpips_huber"]
"""Perceptual losses (``reflow.core.perceptual``): the LPIPS distance of a network on disk
(``perceptual_weights``), alone or added to pseudo-Huber; for distillation and MeanFlow, which predict images."""
TrainLoss = Literal["auto", Loss, PerceptualLoss]
"""A :data:`reflow.core.flow.Loss`, a :data:`PerceptualLoss`, or ``auto``: l2 from data, pseudo_huber on pairs."""
PERCEPTUAL: tuple[str, ...] = get_args(PerceptualLoss)
Objective = Literal["velocity", "meanflow"]
"""What the student learns: the instantaneous velocity (flow matching) or the average velocity over an
interval (MeanFlow, Geng et al. 2025: one jump is exact when it is learned)."""
OBJECTIVES: tuple[str, ...] = get_args(Objective)


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
    objective: Objective = "velocity"  # meanflow: learn u(x_t, t, s), the average velocity from t to s
    equal_fraction: float = 0.75  # meanflow: the fraction of rows with s = t (the rest draw s > t)
    drop_farthest: float = 0.0  # pairs: drop this fraction with the largest |z1 - z0| (decided once)
    pairs_in_memory: InMemory = "auto"  # pairs: read into memory (auto: when they fit the budget) or stream
    coupling: Coupling = "independent"  # from data: pair noise and data per batch (ot: exact minibatch OT)
    sinkhorn_reg: float = 0.05  # coupling = sinkhorn: entropic regularisation, relative to the mean cost
    perceptual_weights: str | None = None  # lpips / lpips_huber: the feature network (config.json + safetensors)
    log_with: LogWith = "auto"  # Accelerate trackers: auto = tensorboard when installed
    allow_pickle: bool = False
    max_steps: int = 5000
    batch_size: int = 512  # global batch per optimizer step, over all processes
    lr: float = 1e-3
    seed: int = 0
    checkpoint_every: int = 1000
    resume: bool = False
    mixed_precision: MixedPrecision = "no"
    gradient_accumulation_steps: int = 1
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    warmup_steps: int = 100
    time_sampler: TimeSampler = "uniform"
    # auto: l2 from data (independent coupling: only the mean of the many velocities through x_t is the
    # flow's), pseudo_huber on pairs (one target per z0; measured on the digits teacher, README)
    loss: TrainLoss = "auto"
    huber_c: float | None = None
    ema_decay: float = 0.999
    hidden_dim: int = 256
    num_layers: int = 4
    time_embed_dim: int = 64
    log_every: int = 25
    extra: dict[str, Any] = field(default_factory=dict)  # recorded in the model card

    @classmethod
    def from_toml(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        """Read a TOML file of TrainConfig names (dashes or underscores), then apply non-None overrides.
        Each value must have its field's type (one ReflowError line naming every bad one)."""
        from reflow.folders.settings import check_values

        values = read_toml(path)
        values = {k.replace("-", "_"): v for k, v in values.items()}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ReflowError(f"{path}: unknown setting(s) {', '.join(unknown)}")
        # the types here; the choices (a Literal's values) are named by check_config, in its words
        values = check_values(cls, values, str(path), choices=False)
        given = {k: str(v) if hasattr(v, "__fspath__") else v for k, v in overrides.items() if v is not None}
        values.update(check_values(cls, given, "command line", choices=False))
        return cls(**values)


@dataclass
class TrainResult:
    out: Path
    steps: int
    loss: float
    seconds: float
    samples_per_second: float
    already_complete: bool = False  # ``out`` held this very training, finished: nothing was trained


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


def check_config(config: TrainConfig) -> None:
    """Refuse, in one ReflowError line, settings no training can run with (before any work)."""
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
    if config.loss not in (*LOSSES, *PERCEPTUAL, "auto"):
        raise ReflowError(f"--loss must be one of auto, {', '.join(LOSSES + PERCEPTUAL)}")
    check_student(config)
    if not 0 <= config.ema_decay < 1:
        raise ReflowError(f"--ema-decay must be in [0, 1), got {config.ema_decay}")
    if config.log_with not in TRACKERS:
        raise ReflowError(f"--log-with must be one of {', '.join(TRACKERS)}")
    if config.distill_k is not None:
        if config.distill_k < 1:
            raise ReflowError(f"--k must be at least 1, got {config.distill_k}")
        if config.pairs is None or config.init is None:
            raise ReflowError("distillation needs --pairs (the teacher's couplings) and --init (the reflow student)")


def check_student(config: TrainConfig) -> None:
    """The settings of the student's objective, pair filter and perceptual loss, in one ReflowError line each."""
    if config.objective not in OBJECTIVES:
        raise ReflowError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {config.objective!r}")
    if not 0 <= config.equal_fraction <= 1:
        raise ReflowError(f"--equal-fraction must be in [0, 1], got {config.equal_fraction}")
    if config.objective == "meanflow" and config.distill_k is not None:
        raise ReflowError("a MeanFlow student needs no distillation (one jump is its sampler); drop --k or --objective")
    if not 0 <= config.drop_farthest < 1:
        raise ReflowError(f"--drop-farthest must be in [0, 1), got {config.drop_farthest}")
    if config.drop_farthest and config.pairs is None:
        raise ReflowError("--drop-farthest filters stored pairs; it needs --pairs, not --data")
    check_data_settings(config)
    if config.loss in PERCEPTUAL:
        if config.distill_k is None and config.objective != "meanflow":
            raise ReflowError(
                f"--loss {config.loss} compares images: use it to distill (reflow distill) or with "
                "--objective meanflow; a velocity is no image"
            )
        if config.perceptual_weights is None:
            raise ReflowError(
                f"--loss {config.loss} needs --perceptual-weights PATH (a feature network on disk, e.g. "
                "data/perceptual/digits-lpips); nothing is downloaded"
            )


def check_data_settings(config: TrainConfig) -> None:
    """How pairs are read and how round 1 couples noise and data, in one ReflowError line each."""
    if config.pairs_in_memory not in IN_MEMORY:
        raise ReflowError(f"--pairs-in-memory must be one of {', '.join(IN_MEMORY)}, got {config.pairs_in_memory!r}")
    if config.coupling not in COUPLINGS:
        raise ReflowError(f"--coupling must be one of {', '.join(COUPLINGS)}, got {config.coupling!r}")
    if config.coupling != "independent" and config.data is None:
        raise ReflowError(
            f"--coupling {config.coupling} pairs noise with data in round 1 (--data); pairs are already coupled"
        )
    if not config.sinkhorn_reg > 0:
        raise ReflowError(f"--sinkhorn-reg must be positive, got {config.sinkhorn_reg}")


def resolve_loss(config: TrainConfig) -> TrainConfig:
    """``config`` with ``loss = "auto"`` made concrete: l2 from data, pseudo_huber on pairs."""
    if config.loss != "auto":
        return config
    return replace(config, loss="l2" if config.data is not None else "pseudo_huber")


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


def local_path(path: str | None) -> str | None:
    """An existing local path as an absolute one; anything else (a built-in name, a Hub id) as given."""
    if path is None or not Path(path).exists():
        return path
    return str(Path(path).resolve())


def json_value(obj: Any) -> Any:
    """``obj`` as JSON reads it back (keys sorted, tuples as lists, anything else as its ``str``)."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def run_settings(config: TrainConfig) -> dict[str, Any]:
    """What determines the result of ``config`` (``loss`` already resolved from auto), JSON-able: the data
    or pairs (paths resolved), the model asked for and :data:`RESULT_SETTINGS`. Recorded in every
    checkpoint and in the finished output; a resume or rerun that changes any of them is refused."""
    settings: dict[str, Any] = {
        "data": local_path(config.data),
        "pairs": local_path(config.pairs),
        "init": local_path(config.init),
    }
    if config.perceptual_weights is not None:
        settings["perceptual_weights"] = local_path(config.perceptual_weights)
    if config.init is None and config.model_config is not None:
        settings["model_config"] = read_model_config(config.model_config)
    elif config.init is None:
        settings |= {k: getattr(config, k) for k in ("hidden_dim", "num_layers", "time_embed_dim")}
    settings |= {k: getattr(config, k) for k in RESULT_SETTINGS}
    # recorded only when set, so that runs recorded before these settings existed still resume and rerun
    if config.objective != "velocity":
        settings |= {"objective": config.objective, "equal_fraction": config.equal_fraction}
    if config.drop_farthest:
        settings["drop_farthest"] = config.drop_farthest
    if config.coupling != "independent":
        settings["coupling"] = config.coupling
        if config.coupling == "sinkhorn":
            settings["sinkhorn_reg"] = config.sinkhorn_reg
    return json_value(settings)


def read_model_config(path: str) -> dict[str, Any]:
    """The JSON config of ``--model-config``; one ReflowError line when it cannot be read."""
    file = Path(path)
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ReflowError(f"--model-config {file}: cannot read a JSON config ({type(e).__name__})") from None


def differences(recorded: Mapping[str, Any], now: Mapping[str, Any], prefix: str = "--") -> list[str]:
    """``NAME RECORDED (now NOW)`` for every setting that differs; nested dicts (a model config) by key."""
    found = []
    for key in sorted(set(recorded) | set(now), key=str):
        a, b = recorded.get(key), now.get(key)
        if a == b:
            continue
        name = f"{prefix}{key}".replace("_", "-") if prefix == "--" else f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            found += differences(a, b, f"{name} ")
        else:
            found.append(f"{name} {'none' if a is None else a} (now {'none' if b is None else b})")
    return found


def config_from_record(recorded: Mapping[str, Any]) -> TrainConfig:
    """The TrainConfig of a recorded ``train_config`` (a model card's); names it does not know are dropped."""
    known = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in recorded.items() if k in known})
