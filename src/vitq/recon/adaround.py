"""AdaRound (Nagel et al., ICML 2020) as a *weight quantizer mode*.

The maths (pure functions, METHODS.md §5 "AdaRound"; released BRECQ/QDrop code):

* rectified sigmoid  h(V) = clip(σ(V)(ζ − γ) + γ, 0, 1),  ζ = 1.1, γ = −0.1;
* initialisation     V such that h(V) = frac(W/Δ)  (so the soft weight starts at W);
* regulariser        λ Σ (1 − |2h(V) − 1|^β), zero during the warm-up;
* β schedule         β = 20 for the first ``warmup`` fraction of iterations, then linearly 20 → 2;
* hard rounding      h = 1[V ≥ 0] at the end.

The quantization formula itself is *not* here: :class:`AdaRoundWeight` calls the uniform
quantizer's ``fake_quant`` with the extra parameter ``round_offset`` = h(V), which switches its
rounding from round-to-nearest to ``floor + h`` (``vitq.quantizers.uniform``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..nn import FakeQuant
from ..quantizers.base import fake_quant
from ..quantizers.uniform import ROUND_OFFSET

ZETA, GAMMA = 1.1, -0.1


def rectified_sigmoid(v: Tensor) -> Tensor:
    """h(V) = clip(σ(V)(ζ − γ) + γ, 0, 1)  (AdaRound eq. 23)."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def init_v(w: Tensor, scale: Tensor) -> Tensor:
    """V with h(V) = frac(w / scale): the soft-rounded weight starts equal to w (inside the range)."""
    x = w / scale
    rest = (x - torch.floor(x)).clamp(1e-6, 1 - 1e-6)
    return -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0)


def hard_offset(v: Tensor) -> Tensor:
    """The final rounding decision: up where V ≥ 0 (h(V) ≥ 0.5)."""
    return (v >= 0).to(v.dtype)


def round_loss(v: Tensor, beta: float) -> Tensor:
    """Σ (1 − |2h(V) − 1|^β): pushes every h(V) to 0 or 1."""
    return (1.0 - (2.0 * rectified_sigmoid(v) - 1.0).abs().pow(beta)).sum()


def beta_at(it: int, iters: int, warmup: float, start: float = 20.0, end: float = 2.0) -> float:
    """Linear temperature decay of BRECQ's ``LinearTempDecay``: ``start`` until ``warmup * iters``,
    then linearly to ``end`` at ``iters``."""
    t0 = warmup * iters
    if it < t0 or iters <= t0:
        return start
    rel = (it - t0) / (iters - t0)
    return end + (start - end) * max(0.0, 1.0 - rel)


class AdaRoundWeight(nn.Module):
    """Weight quantizer mode: same spec and parameters as the :class:`FakeQuant` it wraps, the
    rounding learned. Put in a layer's weight slot for the duration of a reconstruction unit."""

    def __init__(self, fq: FakeQuant, weight: Tensor) -> None:
        super().__init__()
        if fq.spec.quantizer != "uniform" or fq.spec.dynamic:
            from ..errors import ConfigError

            raise ConfigError(f"AdaRound needs a static uniform weight quantizer, {fq.site} is "
                              f"{fq.spec.describe()}: use weights=fp or weights=none for this recipe")
        self.fq = fq
        self.v = nn.Parameter(init_v(weight.detach(), fq.params["scale"]))
        self.hard = False

    @property
    def spec(self):  # type: ignore[no-untyped-def]
        return self.fq.spec

    def offset(self) -> Tensor:
        return hard_offset(self.v) if self.hard else rectified_sigmoid(self.v)

    def forward(self, w: Tensor) -> Tensor:
        if not self.fq.enabled:
            return w
        return fake_quant(w, {**self.fq.params, ROUND_OFFSET: self.offset()}, self.fq.spec)

    @torch.no_grad()
    def hard_weight(self, w: Tensor) -> Tensor:
        """The hard-rounded quantized weight (on the grid: the wrapped FakeQuant maps it to itself)."""
        return fake_quant(w, {**self.fq.params, ROUND_OFFSET: hard_offset(self.v)}, self.fq.spec)

    def extra_repr(self) -> str:
        return f"adaround {self.fq.site}" + (" hard" if self.hard else "")


def cosine_lr(base: float, it: int, iters: int) -> float:
    """``CosineAnnealingLR(T_max=iters, eta_min=0)`` at step ``it``."""
    return base * 0.5 * (1.0 + math.cos(math.pi * min(it, iters) / max(iters, 1)))
