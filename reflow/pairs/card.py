"""The dataset card (README.md) of a pairs folder, made with huggingface_hub's ``DatasetCard``.

Its metadata (``DatasetCardData``) tags it for the Hub and gives its size category; its text gives the
facts (teacher, solver, NFE, seed, dtype, round, rows, columns), how to load the pairs, and the whole
provenance as a JSON block.
"""

from __future__ import annotations

import json
from typing import Any

TITLE = "reflow pairs"
TAGS = ["reflow", "rectified-flow", "distillation"]
SIZE_CATEGORIES = [
    (1_000, "n<1K"),
    (10_000, "1K<n<10K"),
    (100_000, "10K<n<100K"),
    (1_000_000, "100K<n<1M"),
    (10_000_000, "1M<n<10M"),
    (100_000_000, "10M<n<100M"),
    (1_000_000_000, "100M<n<1B"),
    (10_000_000_000, "1B<n<10B"),
    (100_000_000_000, "10B<n<100B"),
    (1_000_000_000_000, "100B<n<1T"),
]
"""The Hub's size categories (``DatasetCardData.size_categories``) by their upper bound."""


def size_category(num_rows: int) -> str:
    """The Hub's size category of a dataset of ``num_rows`` rows."""
    return next((name for bound, name in SIZE_CATEGORIES if num_rows < bound), "n>1T")


def dataset_card(name: str, provenance: dict[str, Any], num_rows: int, columns: list[str]) -> Any:
    """The ``huggingface_hub.DatasetCard`` of ``num_rows`` pairs with ``columns``, made as ``provenance``
    records and saved in a folder ``name``."""
    from huggingface_hub import DatasetCard, DatasetCardData

    data = DatasetCardData(pretty_name=TITLE, tags=TAGS, size_categories=size_category(num_rows))
    stored = "z0" in columns
    text = "\n".join(
        [
            f"# {TITLE} {name}",
            "",
            f"{num_rows} coupled pairs (z0, z1): z0 is the unit Gaussian noise the teacher started from",
            "(z0 of row i = row_noise(seed, index[i])), z1 the teacher's output from it.",
            "" if stored else "z0 is not stored: `reflow.pairs.with_z0` rebuilds it from the seed and `index`.",
            "",
            *_facts(provenance, num_rows, columns),
            "",
            "## Usage",
            "",
            "```python",
            "import datasets",
            *([] if stored else ["from reflow.pairs import with_z0"]),
            "",
            f'pairs = datasets.load_from_disk("{name}").with_format("torch")'
            if stored
            else f'pairs = with_z0(datasets.load_from_disk("{name}"))  # rows as torch tensors, z0 included',
            "```",
            "",
            f"Train a student on them with `reflow train --pairs {name} --out MODEL`.",
            "",
            "## Provenance",
            "",
            "```json",
            json.dumps(provenance, indent=2, sort_keys=True, default=str),
            "```",
            "",
        ]
    )
    return DatasetCard(f"---\n{data.to_yaml()}\n---\n\n{text}")


def _facts(provenance: dict[str, Any], num_rows: int, columns: list[str]) -> list[str]:
    """Markdown lines: a table of how the pairs were made."""
    teacher = provenance.get("teacher") or {}
    rows = [
        ("teacher", f"`{teacher.get('teacher')}`"),
        ("solver", teacher.get("solver")),
        ("NFE", teacher.get("nfe")),
        ("seed", provenance.get("seed")),
        ("dtype", provenance.get("dtype")),
        ("round", provenance.get("round")),
        ("rows", num_rows),
        ("z0", "stored" if "z0" in columns else "rebuilt from (seed, index), not stored"),
        ("columns", ", ".join(f"`{c}`" for c in columns)),
    ]
    return ["| | |", "|---|---|", *(f"| {key} | {value} |" for key, value in rows)]
