#!/usr/bin/env python
"""Accuracy / cost benchmark: every reference model x recipe x bit-width.

    python -m bench.baselines                                  # foundation recipes, all bits, all models
    python -m bench.baselines --recipes repq ptq4vit --bits W4A4 --eval-size 10000
    python -m bench.baselines --name baselines                  # results file stem
    python -m bench.baselines --recipes fq --bits W8A8 --name baselines tsptq   # rows into both tables
    python -m bench.baselines --models fmnist-dinov2 --recipes brecq qdrop oas --iters 200   # reconstruction, CPU budget

Rows are merged into ``bench/results/<name>.json`` (keyed by model, recipe, bits) and the whole
table is re-rendered to ``bench/results/<name>.md``: FP top-1, quantized top-1, drop, calibration
seconds, peak RSS of the run (the process's peak-RSS mark is reset before each run).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch

from bench.common import (
    RESULTS,
    FashionData,
    bench_recipe,
    machine_line,
    md_table,
    save_rows,
    scaled_recipe,
    setup,
    write_md,
)
from vitq.bits import Bits
from vitq.data import calibration_subset, make_loader, stack_images
from vitq.defaults import DEFAULT_KNN_BANK
from vitq.errors import VitqError
from vitq.reference import list_reference_models, load_reference, weights_path
from vitq.run.compare import cache_batches, compare
from vitq.run.inputs import task_of

#: an encoder's k-NN memory bank: the CLI's default size (``--knn-bank``), the same seeded sample
KNN_BANK = DEFAULT_KNN_BANK

DEFAULT_RECIPES = ["minmax", "percentile", "omse", "ptq4vit", "repq", "fqvit"]
#: fully-quantized variants (FQ-ViT Table 2 protocol), benchmarked at W8A8: --recipes ... --bits W8A8
FULL_QUANT_RECIPES = ["fq", "percentile-fq", "omse-fq", "ptq4vit-fq", "repq-fq", "fqvit"]
DEFAULT_BITS = ["W8A8", "W6A6", "W4A4", "W3A3"]
log = logging.getLogger("bench")


def available_models(names: list[str]) -> list[str]:
    out = []
    for n in names:
        base = n.removesuffix("-outlier")
        if weights_path(base).is_file():
            out.append(n)
        else:
            log.warning("skipping %s: weights of %s missing", n, base)
    return out


def reusable(tables: list[str]) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    """Rows of results tables, keyed by (model, recipe, bits): same code, same settings."""
    out: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for table in tables:
        path = RESULTS / f"{table}.json"
        for r in json.loads(path.read_text())["rows"] if path.is_file() else []:
            out.setdefault((r["model"], r["recipe"], r["bits"]), []).append(r)
    return out


def bench_model(name: str, recipes: list[str], bits_list: list[str], eval_size: int | None, calib_size: int | None,
                seed: int, batch_size: int, reuse: dict[tuple[str, str, str], list[dict[str, Any]]] | None = None,
                recon: dict[str, Any] | None = None) -> tuple[list[dict[str, Any]], int]:
    """Rows of one model, and how many failed (a failing recipe is reported on one line and skipped). ``recon``:
    ``{"iters": N, "lr_scale": S}`` for the reconstruction recipes' CPU budget (:func:`bench.common.scaled_recipe`,
    as bench/recon.py runs them: N iterations per unit, learning rates x S), recorded in each row."""
    reuse = reuse or {}
    rows = []
    todo = []
    for rname in recipes:
        for bits in bits_list:
            old = next((r for r in reuse.get((name, rname, bits), []) if r["eval_size"] == (eval_size or 10000)
                        and r["seed"] == seed and calib_size in (None, r["calib_size"])), None)
            if old:
                print(f"{name:<22} {rname:<12} {bits}: reused (Q {old['q_top1']:6.2f})", flush=True)
                rows.append(old)
            else:
                todo.append((rname, bits))
    if not todo:
        return rows, 0
    errors = 0
    model = load_reference(name)
    fd = FashionData(model, eval_size, seed, eval_batch_size=batch_size)
    train = fd.train
    eval_batches = cache_batches(fd.eval_loader)  # decoded once, shared by every recipe of this model

    def source(n: int, s: int) -> torch.Tensor:
        return stack_images(calibration_subset(train, calib_size or n, s))[0]

    knn_bank = None
    if task_of(model) == "features":  # an encoder: k-NN top-1 against its own embeddings of 10 000 train images
        knn_bank = cache_batches(make_loader(calibration_subset(train, min(KNN_BANK, len(train)), 0),
                                             batch_size=batch_size))

    for rname in recipes:
        bits_todo = [b for b in bits_list if (rname, b) in todo]
        if not bits_todo:
            continue
        try:
            if recon:  # the scaled recipe of each width (its `when` passes): one comparison per width
                got = [r for b in bits_todo
                       for r in compare(model, eval_batches, source, [scaled_recipe(bench_recipe(rname) or rname, recon, b)],
                                        [b], batch_size=batch_size, seeds=[seed], knn_bank=knn_bank)["rows"]]
            else:
                got = compare(model, eval_batches, source, [rname], bits_todo, batch_size=batch_size, seeds=[seed],
                              knn_bank=knn_bank)["rows"]
        except VitqError as e:
            print(f"{name:<22} {rname:<12} {','.join(bits_todo)}: FAILED: {e}", flush=True)
            errors += 1
            continue
        for row in got:  # run records (vitq.run.record), as `vitq compare` and `vitq quantize --json` write
            row["model"] = name
            if recon:
                row.update(recipe=rname, **recon)
            log.info("%s", {k: v for k, v in row.items() if k not in ("per_seed", "vs_fp", "vs_fp_pooled")})
            print(f"{name:<22} {rname:<12} {row['bits']}: FP {row['fp_top1']:6.2f}  Q {row['q_top1']:6.2f}  "
                  f"drop {row['drop']:+6.2f}  calib {row['calib_seconds']:6.1f}s  rss {row['peak_rss_mb']:.0f} MB",
                  flush=True)
            rows.append(row)
    return rows, errors


def merge(path: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    old = json.loads(path.read_text())["rows"] if path.is_file() else []
    key = lambda r: (r["model"], r["recipe"], r["bits"])  # noqa: E731
    table = {key(r): r for r in old}
    for r in rows:
        table[key(r)] = r
    return sorted(table.values(), key=lambda r: (r["model"], r["recipe"], -int(r["bits"][1]), r["bits"]))


def render(rows: list[dict[str, Any]], meta: dict[str, Any]) -> list[str]:
    heads = [r for r in rows if r.get("task", "classify") != "features"]
    encoders = [r for r in rows if r.get("task") == "features"]
    out = [f"# {meta['title']}", "", meta["note"], "", machine_line(meta), ""]
    if heads:
        out += md_table(["model", "recipe", "bits", "FP top-1", "Q top-1", "drop", "calib imgs", "eval imgs", "calib s",
                         "peak RSS MB"],
                        [[r["model"], r["recipe"], r["bits"], f"{r['fp_top1']:.2f}", f"{r['q_top1']:.2f}",
                          f"{r['drop']:+.2f}", r["calib_size"], r["eval_size"], f"{r['calib_seconds']:.1f}",
                          f"{r['peak_rss_mb']:.0f}"] for r in heads],
                        align="lllrrrrrrr")
    if encoders:
        out += ["", "Encoders (no head): k-NN top-1 (k 20, cosine, the DINO protocol; a bank of the model's own "
                "embeddings of 10 000 train images), and the quantized embeddings' agreement with the float ones "
                "image by image (cosine mean and 5th percentile, SQNR).", ""]
        out += md_table(["model", "recipe", "bits", "FP k-NN", "Q k-NN", "drop", "emb cos mean", "emb cos p5",
                         "SQNR dB", "calib imgs", "eval imgs", "calib s"],
                        [[r["model"], r["recipe"], r["bits"], f"{r['fp_top1']:.2f}", f"{r['q_top1']:.2f}",
                          f"{r['drop']:+.2f}", f"{r['emb_cosine_mean']:.4f}", f"{r['emb_cosine_p5']:.4f}",
                          f"{r['emb_sqnr_db']:.1f}", r["calib_size"], r["eval_size"], f"{r['calib_seconds']:.1f}"]
                         for r in encoders],
                        align="lllrrrrrrrrr")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list_reference_models())
    ap.add_argument("--recipes", nargs="+", default=DEFAULT_RECIPES)
    ap.add_argument("--bits", nargs="+", default=DEFAULT_BITS)
    ap.add_argument("--eval-size", type=int, default=None, help="first N test images (default: all 10000)")
    ap.add_argument("--calib-size", type=int, default=None, help="default: each recipe's own")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--name", nargs="+", default=["baselines"],
                    help="results file stem(s) in bench/results/; the rows are merged into each")
    ap.add_argument("--reuse-from", nargs="+", default=[], metavar="TABLE",
                    help="copy rows (same model, recipe, bits, eval size, seed) from bench/results/TABLE.json "
                         "instead of recomputing them (name the output table itself to skip rows already done)")
    ap.add_argument("--note", default=None, help="a paragraph under the table's note (kept in the file)")
    ap.add_argument("--title", default=None,
                    help="table title (default: the file's own, else the baselines title)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: benches can run side by side)")
    ap.add_argument("--iters", type=int, default=None,
                    help="reconstruction iterations per unit (a CPU budget, as bench/recon.py: with --lr-scale)")
    ap.add_argument("--lr-scale", type=float, default=10.0, help="with --iters: learning rates multiplied by this")
    args = ap.parse_args()
    setup(threads=args.threads)
    logging.getLogger().setLevel(logging.WARNING)
    for b in args.bits:
        Bits.parse(b)
    RESULTS.mkdir(parents=True, exist_ok=True)
    failed = 0
    for name in available_models(args.models):  # written after every model: a later failure loses nothing
        rows, errors = bench_model(name, args.recipes, args.bits, args.eval_size, args.calib_size, args.seed,
                                   args.batch_size, reusable(args.reuse_from),
                                   None if args.iters is None else {"iters": args.iters, "lr_scale": args.lr_scale})
        failed += errors
        for table in args.name:
            write(RESULTS / f"{table}.json", rows, args.title, args.note)
    if failed:
        raise SystemExit(f"{failed} row(s) failed (see the FAILED lines above); the other rows were written")


def write(jpath: Path, rows: list[dict[str, Any]], title: str | None, extra: str | None = None) -> None:
    """Merge ``rows`` into the table and re-render it. ``extra``: a paragraph under the standard note (kept from the
    file when not given), e.g. what the rows show."""
    old = json.loads(jpath.read_text())["meta"] if jpath.is_file() else {}
    meta = {"title": title or old.get("title") or "Baseline recipes on the Fashion-MNIST reference models",
            "note": "Fashion-MNIST test split, top-1 %. Calibration images: a seeded sample of the train split. "
                    "drop = FP - quantized. Sites: inputs and weights of every Linear, both operands of both "
                    "attention matmuls, patch-embed weight (its input, the image, stays float), head. "
                    "Each model's rows: `vitq.run.compare` (what `vitq compare` runs), one recipe at a time."
                    + (f"\n\n{extra or old.get('extra')}" if (extra or old.get("extra")) else ""),
            **({"extra": extra or old.get("extra")} if (extra or old.get("extra")) else {})}
    save_rows(jpath, rows, meta, key=("model", "recipe", "bits"), indent=1)
    write_md(jpath.with_suffix(".md"), render(merge(jpath, []), json.loads(jpath.read_text())["meta"]))
    print(f"wrote {jpath} and {jpath.with_suffix('.md')}")


if __name__ == "__main__":
    main()
