#!/usr/bin/env python
"""Cost of reconstruction on the CPU: seconds per 1k iterations per unit, cache size (estimate vs
measured) and peak memory, in memory vs streamed from disk.

    python -m bench.recon_cost                        # reference models + DeiT-Small (random weights)
    python -m bench.recon_cost --skip-deit-small      # reference models only (fast)

Part A - reference models (trained weights, 1024 Fashion-MNIST calibration images): the qdrop
engine (AdaRound + LSQ + drop 0.5, batch 32) for ``--ref-iters`` iterations per unit with every
slicing in (half, block, stage/model); seconds per 1k iterations = training-loop time / iterations.
Part B - timm ``deit_small_patch16_224`` with random weights and 1024 random 224x224 images (cost
only): ``--deit-iters`` iterations per unit with the block slicing, once with the caches in memory and
once streamed from disk (``max_cache_gb=0``); peak RSS of each run measured from a baseline taken just
before reconstruction (model, float copy and images already resident).
Writes ``bench/results/recon_cost.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

import vitq  # noqa: E402
from bench.common import RESULTS, ROOT, Data, available, save_rows, setup, write_md
from vitq.bits import Bits  # noqa: E402
from vitq.evaluate import peak_rss_mb, reset_peak_rss  # noqa: E402
from vitq.pipeline import Context  # noqa: E402
from vitq.recon import ReconConfig, float_copy, reconstruct  # noqa: E402
from vitq.reference import load_reference  # noqa: E402

log = logging.getLogger("bench.recon_cost")
OUT = RESULTS / "recon_cost"


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def unit_kind(name: str, pieces: list[int], chain_kinds: dict[str, str]) -> str:
    if ".." in name:
        a, b = name.split("..")
        if a.endswith(".attn") and b.endswith(".mlp") and a.rsplit(".", 1)[0] == b.rsplit(".", 1)[0]:
            return "block"
        return f"{pieces[1] - pieces[0]} pieces"
    return chain_kinds.get(name, "?")


def per_unit_costs(rep: dict[str, Any], kinds: dict[str, str]) -> dict[str, float]:
    """Median seconds per 1k iterations, by unit kind."""
    by: dict[str, list[float]] = {}
    for u in rep["unit_reports"]:
        if u.get("train_seconds") is None or not u["iters"]:
            continue
        by.setdefault(unit_kind(u["unit"], u["pieces"], kinds), []).append(1000.0 * u["train_seconds"] / u["iters"])
    return {k: round(statistics.median(v), 1) for k, v in by.items()}


def qdrop_cfg(**kw: Any) -> ReconConfig:
    return ReconConfig(weights="adaround", acts="lsq", qdrop_p=0.5, **kw)


def part_a(models: list[str], iters: int) -> list[dict[str, Any]]:
    from vitq.adapters import get_adapter
    from vitq.passes.oas import auto_candidates

    rows = []
    for name in models:
        model = load_reference(name)
        data = Data(model, 1024, 16)
        q = vitq.quantize(copy.deepcopy(model), "minmax", "W4A4", calib_data=data.calib[:256])
        chain = get_adapter(q).chain(q)
        kinds = {p.name: p.kind for p in chain}
        ctx = Context(calib=data.calib, bits=Bits.parse("W4A4"), batch_size=64)
        fp = float_copy(q)
        for s in [c for c in auto_candidates(chain) if c in ("half", "block", "stage", "model")]:
            rep = reconstruct(copy.deepcopy(q), qdrop_cfg(slicing=s, iters=iters), ctx, images=data.calib, fp_model=fp)
            rows.append({"part": "A", "model": name, "slicing": s, "iters": iters, "units": rep["units"],
                         "sec_per_1k_iters": per_unit_costs(rep, kinds), "seconds": rep["seconds"],
                         "cache_estimate_gb": rep["cache_estimate_gb"]})
            log.info("%s", rows[-1])
    return rows


def part_b_one(mode: str, iters: int, n_images: int, chunk_size: int) -> dict[str, Any]:
    """One Part B run (meant for a fresh process, so that its peak RSS is its own)."""
    from vitq.adapters import get_adapter
    from vitq.models import load_model

    model, _ = load_model("deit_small_patch16_224", random_weights=True)
    torch.manual_seed(0)
    images = torch.randn(n_images, 3, 224, 224)
    q = vitq.quantize(model, "minmax", "W4A4", calib_data=images[:32], batch_size=16)
    kinds = {p.name: p.kind for p in get_adapter(q).chain(q)}
    ctx = Context(calib=images, bits=Bits.parse("W4A4"), batch_size=32)
    fp = float_copy(q)
    budget = 64.0 if mode == "memory" else 0.0
    base = rss_mb()
    reset_peak_rss()
    t0 = time.perf_counter()
    rep = reconstruct(q, qdrop_cfg(slicing="block", iters=iters, num_samples=n_images, chunk_size=chunk_size,
                                   max_cache_gb=budget), ctx, images=images, fp_model=fp)
    secs = time.perf_counter() - t0
    peak = peak_rss_mb()
    return {"part": "B", "model": "deit_small_patch16_224 (random weights)",
            "mode": "in memory" if mode == "memory" else "streamed from disk",
            "images": n_images, "chunk_size": chunk_size, "iters": iters, "units": rep["units"],
            "cache_on_disk": rep["cache_on_disk"], "cache_estimate_gb": rep["cache_estimate_gb"],
            "baseline_rss_mb": round(base, 1), "peak_rss_mb": round(peak, 1),
            "peak_minus_baseline_gb": round((peak - base) / 1024.0, 3), "seconds": round(secs, 1),
            "sec_per_1k_iters": per_unit_costs(rep, kinds),
            "unit_seconds_excl_training": round(statistics.median(
                u["seconds"] - (u.get("train_seconds") or 0.0) for u in rep["unit_reports"]), 2)}


def part_b(iters: int, n_images: int, chunk_size: int, threads: int) -> list[dict[str, Any]]:
    import subprocess

    rows = []
    for mode in ("memory", "disk"):
        cmd = [sys.executable, "-m", "bench.recon_cost", "--part-b-mode", mode, "--deit-iters", str(iters), "--deit-images",
               str(n_images), "--chunk-size", str(chunk_size), "--threads", str(threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        log.info("%s", rows[-1])
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=["fmnist-vit", "fmnist-deit", "fmnist-swin"])
    ap.add_argument("--ref-iters", type=int, default=100)
    ap.add_argument("--deit-iters", type=int, default=4)
    ap.add_argument("--deit-images", type=int, default=1024)
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-deit-small", action="store_true")
    ap.add_argument("--part-b-mode", choices=("memory", "disk"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    setup(args.threads)
    if args.part_b_mode:
        print(json.dumps(part_b_one(args.part_b_mode, args.deit_iters, args.deit_images, args.chunk_size)))
        return 0
    models, missing = available(args.models)
    rows = part_a(models, args.ref_iters)
    if not args.skip_deit_small:
        rows += part_b(args.deit_iters, args.deit_images, args.chunk_size, args.threads)
    path = OUT.with_suffix(".json")
    path.unlink(missing_ok=True)  # one consistent measurement per file
    save_rows(path, rows, {"missing_models": missing, "ref_iters": args.ref_iters, "deit_iters": args.deit_iters})
    write_report(path)
    return 0


def write_report(path: Path) -> None:
    d = json.loads(path.read_text())
    rows, meta = d["rows"], d["meta"]
    lines = [f"# Reconstruction cost on the CPU ({meta.get('threads', 1)} thread, {meta.get('machine', '')})", "",
             "Seconds per 1k iterations = median over the units of one kind of (training-loop time / iterations), "
             "batch 32, AdaRound + LSQ + QDrop 0.5. The CPU is shared with other jobs: treat as order of magnitude.", ""]
    if meta.get("missing_models"):
        lines += [f"Missing reference models: {', '.join(meta['missing_models'])}.", ""]
    a = [r for r in rows if r["part"] == "A"]
    if a:
        lines += [f"## Reference models ({meta['ref_iters']} iterations per unit, 1024 images)", "",
                  "| model | slicing | units | s / 1k it per unit (by unit kind) | total s | cache estimate GB |",
                  "|---|---|---|---|---|---|"]
        for r in a:
            costs = ", ".join(f"{k} {v:g}" for k, v in r["sec_per_1k_iters"].items())
            lines.append(f"| {r['model']} | {r['slicing']} | {r['units']} | {costs} | {r['seconds']:.0f} | "
                         f"{r['cache_estimate_gb']:.3f} |")
    b = [r for r in rows if r["part"] == "B"]
    if b:
        lines += ["", f"## DeiT-Small sized (timm deit_small_patch16_224, random weights), {b[0]['images']} images "
                      f"224x224, block units, {b[0]['iters']} iterations per unit, chunks of {b[0]['chunk_size']}", "",
                  "| caches | estimate GB | peak RSS MB | baseline RSS MB | peak - baseline GB | total s | "
                  "s / 1k it per unit | s per unit outside training |", "|---|---|---|---|---|---|---|---|"]
        for r in b:
            costs = ", ".join(f"{k} {v:g}" for k, v in r["sec_per_1k_iters"].items())
            lines.append(f"| {r['mode']} | {r['cache_estimate_gb']:.3f} | {r['peak_rss_mb']:.0f} | "
                         f"{r['baseline_rss_mb']:.0f} | {r['peak_minus_baseline_gb']:.3f} | {r['seconds']:.0f} | {costs} | "
                         f"{r['unit_seconds_excl_training']:.1f} |")
    write_md(path.with_suffix(".md"), lines)


if __name__ == "__main__":
    raise SystemExit(main())
