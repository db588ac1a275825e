#!/usr/bin/env python
"""Reconstruction recipes on every reference model: brecq, qdrop, oas, repq, and qdrop-repq / oas-repq.

    python -m bench.recon                               # W4A4 and W3A3, every reference model present
    python -m bench.recon --bits W4A4 --models fmnist-vit --iters 200

CPU budget: ``--iters`` iterations per unit (default 200, published 20k; BRECQ's activation pass
5k) with learning rates scaled by ``--lr-scale`` (default 10). brecq / qdrop / oas share one
quantizer set-up (weights per-channel, activations per-tensor, MSE-searched ranges, 1024 images), so
one calibration per (model, bits) serves all three; its seconds are added to each row, and the
``calib only`` row is that set-up without reconstruction. repq runs its own recipe end to end.
Writes ``bench/results/reconstruction.{json,md}``; rows are cached in the JSON (``--fresh`` redoes them).
A recipe name with a file ``bench/recipes/NAME.yaml`` (experimental compositions, not shipped) runs
like the reconstruction recipes (``--recipes qdrop-repqfull --name recon_variants --no-calib-only``).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from bench.common import (  # noqa: E402
    MODELS,
    OAS_VALIDATE,
    RESULTS,
    Data,
    available,
    bench_recipe,
    bench_record,
    calibrate_once,
    has_recipe,
    load_rows,
    quantize_row,
    run_rest,
    same_setup,
    save_rows,
    setup,
    write_md,
)
from vitq.evaluate import evaluate  # noqa: E402
from vitq.reference import load_reference  # noqa: E402
from vitq.run import Trial, manifest_digest  # noqa: E402

log = logging.getLogger("bench.recon")
OUT = RESULTS / "reconstruction"
RECON = ["brecq", "qdrop", "oas"]
#: reconstruction on a RepQ-ViT start (channel-wise post-LN calibration + reparameterization): our compositions
RECON_REPQ = ["qdrop-repq", "oas-repq"]
#: extra rows: the oas recipe with its optional short-run validation instead of the proxy
VARIANTS = {"oas-validate": ("oas", OAS_VALIDATE)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=MODELS)
    ap.add_argument("--bits", nargs="*", default=["W4A4", "W3A3"])
    ap.add_argument("--recipes", nargs="*", default=RECON + ["repq"] + RECON_REPQ)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--lr-scale", type=float, default=10.0)
    ap.add_argument("--eval-size", type=int, default=None)
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--seed", type=int, default=0, help="calibration sample and training seed")
    ap.add_argument("--name", default="reconstruction", help="results file stem in bench/results/")
    ap.add_argument("--no-calib-only", action="store_true", help="skip the calib-only rows")
    args = ap.parse_args()
    setup()
    models, missing = available(args.models)
    recipes = [r for r in args.recipes if has_recipe(VARIANTS.get(r, (r,))[0]) or bench_recipe(r) is not None]
    absent = [r for r in args.recipes if r not in recipes]
    if missing:
        log.warning("missing reference models (skipped): %s", ", ".join(missing))
    if absent:
        log.warning("recipes not available (skipped): %s", ", ".join(absent))
    path = (RESULTS / args.name).with_suffix(".json")
    if args.fresh:
        path.unlink(missing_ok=True)
    rows = load_rows(path)
    meta = {"iters_per_unit": args.iters, "lr_scale": args.lr_scale, "calib_size": 1024, "seed": args.seed,
            "missing_models": missing, "missing_recipes": absent}
    ov = {"iters": args.iters, "lr_scale": args.lr_scale}

    def done(name: str, recipe: str, bits: str) -> bool:
        return any(r["model"] == name and r["recipe"] == recipe and r["bits"] == bits
                   and r.get("iters") in (args.iters, 0, None) and r.get("lr_scale") in (args.lr_scale, None)
                   for r in rows)

    loaded: dict[str, tuple] = {}
    fps: dict[str, dict[str, Any]] = {}  # the float model's evaluation, per model
    for bits, name in [(b, n) for b in args.bits for n in models]:  # every model at the first bits first
        if name not in loaded:
            m = load_reference(name)
            loaded[name] = (m, Data(m, 1024, args.eval_size, seed=args.seed))
        model, data = loaded[name]
        fp_eval = fps.get(name)
        todo = [r for r in recipes if not done(name, r, bits)]
        shared = [r for r in todo if (r in RECON or r in VARIANTS) and same_setup(VARIANTS.get(r, (r,))[0], "qdrop")]
        if not todo and (args.no_calib_only or done(name, "calib-only", bits)):
            continue
        fp_eval = fps[name] = fp_eval if fp_eval is not None else evaluate(model, data.eval_loader)
        if shared or (not args.no_calib_only and not done(name, "calib-only", bits)):
            qcal, cal_s, cal_rss = calibrate_once(model, "qdrop", bits, data, seed=args.seed)
            if not args.no_calib_only and not done(name, "calib-only", bits):
                t = Trial(args.seed, qcal, evaluate(qcal, data.eval_loader), cal_s, data.calib.shape[0], cal_rss,
                          manifest_digest(qcal))
                rows.append({**bench_record(name, t, fp_eval, "calib-only", bits), "iters": 0})
                save_rows(path, rows, meta)
            for recipe in shared:
                log.info("%s %s %s", name, bits, recipe)
                base, extra = VARIANTS.get(recipe, (recipe, {}))
                q, secs, rss = run_rest(qcal, base, bits, data, {**ov, **extra}, seed=args.seed)
                t = Trial(args.seed, q, evaluate(q, data.eval_loader), cal_s + secs, data.calib.shape[0], max(rss, cal_rss),
                          manifest_digest(q))
                row = bench_record(name, t, fp_eval, recipe, bits, {**ov, **extra})
                rows.append({**row, "lr_scale": args.lr_scale, "recon_seconds": round(secs, 1),
                             "oas_chosen": (row["oas"] or {}).get("chosen")})
                save_rows(path, rows, meta)
                del q
            del qcal
        for recipe in [r for r in todo if r not in shared]:
            log.info("%s %s %s (own calibration)", name, bits, recipe)
            recon = recipe in RECON or recipe in RECON_REPQ or bench_recipe(recipe) is not None
            source = bench_recipe(recipe) or recipe  # bench/recipes/ compositions run like the reconstruction recipes
            row = quantize_row(name, model, data, source, bits, ov if recon else None, seed=args.seed, fp=fp_eval)
            row.update({"recipe": recipe, "lr_scale": args.lr_scale if recon else None})
            rows.append(row)
            save_rows(path, rows, meta)
    save_rows(path, rows, meta)
    write_report(path)
    return 0


def write_report(path: Path) -> None:
    d = json.loads(path.read_text())
    rows, meta = d["rows"], d["meta"]
    order = {"calib-only": 0, "repq": 1, "brecq": 2, "qdrop": 3, "oas": 4, "oas-validate": 5, "qdrop-repq": 6, "oas-repq": 7}
    lines = [f"# Reconstruction recipes ({meta['iters_per_unit']} iterations per unit, learning rates x{meta['lr_scale']:g})",
             "", "Published settings are 20k iterations per unit (BRECQ's activation pass 5k); on the shared 2-core CPU "
             f"every reconstruction pass runs {meta['iters_per_unit']} iterations per unit with its learning rates "
             f"multiplied by {meta['lr_scale']:g}. 1024 calibration images; top-1 on the Fashion-MNIST test split; "
             "seconds = calibration + reconstruction wall time (1 thread); peak RSS of the run. "
             f"Seed (calibration sample, training) {meta.get('seed', 0)}.",
             "`calib only` = the shared brecq/qdrop/oas quantizer set-up (MSE-searched ranges) without reconstruction. "
             "`qdrop-repq` / `oas-repq` (our compositions [R]): the same reconstruction on a RepQ-ViT start "
             "(post-LayerNorm activations calibrated channel-wise and reparameterized to per-tensor). "
             "`oas` / `oas-repq` rows select the slicing by the outlier proxy (`select: proxy`, the recipes' default "
             "until 2026-11-28; the default is now the guarded validation, bench/results/oas_guard.md); "
             "`oas-validate` = the plain smallest-KL validation. "
             "Recipes from `bench/recipes/` are experimental compositions described in their YAML.", ""]
    if meta.get("note"):
        lines += [f"Note: {meta['note']}", ""]
    if meta.get("missing_models"):
        lines += [f"Missing models (not trained yet): {', '.join(meta['missing_models'])}."]
    if meta.get("missing_recipes"):
        lines += [f"Missing recipes (not built yet): {', '.join(meta['missing_recipes'])}."]
    lines += ["", "| model | bits | recipe | slicing | FP | top-1 | drop | seconds | peak RSS MB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["model"], r["bits"] != "W4A4", order.get(r["recipe"], 9))):
        lines.append(f"| {r['model']} | {r['bits']} | {r['recipe']} | {r.get('slicing') or '-'} | {r['fp_top1']:.2f} | "
                     f"{r['q_top1']:.2f} | {r['fp_top1'] - r['q_top1']:+.2f} | {r['calib_seconds']:.0f} | "
                     f"{r.get('peak_rss_mb', 0):.0f} |")
    write_md(path.with_suffix(".md"), lines)


if __name__ == "__main__":
    raise SystemExit(main())
