"""Two-scale quantizers on REAL post-Softmax and post-GELU values: PTQ4ViT twin uniform [V-code] and
V-2SF (TSPTQ-ViT, our reconstruction [R]) against one uniform scale, with the ablation of V-2SF's
[R] choices (split rule, negative-range handling, search metric).

Values are captured from the float reference models on Fashion-MNIST train images: attention
probabilities ``A`` and values ``V`` of every attention layer (the input of ``attn @ v``, via
:func:`vitq.wrap` and a pre-hook on each attention core's ``matmul_av``) and the output of every
``nn.GELU`` (found by type). ``--calib-images`` images calibrate, ``--eval-images`` *other* images
measure:

* post-Softmax: ``||A·V − Â·V||² / ||A·V||²`` (attention-output error), mean over layers;
* post-GELU: ``||x̂ − x||² / ||x||²``, mean over layers.

Every quantizer is calibrated with :class:`vitq.observers.Observer` (so ``twin_uniform`` / ``v2sf``
run their own MSE search on the calibration sample; ``uniform`` is min-max, ``uniform-mse`` the
``mse`` observer's clipping search, for a fair searched baseline); the ``…-avmetric`` rows instead call
:func:`vitq.quantizers.two_scale.search_params` with an attention-output metric closure (the hook the
Hessian-guided metric of PTQ4ViT uses).

Writes ``bench/results/two_scale_act.{md,json}``.

    .venv/bin/python -m bench.studies.two_scale_act --models fmnist-vit fmnist-swin
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

import vitq
from vitq.data import FashionMNIST, Preprocess
from vitq.errors import ModelError
from vitq.models import data_config
from vitq.nn import QAttentionCore
from vitq.observers import Observer
from vitq.passes.tanq_calib import capture_attention
from vitq.quantizers import QuantSpec, fake_quant
from vitq.quantizers.two_scale import search_params
from vitq.reference import REFERENCE_MODELS, load_reference

log = logging.getLogger("two_scale_act")
ROOT = Path(__file__).resolve().parents[2]

SOFTMAX: dict[str, dict[str, Any]] = {
    "uniform": dict(quantizer="uniform"),
    "uniform-mse": dict(quantizer="uniform", observer="mse"),
    "twin_uniform": dict(quantizer="twin_uniform"),
    "v2sf": dict(quantizer="v2sf"),
    "v2sf-threshold": dict(quantizer="v2sf", options={"split_rule": "threshold"}),
    "v2sf-avmetric": dict(quantizer="v2sf", avmetric=True),
    "twin_uniform-avmetric": dict(quantizer="twin_uniform", avmetric=True),
}
GELU: dict[str, dict[str, Any]] = {
    "uniform": dict(quantizer="uniform"),
    "uniform-mse": dict(quantizer="uniform", observer="mse"),
    "twin_uniform": dict(quantizer="twin_uniform", options={"mode": "gelu"}),
    "v2sf own_scale": dict(quantizer="v2sf", options={"mode": "gelu"}),
    "v2sf own_scale threshold": dict(quantizer="v2sf", options={"mode": "gelu", "split_rule": "threshold"}),
    "v2sf small_scale": dict(quantizer="v2sf", options={"mode": "gelu", "negative": "small_scale"}),
    "v2sf clip": dict(quantizer="v2sf", options={"mode": "gelu", "negative": "clip"}),
}


def images(model: nn.Module, n_calib: int, n_eval: int, seed: int) -> tuple[Tensor, Tensor]:
    ds = FashionMNIST(None, "train")
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[: n_calib + n_eval]
    x = Preprocess(data_config(model))(ds.images[idx])
    return x[:n_calib], x[n_calib:]


def capture(model: nn.Module, x: Tensor) -> tuple[list[tuple[Tensor, Tensor]], list[Tensor]]:
    """``(A, V)`` per attention layer and the GELU outputs per MLP, from the float model."""
    wrapped = vitq.wrap(copy.deepcopy(model))
    cores = [m for m in wrapped.modules() if isinstance(m, QAttentionCore)]
    gelus: dict[int, list[Tensor]] = {}
    acts = [m for m in wrapped.modules() if isinstance(m, nn.GELU)]
    hs = [m.register_forward_hook(lambda _m, _a, out, i=i: gelus.setdefault(i, []).append(out.detach().float()))
          for i, m in enumerate(acts)]
    try:
        with torch.no_grad():
            av = capture_attention(wrapped, (x[i:i + 64] for i in range(0, len(x), 64)),
                                   [c.matmul_av for c in cores], len(x))
    finally:
        for h in hs:
            h.remove()
    return av, [torch.cat(gelus[i]) for i in sorted(gelus)]


def calibrated(spec: QuantSpec, x: Tensor) -> dict[str, Tensor]:
    obs = Observer(spec, "bench")
    obs.observe(x)
    return obs.compute()


def av_error(a: Tensor, v: Tensor, ah: Tensor) -> float:
    return float(((ah - a) @ v).pow(2).sum() / (a @ v).pow(2).sum())


def run_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    model = load_reference(name)
    xc, xe = images(model, args.calib_images, args.eval_images, args.seed)
    av_c, gelu_c = capture(model, xc)
    av_e, gelu_e = capture(model, xe)
    rows: list[dict[str, Any]] = []
    for bits in args.bits:
        for label, kw in SOFTMAX.items():
            spec = QuantSpec(kw["quantizer"], bits, observer=kw.get("observer", "minmax"), options=kw.get("options", {}))
            errs, params = [], []
            for (a, v), (ae, ve) in zip(av_c, av_e, strict=True):
                if kw.get("avmetric"):
                    p = search_params(a, spec, metric=lambda ah, aa, v=v: ((ah - aa) @ v).pow(2).mean())
                else:
                    p = calibrated(spec, a)
                errs.append(av_error(ae, ve, fake_quant(ae, p, spec)))
                params.append({k: float(t.reshape(-1)[0]) for k, t in p.items()})
            rows.append({"site": "post-softmax", "quantizer": label, "bits": bits, "errors": errs,
                         "mean": sum(errs) / len(errs), "params": params})
        for label, kw in GELU.items():
            spec = QuantSpec(kw["quantizer"], bits, observer=kw.get("observer", "minmax"), options=kw.get("options", {}))
            errs, params = [], []
            for g, ge in zip(gelu_c, gelu_e, strict=True):
                p = calibrated(spec, g)
                errs.append(float((fake_quant(ge, p, spec) - ge).pow(2).sum() / ge.pow(2).sum()))
                params.append({k: float(t.reshape(-1)[0]) for k, t in p.items()})
            rows.append({"site": "post-gelu", "quantizer": label, "bits": bits, "errors": errs,
                         "mean": sum(errs) / len(errs), "params": params})
        log.info("%s %d-bit: %s", name, bits, ", ".join(f"{r['site'][5:]} {r['quantizer']} {r['mean']:.2e}"
                                                          for r in rows if r["bits"] == bits))
    return {"model": name, "attention_layers": len(av_c), "gelu_layers": len(gelu_c), "rows": rows}


def markdown(res: dict[str, Any]) -> str:
    bits = res["args"]["bits"]
    out = ["# Twin uniform and V-2SF on real post-Softmax / post-GELU values", "",
           f"Generated by `bench/studies/two_scale_act.py` on {res['date']} ({res['platform']}, torch {res['torch']}); "
           f"{res['args']['calib_images']} calibration + {res['args']['eval_images']} other evaluation images "
           f"(Fashion-MNIST train, seed {res['args']['seed']}). V-2SF is our reconstruction [R] of TSPTQ-ViT; "
           "twin uniform is PTQ4ViT's (MSE search here, not its Hessian metric).", ""]
    if res["missing"]:
        out += [f"Missing weights (not measured): {', '.join(res['missing'])}.", ""]
    for site, title in (("post-softmax", "Post-Softmax: attention-output error ||A·V − Â·V||² / ||A·V||²"),
                        ("post-gelu", "Post-GELU: relative MSE ||x̂ − x||² / ||x||²")):
        out += [f"## {title} (mean over layers)", "",
                "| model | quantizer | " + " | ".join(f"{b}-bit" for b in bits) + " |",
                "|" + "---|" * (2 + len(bits))]
        for m in res["models"]:
            labels = dict.fromkeys(r["quantizer"] for r in m["rows"] if r["site"] == site)
            for lab in labels:
                cells = [next(f"{r['mean']:.2e}" for r in m["rows"]
                              if r["site"] == site and r["quantizer"] == lab and r["bits"] == b) for b in bits]
                out.append(f"| {m['model']} | {lab} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=list(REFERENCE_MODELS))
    ap.add_argument("--bits", nargs="*", type=int, default=[8, 6, 4])
    ap.add_argument("--calib-images", type=int, default=32)
    ap.add_argument("--eval-images", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "bench/results/two_scale_act"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    t0 = time.time()
    models, missing = [], []
    for name in args.models:
        try:
            models.append(run_model(name, args))
        except ModelError as e:
            log.info("skip %s: %s", name, e)
            missing.append(name)
    res = {"date": time.strftime("%Y-%m-%d %H:%M"), "platform": platform.platform(terse=True),
           "torch": torch.__version__, "seconds": round(time.time() - t0, 1), "args": vars(args),
           "missing": missing, "models": models}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    out.with_suffix(".md").write_text(markdown(res))
    log.info("wrote %s.{json,md} (%.0f s); missing: %s", out, res["seconds"], missing or "none")
    return 0


if __name__ == "__main__":
    sys.exit(main())
