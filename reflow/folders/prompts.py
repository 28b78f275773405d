"""Prompts for text-to-image teachers: a text file (one prompt per line) or a column of a ``datasets``
folder (``save_to_disk``)."""

from __future__ import annotations

from pathlib import Path

from reflow.errors import ReflowError


def read_prompts(source: str | Path, column: str = "prompt") -> list[str]:
    """The prompts of ``source``: a text file (UTF-8, one per line, blank lines skipped, no other
    processing) or a ``datasets`` folder's ``column`` (strings). Never empty."""
    path = Path(source)
    if not path.exists():
        raise ReflowError(f"no such prompts file or folder: {path} (pass a .txt file or a datasets folder)")
    if path.is_dir():
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:
            kind = type(e).__name__
            raise ReflowError(f"{path} is not a datasets folder ({kind}); pass a save_to_disk folder") from None
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
        if column not in ds.column_names:
            names = ", ".join(ds.column_names)
            raise ReflowError(f"{path} has no column {column!r} (columns: {names}); pass --prompt-column")
        prompts = ds[column]
        bad = next((i for i, p in enumerate(prompts) if not isinstance(p, str)), None)
        if bad is not None:
            raise ReflowError(f"{path}: {column}[{bad}] is a {type(prompts[bad]).__name__}, not a string")
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ReflowError(f"{path} is not UTF-8 text; pass one prompt per line") from None
        prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ReflowError(f"{path} holds no prompts")
    return list(prompts)
