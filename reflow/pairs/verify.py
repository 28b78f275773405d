"""Verifying pairs: check every file against its recorded sha256, then re-run the recorded teacher on a few
rows and compare."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from reflow.core.noise import row_noise
from reflow.core.progress import Progress, RowsProgress
from reflow.errors import ReflowError
from reflow.folders.kinds import PAIRS_RECORD
from reflow.pairs.reader import open_pairs_dataset
from reflow.pairs.schema import DTYPES, damaged, read_provenance
from reflow.teachers import Teacher, load_teacher


def verify_pairs(
    path: str | Path,
    rows: int = 16,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    allow_pickle: bool = False,
    batch_size: int = 256,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Check the folder's files against their recorded sizes and sha256, then re-run the recorded teacher
    on ``rows`` random rows and report the largest differences.

    z0 is rebuilt from (seed, index) and compared with the stored z0, when stored (``z0_stored``; else
    ``max_abs_diff_z0`` is None: the rebuilt z0 is the pairs' z0); the teacher's output from it is compared
    with the stored z1. A teacher whose weights or configs changed since is refused. ``files_checked`` in
    the report counts the files whose hashes matched (0 for older folders that recorded none). ``progress``
    receives Updates of stage "verify" in rows re-run, from the teacher's load on, and from inside a batch as
    its network calls finish.
    """
    if rows < 1:
        raise ReflowError(f"--rows must be at least 1, got {rows}")
    path = Path(path)
    prov = read_provenance(path)
    _check_record(path, prov)
    rec = prov["teacher"]
    ds, _ = open_pairs_dataset(path, full=True)  # before the teacher: a damaged folder fails fast
    if "index" not in ds.column_names:
        raise ReflowError(f"{path} has no index column, so its noise cannot be rebuilt; regenerate it")
    teacher = _recorded_teacher(rec, device, allow_pickle)
    sub = _pick_rows(path, ds, rows, seed)
    store = DTYPES[prov["dtype"]]
    z0 = row_noise(prov["seed"], sub["index"], tuple(prov["sample_shape"]))
    z1 = _rerun(teacher, z0, sub, batch_size, progress).to(store).float()
    stored = "z0" in sub
    return {
        "rows": len(z0),
        "dtype": prov["dtype"],
        "z0_stored": stored,
        "max_abs_diff_z0": (z0.to(store).float() - sub["z0"].float()).abs().max().item() if stored else None,
        "max_abs_diff_z1": (z1 - sub["z1"].float()).abs().max().item(),
        "teacher": rec["teacher"],
        "solver": rec["solver"],
        "nfe": rec["nfe"],
        "files_checked": len(prov.get("files") or {}),
    }


def _check_record(path: Path, prov: dict[str, Any]) -> None:
    """Refuse a record that lacks what re-running the teacher needs."""
    rec = prov.get("teacher")
    missing = [k for k in ("teacher", "seed", "sample_shape", "dtype") if k not in prov]
    if isinstance(rec, dict):
        missing += [f"teacher.{k}" for k in ("teacher", "solver", "nfe") if k not in rec]
    elif "teacher" not in missing:
        missing.append("teacher")
    if missing:
        raise damaged(path, f"{PAIRS_RECORD} lacks {', '.join(missing)}")
    if prov["dtype"] not in DTYPES:
        raise damaged(path, f"{PAIRS_RECORD} records an unknown dtype {prov['dtype']!r}")


def _recorded_teacher(rec: dict[str, Any], device: torch.device | str, allow_pickle: bool) -> Teacher:
    """The teacher the record names, with its solver, NFE and overrides; refused if it changed since."""
    nfe = rec["nfe"] if isinstance(rec["nfe"], int) else 1
    teacher = load_teacher(
        rec["teacher"],
        nfe=nfe,
        solver=rec["solver"],
        device=device,
        allow_pickle=allow_pickle,
        **(rec.get("overrides") or {}),
    )
    now = teacher.describe()
    changed = [k for k in ("config_hash", "weights_hash") if now.get(k) != rec.get(k)]
    if changed:
        raise ReflowError(
            f"the teacher at {rec['teacher']} changed since the pairs were made ({', '.join(changed)} differ)"
        )
    return teacher


def _pick_rows(path: Path, ds, rows: int, seed: int) -> dict[str, Any]:
    """``rows`` random rows (chosen by ``seed``), in file order, as torch columns."""
    pick = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[: min(rows, len(ds))]
    try:
        return ds.select(sorted(pick.tolist())).with_format("torch")[:]
    except (OSError, ValueError, TypeError) as e:  # pyarrow's errors derive from these
        raise damaged(path, f"its rows do not read ({type(e).__name__})") from None


def _rerun(
    teacher: Teacher, z0: torch.Tensor, sub: dict[str, Any], batch_size: int, progress: Progress | None
) -> torch.Tensor:
    """The teacher's output from ``z0`` with the rows' labels or prompts, in batches, float32 on the CPU."""
    outs, total = [], len(z0)
    tell = RowsProgress(progress, "verify", total)
    tell(0)
    for b in range(0, total, batch_size):
        chunk = z0[b : b + batch_size]
        on_call = tell.in_batch(b, len(chunk), teacher.network_calls)
        if "label" in sub:
            outs.append(teacher(chunk, sub["label"][b : b + batch_size], on_call=on_call).float().cpu())
        elif "prompt" in sub:
            embeds = teacher.encode_prompts(list(sub["prompt"][b : b + batch_size]))
            outs.append(teacher(chunk, embeds, on_call=on_call).float().cpu())
        else:
            outs.append(teacher(chunk, on_call=on_call).float().cpu())
        tell(b + len(chunk))
    return torch.cat(outs)
