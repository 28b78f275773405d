"""The embedded default run: distil the bundled digits DDPM into a one-step student and evaluate it.

It is the digits-fewstep recipe at a budget that fits in minutes on a laptop CPU: 8192 DDIM-20 pairs from
the bundled teacher (DDIM-20 samples are closer to the digits in W2 than DDIM-50's and as good in the
digits classifier's features, at two fifths of the cost; the held-out pairs and the teacher's report stay
DDIM-50), one reflow round initialised from the teacher's UNet, one-step distillation, and one report
comparing the teacher (DDIM at each NFE), the reflow student and the distilled student. It runs
through ``reflow.rounds.run``, so a killed quickstart rerun with the same folder continues where it stopped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from reflow.core.progress import Progress
from reflow.errors import ReflowError
from reflow.folders.files import BUNDLED
from reflow.rounds.recipe import Recipe
from reflow.rounds.run import run_rounds

BUNDLED_TEACHER = BUNDLED / "teachers" / "digits-ddpm"
QUICKSTART_NFES = [1, 2, 4]
QUICKSTART_PAIRS_NFE = 20


def quickstart_recipe(*, steps: int = 600, num_pairs: int = 8192, num_eval: int = 1000) -> Recipe:
    """The quickstart as a recipe (``reflow rounds`` runs the same thing from a TOML file)."""
    return Recipe.from_dict(
        {
            "name": "quickstart",
            "rounds": 1,
            "seed": 0,
            "teacher": {
                "checkpoint": str(BUNDLED_TEACHER),
                "solver": "ddim",
                "nfe": 50,
                "pairs_nfe": QUICKSTART_PAIRS_NFE,
            },
            "pairs": {"num_pairs": num_pairs, "heldout": min(512, num_pairs), "batch_size": 512},
            "train": {
                "max_steps": steps,
                "batch_size": 128,
                "lr": 1e-3,
                "warmup_steps": min(100, max(1, steps // 10)),
                "checkpoint_every": max(1, steps // 4),
                "log_with": "none",
                # the settings README's quickstart figures were measured with, whatever the defaults
                "loss": "pseudo_huber",
                "time_sampler": "uniform",
                "ema_decay": 0.999,
            },
            "distill": {
                "k": 1,
                "max_steps": max(1, steps // 2),
                "batch_size": 128,
                "lr": 3e-4,
                "warmup_steps": min(50, max(1, steps // 20)),
                "loss": "pseudo_huber",
            },
            "eval": {
                "nfes": QUICKSTART_NFES,
                "reference": "digits",
                "num_samples": num_eval,
                "seeds": [1],
                "num_fidelity": min(512, num_pairs),
                "diagnostics_samples": min(256, num_eval),
            },
        },
        where="quickstart",
    )


def run_quickstart(
    out: str | Path,
    *,
    steps: int = 600,
    num_pairs: int = 8192,
    num_eval: int = 1000,
    device: Any = "cpu",
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Run (or resume) the quickstart in ``out``; returns the metrics of its table (``out/report``)."""
    if not BUNDLED_TEACHER.is_dir():
        raise ReflowError(f"the bundled teacher is missing ({BUNDLED_TEACHER}); reinstall reflow from its repository")
    recipe = quickstart_recipe(steps=steps, num_pairs=num_pairs, num_eval=num_eval)
    return run_rounds(recipe, out, device=device, progress=progress)
