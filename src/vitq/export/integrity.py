"""Integrity of an export folder: the sha256 of each tensor file and of the configuration, recorded
in ``vitq.json`` when the folder is written and checked before anything is loaded from it.

A flipped byte in a quantizer scale, or an edited ``"bits"`` in ``vitq.json``, otherwise loads a model
that silently computes something else; with the seal it is a one-line refusal naming the file. The
seal detects damage and edits, not an adversary (who could recompute it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

from .._os import pid_alive
from ..checkpoints import file_sha256
from ..errors import ModelError

KEY = "integrity"


def config_digest(meta: dict[str, Any]) -> str:
    """sha256 of the configuration: every field of ``vitq.json`` but the seal, in canonical JSON."""
    body = {k: v for k, v in meta.items() if k != KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def seal(meta: dict[str, Any], folder: "str | Path", files: Sequence[str]) -> dict[str, Any]:
    """``meta`` with its seal: the digest of each of ``files`` (in ``folder``) and of the configuration."""
    p = Path(folder)
    return {**meta, KEY: {"algorithm": "sha256", "files": {f: file_sha256(p / f) for f in files},
                          "config": config_digest(meta)}}


def check(meta: dict[str, Any], folder: "str | Path") -> None:
    """Refuse (one line, naming the file) an export whose files or configuration differ from its seal."""
    p = Path(folder)
    rec = meta.get(KEY)
    if not isinstance(rec, dict) or not isinstance(rec.get("files"), dict):
        raise ModelError(f"{p / 'vitq.json'} has no integrity record (written by an older vitq, or edited): "
                         "export the model again")
    if rec.get("config") != config_digest(meta):
        raise ModelError(f"{p / 'vitq.json'} differs from the configuration it was exported with (edited or "
                         "damaged): export the model again rather than editing the file")
    for name in rec["files"]:  # every entry a plain file name of the folder, before anything is opened
        if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name \
                or Path(name).is_absolute():
            raise ModelError(f"{p / 'vitq.json'} lists {name!r} among its files, which is not a file name inside the "
                             "export (edited or crafted): export the model again")
    for name, digest in rec["files"].items():
        f = p / name
        if not f.is_file():
            raise ModelError(f"{f} is missing from the export: copy the whole folder, or export the model again")
        if file_sha256(f) != digest:
            raise ModelError(f"{f} does not match the digest recorded in vitq.json (changed or damaged): export the "
                             "model again, or copy the folder again")


def read_meta(folder: "str | Path") -> dict[str, Any]:
    """``vitq.json`` of an export folder, or a one-line error for a truncated or malformed one."""
    f = Path(folder) / "vitq.json"
    try:
        meta = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{f} is not readable JSON ({type(e).__name__}: truncated or damaged): export the model "
                         "again") from None
    if not isinstance(meta, dict):
        raise ModelError(f"{f} is not a vitq export configuration (not a JSON object): export the model again")
    for key in ("format", "source", "recipe", "bits"):
        if key not in meta:
            raise ModelError(f"{f} has no {key!r}: it is not a complete vitq export, export the model again")
    return meta


#: the hidden folder inside an export that a write stages its files in (same filesystem: the renames are atomic)
STAGING = ".vitq-staging-"


def begin_write(folder: "str | Path") -> Path:
    """Start (re)writing an export in ``folder``; returns the staging folder to write its files into (a hidden
    folder inside ``folder``). Nothing in ``folder`` changes until :func:`finish_write`: an export interrupted while
    its files are written leaves the previous export as it was (and a staging folder the next write removes)."""
    p = Path(folder)
    p.mkdir(parents=True, exist_ok=True)
    for old in p.glob(STAGING + "*"):  # left by a write that was killed; another process's live one is kept
        pid = old.name[len(STAGING):]
        if not pid.isdigit() or int(pid) == os.getpid() or not pid_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    stage = p / f"{STAGING}{os.getpid()}"
    stage.mkdir()
    return stage


def finish_write(stage: Path, meta: dict[str, Any], files: Sequence[str]) -> Path:
    """Seal ``meta`` over the staged ``files`` and move them into the export folder: its ``vitq.json`` - the
    completion marker - is removed first and written last (whole, by a rename), so only an interruption between the
    two reads as "incomplete", and never as the previous export's configuration over new files. Returns the folder."""
    folder = stage.parent
    sealed = seal(meta, stage, files)
    (folder / "vitq.json").unlink(missing_ok=True)
    for f in files:
        os.replace(stage / f, folder / f)
    tmp = stage / "vitq.json"
    tmp.write_text(json.dumps(sealed, indent=2) + "\n")
    os.replace(tmp, folder / "vitq.json")
    shutil.rmtree(stage, ignore_errors=True)
    return folder
