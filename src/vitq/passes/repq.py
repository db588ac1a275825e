"""``reparam`` pass: RepQ-ViT's post-LayerNorm scale reparameterization (METHODS.md §1b(i), §5).

Post-LayerNorm activations (roles QKV_IN, FC1_IN, REDUCTION_IN) are first calibrated *channel-wise*
(per-channel ``Δ_c, z_c``, the ``calibrate`` pass). This pass then, for every LayerNorm -> consumer
pair the adapter lists (:meth:`~vitq.adapters.Adapter.ln_consumers`; Swin patch merging included),
moves the channel differences into the LayerNorm affine and the consumer's weight with the one
exact folding function :func:`vitq.passes.reparam.fold_ln_affine`::

    Δt = TARGET(Δ),  zt = TARGET(z),  mt = -zt·Δt,  m_c = -z_c·Δ_c
    r_c = Δ_c / Δt,  b_c = m_c / r_c - mt          (= Δt (zt - z_c))
    LN: γ <- γ / r,  β <- β / r - b;   Linear: W[:, c] <- W[:, c] · r_c,  bias <- bias + W_new b

and replaces the consumer's channel-wise input quantizer by a *per-tensor* one with ``(Δt, zt)``.
In exact arithmetic the codes of every element are unchanged (``x'/Δt + zt == x/Δ_c + z_c``), so
the reparameterized model computes what the channel-wise calibrated one computes, with a
per-tensor quantizer a deployment kernel can use. The consumers' weight quantizers are then
re-calibrated on the new weights (RepQ-ViT test_quant.py, [V-code]).

``target`` - a registry (:data:`TARGETS`, add one with :func:`register_target`):

* ``mean`` - RepQ-ViT / I&S-ViT [V-code] (``torch.mean`` of the scales and of the zero points;
  ``zt`` is not rounded in their code, nor by default here: ``round_zero_point``).
* ``median`` - DopQ-ViT v2's MOSF "Median as the Optimal Scaling Factor" **[R]**: the target being
  the median is from the abstract; using the median of the zero points too is our reading.
* ``mad_clip`` - a reading of DopQ-ViT v3's "MAD-guided" MOSF **[R]**, ours: the mean of the values
  clipped to ``median ± 3·MAD`` (MAD = median absolute deviation), i.e. outlier channels cannot
  drag the target.

``zero_point_target`` (default: the same as ``target``) chooses ``zt`` separately - METHODS.md
§1b(ii) leaves MOSF's zero-point handling open [R].

``clip_mad_k`` (default ``None``: off) - MOSF-MAD, **our reconstruction [R]** of DopQ-ViT v3's
"MAD-guided" MOSF (METHODS.md §1e.3): before folding, every channel scale is clipped,
``Δ_c <- min(Δ_c, median(Δ) + k·MAD(Δ))`` (equivalently ``r_c <= median(r) + k·MAD(r)``), the
channel zero points ``z_c`` kept. Unlike a target statistic this changes the quantized model:
channel c is then gridded with ``(Δ'_c, z_c)``, i.e. outlier channels lose range (are clipped) for
finer steps. The float function is unchanged (the folding is exact for any ``r``).

What the target changes (measured in tests/test_baselines.py, derivation ours): the *scale* target
cancels - activation codes are those of the channel-wise grid for any ``Δt``, and ``W·diag(r)``
changes only by a global factor that a per-output-channel weight quantizer absorbs - so two scale
targets give the same quantized model up to float rounding. The *zero-point* target does not: the
offset ``b`` is folded into the bias with the float weight, while the activation ``Δt (k - zt)``
meets the quantized weight, so the output moves by ``(Ŵ' - W')·Δt·(zt' - zt)``: weight
quantization error times the zero-point shift (METHODS.md §1b(ii) calls this "up to zero-point
rounding"; it is not rounding, and it is not small at 4 bits).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..adapters import get_adapter
from ..errors import ConfigError, ModelError
from ..granularity import PerChannel, PerTensor
from ..nn import FakeQuant, calibrate_weights
from ..nn.modules import QuantSlots
from ..options import Options
from ..state import ensure_state
from .registry import register_pass
from .reparam import fold_ln_affine

log = logging.getLogger(__name__)

Target = Callable[[Tensor], Tensor]
TARGETS: dict[str, Target] = {}
MAD_CLIP_K = 3.0


def register_target(name: str) -> Callable[[Target], Target]:
    """Register a target statistic ``fn(values (C,)) -> scalar`` for :func:`reparameterize`."""
    def deco(fn: Target) -> Target:
        TARGETS[name] = fn
        return fn
    return deco


@register_target("mean")
def _mean(v: Tensor) -> Tensor:
    return v.mean()


@register_target("median")
def _median(v: Tensor) -> Tensor:
    return v.median()  # lower median for an even count, as torch.median


@register_target("mad_clip")
def _mad_clip(v: Tensor) -> Tensor:
    med = v.median()
    mad = (v - med).abs().median()
    return v.clamp(med - MAD_CLIP_K * mad, med + MAD_CLIP_K * mad).mean()


def get_target(name: str) -> Target:
    try:
        return TARGETS[name]
    except (KeyError, TypeError):  # TypeError: a list or mapping where a name belongs
        raise ConfigError(f"unknown reparameterization target {name!r}: use one of {', '.join(sorted(TARGETS))}") from None


def clip_scales_mad(scale: Tensor, k: float) -> Tensor:
    """MOSF-MAD [R, ours]: ``min(Δ_c, median(Δ) + k·MAD(Δ))``, MAD = median absolute deviation."""
    med = scale.median()
    mad = (scale - med).abs().median()
    return torch.minimum(scale, med + float(k) * mad)


def check_clip_mad_k(k: Any) -> Optional[float]:
    if k is None:
        return None
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not float(k) >= 0:
        raise ConfigError(f"reparam clip_mad_k {k!r} must be a number >= 0 (e.g. 3) or null for no clipping")
    return float(k)


def reparam_scales(scale: Tensor, zero_point: Tensor, target: str = "mean", round_zero_point: bool = False,
                   zero_point_target: Optional[str] = None, clip_mad_k: Optional[float] = None,
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(r, b, Δt, zt)`` of the equations above from per-channel ``Δ_c``, ``z_c`` (shape (C,));
    with ``clip_mad_k`` the scales are MAD-clipped first (:func:`clip_scales_mad`)."""
    fn, zfn = get_target(target), get_target(zero_point_target or target)
    k = check_clip_mad_k(clip_mad_k)
    scale, zero_point = scale.reshape(-1).double(), zero_point.reshape(-1).double()
    if k is not None:
        scale = clip_scales_mad(scale, k)
    dt, zt = fn(scale), zfn(zero_point)
    if round_zero_point:
        zt = zt.round()
    r = scale / dt
    b = (-zero_point * scale) / r - (-zt * dt)
    return r.float(), b.float(), dt.float(), zt.float()


def _act_slot(mod: nn.Module) -> str:
    if isinstance(mod, QuantSlots):
        for slot, _role, kind in mod.slots():
            if kind == "act":
                return slot
    raise ModelError(f"{type(mod).__name__} has no activation quantization slot: wrap the model first")


@torch.no_grad()
def reparameterize(model: nn.Module, target: str = "mean", round_zero_point: bool = False,
                   adapter: Any = None, zero_point_target: Optional[str] = None,
                   clip_mad_k: Optional[float] = None) -> int:
    """Fold every channel-wise post-LN input quantizer into its LayerNorm (see module docstring).

    Pairs whose consumers have no enabled, calibrated, channel-wise uniform input quantizer are
    left alone. Returns the number of LayerNorms reparameterized.
    """
    get_target(target)
    get_target(zero_point_target or target)
    check_clip_mad_k(clip_mad_k)
    adapter = adapter or get_adapter(model)
    done = 0
    for pair in adapter.ln_consumers(model):
        ln: Any = model.get_submodule(pair.ln_name)
        consumers = [model.get_submodule(n) for n in pair.consumer_names]
        slots = [_act_slot(c) for c in consumers]
        fqs = [getattr(c, s) for c, s in zip(consumers, slots, strict=True)]
        if not all(isinstance(fq, FakeQuant) and fq.enabled for fq in fqs):
            continue
        fq0 = fqs[0]
        if fq0.spec.quantizer != "uniform" or not isinstance(fq0.spec.granularity, PerChannel):
            log.debug("reparam: %s input is %s, not channel-wise uniform; left alone", pair.ln_name, fq0.spec.describe())
            continue
        if not all(bool(fq.initialized) for fq in fqs):
            raise ConfigError(f"reparam: the input quantizer of {pair.consumer_names[0]} is not calibrated: "
                              "put a calibrate pass before reparam")
        for fq in fqs[1:]:
            if fq.spec != fq0.spec or any(not torch.equal(fq.params[k], fq0.params[k]) for k in fq0.params):
                raise ModelError(f"reparam: consumers of {pair.ln_name} have different input quantizers; "
                                 "they share one LayerNorm, so give them one rule")
        r, b, dt, zt = reparam_scales(fq0.scale, fq0.zero_point, target, round_zero_point, zero_point_target,
                                    clip_mad_k)
        fold_ln_affine(ln, consumers, r.to(ln.weight.device), b.to(ln.weight.device))
        spec = fq0.spec.with_(granularity=PerTensor())
        for c, s, fq in zip(consumers, slots, fqs, strict=True):
            new = FakeQuant(spec, fq.role, site=fq.site, kind="act")
            new.set_params({"scale": dt.to(fq.scale.device), "zero_point": zt.to(fq.scale.device)})
            setattr(c, s, new)
            calibrate_weights(c)  # the weight changed: its quantizer follows
        done += 1
    return done


@dataclass(frozen=True)
class ReparamOptions(Options):
    """``target``: the layer-wise scale statistic (:data:`TARGETS`); ``round_zero_point``;
    ``zero_point_target`` (null: as ``target``); ``clip_mad_k``: MOSF-MAD clipping (null: off)."""

    target: str = "mean"
    round_zero_point: bool = False
    zero_point_target: Optional[str] = field(default=None, metadata={"any_type": True})
    clip_mad_k: Optional[float] = field(default=None, metadata={"any_type": True})

    def validate(self) -> None:
        get_target(self.target)
        if self.zero_point_target is not None:
            get_target(self.zero_point_target)
        check_clip_mad_k(self.clip_mad_k)


@register_pass("reparam", ReparamOptions)
def reparam_pass(model: nn.Module, ctx: Any, opts: ReparamOptions = ReparamOptions()) -> nn.Module:
    """RepQ-ViT: fold channel-wise post-LayerNorm quantizers into LayerNorm + Linear (per-tensor after)."""
    target, clip_mad_k = opts.target, opts.clip_mad_k
    n = reparameterize(model, target, opts.round_zero_point, getattr(ctx, "adapter", None), opts.zero_point_target,
                       clip_mad_k)
    ensure_state(model).reparam.append({"pass": "reparam", **opts.to_dict(), "layernorms": n})
    adapter = getattr(ctx, "adapter", None)
    if n == 0 and adapter is not None and not adapter.ln_consumers(model):
        log.warning("reparam: this model has no LayerNorm -> Linear pair (%s: post-norm blocks read the residual "
                    "stream directly); RepQ-ViT's reparameterization does not apply, nothing changed", adapter.name)
    elif n == 0:
        log.warning("reparam: no LayerNorm consumer has a channel-wise uniform input quantizer; nothing to do "
                    "(give act:QKV_IN / act:FC1_IN / act:REDUCTION_IN granularity: channel)")
    else:
        log.info("reparam: %d LayerNorms reparameterized (target %s%s)", n, target,
                 "" if clip_mad_k is None else f", scales MAD-clipped at k={clip_mad_k}")
    return model


__all__ = ["MAD_CLIP_K", "TARGETS", "ReparamOptions", "check_clip_mad_k", "clip_scales_mad", "get_target", "register_target", "reparam_pass", "reparam_scales",
           "reparameterize"]
