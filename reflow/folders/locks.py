"""One writer per output: a lock file beside it, taken atomically and released at the end.

The lock is a small JSON file (owner pid, host, start time, a random token) created with
``O_CREAT | O_EXCL``, so of two runs that start together exactly one gets it. A lock whose owner is on
this host and no longer running (killed, crashed, the machine restarted) is stale: the next run takes
it over. A lock held from another host cannot be checked from here and is respected; its message
says which file to delete once that run is known to be gone.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reflow.errors import ReflowError
from reflow.folders.io import writer_alive

EMPTY_GRACE_S = 30.0
"""A lock file still empty after this long was left by an owner killed between creating and writing it."""

_held: set[str] = set()  # tokens of the locks this process holds


def _host() -> str:
    import socket

    return socket.gethostname().replace("-", "_")  # the form reflow.folders.io.writer_alive compares


def _process_start(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), from /proc; None where unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(float(line.split()[1]) for line in open("/proc/stat") if line.startswith("btime"))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _stale(owner: dict[str, Any]) -> bool:
    """Whether the run recorded in a lock is certainly gone."""
    host, pid = str(owner.get("host", "")), owner.get("pid")
    if not isinstance(pid, int):
        return False
    if host != _host():
        return False  # cannot see it from here
    if pid == os.getpid():
        return owner.get("token") not in _held  # a restarted container can give us the dead owner's pid
    if not writer_alive(host, pid):
        return True
    started, began = owner.get("started"), _process_start(pid)
    return isinstance(started, (int, float)) and began is not None and began > started + 2  # the pid was reused


def _read(path: Path) -> dict[str, Any] | None:
    """The lock's owner; None when the lock is gone; ``{}`` when it is empty or unreadable."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        owner = json.loads(text)
    except ValueError:
        return {}
    return owner if isinstance(owner, dict) else {}


@dataclass
class Lock:
    """A lock held by this process (see :func:`acquire`); ``release()`` removes it if it is still ours."""

    path: Path
    token: str

    def release(self) -> None:
        if self.token not in _held:
            return
        _held.discard(self.token)
        if (_read(self.path) or {}).get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def acquire(path: str | os.PathLike, what: str, command: str) -> Lock:
    """Take the lock file ``path`` for writing ``what`` with ``reflow <command>``, or raise
    :class:`ReflowError` naming the run that holds it (its pid, host and start time) and the fix."""
    path = Path(path)
    token = uuid.uuid4().hex
    me = {"pid": os.getpid(), "host": _host(), "started": time.time(), "command": command, "token": token}
    for _ in range(50):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _read(path)
            if owner is None:
                continue  # released meanwhile: try again
            if not owner:
                age = time.time() - _mtime(path)
                if age < EMPTY_GRACE_S:  # its owner is writing it right now
                    time.sleep(0.1)
                    continue
            elif not _stale(owner):
                started = owner.get("started")
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"
                raise ReflowError(
                    f"{what} is being written by another `reflow {owner.get('command', command)}` (pid "
                    f"{owner.get('pid')} on host {owner.get('host')}, started {when}); wait for it to finish, "
                    f"or if that run is gone, delete {path} and rerun"
                ) from None
            _take_over(path, owner)
            continue
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        _held.add(token)
        return Lock(path, token)
    raise ReflowError(
        f"could not take the lock {path}: another run holds it or is taking it; rerun when it is done, "
        "or delete it if no run is going"
    )


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return time.time()


def _take_over(path: Path, seen: dict[str, Any]) -> None:
    """Remove the stale lock ``seen``; if another run replaced it meanwhile, put that one back."""
    grave = path.with_name(f"{path.name}.stale-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, grave)
    except FileNotFoundError:
        return  # another run took it over first
    if (_read(grave) or {}) != seen:
        try:
            os.link(grave, path)  # a live run's fresh lock: restore it
        except OSError:
            pass
    grave.unlink(missing_ok=True)
