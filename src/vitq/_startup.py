"""Ctrl-C while ``vitq`` (the command) starts: importing torch, timm and transformers takes seconds, and an
interrupt there surfaced as a 40-line traceback from inside an import. While the package is imported by the
command line (the ``vitq`` console script or ``python -m vitq``), SIGINT prints one line and exits 130; the
previous handler is restored as soon as the imports are done, so ``vitq.cli.main`` handles Ctrl-C as usual and a
program that imports vitq as a library is never touched."""

from __future__ import annotations

import os
import signal
import sys
from typing import Any, Optional


def _is_cli() -> bool:
    argv0 = sys.argv[0] if sys.argv else ""
    name, parent = os.path.basename(argv0), os.path.basename(os.path.dirname(argv0))
    return name in ("vitq", "vitq.exe") or (name == "__main__.py" and parent == "vitq")


def _interrupted(signum: int, frame: Any) -> None:
    # nothing is written yet; an exception raised here can be swallowed by a library's import-time ``except
    # BaseException`` (then the command ran on, exit 0): leave at once
    print("vitq: interrupted", file=sys.stderr, flush=True)
    os._exit(130)


def begin() -> Optional[Any]:
    """Install the start-up handler when running as the command; returns what to restore (None: nothing done)."""
    if not _is_cli():
        return None
    try:
        return signal.signal(signal.SIGINT, _interrupted)
    except ValueError:  # not the main thread
        return None


def end(previous: Optional[Any]) -> None:
    if previous is not None:
        signal.signal(signal.SIGINT, previous)
