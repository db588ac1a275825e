"""How much each step of vitq's OpenVINO form buys against NNCF's INT8 model (issue 43, item 3)

OpenVINO's ONNX frontend turns each of vitq's activation QuantizeLinear -> DequantizeLinear pairs into a FakeQuantize
with an integer output followed by Convert / Subtract / Multiply, which its transformations fuse into the next
kernel only in some places (bench/results/openvino_profile.md). ``vitq export --format openvino`` rewrites the graph
in three steps (``vitq.export.ov_graph``): (1) every pair becomes one FakeQuantize with a float output (NNCF's form);
(2) the q / k / v quantizers of each fused qkv projection become one per-channel FakeQuantize on its output, fused
into the projection's INT8 matmul; (3) quantizers that read a Reshape / Transpose / Gather move above it, onto the op
that computes the values. Weights of at most 7 bits are stored as ``code - zero point`` in int8 (OpenVINO's INT8
MatMul takes weights without a zero point). This study writes ``bench/deploy.py``'s DeiT-S ``vitq best W8A8`` file after each step as
OpenVINO IR, counts the FakeQuantize nodes OpenVINO's compiled graph still runs alone, checks the outputs against
the file as written (f32 inference) and times every file beside NNCF's INT8 model (one thread, interleaved rounds,
each file in its own process); and the W4A8 form beside the same model with its 4-bit weights kept as 4-bit codes
and zero points.

    .venv/bin/python -m bench.studies.openvino_fq          # after python -m bench.deploy --models deit-s
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from bench.common import RESULTS, machine_line, machine_meta, md_table, write_md
from bench.studies.openvino_attention import run

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "bench" / "cache" / "deploy" / "deit-s"
OUT = RESULTS / "openvino_fq"


STEPS = (("QDQ pairs as written (ONNX)", ()), ("1: pairs as FakeQuantize", ("pairs",)),
         ("1 + 2: q / k / v merged", ("pairs", "merge")), ("1 + 2 + 3: the OpenVINO form", ("pairs", "merge", "hoist")))


def write(src: Path, dst: Path, steps: tuple[str, ...]) -> dict[str, int]:
    """``src`` after ``steps`` as OpenVINO IR at ``dst``; how many places each step changed."""
    import onnx
    import openvino as ov

    from vitq.export.ov_graph import fake_quantize_pairs, hoist_fake_quantize, merge_split_fake_quantize

    m = onnx.load(str(src))
    done = {}
    for name, fn in (("pairs", fake_quantize_pairs), ("merge", merge_split_fake_quantize), ("hoist", hoist_fake_quantize)):
        if name in steps:
            done[name] = fn(m)
    tmp = dst.with_suffix(".onnx")
    onnx.save(m, str(tmp))
    ov.save_model(ov.convert_model(str(tmp)), str(dst), compress_to_fp16=False)
    tmp.unlink()
    return done


def four_bit(src: Path, dst: Path) -> None:
    """The W4A8 ONNX file with its 4-bit weight codes read by DequantizeLinear as INT4 / UINT4 (no widening Cast:
    OpenVINO keeps 4-bit constants, with their zero points), in the OpenVINO form, as IR: the alternative to the
    form's centered int8 weights."""
    import ml_dtypes
    import onnx
    import openvino as ov
    from onnx import TensorProto, numpy_helper

    from vitq.export.ov_graph import openvino_form

    m = onnx.load(str(src))
    g = m.graph
    inits = {i.name: i for i in g.initializer}
    casts = {n.output[0]: n for n in g.node if n.op_type == "Cast" and n.input[0] in inits}
    for n in g.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in casts:
            codes = inits[casts[n.input[0]].input[0]]
            four = ml_dtypes.int4 if codes.data_type == TensorProto.INT4 else ml_dtypes.uint4
            g.initializer.append(numpy_helper.from_array(numpy_helper.to_array(inits[n.input[2]]).astype(four),
                                                         n.input[2] + "_4bit"))
            n.input[0], n.input[2] = codes.name, n.input[2] + "_4bit"
    keep = [n for n in g.node if not (n.op_type == "Cast" and n.output[0] in casts)]
    del g.node[:]
    g.node.extend(keep)
    openvino_form(m)
    tmp = dst.with_suffix(".onnx")
    onnx.save(m, str(tmp))
    ov.save_model(ov.convert_model(str(tmp)), str(dst), compress_to_fp16=False)
    tmp.unlink()


def alone(path: Path) -> int:
    """FakeQuantize nodes OpenVINO's compiled graph runs as their own kernels (not fused into another)."""
    import openvino as ov

    c = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": 1})
    return sum(op.get_rt_info()["layerType"].astype(str) == "FakeQuantize" for op in c.get_runtime_model().get_ordered_ops())


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--note", default=None)
    args = ap.parse_args(argv)
    import openvino as ov

    src = DEPLOY / "vitq_best_W8A8" / "model.onnx"
    if not src.is_file():
        raise SystemExit(f"{src} is missing: run python -m bench.deploy --models deit-s first")
    work = DEPLOY / "openvino_fq"
    work.mkdir(exist_ok=True)
    files: dict[str, Path] = {"NNCF INT8": DEPLOY / "nncf_int8.xml"}
    changed: dict[str, dict[str, int]] = {}
    for k, (label, steps) in enumerate(STEPS):
        if not steps:
            files[label] = src
            continue
        files[label] = work / f"step{k}.xml"
        changed[label] = write(src, files[label], steps)
    w4 = DEPLOY / "vitq_best_W4A8_ir" / "model.xml"
    if w4.is_file():  # W4A8: the OpenVINO form (centered int8 weights) beside 4-bit weights with zero points
        files["W4A8, the OpenVINO form (weights as centered int8)"] = w4
        files["W4A8, weights as 4-bit codes + zero points"] = work / "w4_nibbles.xml"
        four_bit(DEPLOY / "vitq_best_W4A8" / "model.onnx", files["W4A8, weights as 4-bit codes + zero points"])
    core = ov.Core()
    x = np.random.default_rng(0).standard_normal((8, 3, 224, 224)).astype(np.float32)
    ref = core.compile_model(str(src), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(x)[0]
    parity = {}
    for label, p in files.items():
        if label == "NNCF INT8" or p == src or label.startswith("W4A8"):
            continue
        y = core.compile_model(str(p), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(x)[0]
        parity[label] = {"max_abs_diff": float(np.abs(y - ref).max()), "largest_output": float(np.abs(ref).max()),
                         "argmax_agree": float((y.argmax(-1) == ref.argmax(-1)).mean())}
    fq_alone = {label: alone(p) for label, p in files.items()}
    speed: dict[str, dict[str, list[float]]] = {k: {"1": [], "8": []} for k in files}
    for _ in range(args.rounds):
        for k, p in files.items():
            for bs, v in run(p, "speed").items():
                speed[k][bs].append(v)
    meta = {**machine_meta(), **({"note": args.note} if args.note else {})}
    nn = speed["NNCF INT8"]
    size = {k: p.stat().st_size + (p.with_suffix(".bin").stat().st_size if p.suffix == ".xml" else 0)
            for k, p in files.items()}
    rows = [[k, f"{size[k] / 1e6:.1f}", str(fq_alone[k]), ", ".join(f"{n} {v}" for n, v in changed.get(k, {}).items()) or "-",
             f"{max(v['1']):.1f}", f"{max(v['8']):.1f}",
             f"{max(v['1']) / max(nn['1']):.2f}x / {max(v['8']) / max(nn['8']):.2f}x"] for k, v in speed.items()]
    worst = max(parity.values(), key=lambda r: r["max_abs_diff"])
    lines = ["# OpenVINO: vitq's OpenVINO form, step by step, against NNCF's INT8 (DeiT-S, W8A8)", "",
             __doc__.split("\n\n")[1].replace("\n", " "), "", machine_line(meta) + "; OpenVINO " +
             ov.__version__.split("-")[0] + ", 1 inference thread", "",
             f"Outputs of every rewritten file against the file as written (8 random images, f32 inference): max |diff| "
             f"up to {worst['max_abs_diff']:.3g} of a largest output {worst['largest_output']:.3g}, top-1 agree "
             f"{min(r['argmax_agree'] for r in parity.values()):.0%} (the rewrites move quantizers; only ties round "
             "differently).", "",
             *md_table(["file", "MB", "FakeQuantize run alone", "places changed", "img/s b1", "img/s b8", "vs NNCF b1 / b8"],
                       rows, align="lrrlrrr"),
             *(["", f"Note: {meta['note']}"] if meta.get("note") else [])]
    write_md(OUT.with_suffix(".md"), lines)
    OUT.with_suffix(".json").write_text(json.dumps({"meta": meta, "changed": changed, "parity": parity,
                                                    "fq_alone": fq_alone, "speed": speed},
                                                   indent=1) + "\n")
    print(f"wrote {OUT}.{{md,json}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
