"""Reading what a folder holds: JSON files, the first line of a library's error."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from reflow.errors import ReflowError

BUNDLED = Path(__file__).resolve().parents[2] / "data"
"""The repository's data/ folder: the bundled teachers, feature networks and recipes."""


def read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReflowError(f"{file} is not valid JSON ({type(e).__name__}); re-save the checkpoint") from None
    if not isinstance(data, dict):
        raise ReflowError(f"{file} is not a JSON object; re-save the checkpoint")
    return data


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def json_clean(value: Any) -> Any:
    """Strict-JSON values (inf/nan as strings), round-tripped so describe() compares equal to what is read
    back from run.json when a generation run resumes."""

    def strict(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)
        if isinstance(v, dict):
            return {str(k): strict(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [strict(x) for x in v]
        return v

    return json.loads(json.dumps(strict(value), sort_keys=True, default=str, allow_nan=False))
