"""Pairs without z0 and pairs read at full speed: bytes per pair, and training from pairs against training from
data, side by side in one run.

``bytes``: the same pairs made by the real ``generate_pairs`` path from a cheap stand-in teacher (z1 = tanh(z0),
so the teacher costs nothing) with z0 stored (``--store-z0``) and without (the default), in float32 and float16,
for 2-D points, 3x32x32 images and 4x64x64 latents; the Arrow files' bytes per pair and the ratio
without / with (acceptance: <= 0.52x).

``speed``: ``reflow.student.train`` on the 2-D task (the default MLP, batch 512, l2 loss everywhere so every
variant does the same arithmetic; the pairs' default loss is pseudo-Huber), timed in process CPU seconds
(every thread: the batch prefetch thread included) between two log steps after ``--lead`` untimed steps:

- ``data``: round 1 from checkerboard (independent coupling: z1 drawn from the source, z0 = randn);
- ``pairs ...``: the same model on 65,536 stored 2-D pairs, z0 stored or rebuilt from (seed, index), read into
  memory (``--pairs-in-memory yes``) or streamed from the memory-mapped Arrow files (``no``).

The variants run in turn, ``--repeats`` times, interleaved (A, B, C, ..., A, B, C, ...) so that load from other
processes hits them alike; steps per CPU-second are reported as the median of the repeats, and each as a ratio
to ``data`` (acceptance for pairs in memory: >= 0.97x).

    python benchmarks/pairs.py bytes
    python benchmarks/pairs.py speed --threads 1
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
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(REPO))

from benchmarks.standin import StandIn  # noqa: E402
from reflow.pairs import generate_pairs  # noqa: E402
from reflow.student import TrainConfig, train  # noqa: E402


def arrow_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.arrow"))


def bytes_per_pair(root: Path) -> None:
    print("shape        dtype    with z0 B/pair  without B/pair  ratio")
    for shape, rows in (((2,), 100_000), ((3, 32, 32), 4_000), ((4, 64, 64), 1_000)):
        for dtype in ("float32", "float16"):
            size = {}
            for store in (True, False):
                out = root / f"{'x'.join(map(str, shape))}-{dtype}-{store}"
                generate_pairs(StandIn(shape), out, rows, batch_size=1000, dtype=dtype, store_z0=store)
                size[store] = arrow_bytes(out) / rows
                shutil.rmtree(out)
            name = "x".join(map(str, shape))
            print(f"{name:12} {dtype:8} {size[True]:14.1f} {size[False]:15.1f}  {size[False] / size[True]:.4f}")


def speed(root: Path, args: argparse.Namespace) -> None:
    pairs = {
        store: generate_pairs(StandIn((2,)), root / f"pairs-{store}", 65536, batch_size=8192, store_z0=store)
        for store in (True, False)
    }
    mlp = dict(batch_size=512, lr=1e-3, loss="l2", log_with="none", checkpoint_every=10**9, log_every=args.lead)
    variants = {
        "data (checkerboard)": dict(data="checkerboard"),
        "pairs, z0 stored, in memory": dict(pairs=str(pairs[True]), pairs_in_memory="yes"),
        "pairs, z0 rebuilt, in memory": dict(pairs=str(pairs[False]), pairs_in_memory="yes"),
        "pairs, z0 stored, streamed": dict(pairs=str(pairs[True]), pairs_in_memory="no"),
        "pairs, z0 rebuilt, streamed": dict(pairs=str(pairs[False]), pairs_in_memory="no"),
    }
    if args.only:
        variants = {name: kw for k, (name, kw) in enumerate(variants.items()) if k == 0 or str(k) in args.only}
    runs = iter(range(10**9))

    def run(kw: dict[str, Any]) -> float:
        out = root / f"run-{next(runs)}"
        marks: list[tuple[int, float]] = []
        config = TrainConfig(out=str(out), max_steps=args.lead + args.steps, **mlp, **kw)
        train(config, progress=lambda step, total, loss, sps: marks.append((step, time.process_time())))
        shutil.rmtree(out, ignore_errors=True)
        (s0, c0), (s1, c1) = marks[0], marks[-1]
        return (s1 - s0) / (c1 - c0)

    results: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, kw in variants.items():
            results[name].append(run(kw))
    base = statistics.median(results["data (checkerboard)"])
    print(f"2-D MLP, batch 512, l2, {args.steps} timed steps after {args.lead}, {args.repeats} interleaved repeats")
    print("variant                          steps/CPU-s (median; each run)       ratio to data")
    for name, values in results.items():
        each = ", ".join(f"{v:.1f}" for v in values)
        print(f"{name:32} {statistics.median(values):7.1f}  ({each})  {statistics.median(values) / base:.3f}x")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("bytes", "speed"))
    p.add_argument("--steps", type=int, default=300, help="speed: timed steps per run")
    p.add_argument("--lead", type=int, default=100, help="speed: untimed steps before the clock starts")
    p.add_argument("--repeats", type=int, default=3, help="speed: runs per variant, interleaved")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument(
        "--only", default="", help="speed: the pairs variants to run beside data, by number 1-4 (e.g. 12) [all]"
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ["ACCELERATE_USE_CPU"] = "true"
    with tempfile.TemporaryDirectory(prefix="reflow-bench-pairs-") as scratch:
        if args.what == "bytes":
            bytes_per_pair(Path(scratch))
        else:
            speed(Path(scratch), args)


if __name__ == "__main__":
    main()
