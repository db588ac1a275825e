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
* ``token_norm``   AOCQ's token-normalised error (our reconstruction [R], see
                   :func:`token_norm_loss`): every token's squared error divided by its energy
                   relative to the sample's median token, so extreme tokens do not dominate;
                   ``token_norm_mean`` normalises by the mean token instead (METHODS.md's formula).

Other losses register here with :func:`register_loss`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
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


# -- AOCQ loss level: token-norm weighted reconstruction (METHODS.md §4b, our reconstruction [R]) ----
TOKEN_NORM_EPS = 1e-2
TOKEN_NORM_REFS = ("median", "mean")


def token_norm_weights(target: Tensor, p: float = 2.0, eps: float = TOKEN_NORM_EPS, ref: str = "median") -> Tensor:
    """Per-token weights ``w = 1 / φ(n)``, ``φ(n) = (n + ε m) / ((1 + ε) m)``, ``n = Σ_c |y|^p`` the
    token's energy (p = 2: ‖y‖²) and ``m`` the median (``ref="median"``, default) or mean
    (``"mean"``, METHODS.md's literal formula) token energy of its sample.

    A token of reference energy gets weight 1; a token k times more energetic about 1/k, so its
    error counts *relative* to its own size and extreme tokens (class token, outlier tokens) no
    longer dominate the block loss. The median is the default because the mean is dominated by the
    very tokens the weighting is meant to tame: with one token 1000x the others, ``m`` (mean) is
    ~10^5 times a typical token's energy and ``ε m`` then flattens every other weight to
    ``(1 + ε) / ε``. ``ε`` bounds the weight of a near-zero token by ``(1 + ε) / ε``. Tokens are
    every axis but the first (batch) and the last (channels); a 2-D tensor (logits) has one token per
    sample and weight 1. Shape: ``target`` without its last axis.
    """
    if ref not in TOKEN_NORM_REFS:
        raise ConfigError(f"token-norm reference {ref!r}: use one of {', '.join(TOKEN_NORM_REFS)}")
    if target.ndim < 3:
        return torch.ones(target.shape[:-1], dtype=target.dtype, device=target.device)
    n = target.detach().abs().pow(p).sum(-1)
    flat = n.flatten(1)
    m = flat.median(1).values if ref == "median" else flat.mean(1)
    m = m.clamp_min(torch.finfo(n.dtype).tiny).reshape(-1, *([1] * (n.ndim - 1)))
    return (1.0 + eps) * m / (n + eps * m)


def token_norm_terms(pred: Tensor, target: Tensor, p: float = 2.0, eps: float = TOKEN_NORM_EPS,
                     ref: str = "median") -> Tensor:
    """``w_t · Σ_c |ŷ − y|^p`` per token (shape of ``target`` without its last axis)."""
    return (pred - target).abs().pow(p).sum(-1) * token_norm_weights(target, p, eps, ref)


def _token_norm(pred: Tensor, target: Tensor, p: float, ref: str) -> Tensor:
    d = (pred - target).abs().pow(p)
    if d.ndim < 3:
        return d.sum(1).mean() if d.ndim > 1 else d.mean()
    d = d * token_norm_weights(target, p, ref=ref).unsqueeze(-1)
    return d.sum(1).mean()


@register_loss("token_norm")
def token_norm_loss(pred: Tensor, target: Tensor, grad: Optional[Tensor], p: float) -> Tensor:
    """Token-normalised L_p error (AOCQ's loss level [R]): ``Σ_c |ŷ − y|^p / φ(‖y‖)`` per token.

    The same reduction as ``mse`` (summed over dim 1, mean over the rest) of the per-element error
    weighted by :func:`token_norm_weights` (median reference): equal to ``mse`` when every token has
    the same energy.
    """
    return _token_norm(pred, target, p, "median")


@register_loss("token_norm_mean")
def token_norm_mean_loss(pred: Tensor, target: Tensor, grad: Optional[Tensor], p: float) -> Tensor:
    """``token_norm`` with METHODS.md's literal normaliser, the mean token energy (ablation)."""
    return _token_norm(pred, target, p, "mean")
