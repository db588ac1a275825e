"""LayerNorm -> consumer reparameterization: one generic, exact-in-float folding function.

For a LayerNorm output ``y`` (per channel c) read by Linear layers ``W y + bias``, choose a per-
channel scale ``r`` and shift ``b`` and rewrite

    LN:      gamma <- gamma / r,   beta <- beta / r - b          (new output y' = y / r - b)
    Linear:  W <- W diag(r),       bias <- bias + W_new b

so that ``W_new y' + bias_new == W y + bias`` exactly in real arithmetic (float: to rounding).
RepQ-ViT's reparameterization (METHODS.md §1b(i)) is this with ``r = Delta_c / Delta_target`` and
``b`` from the zero points; the outlier variants of the reference models use it with ``b = 0``
and ``r = 1 / s`` to *create* outlier channels without changing the function.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..adapters import get_adapter
from ..errors import ModelError

log = logging.getLogger(__name__)


def _get(model: nn.Module, name: str) -> Any:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ModelError(f"module {name} not found in the model") from None


@torch.no_grad()
def fold_ln_affine(ln: Any, consumers: list[Any], r: Tensor, b: Optional[Tensor] = None) -> None:
    """Apply the exact LN/Linear rewrite above in place (``r``: per-channel, positive)."""
    if getattr(ln, "weight", None) is None or getattr(ln, "bias", None) is None:
        raise ModelError("LayerNorm without affine parameters cannot be reparameterized")
    r = r.to(ln.weight.dtype)
    if (r <= 0).any() or not torch.isfinite(r).all():
        raise ValueError("reparameterization scales must be finite and positive")
    b = torch.zeros_like(r) if b is None else b.to(r.dtype)
    ln.weight.div_(r)
    ln.bias.div_(r).sub_(b)
    for lin in consumers:
        if lin.weight.dim() == 4:  # a conv reading the LayerNorm's channels (PVTv2's spatial reduction)
            if any(p != 0 for p in lin.padding) or lin.groups != 1:
                raise ModelError(f"a padded or grouped conv ({type(lin).__name__}) cannot take an exact LayerNorm fold: "
                                 "the shift differs at the borders")
            lin.weight.mul_(r.view(1, -1, 1, 1))
            shift = lin.weight.sum(dim=(2, 3)) @ b  # every output sees a whole window: the shift sums over it
        else:
            lin.weight.mul_(r.unsqueeze(0))
            shift = lin.weight @ b
        if lin.bias is None:
            if bool((shift != 0).any()):
                lin.bias = nn.Parameter(shift.clone())
        else:
            lin.bias.add_(shift)


def apply_channel_scales(model: nn.Module, scales: dict[str, dict[int, float]]) -> nn.Module:
    """Multiply LayerNorm output channels by ``scales[ln_name][channel]`` and fold the inverse into
    the consumers (function-preserving). Used to build the ``-outlier`` reference models."""
    pairs = {p.ln_name: p for p in get_adapter(model).ln_consumers(model)}
    for ln_name, chans in scales.items():
        if ln_name not in pairs:
            raise ModelError(f"{ln_name} is not a LayerNorm with known consumers in this model")
        ln = _get(model, ln_name)
        r = torch.ones_like(ln.weight)
        for c, s in chans.items():
            r[int(c)] = 1.0 / float(s)
        fold_ln_affine(ln, [_get(model, n) for n in pairs[ln_name].consumer_names], r)
    return model


@torch.no_grad()
def ln_output_ranges(model: nn.Module, x: Tensor) -> dict[str, Tensor]:
    """Per-channel max |output| of every reparameterizable LayerNorm on input batch ``x``."""
    pairs = get_adapter(model).ln_consumers(model)
    out: dict[str, Tensor] = {}
    hooks = []
    for p in pairs:
        def hook(_m: nn.Module, _i: Any, y: Tensor, name: str = p.ln_name) -> None:
            r = y.detach().abs().reshape(-1, y.shape[-1]).amax(0)
            out[name] = r if name not in out else torch.maximum(out[name], r)
        hooks.append(_get(model, p.ln_name).register_forward_hook(hook))
    try:
        model.eval()(x)
    finally:
        for h in hooks:
            h.remove()
    return out


def choose_outlier_scales(model: nn.Module, x: Tensor, seed: int = 0, per_ln: int = 4,
                          ratios: tuple[float, ...] = (8.0, 12.0, 16.0, 24.0, 32.0)
                          ) -> tuple[dict[str, dict[int, float]], dict[str, Any]]:
    """Pick ``per_ln`` channels of every reparameterizable LayerNorm (seeded) and the scales that
    make their range ``ratio x median`` channel range, ``ratio`` drawn from ``ratios``."""
    g = torch.Generator().manual_seed(seed)
    ranges = ln_output_ranges(model, x)
    scales: dict[str, dict[int, float]] = {}
    before, after = [], []
    for name, rng in ranges.items():
        med = rng.median()
        chans = torch.randperm(rng.numel(), generator=g)[:per_ln].tolist()
        picks = torch.randint(0, len(ratios), (len(chans),), generator=g).tolist()
        scales[name] = {int(c): float(ratios[k] * med / rng[c].clamp_min(1e-6)) for c, k in zip(chans, picks)}
        new = rng.clone()
        for c, s in scales[name].items():
            new[c] = rng[c] * s
        before.append(float(rng.max() / med))
        after.append(float(new.max() / new.median()))
    report = {
        "layernorms": len(ranges), "channels_per_ln": per_ln, "ratios": list(ratios),
        "max_over_median_before": [round(v, 2) for v in before],
        "max_over_median_after": [round(v, 2) for v in after],
    }
    return scales, report
