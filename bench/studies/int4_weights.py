#!/usr/bin/env python
"""Would 4-bit weight containers make a W4A8 ONNX file smaller *and* as fast? (issue 43, item 4)

vitq's W4A8 file stores each 4-bit weight code in an 8-bit container with a ``DequantizeLinear``; onnxruntime
fuses those with the 8-bit activations' Q / DQ into integer kernels (``MatMulIntegerToFloat``). This study
rewrites the same file's weight codes (and zero points) as ONNX ``UINT4`` tensors (opset 21; the codes and the
dequantized values are unchanged) and measures, in one process per file and interleaved, the file size, the ops
onnxruntime runs after its fusions, the largest output difference, and images/s at batch 1 and 32 (1 thread).

    python -m bench.studies.int4_weights            # fmnist-vit repq W4A8 --target onnx

Writes ``bench/results/int4_weights.md`` / ``.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import RESULTS, machine_line, machine_meta, md_table, write_md


def to_uint4(src: Path, dst: Path) -> int:
    """``src`` with every weight code initializer of values 0..15 (and its zero point) as UINT4; returns how many."""
    import ml_dtypes
    import numpy as np
    import onnx
    from onnx import numpy_helper

    p = onnx.load(str(src))
    inits = {i.name: i for i in p.graph.initializer}
    n = 0
    for node in p.graph.node:
        if node.op_type != "DequantizeLinear" or not node.input[0].endswith("_quantized"):
            continue
        q, _, z = node.input
        a, zz = numpy_helper.to_array(inits[q]), numpy_helper.to_array(inits[z])
        if a.dtype == np.uint8 and a.max() <= 15 and zz.max() <= 15:
            inits[q].CopyFrom(numpy_helper.from_array(a.astype(ml_dtypes.uint4), q))
            inits[z].CopyFrom(numpy_helper.from_array(zz.astype(ml_dtypes.uint4), z))
            n += 1
    onnx.save(p, str(dst))
    return n


WORKER = r"""
import json, sys, time, numpy as np, onnx, onnxruntime as ort
from collections import Counter
path, opt = sys.argv[1], sys.argv[2]
so = ort.SessionOptions(); so.intra_op_num_threads = 1; so.log_severity_level = 3
so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
so.optimized_model_filepath = opt
s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
ops = Counter(n.op_type for n in onnx.load(opt).graph.node)
x = np.random.default_rng(0).standard_normal((32, 1, 28, 28)).astype(np.float32)
out = s.run(None, {"pixel_values": x})[0]
np.save(path + ".out.npy", out)
speed = {}
for bs in (1, 32):
    xb = x[:bs]
    for _ in range(3):
        s.run(None, {"pixel_values": xb})
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < 3.0:
        s.run(None, {"pixel_values": xb}); n += 1
    speed[bs] = n * bs / (time.perf_counter() - t0)
print(json.dumps({"ops": dict(ops.most_common(8)), "speed": speed}))
"""


def measure(path: Path, tmp: Path) -> dict[str, Any]:
    r = subprocess.run([sys.executable, "-c", WORKER, str(path), str(tmp / (path.stem + ".opt.onnx"))],
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="fmnist-vit")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds per file")
    args = ap.parse_args()
    import numpy as np

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        run = tmp / "run"
        subprocess.run([sys.executable, "-m", "vitq", "quantize", args.model, "--recipe", "repq", "--bits", "W4A8",
                        "--target", "onnx", "--out", str(run), "--eval-size", "500", "--skip-fp", "--no-progress"],
                       check=True, capture_output=True, text=True)
        subprocess.run([sys.executable, "-m", "vitq", "export", str(run), "--format", "onnx", "--no-progress"],
                       check=True, capture_output=True, text=True)
        u8 = run / "model.onnx"
        u4 = tmp / "model_uint4.onnx"
        n4 = to_uint4(u8, u4)
        fp = tmp / "float"
        subprocess.run([sys.executable, "-m", "vitq", "export", args.model, "--format", "onnx", "--out", str(fp),
                        "--no-progress"], check=True, capture_output=True, text=True)
        files = {"float32": fp / "model.onnx", "W4A8, uint8 containers (vitq now)": u8,
                 "W4A8, UINT4 weights": u4}
        res: dict[str, dict[str, Any]] = {k: {"bytes": p.stat().st_size, "speed": {1: [], 32: []}} for k, p in files.items()}
        for _ in range(args.rounds):
            for k, p in files.items():
                m = measure(p, tmp)
                res[k]["ops"] = m["ops"]
                for bs, v in m["speed"].items():
                    res[k]["speed"][int(bs)].append(v)
        ref = np.load(str(u8) + ".out.npy")
        for k, p in files.items():
            res[k]["max_diff_vs_uint8_file"] = float(np.abs(np.load(str(p) + ".out.npy") - ref).max())
    meta = {**machine_meta(), "threads": 1, "model": args.model, "uint4_weights": n4}
    rows = []
    for k, r in res.items():
        rows.append([k, f"{r['bytes'] / 1e3:.0f}", f"{r['bytes'] / res['float32']['bytes']:.2f}",
                     f"{max(r['speed'][1]):.0f}", f"{max(r['speed'][32]):.0f}", f"{r['max_diff_vs_uint8_file']:.3g}",
                     ", ".join(f"{v} {op}" for op, v in list(r["ops"].items())[:4])])
    lines = [f"# 4-bit weight containers in ONNX: size and speed ({args.model}, repq W4A8 --target onnx)", "",
             "The same quantized model three ways: the float baseline (`vitq export MODEL --format onnx`), vitq's file "
             "(4-bit codes in 8-bit containers), and that file with its weight codes and zero points rewritten as ONNX "
             f"UINT4 ({n4} weights; codes unchanged). onnxruntime, one thread, each file in its own process, "
             f"{args.rounds} interleaved rounds (best shown); max diff: largest |output difference| against vitq's "
             "file on 32 random images. Other processes on the host are not controlled: compare the rows of one page only "
             "(this one ran beside one single-threaded benchmark on the other core).", "", machine_line(meta), "",
             *md_table(["file", "KB", "x FP32", "img/s b1", "img/s b32", "max diff", "ops after fusion (top 4)"], rows,
                       align="lrrrrrl")]
    write_md(RESULTS / "int4_weights.md", lines, echo=True)
    (RESULTS / "int4_weights.json").write_text(json.dumps({"meta": meta, "rows": res}, indent=1) + "\n")


if __name__ == "__main__":
    main()
