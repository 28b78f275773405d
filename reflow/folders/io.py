"""Small file-system helpers: outputs appear complete or not at all, and never land on what the user
did not ask for.

The output rule, used by every command that writes:

- an output never equals an input and never lies inside an input folder;
- an output that exists is used only when it is this command's own earlier output, recognised by the
  marker the command wrote (``.reflow-output.json`` in a folder, ``NAME.reflow.json`` beside a file);
  an empty folder counts as new;
- where it will be written is checked for writability before any work starts;
- temporary names carry the host and pid of their writer, so a later run removes the debris of a
  killed one (and never a live writer's).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from reflow.errors import ReflowError

MARKER = ".reflow-output.json"
"""The file inside a folder output that says which reflow command wrote it."""


def _tmp_name(path: Path, tag: str = "tmp") -> Path:
    """A temporary name beside ``path`` that records its writer: ``.NAME.tmp-HOST-PID-RANDOM``."""
    host = socket.gethostname().replace("-", "_")
    return path.parent / f".{path.name}.{tag}-{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def writer_alive(host: str, pid: int) -> bool:
    """Whether the process ``pid`` on ``host`` may still be running (another host: assume it is)."""
    return host != socket.gethostname().replace("-", "_") or _pid_alive(pid)


_DEBRIS = re.compile(r"\.(?P<name>.+?)\.(?:(?:tmp|old)-(?P<owner>.+)|tmp\..*|tmp)")
"""``.NAME.tmp-HOST-PID-RANDOM`` / ``.NAME.old-...`` (ours), ``.NAME.tmp.*`` / ``.NAME.tmp`` (older versions')."""


def _dead_debris(entry: Path) -> str | None:
    """The output name ``entry`` is a temporary of, when its writer is dead (or unknown: older versions)."""
    m = _DEBRIS.fullmatch(entry.name)
    if m is None:
        return None
    parts = (m["owner"] or "").rsplit("-", 2)
    if len(parts) == 3 and parts[1].isdigit() and writer_alive(parts[0], int(parts[1])):
        return None
    return m["name"]


def _remove(entry: Path) -> None:
    shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() and not entry.is_symlink() else entry.unlink(True)


def clean_debris(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary siblings of ``path`` (``.NAME.tmp-*``, ``.NAME.old-*``) whose writer on this
    host is dead, and ``.NAME.tmp.*`` files of older versions; returns what was removed."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    removed = [p for p in path.parent.glob(f".{path.name}.*") if _dead_debris(p) == path.name]
    for p in removed:
        _remove(p)
    return removed


def clean_folder_debris(folder: str | os.PathLike) -> list[Path]:
    """:func:`clean_debris` for every output inside ``folder`` (a report folder a killed run wrote into)."""
    folder = Path(folder)
    removed = [p for p in folder.glob(".*") if _dead_debris(p) is not None] if folder.is_dir() else []
    for p in removed:
        _remove(p)
    return removed


def _marker_file(path: Path, kind: Literal["dir", "file"]) -> Path:
    return path / MARKER if kind == "dir" else path.with_name(path.name.removesuffix(path.suffix) + ".reflow.json")


def mark_output(path: str | os.PathLike, command: str, kind: Literal["dir", "file"] = "dir", **info: Any) -> None:
    """Record that ``reflow <command>`` wrote ``path`` (see :func:`claim_output`)."""
    from reflow.version import __version__

    atomic_write_json(_marker_file(Path(path), kind), {"command": command, "reflow_version": __version__, **info})


def read_marker(path: str | os.PathLike, kind: Literal["dir", "file"] = "dir") -> dict[str, Any] | None:
    """What ``mark_output`` recorded for ``path``, or None when there is no readable marker."""
    try:
        marker = json.loads(_marker_file(Path(path), kind).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def output_owner(path: str | os.PathLike, kind: Literal["dir", "file"] = "dir") -> str | None:
    """The command recorded in ``path``'s marker, or None when there is no readable marker."""
    return (read_marker(path, kind) or {}).get("command")


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(path: str | os.PathLike, flag: str = "--out") -> None:
    """Fail now, with one line, if ``path`` (or the folder it would be made in) cannot be written: a
    probe file is created and removed, which also catches read-only mounts and a full disk."""
    path = Path(path)
    target = path if path.is_dir() else _nearest_existing(path.parent)
    if not target.is_dir():
        raise ReflowError(f"{flag} {path}: {target} is a file, not a folder; pick another {flag}")
    probe = _tmp_name(target / "write-probe")
    try:
        with open(probe, "wb") as f:
            f.write(b"reflow")
    except OSError as e:
        raise ReflowError(f"{flag} {path}: cannot write in {target} ({e.strerror}); pick a writable {flag}") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)


def _same_or_inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def _check_existing(path: Path, command: str, kind: Literal["dir", "file"], legacy: tuple[str, ...], flag: str) -> None:
    """An existing output is used only when it is of the right kind and this command's own (or empty)."""
    what = "folder" if kind == "dir" else "file"
    if kind == "dir" and not path.is_dir():
        raise ReflowError(f"{flag} {path} is a file; {flag} takes a folder to write")
    if kind == "file" and path.is_dir():
        raise ReflowError(f"{flag} {path} is a folder; {flag} takes a file name like samples.npy")
    own = output_owner(path, kind) == command or any((path / name).is_file() for name in legacy)
    empty = kind == "dir" and not any(path.iterdir())
    if not (own or empty):
        raise ReflowError(
            f"{flag} {path} exists and was not written by `reflow {command}`; pick a new {flag} "
            f"(reflow never writes into or over a {what} it did not make)"
        )


def claim_output(
    path: str | os.PathLike,
    command: str,
    *,
    kind: Literal["dir", "file"] = "dir",
    inputs: Iterable[str | os.PathLike | None] = (),
    legacy: tuple[str, ...] = (),
    flag: str = "--out",
) -> Path:
    """Check, before any work, that ``reflow <command>`` may write ``path`` (the output rule above); removes
    the debris of killed earlier runs. ``legacy``: files whose presence marks a folder written by an older
    version of the same command. Raises :class:`ReflowError` with the fix."""
    path = Path(path)
    full = path.resolve()
    for given in inputs:
        if given is None:
            continue
        source = Path(given).resolve()
        if _same_or_inside(full, source):
            raise ReflowError(f"{flag} {path} is (inside) the input {given}; pick an output outside every input")
    if kind == "file" and full.suffix == ".json" and full.name.endswith(".reflow.json"):
        raise ReflowError(f"{flag} {path}: that name is reserved for reflow's own markers; pick another")
    if path.exists():
        _check_existing(path, command, kind, legacy, flag)
    marker = _marker_file(path, kind)
    if kind == "file" and marker.exists() and output_owner(path, kind) != command:
        raise ReflowError(f"{marker} exists and is not reflow's record of `reflow {command}`; pick a new {flag}")
    clean_debris(path)
    check_writable(path, flag)
    return path


_DISK_MESSAGES = ("No space left on device", "Disk quota exceeded", "Read-only file system", "file write failed")


def is_disk_error(error: BaseException) -> bool:
    """A full disk, a quota or a read-only file system, however the library that hit it reported it:
    OSError, torch's zip writer ("file write failed"), safetensors' SafetensorError ("I/O error: No space
    left on device (os error 28)")."""
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)
    return any(m in str(error) for m in _DISK_MESSAGES)


def disk_error_reason(error: BaseException) -> str:
    """The short reason of a disk error, e.g. "No space left on device"."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return next((m for m in _DISK_MESSAGES[:3] if m in str(error)), "No space left on device")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success rename it to ``path``, on error remove it.

    With ``overwrite`` an existing ``path`` is replaced only after the new one is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        if not overwrite:
            shutil.rmtree(tmp, ignore_errors=True)
            raise FileExistsError(path)
        old = _tmp_name(path, "old")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary name beside ``path`` and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())
