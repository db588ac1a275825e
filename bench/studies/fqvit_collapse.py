#!/usr/bin/env python
"""Why does ``fqvit`` collapse at low bits? Switch the fully-quantized sites off one role at a time.

    python -m bench.studies.fqvit_collapse                                  # vit + swin, W6A6 and W4A4
    python -m bench.studies.fqvit_collapse --models fmnist-vit --bits W4A4 --eval-size 2000

``fqvit`` is calibrated once per (model, bits); each variant then disables the FakeQuant sites of
some roles (``enabled = False``: those tensors stay float) and re-evaluates, so every variant shares
the same calibrated parameters. ``int_exp`` softmax stays on (on a float input it is the polynomial
alone). Also measured per role: the largest range of the calibrated sites (max - min, in the
tensor's units) and the step of the quantizer at that range, which is what a per-tensor scale has to
cover. Writes ``bench/results/fqvit_collapse.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from typing import Any

import torch

from bench.common import RESULTS, Data, machine_meta  # noqa: E402
from vitq.bits import Bits  # noqa: E402
from vitq.evaluate import evaluate  # noqa: E402
from vitq.nn import FakeQuant  # noqa: E402
from vitq.pipeline import Context, run_recipe  # noqa: E402
from vitq.recipes import load_recipe  # noqa: E402
from vitq.reference import load_reference  # noqa: E402

OUT = RESULTS / "fqvit_collapse"
FULL = ("LN_IN", "RESIDUAL", "SOFTMAX_IN")
#: variant -> roles left in float
VARIANTS: dict[str, tuple[str, ...]] = {
    "fqvit (all sites)": (),
    "LN_IN float": ("LN_IN",),
    "RESIDUAL float": ("RESIDUAL",),
    "LN_IN + RESIDUAL float": ("LN_IN", "RESIDUAL"),
    "SOFTMAX_IN float": ("SOFTMAX_IN",),
    "ATTN_PROBS float": ("ATTN_PROBS",),
    "all three full-quant roles float": FULL,
    "full-quant roles + ATTN_PROBS float": FULL + ("ATTN_PROBS",),
}


def set_float(model: torch.nn.Module, roles: tuple[str, ...]) -> int:
    n = 0
    for m in model.modules():
        if isinstance(m, FakeQuant) and m.kind == "act":
            m.enabled = m.role.value not in roles
            n += not m.enabled
    return n


def role_ranges(model: torch.nn.Module) -> dict[str, dict[str, float]]:
    """Per act role (uniform / PTF sites): the largest calibrated range (hi - lo) over its sites, and the widest step."""
    out: dict[str, dict[str, float]] = {}
    for m in model.modules():
        if not (isinstance(m, FakeQuant) and m.kind == "act" and bool(m.initialized)
                and m.spec.quantizer in ("uniform", "ptf")):
            continue
        p = m.params
        if "scale" not in p or p["scale"].numel() == 0:
            continue
        step = float(p["scale"].max())
        if m.spec.quantizer == "ptf":  # per-channel 2^alpha on one layer-wise scale
            step = step * float(2 ** p["shift"].max())
        q = 2 ** m.spec.bits - 1
        r = out.setdefault(m.role.value, {"sites": 0, "max_range": 0.0, "max_step": 0.0})
        r["sites"] += 1
        r["max_step"] = max(r["max_step"], step)
        r["max_range"] = max(r["max_range"], step * q)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["fmnist-vit", "fmnist-swin"])
    ap.add_argument("--bits", nargs="+", default=["W6A6", "W4A4"])
    ap.add_argument("--eval-size", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    ranges: dict[str, Any] = {}
    recipe = load_recipe("fqvit")
    for name in args.models:
        model = load_reference(name)
        data = Data(model, recipe.calib_size, args.eval_size, seed=0, batch_size=250)
        calib, ev = data.calib, data.eval_loader
        fp = evaluate(model, ev)["top1"]
        for bits in args.bits:
            q = copy.deepcopy(model)
            run_recipe(q, recipe, Context(calib=calib, bits=Bits.parse(bits), seed=0))
            ranges[f"{name} {bits}"] = role_ranges(q)
            for label, roles in VARIANTS.items():
                t0 = time.perf_counter()
                n_float = set_float(q, roles)
                top1 = evaluate(q, ev)["top1"]
                rows.append({"model": name, "bits": bits, "variant": label, "float_roles": list(roles),
                             "float_sites": n_float, "fp_top1": round(fp, 2), "q_top1": round(top1, 2),
                             "eval_size": args.eval_size, "seconds": round(time.perf_counter() - t0, 1)})
                print(f"{name:<14} {bits} {label:<38} top-1 {top1:6.2f} (FP {fp:.2f})", flush=True)
    meta = {**machine_meta(), "calib_size": recipe.calib_size}
    OUT.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows, "ranges": ranges}, indent=1) + "\n")
    OUT.with_suffix(".md").write_text(render(rows, ranges, meta))
    print(f"wrote {OUT.with_suffix('.md')}")


def render(rows: list[dict[str, Any]], ranges: dict[str, Any], meta: dict[str, Any]) -> str:
    keys = list(dict.fromkeys((r["model"], r["bits"]) for r in rows))
    lines = ["# fqvit at low bits: which fully-quantized site breaks it (bench/studies/fqvit_collapse.py)", "",
             f"`fqvit` calibrated once per model and bit-width ({meta['calib_size']} images), then the act "
             "sites of the named roles switched to float; top-1 on the first "
             f"{rows[0]['eval_size']} Fashion-MNIST test images. {meta['machine']}; torch {meta['torch']}.", "",
             "| variant | " + " | ".join(f"{m} {b}" for m, b in keys) + " |",
             "|---|" + "---:|" * len(keys)]
    by = {(r["model"], r["bits"], r["variant"]): r for r in rows}
    for label in VARIANTS:
        cells = [f"{by[(m, b, label)]['q_top1']:.2f}" if (m, b, label) in by else "—" for m, b in keys]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| FP | " + " | ".join(f"{by[(m, b, 'fqvit (all sites)')]['fp_top1']:.2f}" for m, b in keys) + " |")
    lines += ["", "## Widest calibrated range and step per act role", "",
              "max range = the largest (levels x step) over the role's sites; for PTF the step includes the "
              "largest 2^alpha.", "",
              "| model bits | role | sites | max range | max step |", "|---|---|---:|---:|---:|"]
    for k, per_role in ranges.items():
        for role, r in sorted(per_role.items()):
            lines.append(f"| {k} | {role} | {r['sites']} | {r['max_range']:.3g} | {r['max_step']:.3g} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
