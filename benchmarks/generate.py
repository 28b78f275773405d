"""Pair-generation throughput against the teacher's ceiling and against diffusers' own DDIMPipeline.

Three ways to make the same number of samples from the same UNet, at the same batch size, device and
dtype, with the same number of UNet calls (NFE per sample), timed side by side in one run:

- ours: ``reflow.pairs.generate_pairs`` with a ``DiffusersTeacher``, end to end (seeded per-row noise,
  the solver loop, the finiteness check, the copies to the host, the Arrow shards written and joined
  into a dataset in a temporary folder);
- ceiling: a bare loop of the UNet's forward passes only (no solver step, no noise, no storage), the
  timesteps already on the device; its evals/s divided by NFE is the best pairs/s any sampler can reach;
- DDIMPipeline: diffusers' stock pipeline (it draws its own noise with ``randn_tensor`` and returns
  ``output_type="np"``), for the DDIM solver at the same steps.

Every method runs ``--warmup`` batches first; then the three are timed in turn, ``--repeats`` times,
interleaved so that load from other processes hits them alike. Pairs/s are reported best-of-repeats
(the least disturbed run) and as the median; ratios are given for both.

    python benchmarks/generate.py --batch-size 64 --num-pairs 256 --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
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

from reflow.errors import ReflowError  # noqa: E402
from reflow.pairs import generate_pairs  # noqa: E402
from reflow.teachers.ddpm import DiffusersTeacher  # noqa: E402

DEFAULT_TEACHER = REPO / "data" / "teachers" / "digits-ddpm"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--teacher",
        type=Path,
        default=None,
        help=f"diffusers pipeline folder [default: the bundled {DEFAULT_TEACHER.relative_to(REPO)}]",
    )
    p.add_argument("--num-pairs", type=int, default=None, help="pairs per timed run [default: 4 batches]")
    p.add_argument("--nfe", type=int, default=50, help="UNet calls per sample")
    p.add_argument("--batch-size", type=int, default=256, help="samples per UNet call (all three methods)")
    p.add_argument(
        "--solver", choices=("ddim", "dpm"), default="ddim", help="solver of ours (DDIMPipeline is always DDIM)"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=1, help="untimed batches per method before timing")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per method, interleaved")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads [default: torch's]")
    p.add_argument("--autocast", default=None, help="GPU: autocast dtype (bfloat16/float16) for all three")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (all three share it)")
    args = p.parse_args(argv)
    if args.num_pairs is None:
        args.num_pairs = 4 * args.batch_size
    if min(args.num_pairs, args.nfe, args.batch_size, args.repeats) < 1 or args.warmup < 0:
        p.error("--num-pairs, --nfe, --batch-size and --repeats must be positive, --warmup >= 0")
    return args


def batch_sizes(num: int, batch: int) -> list[int]:
    return [min(batch, num - b) for b in range(0, num, batch)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    scratch = tempfile.TemporaryDirectory(prefix="reflow-bench-")
    root = Path(scratch.name)
    if args.teacher is None:
        args.teacher = DEFAULT_TEACHER

    extra = {}
    if args.autocast:
        extra["autocast"] = args.autocast
    if args.compile:
        extra["compile"] = True
    try:
        teacher = DiffusersTeacher(args.teacher, nfe=args.nfe, solver=args.solver, device=device, **extra)
    except ReflowError as e:
        sys.exit(f"error: {e}")
    unet = teacher.unet
    forward = getattr(teacher, "_forward", unet)  # the compiled module when --compile, else the UNet
    autocast_dtype = getattr(teacher, "autocast_dtype", None)
    channels_last = getattr(teacher, "channels_last", False)

    def amp():
        if autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=autocast_dtype)

    shape = teacher.sample_shape
    sizes = batch_sizes(args.num_pairs, args.batch_size)
    n_params = sum(p.numel() for p in unet.parameters())
    print(
        f"teacher {args.teacher} ({n_params:,} parameters, sample {shape}), solver {args.solver}, "
        f"nfe {args.nfe}, batch {args.batch_size}, {args.num_pairs} pairs, device {device}, "
        f"dtype {unet.dtype}{', autocast ' + str(autocast_dtype) if autocast_dtype else ''}"
        f"{', compiled' if args.compile else ''}, torch threads {torch.get_num_threads()}, "
        f"warmup {args.warmup} batch(es), {args.repeats} repeats"
    )

    # --- ceiling: the UNet's forward passes alone, timesteps already on the device ---------------
    teacher.scheduler.set_timesteps(args.nfe)
    timesteps = teacher.scheduler.timesteps.to(device)
    inputs = {}
    for b in set(sizes) | {args.batch_size}:
        x = torch.randn(b, *shape, generator=torch.Generator().manual_seed(0)).to(device, unet.dtype)
        inputs[b] = x.contiguous(memory_format=torch.channels_last) if channels_last else x

    @torch.inference_mode()
    def ceiling(batches: list[int]) -> None:
        with amp():
            for b in batches:
                x = inputs[b]
                for t in timesteps:
                    _ = forward(x, t).sample
        sync(device)

    # --- ours: generate_pairs end to end -------------------------------------------------------------
    runs = iter(range(10**9))
    finished: list[Path] = []

    def ours(batches: list[int]) -> None:
        out = root / f"pairs-{next(runs)}"
        generate_pairs(teacher, out, sum(batches), seed=0, batch_size=args.batch_size)
        sync(device)
        finished.append(out)  # removed after the clock stops

    # --- diffusers' DDIMPipeline -------------------------------------------------------------------------
    from diffusers import DDIMPipeline, DDIMScheduler

    pipe = DDIMPipeline(unet=forward, scheduler=DDIMScheduler.from_config(teacher.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator(device).manual_seed(0)

    def pipeline(batches: list[int]) -> None:
        with amp():
            for b in batches:
                pipe(batch_size=b, generator=generator, eta=0.0, num_inference_steps=args.nfe, output_type="np")
        sync(device)

    methods = {"ours (generate_pairs)": ours, "ceiling (bare UNet loop)": ceiling, "diffusers DDIMPipeline": pipeline}
    for fn in methods.values():
        if args.warmup:
            fn([args.batch_size] * args.warmup)
    while finished:
        shutil.rmtree(finished.pop(), ignore_errors=True)
    rates: dict[str, list[float]] = {name: [] for name in methods}
    for r in range(args.repeats):
        order = list(methods)
        order = order[r % 3 :] + order[: r % 3]  # rotate, so no method always runs right after another
        for name in order:
            sync(device)
            start = time.perf_counter()
            methods[name](sizes)
            rates[name].append(args.num_pairs / (time.perf_counter() - start))
            while finished:
                shutil.rmtree(finished.pop(), ignore_errors=True)

    print(f"{'method':<26} {'best pairs/s':>13} {'median':>10}   all repeats")
    for name, values in rates.items():
        listed = " ".join(f"{v:.2f}" for v in values)
        print(f"{name:<26} {max(values):>13.2f} {statistics.median(values):>10.2f}   {listed}")
    ours_r, ceil_r, pipe_r = rates.values()
    ceil_evals = max(ceil_r) * args.nfe
    print(f"ceiling: {ceil_evals:.1f} UNet sample-evals/s / {args.nfe} NFE = {max(ceil_r):.2f} pairs/s")
    print(
        f"ours / ceiling       = {max(ours_r) / max(ceil_r):.3f} (best)   "
        f"{statistics.median(ours_r) / statistics.median(ceil_r):.3f} (median)"
    )
    print(
        f"ours / DDIMPipeline  = {max(ours_r) / max(pipe_r):.3f} (best)   "
        f"{statistics.median(ours_r) / statistics.median(pipe_r):.3f} (median)"
    )
    scratch.cleanup()


if __name__ == "__main__":
    main()
