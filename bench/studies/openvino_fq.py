"""Does OpenVINO run vitq's W8A8 file as fast as NNCF's INT8 model when the activations' quantizers reach it as
FakeQuantize nodes? (issue 43, item 3)

OpenVINO's ONNX frontend turns each of vitq's activation QuantizeLinear -> DequantizeLinear pairs into a FakeQuantize
with an integer output followed by Convert / Subtract / Multiply; NNCF's model has FakeQuantize nodes with float
outputs feeding the MatMuls directly (bench/results/openvino_profile.md). This study rewrites the pairs of
``bench/deploy.py``'s DeiT-S ``vitq best W8A8`` file into OpenVINO FakeQuantize nodes (ONNX domain
``org.openvinotoolkit``, 256 levels over the pair's code range: the same grid; only ties may round the other way),
leaves the weights' DequantizeLinear as they are, checks the outputs against the file as written (f32 inference)
and times both beside NNCF's INT8 model (OpenVINO's default threads, interleaved rounds, each file in its own
process). A prototype for an OpenVINO export form, not what ``vitq export`` writes.

    .venv/bin/python -m bench.studies.openvino_fq          # after python -m bench.deploy --models deit-s
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np

from bench.common import RESULTS, machine_line, machine_meta, md_table, write_md
from bench.studies.openvino_attention import run

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "bench" / "cache" / "deploy" / "deit-s"
OUT = RESULTS / "openvino_fq"


def rewrite(src: Path, dst: Path) -> int:
    """Activation QuantizeLinear -> DequantizeLinear pairs (per-tensor, the Q's only consumer the DQ) -> one
    FakeQuantize each; returns how many."""
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.load(str(src))
    g = m.graph
    vals = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    vals.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in g.node if n.op_type == "Constant"})
    users: dict[str, list[Any]] = {}
    for n in g.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    replace: dict[int, Any] = {}
    drop: set[int] = set()
    for n in g.node:
        us = users.get(n.output[0], []) if n.op_type == "QuantizeLinear" else []
        if len(us) != 1 or us[0].op_type != "DequantizeLinear":
            continue
        s = vals.get(n.input[1])
        z = vals.get(n.input[2]) if len(n.input) > 2 else None
        if s is None or s.size != 1 or (z is not None and z.size != 1):
            continue
        qmin, qmax = (-128, 127) if z is not None and z.dtype == np.int8 else (0, 255)
        zf = 0.0 if z is None else float(z.reshape(-1)[0])
        k = len(replace)
        lo, hi = f"vitq_fq{k}_lo", f"vitq_fq{k}_hi"
        g.initializer.extend([numpy_helper.from_array(np.array((qmin - zf) * float(s.reshape(-1)[0]), np.float32), lo),
                              numpy_helper.from_array(np.array((qmax - zf) * float(s.reshape(-1)[0]), np.float32), hi)])
        replace[id(us[0])] = helper.make_node("FakeQuantize", [n.input[0], lo, hi, lo, hi], [us[0].output[0]],
                                              domain="org.openvinotoolkit", levels=256, name=f"vitq_fq{k}")
        drop.add(id(n))
    nodes = [replace.get(id(n), n) for n in g.node if id(n) not in drop]
    del g.node[:]
    g.node.extend(nodes)
    m.opset_import.append(helper.make_opsetid("org.openvinotoolkit", 1))
    onnx.save(m, str(dst))
    return len(replace)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--note", default=None)
    args = ap.parse_args(argv)
    import openvino as ov

    src = DEPLOY / "vitq_best_W8A8" / "model.onnx"
    if not src.is_file():
        raise SystemExit(f"{src} is missing: run python -m bench.deploy --models deit-s first")
    dst = DEPLOY / "vitq_best_W8A8_fq.onnx"
    pairs = rewrite(src, dst)
    core = ov.Core()
    x = np.random.default_rng(0).standard_normal((8, 3, 224, 224)).astype(np.float32)
    a = core.compile_model(str(src), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(x)[0]
    b = core.compile_model(str(dst), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(x)[0]
    parity = {"max_abs_diff": float(np.abs(a - b).max()), "largest_output": float(np.abs(a).max()),
              "argmax_agree": float((a.argmax(-1) == b.argmax(-1)).mean())}
    files = {"NNCF INT8": DEPLOY / "nncf_int8.xml", "vitq best W8A8 (QDQ, as written)": src,
             "vitq best W8A8, activations as FakeQuantize": dst}
    speed: dict[str, dict[str, list[float]]] = {k: {"1": [], "8": []} for k in files}
    for _ in range(args.rounds):
        for k, p in files.items():
            for bs, v in run(p, "speed").items():
                speed[k][bs].append(v)
    meta = {**machine_meta(), **({"note": args.note} if args.note else {})}
    rows = [[k, f"{max(v['1']):.1f}", f"{max(v['8']):.1f}",
             f"{max(v['1']) / max(speed['NNCF INT8']['1']):.2f}x / {max(v['8']) / max(speed['NNCF INT8']['8']):.2f}x"]
            for k, v in speed.items()]
    lines = ["# OpenVINO: vitq's activation quantizers as FakeQuantize nodes (DeiT-S, W8A8)", "",
             __doc__.split("\n\n")[1].replace("\n", " "), "", machine_line(meta) + "; OpenVINO " +
             ov.__version__.split("-")[0] + ", its default threads", "",
             f"{pairs} activation pairs rewritten. Outputs against the file as written (8 random images, f32 "
             f"inference): max |diff| {parity['max_abs_diff']:.3g} of a largest output {parity['largest_output']:.3g}, "
             f"top-1 agree {parity['argmax_agree']:.0%}.", "",
             *md_table(["file", "img/s b1", "img/s b8", "vs NNCF b1 / b8"], rows, align="lrrr"),
             *(["", f"Note: {meta['note']}"] if meta.get("note") else [])]
    write_md(OUT.with_suffix(".md"), lines)
    OUT.with_suffix(".json").write_text(json.dumps({"meta": meta, "pairs": pairs, "parity": parity, "speed": speed},
                                                   indent=1) + "\n")
    print(f"wrote {OUT}.{{md,json}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
