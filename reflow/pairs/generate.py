"""Coupled pairs (z0, z1) on disk as a Hugging Face ``datasets`` dataset.

Columns: ``z0`` (the unit Gaussian the teacher started from), ``z1`` (the teacher's sample), both
fixed-shape float32 or float16 arrays, and ``index`` (the row's seed index: z0 = row_noise(seed, index)).
The provenance (teacher, solver, nfe, seed, dtype, round, reflow version) is JSON in the dataset
info's ``description`` and in a README.md card beside the Arrow files.

Generation is sharded. Work goes to ``PAIRS.partial/``: ``run.json`` (the settings) and one folder per
finished shard, each written to a temporary name and renamed. A killed run rerun with the same settings
keeps its finished shards and makes the rest; when all exist, they are joined into ``PAIRS`` (again
through a temporary name) and ``PAIRS.partial`` is removed. Processes (Accelerate) split the shards
round-robin, so one process or many write the same rows. One run at a time: the main process holds the
lock ``.PAIRS.lock`` beside ``PAIRS`` (see ``reflow.folders.locks``) from the start to the end.

``reflow_pairs.json`` records the provenance, the row count and each file's size and sha256: opening
the pairs checks the sizes and the rows, ``verify_pairs`` the hashes too.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reflow.core.noise import check_seed, row_labels, row_noise
from reflow.errors import ReflowError
from reflow.folders.files import sha256_file
from reflow.folders.io import atomic_dir, atomic_write_json, atomic_write_text, claim_output, clean_debris
from reflow.folders.locks import Lock, acquire
from reflow.folders.runtime import partial_state, quiet_datasets
from reflow.teachers.base import Teacher
from reflow.version import __version__

DTYPES = {"float32": torch.float32, "float16": torch.float16}
SHARD_BYTES = 64 * 2**20
RECORD = "reflow_pairs.json"
WORK_KEYS = ("batch_size", "shard_size", "device", "software")
"""Settings that choose how the rows are computed (the teacher's outputs differ with them at ~1e-6): a
partial run resumes only with the values it started with; a complete folder is returned whatever they are."""


def _array_feature(shape: tuple[int, ...], dtype: str):
    import datasets

    if len(shape) == 1:
        return datasets.Sequence(datasets.Value(dtype), length=shape[0])
    if 2 <= len(shape) <= 5:
        return getattr(datasets, f"Array{len(shape)}D")(shape=tuple(shape), dtype=dtype)
    raise ReflowError(f"samples of shape {shape} are not supported (1 to 5 dimensions)")


def pair_features(
    sample_shape: tuple[int, ...],
    dtype: str,
    labels: bool = False,
    prompts: bool = False,
    embed_shape: tuple[int, int] | None = None,
):
    """Fixed-shape ``datasets`` features for z0/z1 so ``with_format('torch')`` returns stacked tensors,
    plus ``index``; for class-conditional teachers ``label``; for text teachers ``prompt`` and, when
    ``embed_shape`` is given, ``prompt_embeds`` (the text encoder's output for the prompt)."""
    import datasets

    array = _array_feature(tuple(sample_shape), dtype)
    columns = {"z0": array, "z1": array, "index": datasets.Value("int64")}
    if labels:
        columns["label"] = datasets.Value("int64")
    if prompts:
        columns["prompt"] = datasets.Value("string")
        if embed_shape is not None:
            columns["prompt_embeds"] = _array_feature(tuple(embed_shape), dtype)
    return datasets.Features(columns)


def default_shard_size(sample_shape: tuple[int, ...], dtype: str, batch_size: int) -> int:
    row_bytes = 2 * math.prod(sample_shape) * (4 if dtype == "float32" else 2)
    rows = max(batch_size, SHARD_BYTES // row_bytes)
    return max(batch_size, rows // batch_size * batch_size)


def _shard_dir(work: Path, k: int) -> Path:
    return work / f"shard-{k:05d}"


def _write_shard(path: Path, columns: dict[str, np.ndarray], features) -> None:
    import datasets

    ds = datasets.Dataset.from_dict(columns, features=features)
    with atomic_dir(path) as tmp, quiet_datasets():
        ds.save_to_disk(str(tmp))


def dataset_card(provenance: dict[str, Any], num_rows: int) -> str:
    return "\n".join(
        [
            "---",
            "tags: [reflow, rectified-flow, pairs]",
            "---",
            "# reflow pairs",
            "",
            f"{num_rows} coupled pairs (z0, z1): z0 is the unit Gaussian noise the teacher started from",
            "(z0 of row i = row_noise(seed, index[i])), z1 the teacher's output from it.",
            "Open with `datasets.load_from_disk(PATH)`.",
            "",
            "## Provenance",
            "",
            "```json",
            json.dumps(provenance, indent=2, sort_keys=True, default=str),
            "```",
            "",
        ]
    )


def check_generate_args(
    *, num_pairs: int, batch_size: int, shard_size: int | None = None, dtype: str = "float32", seed: int = 0
) -> None:
    """Refuse impossible ``generate`` settings with one line each, before any file is made."""
    for flag, value in (("--num-pairs", num_pairs), ("--batch-size", batch_size), ("--shard-size", shard_size)):
        if value is None and flag == "--shard-size":
            continue  # the default, from the sample size
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ReflowError(f"{flag} must be at least 1, got {value}")
    if dtype not in DTYPES:
        raise ReflowError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    try:
        check_seed(seed)
    except ValueError as e:
        raise ReflowError(str(e)) from None


def _software() -> dict[str, str]:
    import diffusers

    return {"reflow": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__}


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


def _start_run(out: Path, work: Path, settings: dict[str, Any]) -> tuple[Lock, bool]:
    """On the main process: claim ``out``, take its lock and decide. Returns (lock, complete): complete when
    ``out`` holds valid pairs of these settings (a stale ``.partial`` beside it is removed); otherwise
    ``work`` holds this run's ``run.json``, with the debris of killed runs removed."""
    teacher_path = settings["teacher"].get("teacher")
    inputs = [teacher_path] if teacher_path and Path(teacher_path).exists() else []
    claim_output(out, "generate", inputs=inputs, legacy=(RECORD,))
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = acquire(_lock_path(out), str(out), "generate")
    try:
        if (out / RECORD).is_file():
            _same_settings(read_provenance(out), settings, out, resume=False)
            ds, _ = _open_pairs_dataset(out)
            if len(ds) != settings["num_pairs"]:
                raise _damaged(out, f"it holds {len(ds)} rows, expected {settings['num_pairs']}")
            if work.exists():  # a run killed after its final rename
                shutil.rmtree(work)
            return lock, True
        run_file = work / "run.json"
        if work.exists() and not work.is_dir():
            raise ReflowError(f"{work} is a file; reflow keeps an unfinished run there: move it away and rerun")
        if run_file.is_file():
            try:
                recorded = json.loads(run_file.read_text())
            except (OSError, ValueError):
                recorded = None
            if not isinstance(recorded, dict):
                raise ReflowError(f"{run_file} is damaged; delete {work} to start over")
            _same_settings(recorded, settings, work, resume=True)
        elif work.is_dir() and any(work.glob("shard-*")):
            raise ReflowError(f"{work} holds shards but no run.json (settings unknown); delete it to start over")
        else:
            work.mkdir(exist_ok=True)
            atomic_write_json(run_file, settings)
        _clean_work(work)
        return lock, False
    except BaseException:
        lock.release()
        raise


def _on_main(state, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on the main process only and give its result to every process; an error there is raised on
    every process (a ReflowError as itself), so none is left waiting for the others."""
    result, caught = None, None
    if state.is_main_process:
        try:
            result = fn()
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


def generate_pairs(
    teacher: Teacher,
    out: str | Path,
    num_pairs: int,
    *,
    seed: int = 0,
    batch_size: int = 1024,
    dtype: str = "float32",
    shard_size: int | None = None,
    round_: int = 1,
    labels: list[int] | None = None,
    prompts: list[str] | None = None,
    store_embeddings: bool = True,
    push_to_hub: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Run the teacher on rows 0..num_pairs-1 and write the pairs dataset to ``out``.

    A class-conditional teacher (``teacher.num_classes`` set) gets a label per row, uniform over
    ``labels`` (default: every class) and a function of (seed, row) alone; it is stored in ``label``.
    A text-to-image teacher (``teacher.conditioning == "text"``) takes ``prompts``: row i gets prompt
    ``i mod len(prompts)``, stored in ``prompt``, with its embeddings in ``prompt_embeds`` unless
    ``store_embeddings`` is False (then training recomputes them with the teacher's text encoder).
    ``push_to_hub`` names a Hub dataset repo to upload the finished pairs to.

    One run at a time writes ``out`` (the lock ``.NAME.lock`` beside it, taken by the main process); a
    killed run resumes only with the settings it started with, batch size, device and software included
    (the teacher's outputs depend on them at ~1e-6). A complete ``out`` is checked (files, rows) and
    returned as it is.

    ``progress(done_rows, total_rows)`` is called on this process as rows finish. Returns ``out``.
    Under Accelerate (torchrun / accelerate launch) every process must call this with the same arguments.
    """
    check_generate_args(num_pairs=num_pairs, batch_size=batch_size, shard_size=shard_size, dtype=dtype, seed=seed)
    out = Path(out)
    shape = tuple(teacher.sample_shape)
    num_classes = getattr(teacher, "num_classes", None)
    if num_classes is None and labels:
        raise ReflowError("--labels needs a class-conditional teacher; this one is unconditional")
    if num_classes is not None:
        choices = list(getattr(teacher, "label_choices", None) or range(num_classes))
        labels = sorted(set(labels)) if labels else choices
        bad = [c for c in labels if c not in choices]
        if bad:
            null = sorted(set(range(num_classes)) - set(choices))
            also = f" (class {null[0]} is its unconditional label)" if null else ""
            raise ReflowError(f"--labels {bad} out of range: this teacher has classes 0..{num_classes - 1}{also}")
    text = getattr(teacher, "conditioning", None) == "text"
    if text:
        if not prompts:
            raise ReflowError("a text-to-image teacher needs prompts: pass --prompts FILE (one per line)")
        bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
        if bad:
            raise ReflowError(f"prompts must be strings; entry {bad[0]} is {type(prompts[bad[0]]).__name__}")
    elif prompts:
        raise ReflowError("--prompts needs a text-to-image teacher (a Stable Diffusion folder); this one takes none")
    embed_shape = tuple(teacher.embed_shape) if text and store_embeddings else None
    if shard_size is None:
        shard_size = default_shard_size(shape, dtype, batch_size)
    device = torch.device(getattr(teacher, "device", None) or "cpu")
    settings = {
        "teacher": teacher.describe(),
        "num_pairs": num_pairs,
        "seed": seed,
        "dtype": dtype,
        "shard_size": shard_size,
        "sample_shape": list(shape),
        "round": round_,
        "labels": labels if num_classes is not None else None,
        "batch_size": batch_size,
        "device": device.type,
        "software": _software(),
    }
    if text:  # only for text teachers, so unconditional runs keep their recorded settings
        settings["prompts"] = {
            "count": len(prompts),
            "sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16],
            "rule": "row i: prompt i mod count",
        }
        settings["embed_shape"] = list(teacher.embed_shape)
        settings["store_embeddings"] = bool(store_embeddings)
    provenance = {**settings, "reflow_version": __version__}
    state = partial_state()
    work = out.parent / f"{out.name}.partial"
    lock: Lock | None = None

    def start() -> bool:
        nonlocal lock
        lock, complete = _start_run(out, work, settings)
        return complete

    try:
        if _on_main(state, start):  # already complete
            if push_to_hub and state.is_main_process:  # e.g. a rerun after a failed upload
                push_pairs(out, push_to_hub)
            return out
        features = pair_features(shape, dtype, labels=num_classes is not None, prompts=text, embed_shape=embed_shape)
        num_shards = math.ceil(num_pairs / shard_size)
        mine = [k for k in range(num_shards) if k % state.num_processes == state.process_index]
        todo = [k for k in mine if not _shard_dir(work, k).is_dir()]
        done_rows = sum(min(shard_size, num_pairs - k * shard_size) for k in mine if k not in todo)
        total_rows = sum(min(shard_size, num_pairs - k * shard_size) for k in mine)
        if progress:
            progress(done_rows, total_rows)

        # The host never makes the teacher wait:
        # - the next batch's noise (and labels) is drawn on a background thread while the teacher runs
        #   (pinned, on CUDA, so the teacher's upload can be asynchronous);
        # - on CUDA a batch's output is copied back asynchronously and only waited for after the next batch
        #   has been queued, so the GPU has work while the host checks and stores the previous batch;
        # - Arrow writes run on another background thread (each shard to a temporary name, renamed when
        #   complete, so a failed write such as a full disk leaves no half shard).
        # Rows, their order and the values stored are the same as one batch at a time.
        on_cuda = device.type == "cuda"
        store_dtype = DTYPES[dtype]

        def shard_rows(k: int) -> tuple[int, int]:
            return k * shard_size, min((k + 1) * shard_size, num_pairs)

        batches = [
            (k, range(b, min(b + batch_size, shard_rows(k)[1])))
            for k in todo
            for b in range(*shard_rows(k), batch_size)
        ]

        def draw(idx: range):
            """(z0, y) for the rows, and the copies handed to the teacher (pinned on CUDA); y is the rows'
            labels (class teachers) or prompt embeddings (text teachers, encoded here, off the teacher's path)."""
            z0 = row_noise(seed, idx, shape)
            if num_classes is not None:
                y = row_labels(seed, idx, labels)
            elif text:
                y = teacher.encode_prompts([prompts[i % len(prompts)] for i in idx])
            else:
                y = None
            if not on_cuda:
                return z0, y, z0, y
            return z0, y, z0.pin_memory(), (y.pin_memory() if y is not None else None)

        with ThreadPoolExecutor(max_workers=1) as writer, ThreadPoolExecutor(max_workers=1) as drawer:
            pending: Future | None = None
            z0_parts: list[np.ndarray] = []
            z1_parts: list[np.ndarray] = []
            label_parts: list[np.ndarray] = []

            def finish(k: int, idx: range, z0: torch.Tensor, y: torch.Tensor | None, z1: torch.Tensor, ready) -> None:
                nonlocal pending, done_rows, z0_parts, z1_parts, label_parts
                if ready is not None:
                    ready.synchronize()
                if not torch.isfinite(z1).all():
                    raise ReflowError(f"the teacher produced NaN/inf on rows {idx.start}-{idx.stop - 1}; check it")
                z0_parts.append(z0.to(store_dtype).numpy())
                z1_parts.append(z1.to(store_dtype).numpy())
                if y is not None:
                    label_parts.append(y.to(store_dtype).numpy() if text else y.numpy())
                done_rows += len(idx)
                if progress:
                    progress(done_rows, total_rows)
                start, stop = shard_rows(k)
                if idx.stop == stop:  # the shard's last batch: hand the shard to the writer
                    if pending is not None:
                        pending.result()
                    columns = {
                        "z0": np.concatenate(z0_parts),
                        "z1": np.concatenate(z1_parts),
                        "index": np.arange(start, stop, dtype=np.int64),
                    }
                    if text:
                        columns["prompt"] = [prompts[i % len(prompts)] for i in range(start, stop)]
                        if store_embeddings:
                            columns["prompt_embeds"] = np.concatenate(label_parts)
                    elif label_parts:
                        columns["label"] = np.concatenate(label_parts)
                    pending = writer.submit(_write_shard, _shard_dir(work, k), columns, features)
                    z0_parts, z1_parts, label_parts = [], [], []

            queued = None  # a CUDA batch whose output is still on its way to the host
            upcoming = drawer.submit(draw, batches[0][1]) if batches else None
            for j, (k, idx) in enumerate(batches):
                if pending is not None and pending.done():
                    pending.result()  # a failed shard write (a full disk) stops the run now
                z0, y, z0_feed, y_feed = upcoming.result()
                if j + 1 < len(batches):
                    upcoming = drawer.submit(draw, batches[j + 1][1])
                z1 = (teacher(z0_feed, y_feed) if y is not None else teacher(z0_feed)).detach()
                if on_cuda and z1.device.type == "cuda":
                    z1 = z1.to("cpu", non_blocking=True)  # into pinned memory, in stream order
                    ready = torch.cuda.Event()
                    ready.record()
                    if queued is not None:
                        finish(*queued)
                    queued = (k, idx, z0, y, z1, ready)
                else:
                    finish(k, idx, z0, y, z1.to("cpu"), None)
            if queued is not None:
                finish(*queued)
            if pending is not None:
                pending.result()

        state.wait_for_everyone()
        if state.is_main_process:
            _join_shards(work, out, num_pairs, shard_size, provenance)
        state.wait_for_everyone()
        if push_to_hub and state.is_main_process:
            push_pairs(out, push_to_hub)
        return out
    finally:
        if lock is not None:
            lock.release()


def _file_records(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of each file of a saved dataset, for the integrity checks of ``_check_files``."""
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.name not in (RECORD, "README.md"))
    return {f.name: {"bytes": f.stat().st_size, "sha256": sha256_file(f)} for f in files}


def _join_shards(work: Path, out: Path, num_pairs: int, shard_size: int, provenance: dict[str, Any]) -> None:
    """Join the finished shards of ``work`` into ``out`` (through a temporary name), recording the row count
    and each file's size and sha256 in ``reflow_pairs.json``; then remove ``work``."""
    import datasets

    num_shards = math.ceil(num_pairs / shard_size)
    parts = []
    for k in range(num_shards):
        shard, want = _shard_dir(work, k), min(shard_size, num_pairs - k * shard_size)
        try:
            part = datasets.load_from_disk(str(shard))
            why = None if len(part) == want else f"{len(part)} rows, expected {want}"
        except Exception as e:  # a shard we wrote that no longer opens
            why = type(e).__name__
        if why:
            raise ReflowError(f"{shard} is damaged ({why}); delete that folder and rerun to remake it")
        parts.append(part)
    ds = datasets.concatenate_datasets(parts)
    ds.info.description = json.dumps(provenance, sort_keys=True)
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()  # an empty folder the user made for the output
    with atomic_dir(out) as tmp, quiet_datasets():
        ds.save_to_disk(str(tmp), num_shards=num_shards)
        record = {**provenance, "num_rows": len(ds), "files": _file_records(tmp)}
        atomic_write_json(tmp / RECORD, record)
        atomic_write_text(tmp / "README.md", dataset_card(provenance, len(ds)))
    shutil.rmtree(work, ignore_errors=True)


def push_pairs(path: str | Path, repo_id: str) -> None:
    """Upload a finished pairs folder to the Hub as a dataset repo (with its card)."""
    import datasets

    ds = datasets.load_from_disk(str(path))
    try:
        with quiet_datasets():
            ds.push_to_hub(repo_id, private=True)
    except Exception as e:  # network, auth or repo errors from huggingface_hub
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ReflowError(
            f"could not push {path} to the Hub as {repo_id} ({first}); the pairs are complete on disk, "
            "log in with `hf auth login` and rerun"
        ) from None


@dataclass
class Pairs:
    """A pairs dataset opened for training: z0/z1 tensors (float32, CPU) and the provenance."""

    z0: torch.Tensor
    z1: torch.Tensor
    index: torch.Tensor
    provenance: dict[str, Any]
    label: torch.Tensor | None = None
    prompt_embeds: torch.Tensor | None = None
    prompt: list[str] | None = None

    @property
    def cond(self) -> dict[str, torch.Tensor]:
        """The rows' conditioning as the model's keywords (see ``PairsReader.batch``)."""
        if self.label is not None:
            return {"class_labels": self.label}
        if self.prompt_embeds is not None:
            return {"encoder_hidden_states": self.prompt_embeds}
        return {}

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.z0.shape[1:])

    def __len__(self) -> int:
        return len(self.z0)


def _damaged(path: Path, what: str) -> ReflowError:
    return ReflowError(f"{path} is damaged: {what}; delete it and rerun `reflow generate` to regenerate it")


def _check_files(path: Path, record: dict[str, Any], full: bool) -> None:
    """Check the files recorded in ``reflow_pairs.json`` are there with their sizes (and, with ``full``,
    their sha256). Folders written before these records existed are not checked."""
    files = record.get("files")
    if files is None:
        return
    if not isinstance(files, dict):
        raise _damaged(path, f"{RECORD} has no valid file list")
    for name, want in sorted(files.items()):
        try:
            size, digest = int(want["bytes"]), str(want["sha256"])
        except (TypeError, KeyError, ValueError):
            raise _damaged(path, f"{RECORD} has no valid record of {name}") from None
        f = path / name
        if Path(name).name != name or not f.is_file():
            raise _damaged(path, f"file {name} is missing")
        got = f.stat().st_size
        if got != size:
            raise _damaged(path, f"file {name} has {got} bytes, expected {size}")
        if full and sha256_file(f) != digest:
            raise _damaged(path, f"file {name} does not match its recorded sha256")


def _open_pairs_dataset(path: str | Path, full: bool = False):
    """Open a pairs dataset (memory-mapped Arrow) and check its columns, and the files and rows recorded
    in its ``reflow_pairs.json`` (sizes; with ``full`` also the sha256); returns (dataset, provenance)."""
    import datasets

    path = Path(path)
    if not path.is_dir():
        hint = (
            f" (an unfinished run is in {path}.partial: rerun `reflow generate`)"
            if Path(f"{path}.partial").is_dir()
            else ""
        )
        raise ReflowError(f"no such pairs folder: {path}{hint}")
    record = read_provenance(path) if (path / RECORD).is_file() else None
    if record is not None:
        _check_files(path, record, full)
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        if record is not None:
            raise _damaged(path, f"it does not open ({type(e).__name__})") from None
        raise ReflowError(f"{path} is not a pairs dataset written by `reflow generate` ({type(e).__name__})") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
    missing = [c for c in ("z0", "z1") if c not in ds.column_names]
    if missing:
        raise ReflowError(f"{path} lacks column(s) {', '.join(missing)}; pairs need z0 and z1")
    if len(ds) == 0:
        raise ReflowError(f"{path} holds no rows; regenerate it")
    expected = (record or {}).get("num_rows")
    if isinstance(expected, int) and len(ds) != expected:
        raise _damaged(path, f"it holds {len(ds)} rows, expected {expected}")
    try:
        provenance = json.loads(ds.info.description or "{}")
    except json.JSONDecodeError:
        provenance = {}
    return ds, provenance


def load_pairs(path: str | Path) -> Pairs:
    """Open and check a pairs dataset written by ``generate_pairs`` (or by hand with the same columns),
    reading every row into memory (for evaluation and checks; training streams with ``PairsReader``)."""
    ds, provenance = _open_pairs_dataset(path)
    try:
        cols = ds.with_format("numpy")[:]
        z0 = np.asarray(cols["z0"], dtype=np.float32)
        z1 = np.asarray(cols["z1"], dtype=np.float32)
    except (ValueError, TypeError):
        raise ReflowError(f"{path}: z0/z1 rows have different shapes; pairs need one fixed shape") from None
    if z0.shape != z1.shape or z0.ndim < 2:
        raise ReflowError(f"{path}: z0 has shape {z0.shape} but z1 has {z1.shape}; they must match as (N, ...)")
    if not (np.isfinite(z0).all() and np.isfinite(z1).all()):
        raise ReflowError(f"{path} holds NaN or inf values; regenerate it")
    index = np.asarray(cols["index"]) if "index" in ds.column_names else np.arange(len(ds))
    label = torch.from_numpy(np.asarray(cols["label"], dtype=np.int64)) if "label" in cols else None
    embeds = torch.from_numpy(np.asarray(cols["prompt_embeds"], dtype=np.float32)) if "prompt_embeds" in cols else None
    prompt = [str(x) for x in cols["prompt"]] if "prompt" in cols else None
    return Pairs(
        torch.from_numpy(z0),
        torch.from_numpy(z1),
        torch.from_numpy(index.astype(np.int64)),
        provenance,
        label,
        embeds,
        prompt,
    )


class PairsReader:
    """Random batches from a pairs dataset without loading it into memory.

    Each Arrow chunk of a fixed-shape column is viewed as one (rows, *shape) numpy array straight over
    the memory-mapped file (zero copy), so a batch is a numpy gather: pairs larger than memory train,
    and the OS page cache keeps hot rows in memory. Columns that cannot be viewed that way (nulls,
    ragged rows) fall back to datasets' own row access.

    ``max_rows`` keeps the first rows only (``--max-pairs``). ``batch(idx)`` returns float32 CPU tensors
    (z0, z1) and the rows' conditioning as the model's keywords: ``{"class_labels": (B,) int64}`` for
    class-labelled pairs, ``{"encoder_hidden_states": (B, seq, dim) float32}`` for text pairs, ``{}``
    otherwise. Text pairs stored without embeddings (prompts only) need ``attach_prompt_embeddings``
    first, with the embeddings of ``unique_prompts()``.
    """

    def __init__(self, path: str | Path, max_rows: int | None = None):
        ds, self.provenance = _open_pairs_dataset(path)
        self.path = Path(path)
        if max_rows is not None and max_rows < 1:
            raise ReflowError(f"--max-pairs must be at least 1, got {max_rows}")
        self.rows = len(ds) if max_rows is None else min(max_rows, len(ds))
        self.has_label = "label" in ds.column_names
        self.has_embeddings = "prompt_embeds" in ds.column_names
        self.conditioning = "class" if self.has_label else "text" if "prompt" in ds.column_names else None
        self._ds = ds.with_format("numpy")
        first = self._ds[0]
        z0, z1 = np.asarray(first["z0"]), np.asarray(first["z1"])
        if z0.shape != z1.shape or z0.ndim < 1:
            raise ReflowError(f"{path}: z0 rows have shape {z0.shape} but z1 rows {z1.shape}; they must match")
        self.sample_shape = tuple(z0.shape)
        self.num_classes: int | None = None
        self.embed_shape: tuple[int, int] | None = None
        self._labels = np.asarray(self._ds["label"], dtype=np.int64) if self.has_label else None
        if self._labels is not None:
            recorded = (self.provenance.get("teacher") or {}).get("num_classes")
            self.num_classes = int(recorded) if recorded else int(self._labels.max()) + 1
        if self.conditioning == "text":
            if self.has_embeddings:
                self.embed_shape = tuple(np.asarray(first["prompt_embeds"]).shape)
            elif self.provenance.get("embed_shape"):
                self.embed_shape = tuple(self.provenance["embed_shape"])
            else:
                raise ReflowError(f"{path} holds prompts without embeddings and no recorded embed_shape; regenerate")
        self._prompt_ids: np.ndarray | None = None
        self._prompt_table: torch.Tensor | None = None
        columns = ("z0", "z1", "prompt_embeds") if self.has_embeddings else ("z0", "z1")
        self._views = None
        if ds._indices is None:
            try:
                self._views = {c: _chunk_views(ds.data.column(c), tuple(np.asarray(first[c]).shape)) for c in columns}
                starts = np.cumsum([0] + [len(v) for v in self._views["z0"]])
                self._starts = starts
            except _NotViewable:
                self._views = None

    def __len__(self) -> int:
        return self.rows

    def unique_prompts(self) -> list[str]:
        """The distinct prompts of text pairs, in first-seen order (``attach_prompt_embeddings`` takes
        their embeddings in this order)."""
        if self.conditioning != "text":
            raise ReflowError(f"{self.path} holds no prompts")
        column = [str(p) for p in self._ds["prompt"]]
        unique: dict[str, int] = {}
        self._prompt_ids = np.array([unique.setdefault(p, len(unique)) for p in column], dtype=np.int64)
        return list(unique)

    def attach_prompt_embeddings(self, table: torch.Tensor) -> None:
        """Use ``table[j]`` (the embeddings of ``unique_prompts()[j]``) for every row with that prompt."""
        if self._prompt_ids is None:
            self.unique_prompts()
        want = int(self._prompt_ids.max()) + 1
        if len(table) != want or tuple(table.shape[1:]) != tuple(self.embed_shape):
            raise ReflowError(
                f"prompt embeddings of shape {tuple(table.shape)} for {want} prompts of shape {self.embed_shape}"
            )
        self._prompt_table = table.float().cpu()

    def _gather(self, column: str, idx: np.ndarray) -> np.ndarray:
        views = self._views[column]
        chunk = np.searchsorted(self._starts, idx, side="right") - 1
        out = np.empty((len(idx), *views[0].shape[1:]), dtype=np.float32)
        for c in np.unique(chunk):
            sel = chunk == c
            out[sel] = views[c][idx[sel] - self._starts[c]]
        return out

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        rows = idx.numpy()
        cond: dict[str, torch.Tensor] = {}
        embeds = None
        if self._views is not None:
            z0, z1 = self._gather("z0", rows), self._gather("z1", rows)
            if self.has_embeddings:
                embeds = self._gather("prompt_embeds", rows)
        else:
            columns = ["z0", "z1", *(["prompt_embeds"] if self.has_embeddings else [])]
            try:
                got = self._ds.select_columns(columns)[rows.tolist()]
                z0 = np.asarray(got["z0"], dtype=np.float32)
                z1 = np.asarray(got["z1"], dtype=np.float32)
                if self.has_embeddings:
                    embeds = np.asarray(got["prompt_embeds"], dtype=np.float32)
            except (ValueError, TypeError):
                raise ReflowError(f"{self.path}: z0/z1 rows have different shapes; pairs need one shape") from None
            if z0.shape[1:] != self.sample_shape or z1.shape != z0.shape:
                raise ReflowError(f"{self.path}: rows of shape {tuple(z0.shape[1:])} among {self.sample_shape}")
        if self._labels is not None:
            cond["class_labels"] = torch.from_numpy(self._labels[rows])
        if self.conditioning == "text":
            if embeds is not None:
                cond["encoder_hidden_states"] = torch.from_numpy(embeds)
            elif self._prompt_table is not None:
                cond["encoder_hidden_states"] = self._prompt_table[torch.from_numpy(self._prompt_ids[rows])]
            else:
                raise ReflowError(f"{self.path} stores prompts only; attach their embeddings first")
        return torch.from_numpy(z0), torch.from_numpy(z1), cond


class _NotViewable(Exception):
    pass


def _chunk_views(column, shape: tuple[int, ...]) -> list[np.ndarray]:
    """Zero-copy (rows, *shape) numpy views of each chunk of a fixed-shape Arrow list column."""
    import pyarrow as pa

    views = []
    for chunk in column.chunks:
        arr = chunk.storage if isinstance(chunk.type, pa.ExtensionType) else chunk
        rows = len(arr)
        while pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type) or pa.types.is_fixed_size_list(arr.type):
            if arr.null_count:
                raise _NotViewable
            arr = arr.flatten()
        if arr.null_count or not pa.types.is_floating(arr.type) or len(arr) != rows * math.prod(shape):
            raise _NotViewable
        views.append(arr.to_numpy(zero_copy_only=True).reshape(rows, *shape))
    return views


def read_provenance(path: str | Path) -> dict[str, Any]:
    """The provenance recorded with a pairs folder by ``generate_pairs`` (its ``reflow_pairs.json``)."""
    path = Path(path)
    if not path.is_dir():
        raise ReflowError(f"no such pairs folder: {path}")
    f = path / RECORD
    if not f.is_file():
        raise ReflowError(f"{path} has no {RECORD}: not written by `reflow generate`")
    try:
        record = json.loads(f.read_text())
    except (OSError, ValueError):  # empty, cut short, not UTF-8
        record = None
    if not isinstance(record, dict):
        raise _damaged(path, f"{RECORD} is not valid JSON")
    return record


def verify_pairs(
    path: str | Path,
    rows: int = 16,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    allow_pickle: bool = False,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Check the folder's files against their recorded sizes and sha256, then re-run the recorded teacher
    on ``rows`` random rows and report the largest differences.

    z0 is rebuilt from (seed, index) and compared with the stored z0; the teacher's output from it is
    compared with the stored z1. A teacher whose weights or configs changed since is refused.
    ``files_checked`` in the report counts the files whose hashes matched (0 for older folders that
    recorded none).
    """
    from reflow.teachers.base import load_teacher

    if rows < 1:
        raise ReflowError(f"--rows must be at least 1, got {rows}")
    path = Path(path)
    prov = read_provenance(path)
    rec = prov.get("teacher")
    missing = [k for k in ("teacher", "seed", "sample_shape", "dtype") if k not in prov]
    if isinstance(rec, dict):
        missing += [f"teacher.{k}" for k in ("teacher", "solver", "nfe") if k not in rec]
    elif "teacher" not in missing:
        missing.append("teacher")
    if missing:
        raise _damaged(path, f"{RECORD} lacks {', '.join(missing)}")
    if prov["dtype"] not in DTYPES:
        raise _damaged(path, f"{RECORD} records an unknown dtype {prov['dtype']!r}")
    ds, _ = _open_pairs_dataset(path, full=True)  # before the teacher: a damaged folder fails fast
    if "index" not in ds.column_names:
        raise ReflowError(f"{path} has no index column, so its noise cannot be rebuilt; regenerate it")
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
    pick = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[: min(rows, len(ds))]
    try:
        sub = ds.select(sorted(pick.tolist())).with_format("torch")[:]
    except (OSError, ValueError, TypeError) as e:  # pyarrow's errors derive from these
        raise _damaged(path, f"its rows do not read ({type(e).__name__})") from None
    z0 = row_noise(prov["seed"], sub["index"], tuple(prov["sample_shape"]))
    outs = []
    for b in range(0, len(z0), batch_size):
        chunk = z0[b : b + batch_size]
        if "label" in sub:
            outs.append(teacher(chunk, sub["label"][b : b + batch_size]).float().cpu())
        elif "prompt" in sub:
            embeds = teacher.encode_prompts(list(sub["prompt"][b : b + batch_size]))
            outs.append(teacher(chunk, embeds).float().cpu())
        else:
            outs.append(teacher(chunk).float().cpu())
    z1 = torch.cat(outs).to(DTYPES[prov["dtype"]]).float()
    return {
        "rows": len(z0),
        "dtype": prov["dtype"],
        "max_abs_diff_z0": (z0.to(DTYPES[prov["dtype"]]).float() - sub["z0"].float()).abs().max().item(),
        "max_abs_diff_z1": (z1 - sub["z1"].float()).abs().max().item(),
        "teacher": rec["teacher"],
        "solver": rec["solver"],
        "nfe": rec["nfe"],
        "files_checked": len(prov.get("files") or {}),
    }
