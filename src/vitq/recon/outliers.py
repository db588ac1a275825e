"""Outlier statistics at unit boundaries (the OAS proxy, METHODS.md §2b, our reconstruction [R]).

For the float activation X entering piece i (the residual stream between pieces), with channels on
the last axis: a_c = ‖X_{:,c}‖∞ over every sample and position, and

    ratio_i = max_c a_c / median_c a_c

A boundary whose ratio is large has a few channels that dominate a boundary MSE; cutting a unit
there tunes everything before the cut to those channels (OAS's argument for coarser units).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from ..adapters import Piece


@torch.no_grad()
def boundary_outlier_ratios(fp_chain: Sequence[Piece], images: Tensor, batch_size: int = 64) -> list[float]:
    """``ratio[i]`` for the input of every piece ``i`` (``ratio[0]``, the image, is NaN)."""
    n = len(fp_chain)
    amax: list[Tensor | None] = [None] * (n + 1)
    for s in range(0, images.shape[0], batch_size):
        x = images[s:s + batch_size]
        for i, p in enumerate(fp_chain):
            x = p.fn(x)
            a = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).float().cpu()
            amax[i + 1] = a if amax[i + 1] is None else torch.maximum(amax[i + 1], a)  # type: ignore[arg-type]
    out = [float("nan")]
    for i in range(1, n):
        found = amax[i]
        assert found is not None  # set for every piece above
        a = found
        med = float(a.median())
        out.append(float(a.max()) / med if med > 0 else float("inf"))
    return out


def proxy_score(cuts: Sequence[int], ratios: Sequence[float], tau: float) -> float:
    """J(S) = Σ_{cut t} log(ratio_t / τ) [R]: a cut at an outlier-heavy boundary (ratio > τ) costs,
    a cut at a clean boundary (ratio < τ) pays - finer units are easier to optimise there."""
    return float(sum(math.log(max(ratios[t], 1e-12) / tau) for t in cuts if t > 0))
