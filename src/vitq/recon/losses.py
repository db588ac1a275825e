"""Reconstruction losses, pluggable by name.

A loss is ``fn(pred, target, grad, p) -> scalar``; ``grad`` is ``None`` unless the loss is
registered with ``needs_grad=True``, in which case the engine caches, for every calibration
sample, ``|∂KL/∂y| + 1`` at the unit output (BRECQ's Fisher-diagonal weights; see
:func:`vitq.recon.engine.unit_output_grads`).

* ``mse``          BRECQ / QDrop ``lp_loss``: ``|ŷ − y|^p`` **summed over dim 1, mean over the
                   rest**. For ViT token tensors (B, N, C) dim 1 is the token axis; for Swin
                   (B, H, W, C) it is the H axis; for logits (B, K) the classes. The released code
                   does exactly this (it was written for NCHW CNN features, where dim 1 is the
                   channel axis); we keep it for comparability of loss magnitudes and document it.
* ``fisher_diag``  BRECQ's ``((ŷ − y)² · g²).sum(1).mean()`` with ``g = |∂L/∂y| + 1``.

The AOCQ issue registers its token-norm weighted loss here with :func:`register_loss`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from torch import Tensor

from ..errors import ConfigError

LossFn = Callable[[Tensor, Tensor, Optional[Tensor], float], Tensor]


@dataclass(frozen=True)
class LossInfo:
    name: str
    fn: LossFn
    needs_grad: bool = False
    doc: str = ""


LOSSES: dict[str, LossInfo] = {}


def register_loss(name: str, needs_grad: bool = False) -> Callable[[LossFn], LossFn]:
    def deco(fn: LossFn) -> LossFn:
        LOSSES[name] = LossInfo(name, fn, needs_grad, ((fn.__doc__ or "").strip().splitlines() or [""])[0])
        return fn
    return deco


def get_loss(name: str) -> LossInfo:
    if name not in LOSSES:
        raise ConfigError(f"unknown reconstruction loss {name!r}: use one of {', '.join(sorted(LOSSES))}")
    return LOSSES[name]


def lp_loss(pred: Tensor, target: Tensor, p: float = 2.0) -> Tensor:
    """``|pred − target|^p`` summed over dim 1, mean over the rest (BRECQ / QDrop ``lp_loss``)."""
    d = (pred - target).abs().pow(p)
    return d.sum(1).mean() if d.ndim > 1 else d.mean()


@register_loss("mse")
def mse_loss(pred: Tensor, target: Tensor, grad: Optional[Tensor], p: float) -> Tensor:
    """L_p output error (p = 2: MSE), summed over dim 1 as in the released BRECQ / QDrop code."""
    return lp_loss(pred, target, p)


@register_loss("fisher_diag", needs_grad=True)
def fisher_diag_loss(pred: Tensor, target: Tensor, grad: Optional[Tensor], p: float) -> Tensor:
    """Fisher-diagonal weighted squared error (BRECQ ``opt_mode='fisher_diag'``)."""
    assert grad is not None
    d = (pred - target).pow(2) * grad.pow(2)
    return d.sum(1).mean() if d.ndim > 1 else d.mean()
