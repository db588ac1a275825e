#!/usr/bin/env python
"""Does a larger reconstruction budget change the W4A4 ranking? (issue target: oas >= qdrop >= repq)

    python -m bench.studies.recon_budget --models fmnist-deit --recipes qdrop oas-repq --iters 200 1000

Each row: the recipe end to end (its own calibration, 1024 images) with ``--iters`` iterations per unit
and the learning rates scaled by ``--lr-scale`` (bench/recon.py's CPU convention), top-1 on the whole
Fashion-MNIST test split. Rows merge into ``bench/results/recon_budget.{json,md}``; rows already there
(same model, recipe, bits, iterations, lr scale) are skipped.
"""

from __future__ import annotations

import argparse
import json

from bench.common import RESULTS, Data, load_rows, quantize_row, save_rows, setup  # noqa: E402
from vitq.evaluate import evaluate  # noqa: E402
from vitq.reference import load_reference  # noqa: E402

OUT = RESULTS / "recon_budget.json"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["fmnist-deit"])
    ap.add_argument("--recipes", nargs="+", default=["qdrop", "oas-repq"])
    ap.add_argument("--bits", default="W4A4")
    ap.add_argument("--iters", nargs="+", type=int, default=[200, 1000])
    ap.add_argument("--lr-scale", type=float, default=10.0)
    args = ap.parse_args()
    setup()
    rows = load_rows(OUT)
    meta = {"bits": args.bits, "calib_size": 1024}
    for name in args.models:
        model = load_reference(name)
        data = Data(model, 1024, None)
        fp = evaluate(model, data.eval_loader)
        for recipe in args.recipes:
            for iters in args.iters:
                if any(r["model"] == name and r["recipe"] == recipe and r["bits"] == args.bits
                       and r["iters"] == iters and r["lr_scale"] == args.lr_scale for r in rows):
                    continue
                row = quantize_row(name, model, data, recipe, args.bits, {"iters": iters, "lr_scale": args.lr_scale},
                                   fp=fp)
                row.update({"lr_scale": args.lr_scale, "iters": iters})
                print(f"{name} {recipe} {args.bits} iters {iters}: {row['q_top1']:.2f} ({row['calib_seconds']:.0f} s)",
                      flush=True)
                rows.append(row)
                save_rows(OUT, rows, meta)
    write_report()
    return 0


def write_report() -> None:
    rows = json.loads(OUT.read_text())["rows"]
    lines = ["# Reconstruction budget (bench/studies/recon_budget.py)", "",
             "Top-1 on the whole Fashion-MNIST test split; 1024 calibration images; iterations per unit, learning "
             "rates x lr scale (bench/recon.py's CPU convention); seconds = calibration + reconstruction, 1 thread.",
             "", "| model | bits | recipe | iters / unit | lr scale | slicing | FP | top-1 | drop | seconds |",
             "|---|---|---|---:|---:|---|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["model"], r["bits"], r["recipe"], r["iters"])):
        lines.append(f"| {r['model']} | {r['bits']} | {r['recipe']} | {r['iters']} | {r['lr_scale']:g} | "
                     f"{r.get('slicing') or '-'} | {r['fp_top1']:.2f} | {r['q_top1']:.2f} | "
                     f"{r['fp_top1'] - r['q_top1']:+.2f} | {r['calib_seconds']:.0f} |")
    OUT.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
