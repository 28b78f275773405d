"""Pairs at the sizes users run: a million 3x32x32 pairs (and a 4x64x64 run) made by the real ``generate_pairs``
path from the stand-in teacher z1 = tanh(z0) (``benchmarks/standin.py``: the teacher costs nothing, so the
pipeline around it is what is measured), float16 without z0 (the default layout).

Reported, each beside its reference, in one run:

- bytes per pair of the four layouts (float32 / float16, with / without z0), from ``--layout-rows`` rows each
  (the big run's own bytes per pair is printed beside them);
- write throughput (pairs/s, MB/s of the final Arrow files) of ``generate_pairs`` against two bare loops
  writing the same float16 rows to one Arrow IPC file with pyarrow: ``bare write`` (one ready batch written
  over and over: the I/O ceiling) and ``bare loop`` (each row's noise drawn by ``row_noise``, tanh, float16,
  written: the same work without shards, ``datasets`` or the final join);
- random-batch read throughput (rows/s at ``--batch``) through ``PairsReader(in_memory="no")``, streamed from the
  memory-mapped Arrow files with z0 rebuilt from (seed, index), against what a GPU training step consumes
  (an assumption, stated in the table), and what ``in_memory="auto"`` would pick on this machine;
- peak resident memory of opening the pairs and reading ``--read-batches`` random batches, each in a fresh
  subprocess, at ``--small-rows`` (100k) rows against ``--rows``: peak RSS (``VmHWM``, which counts the pages
  of the memory-mapped files the batches touched, i.e. shared page cache; not ``ru_maxrss``, which a child
  inherits from the process that forked it) and the peak of the process's own anonymous memory
  (``RssAnon``, sampled after every batch); acceptance: the big run within 1.1x;
- resuming after a kill: ``generate_pairs`` in a subprocess, SIGKILLed once ``--kill-at`` of its shards are
  finished, then the same call rerun: the rerun's wall and CPU seconds, and the final pairs checked
  (exactly ``--rows`` rows, indices 0..N-1 each once, a few rows' z1 = tanh(z0) with z0 rebuilt by ``z0_of``).

    OMP_NUM_THREADS=1 python benchmarks/scale.py                       # 1M x 3x32x32
    OMP_NUM_THREADS=1 python benchmarks/scale.py --rows 100000 --shape 4,64,64 --small-rows 10000
    OMP_NUM_THREADS=1 python benchmarks/scale.py --quick                # 20k rows, under a minute

Everything is written under ``--scratch`` (default: a temporary folder, removed at the end).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(REPO))

from benchmarks.standin import StandIn  # noqa: E402
from reflow.core.noise import row_noise  # noqa: E402
from reflow.pairs import PairsReader, generate_pairs, memory_budget, read_provenance, z0_of  # noqa: E402

SEED = 0
MB = 1e6

# The GPU step the reads must keep up with (an assumption, nothing here measures a GPU): the DDPM CIFAR-10
# UNet (35.7M parameters; about 6.1 G multiply-adds per 32x32 forward, as the pruning literature reports it,
# e.g. Diff-Pruning, Fang et al. 2023) costs about 3 x 2 x 6.1 = 37 GFLOP per image per training step
# (forward + backward), 18.7 TFLOP per batch of 512. An H100 SXM (989 dense bf16 TFLOPS) at a plausible 35%
# utilisation for a small-resolution UNet does that in about 54 ms: about 9,500 rows/s. The same step at 100%
# utilisation (an upper bound nobody reaches) would be 19 ms, about 27,000 rows/s. Larger samples scale the
# FLOPs with the pixels, so the rows/s needed fall in proportion (4x64x64 latents: 4x fewer rows/s).
GPU_ROWS_PER_S_32 = 9_500
GPU_ROWS_PER_S_32_PEAK = 27_000


def gpu_need(shape: tuple[int, ...]) -> tuple[float, float]:
    """The rows/s the assumed H100 step consumes at this sample shape (typical, upper bound)."""
    scale = (shape[-1] * shape[-2]) / (32 * 32)
    return GPU_ROWS_PER_S_32 / scale, GPU_ROWS_PER_S_32_PEAK / scale


def arrow_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.arrow"))


def timed(fn, *args, **kwargs) -> tuple[Any, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def generate(shape, out: Path, rows: int, dtype: str = "float16", store_z0: bool = False, batch: int = 1024):
    return generate_pairs(StandIn(shape), out, rows, seed=SEED, batch_size=batch, dtype=dtype, store_z0=store_z0)


# --- bytes per pair --------------------------------------------------------------------------------------------


def layouts(root: Path, shape, rows: int, batch: int) -> dict[tuple[str, bool], float]:
    size = {}
    for dtype in ("float32", "float16"):
        for store in (True, False):
            out = root / f"layout-{dtype}-{store}"
            generate(shape, out, rows, dtype, store, batch)
            size[dtype, store] = arrow_bytes(out) / rows
            shutil.rmtree(out)
    return size


# --- bare Arrow writes -----------------------------------------------------------------------------------------


def _ipc_table(z1: np.ndarray, index: np.ndarray):
    import pyarrow as pa

    flat = pa.array(z1.reshape(-1), type=pa.float16())
    col = pa.FixedSizeListArray.from_arrays(flat, z1[0].size)
    return pa.table({"z1": col, "index": pa.array(index, type=pa.int64())})


def bare_write(path: Path, shape, rows: int, chunk: int = 8192) -> float:
    """One ready float16 batch written ``rows`` rows over: Arrow IPC at the I/O ceiling. Returns wall seconds."""
    import pyarrow as pa

    z1 = torch.tanh(row_noise(SEED, np.arange(chunk), shape)).numpy().astype(np.float16)
    table = _ipc_table(z1, np.arange(chunk))
    start = time.perf_counter()
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        for b in range(0, rows, chunk):
            writer.write_table(table.slice(0, min(chunk, rows - b)))
    return time.perf_counter() - start


def bare_loop(path: Path, shape, rows: int, chunk: int = 1024) -> float:
    """Each row's noise, tanh, float16, written to one Arrow IPC file: the same work without the pipeline."""
    import pyarrow as pa

    start = time.perf_counter()
    writer = None
    with pa.OSFile(str(path), "wb") as sink:
        for b in range(0, rows, chunk):
            idx = np.arange(b, min(b + chunk, rows))
            table = _ipc_table(torch.tanh(row_noise(SEED, idx, shape)).numpy().astype(np.float16), idx)
            writer = writer or pa.ipc.new_file(sink, table.schema)
            writer.write_table(table)
        writer.close()
    return time.perf_counter() - start


# --- reads and memory, each in a fresh subprocess --------------------------------------------------------------


def _status_kb(field: str) -> int:
    """A field of /proc/self/status in kB (``VmHWM``: peak resident memory of this process image, reset by
    exec, unlike ``ru_maxrss``, which a child inherits from the process that forked it)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def read_child(path: str, batches: int, batch: int) -> dict[str, Any]:
    """(In a fresh process.) Open the pairs streamed and read ``batches`` random batches."""
    torch.set_num_threads(1)
    start = time.perf_counter()
    reader = PairsReader(path, in_memory="no")
    opened = time.perf_counter() - start
    need, budget = reader.memory_bytes(), memory_budget()
    gen = torch.Generator().manual_seed(1)
    peak_anon = _status_kb("RssAnon")
    first = time.perf_counter()
    for _ in range(batches):
        z0, z1, _cond = reader.batch(torch.randint(0, len(reader), (batch,), generator=gen))
        peak_anon = max(peak_anon, _status_kb("RssAnon"))
    seconds = time.perf_counter() - first
    return {
        "rows": len(reader),
        "open_s": opened,
        "rows_per_s": batches * batch / seconds,
        "maxrss_mb": _status_kb("VmHWM") * 1024 / MB,
        "peak_anon_mb": peak_anon * 1024 / MB,
        "auto_in_memory": need <= budget,
        "memory_need_gb": need / 1e9,
        "memory_budget_gb": budget / 1e9,
    }


def child(*args: str) -> dict[str, Any]:
    """Run this script's hidden subcommand ``args`` in a fresh interpreter; its last stdout line is JSON."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- kill at 90% and resume ------------------------------------------------------------------------------------


def generate_child(out: str, rows: int, shape: str, batch: int) -> dict[str, Any]:
    """(In a fresh process.) ``generate_pairs`` as the big run calls it, timed."""
    torch.set_num_threads(1)
    _, wall, cpu = timed(generate, parse_shape(shape), Path(out), rows, "float16", False, batch)
    return {"wall_s": wall, "cpu_s": cpu}


def shards_done(work: Path) -> int:
    try:
        return sum(1 for p in work.iterdir() if re.fullmatch(r"shard-\d{5}", p.name))
    except FileNotFoundError:
        return 0


def kill_and_resume(root: Path, shape, rows: int, batch: int, kill_at: float) -> dict[str, Any]:
    out = root / "resume"
    work = Path(f"{out}.partial")
    total = math.ceil(rows / _shard_size(shape, batch))
    target = max(1, min(total - 1, round(kill_at * total)))  # a shard short at least: killed before the join
    cmd = [sys.executable, __file__, "_generate", str(out), str(rows), ",".join(map(str, shape)), str(batch)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    while shards_done(work) < target and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_after = time.perf_counter() - start
    done_at_kill = shards_done(work)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = time.perf_counter()
    rerun = child("_generate", str(out), str(rows), ",".join(map(str, shape)), str(batch))
    outer_wall = time.perf_counter() - wall
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    outer_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    check = check_pairs(out, rows, shape)
    shutil.rmtree(out)
    return {
        "shards": total,
        "killed_at_shards": done_at_kill,
        "killed_after_s": killed_after,
        "rerun_wall_s": rerun["wall_s"],
        "rerun_cpu_s": rerun["cpu_s"],
        "rerun_process_wall_s": outer_wall,
        "rerun_process_cpu_s": outer_cpu,
        **check,
    }


def _shard_size(shape, batch: int) -> int:
    from reflow.pairs.plan import default_shard_size

    return default_shard_size(tuple(shape), "float16", batch)


def check_pairs(out: Path, rows: int, shape, spot: int = 8) -> dict[str, Any]:
    """Exactly ``rows`` rows, indices 0..rows-1 each once, and ``spot`` rows' z1 = tanh(z0(seed, index))."""
    import datasets

    ds = datasets.load_from_disk(str(out)).with_format("numpy")
    index = np.asarray(ds["index"], dtype=np.int64)
    indices_ok = len(ds) == rows and np.array_equal(np.sort(index), np.arange(rows))
    provenance = read_provenance(out)
    picks = np.random.default_rng(2).choice(rows, spot, replace=False)
    worst = 0.0
    for i in picks.tolist():
        z1 = torch.from_numpy(np.asarray(ds[i]["z1"], dtype=np.float32))
        want = torch.tanh(z0_of(provenance, [int(index[i])])[0]).half().float()
        worst = max(worst, (z1 - want).abs().max().item())
    return {"rows_ok": len(ds) == rows, "indices_ok": bool(indices_ok), "spot_rows": spot, "spot_max_err": worst}


# --- the run ---------------------------------------------------------------------------------------------------


def parse_shape(text: str) -> tuple[int, ...]:
    return tuple(int(s) for s in text.split(","))


def run(args: argparse.Namespace, root: Path) -> None:
    shape, rows, batch = parse_shape(args.shape), args.rows, args.batch_size
    name = "x".join(map(str, shape))
    small = min(args.small_rows, rows)
    print(f"{name}, {rows:,} rows, float16 without z0, batch {batch}, 1 thread, scratch {root}", flush=True)

    size = layouts(root, shape, args.layout_rows, batch)
    big = root / "big"
    _, gen_wall, gen_cpu = timed(generate, shape, big, rows, "float16", False, batch)
    big_bytes = arrow_bytes(big)
    small_dir = root / "small"
    generate(shape, small_dir, small, "float16", False, batch)

    ipc = root / "bare.arrow"
    write_wall = bare_write(ipc, shape, rows)
    ipc_bytes = ipc.stat().st_size
    ipc.unlink()
    loop_rows = min(rows, args.loop_rows)
    loop_wall = bare_loop(ipc, shape, loop_rows)
    loop_bytes = ipc.stat().st_size * rows / loop_rows
    ipc.unlink()

    reads = {
        n: child("_read", str(d), str(args.read_batches), str(args.batch)) for n, d in ((small, small_dir), (rows, big))
    }
    shutil.rmtree(small_dir)
    shutil.rmtree(big)
    resume = kill_and_resume(root, shape, rows, batch, args.kill_at)
    need, need_peak = gpu_need(shape)

    print("\nbytes per pair (Arrow files)         with z0   without z0   without / with")
    for dtype in ("float32", "float16"):
        w, wo = size[dtype, True], size[dtype, False]
        print(f"  {dtype} ({args.layout_rows:,} rows){'':12} {w:9.1f}  {wo:11.1f}   {wo / w:.4f}x")
    print(f"  float16, the big run ({rows:,} rows)             {big_bytes / rows:11.1f}")
    print(f"  big run on disk: {big_bytes / 1e9:.2f} GB")

    print("\nwrite                                   wall s    pairs/s      MB/s   ratio to bare write")
    base = rows / write_wall
    for label, n, wall, nbytes in (
        (f"generate_pairs (CPU s: {gen_cpu:.1f})", rows, gen_wall, big_bytes),
        (f"bare loop (noise+tanh+f16+IPC, {loop_rows:,})", loop_rows, loop_wall, loop_bytes * loop_rows / rows),
        ("bare write (Arrow IPC, ready batch)", rows, write_wall, ipc_bytes),
    ):
        print(f"  {label:37} {wall:7.1f} {n / wall:10,.0f} {nbytes / wall / MB:9.1f}   {n / wall / base:.4f}x")
    print(f"  generate_pairs / bare loop: {(rows / gen_wall) / (loop_rows / loop_wall):.3f}x pairs/s")

    print(f"\nrandom reads, batch {args.batch}, {args.read_batches} batches, PairsReader(in_memory='no'), warm cache")
    print("  rows        open s     rows/s   / GPU need   peak RSS MB   peak RssAnon MB   auto would pick")
    for n, r in reads.items():
        pick = "memory" if r["auto_in_memory"] else "stream"
        pick += f" ({r['memory_need_gb']:.1f} GB fp32 vs budget {r['memory_budget_gb']:.1f} GB)"
        print(
            f"  {n:<10,} {r['open_s']:7.2f} {r['rows_per_s']:10,.0f}   {r['rows_per_s'] / need:9.2f}x "
            f"{r['maxrss_mb']:14.0f} {r['peak_anon_mb']:17.0f}   {pick}"
        )
    a, b = reads[small], reads[rows]
    print(
        f"  {rows:,} / {small:,}: peak RSS {b['maxrss_mb'] / a['maxrss_mb']:.3f}x, "
        f"RssAnon {b['peak_anon_mb'] / a['peak_anon_mb']:.3f}x (acceptance: <= 1.1x)"
    )
    print(
        f"  GPU need (assumed, see the script): {need:,.0f} rows/s (H100, 35% utilisation), "
        f"{need_peak:,.0f} rows/s at 100%; streamed reads / upper bound {b['rows_per_s'] / need_peak:.2f}x"
    )

    print("\nresume after SIGKILL")
    print(
        f"  killed after {resume['killed_after_s']:.1f} s with {resume['killed_at_shards']}/{resume['shards']} "
        f"shards done; rerun: generate_pairs {resume['rerun_wall_s']:.1f} s wall, {resume['rerun_cpu_s']:.1f} s CPU "
        f"(whole process {resume['rerun_process_wall_s']:.1f} s wall, {resume['rerun_process_cpu_s']:.1f} s CPU); "
        f"rerun / full run wall {resume['rerun_wall_s'] / gen_wall:.3f}x"
    )
    print(
        f"  final pairs: {rows:,} rows {'ok' if resume['rows_ok'] else 'WRONG'}, indices 0..N-1 each once "
        f"{'ok' if resume['indices_ok'] else 'WRONG'}, {resume['spot_rows']} spot rows z1 = tanh(z0_of(seed, index)) "
        f"max |err| {resume['spot_max_err']:.2g} (float16 z1)"
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    torch.set_num_threads(1)
    if argv and argv[0] == "_read":
        print(json.dumps(read_child(argv[1], int(argv[2]), int(argv[3]))))
        return
    if argv and argv[0] == "_generate":
        print(json.dumps(generate_child(argv[1], int(argv[2]), argv[3], int(argv[4]))))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000, help="rows of the big run")
    p.add_argument("--shape", default="3,32,32", help="sample shape, comma-separated")
    p.add_argument("--small-rows", type=int, default=100_000, help="rows of the run the big one's memory is held to")
    p.add_argument("--layout-rows", type=int, default=10_000, help="rows per layout for bytes per pair")
    p.add_argument("--loop-rows", type=int, default=100_000, help="rows of the bare loop (its rate is per row)")
    p.add_argument("--batch-size", type=int, default=1024, help="generate batch size")
    p.add_argument("--batch", type=int, default=512, help="read batch size")
    p.add_argument("--read-batches", type=int, default=1000, help="random batches per read measurement")
    p.add_argument("--kill-at", type=float, default=0.9, help="share of the shards done when the run is killed")
    p.add_argument("--quick", action="store_true", help="20k rows, 2k-row layouts, 200 batches: under a minute")
    p.add_argument("--scratch", default=None, help="folder for the pairs (default: a temporary one, removed)")
    args = p.parse_args(argv)
    if args.quick:
        args.rows, args.small_rows, args.layout_rows, args.loop_rows, args.read_batches = (
            20_000,
            2_000,
            2_000,
            5_000,
            200,
        )
    os.environ["ACCELERATE_USE_CPU"] = "true"
    if args.scratch:
        root = Path(args.scratch) / f"reflow-scale-{os.getpid()}"
        root.mkdir(parents=True)
        try:
            run(args, root)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    else:
        with tempfile.TemporaryDirectory(prefix="reflow-scale-") as scratch:
            run(args, Path(scratch))


if __name__ == "__main__":
    main()
