#!/usr/bin/env python
"""Does OpenVINO run vitq's attention on its INT8 kernels, and what do symmetric q / k cost? (issue 43, item 3)

OpenVINO fuses a ViT's attention (q @ k^T, softmax, @ v) into one subgraph and runs it on INT8 only when the
FakeQuantize nodes it finds on q and k have no zero point (NNCF's INT8 model has them so). ``best``'s q and k are
asymmetric, so the q input became Convert + Subtract and the subgraph ran in bf16 (openvino_profile.md). This
study exports a DeiT-S-shaped model (timm ``deit_small_patch16_224``, random weights, 16 random calibration
images; W8A8 is calibration only) with ``best``, ``best-symw`` (symmetric weights) and ``best-symqk`` (symmetric
weights, q and k symmetric: bench/recipes/), and measures in OpenVINO, beside the float file and NNCF's INT8
model that ``bench/deploy.py`` cached (when present): images/s at batch 1 and 8 (1 thread, each file in its own
process, interleaved rounds, best shown), and from the per-layer counters at batch 1 the attention subgraph's
precision and the time of the FullyConnected, FakeQuantize, Reorder and attention layers. The recipes' accuracy:
simulated top-1 on the Fashion-MNIST reference ViT and its outlier twin (10 000 test images), W8A8.

    python -m bench.studies.openvino_attention

Writes ``bench/results/openvino_attention.md`` / ``.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.common import RESULTS, FashionData, bench_recipe, machine_line, machine_meta, md_table, write_md

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / "bench" / "cache" / "openvino_attention"
DEPLOY = ROOT / "bench" / "cache" / "deploy" / "deit-s"
RECIPES = ["best", "best-symw", "best-symqk"]

WORKER = r"""
import json, sys, time, numpy as np, openvino as ov
from collections import defaultdict
path, mode = sys.argv[1], sys.argv[2]
core = ov.Core()
cfg = {"INFERENCE_NUM_THREADS": 1, "PERFORMANCE_HINT": "LATENCY"}
if mode == "profile":
    cfg["PERF_COUNT"] = True
c = core.compile_model(core.read_model(path), "CPU", cfg)
req = c.create_infer_request()
out = {}
if mode == "profile":
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    for _ in range(3):
        req.infer({0: x})
    agg = defaultdict(lambda: [0, 0.0]); n = 5
    for _ in range(n):
        req.infer({0: x})
        for p in req.profiling_info:
            if p.real_time.total_seconds() > 0:
                agg[(p.node_type, p.exec_type)][0] += 1
                agg[(p.node_type, p.exec_type)][1] += p.real_time.total_seconds() * 1e3
    out["layers"] = [[k[0], k[1], v[0] // n, round(v[1] / n, 2)] for k, v in agg.items()]
else:
    for bs in (1, 8):
        x = np.random.default_rng(0).standard_normal((bs, 3, 224, 224)).astype(np.float32)
        for _ in range(2):
            req.infer({0: x})
        t0, k = time.perf_counter(), 0
        while time.perf_counter() - t0 < 3.0:
            req.infer({0: x}); k += 1
        out[str(bs)] = k * bs / (time.perf_counter() - t0)
print(json.dumps(out))
"""


def build() -> dict[str, Path]:
    import timm
    import torch

    import vitq

    files: dict[str, Path] = {}
    if (DEPLOY / "fp32.onnx").is_file():
        files["float32 (OpenVINO's default precision)"] = DEPLOY / "fp32.onnx"
    if (DEPLOY / "nncf_int8.xml").is_file():
        files["NNCF INT8 (bench/deploy.py's)"] = DEPLOY / "nncf_int8.xml"
    torch.manual_seed(0)
    model = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    calib = torch.randn(16, 3, 224, 224)
    for r in RECIPES:
        out = CACHE / r
        if not (out / "model.onnx").is_file():
            q = vitq.quantize(copy.deepcopy(model), bench_recipe(r) or r, "W8A8", calib_data=calib)
            vitq.export(q, out, "onnx")
        files[f"vitq {r} W8A8"] = out / "model.onnx"
    return files


def run(path: Path, mode: str) -> dict[str, Any]:
    r = subprocess.run([sys.executable, "-c", WORKER, str(path), mode], capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def accuracy(models: list[str]) -> dict[str, dict[str, float]]:
    from vitq.data import calibration_subset, stack_images
    from vitq.reference import load_reference
    from vitq.run.compare import compare

    out: dict[str, dict[str, float]] = {}
    for name in models:
        model = load_reference(name)
        fd = FashionData(model)
        src = lambda n, seed, fd=fd: stack_images(calibration_subset(fd.train, n, seed))[0]  # noqa: E731
        res = compare(model, fd.eval_loader, src, [bench_recipe(r) or r for r in RECIPES], ["W8A8"], seeds=[0])
        out[name] = {"fp": res["fp"]["top1"], **{r: row["q_top1"] for r, row in zip(RECIPES, res["rows"])}}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--models", nargs="*", default=["fmnist-vit", "fmnist-vit-outlier"])
    args = ap.parse_args()
    files = build()
    speed: dict[str, dict[str, list[float]]] = {k: {"1": [], "8": []} for k in files}
    for _ in range(args.rounds):
        for k, p in files.items():
            for bs, v in run(p, "speed").items():
                speed[k][bs].append(v)
    prof = {k: run(p, "profile")["layers"] for k, p in files.items()}
    acc = accuracy(args.models) if args.models else {}

    def ms(k: str, layer: str) -> float:
        return sum(r[3] for r in prof[k] if r[0].startswith(layer))

    def attn(k: str) -> str:
        subs = [r for r in prof[k] if r[0] == "Subgraph"]
        return ", ".join(sorted({r[1].split("_")[-1] for r in subs})) or "-"

    meta = {**machine_meta(), "threads": 1}
    rows = [[k, f"{max(speed[k]['1']):.1f}", f"{max(speed[k]['8']):.1f}", attn(k), f"{ms(k, 'FullyConnected'):.1f}",
             f"{ms(k, 'FakeQuantize'):.1f}", f"{ms(k, 'Reorder'):.1f}", f"{ms(k, 'Subgraph'):.1f}",
             f"{sum(r[3] for r in prof[k]):.1f}"] for k in files]
    lines = ["# OpenVINO and vitq's attention: symmetric q / k (DeiT-S shape, W8A8)", "",
             __doc__.split("\n\n")[1].replace("\n", " "), "", machine_line(meta) + "; OpenVINO threads 1", "",
             *md_table(["file", "img/s b1", "img/s b8", "attention subgraph", "FC ms", "FakeQuantize ms", "Reorder ms",
                        "Subgraph ms", "layers ms (b1)"], rows, align="lrrlrrrrr")]
    if acc:
        lines += ["", "Simulated top-1 (%), W8A8, 10 000 Fashion-MNIST test images (resolution about 0.3 points):", "",
                  *md_table(["model", "FP", *RECIPES], [[m, f"{a['fp']:.2f}", *(f"{a[r]:.2f}" for r in RECIPES)]
                                                        for m, a in acc.items()], align="lr" + "r" * len(RECIPES))]
    write_md(RESULTS / "openvino_attention.md", lines, echo=True)
    (RESULTS / "openvino_attention.json").write_text(json.dumps(
        {"meta": meta, "speed": speed, "profile": prof, "accuracy": acc}, indent=1) + "\n")


if __name__ == "__main__":
    main()
