"""LayerNorm-input quantization: O-2SF (TSPTQ-ViT, our reconstruction [R]) vs one per-tensor scale
vs FQ-ViT's PTF, on REAL LayerNorm inputs of the reference models.

The input of every ``nn.LayerNorm`` (found by type, forward pre-hooks) is captured from the float
model on Fashion-MNIST train images: ``--calib-images`` to calibrate each quantizer (observer on the
captured tensor) and ``--eval-images`` *other* images to measure it. Per LayerNorm, bit-width and
quantizer:

* ``rel_mse``    = ``||x̂ - x||² / ||x||²`` over all elements (dominated by the largest channels);
* ``chan_rel``   = mean over channels of ``||x̂_c - x_c||² / ||x_c||²`` (every channel counts the same);
* ``ln_out_rel`` = ``||LN(x̂) - LN(x)||² / ||LN(x)||²`` with the module's own affine - what the
  next layer sees.

Tables report the mean over a model's LayerNorms. Quantizers: ``per-tensor`` (asymmetric uniform,
min-max), ``ptf`` (FQ-ViT, K = 3, L2 shift choice), ``o2sf`` (κ = 4, own zero point for the
outlier level), ``o2sf-shared-z`` (FQ-ViT-style single zero point; shows why it is not the default)
and ``per-channel`` (asymmetric uniform per channel, min-max: a reference point that an integer
LayerNorm cannot use directly). Also: the share of channels O-2SF flags (``r_c > κ·median r``),
whether the ``-outlier`` twins change the LayerNorm inputs, and - for comparison - the same
quantizers on the LayerNorm *outputs*, where the ``-outlier`` twins put their outlier channels.

Writes ``bench/results/o2sf_layernorm.{md,json}``.

    .venv/bin/python -m bench.studies.two_scale_ln
    .venv/bin/python -m bench.studies.two_scale_ln --models fmnist-vit --bits 8 4
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import vitq  # noqa: F401  (registers quantizers)
from vitq.data import FashionMNIST, Preprocess
from vitq.errors import ModelError
from vitq.models import data_config
from vitq.observers import Observer
from vitq.quantizers import QuantSpec, fake_quant
from vitq.quantizers.two_scale import outlier_channels
from vitq.reference import OUTLIER_SUFFIX, list_reference_models, load_reference

log = logging.getLogger("two_scale_ln")
ROOT = Path(__file__).resolve().parents[2]

METHODS: dict[str, dict[str, Any]] = {
    "per-tensor": dict(quantizer="uniform", granularity="tensor"),
    "ptf": dict(quantizer="ptf", granularity="channel"),
    "o2sf": dict(quantizer="o2sf", granularity="channel"),
    "o2sf-shared-z": dict(quantizer="o2sf", granularity="channel", options={"zero_point": "shared"}),
    "per-channel": dict(quantizer="uniform", granularity="channel"),
}


def capture_ln(model: nn.Module, x: Tensor, batch: int = 64) -> list[tuple[str, nn.LayerNorm, Tensor, Tensor]]:
    """``(module path, module, input, output)`` of every LayerNorm in forward order, as ``(tokens, C)``."""
    got: dict[int, list[tuple[Tensor, Tensor]]] = {}
    order: list[int] = []
    lns = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)]

    def hook(i: int):  # type: ignore[no-untyped-def]
        def fn(_m: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
            if i not in got:
                got[i] = []
                order.append(i)
            c = args[0].shape[-1]
            got[i].append((args[0].detach().reshape(-1, c).float(), out.detach().reshape(-1, c).float()))
        return fn

    hs = [m.register_forward_hook(hook(i)) for i, (_, m) in enumerate(lns)]
    try:
        with torch.no_grad():
            for s in range(0, x.shape[0], batch):
                model(x[s:s + batch])
    finally:
        for h in hs:
            h.remove()
    return [(lns[i][0], lns[i][1], torch.cat([a for a, _ in got[i]]), torch.cat([b for _, b in got[i]]))
            for i in order]


def errors(x: Tensor, xq: Tensor, ln: Optional[nn.LayerNorm]) -> dict[str, float]:
    d = (xq - x).pow(2)
    chan = (d.sum(0) / x.pow(2).sum(0).clamp_min(1e-30)).mean()
    out = {"rel_mse": float(d.sum() / x.pow(2).sum()), "chan_rel": float(chan)}
    if ln is not None:
        with torch.no_grad():
            y = F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
            yq = F.layer_norm(xq, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
        out["ln_out_rel"] = float((yq - y).pow(2).sum() / y.pow(2).sum())
    return out


def analyse(path: str, xcal: Tensor, xev: Tensor, ln: Optional[nn.LayerNorm],
            args: argparse.Namespace) -> dict[str, Any]:
    """Outlier statistics of ``xcal`` and every quantizer's error on ``xev`` (calibrated on ``xcal``)."""
    lo, hi = xcal.amin(0), xcal.amax(0)
    r = torch.maximum(lo.abs(), hi.abs())
    flagged = outlier_channels(lo, hi, args.kappa)
    entry: dict[str, Any] = {"ln": path, "channels": int(xcal.shape[1]), "flagged": int(flagged.sum()),
                             "max_over_median": float(r.max() / r.median()), "errors": {}, "o2sf_shift": {}}
    for bits in args.bits:
        for meth, kw in METHODS.items():
            opts = dict(kw.get("options", {}))
            if kw["quantizer"] == "o2sf":
                opts["kappa"] = args.kappa
            spec = QuantSpec(kw["quantizer"], bits, granularity=kw["granularity"], options=opts)
            obs = Observer(spec, path)
            obs.observe(xcal)
            p = obs.compute()
            if meth == "o2sf":
                entry["o2sf_shift"][bits] = int(p["shift"].max())
            entry["errors"][f"{meth}@{bits}"] = errors(xev, fake_quant(xev, p, spec), ln)
    return entry


def summarise(layers: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, dict[str, float]] = {}
    for key in layers[0]["errors"]:
        summary[key] = {m: sum(e["errors"][key][m] for e in layers) / len(layers) for m in layers[0]["errors"][key]}
        summary[key]["worst_rel_mse"] = max(e["errors"][key]["rel_mse"] for e in layers)
    n_ch = sum(e["channels"] for e in layers)
    return {"layernorms": len(layers), "layers": layers, "summary": summary,
            "flagged_share": sum(e["flagged"] for e in layers) / n_ch,
            "layers_with_outliers": sum(e["flagged"] > 0 for e in layers),
            "max_over_median": max(e["max_over_median"] for e in layers)}


def images(n_calib: int, n_eval: int, seed: int, model: nn.Module) -> tuple[Tensor, Tensor]:
    ds = FashionMNIST(None, "train")
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[: n_calib + n_eval]
    pre = Preprocess(data_config(model))
    x = pre(ds.images[idx])
    return x[:n_calib], x[n_calib:]


def run_model(name: str, args: argparse.Namespace, base_inputs: dict[str, list[Tensor]]) -> dict[str, Any]:
    model = load_reference(name)
    xc, xe = images(args.calib_images, args.eval_images, args.seed, model)
    calib = capture_ln(model, xc)
    evals = capture_ln(model, xe)
    base = name[: -len(OUTLIER_SUFFIX)] if name.endswith(OUTLIER_SUFFIX) else name
    same_as_base: Optional[float] = None
    if name != base and base in base_inputs:
        same_as_base = max(float((a - b).abs().max())
                           for a, b in zip(base_inputs[base], [t for _, _, t, _ in evals], strict=True))
    else:
        base_inputs[name] = [t for _, _, t, _ in evals]
    inputs = [analyse(path, xin, xev, ln, args) for (path, ln, xin, _), (_, _, xev, _) in zip(calib, evals, strict=True)]
    outputs = [analyse(path, xout, yev, None, args)
               for (path, _, _, xout), (_, _, _, yev) in zip(calib, evals, strict=True)]
    return {"model": name, **summarise(inputs), "max_ln_input_diff_vs_base": same_as_base,
            "outputs": summarise(outputs)}


def _e(v: float) -> str:
    return f"{v:.2e}"


def markdown(res: dict[str, Any]) -> str:
    bits = res["args"]["bits"]
    out = [
        "# O-2SF vs per-tensor vs PTF on real LayerNorm inputs",
        "",
        f"Generated by `bench/studies/two_scale_ln.py` on {res['date']} ({res['platform']}, torch {res['torch']}); "
        f"{res['args']['calib_images']} calibration + {res['args']['eval_images']} other evaluation images "
        f"(Fashion-MNIST train, seed {res['args']['seed']}), κ = {res['args']['kappa']}. "
        "O-2SF is our reconstruction [R] of TSPTQ-ViT; PTF is FQ-ViT's (K = 3).",
        "",
        "Numbers are means over a model's LayerNorms of the relative MSE ``||x̂ − x||² / ||x||²`` of the "
        "LayerNorm *input* on the evaluation images (quantizers calibrated on the calibration images).",
        "",
    ]
    if res["missing"]:
        out += [f"Missing weights (not measured): {', '.join(res['missing'])}.", ""]
    head = "| model | quantizer | " + " | ".join(f"{b}-bit" for b in bits) + " |"
    out += ["## Relative MSE of the LayerNorm input (mean over LayerNorms)", "", head,
            "|" + "---|" * (2 + len(bits))]
    for m in res["models"]:
        for meth in METHODS:
            cells = [_e(m["summary"][f"{meth}@{b}"]["rel_mse"]) for b in bits]
            out.append(f"| {m['model']} | {meth} | " + " | ".join(cells) + " |")
    out += ["", "## Channel-averaged relative MSE (every channel weighs the same)", "", head,
            "|" + "---|" * (2 + len(bits))]
    for m in res["models"]:
        for meth in METHODS:
            cells = [_e(m["summary"][f"{meth}@{b}"]["chan_rel"]) for b in bits]
            out.append(f"| {m['model']} | {meth} | " + " | ".join(cells) + " |")
    out += ["", "## Relative MSE of the LayerNorm *output* LN(x̂) vs LN(x)", "", head,
            "|" + "---|" * (2 + len(bits))]
    for m in res["models"]:
        for meth in METHODS:
            cells = [_e(m["summary"][f"{meth}@{b}"]["ln_out_rel"]) for b in bits]
            out.append(f"| {m['model']} | {meth} | " + " | ".join(cells) + " |")
    out += ["", "## Outlier channels (O-2SF rule r_c > κ·median r, on the calibration images)", "",
            "| model | LayerNorms | with outliers | flagged channels | max r / median r | LN inputs vs base model |",
            "|---|---|---|---|---|---|"]
    for m in res["models"]:
        d = m["max_ln_input_diff_vs_base"]
        same = "—" if d is None else f"max abs diff {d:.1e}"
        out.append(f"| {m['model']} | {m['layernorms']} | {m['layers_with_outliers']} | "
                   f"{100 * m['flagged_share']:.1f} % | {m['max_over_median']:.1f} | {same} |")
    out += ["", "## For comparison: LayerNorm *outputs* (post-LN activations, the inputs of qkv / fc1)", "",
            "Not what O-2SF is for in TSPTQ-ViT, but where the `-outlier` twins put their 8-32x channels. "
            "Same quantizers, relative MSE, mean over LayerNorms.", "", head, "|" + "---|" * (2 + len(bits))]
    for m in res["models"]:
        for meth in METHODS:
            cells = [_e(m["outputs"]["summary"][f"{meth}@{b}"]["rel_mse"]) for b in bits]
            out.append(f"| {m['model']} | {meth} | " + " | ".join(cells) + " |")
    out += ["", "| model | LayerNorms | with outliers | flagged channels | max r / median r |", "|---|---|---|---|---|"]
    for m in res["models"]:
        o = m["outputs"]
        out.append(f"| {m['model']} | {o['layernorms']} | {o['layers_with_outliers']} | "
                   f"{100 * o['flagged_share']:.1f} % | {o['max_over_median']:.1f} |")
    out += ["", "## Per LayerNorm input (8-bit where measured, else the first bit-width)", ""]
    b0 = 8 if 8 in bits else bits[0]
    for m in res["models"]:
        if m["max_ln_input_diff_vs_base"] is not None:
            continue  # same inputs as the base model
        out += [f"### {m['model']}", "",
                "| LayerNorm | C | flagged | max/median | O-2SF n | per-tensor | ptf | o2sf | per-channel |",
                "|---|---|---|---|---|---|---|---|---|"]
        for e in m["layers"]:
            er = e["errors"]
            out.append(f"| {e['ln']} | {e['channels']} | {e['flagged']} | {e['max_over_median']:.1f} | "
                       f"{e['o2sf_shift'][b0]} | {_e(er[f'per-tensor@{b0}']['rel_mse'])} | "
                       f"{_e(er[f'ptf@{b0}']['rel_mse'])} | {_e(er[f'o2sf@{b0}']['rel_mse'])} | "
                       f"{_e(er[f'per-channel@{b0}']['rel_mse'])} |")
        out.append("")
    return "\n".join(out) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=list_reference_models())
    ap.add_argument("--bits", nargs="*", type=int, default=[8, 6, 4])
    ap.add_argument("--calib-images", type=int, default=64)
    ap.add_argument("--eval-images", type=int, default=64)
    ap.add_argument("--kappa", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "bench/results/o2sf_layernorm"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    models, missing = [], []
    base_inputs: dict[str, list[Tensor]] = {}
    t0 = time.time()
    for name in args.models:
        try:
            res = run_model(name, args, base_inputs)
        except ModelError as e:
            log.info("skip %s: %s", name, e)
            missing.append(name)
            continue
        s8 = res["summary"]
        log.info("%s: %d LayerNorms, %.1f %% channels flagged; %s", name, res["layernorms"],
                 100 * res["flagged_share"],
                 ", ".join(f"{k} {v['rel_mse']:.2e}" for k, v in s8.items() if k.endswith(f"@{args.bits[0]}")))
        models.append(res)
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "platform": platform.platform(terse=True),
              "torch": torch.__version__, "seconds": round(time.time() - t0, 1),
              "args": vars(args), "methods": METHODS, "missing": missing, "models": models}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    log.info("wrote %s.{json,md} (%.0f s); missing: %s", out, result["seconds"], missing or "none")
    return 0


if __name__ == "__main__":
    sys.exit(main())
