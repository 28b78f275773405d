"""One training loop for round 1 (from data, independent or minibatch-OT coupling), round k (teacher pairs)
and k-step distillation.

Plain torch on Accelerate (one CPU, many GPUs, many nodes): ``prepare`` once, ``accumulate``,
``backward``. :func:`train` reads top to bottom in numbered steps, each a call into the modules beside it:
``config`` (the settings, their checks, the run settings a resume must keep), ``output`` (the output
folder: claimed, recognised when finished, written), ``batches`` (the batch of step s as a function of
(seed, s)), ``checkpoints`` (safetensors + JSON: a resume never unpickles anything) and ``card``.

The performance levers act in :func:`run_steps`: the next batch is drawn on a background thread while the
current step runs (into pinned memory on CUDA), the forward pass runs under ``autocast``, and the loss
stays on the device between log steps (no host sync per step); it is checked for NaN/inf at every log and
checkpoint step, so every checkpoint is good.
"""

from __future__ import annotations

import importlib.util
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from reflow.core.progress import Throttle
from reflow.core.solvers import time_grid
from reflow.errors import ReflowError
from reflow.folders.runtime import use_cpu
from reflow.models.velocity import build_model, check_conditioning, init_model, to_mean_flow
from reflow.student.batches import MicroBatch, StepBatches, TrainData, open_data
from reflow.student.checkpoints import TrainingState, latest_checkpoint, resume, save_checkpoint
from reflow.student.config import TrainConfig, TrainResult, check_config, resolve_loss, run_settings
from reflow.student.objectives import Grid, StepLoss, load_features, step_loss
from reflow.student.output import already_complete, claim, finished_run, save_output

ProgressFn = Callable[[int, int, float, float], None]
"""``progress(step, max_steps, loss, samples_per_second)``: called on the main process (rank 0) when the loop
starts (at the resumed step, loss NaN), at every log and checkpoint step, and in between at the first step
and then every ``PROGRESS_SECONDS``. ``loss`` is the mean over the last log window: between log steps the
last logged one (NaN before the first), so these calls add no host sync."""

PROGRESS_SECONDS = 2.0


def train(config: TrainConfig, progress: ProgressFn | None = None) -> TrainResult:
    """Train a velocity model by conditional flow matching (or k-step distillation when
    ``config.distill_k``) and write it (EMA weights) to ``config.out``: a diffusers pipeline folder for an
    image UNet, a ``save_pretrained`` folder for an MLP. Rerun on a finished ``out``, it returns at once."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    # 1. Check the settings and claim the output; the same training, finished, is not run again.
    check_config(config)
    config = resolve_loss(config)
    out, settings = Path(config.out), run_settings(config)
    finished = finished_run(out)
    if finished is not None:
        return already_complete(out, finished, settings)
    ckpt = claim(config, settings)

    # 2. Data: a source to draw z1 from (independent or OT coupling), or stored pairs (in memory or streamed).
    data = open_data(config)

    # 3. Model: a fresh one's initial weights follow the seed.
    set_seed(config.seed)
    model = student_model(config, data, settings)

    # 4. Accelerate, the batches of this process, optimizer, LR schedule, EMA, trackers.
    trackers = tracker_names(config.log_with)
    accelerator = Accelerator(
        cpu=use_cpu(),
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=trackers,
        project_dir=str(out.parent / f"{out.name}.logs"),
    )
    pin = accelerator.device.type == "cuda"  # the batches' copies to the GPU then overlap the step
    batches = StepBatches(data, config, accelerator.num_processes, accelerator.process_index, pin_memory=pin)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    warmup = min(config.warmup_steps, config.max_steps // 10)
    scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=warmup, num_training_steps=config.max_steps)
    # The scheduler is not prepared: Accelerate would step it once per process; ours steps once per step.
    model, optimizer = accelerator.prepare(model, optimizer)
    raw = accelerator.unwrap_model(model)
    ema = EMAModel(raw.parameters(), decay=config.ema_decay, foreach=True)
    state = TrainingState(accelerator, model, raw, optimizer, scheduler, ema)
    if trackers:
        accelerator.init_trackers("reflow", config=tracker_config(config))

    # 5. Resume from the latest checkpoint, if any (claim checked it is this run's).
    start = 0 if ckpt is None else resume(ckpt, state)

    # 6. The loop, on the loss of the objective (a perceptual loss's feature network loaded once).
    features = load_features(config, data.sample_shape, accelerator.device)
    loss_of = step_loss(config, distillation_grid(raw, config.distill_k), features, raw)
    step, loss, seconds = run_steps(config, state, batches, loss_of, start, settings, progress)

    # 7. Save the EMA weights, the model card and the marker (main process), and finish the trackers.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_output(raw, ema, config, data.pairs, settings=settings, steps=step, loss=loss)
    accelerator.wait_for_everyone()
    finish_trackers(accelerator)
    sps = (config.max_steps - start) * config.batch_size / max(seconds, 1e-9)
    return TrainResult(out=out, steps=step, loss=loss, seconds=seconds, samples_per_second=sps)


def run_steps(
    config: TrainConfig,
    state: TrainingState,
    batches: StepBatches,
    loss_of: StepLoss,
    step: int,
    settings: dict[str, Any],
    progress: ProgressFn | None,
) -> tuple[int, float, float]:
    """Train from step ``step`` to ``config.max_steps``, logging every ``log_every`` steps and checkpointing
    every ``checkpoint_every``; returns (the last step, the last logged loss, seconds)."""
    accelerator, out, micro = state.accelerator, Path(config.out), config.gradient_accumulation_steps
    start_time, start_step = time.perf_counter(), step
    loss_value = float("nan")
    loss_sum = torch.zeros((), device=accelerator.device)  # summed on the device: no host sync per step
    loss_count = 0
    tick = Throttle(PROGRESS_SECONDS)
    tell(state, progress, step, config.max_steps, loss_value, 0.0)  # the loop starts
    with ThreadPoolExecutor(max_workers=1) as prefetch:
        upcoming = prefetch.submit(batches.draw, step) if step < config.max_steps else None
        while step < config.max_steps:
            batch = upcoming.result()
            if step + 1 < config.max_steps:
                upcoming = prefetch.submit(batches.draw, step + 1)  # drawn while this step runs
            for m in range(micro):
                loss = micro_step(state, batch.micro(m, accelerator.device), config, loss_of)
                loss_sum += loss.detach().float() / micro
            state.ema.step(state.raw.parameters())
            step += 1
            loss_count += 1
            at_checkpoint = step % config.checkpoint_every == 0 and step < config.max_steps
            if step % config.log_every == 0 or step == config.max_steps or at_checkpoint:
                loss_value = finite_loss(accelerator, loss_sum / loss_count, step, out)  # the one host sync
                loss_sum.zero_()
                loss_count = 0
                sps = (step - start_step) * config.batch_size / max(time.perf_counter() - start_time, 1e-9)
                report(state, config, step, loss_value, sps, progress)
            elif progress is not None and tick():  # between log steps: the last logged loss
                sps = (step - start_step) * config.batch_size / max(time.perf_counter() - start_time, 1e-9)
                tell(state, progress, step, config.max_steps, loss_value, sps)
            if at_checkpoint:
                save_checkpoint(out, state, step, settings)
    return step, loss_value, time.perf_counter() - start_time


def micro_step(state: TrainingState, batch: MicroBatch, config: TrainConfig, loss_of: StepLoss) -> torch.Tensor:
    """Forward (under autocast) and backward on one micro-batch; the optimizer and LR schedule step when
    the gradients of the whole step are in (``accelerator.accumulate``). Returns the loss, on the device."""
    accelerator, model = state.accelerator, state.model
    with accelerator.accumulate(model):
        with accelerator.autocast():
            loss = loss_of(model, batch)
        accelerator.backward(loss)
        if accelerator.sync_gradients and config.grad_clip > 0:
            accelerator.clip_grad_norm_(model.parameters(), config.grad_clip)
        state.optimizer.step()
        if accelerator.sync_gradients:
            state.scheduler.step()
        state.optimizer.zero_grad(set_to_none=True)
    return loss


def finite_loss(accelerator: Any, loss: torch.Tensor, step: int, out: Path) -> float:
    """The mean of ``loss`` over processes, as a float; a NaN or infinite one stops the training in one line."""
    value = accelerator.reduce(loss, "mean").item()
    if not math.isfinite(value):
        last = latest_checkpoint(out)
        kept = f"; the last good checkpoint is {last}" if last else ""
        raise ReflowError(f"loss became {value} by step {step}{kept}; lower --lr or check the data")
    return value


def report(
    state: TrainingState, config: TrainConfig, step: int, loss: float, sps: float, progress: ProgressFn | None
) -> None:
    """Log the step's loss, learning rate and speed to the trackers, and call ``progress`` (main process only)."""
    lr = state.scheduler.get_last_lr()[0]
    state.accelerator.log({"loss": loss, "lr": lr, "samples_per_second": sps}, step=step)  # no-op without trackers
    tell(state, progress, step, config.max_steps, loss, sps)


def tell(state: TrainingState, progress: ProgressFn | None, step: int, total: int, loss: float, sps: float) -> None:
    """``progress(step, total, loss, sps)`` on the main process (rank 0) only."""
    if progress and state.accelerator.is_main_process:
        progress(step, total, loss, sps)


def student_model(config: TrainConfig, data: TrainData, settings: dict[str, Any]) -> torch.nn.Module:
    """The model a training starts from, a MeanFlow one (a second time input, zero at first, so it starts
    as the velocity model it is made from) for ``objective = "meanflow"``."""
    model = velocity_model(config, data, settings)
    if config.distill_k is not None and getattr(model, "mean_flow", False):
        raise ReflowError(
            f"--init {config.init} is a MeanFlow student: it samples in jumps and needs no distillation; "
            "sample it with --nfe k, or distill a velocity student"
        )
    if config.objective == "meanflow" and not getattr(model, "mean_flow", False):
        model = to_mean_flow(model)
    return model


def velocity_model(config: TrainConfig, data: TrainData, settings: dict[str, Any]) -> torch.nn.Module:
    """``--init`` loaded (and checked against the data: sample shape, conditioning), or a fresh model:
    ``--model-config``'s (recorded in ``settings``), else the default for the data's sample shape."""
    pairs = data.pairs
    if config.init is None:
        return build_model(
            data.sample_shape,
            settings.get("model_config"),
            num_classes=pairs.num_classes if pairs is not None else None,
            embed_shape=pairs.embed_shape if pairs is not None else None,
            hidden_dim=config.hidden_dim,
            num_layers=config.num_layers,
            time_embed_dim=config.time_embed_dim,
            # a fresh MeanFlow MLP: t at scale 1 (MLPVelocity's docstring); recorded in its config.json
            **({"time_scale": 1.0} if config.objective == "meanflow" else {}),
        )
    model = init_model(config.init, allow_pickle=config.allow_pickle)
    if tuple(model.sample_shape) != data.sample_shape:
        raise ReflowError(
            f"--init model takes samples of shape {tuple(model.sample_shape)}, the data has {data.sample_shape}"
        )
    if pairs is not None:
        check_conditioning(model, pairs.num_classes, pairs.embed_shape, f"--init {config.init}")
    elif getattr(model, "conditioning", None) is not None:
        raise ReflowError(f"--init {config.init} is conditional; training from --data is unconditional")
    return model


def distillation_grid(model: torch.nn.Module, k: int | None) -> Grid | None:
    """The k-step Euler grid distillation runs: the student's own (an exported student's scheduler grid), or
    the uniform one; None when not distilling."""
    if k is None:
        return None
    model_grid = getattr(model, "euler_grid", None)
    nodes, query = model_grid(k) if model_grid else (time_grid(k),) * 2
    return nodes.tolist(), query[:k].tolist()


def tracker_names(log_with: str) -> list[str] | None:
    """Accelerate's ``log_with`` for ``--log-with``: ``auto`` is tensorboard when installed, else none."""
    if log_with == "none":
        return None
    if log_with == "auto":
        have = importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX")
        return ["tensorboard"] if have else None
    return [log_with]


def finish_trackers(accelerator: Any) -> None:
    """Close the trackers. Not ``end_training()``: it also destroys the process group, and a caller may go
    on under the same launch (reflow rounds trains, generates and evaluates in one process per rank)."""
    for tracker in accelerator.trackers:
        tracker.finish()


def tracker_config(config: TrainConfig) -> dict[str, Any]:
    """Hyperparameters as trackers take them (scalars and strings only)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in asdict(config).items()}
