#!/usr/bin/env python3
"""Deployment speed and accuracy, every runtime in one run on one host.

Per model: throughput (images / s, median of timed rounds) at batch 1 and batch 32 and the peak
resident memory of the process that ran it, for

* ``torch fp32``        - the float model, eager PyTorch;
* ``ort fp32``          - the float model exported to ONNX, onnxruntime;
* ``ort static WxA8``   - onnxruntime's own ``quantize_static`` (QDQ, per-channel s8 weights - s4 for W4A8 -,
                          u8 activations, min-max calibration on the same calibration images);
* ``vitq best WxA8``    - the default recipe exported as ``vitq export`` does by default (``--weight-dtype auto``);
* ``vitq repq W8A8``    - ``repq`` as the recipe is (its log-sqrt2 post-Softmax emulated in float: exact, no integer
                          kernel for probs x V), and ``repq@onnx`` quantized for onnx (``--target onnx``);
* ``... u8w``           - the same file with uint8 weight containers (u8 x u8 kernels) instead of auto's choice;
* ``vitq best-asym8``   - best as it was until 2026-12-07 (bench/recipes/best-asym8.yaml: asymmetric 8-bit
                          weights and q / k), beside today's ``best`` (symmetric: the form OpenVINO's INT8
                          kernels and its int8 attention take);
* ``ort dynamic W8``    - onnxruntime's ``quantize_dynamic`` (what its docs recommend for transformers);
* ``ov fp32`` / ``ov nncf int8`` / ``ov vitq ...`` - OpenVINO (when installed: ``pip install 'vitq[openvino]'``)
                          reading the float ONNX file, NNCF's own INT8 of it, and vitq's ONNX files;
* ``ov vitq ... ir``    - vitq's OpenVINO form (``vitq export --format openvino``: OpenVINO IR, the activation
                          quantizers as FakeQuantize where OpenVINO fuses them);
* ``torch pt2e int8``   - PyTorch's own integer path: PT2E with the X86 Inductor quantizer, torch.compile
                          (torchao), where it runs on this host.

Models: a DeiT-Small-shaped ViT (timm ``deit_small_patch16_224``, random weights, 224x224) for speed, and
the reference models, where the accuracy columns are filled: each file's top-1 on the 10 000
Fashion-MNIST test images *in its runtime*, beside vitq's simulated top-1 of the same quantized model.
Each timing runs in its own process (so the peak memory is that runtime's). The host's CPU and its ISA
flags (AVX2 / AVX-512 VNNI / AMX) are in the result file: the ratios differ by ISA.

    python -m bench.deploy                                  # all models (about 40 min on 2 cores)
    python -m bench.deploy --models fmnist-vit --batches 32
    python -m bench.deploy --out bench/results/deploy_avx2.json       # another host: its own file
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

import vitq
from bench.common import FashionData, bench_recipe, machine_meta, save_rows, write_md
from vitq.evaluate import evaluate
from vitq.export.deploy import export
from vitq.export.onnx import INTEGER_OPS, OnnxModel, runtime_ops
from vitq.export.openvino import OpenVinoModel
from vitq.reference import load_reference

ROOT = Path(__file__).resolve().parents[1]

OUT = ROOT / "bench" / "results" / "deploy.json"
CACHE = ROOT / "bench" / "cache" / "deploy"
MODELS = ("deit-s", "fmnist-vit", "fmnist-vit-outlier", "fmnist-deit", "fmnist-deit-outlier", "fmnist-swin",
          "fmnist-swin-outlier")
#: (recipe, bits, target, weight container): the recipe as it is (sites without an integer form emulated exactly),
#: or quantized for onnx; uint8 weights (the default) or int8 (u8 x s8 kernels)
VITQ = (("best", "W8A8", None, "auto"), ("best", "W4A8", None, "auto"), ("best", "W8A8", None, "uint8"),
        ("best", "W4A8", None, "uint8"), ("repq", "W8A8", None, "auto"), ("repq", "W8A8", "onnx", "auto"),
        ("best-asym8", "W8A8", None, "auto"))
#: vitq files OpenVINO also reads (its ONNX frontend: QuantizeLinear / DequantizeLinear -> FakeQuantize)
OV_VITQ = ("vitq best W8A8", "vitq best W4A8", "vitq best-asym8 W8A8")
#: vitq models also exported in the OpenVINO form (``--format openvino``: OpenVINO IR, rows ``ov ... ir``)
OV_IR = ("vitq best W8A8", "vitq best W4A8")
KEY = ("model", "runtime", "batch")


def isa_flags() -> list[str]:
    """The ISA flags the speed ratios depend on (the library reads /proc/cpuinfo for its int8-weight check)."""
    from vitq.export.onnx import cpu_flags

    flags = cpu_flags() or set()
    want = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")
    return [f for f in want if f in flags]


# ------------------------------------------------------------------------------------------ models
def float_model(name: str) -> torch.nn.Module:
    if name == "deit-s":
        import timm

        torch.manual_seed(0)
        return timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    return load_reference(name)


def calib_images(name: str, model: torch.nn.Module) -> tuple[torch.Tensor, Optional[FashionData]]:
    if name == "deit-s":
        return torch.randn(32, 3, 224, 224, generator=torch.Generator().manual_seed(0)), None
    data = FashionData(model)
    return data.calib(32), data


def export_float(model: torch.nn.Module, path: Path, example: torch.Tensor) -> None:
    from vitq.export.onnx import LogitsOnly

    with torch.no_grad():
        prog = torch.onnx.export(LogitsOnly(model).eval(), (example,), dynamo=True, opset_version=21,
                                 input_names=["pixel_values"], output_names=["logits"],
                                 dynamic_shapes={"pixel_values": {0: torch.export.Dim("batch", min=1)}})
    prog.save(str(path))


def ort_static(fp32: Path, out: Path, calib: torch.Tensor, weight_bits: int) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"pixel_values": calib[i:i + 8].numpy()} for i in range(0, len(calib), 8)])

        def get_next(self) -> Optional[dict[str, np.ndarray]]:
            return next(self.it, None)

    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)  # what onnxruntime's docs say to run first
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8 if weight_bits == 8 else QuantType.QInt4)
    pre.unlink(missing_ok=True)


def ort_dynamic(fp32: Path, out: Path) -> None:
    """onnxruntime's ``quantize_dynamic`` (what its docs recommend for transformer models): int8 weights, activations
    quantized at run time per tensor."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8, per_channel=True)


def nncf_int8(fp32: Path, out: Path, calib: torch.Tensor) -> bool:
    """NNCF's own post-training INT8 for OpenVINO (``nncf.quantize``, ModelType.TRANSFORMER) on the same calibration
    images; False when NNCF / OpenVINO are not installed."""
    try:
        import nncf
        import openvino as ov
    except ImportError:
        return False
    m = ov.Core().read_model(str(fp32))
    ds = nncf.Dataset([calib[i:i + 1].numpy() for i in range(len(calib))])
    q = nncf.quantize(m, ds, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calib))
    ov.save_model(q, str(out))
    return True


def has_openvino() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def prepare(name: str, threads: int, only: Optional[str] = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Write every file of ``name`` and return the runtimes to time, and the accuracy rows' inputs (``only``: a regular
    expression; the runtimes whose name it does not match are neither evaluated nor timed)."""
    torch.set_num_threads(threads)
    d = CACHE / name
    d.mkdir(parents=True, exist_ok=True)
    model = float_model(name)
    calib, data = calib_images(name, model)
    example = calib[:2]
    runs: list[dict[str, Any]] = [{"runtime": "torch fp32", "kind": "torch", "model": name}]
    export_float(model, d / "fp32.onnx", example)
    runs.append({"runtime": "ort fp32", "kind": "ort", "file": str(d / "fp32.onnx")})
    for wb in (8, 4):
        f = d / f"ort_static_w{wb}a8.onnx"
        ort_static(d / "fp32.onnx", f, calib, wb)
        runs.append({"runtime": f"ort static W{wb}A8", "kind": "ort", "file": str(f)})
    ort_dynamic(d / "fp32.onnx", d / "ort_dynamic.onnx")
    runs.append({"runtime": "ort dynamic W8", "kind": "ort", "file": str(d / "ort_dynamic.onnx")})
    if has_openvino():
        runs.append({"runtime": "ov fp32", "kind": "ov", "file": str(d / "fp32.onnx")})
        if nncf_int8(d / "fp32.onnx", d / "nncf_int8.xml", calib):
            runs.append({"runtime": "ov nncf int8", "kind": "ov", "file": str(d / "nncf_int8.xml")})
    sims: dict[str, float] = {}
    done: dict[tuple[str, str, Optional[str]], Any] = {}
    sim_of: dict[tuple[str, str, Optional[str]], float] = {}
    for recipe, bits, target, wdt in VITQ:
        key = (recipe, bits, target)
        if key not in done:
            done[key] = vitq.quantize(copy.deepcopy(model), bench_recipe(recipe) or recipe, bits, calib_data=calib,
                                      batch_size=8, target=target)
        q = done[key]
        tag = f"vitq {recipe}{'' if target is None else '@' + target} {bits}{'' if wdt == 'auto' else ' ' + wdt[0] + '8w'}"
        folder = d / tag.replace(" ", "_").replace("@", "_")
        rep = export(q, folder, "onnx", weight_dtype=wdt)
        runs.append({"runtime": tag, "kind": "ort", "file": str(folder / "model.onnx"),
                     "fallbacks": len(rep["lowering"]["fallbacks"]), "weight_dtype": rep["weight_dtype"]})
        if tag in OV_VITQ and has_openvino():
            runs.append({"runtime": f"ov {tag}", "kind": "ov", "file": str(folder / "model.onnx"),
                         "fallbacks": len(rep["lowering"]["fallbacks"]), "weight_dtype": rep["weight_dtype"]})
        if tag in OV_IR and has_openvino():
            ir = export(q, folder.with_name(folder.name + "_ir"), "openvino")
            runs.append({"runtime": f"ov {tag} ir", "kind": "ov", "file": str(folder.with_name(folder.name + "_ir") / "model.xml"),
                         "fallbacks": len(ir["lowering"]["fallbacks"]), "weight_dtype": ir["weight_dtype"]})
        if data is not None:  # one simulated evaluation per quantized model, whatever its file's weight container
            if key not in sim_of:
                sim_of[key] = round(evaluate(q, data.eval_loader)["top1"], 2)
            sims[tag] = sims[f"ov {tag}"] = sims[f"ov {tag} ir"] = sim_of[key]
    runs.append({"runtime": "torch pt2e int8", "kind": "pt2e", "model": name})
    if only:
        runs = [r for r in runs if re.search(only, r["runtime"])]
    acc: dict[str, Any] = {}
    if data is not None:
        acc["fp32"] = round(evaluate(model, data.eval_loader)["top1"], 2)
        for r in runs:
            if r["kind"] in ("ort", "ov"):
                rt = OnnxModel(r["file"], threads) if r["kind"] == "ort" else OpenVinoModel(r["file"], threads)
                acc[r["runtime"]] = round(evaluate(rt, data.eval_loader)["top1"], 2)
        acc["simulated"] = sims
    for r in runs:
        r["model"] = name
        if r["kind"] == "ov":
            r["bytes"] = os.path.getsize(r["file"]) + (os.path.getsize(Path(r["file"]).with_suffix(".bin"))
                                                        if r["file"].endswith(".xml") else 0)
        if r["kind"] == "ort":
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                ops = runtime_ops(r["file"], tmp)
            r["integer_ops"] = {k: v for k, v in ops.items() if k in INTEGER_OPS}
            r["bytes"] = os.path.getsize(r["file"])
    return runs, acc


# ------------------------------------------------------------------------------------------ timing
def time_fn(fn: Any, x: Any, seconds: float) -> dict[str, float]:
    for _ in range(3):
        fn(x)
    times: list[float] = []
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(times) < 5:
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    med = float(np.median(times))
    return {"median_s": med, "rounds": len(times)}


def measure(run: dict[str, Any], batch: int, threads: int, seconds: float) -> dict[str, Any]:
    """Runs in a child process: build the runtime, time it, report the peak RSS (the kernel's
    high-water mark reset first: a forked child inherits its parent's)."""
    from vitq.evaluate import peak_rss_mb, reset_peak_rss

    reset_peak_rss()
    torch.set_num_threads(threads)
    model = float_model(run["model"])
    shape = (batch, *vitq.data_config(model).input_size)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    note = ""
    if run["kind"] == "torch":
        with torch.no_grad():
            t = time_fn(model, x, seconds)
    elif run["kind"] == "ort":
        from vitq.export.onnx import session

        sess = session(run["file"], threads)
        xn = x.numpy()
        t = time_fn(lambda a: sess.run(None, {"pixel_values": a}), xn, seconds)
    elif run["kind"] == "ov":
        import openvino as ov

        core = ov.Core()
        compiled = core.compile_model(core.read_model(run["file"]), "CPU",
                                      {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"})
        req = compiled.create_infer_request()
        xn = x.numpy()
        t = time_fn(lambda a: req.infer({0: a}), xn, seconds)
        note = "OpenVINO " + ov.__version__.split("-")[0] + ", inference precision " + \
            str(compiled.get_property("INFERENCE_PRECISION_HINT"))
    else:
        fn, note = pt2e_model(model, x)
        with torch.no_grad():
            t = time_fn(fn, x, seconds)
    peak = peak_rss_mb()
    return {"throughput": round(batch / t["median_s"], 2), "latency_ms": round(1000 * t["median_s"], 3),
            "rounds": t["rounds"], "peak_rss_mb": round(peak, 1), "note": note}


def pt2e_model(model: torch.nn.Module, x: torch.Tensor) -> tuple[Any, str]:
    """PT2E static int8 with the X86 Inductor quantizer, compiled (torchao)."""
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    with torch.no_grad():
        ep = torch.export.export(model, (x,)).module()
        quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(ep, quantizer)
        prepared(x)
        converted = convert_pt2e(prepared)
        compiled = torch.compile(converted)
        compiled(x)
    return compiled, "PT2E X86InductorQuantizer (min-max on one batch), torch.compile"


# ------------------------------------------------------------------------------------------ report
def render(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = ["# Deployment: speed and accuracy beside onnxruntime's and OpenVINO's own quantization", "",
             "Generated by `bench/deploy.py`: every runtime on the same host in one run, each timing in its own",
             "process (median of timed rounds; peak RSS of that process). Accuracy: top-1 on the 10 000",
             "Fashion-MNIST test images in the runtime itself; `sim` = vitq's simulated top-1 of the same",
             "quantized model. `vs ORT int8`: throughput over onnxruntime's `quantize_static` W8A8 at the same batch.",
             "",
             f"Host: {meta.get('machine')}; torch CPU capability {meta.get('cpu_capability')}; ISA flags "
             f"{', '.join(meta.get('isa', [])) or '?'}; {meta.get('threads')} threads; onnxruntime "
             f"{meta.get('onnxruntime')}; OpenVINO {meta.get('openvino') or 'not installed'}; torch {meta.get('torch')}.", "",
             "Rows: `ort static` = onnxruntime's `quant_pre_process` + `quantize_static` (QDQ, per-channel s8 weights, "
             "u8 activations, min-max on the same 32 calibration images); `ort dynamic W8` = `quantize_dynamic` (int8 "
             "weights per channel, activations quantized at run time); `ov fp32` = OpenVINO reading the float ONNX file "
             "(on a CPU with AMX / AVX512-BF16 OpenVINO runs it in bf16 by default: see the note column in the JSON); "
             "`ov nncf int8` = NNCF's `nncf.quantize` (ModelType.TRANSFORMER) on the same images; `ov vitq ...` = "
             "OpenVINO reading vitq's ONNX file; `ov vitq ... ir` = vitq's OpenVINO form (`vitq export --format "
             "openvino`: IR with the quantizers where OpenVINO fuses them, weights as int8 codes without zero points, "
             "so a W4A8 IR is as large as a W8A8 one). `vitq best WxA8` = the default recipe, exported as `vitq export` "
             "does by default (`--weight-dtype auto`: int8 containers here when exact, see `weight_dtype`); `u8w` = "
             "the same with uint8 weight containers; `best-asym8` = best until 2026-12-07 "
             "(bench/recipes/best-asym8.yaml: asymmetric 8-bit weights and q / k; today's best has them symmetric, the "
             "form OpenVINO's INT8 kernels and its int8 attention take; rows measured before then name that recipe "
             "`best`, and `best-symw` its symmetric-weights edit).", "",
             "`vitq RECIPE@onnx` is what `vitq quantize --export onnx` ships (`--target onnx`: post-Softmax on the",
             "8-bit uniform grid, calibrated); `vitq RECIPE` the recipe as it is (its log-sqrt2 post-Softmax emulated",
             "exactly in float: no integer kernel for probs x V). Speed: compare on `deit-s`. The reference models",
             "run in well under a millisecond per image, where one process's timing of a graph can differ from the",
             "next one's by 2-3x (fmnist-swin, batch 32: repq@onnx W8A8 and dopq-calib@onnx W8A8 have the same",
             "kernels and ran at 897 and 2542 images/s): their rows are for the accuracy columns.",
             *([f"Note: {meta['note']}", ""] if meta.get("note") else [""])]
    models = list(dict.fromkeys(r["model"] for r in rows))
    for m in models:
        mine = [r for r in rows if r["model"] == m]
        lines += [f"## {m}", "", "| runtime | batch | images/s | vs ORT fp32 | vs ORT int8 | latency ms | peak RSS MB | "
                  "file MB | integer kernels | top-1 (runtime) | sim top-1 |", "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
        for r in sorted(mine, key=lambda r: (r["batch"], r["order"])):
            base = next((b for b in mine if b["runtime"] == "ort fp32" and b["batch"] == r["batch"]), None)
            i8 = next((b for b in mine if b["runtime"] == "ort static W8A8" and b["batch"] == r["batch"]), None)
            rel = "-" if base is None or not r.get("throughput") else f"{r['throughput'] / base['throughput']:.2f}x"
            rel8 = "-" if i8 is None or not r.get("throughput") else f"{r['throughput'] / i8['throughput']:.2f}x"
            ik = ", ".join(f"{v} {k}" for k, v in (r.get("integer_ops") or {}).items()) or "-"
            thr = "failed" if r.get("error") else f"{r['throughput']:.1f}"
            lines.append(f"| {r['runtime']} | {r['batch']} | {thr} | {rel} | {rel8} | {r.get('latency_ms', '-')} | "
                         f"{r.get('peak_rss_mb', '-')} | {'-' if not r.get('bytes') else round(r['bytes'] / 1e6, 2)} | {ik} | "
                         f"{r.get('top1', '-')} | {r.get('sim_top1', '-')} |")
        errs = [r for r in mine if r.get("error")]
        for r in errs:
            lines.append(f"\n`{r['runtime']}` batch {r['batch']}: {r['error']}")
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=5.0, help="timed seconds per runtime and batch")
    ap.add_argument("--out", type=Path, default=OUT, help="result file (one host per file: its meta names the CPU)")
    ap.add_argument("--note", help="a line for the report (e.g. what else ran on the host)")
    ap.add_argument("--only", metavar="REGEX", help="evaluate and time only the runtimes whose name matches (the other "
                                                      "rows of the result file stay as they were: say so in --note)")
    ap.add_argument("--measure", help=argparse.SUPPRESS)  # child process: one JSON run description
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(json.loads(args.measure), args.batch, args.threads, args.seconds)))
        return
    import onnxruntime

    ov_version = None
    if has_openvino():
        import openvino

        ov_version = openvino.__version__.split("-")[0]
    meta = {**machine_meta(), "isa": isa_flags(), "onnxruntime": onnxruntime.__version__, "openvino": ov_version,
            "threads": args.threads,
            **({"note": args.note} if args.note else {})}
    for name in args.models.split(","):
        runs, acc = prepare(name, args.threads, args.only)
        for order, run in enumerate(runs):
            for b in (int(v) for v in args.batches.split(",")):
                row = {"model": name, "runtime": run["runtime"], "batch": b, "order": order,
                       **{k: run[k] for k in ("bytes", "integer_ops", "fallbacks", "weight_dtype") if k in run}}
                if name != "deit-s":
                    row["top1"] = acc.get(run["runtime"]) if run["kind"] in ("ort", "ov") else acc.get("fp32") \
                        if run["kind"] == "torch" else None
                    row["sim_top1"] = acc["simulated"].get(run["runtime"])
                child = subprocess.run([sys.executable, "-m", "bench.deploy", "--measure", json.dumps(run), "--batch", str(b),
                                        "--threads", str(args.threads), "--seconds", str(args.seconds)],
                                       capture_output=True, text=True, timeout=1800, cwd=ROOT)
                last = child.stdout.strip().splitlines()[-1] if child.stdout.strip() else ""
                if child.returncode == 0 and last.startswith("{"):
                    row.update(json.loads(last))
                else:
                    err = [ln for ln in child.stderr.strip().splitlines() if ln.strip()]
                    row["error"] = (err[-1] if err else f"exit {child.returncode}")[:240]
                print(json.dumps(row), flush=True)
                save_rows(args.out, [row], meta, key=KEY)
    d = json.loads(args.out.read_text())
    order = {m: i for i, m in enumerate(MODELS)}
    rows = sorted(d["rows"], key=lambda r: (order.get(r["model"], 99), r["batch"], r.get("order", 0)))
    write_md(args.out.with_suffix(".md"), render(rows, d["meta"]))
    print(f"wrote {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
