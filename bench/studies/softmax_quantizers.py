"""Post-Softmax quantizer ablation: uniform, log2, log-sqrt2 and TanQ (our reconstruction [R] of
DopQ-ViT's tangent quantizer, METHODS.md §1b(iii)) on the reference models.

Only the ATTN_PROBS site (the post-Softmax input of attn @ v) is quantized; everything else is
float. For each reference model that has weights, quantizer and bit-width it measures

* the attention-output error of every attention layer, ``||A·V − Â·V||² / ||A·V||²`` on REAL
  attention maps (A, V captured from the float model on test images that are not used for
  calibration), reported as the mean over layers and the worst layer;
* top-1 on the Fashion-MNIST test set (first ``--eval-size`` images; ``full`` for all 10 000).

Writes ``bench/results/softmax_quantizers.{md,json}`` and the figure ``docs/softmax_levels.png``
(4-bit level sets over a histogram of real post-Softmax values of fmnist-vit).

    .venv/bin/python -m bench.studies.softmax_quantizers                 # all models with weights, 3/4/6 bits
    .venv/bin/python -m bench.studies.softmax_quantizers --models fmnist-vit --bits 4 --eval-size 500
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import vitq
from vitq import Bits, Context, Recipe, run_recipe, wrap
from vitq.data import (
    FashionMNIST,
    Preprocess,
    calibration_subset,
    eval_subset,
    make_loader,
    stack_images,
)
from vitq.errors import ModelError
from vitq.evaluate import evaluate
from vitq.models import data_config
from vitq.nn import FakeQuant, QAttentionCore
from vitq.passes.tanq_calib import capture_attention
from vitq.quantizers import get_quantizer
from vitq.quantizers.tan import THETA_GRID, attention_output_error
from vitq.reference import OUTLIER_SUFFIX, list_reference_models, load_reference, weights_path

log = logging.getLogger("softmax_quantizers")
ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Candidate:
    """One post-Softmax quantizer configuration of the ablation."""

    label: str
    rule: dict[str, Any]
    search: bool = False  # run the tanq_calibrate pass (θ and s by attention-output error)
    note: str = ""


CANDIDATES = (
    Candidate("uniform", {"quantizer": "uniform", "observer": "minmax"},
              note="asymmetric uniform, min-max range (BasePTQ)"),
    Candidate("log2", {"quantizer": "log2", "observer": "minmax"},
              note="FQ-ViT log2, s = max A; top code = 0"),
    Candidate("log_sqrt2", {"quantizer": "log_sqrt2", "observer": "minmax"},
              note="RepQ-ViT log-sqrt2, s = max A; top code = 0"),
    Candidate("log_sqrt2-mse", {"quantizer": "log_sqrt2", "observer": "mse"},
              note="log-sqrt2, s by our OMSE clip search (ratio 1.00..0.21 of max A, value MSE); top code = 0"),
    Candidate("log_sqrt2-pct", {"quantizer": "log_sqrt2", "observer": "pct_mse"},
              note="log-sqrt2, s = the quantile q_p, p in {0.999, 0.9999, 0.99999}, with least value MSE "
                   "(RepQ-ViT's search); top code = 0"),
    Candidate("tanq", {"quantizer": "tanq", "observer": "minmax", "options": {"theta": 0.9}},
              note="TanQ [R] Variant A, θ = 0.9, s = max A"),
    Candidate("tanq-search", {"quantizer": "tanq", "observer": "minmax"}, search=True,
              note="TanQ [R] Variant A, θ ∈ {0.5..0.98} × s ∈ {1, q0.9999} by attention-output error"),
    Candidate("tanq-logtan-search", {"quantizer": "tanq", "observer": "minmax", "options": {"level_fn": "logtan"}},
              search=True, note="TanQ [R] Variant B (log-tan), θ and s searched as above"),
)


def recipe_for(cand: Candidate, calib_images: int) -> Recipe:
    """A user-style recipe: everything float (``extends: fp``) except the post-Softmax site."""
    # a 256k-value sample per site is plenty for a scalar range and keeps the MSE search cheap
    passes: list[dict[str, Any]] = [{"pass": "calibrate", "max_elements": 1 << 18}]
    if cand.search:
        passes.append({"pass": "tanq_calibrate", "thetas": list(THETA_GRID), "scales": ["one", "quantile"],
                       "max_images": calib_images})
    return Recipe.from_dict({
        "extends": "fp", "name": f"probs-{cand.label}",
        "description": f"only ATTN_PROBS quantized: {cand.note}",
        "rules": {"act:ATTN_PROBS": {**cand.rule, "bits": "A"}},
        "passes": passes,
    }, source=f"bench recipe {cand.label}")


def attention_cores(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, QAttentionCore)]


def layer_errors(model: nn.Module, captured: list[tuple[Tensor, Tensor]], ref_energy: list[float]) -> list[float]:
    """Relative attention-output error of every layer's ATTN_PROBS quantizer on captured (A, V)."""
    out = []
    for core, (a, v), e in zip(attention_cores(model), captured, ref_energy, strict=True):
        fq = core.matmul_av.quant_a
        assert isinstance(fq, FakeQuant)
        params = {k: t.cpu() for k, t in fq.params.items()}
        out.append(attention_output_error(a, v, params, fq.spec) / e)
    return out


def load_data(model: nn.Module, calib_size: int, eval_size: int | None, error_images: int, seed: int):
    pre = Preprocess(data_config(model))
    train = FashionMNIST(None, "train", transform=pre)
    test = FashionMNIST(None, "test", transform=pre)
    calib_x, _ = stack_images(calibration_subset(train, calib_size, seed))
    loader = make_loader(eval_subset(test, eval_size), batch_size=250)
    # attention maps for the error come from the END of the test split: never calibration images
    err_x, _ = stack_images(torch.utils.data.Subset(test, list(range(len(test) - error_images, len(test)))))
    return calib_x, loader, err_x


def weights_sha256(name: str) -> str:
    base = name[: -len(OUTLIER_SUFFIX)] if name.endswith(OUTLIER_SUFFIX) else name
    return hashlib.sha256(weights_path(base).read_bytes()).hexdigest()


def reusable(path: Path, config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``--reuse``: rows of an earlier run made with the same data settings, by model name and
    ``(bits, quantizer)``; a row is kept only if its quantizer's recipe is unchanged."""
    if not path.is_file():
        return {}
    old = json.loads(path.read_text())
    oc = old.get("config", {})
    keys = ("eval_size", "calib_size", "error_images", "seed", "theta_grid")
    if any(oc.get(k) != config[k] for k in keys):
        log.info("--reuse: %s was made with other data settings; measuring everything", path)
        return {}
    same = {lab for lab, r in oc.get("recipes", {}).items() if config["recipes"].get(lab) == r}
    out: dict[str, dict[str, Any]] = {}
    for m in old.get("models", []):
        rows = {(r["bits"], r["quantizer"]): r for r in m["rows"] if r["quantizer"] in same}
        out[m["model"]] = {"sha": m.get("weights_sha256"), "rows": rows}
    return out


def run_model(name: str, args: argparse.Namespace, fig_values: dict[str, Tensor],
              done: dict[tuple[int, str], dict[str, Any]]) -> dict[str, Any]:
    t0 = time.perf_counter()
    base = load_reference(name)
    calib_x, loader, err_x = load_data(base, args.calib_size, args.eval_size, args.error_images, args.seed)
    fp = evaluate(base, loader)
    log.info("%s: FP top-1 %.2f on %d images", name, fp["top1"], fp["n"])
    wrapped = wrap(copy.deepcopy(base))
    cores = attention_cores(wrapped)
    captured = capture_attention(wrapped, (err_x[i:i + 64] for i in range(0, len(err_x), 64)),
                                 [c.matmul_av for c in cores], len(err_x))
    ref_energy = [sum((a[i:i + 64] @ v[i:i + 64]).pow(2).sum().item() for i in range(0, a.shape[0], 64))
                  for a, v in captured]
    if name == "fmnist-vit":
        fig_values["probs"] = torch.cat([a.flatten() for a, _ in captured])
    rows = []
    for bits in args.bits:
        for cand in CANDIDATES:
            if args.quantizers and cand.label not in args.quantizers:
                continue
            if (bits, cand.label) in done:
                rows.append(done[(bits, cand.label)])
                continue
            t1 = time.perf_counter()
            model = copy.deepcopy(base)
            ctx = Context(calib=calib_x, bits=Bits(8, bits), seed=args.seed, batch_size=64)
            run_recipe(model, recipe_for(cand, args.calib_size), ctx)
            errs = layer_errors(model, captured, ref_energy)
            acc = evaluate(model, loader)
            worst = max(range(len(errs)), key=lambda i: errs[i])
            fqs = [c.matmul_av.quant_a for c in attention_cores(model)]
            row = {
                "model": name, "bits": bits, "quantizer": cand.label, "note": cand.note,
                "spec": fqs[0].spec.to_dict(),
                "top1": acc["top1"], "delta_top1": acc["top1"] - fp["top1"],
                "err_mean": sum(errs) / len(errs), "err_worst": errs[worst], "worst_layer": worst,
                "layer_errors": errs,
                "layer_params": [{k: float(t.flatten()[0]) for k, t in fq.params.items()} for fq in fqs],
                "seconds": time.perf_counter() - t1,
            }
            rows.append(row)
            log.info("%s A%d %-19s top-1 %6.2f (%+.2f)  err mean %.4g worst %.4g (layer %d)", name, bits,
                     cand.label, row["top1"], row["delta_top1"], row["err_mean"], row["err_worst"], worst)
    return {"model": name, "weights_sha256": weights_sha256(name), "fp_top1": fp["top1"], "n_eval": fp["n"],
            "n_layers": len(cores), "rows": rows, "seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------
def _fmt_err(x: float) -> str:
    return f"{x:.2e}"


def markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [
        "# Post-Softmax quantizer ablation (only ATTN_PROBS quantized)",
        "",
        f"Generated by `bench/studies/softmax_quantizers.py` on {result['date']} ({result['platform']}, torch "
        f"{result['torch']}, {cfg['threads']} thread(s), {result['seconds']:.0f} s).",
        f"Top-1: Fashion-MNIST test, first {cfg['eval_size'] or 'all'} images. Attention-output error: "
        f"relative ||A·V − Â·V||² / ||A·V||² per attention layer on the real attention maps of the last "
        f"{cfg['error_images']} test images (float model), mean over layers and worst layer. Calibration: "
        f"{cfg['calib_size']} train images, seed {cfg['seed']}. Everything except ATTN_PROBS is float.",
        "",
        "TanQ is OUR reconstruction [R] of DopQ-ViT's tangent quantizer (METHODS.md §1b(iii)), not the "
        "paper's formula.",
        "",
        "Quantizers:",
        "",
    ]
    for c in CANDIDATES:
        if not cfg["quantizers"] or c.label in cfg["quantizers"]:
            lines.append(f"- `{c.label}`: {c.note}")
    ses = [(100 * (m["fp_top1"] / 100 * (1 - m["fp_top1"] / 100) / m["n_eval"]) ** 0.5, m["n_eval"])
           for m in result["models"]]
    if ses:
        se, n = max(ses)
        lines += ["", f"Noise: one standard error of a top-1 measured on {n} images is about {se:.2f} points "
                      "(binomial, at the FP accuracy); top-1 differences below ~2 SE are not meaningful."]
    if result["missing"]:
        lines += ["", f"Missing (no weights yet, not measured): {', '.join(result['missing'])}."]
    models = list(result["models"])
    # summary: mean over models
    lines += ["", "## Summary (mean over the measured models)", "",
              "| bits | quantizer | top-1 | Δ top-1 vs FP | attn-out err, layer mean | attn-out err, worst layer (max over models) |",
              "|---|---|---|---|---|---|"]
    for bits in cfg["bits"]:
        for c in CANDIDATES:
            rs = [r for m in models for r in m["rows"] if r["bits"] == bits and r["quantizer"] == c.label]
            if not rs:
                continue
            k = len(rs)
            lines.append(
                f"| {bits} | {c.label} | {sum(r['top1'] for r in rs) / k:.2f} | "
                f"{sum(r['delta_top1'] for r in rs) / k:+.2f} | {_fmt_err(sum(r['err_mean'] for r in rs) / k)} | "
                f"{_fmt_err(max(r['err_worst'] for r in rs))} |")
    lines += ["", "## Per model", ""]
    for m in models:
        lines += [f"### {m['model']} (FP top-1 {m['fp_top1']:.2f} on {m['n_eval']} images, "
                  f"{m['n_layers']} attention layers)", "",
                  "| bits | quantizer | top-1 | Δ | err mean | err worst (layer) | TanQ θ per layer | TanQ s per layer |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in m["rows"]:
            th = s = ""
            if r["spec"]["quantizer"] == "tanq":
                th = " ".join(f"{p['theta']:.2f}" for p in r["layer_params"])
                s = " ".join(f"{p['scale']:.3g}" for p in r["layer_params"])
            lines.append(f"| {r['bits']} | {r['quantizer']} | {r['top1']:.2f} | {r['delta_top1']:+.2f} | "
                         f"{_fmt_err(r['err_mean'])} | {_fmt_err(r['err_worst'])} ({r['worst_layer']}) | {th} | {s} |")
        lines.append("")
    lines += ["## Best quantizer per model and bit-width (by layer-mean error / by top-1)", "",
              "| model | bits | best by error | best by top-1 |", "|---|---|---|---|"]
    for m in models:
        for bits in cfg["bits"]:
            rs = [r for r in m["rows"] if r["bits"] == bits]
            if rs:
                be = min(rs, key=lambda r: r["err_mean"])
                bt = max(rs, key=lambda r: r["top1"])
                lines.append(f"| {m['model']} | {bits} | {be['quantizer']} | {bt['quantizer']} ({bt['top1']:.2f}) |")
    return "\n".join(lines) + "\n"


def figure(values: Tensor, path: Path, seed: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vitq.quantizers import QuantSpec

    g = torch.Generator().manual_seed(seed)
    if values.numel() > 4_000_000:
        values = values[torch.randint(values.numel(), (4_000_000,), generator=g)]
    one = torch.tensor(1.0)
    sets = [
        ("uniform (4-bit, s = 1)", torch.linspace(0, 1, 16)),
        ("log2 (4-bit, s = 1)", get_quantizer("log2").levels({"scale": one}, QuantSpec("log2", 4))),
        ("log-sqrt2 (4-bit, s = 1)", get_quantizer("log_sqrt2").levels({"scale": one}, QuantSpec("log_sqrt2", 4))),
        ("TanQ [R] (4-bit, θ = 0.9, s = 1)",
         get_quantizer("tanq").levels({"scale": one, "theta": torch.tensor(0.9)}, QuantSpec("tanq", 4))),
    ]
    fig, axes = plt.subplots(len(sets), 1, figsize=(8, 8.5), sharex=True)
    vals = values.clamp(0, 1).numpy()
    for ax, (title, lv) in zip(axes, sets, strict=True):
        ax.hist(vals, bins=200, range=(0, 1), color="0.65", log=True)
        for x in lv.tolist():
            ax.axvline(x, color="tab:red", lw=0.9, alpha=0.85)
        n_top = int((lv >= 0.5).sum())
        ax.set_title(f"{title}: {len(lv)} levels, {n_top} in [0.5, 1]", fontsize=9)
        ax.set_ylabel("count (log)")
    axes[-1].set_xlabel("post-Softmax value (fmnist-vit, all layers, test images)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=list_reference_models())
    ap.add_argument("--bits", nargs="*", type=int, default=[3, 4, 6])
    ap.add_argument("--quantizers", nargs="*", default=[], help=f"subset of {[c.label for c in CANDIDATES]}")
    ap.add_argument("--eval-size", default="2000", help="test images for top-1, or 'full'")
    ap.add_argument("--calib-size", type=int, default=64)
    ap.add_argument("--error-images", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench/results/softmax_quantizers"))
    ap.add_argument("--figure", default=str(ROOT / "docs/softmax_levels.png"))
    ap.add_argument("--reuse", action="store_true",
                    help="keep the models of an earlier --out JSON made with the same settings and weights")
    args = ap.parse_args(argv)
    args.eval_size = None if args.eval_size == "full" else int(args.eval_size)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    t0 = time.perf_counter()
    config = {"models": args.models, "bits": args.bits, "quantizers": args.quantizers,
              "eval_size": args.eval_size, "calib_size": args.calib_size,
              "error_images": args.error_images, "seed": args.seed, "threads": args.threads,
              "theta_grid": list(THETA_GRID),
              "recipes": {c.label: recipe_for(c, args.calib_size).to_dict() for c in CANDIDATES}}
    out = Path(args.out)
    old = reusable(out.with_suffix(".json"), config) if args.reuse else {}
    models, missing = [], []
    fig_values: dict[str, Tensor] = {}
    for name in args.models:
        try:
            load_reference(name)
        except ModelError as e:
            log.warning("skipping %s: %s", name, e)
            missing.append(name)
            continue
        prev = old.get(name)
        done = prev["rows"] if prev is not None and prev["sha"] == weights_sha256(name) else {}
        if done:
            log.info("%s: reusing %d rows of %s (same settings, recipe and weights)", name, len(done),
                     out.with_suffix(".json"))
        models.append(run_model(name, args, fig_values, done))
    if not models:
        log.error("no reference model has weights yet: nothing measured")
        return 1
    result = {
        "type": "vitq.bench.softmax_quantizers", "version": 1, "vitq": vitq.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"), "platform": platform.platform(terse=True),
        "torch": torch.__version__, "python": sys.version.split()[0],
        "config": config, "missing": missing, "models": models, "seconds": time.perf_counter() - t0,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    log.info("wrote %s.{json,md}", out)
    if "probs" in fig_values and args.figure:
        figure(fig_values["probs"], Path(args.figure), args.seed)
        log.info("wrote %s", args.figure)
    elif args.figure:
        log.warning("figure skipped: fmnist-vit was not measured")
    return 0


if __name__ == "__main__":
    sys.exit(main())
