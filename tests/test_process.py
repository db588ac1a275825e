"""The CLI as a process: Ctrl-C ends it cleanly, and the same seed gives byte-identical weights whatever
the number of threads."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _cli(*args: str, threads: int = 1) -> list[str]:
    return [sys.executable, "-c", f"import torch, sys; torch.set_num_threads({threads}); from vitq.cli import main; "
            "sys.exit(main(sys.argv[1:]))", *args]


def _env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": SRC}


def test_sigint_ends_with_one_line_and_exit_130(tmp_path: Path, fmnist_dir: Path, pickled_vit: Path) -> None:
    resume = tmp_path / "resume"
    cmd = _cli("quantize", str(pickled_vit), "--trust-pickle", "--data", f"fashion-mnist:{fmnist_dir}", "--no-progress",
               "--recipe", "qdrop", "--bits", "W4A4", "--calib-size", "16", "--eval-size", "8", "--skip-fp",
               "--iters", "100000", "--resume-dir", str(resume))
    # the child starts with SIGINT at its default: a child inherits an ignored SIGINT (a pytest-xdist worker's, once
    # some earlier test in it ignored the signal), and Python then never raises KeyboardInterrupt, as in a shell's
    # background job
    proc = subprocess.Popen(cmd, env=_env(1), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    t0 = time.time()
    while not list(resume.glob("*/run.json")) and proc.poll() is None and time.time() - t0 < 120:
        time.sleep(0.02)  # the reconstruction has started once its run record exists
    assert proc.poll() is None, f"the run ended before it could be interrupted: {proc.stderr.read()[-500:]}"
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == "vitq: interrupted", err[-2000:]
    assert "Traceback" not in err, err[-2000:]


def test_same_seed_gives_identical_weights_with_1_and_2_threads(tmp_path: Path, fmnist_dir: Path,
                                                                pickled_vit: Path) -> None:
    digests = {}
    for run, threads in (("a", 1), ("b", 1), ("c", 2)):
        out = tmp_path / run
        done = subprocess.run(_cli("quantize", str(pickled_vit), "--trust-pickle", "--data", f"fashion-mnist:{fmnist_dir}",
                                   "--no-progress", "--recipe", "qdrop", "--bits", "W4A4", "--calib-size", "16",
                                   "--eval-size", "8", "--skip-fp", "--iters", "5", "--seed", "1", "--out", str(out),
                                   threads=threads),
                              env=_env(threads), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        digests[run] = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    assert digests["a"] == digests["b"], "two runs with the same seed saved different weights"
    assert digests["a"] == digests["c"], "1 and 2 threads saved different weights"
