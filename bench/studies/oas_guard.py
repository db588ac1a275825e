#!/usr/bin/env python
"""Does OAS's validation need a guard? The selection step alone, over seeds, at the 2000-iteration setting.

    python -m bench.studies.oas_guard --models fmnist-deit --seeds 0 1 2 3 4              # the 2000-iteration setting
    python -m bench.studies.oas_guard --setting it200 --models fmnist-deit --seeds 0 1 2  # the 200-iteration one
    python -m bench.studies.oas_guard --end-to-end --models fmnist-deit --seeds 2   # + the whole guarded oas run
    python -m bench.studies.oas_guard --report-only

``oas@validate@val_iters=200@it2000`` (bench/studies/significance.py, group ``select``) reconstructs every
candidate slicing for 200 iterations per unit, ranks them by the KL of the logits on 128 held-out
calibration images, and runs the winner for 2000 iterations. On DeiT the winner was often not
``block`` and lost to ``qdrop@it2000`` (block units) over five seeds. This benchmark re-runs only the
selection step, same calibration sample, same settings, with the guard (``prefer: block``,
``switch_p``: leave block only for a candidate whose held-out KL is lower by a paired z-test over
the held-out images), and reports per seed:

* every candidate's held-out KL and its p against ``block``;
* the plain rule's pick (smallest KL), checked against the pick recorded in
  ``bench/results/significance.json`` for the same seed (the run is bit-reproducible on one machine);
* the guarded pick at switch_p 0.05 and 0.01;
* the top-1 that pick leads to at 2000 iterations, where it is known without a new run: ``block`` is
  exactly ``qdrop@it2000`` (same calibration, same units, same seeds: the select group's rows where
  validation picked ``block`` have 0 discordant images against it), and the plain rule's pick is the
  recorded ``oas@validate`` row.

``--setting published`` is the ``oas`` recipe exactly as shipped (the published learning rates, not x10;
its final 20k-iteration run is significance.py's ``qdrop@it20000`` row, group ``published``, wherever the
guard keeps ``block``). ``--setting it2000-v512`` holds out 512 images instead of 128 (a test with more power: does the guard
then switch, and to what?). ``--setting it200`` does the same for ``oas@validate`` (50 validation iterations per candidate, then
200; beside ``qdrop``). Results: ``bench/results/oas_guard.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from typing import Any

from bench.common import (  # noqa: E402
    RESULTS,
    Data,
    calibrate_once,
    machine_meta,
    run_rest,
    save_rows,
    scaled_recipe,
    setup,
)
from vitq.bits import Bits  # noqa: E402
from vitq.evaluate import evaluate  # noqa: E402
from vitq.passes.oas import _recon_config, guard_winner, select_slicing  # noqa: E402
from vitq.pipeline import Context  # noqa: E402
from vitq.recon.engine import collect_images, float_copy  # noqa: E402
from vitq.reference import load_reference  # noqa: E402
from vitq.state import state_of  # noqa: E402

BITS = "W4A4"
#: name -> (oas pass overrides, the plain rule's row and its qdrop row in significance.json's select group)
SETTINGS: dict[str, tuple[dict[str, Any], str, str]] = {
    "it2000": ({"iters": 2000, "lr_scale": 10.0, "select": "validate", "val_iters": 200, "val_images": 128,
                "prefer": "block", "switch_p": 0.05}, "oas@validate@val_iters=200@it2000", "qdrop@it2000"),
    "it2000-v512": ({"iters": 2000, "lr_scale": 10.0, "select": "validate", "val_iters": 200, "val_images": 512,
                     "prefer": "block", "switch_p": 0.05},
                    "oas@validate@val_iters=200@val_images=512@it2000", "qdrop@it2000"),
    "it200": ({"iters": 200, "lr_scale": 10.0, "select": "validate", "val_iters": 50, "val_images": 128,
               "prefer": "block", "switch_p": 0.05}, "oas@validate", "qdrop"),
    # the oas recipe as shipped (published learning rates, 20k iterations after the selection)
    "published": ({"iters": 20000, "lr_scale": 1.0, "select": "validate", "val_iters": 200, "val_images": 128,
                   "prefer": "block", "switch_p": 0.05}, "oas@it20000", "qdrop@it20000"),
}
THRESHOLDS = (0.05, 0.01)
OUT = RESULTS / "oas_guard.json"


def recorded(model: str, setting: str) -> dict[int, dict[str, Any]]:
    """Per seed: the plain rule's recorded pick and the top-1 of it and of the qdrop row (significance.json,
    group ``select``); seeds with no recorded plain-rule run get the qdrop row's top-1 from any group."""
    _, plain, qdrop = SETTINGS[setting]
    doc = json.loads((RESULTS / "significance.json").read_text())
    out: dict[int, dict[str, Any]] = {}
    for c in doc["comparisons"]:
        if c["group"] == "select" and c["model"] == model and c["a"] == qdrop and c["b"] == plain:
            for s in c["per_seed"]:
                out[s["seed"]] = {"slicing": s.get("slicing_b"), "top1_plain": s["top1_b"], "top1_qdrop": s["top1_a"],
                                  "discordant": s["only_a_correct"] + s["only_b_correct"]}
    # seeds with a qdrop row but no recorded plain-rule run (another group measured qdrop): top-1 of block only
    for c in doc["comparisons"]:
        if c["model"] == model and qdrop in (c["a"], c["b"]):
            side = "a" if c["a"] == qdrop else "b"
            for s in c["per_seed"]:
                out.setdefault(s["seed"], {"slicing": None, "top1_plain": None, "top1_qdrop": s[f"top1_{side}"]})
    return out


def pick_at(cands: list[dict[str, Any]], t: float) -> str:
    """The guarded rule's pick at threshold ``t`` from a record made with any threshold (means + p's)."""
    return guard_winner({c["slicing"]: c["val_kl"] for c in cands},
                        {c["slicing"]: c["val_p_vs_prefer"] for c in cands if "val_p_vs_prefer" in c}, "block", t)


def select_row(model_name: str, seed: int, setting: str) -> dict[str, Any]:
    model = load_reference(model_name)
    data = Data(model, 1024, None, seed=seed)
    qcal, _, _ = calibrate_once(model, "qdrop", BITS, data, seed=seed)
    opts = dict(scaled_recipe("oas", SETTINGS[setting][0]).passes[-1].options)
    q, ctx = copy.deepcopy(qcal), Context(calib=data.calib, bits=Bits.parse(BITS), seed=seed, batch_size=64)
    cfg = _recon_config(opts)
    t0 = time.perf_counter()
    fp = float_copy(q, ctx)
    images = collect_images(ctx, cfg.num_samples, desc="oas")
    keys = ("candidates", "select", "tau", "val_iters", "val_images", "top_k", "outlier_images", "prefer", "switch_p")
    rec = select_slicing(q, ctx, cfg, images, fp, **{k: opts[k] for k in keys if k in opts})
    return {"setting": setting, "model": model_name, "seed": seed, "bits": BITS, "options": SETTINGS[setting][0],
            "seconds": round(time.perf_counter() - t0, 1), "plain_pick": rec["smallest_kl"],
            "candidates": rec["candidates"], **{f"guard_{t}": pick_at(rec["candidates"], t) for t in THRESHOLDS}}


def end_to_end(model_name: str, seed: int, setting: str) -> dict[str, Any]:
    """The whole ``oas`` pass (guarded selection, then the final reconstruction) as the recipe runs it: the
    check that a guarded pick of ``block`` reproduces the qdrop row's top-1."""
    model = load_reference(model_name)
    data = Data(model, 1024, None, seed=seed)
    qcal, cal_s, _ = calibrate_once(model, "qdrop", BITS, data, seed=seed)
    q, secs, _ = run_rest(qcal, "oas", BITS, data, SETTINGS[setting][0], seed=seed)
    res = evaluate(q, data.eval_loader)
    return {"e2e_top1": round(res["top1"], 2), "e2e_slicing": state_of(q).oas["chosen"], "e2e_seconds": round(cal_s + secs, 1)}


def outcome(row: dict[str, Any], pick: str, rec: dict[int, dict[str, Any]]) -> float | None:
    r = rec.get(row["seed"])
    if r is None:
        return None
    if pick == "block":
        return r["top1_qdrop"]
    return r["top1_plain"] if pick == r["slicing"] else None


def render(rows: list[dict[str, Any]]) -> str:
    lines = ["# OAS validation with and without the guard (bench/studies/oas_guard.py)", "",
             "W4A4, 1024 calibration images (seeded), the select group's setting: every candidate 200 iterations per "
             "unit (lr x10), KL(FP logits || quantized logits) on the last 128 calibration images. `p` = paired z-test "
             "of the per-image KL against `block`'s. Plain = smallest KL (the rule behind `oas@validate` in "
             "significance.md); guard = `prefer: block`, leave it only for a lower KL with p < switch_p. Top-1 at 2000 "
             "iterations per unit: `block` = `qdrop@it2000`'s row, the plain pick = the recorded `oas@validate` row "
             "(bench/results/significance.json, same seed); `?` = not measured. Setting `it200`: 50 validation "
             "iterations, final run 200 iterations, beside `qdrop` and `oas@validate`. Where the guard keeps "
             "`block`, its top-1 is the qdrop row's by construction (same calibration, units and seeds); the "
             "end-to-end column runs the whole guarded `oas` pass to check that. Setting `it2000-v512`: as `it2000` "
             "with 512 held-out images (`oas@validate@val_iters=200@val_images=512@it2000`). Setting `published`: the "
             "`oas` recipe as shipped, learning rates as published (not x10), 200 validation iterations, final run 20k "
             "iterations, beside `qdrop@it20000` (significance.md, group `published`); the plain rule's pick was not "
             "run to the end there.", "",
             "| setting | model | seed | candidates: KL (p vs block) | plain pick (recorded) | guard 0.05 | guard 0.01 | "
             "top-1 plain | top-1 guard 0.05 | top-1 qdrop | seconds | end-to-end oas: slicing, top-1, seconds |",
             "|---|---|---:|---|---|---|---|---:|---:|---:|---:|---|"]
    by_model: dict[tuple[str, str], list[tuple[float | None, float | None, float | None]]] = {}
    for r in rows:
        rec = recorded(r["model"], r["setting"])
        known = rec.get(r["seed"], {})
        cands = ", ".join(f"{c['slicing']} {c['val_kl']:.4f}" + (f" ({c['val_p_vs_prefer']:.2g})" if "val_p_vs_prefer" in c
                                                                 else "") for c in r["candidates"])
        tp, tg = outcome(r, r["plain_pick"], rec), outcome(r, r["guard_0.05"], rec)
        tq = known.get("top1_qdrop")
        by_model.setdefault((r["setting"], r["model"]), []).append((tp, tg, tq))
        same = "" if not known.get("slicing") else (" (=)" if known["slicing"] == r["plain_pick"]
                                                     else f" (recorded {known['slicing']})")
        fmt = lambda v: "?" if v is None else f"{v:.2f}"  # noqa: E731
        lines.append(f"| {r['setting']} | {r['model']} | {r['seed']} | {cands} | {r['plain_pick']}{same} | {r['guard_0.05']} | "
                     f"{r['guard_0.01']} | {fmt(tp)} | {fmt(tg)} | {fmt(tq)} | {r['seconds']:.0f} | "
                     + (f"{r['e2e_slicing']}, {r['e2e_top1']:.2f}, {r['e2e_seconds']:.0f} |" if "e2e_top1" in r else "- |"))
    lines += ["", "| setting | model | seeds | plain - qdrop (mean) | guard 0.05 - qdrop (mean) | guard picks block |",
              "|---|---|---:|---:|---:|---:|"]
    for (st, m), vals in by_model.items():
        ok = [(p, g, q) for p, g, q in vals if None not in (p, g, q)]
        picks = sum(r["guard_0.05"] == "block" for r in rows if (r["setting"], r["model"]) == (st, m))
        if ok:
            lines.append(f"| {st} | {m} | {len(ok)} | {statistics.fmean(p - q for p, _, q in ok):+.2f} | "
                         f"{statistics.fmean(g - q for _, g, q in ok):+.2f} | {picks} / {len(vals)} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=["fmnist-deit", "fmnist-swin"])
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--setting", choices=list(SETTINGS), default="it2000")
    ap.add_argument("--end-to-end", action="store_true",
                    help="also run the whole guarded oas recipe (selection + final reconstruction) for these seeds")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    setup()
    if not args.report_only:
        for m in args.models:
            for s in args.seeds:
                have = {(r["setting"], r["model"], r["seed"]): r for r in json.loads(OUT.read_text())["rows"]} \
                    if OUT.is_file() else {}
                row = have.get((args.setting, m, s)) or select_row(m, s, args.setting)
                if args.end_to_end and "e2e_top1" not in row:
                    row = {**row, **end_to_end(m, s, args.setting)}
                save_rows(OUT, [row], {"bits": BITS, **machine_meta()}, key=("setting", "model", "seed"), sort=True)
    rows = json.loads(OUT.read_text())["rows"]
    OUT.with_suffix(".md").write_text(render(rows))
    print(OUT.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
