"""``tanq_calibrate`` pass: per-layer (θ, s) of TanQ post-Softmax quantizers by attention-output
error ``||A·V − Â·V||²`` on calibration data (METHODS.md §1b(iii); the calibration rule, like
TanQ itself, is OUR reconstruction [R], not DopQ-ViT's published procedure).

For every attention core (:class:`~vitq.nn.QAttention` / :class:`~vitq.nn.QWindowAttention`,
found by type) whose ``matmul_av`` probabilities site is a ``tanq`` FakeQuant, a forward pre-hook
on ``matmul_av`` captures ``(A, V)`` as they reach it - with every TanQ site switched off, every
other site as it is - and :func:`vitq.quantizers.tan.search_theta` picks the best candidate.
V is used in float (the ATTN_V site, if any, is not applied to the target or the estimate).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import CalibrationError, ConfigError
from ..nn import FakeQuant, QAttention, QWindowAttention
from ..quantizers.tan import THETA_GRID, search_theta
from .registry import register_pass

log = logging.getLogger(__name__)

ATTENTION_TYPES = (QAttention, QWindowAttention)


def tanq_sites(model: nn.Module) -> list[tuple[nn.Module, FakeQuant]]:
    """``(matmul_av, its probabilities FakeQuant)`` for every attention core quantized with tanq."""
    out = []
    for m in model.modules():
        if isinstance(m, ATTENTION_TYPES):
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


@register_pass("tanq_calibrate", thetas=THETA_GRID, scales=("one", "quantile"), percentile=0.9999,
               max_images=64)
def tanq_calibrate_pass(model: nn.Module, ctx: Any, thetas: Sequence[float] = THETA_GRID,
                        scales: Sequence[Any] = ("one", "quantile"), percentile: float = 0.9999,
                        max_images: int = 64) -> nn.Module:
    """TanQ calibration: grid-search θ and s per attention layer by attention-output error."""
    if int(max_images) < 1:
        raise ConfigError(f"tanq_calibrate max_images must be >= 1, got {max_images}")
    sites = tanq_sites(model)
    if not sites:
        log.warning("tanq_calibrate: no post-Softmax site uses the tanq quantizer; nothing to do")
        return model
    saved = [fq.enabled for _, fq in sites]
    for _, fq in sites:
        fq.enabled = False
    try:
        captured = capture_attention(model, ctx.calib_batches(desc="tanq_calibrate"),
                                     [mm for mm, _ in sites], int(max_images))
    finally:
        for (_, fq), s in zip(sites, saved, strict=True):
            fq.enabled = s
    for (_, fq), (a, v) in zip(sites, captured, strict=True):
        best, table = search_theta(a, v, fq.spec, tuple(float(t) for t in thetas), tuple(scales),
                                   float(percentile))
        fq.set_params({k: t.to(fq.initialized.device) for k, t in best.items()})
        log.info("tanq_calibrate %s: theta=%.3g scale=%.5g (error %.4g, %d candidates)", fq.site,
                 float(best["theta"]), float(best["scale"]), min(r["error"] for r in table), len(table))
    return model
