"""One generation run at a time, and resuming a killed one.

Work goes to ``PAIRS.partial/``: ``run.json`` (the settings) and one folder per finished shard. The main
process holds the lock ``.PAIRS.lock`` beside ``PAIRS`` (see ``reflow.folders.locks``) from the start to
the end. A killed run rerun with the same settings keeps its finished shards; a complete ``PAIRS`` of the
same settings is returned as it is.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from reflow.errors import ReflowError
from reflow.folders.files import read_json
from reflow.folders.io import atomic_write_json, claim_output, clean_debris
from reflow.folders.kinds import PAIRS_RECORD, folder_kind
from reflow.folders.locks import Lock, acquire
from reflow.pairs.reader import open_pairs_dataset
from reflow.pairs.schema import damaged, read_provenance
from reflow.version import __version__

WORK_KEYS = ("batch_size", "shard_size", "device", "software")
"""Settings that choose how the rows are computed (the teacher's outputs differ with them at ~1e-6): a
partial run resumes only with the values it started with; a complete folder is returned whatever they are."""


def software() -> dict[str, str]:
    """The versions that decide the teacher's outputs to ~1e-6, recorded with the settings."""
    import diffusers

    return {"reflow": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__}


def work_dir(out: Path) -> Path:
    """Where an unfinished run of ``out`` keeps its settings and shards."""
    return out.parent / f"{out.name}.partial"


def _lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def _differences(recorded: dict[str, Any], settings: dict[str, Any], keys) -> list[str]:
    """What differs between recorded and current settings, as 'key: recorded A, now B' (one level into dicts)."""
    diff = []
    for k in keys:
        was, now = recorded.get(k), settings[k]
        if was == now:
            continue
        if isinstance(was, dict) and isinstance(now, dict):
            sub = sorted(s for s in set(was) | set(now) if was.get(s) != now.get(s))
            shown = ", ".join(f"{s}: recorded {_short(was.get(s))}, now {_short(now.get(s))}" for s in sub[:3])
            diff.append(f"{k} ({shown}{', ...' if len(sub) > 3 else ''})")
        else:
            diff.append(f"{k}: recorded {_short(was)}, now {_short(now)}")
    return diff


def _same_settings(recorded: dict[str, Any], settings: dict[str, Any], where: Path, resume: bool) -> None:
    """Refuse to resume (``resume``) or to return as complete a folder made with other settings. A complete
    folder is returned whatever the ``WORK_KEYS`` are now: rerunning does no work."""
    keys = [k for k in settings if resume or k not in WORK_KEYS]
    recorded = {"store_z0": True, **recorded}  # recorded before z0 became optional: it was stored
    diff = _differences(recorded, settings, keys)
    if diff:
        fix = f"delete {where} to start over" if resume else "pick a new --out"
        raise ReflowError(
            f"{where} was made with other settings ({'; '.join(diff)}); rerun with the recorded ones, or {fix}"
        )


def _clean_work(work: Path) -> None:
    """Remove the temporaries that killed runs left in ``work`` (half-written shards, run.json)."""
    names = {p.name[1:].split(".", 1)[0] for p in work.glob(".shard-*")} | {"run.json"}
    for name in names:
        clean_debris(work / name)


def _check_complete(out: Path, work: Path, settings: dict[str, Any]) -> None:
    """Accept the complete ``out`` only if it was made with ``settings`` and holds all its rows; remove the
    ``work`` a run killed after its final rename left."""
    _same_settings(read_provenance(out), settings, out, resume=False)
    ds, _ = open_pairs_dataset(out)
    if len(ds) != settings["num_pairs"]:
        raise damaged(out, f"it holds {len(ds)} rows, expected {settings['num_pairs']}")
    if work.exists():  # a run killed after its final rename
        shutil.rmtree(work)


def _prepare_work(work: Path, settings: dict[str, Any]) -> None:
    """Resume the run in ``work`` if it was started with ``settings``, or start one there (its
    ``run.json``); then remove the debris of killed runs."""
    run_file = work / "run.json"
    if work.exists() and not work.is_dir():
        raise ReflowError(f"{work} is a file; reflow keeps an unfinished run there: move it away and rerun")
    if run_file.is_file():
        try:
            recorded = read_json(run_file)
        except ReflowError:  # empty, cut short, not an object
            raise ReflowError(f"{run_file} is damaged; delete {work} to start over") from None
        _same_settings(recorded, settings, work, resume=True)
    elif work.is_dir() and any(work.glob("shard-*")):
        raise ReflowError(f"{work} holds shards but no run.json (settings unknown); delete it to start over")
    else:
        work.mkdir(exist_ok=True)
        atomic_write_json(run_file, settings)
    _clean_work(work)


def start_run(out: Path, settings: dict[str, Any]) -> tuple[Lock, bool]:
    """On the main process: claim ``out``, take its lock and decide. Returns (lock, complete): complete when
    ``out`` holds valid pairs of these settings (a stale ``.partial`` beside it is removed); otherwise
    ``work_dir(out)`` holds this run's ``run.json``, with the debris of killed runs removed."""
    work = work_dir(out)
    teacher_path = settings["teacher"].get("teacher")
    inputs = [teacher_path] if teacher_path and Path(teacher_path).exists() else []
    claim_output(out, "generate", inputs=inputs, legacy=(PAIRS_RECORD,))
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = acquire(_lock_path(out), str(out), "generate")
    try:
        if folder_kind(out) == "pairs":
            _check_complete(out, work, settings)
            return lock, True
        _prepare_work(work, settings)
        return lock, False
    except BaseException:
        lock.release()
        raise


def on_main(state, fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn(*args)`` on the main process only and give its result to every process; an error there is
    raised on every process (a ReflowError as itself), so none is left waiting for the others."""
    result, caught = None, None
    if state.is_main_process:
        try:
            result = fn(*args)
        except BaseException as e:
            caught = e
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        error = None if caught is None else (isinstance(caught, ReflowError), str(caught) or type(caught).__name__)
        box = broadcast_object_list([result, error])
        result, error = box
        if caught is None and error is not None:
            user, message = error
            raise ReflowError(message) if user else RuntimeError(f"the main process failed: {message}")
    if caught is not None:
        raise caught
    return result


def begin(state, out: Path, settings: dict[str, Any]) -> tuple[Lock | None, bool]:
    """Start the run of ``out`` (``start_run``) on the main process. Returns (lock, complete) there, and
    (None, complete) on the other processes: the lock is the main process's alone."""
    lock, complete = on_main(state, start_run, out, settings)
    return (lock if state.is_main_process else None), complete
