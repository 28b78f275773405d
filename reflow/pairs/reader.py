"""Reading pairs: open a pairs folder with its integrity checks (``open_pairs_dataset``), read it whole
(``load_pairs``) or draw random batches from it (``PairsReader``), from memory when the pairs fit a budget,
else streamed from the memory-mapped Arrow files. z0 not stored is rebuilt from (seed, index)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch

from reflow.core.noise import row_noise
from reflow.errors import ReflowError
from reflow.folders.kinds import folder_kind
from reflow.pairs.schema import check_files, damaged, read_provenance
from reflow.pairs.z0 import dataset_provenance, recorded_seed


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


def open_pairs_dataset(path: str | Path, full: bool = False):
    """Open a pairs dataset (memory-mapped Arrow) and check its columns, and the files and rows recorded
    in its ``reflow_pairs.json`` (sizes; with ``full`` also the sha256); returns (dataset, provenance)."""
    path = Path(path)
    if not path.is_dir():
        unfinished = Path(f"{path}.partial").is_dir()
        hint = f" (an unfinished run is in {path}.partial: rerun `reflow generate`)" if unfinished else ""
        raise ReflowError(f"no such pairs folder: {path}{hint}")
    record = read_provenance(path) if folder_kind(path) == "pairs" else None
    if record is not None:
        check_files(path, record, full)
    ds = _load_dataset(path, record)
    provenance = dataset_provenance(ds)
    if not provenance and record is not None:  # the info lost (e.g. rewritten by hand): the record's copy
        provenance = {k: v for k, v in record.items() if k not in ("files", "num_rows")}
    _check_rows(path, ds, record, provenance)
    return ds, provenance


def _load_dataset(path: Path, record: dict[str, Any] | None):
    """The dataset saved in ``path`` (the ``train`` split, or the first, of a DatasetDict)."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        if record is not None:
            raise damaged(path, f"it does not open ({type(e).__name__})") from None
        raise ReflowError(f"{path} is not a pairs dataset written by `reflow generate` ({type(e).__name__})") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
    return ds


def _check_rows(path: Path, ds, record: dict[str, Any] | None, provenance: dict[str, Any]) -> None:
    """Refuse a dataset without z1, without z0 or the index and seed to rebuild it, without rows, or with
    other than its recorded number of rows."""
    if "z1" not in ds.column_names:
        raise ReflowError(f"{path} lacks column z1; pairs need z1 and z0 (or an index to rebuild z0 from)")
    if "z0" not in ds.column_names:
        if "index" not in ds.column_names:
            raise ReflowError(f"{path} has neither a z0 column nor an index column to rebuild z0 from")
        recorded_seed(provenance, str(path))
    if len(ds) == 0:
        raise ReflowError(f"{path} holds no rows; regenerate it")
    expected = (record or {}).get("num_rows")
    if isinstance(expected, int) and len(ds) != expected:
        raise damaged(path, f"it holds {len(ds)} rows, expected {expected}")


def load_pairs(path: str | Path) -> Pairs:
    """Open and check a pairs dataset written by ``generate_pairs`` (or by hand with the same columns),
    reading every row into memory (for evaluation and checks; training reads with ``PairsReader``). z0 is
    read when stored, else rebuilt from the recorded seed and the ``index`` column (``reflow.pairs.z0``)."""
    ds, provenance = open_pairs_dataset(path)
    try:
        cols = ds.with_format("numpy")[:]
        z1 = np.asarray(cols["z1"], dtype=np.float32)
        index = np.asarray(cols["index"], dtype=np.int64) if "index" in cols else np.arange(len(ds))
        if "z0" in cols:
            z0 = np.asarray(cols["z0"], dtype=np.float32)
        else:
            z0 = row_noise(recorded_seed(provenance, str(path)), index, z1.shape[1:]).numpy()
    except (ValueError, TypeError):
        raise ReflowError(f"{path}: z0/z1 rows have different shapes; pairs need one fixed shape") from None
    if z0.shape != z1.shape or z0.ndim < 2:
        raise ReflowError(f"{path}: z0 has shape {z0.shape} but z1 has {z1.shape}; they must match as (N, ...)")
    if not (np.isfinite(z0).all() and np.isfinite(z1).all()):
        raise ReflowError(f"{path} holds NaN or inf values; regenerate it")
    label = torch.from_numpy(np.asarray(cols["label"], dtype=np.int64)) if "label" in cols else None
    embeds = torch.from_numpy(np.asarray(cols["prompt_embeds"], dtype=np.float32)) if "prompt_embeds" in cols else None
    prompt = [str(x) for x in cols["prompt"]] if "prompt" in cols else None
    return Pairs(torch.from_numpy(z0), torch.from_numpy(z1), torch.from_numpy(index), provenance, label, embeds, prompt)


InMemory = Literal["auto", "yes", "no"]
"""Whether ``PairsReader`` reads the pairs into memory: ``auto`` when they fit :func:`memory_budget`."""
IN_MEMORY: tuple[str, ...] = get_args(InMemory)
MEMORY_FRACTION = 0.25
"""auto's share of the memory available: the rest is left to the model, the optimizer, the batches in
flight and the page cache (a quarter, so that even fp32 pairs read from float16 files, twice their size on
disk, leave most of the machine free)."""


def memory_budget() -> int:
    """The bytes ``auto`` may hold in memory: :data:`MEMORY_FRACTION` of the memory available now (psutil's
    ``available``: free plus reclaimable cache), shared by the processes of this machine (``LOCAL_WORLD_SIZE``,
    set by torchrun and accelerate launch), since each holds its own copy."""
    import psutil

    local = int(os.environ.get("LOCAL_WORLD_SIZE") or 1)
    return int(MEMORY_FRACTION * psutil.virtual_memory().available / max(local, 1))


class PairsReader:
    """Random batches from a pairs dataset: read into memory, or streamed from the memory-mapped files.

    ``in_memory``: ``yes`` reads every (kept) row into contiguous float32 tensors once, so a batch is an index
    gather; ``no`` streams: each Arrow chunk of a fixed-shape column is viewed as one (rows, *shape) numpy
    array straight over the memory-mapped file (zero copy), so a batch is a numpy gather, pairs larger than
    memory train, and the OS page cache keeps hot rows in memory (columns that cannot be viewed that way,
    nulls or ragged rows, fall back to datasets' own row access); ``auto`` reads into memory when the
    tensors fit :func:`memory_budget`, else streams. Both give the same batch for the same ``idx``.

    z0 is read when stored, else rebuilt from the recorded seed and each row's ``index``
    (``reflow.pairs.z0``): once for all rows in memory, per batch when streaming.

    ``max_rows`` keeps the first rows only (``--max-pairs``); ``drop_farthest`` then drops that fraction of
    them with the largest ||z1 - z0|| (:meth:`_drop_farthest`), so row i of the reader is the i-th kept row.
    ``batch(idx)`` returns float32 CPU tensors
    (z0, z1) and the rows' conditioning as the model's keywords: ``{"class_labels": (B,) int64}`` for
    class-labelled pairs, ``{"encoder_hidden_states": (B, seq, dim) float32}`` for text pairs, ``{}``
    otherwise. Text pairs stored without embeddings (prompts only) need ``attach_prompt_embeddings``
    first, with the embeddings of ``unique_prompts()``.
    """

    def __init__(
        self, path: str | Path, max_rows: int | None = None, drop_farthest: float = 0.0, in_memory: InMemory = "auto"
    ):
        ds, self.provenance = open_pairs_dataset(path)
        self.path = Path(path)
        if max_rows is not None and max_rows < 1:
            raise ReflowError(f"--max-pairs must be at least 1, got {max_rows}")
        if in_memory not in IN_MEMORY:
            raise ReflowError(f"--pairs-in-memory must be one of {', '.join(IN_MEMORY)}, got {in_memory!r}")
        self.rows = len(ds) if max_rows is None else min(max_rows, len(ds))
        self.has_label = "label" in ds.column_names
        self.has_embeddings = "prompt_embeds" in ds.column_names
        self.conditioning = "class" if self.has_label else "text" if "prompt" in ds.column_names else None
        self.z0_stored = "z0" in ds.column_names
        self._ds = ds.with_format("numpy")
        first = self._ds[0]
        self.sample_shape = self._sample_shape(first)
        self._seed = None if self.z0_stored else recorded_seed(self.provenance, str(path))
        self._index = None if self.z0_stored else _scalar_column(ds, "index")
        self._labels = _scalar_column(ds, "label") if self.has_label else None
        self.num_classes = self._num_classes()
        self.embed_shape = self._embed_shape(first, path)
        self._prompt_ids: np.ndarray | None = None
        self._prompt_table: torch.Tensor | None = None
        self._views = self._open_views(ds, first)
        self._keep: np.ndarray | None = None
        if drop_farthest:
            self._drop_farthest(drop_farthest)
        self._memory = self._read_into_memory() if self._in_memory(in_memory) else None

    @property
    def in_memory(self) -> bool:
        """Whether the rows were read into memory (else batches stream from the files)."""
        return self._memory is not None

    def _sample_shape(self, first: dict[str, Any]) -> tuple[int, ...]:
        """The shape of one sample, z1's (checked against a stored z0's)."""
        z1 = np.asarray(first["z1"])
        z0 = np.asarray(first["z0"]) if self.z0_stored else z1
        if z0.shape != z1.shape or z0.ndim < 1:
            raise ReflowError(f"{self.path}: z0 rows have shape {z0.shape} but z1 rows {z1.shape}; they must match")
        return tuple(z1.shape)

    def _open_views(self, ds, first: dict[str, Any]) -> dict[str, list[np.ndarray]] | None:
        """Zero-copy views of the stored sample columns' Arrow chunks (None when they cannot be viewed)."""
        columns = [c for c in ("z0", "z1", "prompt_embeds") if c in ds.column_names]
        if ds._indices is not None:
            return None
        try:
            views = {c: _chunk_views(ds.data.column(c), tuple(np.asarray(first[c]).shape)) for c in columns}
        except _NotViewable:
            return None
        lengths = {c: [len(v) for v in chunks] for c, chunks in views.items()}
        if any(n != lengths["z1"] for n in lengths.values()):  # chunked apart (never seen): read via datasets
            return None
        self._starts = np.cumsum([0] + lengths["z1"])
        return views

    def _num_classes(self) -> int | None:
        """The class count of class-labelled pairs: the teacher's recorded one, else the largest label + 1."""
        if self._labels is None:
            return None
        recorded = (self.provenance.get("teacher") or {}).get("num_classes")
        return int(recorded) if recorded else int(self._labels.max()) + 1

    def _embed_shape(self, first: dict[str, Any], path: str | Path) -> tuple[int, int] | None:
        """The shape of one prompt embedding of text pairs: stored, else recorded."""
        if self.conditioning != "text":
            return None
        if self.has_embeddings:
            return tuple(np.asarray(first["prompt_embeds"]).shape)
        if self.provenance.get("embed_shape"):
            return tuple(self.provenance["embed_shape"])
        raise ReflowError(f"{path} holds prompts without embeddings and no recorded embed_shape; regenerate")

    def __len__(self) -> int:
        return self.rows if self._keep is None else len(self._keep)

    def _kept_rows(self) -> np.ndarray:
        """The dataset rows of the reader's rows, in order."""
        return np.arange(self.rows) if self._keep is None else self._keep

    def memory_bytes(self) -> int:
        """The bytes the reader's rows take in memory: float32 z0, z1 and stored prompt embeddings."""
        per_row = 2 * math.prod(self.sample_shape) + (math.prod(self.embed_shape) if self.has_embeddings else 0)
        return 4 * per_row * len(self)

    def _in_memory(self, in_memory: InMemory) -> bool:
        """Decide ``--pairs-in-memory``: ``auto`` by :func:`memory_budget`; ``yes`` refused in one line when the
        rows need more than the memory available."""
        if in_memory == "no":
            return False
        need = self.memory_bytes()
        if in_memory == "auto":
            return need <= memory_budget()
        import psutil

        available = psutil.virtual_memory().available
        if need > available:
            raise ReflowError(
                f"--pairs-in-memory yes: {self.path} needs {need / 2**30:.1f} GiB in memory (float32), more than "
                f"the {available / 2**30:.1f} GiB available; use auto or no to stream it from disk"
            )
        return True

    def _read_into_memory(self, chunk: int = 8192) -> dict[str, torch.Tensor]:
        """Every kept row's z0, z1 (and stored prompt embeddings) in contiguous float32 tensors, read in chunks
        through :meth:`_rows`, so they hold exactly what streaming would give."""
        n, rows = len(self), self._kept_rows()
        memory = {"z0": torch.empty(n, *self.sample_shape), "z1": torch.empty(n, *self.sample_shape)}
        if self.has_embeddings:
            memory["prompt_embeds"] = torch.empty(n, *self.embed_shape)
        for start in range(0, n, chunk):
            got = self._rows(rows[start : start + chunk], self.has_embeddings)
            for tensor, values in zip(memory.values(), got, strict=True):
                tensor[start : start + len(values)] = torch.from_numpy(values)
        return memory

    def _drop_farthest(self, fraction: float, chunk: int = 4096) -> None:
        """Keep the rows whose distance ||z1 - z0|| (over every dimension, in float64) is not among the
        ``fraction`` largest ("Flow Straighter and Faster", Zhang et al. 2025: the far pairs are the ones
        whose teacher paths curve most). Decided once over all rows (read in chunks, never all at once);
        ties broken by row order, so the kept set is a function of the data alone. The filter and its
        threshold go into ``provenance["pair_filter"]`` (recorded in the model card)."""
        if not 0 <= fraction < 1:
            raise ReflowError(f"--drop-farthest must be in [0, 1), got {fraction}")
        distance = np.empty(self.rows, dtype=np.float64)
        for start in range(0, self.rows, chunk):
            rows = np.arange(start, min(start + chunk, self.rows))
            z0, z1 = self._rows(rows)
            diff = z1.reshape(len(rows), -1).astype(np.float64) - z0.reshape(len(rows), -1)
            distance[rows] = np.sqrt((diff * diff).sum(axis=1))
        dropped = int(math.floor(fraction * self.rows))
        order = np.argsort(distance, kind="stable")
        self._keep = np.sort(order[: self.rows - dropped])
        self.provenance = dict(self.provenance)
        self.provenance["pair_filter"] = {
            "drop_farthest": fraction,
            "distance": "||z1 - z0||_2 over every dimension",
            "rows": self.rows,
            "dropped": dropped,
            "kept": len(self._keep),
            "max_kept_distance": float(distance[order[self.rows - dropped - 1]]),
            "max_distance": float(distance[order[-1]]),
        }

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

    def _gather(self, columns: list[str], idx: np.ndarray) -> tuple[np.ndarray, ...]:
        """Dataset rows ``idx`` of the stored ``columns`` from their zero-copy chunk views, as float32: the rows
        grouped by Arrow chunk with one sort, then one gather per chunk touched, for every column at once."""
        chunk = np.searchsorted(self._starts, idx, side="right") - 1
        order = np.argsort(chunk, kind="stable")
        touched, first = np.unique(chunk[order], return_index=True)
        bounds = [*first.tolist(), len(idx)]
        outs = [np.empty((len(idx), *self._views[c][0].shape[1:]), dtype=np.float32) for c in columns]
        for k, c in enumerate(touched.tolist()):
            at = order[bounds[k] : bounds[k + 1]]
            local = idx[at] - self._starts[c]
            for out, column in zip(outs, columns, strict=True):
                out[at] = self._views[column][c][local]
        return tuple(outs)

    def _rows(self, rows: np.ndarray, embeddings: bool = False) -> tuple[np.ndarray, ...]:
        """float32 z0 and z1 (and the prompt embeddings, when ``embeddings``) of dataset rows ``rows``; z0
        rebuilt from (seed, index) when not stored."""
        columns = [*(["z0"] if self.z0_stored else []), "z1", *(["prompt_embeds"] if embeddings else [])]
        arrays = self._stored(columns, rows)
        if not self.z0_stored:
            arrays = (row_noise(self._seed, self._index[rows], self.sample_shape).numpy(), *arrays)
        z0, z1 = arrays[:2]
        if z1.shape[1:] != self.sample_shape or z1.shape != z0.shape:
            raise ReflowError(f"{self.path}: rows of shape {tuple(z1.shape[1:])} among {self.sample_shape}")
        return arrays

    def _stored(self, columns: list[str], rows: np.ndarray) -> tuple[np.ndarray, ...]:
        """The stored ``columns`` of dataset rows ``rows`` as float32 arrays: gathered from the zero-copy views,
        else read through datasets."""
        if self._views is not None:
            return self._gather(columns, rows)
        try:
            got = self._ds.select_columns(columns)[rows.tolist()]
            return tuple(np.asarray(got[c], dtype=np.float32) for c in columns)
        except (ValueError, TypeError):
            raise ReflowError(f"{self.path}: z0/z1 rows have different shapes; pairs need one shape") from None

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """The rows ``idx`` of this reader (after any filter) as (z0, z1, cond), float32 CPU tensors: an index
        gather on the tensors in memory, or a gather from the files."""
        rows = idx.numpy() if self._keep is None else self._keep[idx.numpy()]
        if self._memory is not None:
            z0, z1 = self._memory["z0"][idx], self._memory["z1"][idx]
            embeds = self._memory["prompt_embeds"][idx] if self.has_embeddings else None
        else:
            z0, z1, *rest = (torch.from_numpy(a) for a in self._rows(rows, self.has_embeddings))
            embeds = rest[0] if rest else None
        return z0, z1, self._cond(rows, embeds)

    def _cond(self, rows: np.ndarray, embeds: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The conditioning keywords of dataset rows ``rows`` (their stored prompt embeddings: ``embeds``)."""
        cond: dict[str, torch.Tensor] = {}
        if self._labels is not None:
            cond["class_labels"] = torch.from_numpy(self._labels[rows])
        if self.conditioning == "text":
            if embeds is not None:
                cond["encoder_hidden_states"] = embeds
            elif self._prompt_table is not None:
                cond["encoder_hidden_states"] = self._prompt_table[torch.from_numpy(self._prompt_ids[rows])]
            else:
                raise ReflowError(f"{self.path} stores prompts only; attach their embeddings first")
        return cond


def _scalar_column(ds, name: str) -> np.ndarray:
    """An integer column as one int64 array, straight from Arrow (datasets' ``ds[name]`` walks it row by row:
    66 s for the index of a million pairs, against milliseconds here)."""
    if ds._indices is None:
        return np.asarray(ds.data.column(name).to_numpy(), dtype=np.int64)
    return np.asarray(ds.with_format("numpy")[name], dtype=np.int64)


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
