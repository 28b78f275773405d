"""Round 1 from data with minibatch OT coupling against the independent coupling: one-step W2 on the checkerboard.

Both train the same default MLP (hidden 256, 4 layers) with ``reflow.student.train`` for the same steps at the
same batch, learning rate and seed, ``--coupling independent`` and ``--coupling ot`` (exact OT per batch,
POT's network simplex); each is then scored by ``reflow.eval.evaluate`` as ``reflow eval`` does: exact W2 of
4000 one-step Euler samples against 4000 checkerboard samples, per noise seed, and the flow's straightness.
The training CPU seconds of each are reported too (OT solves one assignment per step).

The issue's reference: torchcfm's OT-CFM reached a one-step W2 of 0.152 (independent coupling: 1.60) on this
task with this network at 5000 steps of batch 512.

    python benchmarks/coupling.py                 # 5000 steps, as the reference
    python benchmarks/coupling.py --steps 2000    # a shorter run
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(REPO))

from reflow.eval import EvalSettings, evaluate  # noqa: E402
from reflow.student import TrainConfig, train  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seeds", default="1", help="noise seeds of the W2 samples, comma-separated")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ["ACCELERATE_USE_CPU"] = "true"
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"checkerboard, default MLP, {args.steps} steps at batch {args.batch_size}, lr {args.lr}, seed 0")
    print("coupling      train CPU-s   W2 @ 1 (per seed)           straightness S")
    with tempfile.TemporaryDirectory(prefix="reflow-bench-coupling-") as scratch:
        for coupling in ("independent", "ot"):
            out = Path(scratch) / coupling
            config = TrainConfig(
                out=str(out), data="checkerboard", coupling=coupling, max_steps=args.steps,
                batch_size=args.batch_size, lr=args.lr, log_with="none", checkpoint_every=10**9,
            )  # fmt: skip
            cpu = time.process_time()
            train(config)
            cpu = time.process_time() - cpu
            settings = EvalSettings(nfes=[1], reference="checkerboard", seeds=seeds, adaptive=False)
            entry = evaluate([out], settings, device="cpu").metrics["models"][0]
            cell = entry["nfe"]["1"]
            per_seed = cell.get("w2_seeds") or [cell["w2"]]
            shown = ", ".join(f"{w:.4f}" for w in per_seed)
            straightness = entry.get("straightness", float("nan"))
            print(f"{coupling:12} {cpu:12.1f}   {cell['w2']:.4f} ({shown})   {straightness:.3g}")


if __name__ == "__main__":
    main()
