"""``--resume-dir``: a resumable run keeps the spec that decides what its reconstruction computes
(:data:`RESUME_FIELDS`; file arguments by path + size + modification time, recipe files by content) in
``vitq-args.json``; once the folder holds saved state, a run of another spec is refused before anything is
loaded, naming what differs (the reconstruction's own fingerprint would notice only after calibration)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..checkpoints import read_record
from ..errors import ConfigError
from .spec import RunSpec

#: the spec fields that decide what a reconstruction computes (not where output goes, nor how it is shown)
RESUME_FIELDS = ("model", "checkpoint", "random_weights", "num_classes", "data", "input_size", "crop_pct", "interpolation",
                 "batch_size", "seeds", "recipe", "bits", "calib_size", "calib_data", "exclude", "options", "target",
                 "export", "budget", "budget_mb", "sensitivity_size")
#: pass options that say where state goes or how much memory it may use, not what it computes
NOT_DECIDING = ("run_dir", "max_cache_gb")
RESUME_RECORD = "vitq-args.json"
FLAGS = {"model": "MODEL", "seeds": "--seed", "options": "--set"}


def file_identity(path: str) -> Any:
    """A file argument as the resume record keeps it: resolved path, size and modification time (a recipe
    file: its content), so a replaced file is noticed; other values as given."""
    p = Path(path)
    if not p.is_file():
        return path
    if p.suffix in (".yaml", ".yml"):
        return {"path": str(p.resolve()), "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
    st = p.stat()
    return {"path": str(p.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def fingerprint(spec: RunSpec) -> dict[str, Any]:
    d = spec.to_dict()
    here = {k: d[k] for k in RESUME_FIELDS}
    here["options"] = {k: v for k, v in dict(spec.options).items() if k not in NOT_DECIDING}
    for k in ("model", "checkpoint", "recipe", "data", "calib_data"):
        if isinstance(here[k], str):
            here[k] = file_identity(here[k])
    return json.loads(json.dumps(here, default=str))


def check_resume(spec: RunSpec, folder: str) -> None:
    """Record ``spec`` in ``folder`` (a resume folder without saved state), or refuse it when the folder holds
    the state of a run of another spec."""
    here = fingerprint(spec)
    rec = Path(folder) / RESUME_RECORD
    holds_state = any(p.name != RESUME_RECORD and not p.name.endswith(".tmp") for p in rec.parent.iterdir())
    if rec.is_file() and holds_state:  # without saved state there is nothing to mix up: the record is rewritten
        old = read_record(rec, "delete that --resume-dir folder to start over, or pass another --resume-dir")
        diff = [k for k in RESUME_FIELDS if old.get(k) != here[k]]
        if diff:
            shown = ", ".join(_describe(k, old.get(k), here[k]) for k in diff[:3])
            raise ConfigError(f"--resume-dir {folder} holds a run made with {shown}: rerun with its arguments to resume, "
                              "or pass another --resume-dir")
        return
    tmp = rec.with_name(rec.name + ".tmp")
    tmp.write_text(json.dumps(here, indent=1) + "\n")
    tmp.replace(rec)


def _describe(key: str, old: Any, new: Any) -> str:
    flag = FLAGS.get(key, f"--{key.replace('_', '-')}")
    if isinstance(old, dict) and isinstance(new, dict) and old.get("path") and old.get("path") == new.get("path"):
        return f"{flag} {old.get('path')} as it was then (the file has changed since)"
    return f"{flag} {_shown(old)} (now {_shown(new)})"


def _shown(v: Any) -> str:
    if isinstance(v, dict):
        if "path" in v:
            return str(v["path"])
        return " ".join(f"{k}={x}" for k, x in v.items()) or "(none)"
    if isinstance(v, list):
        return " ".join(map(str, v)) or "(none)"
    return "(none)" if v is None else str(v)


__all__ = ["RESUME_FIELDS", "RESUME_RECORD", "check_resume", "file_identity", "fingerprint"]
