"""Outputs of a run: every path is checked before any work (made, test-written), JSON is written whole."""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from .._os import pid_alive
from ..errors import ConfigError


def first_existing(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_output_file(flag: str, path: str) -> None:
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{flag} {path} is a folder: give a file name")
    base = first_existing(p.parent if str(p.parent) else Path("."))
    if not base.is_dir():
        raise ConfigError(f"{flag} {path}: {base} is a file, so nothing can be written under it: choose another path")
    try:  # the one honest test of writability (root ignores permission bits; /proc refuses everyone)
        with tempfile.NamedTemporaryFile(dir=base, prefix=".vitq-check-"):
            pass
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot write in {base} ({e.strerror}): choose a path you can write to") from None


def check_output_dir(flag: str, path: str) -> None:
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{flag} {path} is a file: give a folder (it is created if missing)")
    base = first_existing(p)
    if not base.is_dir():
        raise ConfigError(f"{flag} {path}: {base} is a file, so no folder can be made under it: choose another path")
    try:
        p.mkdir(parents=True, exist_ok=True)  # made now, so a bad place fails before the work, not after
        check_output_file(flag, str(p / "x"))
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot create or write the folder ({e.strerror}): choose a folder you can "
                          "write to") from None


def write_json(path: Optional[str], obj: dict[str, Any]) -> None:
    if path:
        write_text(path, json.dumps(obj, indent=2) + "\n")


def write_text(path: "str | Path", text: str) -> None:
    """``text`` into ``path``, its missing folders made (an output path was checked writable before the work, not
    created), written whole and then renamed: never a truncated file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(text)
    tmp.replace(p)


#: the lock a run holds in the folder it writes (``--out``, ``--resume-dir``) while it runs
LOCK_FILE = ".vitq.lock"


@contextmanager
def folder_lock(flag: str, folder: "str | Path") -> Iterator[None]:
    """Hold ``folder`` for this run: a second vitq run writing the same folder is refused in one line (both saved,
    one silently replacing the other, before). A lock whose process ended on this machine (killed) is taken over."""
    p = Path(folder)
    p.mkdir(parents=True, exist_ok=True)
    lock = p / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    fd = None
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text())
                pid, host = int(holder["pid"]), str(holder["host"])
            except (OSError, ValueError, KeyError, TypeError):
                holder, pid, host = {}, -1, ""
            if host == me["host"] and pid > 0 and not pid_alive(pid):
                lock.unlink(missing_ok=True)  # its run was killed: the folder is free
                continue
            if not holder:  # being written this instant, or damaged
                time.sleep(0.2)
                continue
            raise ConfigError(f"{flag} {folder} is being written by another vitq run (pid {pid} on {host}, since "
                              f"{holder.get('since', '?')}): wait for it to finish, or choose another folder (a lock left "
                              f"by a run that crashed on another machine: delete {lock})") from None
    if fd is None:
        raise ConfigError(f"{flag} {folder}: its lock {lock} cannot be taken (unreadable): delete it if no vitq run is "
                          "writing the folder")
    with os.fdopen(fd, "w") as f:
        json.dump(me, f)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


__all__ = ["LOCK_FILE", "check_output_dir", "folder_lock", "check_output_file", "first_existing", "write_json", "write_text"]
