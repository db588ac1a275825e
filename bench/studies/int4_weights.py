#!/usr/bin/env python
"""4-bit weights stored in 4 bits: is the W4A8 ONNX file smaller *and* as fast? (issue 43, item 4)

vitq's W4A8 file stores each 4-bit weight code as an ONNX ``INT4`` / ``UINT4`` initializer widened by a ``Cast``
to the 8-bit container its ``DequantizeLinear`` reads (since 2026-12-06); onnxruntime and OpenVINO fold the Cast
at load time and fuse the rest with the 8-bit activations' Q / DQ into their integer kernels. This study compares
that file with the same codes in 8-bit containers (the file before), with those codes read by an ``UINT4``
``DequantizeLinear`` directly (opset 21; what the first try did), and with the float file: in one process per
file and runtime, interleaved, the file size, the ops onnxruntime runs after its fusions, the largest output
difference, and images/s at batch 1 and 32 (1 thread), in onnxruntime and in OpenVINO.

    python -m bench.studies.int4_weights            # fmnist-vit repq W4A8 --target onnx

Writes ``bench/results/int4_weights.md`` / ``.json``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import RESULTS, machine_line, machine_meta, md_table, write_md


def widen(src: Path, dst: Path) -> int:
    """``src`` with every 4-bit weight initializer and its widening ``Cast`` replaced by the 8-bit container the
    Cast makes (the file vitq wrote before 2026-12-06); returns how many."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    p = onnx.load(str(src))
    inits = {i.name: i for i in p.graph.initializer}
    casts = [n for n in p.graph.node if n.op_type == "Cast" and n.input[0] in inits]
    for n in casts:
        to = next(a.i for a in n.attribute if a.name == "to")
        a = numpy_helper.to_array(inits[n.input[0]]).astype(helper.tensor_dtype_to_np_dtype(to))
        p.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(a), n.output[0]))
        p.graph.node.remove(n)
    keep = {i for n in p.graph.node for i in n.input}
    live = [i for i in p.graph.initializer if i.name in keep]
    del p.graph.initializer[:]
    p.graph.initializer.extend(live)
    onnx.save(p, str(dst))
    return len(casts)


def deit_sizes() -> dict[str, int]:
    """File bytes at DeiT-S scale (timm deit_small_patch16_224, random weights; minmax, calibration only on 8 random
    images: the size does not depend on the ranges): the float file and W8A8 / W4A8 files as vitq writes them."""
    import timm
    import torch

    import vitq
    from vitq.export.deploy import export_float

    torch.manual_seed(0)
    model = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    calib = torch.randn(8, 3, 224, 224)
    out = {}
    with tempfile.TemporaryDirectory() as d:
        out["float32"] = export_float(model, Path(d) / "fp")["bytes"]
        for bits in ("W8A8", "W4A8"):
            q = vitq.quantize(copy.deepcopy(model), "minmax", bits, calib_data=calib)
            out[bits] = vitq.export(q, Path(d) / bits, "onnx")["bytes"]
    return out


def to_uint4(src: Path, dst: Path) -> int:
    """``src`` with every weight code initializer that fits 4 bits (uint8 codes 0..15 as UINT4, int8 codes -8..7 as
    INT4) and its zero point rewritten in 4 bits, read by the ``DequantizeLinear`` directly; returns how many."""
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
        for dt, lo, hi, four in ((np.uint8, 0, 15, ml_dtypes.uint4), (np.int8, -8, 7, ml_dtypes.int4)):
            if a.dtype == dt and lo <= a.min() and a.max() <= hi and lo <= zz.min() and zz.max() <= hi:
                inits[q].CopyFrom(numpy_helper.from_array(a.astype(four), q))
                inits[z].CopyFrom(numpy_helper.from_array(zz.astype(four), z))
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

WORKER_OV = r"""
import json, sys, time, numpy as np, openvino as ov
path = sys.argv[1]
core = ov.Core()
m = core.compile_model(core.read_model(path), "CPU", {"INFERENCE_NUM_THREADS": 1})
x = np.random.default_rng(0).standard_normal((32, 1, 28, 28)).astype(np.float32)
req = m.create_infer_request()
np.save(path + ".ov.npy", req.infer({0: x})[0])
speed = {}
for bs in (1, 32):
    xb = x[:bs]
    for _ in range(3):
        req.infer({0: xb})
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < 3.0:
        req.infer({0: xb}); n += 1
    speed[bs] = n * bs / (time.perf_counter() - t0)
print(json.dumps({"speed": speed, "precision": str(m.get_property("INFERENCE_PRECISION_HINT"))}))
"""


def measure(path: Path, tmp: Path, runtime: str = "onnxruntime") -> dict[str, Any]:
    cmd = [sys.executable, "-c", WORKER, str(path), str(tmp / (path.stem + ".opt.onnx"))] if runtime == "onnxruntime" \
        else [sys.executable, "-c", WORKER_OV, str(path)]
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="fmnist-vit")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds per file")
    ap.add_argument("--no-deit", action="store_true", help="skip the file sizes at DeiT-S scale")
    args = ap.parse_args()
    deit = {} if args.no_deit else deit_sizes()
    import numpy as np

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        run = tmp / "run"
        subprocess.run([sys.executable, "-m", "vitq", "quantize", args.model, "--recipe", "repq", "--bits", "W4A8",
                        "--target", "onnx", "--out", str(run), "--eval-size", "500", "--skip-fp", "--no-progress"],
                       check=True, capture_output=True, text=True)
        subprocess.run([sys.executable, "-m", "vitq", "export", str(run), "--format", "onnx", "--no-progress"],
                       check=True, capture_output=True, text=True)
        now = run / "model.onnx"
        u8 = tmp / "model_8bit.onnx"
        n4 = widen(now, u8)
        u4 = tmp / "model_uint4.onnx"
        nu4 = to_uint4(u8, u4)
        fp = tmp / "float"
        subprocess.run([sys.executable, "-m", "vitq", "export", args.model, "--format", "onnx", "--out", str(fp),
                        "--no-progress"], check=True, capture_output=True, text=True)
        files = {"float32": fp / "model.onnx", "W4A8, 8-bit containers (before)": u8,
                 "W4A8, INT4 + Cast (vitq now)": now, "W4A8, 4-bit DequantizeLinear": u4}
        runtimes = ["onnxruntime"] + (["openvino"] if importlib.util.find_spec("openvino") else [])
        res: dict[str, dict[str, Any]] = {k: {"bytes": p.stat().st_size, "speed": {(rt, b): [] for rt in runtimes
                                                                                  for b in (1, 32)}}
                                          for k, p in files.items()}
        for _ in range(args.rounds):
            for k, p in files.items():
                for rt in runtimes:
                    m = measure(p, tmp, rt)
                    if rt == "onnxruntime":
                        res[k]["ops"] = m["ops"]
                    for bs, v in m["speed"].items():
                        res[k]["speed"][(rt, int(bs))].append(v)
        ref = np.load(str(u8) + ".out.npy")
        for k, p in files.items():
            res[k]["max_diff_vs_8bit_file"] = float(np.abs(np.load(str(p) + ".out.npy") - ref).max())
            if "openvino" in runtimes:
                res[k]["ov_max_diff_vs_8bit_file"] = float(np.abs(np.load(str(p) + ".ov.npy")
                                                                  - np.load(str(u8) + ".ov.npy")).max())
    meta = {**machine_meta(), "threads": 1, "model": args.model, "int4_weights": n4, "uint4_dq_weights": nu4,
            "deit_s_bytes": deit}
    rows = []
    for k, r in res.items():
        sp = [f"{max(r['speed'][(rt, b)]):.0f}" for rt in runtimes for b in (1, 32)]
        rows.append([k, f"{r['bytes'] / 1e3:.0f}", f"{r['bytes'] / res['float32']['bytes']:.2f}", *sp,
                     f"{r['max_diff_vs_8bit_file']:.3g}", ", ".join(f"{v} {op}" for op, v in list(r["ops"].items())[:4])])
    heads = [f"{'ORT' if rt == 'onnxruntime' else 'OV'} img/s b{b}" for rt in runtimes for b in (1, 32)]
    lines = [f"# 4-bit weights in ONNX files: size and speed ({args.model}, repq W4A8 --target onnx)", "",
             "The same quantized model four ways: the float baseline (`vitq export MODEL --format onnx`); its weight codes "
             "in 8-bit containers (vitq's file before 2026-12-06); as INT4 initializers widened by a `Cast` (vitq's file "
             f"now, {n4} weights); and the 8-bit file's codes rewritten as `INT4` / `UINT4` read by `DequantizeLinear` "
             f"directly ({nu4} weights; the first try). onnxruntime and OpenVINO (its default inference precision), one thread, each "
             f"file and runtime in its own process, {args.rounds} interleaved rounds (best shown); max diff: largest "
             "|output difference| in onnxruntime against the 8-bit file on 32 random images"
             + (" (OpenVINO: " + ", ".join(f"{r.get('ov_max_diff_vs_8bit_file', 0):.3g}" for r in res.values()) + ")"
                if "openvino" in runtimes else "") + ". Other processes on the host are not controlled (this run: two single-threaded benches "
             "on the 2 cores beside it): compare the rows of one page only.", "", machine_line(meta), "",
             *md_table(["file", "KB", "x FP32", *heads, "max diff", "ops after fusion (top 4)"], rows,
                       align="lrr" + "r" * len(heads) + "rl")]
    if deit:
        lines += ["", "At DeiT-S scale (timm `deit_small_patch16_224`, random weights, minmax, as `vitq export` writes "
                  "it; the float parts - LayerNorms, biases, position embedding, scales - weigh more in the small "
                  "reference model):", "",
                  *md_table(["file", "MB", "x FP32"], [[k, f"{v / 1e6:.2f}", f"{v / deit['float32']:.3f}"]
                                                     for k, v in deit.items()], align="lrr")]
    write_md(RESULTS / "int4_weights.md", lines, echo=True)
    (RESULTS / "int4_weights.json").write_text(json.dumps(
        {"meta": meta, "rows": {k: {**r, "speed": {f"{rt} b{b}": v for (rt, b), v in r["speed"].items()}}
                                for k, r in res.items()}}, indent=1) + "\n")


if __name__ == "__main__":
    main()
