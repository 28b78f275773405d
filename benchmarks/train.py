"""Training throughput of reflow's real loop against a bare torch loop on the same model, batch and optimizer.

Two ways to train the same velocity model at the same batch size, device and learning rate, timed side by
side in one run:

- reflow: ``reflow.student.train(TrainConfig(...))``, what ``reflow train`` runs, end to end: Accelerate's
  ``prepare``/``accumulate``/``backward``, AdamW, the cosine warmup scheduler, gradient clipping, the EMA
  (diffusers ``EMAModel``, foreach), batches drawn by a background thread (from ``PairsReader`` over the
  Arrow pairs, or from the data source), the loss kept on the device between log steps;
- bare: the ceiling, a plain loop on a model built the same way: index a batch out of tensors already on
  the device, ``t = torch.rand``, ``flow_matching_loss``, backward, ``torch.optim.AdamW`` step, zero_grad.
  No EMA, no scheduler, no clipping, no data pipeline;
- bare + extras: the same plain loop with what reflow's loop does for the model's sake, written by hand:
  gradient clipping (``clip_grad_norm_``, 1.0), the cosine warmup schedule stepped every step, and the EMA
  (diffusers ``EMAModel``, foreach) updated every step. reflow / (bare + extras) is what the loop itself
  costs: Accelerate, the background batches, the loss kept on the device.

Workloads: ``digits`` (default) fine-tunes the bundled ``data/teachers/digits-ddpm`` UNet (``--init``, 8x8
grayscale, 1.0M parameters) on a pairs dataset that the benchmark makes first in a temporary folder with
``generate_pairs`` (NFE 2 DDIM: the pairs' quality does not matter for throughput); ``mlp`` trains the
default MLP on ``checkerboard`` (round 1, no pairs), a quick run where per-step overhead shows most.

Timing. The reflow run is ``lead + --steps`` steps long with ``log_every = lead``, where
``lead = max(--warmup, --steps)``; a ``progress`` callback notes the clock at its two log steps, ``lead`` and
the last. Each log step syncs the device (the loss check reads the loss back), so the window between them
is exactly ``--steps`` optimizer steps of the steady-state loop, with one device sync at each end, as in the
bare loop; model loading, Accelerate setup, the first (slow) steps and the final save of the EMA model are
all outside it. (``lead >= --steps`` keeps any other log step out of the window.) The bare loop runs
``--warmup`` untimed steps, then ``--steps`` timed ones, read back by ``loss.item()`` at the end.

The two run in turn, ``--repeats`` times, interleaved (reflow, bare, reflow, bare, ...) so that load from
other processes hits them alike; samples/s are reported as the median and the best of the repeats, and
the ratio reflow/bare for both (target >= 0.95; 1.0 is the ceiling).

    python benchmarks/train.py --threads 1
    python benchmarks/train.py --workload mlp
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(REPO))

from reflow.core.flow import flow_matching_loss  # noqa: E402
from reflow.errors import ReflowError  # noqa: E402
from reflow.folders.data import load_source  # noqa: E402
from reflow.models.velocity import build_model, init_model  # noqa: E402
from reflow.pairs import generate_pairs, load_pairs  # noqa: E402
from reflow.student import TrainConfig, train  # noqa: E402
from reflow.teachers import load_teacher  # noqa: E402

DEFAULT_TEACHER = REPO / "data" / "teachers" / "digits-ddpm"
# Per workload: (batch size, timed steps). Digits: about 0.3 s a step on one CPU thread at batch 128.
CPU_DEFAULTS = {"digits": (128, 30), "mlp": (512, 300)}
GPU_DEFAULTS = {"digits": (128, 300), "mlp": (512, 1000)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", choices=("digits", "mlp"), default="digits", help="what to train [default: digits]")
    p.add_argument(
        "--init",
        type=Path,
        default=None,
        help=f"digits: the model to start from [default: the bundled {DEFAULT_TEACHER.relative_to(REPO)}]",
    )
    p.add_argument("--num-pairs", type=int, default=2048, help="digits: pairs to generate and train on")
    p.add_argument("--batch-size", type=int, default=None, help="samples per step [default: 128 digits, 512 mlp]")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="timed steps per run [default: digits 30 on CPU, 300 on GPU; mlp 300 on CPU, 1000 on GPU]",
    )
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (both)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--warmup", type=int, default=5, help="untimed steps before the clock starts (reflow: at least --steps)"
    )
    p.add_argument("--repeats", type=int, default=3, help="timed runs per method, interleaved")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (torch.set_num_threads)")
    args = p.parse_args(argv)
    defaults = (GPU_DEFAULTS if torch.device(args.device).type == "cuda" else CPU_DEFAULTS)[args.workload]
    if args.batch_size is None:
        args.batch_size = defaults[0]
    if args.steps is None:
        args.steps = defaults[1]
    if min(args.num_pairs, args.batch_size, args.steps, args.repeats, args.threads) < 1 or args.warmup < 0:
        p.error("--num-pairs, --batch-size, --steps, --repeats and --threads must be positive, --warmup >= 0")
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"  # train() runs on Accelerate's device: make it the CPU too
    elif device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but torch sees no GPU")
    scratch = tempfile.TemporaryDirectory(prefix="reflow-bench-train-")
    root = Path(scratch.name)
    init = args.init or DEFAULT_TEACHER
    B, steps = args.batch_size, args.steps
    lead = max(args.warmup, steps)  # reflow's untimed steps: its first log step starts the clock

    # --- the workload: what both train on ----------------------------------------------------------
    try:
        if args.workload == "digits":
            teacher = load_teacher(init, nfe=2, solver="ddim", device=device)
            start = time.perf_counter()
            pairs_dir = generate_pairs(teacher, root / "pairs", args.num_pairs, batch_size=512)
            made = time.perf_counter() - start
            del teacher
            data_kw = {"pairs": str(pairs_dir), "init": str(init)}
            pairs = load_pairs(pairs_dir)
            pool_z0, pool_z1 = pairs.z0.to(device), pairs.z1.to(device)
            data_note = f"{args.num_pairs} pairs of {init.relative_to(REPO) if init.is_relative_to(REPO) else init}"
            data_note += f" (made in {made:.1f} s, NFE 2 DDIM)"

            def make_model() -> torch.nn.Module:
                return init_model(init)

        else:
            source = load_source("checkerboard")
            mlp = {f: getattr(TrainConfig, f) for f in ("hidden_dim", "num_layers", "time_embed_dim")}
            data_kw = {"data": "checkerboard", **mlp}
            pool_z0 = None
            pool_z1 = source.sample(65536, torch.Generator().manual_seed(0)).to(device)
            data_note = "checkerboard (round 1, independent coupling), default MLP"

            def make_model() -> torch.nn.Module:
                torch.manual_seed(0)
                return build_model(source.sample_shape, **mlp)

    except ReflowError as e:
        sys.exit(f"error: {e}")

    probe = make_model()
    n_params = sum(p.numel() for p in probe.parameters())
    sample_shape = tuple(pool_z1.shape[1:])
    del probe
    print(
        f"workload {args.workload}: {data_note}; model {n_params:,} parameters, sample {sample_shape}; "
        f"batch {B}, lr {args.lr}, device {device}, torch threads {torch.get_num_threads()}; "
        f"{steps} timed steps per run (reflow after {lead} untimed, bare after {args.warmup}), {args.repeats} repeats"
    )

    # --- reflow: train() end to end, timed between its first and last log step -----------------------
    runs = iter(range(10**9))
    reported: list[float] = []

    def reflow_run() -> float:
        out = root / f"reflow-{next(runs)}"
        marks: list[tuple[int, float]] = []
        config = TrainConfig(
            out=str(out),
            max_steps=lead + steps,
            batch_size=B,
            lr=args.lr,
            log_every=lead,
            checkpoint_every=10**9,
            log_with="none",
            **data_kw,
        )
        result = train(config, progress=lambda step, total, loss, sps: marks.append((step, time.perf_counter())))
        shutil.rmtree(out, ignore_errors=True)
        reported.append(result.samples_per_second)
        marks = [m for m in marks if m[0] in (lead, lead + steps)]  # the two log steps, not the calls between
        (s0, t0), (s1, t1) = marks[0], marks[-1]
        assert (s0, s1) == (lead, lead + steps), marks
        return (s1 - s0) * B / (t1 - t0)

    # --- bare: the same model and optimizer in a plain loop, batches already on the device --------------
    def bare_run(extras: bool = False) -> float:
        from diffusers.optimization import get_cosine_schedule_with_warmup
        from diffusers.training_utils import EMAModel

        model = make_model().to(device)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=TrainConfig.weight_decay)
        total = args.warmup + steps
        schedule = get_cosine_schedule_with_warmup(optimizer, min(TrainConfig.warmup_steps, total // 10), total)
        ema = EMAModel(model.parameters(), decay=TrainConfig.ema_decay, foreach=True) if extras else None
        n = len(pool_z1)

        def step() -> torch.Tensor:
            idx = torch.randint(0, n, (B,), device=device)
            z1 = pool_z1[idx]
            z0 = pool_z0[idx] if pool_z0 is not None else torch.randn_like(z1)
            t = torch.rand(B, device=device)
            loss = flow_matching_loss(model, z0, z1, t)
            loss.backward()
            if extras:
                torch.nn.utils.clip_grad_norm_(model.parameters(), TrainConfig.grad_clip)
            optimizer.step()
            if extras:
                schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if extras:
                ema.step(model.parameters())
            return loss

        for _ in range(args.warmup):
            step()
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            loss = step()
        loss.item()  # reads the loss back: the device has finished every step
        return steps * B / (time.perf_counter() - start)

    methods = {"reflow (train)": reflow_run, "bare torch loop": bare_run, "bare + extras": lambda: bare_run(True)}
    rates: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(args.repeats):
        for name, fn in methods.items():
            rates[name].append(fn())

    print(f"{'method':<18} {'median samples/s':>17} {'best':>10} {'ms/step':>9}   all repeats")
    for name, values in rates.items():
        listed = " ".join(f"{v:.1f}" for v in values)
        med = statistics.median(values)
        print(f"{name:<18} {med:>17.1f} {max(values):>10.1f} {1000 * B / med:>9.1f}   {listed}")
    ours, bare, extras = rates.values()
    print(
        f"train() itself reported {statistics.median(reported):.1f} samples/s (median; its clock also counts "
        f"the first {lead} steps)"
    )
    for name, other in (("bare", bare), ("bare + extras", extras)):
        best, median = max(ours) / max(other), statistics.median(ours) / statistics.median(other)
        print(f"reflow / {name} = {best:.3f} (best)   {median:.3f} (median)")
    print(
        f"ratio reflow/bare: {statistics.median(ours) / statistics.median(bare):.2f}; reflow/(bare + extras): "
        f"{statistics.median(ours) / statistics.median(extras):.2f} (target 0.95)"
    )
    scratch.cleanup()


if __name__ == "__main__":
    main()
