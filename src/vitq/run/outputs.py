"""Outputs of a run: every path is checked before any work (made, test-written), JSON is written whole."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Optional

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


__all__ = ["check_output_dir", "check_output_file", "first_existing", "write_json", "write_text"]
