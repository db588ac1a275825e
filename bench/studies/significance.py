#!/usr/bin/env python
"""Are the accuracy gaps behind the open targets real? Paired tests on the same test images.

    python -m bench.studies.significance --group recon --models fmnist-deit      # repq / qdrop / oas, W4A4
    python -m bench.studies.significance --group dopq                            # repq / dopq on fmnist-swin, W4A4

Two quantized versions of one float model are wrong on mostly the same images, so their top-1
difference is judged on the *discordant* images only (one right, the other wrong): exact McNemar
test and the Wald 95 % interval of the paired difference (``vitq.evaluate.compare_paired``). That
is the test-set noise. The other noise source is the calibration sample, so every row is repeated
for ``--seeds`` (calibration sample and training seed), and the table also gives the mean and
spread of the difference over seeds.

Each group re-runs the rows of the benchmark whose target it checks, in that benchmark's own way:

* ``recon`` (issue 5, bench/recon.py): W4A4, 1024 calibration images for every recipe; qdrop and
  oas share one calibration (``calibrate_once``) and run 200 iterations per unit with learning
  rates x10; repq runs its own recipe on the same 1024 images.
* ``variants`` (issue 5): the recon group's repq / qdrop rows (shared cache) beside experimental
  compositions from ``bench/recipes/`` (QDrop with a log-sqrt2 or TanQ post-Softmax quantizer, QDrop
  on RepQ-ViT's complete start), each run end to end with the same iterations and lr scale.
* ``dopq`` (issue 4, bench/dopq.py): W4A4, repq on its recipe's 32 images, dopq on its recipe's
  256 images and 100 iterations per unit per stage; ``dopq@half`` is dopq with both reconstruction
  stages at half-block granularity (the finer units OAS argues Swin prefers); ``dopq@paper`` is dopq
  at the I&S-ViT setting its recipe cites (1024 calibration images, 1000 iterations per unit per
  stage, batch 64); ``dopq@loss=fisher_diag`` / ``dopq@half@loss=fisher_diag`` train both stages on
  BRECQ's Fisher-weighted error instead of MSE (our experiment, not DopQ's or I&S-ViT's objective);
  ``dopq@half@paper`` is the paper setting with half-block units (the two changes that each raised
  dopq on Swin, combined; a variant is written ``...@paper`` last so the calibration size follows);
  ``repq@calib256`` is repq on dopq's 256 calibration images instead of its recipe's 32 (the same
  images dopq sees: is a gain of dopq over repq the method or the larger calibration set?).
* ``budget`` (issue 5): does a larger reconstruction budget close the gap? The recon group's rows
  beside ``qdrop@itN`` / ``oas@itN`` (N = 1000 or 2000 iterations per unit instead of 200, same lr
  scale; ``--recipes`` picks which), and ``qdrop@it2000`` against the ``published`` group's
  ``qdrop@it20000`` (is the CPU shortcut level with the recipe as shipped?).

* ``select`` (issue 5): OAS choosing its slicing by short-run validation (``oas@validate``: every
  candidate 50 iterations per unit, KL of the logits on 128 held-out calibration images, as
  bench/recon.py's ``oas-validate`` row) instead of the proxy, beside the recon group's rows, and
  ``oas@validate@it1000`` beside the budget group's 1000-iteration rows; the per-seed table names
  the slicing it picked; ``oas@validate@val_iters=200@it2000`` asks whether validation runs of 10 % of
  the final budget pick the slicing that wins at 2000 iterations (beside the budget group's rows), and
  ``...@val_images=512@it2000`` whether a 4x larger held-out set (less noise in the KL that ranks the
  candidates) steadies that pick. The cache keeps every candidate's proxy score and validation KL.
* ``published`` (issue 5): the recipes as a user runs them, no CPU shortcut: ``qdrop@it20000`` is the
  ``qdrop`` recipe unchanged (20k iterations per block at the published learning rates, 1024
  calibration images, batch 32), beside ``repq`` on its recipe's own calibration set and
  ``repq@calib1024`` on the same 1024 images qdrop sees. Each seed costs about 1.5-2 CPU hours per
  qdrop row (bench/results/archive/recon_cost.md).
* ``objective`` (issue 5): reconstruction on RepQ-ViT's complete start (``qdrop-repqfull``) loses to
  repq on Swin although every unit's loss falls. Is it what the reconstruction trains (``acts=none``:
  AdaRound only, RepQ's activation ranges kept) or what it minimises (``loss=fisher_diag``: BRECQ's
  Fisher-weighted error instead of MSE)? ``qdrop@loss=fisher_diag@it2000`` asks whether Fisher's gain
  on plain qdrop at 200 iterations survives at 2000 (beside the budget group's ``qdrop@it2000``).

A recipe name ``base@variant`` is ``base`` changed by ``variant``, and variants chain
(``oas@validate@it1000``): a slicing (``half``, ``block``, ...), ``itN`` (N iterations per unit),
``paper`` (the setting above), ``calibN`` (N calibration images; dopq group), ``validate`` (OAS selection by short-run validation) or ``key=value``
(any reconstruction option: ``acts=none``, ``loss=fisher_diag``, ``val_iters=200``).

Rows named ``oas`` / ``oas@itN`` select OAS's slicing by the outlier proxy, the recipe's default until
2026-11-28 (``bench.common.OAS_BENCH_SELECT`` pins it); bench/studies/oas_guard.py measures today's default.

Per-image predictions and log-losses are cached in ``bench/cache/significance/`` (an interrupted run
continues); the comparisons go to ``bench/results/significance.{json,md}``. Rows cached before
log-losses were kept are re-run by ``--add-nll``, which also logs how many of the 10 000 top-1
predictions differ from the cached run (a reproducibility check). Where both rows of a pair have
log-losses, a second table compares the test log-loss (paired z-test, ``compare_paired``) beside the
float model's, as the share of A's excess log-loss over FP that B removes.
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import logging
import re
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from bench.common import (  # noqa: E402
    OAS_VALIDATE,
    RESULTS,
    ROOT,
    Data,
    FashionData,
    bench_recipe,
    calibrate_once,
    file_lock,
    machine_meta,
    run_rest,
    scaled_recipe,
    setup,
)
from vitq.bits import Bits  # noqa: E402
from vitq.evaluate import (  # noqa: E402
    Predictions,
    compare_paired,
    compare_pooled,
    detectable_difference,
    evaluate,
)
from vitq.passes.oas import OAS_DEFAULTS  # noqa: E402
from vitq.pipeline import Context, run_recipe  # noqa: E402
from vitq.recipes import (  # noqa: E402
    load_recipe,  # noqa: E402
    override_pass_options,
    parse_assignments,
)
from vitq.reference import load_reference  # noqa: E402
from vitq.state import state_of  # noqa: E402

CACHE = ROOT / "bench" / "cache" / "significance"
GROUPS: dict[str, dict[str, Any]] = {
    "recon": {"models": ["fmnist-deit", "fmnist-swin"], "recipes": ["repq", "qdrop", "oas"],
              "pairs": [("repq", "qdrop"), ("qdrop", "oas"), ("repq", "oas")], "issue": 5,
              "target": "oas >= qdrop >= repq at W4A4"},
    "variants": {"models": ["fmnist-deit", "fmnist-swin"],
                 "recipes": ["repq", "qdrop", "qdrop-logsqrt2", "qdrop-tanq", "qdrop-repqfull"],
                 "pairs": [(a, v) for v in ("qdrop-logsqrt2", "qdrop-tanq", "qdrop-repqfull") for a in ("repq", "qdrop")],
                 "issue": 5, "target": "where the qdrop - repq gap comes from (bench/recipes/*.yaml)"},
    "dopq": {"models": ["fmnist-swin"],
             "recipes": ["repq", "dopq", "dopq@half", "dopq@paper", "dopq@loss=fisher_diag",
                         "dopq@half@loss=fisher_diag", "dopq@half@paper", "repq@calib256"],
             "pairs": [("repq", "dopq"), ("repq", "dopq@half"), ("dopq", "dopq@half"),
                       ("repq", "dopq@paper"), ("dopq", "dopq@paper"),
                       ("repq", "dopq@loss=fisher_diag"), ("dopq", "dopq@loss=fisher_diag"),
                       ("repq", "dopq@half@loss=fisher_diag"), ("dopq@half", "dopq@half@loss=fisher_diag"),
                       ("repq", "dopq@half@paper"), ("dopq@paper", "dopq@half@paper"),
                       ("repq", "repq@calib256"), ("repq@calib256", "dopq"), ("repq@calib256", "dopq@half")],
             "issue": 4,
             "target": "dopq >= repq at W4A4"},
    "budget": {"models": ["fmnist-deit", "fmnist-swin"],
               "recipes": ["repq", "qdrop", "oas", "qdrop@it1000", "oas@it1000", "qdrop@it2000", "oas@it2000"],
               "pairs": [(a, b) for n in (1000, 2000) for a, b in
                         (("qdrop", f"qdrop@it{n}"), ("repq", f"qdrop@it{n}"), ("oas", f"oas@it{n}"),
                          (f"qdrop@it{n}", f"oas@it{n}"), ("repq", f"oas@it{n}"))]
                        # the 2000-iteration CPU shortcut (lr x10) against the recipe as shipped (published group's row)
                        + [("qdrop@it2000", "qdrop@it20000")], "issue": 5,
               "target": "oas >= qdrop >= repq at W4A4 with 5x / 10x the reconstruction iterations"},
    "select": {"models": ["fmnist-deit", "fmnist-swin"],
               "recipes": ["repq", "qdrop", "oas", "oas@validate", "qdrop@it1000", "oas@it1000", "oas@validate@it1000",
                           "qdrop@it2000", "oas@it2000", "oas@validate@val_iters=200@it2000",
                           "oas@validate@val_iters=200@val_images=512@it2000"],
               "pairs": [(a, f"oas@validate{v}{n}") for v, n in (("", ""), ("", "@it1000"), ("@val_iters=200", "@it2000"),
                                                                  ("@val_iters=200@val_images=512", "@it2000"))
                         for a in (f"oas{n}", f"qdrop{n}", "repq")],
               "issue": 5,
               "target": "oas >= qdrop >= repq at W4A4 when OAS picks its slicing by short-run validation"},
    "published": {"models": ["fmnist-deit", "fmnist-swin", "fmnist-vit"],
                  "recipes": ["repq", "repq@calib1024", "qdrop@it20000"],
                  "pairs": [("repq", "qdrop@it20000"), ("repq@calib1024", "qdrop@it20000")],
                  "issue": 5,
                  "target": "qdrop >= repq at W4A4 with the recipes as shipped (20k iterations, published learning rates)"},
    "objective": {"models": ["fmnist-deit", "fmnist-swin"],
                  "recipes": ["repq", "qdrop", "qdrop-repqfull", "qdrop-repqfull@acts=none",
                              "qdrop-repqfull@loss=fisher_diag", "qdrop@loss=fisher_diag",
                              "qdrop@it2000", "qdrop@loss=fisher_diag@it2000"],
                  "pairs": [(a, b) for b in ("qdrop-repqfull@acts=none", "qdrop-repqfull@loss=fisher_diag")
                            for a in ("repq", "qdrop-repqfull")]
                           + [("repq", "qdrop@loss=fisher_diag"), ("qdrop", "qdrop@loss=fisher_diag"),
                              ("repq", "qdrop@loss=fisher_diag@it2000"),
                              ("qdrop@it2000", "qdrop@loss=fisher_diag@it2000")],
                  "issue": 5,
                  "target": "does reconstruction lose to repq because of what it trains or what it minimises?"},
}
#: groups that run in bench/recon.py's way (shared calibration, scaled iterations and learning rates)
RECON_GROUPS = ("recon", "variants", "budget", "select", "objective")
PAPER, PAPER_CALIB_SIZE = {"iters": 1000, "batch_size": 64}, 1024  # dopq@paper: I&S-ViT's setting
BITS = "W4A4"
log = logging.getLogger("bench.significance")


def variant_options(recipe: str) -> dict[str, Any]:
    """Pass-option overrides of ``base@variant[@variant...]`` (see the module docstring); {} for a plain name."""
    out: dict[str, Any] = {}
    for v in recipe.split("@")[1:]:
        if v == "paper":
            out.update(PAPER)
        elif v == "validate":
            out.update(OAS_VALIDATE)
        elif re.fullmatch(r"calib\d+", v):
            continue  # the calibration size, not a pass option (see calib_size)
        elif re.fullmatch(r"it\d+", v):
            out["iters"] = int(v[2:])
        elif "=" in v:  # any reconstruction option: acts=none, loss=fisher_diag, ...
            k = v.split("=", 1)[0]
            if k not in OAS_DEFAULTS:  # every reconstruct / oas pass option (a typo must not be a silent no-op)
                raise SystemExit(f"variant {v!r} of {recipe}: {k!r} is not a reconstruction option; "
                                 f"use one of {', '.join(sorted(OAS_DEFAULTS))}")
            out.update(parse_assignments([v], flag=f"variant of {recipe}:"))
        else:
            out["slicing"] = v
    return out


def calib_size(recipe: str, default: int) -> int:
    """Calibration images for ``recipe`` in a non-recon group: ``@calibN`` sets N, a trailing ``@paper``
    the paper setting's count, else the recipe's own ``default``."""
    sizes = [int(v[5:]) for v in recipe.split("@")[1:] if re.fullmatch(r"calib\d+", v)]
    return sizes[-1] if sizes else PAPER_CALIB_SIZE if recipe.endswith("@paper") else default


def cache_path(group: str, model: str, recipe: str, seed: int) -> Path:
    if recipe == "qdrop@it20000":  # only the published group runs it (published learning rates); others pair with it
        group = "published"
    if group in RECON_GROUPS:
        # a recipe that another recon-style group already measured the same way is the same row: share it
        if recipe in ("repq", "qdrop", "oas"):
            group = "recon"
        elif re.fullmatch(r"(qdrop|oas)@it\d+", recipe):
            group = "budget"
        elif recipe in GROUPS["variants"]["recipes"]:
            group = "variants"
    return CACHE / f"{group}_{model}_{recipe}_{BITS}_s{seed}.pt"


def needs_run(path: Path, add_nll: bool) -> bool:
    """No cached predictions yet, or (``--add-nll``) cached ones from before per-image log-losses were kept."""
    return not path.is_file() or (add_nll and torch.load(path).get("nll") is None)


def run_group(group: str, models: list[str], seeds: list[int], iters: int, lr_scale: float,
              only: list[str] | None = None, add_nll: bool = False) -> None:
    g = GROUPS[group]
    for name in models:
        model = load_reference(name)
        for seed in seeds:
            todo = [r for r in g["recipes"]
                    if (not only or r in only) and needs_run(cache_path(group, name, r, seed), add_nll)]
            if not todo:
                continue
            if group in RECON_GROUPS:
                data = Data(model, 1024, None, seed=seed)
                loader = data.eval_loader
                for r in [r for r in todo if bench_recipe(r.split("@")[0])]:
                    todo.remove(r)
                    rec = scaled_recipe(bench_recipe(r.split("@")[0]),
                                        {"iters": iters, "lr_scale": lr_scale, **variant_options(r)})
                    run_and_keep(group, name, r, seed, model, rec, data.calib, loader)
                shared = [r for r in todo if r != "repq"]
                if shared:
                    qcal, cal_s, _ = calibrate_once(model, "qdrop", BITS, data, seed=seed)
                    for r in shared:
                        ov = {"iters": iters, "lr_scale": lr_scale, **variant_options(r)}
                        q, secs, _ = run_rest(qcal, r.split("@")[0], BITS, data, ov, seed=seed)
                        keep(group, name, r, seed, evaluate(q, loader), cal_s + secs, oas_choice(q))
                if "repq" in todo:
                    run_and_keep(group, name, "repq", seed, model, load_recipe("repq"), data.calib, loader)
            else:
                fd = FashionData(model, None, seed)
                loader = fd.eval_loader
                for r in todo:
                    rec = load_recipe(r.split("@")[0])
                    if variant_options(r):  # the recipe's reconstruction passes changed (slicing, iterations, ...)
                        rec = override_pass_options(rec, **variant_options(r))
                    rec = replace(rec, calib_size=calib_size(r, rec.calib_size))
                    run_and_keep(group, name, r, seed, model, rec, fd.calib(rec.calib_size), loader)


def run_and_keep(group: str, name: str, r: str, seed: int, model: torch.nn.Module, recipe: Any,
                 calib: torch.Tensor, loader: Any) -> None:
    """One recipe end to end on a copy of ``model``; cache its predictions."""
    q, t0 = copy.deepcopy(model), time.perf_counter()
    run_recipe(q, recipe, Context(calib=calib, bits=Bits.parse(BITS), seed=seed, batch_size=64))
    keep(group, name, r, seed, evaluate(q, loader), time.perf_counter() - t0)


def oas_choice(q: torch.nn.Module) -> dict[str, Any] | None:
    """What an ``oas`` pass picked for ``q`` and every candidate's proxy / validation score (None for
    other recipes)."""
    rec = state_of(q).reconstruction or []
    return rec[-1]["oas"] if rec and "oas" in rec[-1] else None


def keep(group: str, model: str, recipe: str, seed: int, res: dict[str, Any], secs: float,
         oas: dict[str, Any] | None = None) -> None:
    p: Predictions = res["predictions"]
    path = cache_path(group, model, recipe, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    slicing = oas["chosen"] if oas else None
    rerun: dict[str, Any] = {}
    if path.is_file():  # --add-nll re-ran a cached row: is the run reproducible?
        old = torch.load(path)
        changed = int((old["top1"].long() != p.top1.long()).sum())
        rerun = {"rerun_changed_predictions": changed, "rerun_old_seconds": old["seconds"]}
        (log.warning if changed else log.info)("%s %s %s seed %d re-run: %d of %d top-1 predictions differ from the "
                                                "cached run", group, model, recipe, seed, changed, len(p.top1))
    torch.save({"top1": p.top1.to(torch.int16), "labels": p.labels.to(torch.int16), "seconds": secs,
                "nll": None if p.nll is None else p.nll.float(), "slicing": slicing,
                "oas_candidates": oas["candidates"] if oas else None, **rerun}, path)
    log.info("%s %s %s seed %d: top-1 %.2f (%.0f s)%s", group, model, recipe, seed, res["top1"], secs,
             f", slicing {slicing} of " + ", ".join(f"{c['slicing']} (proxy {c['proxy']:.3f}"
                                                     + (f", val KL {c['val_kl']:.5g})" if "val_kl" in c else ")")
                                                     for c in oas["candidates"]) if oas else "")


def fp_log_loss(model: str) -> float:
    """Mean test log-loss of the float model on the same 10 000 test images (cached): the floor that
    a quantized model's log-loss is measured against."""
    path = CACHE / f"fp_{model}.pt"
    if not path.is_file():
        m = load_reference(model)
        res = evaluate(m, FashionData(m).eval_loader)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"nll": res["predictions"].nll.float(), "top1": res["top1"]}, path)
    return float(torch.load(path)["nll"].double().mean())


def cached_seeds(group: str, model: str, recipe: str) -> set[int]:
    stem = cache_path(group, model, recipe, 0).name.removesuffix("0.pt")
    return {int(p.name[len(stem):-3]) for p in CACHE.glob(f"{glob.escape(stem)}*.pt") if p.name[len(stem):-3].isdigit()}


def collect(group: str, models: list[str]) -> list[dict[str, Any]]:
    """Every pair of the group over every seed cached for both recipes (not just this run's seeds, so a
    run for one more seed adds to the table instead of replacing it)."""
    g = GROUPS[group]
    out = []
    for name in models:
        for a, b in g["pairs"]:
            per_seed, preds = [], []
            for seed in sorted(cached_seeds(group, name, a) & cached_seeds(group, name, b)):
                pa, pb = cache_path(group, name, a, seed), cache_path(group, name, b, seed)
                if not (pa.is_file() and pb.is_file()):
                    continue
                da, db = torch.load(pa), torch.load(pb)
                pair = tuple(Predictions(d["top1"].long().unsqueeze(1), d["labels"].long(), d["seconds"], d.get("nll"))
                             for d in (da, db))
                preds.append(pair)
                c = compare_paired(*pair)
                per_seed.append({"seed": seed, **c.to_dict(), "significant_5pct": c.significant(),
                                 "seconds_a": round(da["seconds"], 1), "seconds_b": round(db["seconds"], 1),
                                 **{f"slicing_{k}": d["slicing"] for k, d in (("a", da), ("b", db)) if d.get("slicing")}})
            if per_seed:
                diffs = [r["diff"] for r in per_seed]
                fp = fp_log_loss(name) if any("nll_diff" in r for r in per_seed) else None
                # seeds share the test images: one test of the seed-averaged per-image differences (log-loss:
                # over the seeds whose runs kept it)
                with_nll = [(a_, b_) for a_, b_ in preds if a_.nll is not None and b_.nll is not None]
                pooled = {"pooled_p": compare_pooled(preds)["p_value"] if len(preds) > 1 else None,
                          "nll_pooled_p": compare_pooled(with_nll)["nll_p"] if len(with_nll) > 1 else None}
                out.append({"group": group, "issue": g["issue"], "model": name, "bits": BITS, "a": a, "b": b,
                            "fp_nll": fp, **pooled, "per_seed": per_seed, "mean_diff": round(statistics.fmean(diffs), 3),
                            "std_diff": round(statistics.stdev(diffs), 3) if len(diffs) > 1 else None,
                            "b_at_least_a_seeds": sum(d >= 0 for d in diffs), "seeds": len(diffs)})
    return out


def render(doc: dict[str, Any]) -> str:
    lines = ["# Paired significance of the open accuracy targets (bench/studies/significance.py)", "",
             "Same 10 000 Fashion-MNIST test images for both recipes of a pair. `diff` = top-1(B) - top-1(A) in "
             "points; 95 % CI = Wald interval of the paired difference; p = exact two-sided McNemar test on the "
             "discordant images (`only A` / `only B` right). Each seed is a different calibration sample and "
             "training seed. A |diff| whose CI contains 0 is not resolved by this test set. `detectable` = the "
             "smallest true difference one seed's test would find significant at 5 % with 80 % power, given the "
             "pair's discordance (`vitq.evaluate.detectable_difference`, mean over seeds): targets that hinge on "
             "smaller differences cannot be decided on these 10 000 images. `pooled p` tests the mean over seeds: "
             "the seeds share the test images, so their p-values cannot be combined; each image's difference is "
             "averaged over the seeds and those 10 000 averages are z-tested (`vitq.evaluate.pooled_paired_test`; "
             "calibration seeds held fixed, test images random). Where the runs kept per-image "
             "log-losses, a second table per group compares the test log-loss (cross-entropy) of the same pairs "
             "with a paired z-test: it uses every image's confidence, not only the discordant ones, so it resolves "
             "much smaller changes, but it asks whether B's predictive distribution is better, not whether its "
             "top-1 is. Rows `oas` / `oas@itN` select the slicing by the outlier proxy (`select: proxy`, the `oas` "
             "recipe's default until 2026-11-28), rows `oas@validate...` by the plain smallest-KL validation "
             "(`prefer: null`); the recipe's default now is the guarded validation (bench/results/oas_guard.md).", ""]
    for group in GROUPS:
        rows = [r for r in doc["comparisons"] if r["group"] == group]
        if not rows:
            continue
        g = GROUPS[group]
        lines += [f"## Issue {g['issue']}: {g['target']} ({group})", "",
                  "| model | A | B | seed | top-1 A | top-1 B | diff B-A | 95 % CI | only A | only B | McNemar p |",
                  "|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|"]
        for r in rows:
            for s in r["per_seed"]:
                a, b = (r[k] + (f" ({s['slicing_' + k]})" if s.get("slicing_" + k) else "") for k in ("a", "b"))
                lines.append(f"| {r['model']} | {a} | {b} | {s['seed']} | {s['top1_a']:.2f} | "
                             f"{s['top1_b']:.2f} | {s['diff']:+.2f} | {s['ci95'][0]:+.2f} .. {s['ci95'][1]:+.2f} | "
                             f"{s['only_a_correct']} | {s['only_b_correct']} | {s['p_value']:.3f} |")
        lines += ["", "| model | A | B | seeds | mean diff B-A | pooled p | std over seeds | seeds with B >= A | "
                  "seeds significant | detectable |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            sig = sum(s["significant_5pct"] for s in r["per_seed"])
            std = "—" if r["std_diff"] is None else f"{r['std_diff']:.2f}"
            mdes = [m for s in r["per_seed"]
                    if (m := detectable_difference(s["only_a_correct"] + s["only_b_correct"], s["n"])) is not None]
            mde = f"{statistics.fmean(mdes):.2f}" if mdes else "—"
            pp = "—" if r.get("pooled_p") is None else f"{r['pooled_p']:.2g}"
            lines.append(f"| {r['model']} | {r['a']} | {r['b']} | {r['seeds']} | {r['mean_diff']:+.2f} | {pp} | {std} | "
                         f"{r['b_at_least_a_seeds']} / {r['seeds']} | {sig} / {r['seeds']} | {mde} |")
        lines.append("")
        nll_rows = [(r, [s for s in r["per_seed"] if s.get("nll_diff") is not None]) for r in rows]
        nll_rows = [(r, ss) for r, ss in nll_rows if ss]
        if nll_rows:
            lines += ["Test log-loss (mean per-image cross-entropy in nats, lower is better) of the same pairs, on the "
                      "seeds whose runs kept per-image log-losses; FP = the float model's. `diff B-A` in 10^-3 nats "
                      "with the paired z-test's p per seed; `gap closed` = the share of A's excess log-loss over FP "
                      "that B removes, (A - B) / (A - FP), from the means over seeds.", "",
                      "| model | A | B | seeds | FP | A | B | mean diff B-A | pooled p | gap closed | per seed: diff (p) | "
                      "seeds B lower | significant: B better / B worse |",
                      "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
            for r, ss in nll_rows:
                diffs = [1e3 * s["nll_diff"] for s in ss]
                better = sum(s["nll_p"] < 0.05 and s["nll_diff"] < 0 for s in ss)
                worse = sum(s["nll_p"] < 0.05 and s["nll_diff"] > 0 for s in ss)
                per = ", ".join(f"s{s['seed']} {1e3 * s['nll_diff']:+.1f} ({s['nll_p']:.2g})" for s in ss)
                na, nb = (statistics.fmean(s[k] for s in ss) for k in ("nll_a", "nll_b"))
                fp = r.get("fp_nll")
                closed = "—" if fp is None or na - fp <= 0 else f"{100 * (na - nb) / (na - fp):+.0f} %"
                fp_txt = "—" if fp is None else f"{fp:.4f}"
                npp = "—" if r.get("nll_pooled_p") is None else f"{r['nll_pooled_p']:.2g}"
                lines.append(f"| {r['model']} | {r['a']} | {r['b']} | {len(ss)} | {fp_txt} | {na:.4f} | {nb:.4f} | "
                             f"{statistics.fmean(diffs):+.1f} | {npp} | {closed} | {per} | {sum(d < 0 for d in diffs)} / "
                             f"{len(ss)} | {better} / {worse} |")
            lines.append("")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--group", choices=list(GROUPS), required=True)
    ap.add_argument("--models", nargs="*", default=None, help="default: the group's models")
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    ap.add_argument("--iters", type=int, default=200, help="recon group: iterations per unit")
    ap.add_argument("--lr-scale", type=float, default=10.0, help="recon group: learning-rate multiplier")
    ap.add_argument("--recipes", nargs="*", default=None, help="run only these of the group's recipes")
    ap.add_argument("--report-only", action="store_true", help="only rebuild the tables from the cache")
    ap.add_argument("--add-nll", action="store_true",
                    help="re-run cached rows that lack per-image log-losses (and report whether top-1 reproduces)")
    args = ap.parse_args()
    setup()
    models = args.models or GROUPS[args.group]["models"]
    if not args.report_only:
        run_group(args.group, models, args.seeds, args.iters, args.lr_scale, args.recipes, args.add_nll)
    path = RESULTS / "significance.json"
    new = collect(args.group, models)
    with file_lock(path):  # several processes may merge into the file
        doc = json.loads(path.read_text()) if path.is_file() else {"comparisons": []}
        keys = {(r["group"], r["model"], r["a"], r["b"]) for r in new}
        doc["comparisons"] = [r for r in doc["comparisons"] if (r["group"], r["model"], r["a"], r["b"]) not in keys] + new
        doc["comparisons"].sort(key=lambda r: (r["group"], r["model"], r["a"], r["b"]))
        meta = {"bits": BITS, **machine_meta()}
        if args.group in RECON_GROUPS:
            meta.update(recon_iters=args.iters, recon_lr_scale=args.lr_scale)
        doc["meta"] = {**doc.get("meta", {}), **meta}
        path.write_text(json.dumps(doc, indent=1) + "\n")
        path.with_suffix(".md").write_text(render(doc))
    for r in new:
        print(f"{r['model']} {r['b']} - {r['a']}: mean {r['mean_diff']:+.2f} over {r['seeds']} seeds; "
              + ", ".join(f"s{s['seed']} {s['diff']:+.2f} (p {s['p_value']:.2f})" for s in r["per_seed"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
