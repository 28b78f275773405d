"""The embedded default run: checkerboard 1-RF -> pairs -> 2-RF -> evaluation of both.

Each stage writes its output atomically and is skipped when its output already exists, so a killed
quickstart rerun with the same folder continues where it stopped.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .evaluation import EvalSettings, evaluate
from .pairs import generate_pairs
from .report import write_report
from .teachers import FlowTeacher
from .training import TrainConfig, train

QUICKSTART_NFES = [1, 2, 4]
StageFn = Callable[..., None]


def run_quickstart(
    out: str | Path,
    *,
    data: str = "checkerboard",
    steps: int = 4000,
    num_pairs: int = 50_000,
    teacher_nfe: int = 63,
    batch_size: int = 1024,
    num_eval: int = 4000,
    progress: StageFn | None = None,
) -> dict[str, Any]:
    """Run (or resume) the quickstart in ``out``; returns the metrics of its report (``out/report``), which
    compares 1-RF and 2-RF."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    def stage(name: str) -> Callable[[int, int, float, float], None]:
        def on_step(step: int, total: int, loss: float, sps: float) -> None:
            if progress:
                progress(name, step, total, f"loss {loss:.4g}  {sps:,.0f} samples/s")

        return on_step

    def train_round(name: str, **kw: Any) -> Path:
        model = out / name
        if not model.exists():
            cfg = TrainConfig(
                out=str(model),
                max_steps=steps,
                batch_size=batch_size,
                lr=1e-3,
                # the settings README's quickstart figures were measured with, whatever the defaults
                time_sampler="uniform",
                loss="l2",
                ema_decay=0.999,
                checkpoint_every=max(1, steps // 4),
                **kw,
            )
            from .training import latest_checkpoint

            cfg.resume = latest_checkpoint(model) is not None
            train(cfg, progress=stage(f"train {name}"))
        return model

    rf1 = train_round("1-rf", data=data, seed=0)
    pairs = out / "pairs-1rf"
    teacher = FlowTeacher(rf1, nfe=teacher_nfe, solver="heun")
    generate_pairs(
        teacher,
        pairs,
        num_pairs,
        seed=0,
        batch_size=8192,
        progress=lambda d, t: progress and progress("pairs from 1-rf", d, t),
    )
    rf2 = train_round("2-rf", pairs=str(pairs), init=str(rf1), seed=1)

    report = out / "report"
    if (report / "metrics.json").is_file():
        return json.loads((report / "metrics.json").read_text())
    if progress:
        progress("eval", 0, 1)
    settings = EvalSettings(nfes=QUICKSTART_NFES, reference=data, num_samples=num_eval, seeds=[1])
    result = evaluate([rf1, rf2], settings, progress=progress)
    write_report(report, result)
    return json.loads((report / "metrics.json").read_text())
