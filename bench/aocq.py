#!/usr/bin/env python
"""AOCQ benchmark: a table shaped like the seed's Table 2, the three-level ablation, density plots.

    python -m bench.aocq table      [--models ...] [--bits W8A8 W4A8] [--recipes minmax ptq4vit fqvit aocq]
    python -m bench.aocq ablation   [--models fmnist-vit-outlier fmnist-swin-outlier] [--bits W4A8]
    python -m bench.aocq errors     [--models ...]       # per-tensor error of balanced tensors, rule median / mse
    python -m bench.aocq density    [--model fmnist-vit-outlier]      # docs/aocq_density.png
    python -m bench.aocq render                                       # bench/results/aocq.md from the JSON
    python -m bench.aocq table --eval-size 10000 --name aocq_eval10k  # a separate table (rows keyed without eval size)

Every row is one ``run_recipe`` on a fresh copy of a reference model, top-1 on the first
``--eval-size`` Fashion-MNIST test images (an encoder, the DINOv2-style model: k-NN top-1, k 20, with its
own embeddings of 10 000 train images as the bank, and the embeddings' cosine against the float model's); calibration images are a seeded sample of the train
split, as many as the recipe's ``calib_size``. ``minmax`` and ``ptq4vit`` run as shipped
(LayerNorm, Softmax and residual additions in float, like the seed's starred rows); ``fqvit`` and
``aocq`` are fully quantized. ``aocq`` runs with CPU-sized settings (``--iters`` AdaRound iterations
per unit, ``--search-samples`` / ``--recon-samples`` images for stage 1 / stage 2), which are written
in every row. Rows merge into ``bench/results/aocq.json`` keyed by (part, model, recipe, bits,
variant), so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from dataclasses import replace
from typing import Any, Optional

import torch

from bench.common import RESULTS, ROOT, FashionData, Judge, write_md
from bench.common import save_rows as shared_save_rows  # noqa: E402
from vitq.bits import Bits  # noqa: E402
from vitq.pipeline import Context, run_recipe  # noqa: E402
from vitq.recipes import PassConfig, Recipe, load_recipe  # noqa: E402
from vitq.reference import list_reference_models, load_reference, weights_path  # noqa: E402
from vitq.state import state_of  # noqa: E402

JSON = RESULTS / "aocq.json"
MD = RESULTS / "aocq.md"
PNG = ROOT / "docs" / "aocq_density.png"
RECIPES = ["minmax", "ptq4vit", "fqvit", "aocq"]
VARIANTS = {
    "full": "all three levels",
    "no_operator": "operator level off (no LN_alpha / Add_alpha)",
    "no_framework": "framework level off (no stage 1: AdaRound at s0)",
    "no_loss": "loss level off (mse instead of token_norm, both stages)",
    "none": "all three off (fully-quantized AdaRound at s0, mse)",
    "median_rule": "operator level with METHODS.md's median rule (ln_rule / add_rule median)",
    "token_norm_mean": "loss level with METHODS.md's mean normaliser (token_norm_mean)",
}
log = logging.getLogger("bench.aocq")


# -- recipes ----------------------------------------------------------------------------------------
def _set(pc: PassConfig, **kw: Any) -> PassConfig:
    return PassConfig(pc.name, tuple(sorted({**dict(pc.options), **kw}.items())))


def aocq_variant(variant: str, iters: int, search_samples: int, recon_samples: int) -> Recipe:
    """The shipped aocq recipe with CPU-sized settings and one ablation switch."""
    r = load_recipe("aocq")
    passes = []
    for pc in r.passes:
        if pc.name == "aocq_act_scales":
            if variant in ("no_framework", "none"):
                continue
            pc = _set(pc, num_samples=search_samples)
            if variant == "no_loss":
                pc = _set(pc, loss="mse")
            if variant == "token_norm_mean":
                pc = _set(pc, loss="token_norm_mean")
        elif pc.name == "reconstruct":
            pc = _set(pc, iters=iters, num_samples=recon_samples)
            if variant in ("no_loss", "none"):
                pc = _set(pc, loss="mse")
            if variant == "token_norm_mean":
                pc = _set(pc, loss="token_norm_mean")
        elif pc.name == "aocq_balance":
            if variant in ("no_operator", "none"):
                pc = _set(pc, ln_alpha=False, add_alpha=False)
            if variant == "median_rule":
                pc = _set(pc, ln_rule="median", add_rule="median")
        passes.append(pc)
    return replace(r, name=f"aocq[{variant}]", passes=tuple(passes))


# -- data ------------------------------------------------------------------------------------------
def Data(model: torch.nn.Module, eval_size: int, seed: int = 0) -> FashionData:  # noqa: N802
    return FashionData(model, eval_size, seed, eval_batch_size=250)


def model_size_mb(model: torch.nn.Module, wbits: int) -> float:
    """All parameters at ``wbits`` (the seed's "Model size (M)": DeiT-T 22 MB FP32, 5.6 at 8 bits)."""
    return sum(p.numel() for p in model.parameters()) * wbits / 8 / 1e6


# -- rows -----------------------------------------------------------------------------------------
KEY = ("part", "model", "recipe", "bits", "variant")


def load_rows() -> list[dict[str, Any]]:
    return list(json.loads(JSON.read_text())["rows"]) if JSON.is_file() else []


def save_rows(rows: list[dict[str, Any]]) -> None:
    """Merge ``rows`` into the JSON under a lock (the table and the ablation may run side by side)."""
    shared_save_rows(JSON, rows, {}, key=KEY, sort=True, indent=1)


def done(part: str, model: str, recipe: str, bits: str, variant: str) -> bool:
    want = [part, model, recipe, bits, variant]
    return any([r.get(k) for k in KEY] == want for r in load_rows())


def run_one(part: str, name: str, model: torch.nn.Module, data: FashionData, recipe: Recipe, rname: str, bits: str,
            variant: str, fp: dict[str, Any], settings: dict[str, Any], judge: Judge) -> dict[str, Any]:
    q = copy.deepcopy(model)
    n_cal = recipe.calib_size
    t0 = time.perf_counter()
    run_recipe(q, recipe, Context(calib=data.calib(n_cal), bits=Bits.parse(bits), seed=data.seed, batch_size=64))
    secs = time.perf_counter() - t0
    res = judge(q, fp)
    fp_top1 = round(fp["top1"], 2)
    row: dict[str, Any] = {
        "part": part, "model": name, "recipe": rname, "bits": bits, "variant": variant,
        "fp_top1": fp_top1, "q_top1": round(res["top1"], 2), "delta": round(res["top1"] - fp_top1, 2),
        "eval_size": res["n"], "calib_size": n_cal, "seconds": round(secs, 1),
        "size_mb": round(model_size_mb(model, Bits.parse(bits).w), 4), "fp_size_mb": round(model_size_mb(model, 32), 4),
        "full_quant": recipe.full_quant,
    }
    if judge.encoder:
        row.update(task="features", emb_cosine_mean=res["emb_cosine_mean"], emb_cosine_p5=res["emb_cosine_p5"])
    if rname == "aocq":
        row["settings"] = settings
        st = state_of(q)
        assert st is not None  # run_recipe left its state on the model
        s1 = st.act_scales
        if s1:
            units = [u for u in s1["units"] if u["sites"] > 0 and u["losses"][0] > 0]
            row["stage1_loss_ratio"] = round(sum(u["losses"][-1] / u["losses"][0] for u in units) / max(len(units), 1), 4)
            row["stage1_seconds"] = s1["seconds"]
        rec = st.reconstruction
        if rec:
            row["stage2_seconds"] = rec[-1]["seconds"]
    log.info("%s", row)
    print(f"{part:<8} {name:<22} {rname:<8} {variant:<14} {bits}: FP {fp_top1:6.2f}  Q {row['q_top1']:6.2f}  "
          f"δ {row['delta']:+6.2f}  {secs:6.1f}s", flush=True)
    return row


def bench(part: str, models: list[str], recipes: list[str], variants: list[str], bits_list: list[str],
          args: argparse.Namespace) -> None:
    settings = {"iters": args.iters, "search_samples": args.search_samples, "recon_samples": args.recon_samples}
    for name in models:
        if not weights_path(name.removesuffix("-outlier")).is_file():
            log.warning("skipping %s: weights missing", name)
            continue
        model = load_reference(name)
        data = Data(model, args.eval_size, args.seed)
        judge = Judge(model, data)
        fp: Optional[dict[str, Any]] = None
        for rname in recipes:
            for variant in (variants if rname == "aocq" else ["-"]):
                for bits in bits_list:
                    if not args.fresh and done(part, name, rname, bits, variant):
                        continue
                    if part == "ablation" and variant == "full":  # the table's row is the same run
                        same = [r for r in load_rows() if r["part"] == "table" and r["model"] == name
                                and r["recipe"] == "aocq" and r["bits"] == bits and r.get("settings") == settings]
                        if same:
                            save_rows([{**same[0], "part": "ablation"}])
                            continue
                    if fp is None:
                        fp = judge(model)
                    recipe = aocq_variant(variant, args.iters, args.search_samples, args.recon_samples) \
                        if rname == "aocq" else load_recipe(rname)
                    save_rows([run_one(part, name, model, data, recipe, rname, bits, variant, fp, settings, judge)])
    render()


# -- density plot -----------------------------------------------------------------------------------
def density(args: argparse.Namespace) -> None:
    """Seed Figure 5 analogue: one post-LayerNorm tensor before / after LN_alpha, float vs quantized."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vitq.adapters import get_adapter
    from vitq.passes.outlier import balance
    from vitq.pipeline import wrap
    from vitq.quantizers.base import QuantSpec, fake_quant, init_params

    model = wrap(load_reference(args.model))
    data = Data(model, 100, args.seed)
    x = data.calib(256)
    pair = get_adapter(model).ln_consumers(model)[args.ln_index]
    cap: dict[str, torch.Tensor] = {}
    h = model.get_submodule(pair.ln_name).register_forward_hook(lambda _m, _i, y: cap.__setitem__("y", y.detach()))
    with torch.no_grad():
        model(x)
        before = cap["y"].reshape(-1, cap["y"].shape[-1])
        balance(model, [x[:128], x[128:]], add_alpha=False)
        model(x)
        after = cap["y"].reshape(-1, cap["y"].shape[-1])
    h.remove()
    spec = QuantSpec(quantizer="uniform", bits=args.density_bits)

    def quant(t: torch.Tensor) -> torch.Tensor:
        return fake_quant(t, init_params(t.amin().reshape(1), t.amax().reshape(1), spec), spec)

    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5))
    rows = [("(a) before balancing (per-tensor, as BasePTQ)", before), ("(b) after LN_alpha (AOCQ)", after)]
    for i, (title, t) in enumerate(rows):
        tq = quant(t)
        lo, hi = float(t.min()), float(t.max())
        bins = torch.linspace(lo, hi, 161).numpy()
        for j, (v, what) in enumerate(((t, "original"), (tq, f"quantized, {args.density_bits}-bit per tensor"))):
            ax = axes[i, j]
            ax.hist(v.flatten().numpy(), bins=bins, color="C0" if j == 0 else "C3", log=True)
            levels = int(torch.unique(tq).numel())
            ax.set_title(f"{title}\n{what}" + (f": {levels} distinct levels used" if j == 1 else ""), fontsize=9)
            ax.set_xlabel("value")
            ax.set_ylabel("count (log)")
    fig.suptitle(f"{args.model}: output of {pair.ln_name} ({before.shape[0]} tokens x {before.shape[1]} channels)",
                 fontsize=10)
    fig.tight_layout()
    PNG.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PNG, dpi=110)
    err_b = float((quant(before) - before).pow(2).mean())
    alpha = (before.abs().amax(0) / after.abs().amax(0).clamp_min(1e-30))
    err_a = float(((quant(after) - after) * alpha).pow(2).mean())
    print(f"wrote {PNG}; per-tensor {args.density_bits}-bit MSE in original units: before {err_b:.3g}, "
          f"after {err_a:.3g} ({err_a / err_b:.3f}x)")


# -- per-tensor error of the balanced tensors ---------------------------------------------------------
def errors(args: argparse.Namespace) -> None:
    """Per-tensor min-max quantization error of every LayerNorm output (LN_alpha) and of every state of
    the residual stream (Add_alpha), after / before balancing, counted in the original units."""
    from vitq.adapters import get_adapter
    from vitq.passes.outlier import balance, per_tensor_quant_error
    from vitq.pipeline import wrap

    rows = []
    for name in args.models or list_reference_models():
        for rule in ("median", "mse"):
            model = wrap(load_reference(name))
            x = Data(model, 100, args.seed).calib(256)
            ad = get_adapter(model)
            cap: dict[Any, torch.Tensor] = {}
            hooks = [model.get_submodule(p.ln_name).register_forward_hook(
                lambda _m, _i, y, n=p.ln_name, c=cap: c.__setitem__(n, y.detach())) for p in ad.ln_consumers(model)]
            for st in ad.residual_streams(model):
                for rd in st.readers:
                    hooks.append(model.get_submodule(rd.name).register_forward_pre_hook(
                        lambda _m, a, k=(st.name, rd.name), t=rd.tile, c=cap: c.__setitem__(
                            k, a[0].detach().reshape(-1, t, a[0].shape[-1] // t))))
            with torch.no_grad():
                model(x)
            for h in hooks:
                h.remove()
            rep = balance(model, [x[:128], x[128:]], ln_rule=rule, add_rule=rule)
            for bits in (8, 4):
                ln = []
                for p in ad.ln_consumers(model):
                    a = torch.pow(2.0, torch.tensor(rep["ln_alpha"][p.ln_name]["exponents"], dtype=torch.float32))
                    ln.append(per_tensor_quant_error(cap[p.ln_name], a, bits) / per_tensor_quant_error(cap[p.ln_name], None, bits))
                streams = {}
                for st in ad.residual_streams(model):
                    a = torch.pow(2.0, torch.tensor(rep["add_alpha"][st.name]["exponents"], dtype=torch.float32))
                    eb = sum(per_tensor_quant_error(cap[(st.name, rd.name)], None, bits) for rd in st.readers)
                    ea = sum(per_tensor_quant_error(cap[(st.name, rd.name)], a, bits) for rd in st.readers)
                    streams[st.name] = round(ea / eb, 3)
                rows.append({"part": "errors", "model": name, "recipe": "-", "bits": f"{bits}-bit", "variant": rule,
                             "ln_ratio_mean": round(sum(ln) / len(ln), 3), "ln_ratio_max": round(max(ln), 3),
                             "stream_ratio": streams,
                             "ln_max_over_median": round(max(r["max_over_median_before"] for r in rep["ln_alpha"].values()), 1),
                             "stream_max_over_median": {k: r["max_over_median_before"] for k, r in rep["add_alpha"].items()}})
                print(rows[-1], flush=True)
    save_rows(rows)
    render()


# -- rendering --------------------------------------------------------------------------------------
def render() -> None:
    rows = load_rows()
    if not rows:
        return
    lines = ["# AOCQ on the reference models", "",
             "Written by `bench/aocq.py` (see its docstring); numbers are Fashion-MNIST top-1 (%) on the first "
             f"{rows[0]['eval_size']} test images. δ = quantized − FP. `minmax` and `ptq4vit` quantize the matrix "
             "multiplications only (LayerNorm, Softmax, residual add in float: the seed's starred rows); `fqvit` and "
             "`aocq` are fully quantized (LayerNorm input, Softmax input, residual-add output at A bits too). "
             "Model size: every parameter at W bits (the seed's convention).", ""]
    if any(r.get("task") == "features" for r in rows):
        lines += ["Models marked (k-NN) are encoders without a head: their Top-1 is k-NN top-1 (k 20, cosine, the DINO "
                  "protocol; each model's own embeddings of 10 000 train images as the bank); the embeddings' cosine "
                  "against the float model's, image by image, is in the last table.", ""]
    aocq_rows = [r for r in rows if r["recipe"] == "aocq" and r.get("settings")]
    if aocq_rows:
        s = aocq_rows[0]["settings"]
        lines += [f"AOCQ settings (CPU-sized): {s['iters']} AdaRound iterations per unit (paper-style default "
                  f"20000), stage 1 on {s['search_samples']} images, stage 2 on {s['recon_samples']} images, "
                  "calibration (ranges, balancing) on the recipe's 1024 images.", ""]
    tab = [r for r in rows if r["part"] == "table"]
    # the seed's two columns (W8A8, W4A8) unless the table holds other widths: then the widths it holds, widest first
    held = {r["bits"] for r in tab}
    widths = ("W8A8", "W4A8") if held <= {"W8A8", "W4A8"} else \
        tuple(sorted(held, key=lambda b: (-int(b[1]), -int(b[3]))))
    if tab:
        lines += ["## Table 2 layout", "",
                  "| Model | Method | " + " | ".join("W/A | Size (MB) | Top-1 | δ" for _ in widths) + " |",
                  "|---|---|" + "---|---:|---:|---:|" * len(widths)]
        names = {"minmax": "MinMax*", "ptq4vit": "PTQ4ViT*", "fqvit": "FQ-ViT", "aocq": "AOCQ (ours [R])"}
        for model in dict.fromkeys(r["model"] for r in tab):
            mr = [r for r in tab if r["model"] == model]
            fp, fps = mr[0]["fp_top1"], mr[0]["fp_size_mb"]
            label = f"{model} (k-NN)" if mr[0].get("task") == "features" else model
            lines.append(f"| {label} | FP | " + "| ".join(f"32/32 | {fps:.3f} | {fp:.2f} | " for _ in widths) + "|")
            for rec in RECIPES:
                if not any(r["recipe"] == rec for r in mr) and held - {"W8A8", "W4A8"}:
                    continue  # a table of other widths shows the recipes it ran
                cells = []
                for bits in widths:
                    r = next((r for r in mr if r["recipe"] == rec and r["bits"] == bits
                              and r["variant"] in ("full", "-")), None)
                    wa = f"{bits[1]}/{bits[3]}"
                    if r is None:
                        cells.append(f"{wa} | | – | ")
                    else:
                        best = max((o["q_top1"] for o in mr if o["bits"] == bits), default=None)
                        acc = f"**{r['q_top1']:.2f}**" if r["q_top1"] == best else f"{r['q_top1']:.2f}"
                        cells.append(f"{wa} | {r['size_mb']:.3f} | {acc} | {r['delta']:+.2f}")
                lines.append(f"| | {names[rec]} | " + " | ".join(cells) + " |")
        lines += ["", "Bold: best quantized top-1 of the model at that W/A. * = matrix multiplications only.", ""]
        lines += ["Run time (s, calibration + passes, CPU) per row:", "",
                  "| model | " + " | ".join(f"{r} {b}" for r in RECIPES for b in widths) + " |",
                  "|---|" + "---:|" * (len(widths) * len(RECIPES))]
        for model in dict.fromkeys(r["model"] for r in tab):
            cells = []
            for rec in RECIPES:
                for bits in widths:
                    r = next((r for r in tab if r["model"] == model and r["recipe"] == rec and r["bits"] == bits), None)
                    cells.append("–" if r is None else f"{r['seconds']:.0f}")
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
        lines.append("")
        enc = [r for r in tab if r.get("task") == "features"]
        if enc:
            lines += ["Encoders: the quantized embeddings against the float ones, image by image (cosine mean / 5th "
                      "percentile):", "", "| model | " + " | ".join(f"{r} {b}" for r in RECIPES for b in widths) + " |",
                      "|---|" + "---:|" * (len(widths) * len(RECIPES))]
            for model in dict.fromkeys(r["model"] for r in enc):
                cells = []
                for rec in RECIPES:
                    for bits in widths:
                        r = next((r for r in enc if r["model"] == model and r["recipe"] == rec and r["bits"] == bits),
                                 None)
                        cells.append("–" if r is None else f"{r['emb_cosine_mean']:.4f} / {r['emb_cosine_p5']:.4f}")
                lines.append(f"| {model} | " + " | ".join(cells) + " |")
            lines.append("")
    abl = [r for r in rows if r["part"] == "ablation"]
    if abl:
        lines += ["## Ablation: each level switched off", "",
                  "| model | bits | variant | what | Top-1 | δ | stage-1 loss s4/s0 | s |",
                  "|---|---|---|---|---:|---:|---:|---:|"]
        order = list(VARIANTS)
        for r in sorted(abl, key=lambda r: (r["model"], r["bits"], order.index(r["variant"]))):
            s1 = r.get("stage1_loss_ratio")
            lines.append(f"| {r['model']} | {r['bits']} | {r['variant']} | {VARIANTS[r['variant']]} | "
                         f"{r['q_top1']:.2f} | {r['delta']:+.2f} | {'' if s1 is None else f'{s1:.3f}'} | "
                         f"{r['seconds']:.0f} |")
        lines.append("")
    err = [r for r in rows if r["part"] == "errors"]
    if err:
        lines += ["## Per-tensor quantization error of the balanced tensors", "",
                  "Error of per-tensor min-max quantization after balancing / before, in the original units (the "
                  "error the reading layer sees), 256 calibration images; < 1 = balancing helps. LN: over every "
                  "LayerNorm output read by a Linear (mean and worst); stream: every state of each residual stream "
                  "(one alpha per stream). `max/med`: the largest channel range over the median one before "
                  "balancing.", "",
                  "| model | rule | bits | LN max/med | LN ratio mean | LN ratio max | stream max/med | stream ratio |",
                  "|---|---|---|---:|---:|---:|---|---|"]
        for r in err:
            sm = ", ".join(f"{v:g}" for v in r["stream_max_over_median"].values())
            sr = ", ".join(f"{v:.3f}" for v in r["stream_ratio"].values())
            lines.append(f"| {r['model']} | {r['variant']} | {r['bits']} | {r['ln_max_over_median']:g} | "
                         f"{r['ln_ratio_mean']:.3f} | {r['ln_ratio_max']:.3f} | {sm} | {sr} |")
        lines.append("")
    write_md(MD, lines)
    print(f"wrote {MD}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["table", "ablation", "errors", "density", "render"])
    ap.add_argument("--models", nargs="+", default=None)
    ap.add_argument("--recipes", nargs="+", default=RECIPES)
    ap.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS))
    ap.add_argument("--bits", nargs="+", default=None)
    ap.add_argument("--eval-size", type=int, default=2000)
    ap.add_argument("--iters", type=int, default=200, help="AdaRound iterations per unit (stage 2)")
    ap.add_argument("--search-samples", type=int, default=64, help="images for stage 1")
    ap.add_argument("--recon-samples", type=int, default=256, help="images for stage 2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fresh", action="store_true", help="recompute rows already in the JSON")
    ap.add_argument("--model", default="fmnist-vit-outlier", help="density: the reference model")
    ap.add_argument("--ln-index", type=int, default=4, help="density: which LayerNorm (adapter ln_consumers order)")
    ap.add_argument("--density-bits", type=int, default=4)
    ap.add_argument("--name", default="aocq", help="results file stem in bench/results/ (table, ablation, render)")
    args = ap.parse_args()
    global JSON, MD
    JSON, MD = RESULTS / f"{args.name}.json", RESULTS / f"{args.name}.md"
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.part == "table":
        bench("table", args.models or list_reference_models(), args.recipes, ["full"], args.bits or ["W8A8", "W4A8"], args)
    elif args.part == "ablation":
        bench("ablation", args.models or ["fmnist-vit-outlier", "fmnist-swin-outlier"], ["aocq"],
              args.variants or ["full", "no_operator", "no_framework", "no_loss", "none"], args.bits or ["W4A8"], args)
    elif args.part == "density":
        density(args)
    elif args.part == "errors":
        errors(args)
    else:
        render()


if __name__ == "__main__":
    main()
