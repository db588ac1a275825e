"""``tanq_calibrate`` pass: per-layer (θ, s) of TanQ post-Softmax quantizers by attention-output
error ``||A·V − Â·V||²`` on calibration data (METHODS.md §1b(iii); the calibration rule, like
TanQ itself, is OUR reconstruction [R], not DopQ-ViT's published procedure).

For every attention core (:class:`~vitq.nn.QAttentionCore`, found by type, whatever the family) whose ``matmul_av`` probabilities site is a ``tanq`` FakeQuant, a forward pre-hook
on ``matmul_av`` captures ``(A, V)`` as they reach it - with every TanQ site switched off, every
other site as it is - and :func:`vitq.quantizers.tan.search_theta` picks the best candidate.
V is used in float (the ATTN_V site, if any, is not applied to the target or the estimate).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import CalibrationError
from ..nn import FakeQuant, QAttentionCore
from ..options import Options, is_int, is_number, need
from ..quantizers.tan import THETA_GRID, search_theta
from .registry import register_pass

log = logging.getLogger(__name__)

def tanq_sites(model: nn.Module) -> list[tuple[Any, FakeQuant]]:
    """``(matmul_av, its probabilities FakeQuant)`` for every attention core quantized with tanq."""
    out = []
    for m in model.modules():
        if isinstance(m, QAttentionCore):
            fq = m.matmul_av.quant_a
            if isinstance(fq, FakeQuant) and fq.enabled and fq.spec.quantizer == "tanq":
                out.append((m.matmul_av, fq))
    return out


@torch.no_grad()
def capture_attention(model: nn.Module, batches: Any, matmuls: Sequence[nn.Module],
                      max_images: int) -> list[tuple[Tensor, Tensor]]:
    """Run ``batches`` (at most ``max_images`` images) and return the ``(A, V)`` each of
    ``matmuls`` received, concatenated over batches, on the CPU."""
    got: list[list[tuple[Tensor, Tensor]]] = [[] for _ in matmuls]

    def hook(i: int):  # type: ignore[no-untyped-def]
        def pre(_mod: nn.Module, args: tuple[Tensor, ...]) -> None:
            got[i].append((args[0].detach().float().cpu(), args[1].detach().float().cpu()))
        return pre

    handles = [mm.register_forward_pre_hook(hook(i)) for i, mm in enumerate(matmuls)]
    seen = 0
    try:
        for x in batches:
            if seen >= max_images:
                break
            x = x[: max_images - seen]
            model(x)
            seen += x.shape[0]
    finally:
        for h in handles:
            h.remove()
    if seen == 0:
        raise CalibrationError("tanq_calibrate saw no calibration images: pass at least one")
    return [(torch.cat([a for a, _ in g]), torch.cat([v for _, v in g])) for g in got]


SCALE_NAMES = ("one", "max", "quantile")


@dataclass(frozen=True)
class TanqCalibrateOptions(Options):
    """``thetas``: the θ grid (each in (0, 1)); ``scales``: range candidates (``one``, ``max``,
    ``quantile`` or a number); ``percentile``: the quantile candidate's level; ``max_images``:
    calibration images whose attention is captured."""

    thetas: tuple[float, ...] = field(default=THETA_GRID, metadata={"any_type": True})
    scales: tuple[Any, ...] = field(default=("one", "quantile"), metadata={"any_type": True})
    percentile: float = 0.9999
    max_images: int = 64

    def validate(self) -> None:
        th = self.thetas
        need(isinstance(th, (list, tuple)) and len(th) > 0 and all(is_number(t) and 0 < float(t) < 1 for t in th),
             f"tanq_calibrate thetas={th!r} must be a non-empty list of numbers strictly between 0 and 1")
        sc = self.scales
        need(isinstance(sc, (list, tuple)) and len(sc) > 0
             and all((is_number(v) and float(v) > 0) or v in SCALE_NAMES for v in sc),
             f"tanq_calibrate scales={sc!r} must be a non-empty list of {', '.join(SCALE_NAMES)} or positive numbers")
        need(0.5 < float(self.percentile) <= 1.0, f"tanq_calibrate percentile={self.percentile} must be in (0.5, 1]")
        need(is_int(self.max_images) and self.max_images >= 1,
             f"tanq_calibrate max_images={self.max_images!r} must be an integer >= 1")


@register_pass("tanq_calibrate", TanqCalibrateOptions)
def tanq_calibrate_pass(model: nn.Module, ctx: Any, opts: TanqCalibrateOptions = TanqCalibrateOptions()) -> nn.Module:
    """TanQ calibration: grid-search θ and s per attention layer by attention-output error."""
    sites = tanq_sites(model)
    if not sites:
        log.warning("tanq_calibrate: no post-Softmax site uses the tanq quantizer; nothing to do")
        return model
    saved = [fq.enabled for _, fq in sites]
    for _, fq in sites:
        fq.enabled = False
    try:
        captured = capture_attention(model, ctx.calib_batches(desc="tanq_calibrate"),
                                     [mm for mm, _ in sites], opts.max_images)
    finally:
        for (_, fq), s in zip(sites, saved, strict=True):
            fq.enabled = s
    for (_, fq), (a, v) in zip(sites, captured, strict=True):
        best, table = search_theta(a, v, fq.spec, tuple(float(t) for t in opts.thetas), tuple(opts.scales),
                                   float(opts.percentile))
        fq.set_params({k: t.to(fq.initialized.device) for k, t in best.items()})
        log.info("tanq_calibrate %s: theta=%.3g scale=%.5g (error %.4g, %d candidates)", fq.site,
                 float(best["theta"]), float(best["scale"]), min(r["error"] for r in table), len(table))
    return model
