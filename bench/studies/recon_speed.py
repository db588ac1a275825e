#!/usr/bin/env python
"""Reconstruction speed: today's engine against the torch.where implementation it replaced, same host.

    python -m bench.studies.recon_speed                          # deit + swin, 300 iterations, 3 rounds
    python -m bench.studies.recon_speed --models fmnist-vit --iters 500

QDrop mixes quantized and float activations element-wise, and every uniform activation quantizer
clamps its codes. Written with ``torch.where`` and ``torch.clamp`` (whose backward calls
``torch.where``), those ops took about a third of a QDrop block's training step on the CPU:
``torch.where`` with a bool mask runs 20-50x slower than a multiply on these tensor sizes. The engine
now computes the same values and gradients with float masks (``vitq.recon.engine.qdrop_mix``,
``vitq.quantizers.base.clamp``). This benchmark times both in one process, interleaved
(``--rounds`` alternations, the median is reported), on the first block of each reference model:

* ``qdrop``: the qdrop recipe's unit training (AdaRound + LSQ + drop 0.5, batch 32);
* ``fp-weights``: dopq's stage 3 (float weights trained through the weight quantizers, activations
  quantized, no drop);

and checks that both implementations end with bit-identical weights and activation scales.
1 thread; seconds per 1k iterations = the unit's training-loop time / iterations. Writes
``bench/results/recon_speed.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
from contextlib import contextmanager
from typing import Any, Iterator

import torch

import vitq.quantizers.uniform as uniform  # noqa: E402
import vitq.recon.engine as engine  # noqa: E402
from bench.common import RESULTS, Data, calibrate_once, machine_meta, save_rows, setup  # noqa: E402
from vitq.bits import Bits  # noqa: E402
from vitq.pipeline import Context  # noqa: E402
from vitq.recon import ReconConfig, float_copy  # noqa: E402
from vitq.reference import load_reference  # noqa: E402

OUT = RESULTS / "recon_speed.json"
MODES: dict[str, dict[str, Any]] = {
    "qdrop": {"weights": "adaround", "acts": "lsq", "qdrop_p": 0.5},
    "fp-weights": {"weights": "fp", "acts": "none", "qdrop_p": 1.0},
}


def where_mix(quant: torch.Tensor, fp: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """The implementation before 2026-12-02 (engine.qdrop hook and input mix)."""
    return torch.where(torch.rand(quant.shape, generator=gen, device=quant.device) < p, quant, fp)


@contextmanager
def reference_ops(on: bool) -> Iterator[None]:
    """Swap in torch.where / torch.clamp for the float-mask versions."""
    saved = engine.qdrop_mix, uniform.clamp
    if on:
        engine.qdrop_mix, uniform.clamp = where_mix, torch.clamp
    try:
        yield
    finally:
        engine.qdrop_mix, uniform.clamp = saved


def time_block(qcal: torch.nn.Module, calib: torch.Tensor, mode: str, iters: int, reference: bool,
               seed: int = 0) -> tuple[float, dict[str, torch.Tensor]]:
    """Train the first two units (embed, block 0) for ``iters`` iterations; (seconds per 1k iterations of
    block 0's training loop, final state dict)."""
    q = copy.deepcopy(qcal)
    ctx = Context(calib=calib, bits=Bits.parse("W4A4"), seed=seed, batch_size=64)
    cfg = ReconConfig(slicing="block", iters=iters, num_samples=calib.shape[0], **MODES[mode])
    r = engine.Reconstructor(q, cfg, calib, float_copy(q, ctx), seed=seed)
    r.units, r.unit_names = r.units[:2], r.unit_names[:2]
    with reference_ops(reference):
        rep = r.run()
    return 1000.0 * rep["unit_reports"][1]["train_seconds"] / iters, q.state_dict()


def measure(name: str, iters: int, rounds: int, n_calib: int) -> list[dict[str, Any]]:
    model = load_reference(name)
    data = Data(model, n_calib, 256, seed=0)
    qcal, _, _ = calibrate_once(model, "qdrop", "W4A4", data, seed=0)
    rows = []
    for mode in MODES:
        t: dict[bool, list[float]] = {True: [], False: []}
        states: dict[bool, dict[str, torch.Tensor]] = {}
        for _ in range(rounds):
            for ref in (True, False):
                s, states[ref] = time_block(qcal, data.calib, mode, iters, ref)
                t[ref].append(s)
        same = all(torch.equal(v, states[False][k]) for k, v in states[True].items())
        old, new = statistics.median(t[True]), statistics.median(t[False])
        rows.append({"model": name, "mode": mode, "iters": iters, "rounds": rounds, "calib_images": n_calib,
                     "s_per_1k_where": round(old, 2), "s_per_1k_now": round(new, 2),
                     "speedup": round(old / new, 3), "bit_identical": same,
                     "all_where": [round(v, 2) for v in t[True]], "all_now": [round(v, 2) for v in t[False]]})
        print(f"{name} {mode}: {old:.1f} -> {new:.1f} s per 1k iterations (x{old / new:.2f}), bit-identical {same}")
    return rows


def render(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = ["# Reconstruction speed: float masks against torch.where (bench/studies/recon_speed.py)", "",
             f"Host: {meta.get('machine')} ({meta.get('cpu_capability')}), torch {meta.get('torch')}, 1 thread. First "
             "block of each reference model, W4A4, batch 32; seconds per 1k iterations of the block's training loop, "
             "median of the interleaved rounds (each round runs both implementations once). `where` = QDrop's mix "
             "and the uniform quantizer's clamp written with torch.where / torch.clamp (the engine before "
             "2026-12-02), `now` = float masks and torch.lerp (`vitq.recon.engine.qdrop_mix`, "
             "`vitq.quantizers.base.clamp`). `bit-identical`: both end with the same weights and activation scales, "
             "bit for bit. Other processes may have shared the CPU: the two columns of a row always ran under the "
             "same load, so read the ratio, not the absolute figure.", "",
             "| model | mode | iterations | rounds | s / 1k it (where) | s / 1k it (now) | speed-up | bit-identical |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['mode']} | {r['iters']} | {r['rounds']} | {r['s_per_1k_where']:.1f} | "
                     f"{r['s_per_1k_now']:.1f} | x{r['speedup']:.2f} | {'yes' if r['bit_identical'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=["fmnist-deit", "fmnist-swin"])
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calib", type=int, default=256, help="calibration images (the unit's training set)")
    args = ap.parse_args()
    setup()
    logging.getLogger("vitq.recon.engine").setLevel(logging.WARNING)
    meta = machine_meta()
    for m in args.models:
        save_rows(OUT, measure(m, args.iters, args.rounds, args.calib), meta, key=("model", "mode"))
    doc = json.loads(OUT.read_text())
    OUT.with_suffix(".md").write_text(render(doc["rows"], doc.get("meta", meta)))
    print(OUT.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
