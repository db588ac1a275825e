"""AOCQ operator level: LN_alpha and Add_alpha, channel-balancing rewrites exact in floating point.

Our reconstruction [R] of the operators the AOCQ paper names (seed Figure 1 caption: "It uses
Add_α and LN_α to diminish the imbalance between channels"; METHODS.md §4b). Both rescale the
channels of a tensor by powers of two chosen from calibration ranges, so that a *per-tensor*
quantizer sees channels of similar range, and fold the inverse scale elsewhere so that the float
function is unchanged - bit for bit in the usual case, since multiplying by a power of two is exact:

* **LN_alpha** (LayerNorm output ``y``, read by Linear layers): ``y' = y / α`` per channel, folded
  as LayerNorm ``γ, β ← γ/α, β/α`` and consumer ``W ← W diag(α)``
  (:func:`vitq.passes.reparam.fold_ln_affine` with ``r = α``, ``b = 0``).
* **Add_alpha** (the residual stream ``h``): the stream is stored as ``h̃ = h / α^h`` per channel.
  Every writer is divided: the embedding (conv rows / bias, class / distillation / register tokens,
  position embedding, or the affine of a LayerNorm whose output is the stream), the last Linear of
  every residual branch (attn.proj, mlp.fc2: rows and bias), Swin's patch-merging reduction (rows).
  Every reader undoes it: a LayerNorm reading the stream multiplies its (quantized) input by
  ``α^h`` before its statistics (``QLayerNorm.input_scale``; an integer LayerNorm does this with
  shifts, like FQ-ViT's PTF), a Linear reading it directly takes ``W ← W diag(α^h)``. One ``α^h``
  per stretch of constant width, shared by every state of the stream (every LayerNorm input):
  ViT / DeiT have one stream; Swin one per stage, each patch merging reading its stage's stream
  through a LayerNorm whose input holds the channels four times (``tile``), so Add_alpha crosses
  patch mergings exactly. Which module writes or reads a stream is the adapter's knowledge
  (:meth:`vitq.adapters.Adapter.residual_streams`).

How ``α`` is chosen from calibration statistics (:func:`pow2_balance`, option ``ln_rule`` /
``add_rule``): ``median`` is the formula METHODS.md §4b proposes, ``α_c = 2^round(log2(R_c /
median R))``; ``mse`` (default, ours) picks the powers of two that minimise the per-tensor min-max
quantization error counted in the original units, which is never worse than no balancing (``median``
is, on mildly unbalanced streams: measured in ``docs/methods/aocq.md``).

``max_exp`` bounds ``|log2 α|`` (a dead channel would otherwise be scaled up without bound).
The pass must run before ``calibrate`` (it changes the tensors the quantizers are calibrated on).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
from torch import Tensor, nn

from ..adapters import Adapter, ResidualStream, get_adapter
from ..errors import ConfigError, ModelError
from ..nn import QLayerNorm, disabled, fake_quants
from ..options import Options, is_int, need
from ..quantizers.base import QuantSpec, fake_quant, init_params
from ..state import ensure_state
from .registry import register_pass
from .reparam import fold_ln_affine

log = logging.getLogger(__name__)


# -- pure maths -----------------------------------------------------------------------------------
RULES = ("median", "mse")


def balance_cost(lo: Tensor, hi: Tensor, e: Tensor) -> Tensor:
    """Squared error, up to a constant, of per-tensor min-max quantization of ``x / 2^e`` counted in
    the units of ``x``: ``Σ_c 4^{e_c} · Σ_s range_s(e)²`` over the states ``s`` (rows of ``lo`` /
    ``hi``, per-channel minima / maxima) that share the factors, ``range_s`` including 0."""
    d = torch.pow(2.0, -e)
    top = (hi * d).amax(-1).clamp_min(0)
    bot = (lo * d).amin(-1).clamp_max(0)
    return torch.pow(4.0, e).sum() * (top - bot).pow(2).sum()


def pow2_balance(lo: Tensor, hi: Tensor, max_exp: int = 10, rule: str = "mse", sweeps: int = 8) -> Tensor:
    """Power-of-two channel factors ``α`` (the tensor is then divided by ``α``) from per-channel
    minima / maxima ``lo``, ``hi`` (shape ``(C,)``, or ``(S, C)`` for S states sharing one ``α``).

    * ``median`` (METHODS.md §4b [R]): ``α_c = 2^round(log2(R_c / median R))``, ``R_c = max |x_c|``:
      every channel's range brought within a factor √2 of the median.
    * ``mse`` (ours [R]): the ``α`` minimising :func:`balance_cost`, the squared error of a per-tensor
      min-max quantizer counted in the tensor's own units. Start: the symmetric optimum (for a target
      ``ρ = max_c R_c / α_c`` the best ``α_c`` is the smallest power of two with ``R_c / α_c <= ρ``;
      the cost is scale-free under ``ρ -> 2ρ``, so the candidates are every ``R_c`` moved into the
      top octave) or ``α = 1``, whichever costs less; then coordinate descent on single exponents
      (±1) under the asymmetric cost. Never worse than ``α = 1`` under this cost, which ``median``
      can be where the imbalance is mild.

    Exponents are centred on the median channel (the cost does not change) and clamped to
    ``[-max_exp, max_exp]`` (a dead channel would otherwise be scaled up without bound)."""
    if rule not in RULES:
        raise ConfigError(f"unknown balancing rule {rule!r}: use one of {', '.join(RULES)}")
    lo2, hi2 = lo.detach().float().reshape(-1, lo.shape[-1]), hi.detach().float().reshape(-1, hi.shape[-1])
    r = torch.maximum(lo2.abs(), hi2.abs()).amax(0).clamp_min(torch.finfo(torch.float32).tiny)
    lr = torch.log2(r)
    if rule == "median":
        e = (lr - lr.median()).round()
    else:
        top = lr.max()
        cand = top - torch.remainder(top - lr, 1.0)  # every channel's range moved into (top - 1, top]
        e_all = torch.ceil(lr.unsqueeze(0) - cand.unsqueeze(1) - 1e-6)
        sym = e_all[int((2.0 * cand + torch.log2(torch.pow(4.0, e_all).sum(1))).argmin())]
        sym = (sym - sym.median()).clamp(-max_exp, max_exp)
        zero = torch.zeros_like(lr)
        e = sym if balance_cost(lo2, hi2, sym) < balance_cost(lo2, hi2, zero) else zero
        best = balance_cost(lo2, hi2, e)
        order = torch.argsort(r, descending=True).tolist()
        for _ in range(sweeps):
            moved = False
            for c in order:
                for step in (1.0, -1.0):
                    if abs(float(e[c]) + step) > max_exp:
                        continue
                    e[c] += step
                    v = balance_cost(lo2, hi2, e)
                    if v < best * (1 - 1e-7):
                        best, moved = v, True
                        break
                    e[c] -= step
            if not moved:
                break
        e = e - e.median()
    return torch.pow(2.0, e.clamp(-max_exp, max_exp))


def per_tensor_quant_error(x: Tensor, alpha: Optional[Tensor] = None, bits: int = 8) -> float:
    """Mean squared error, in the units of ``x``, of quantizing ``x / α`` per tensor with an
    asymmetric min-max uniform quantizer and multiplying back (``α = None``: ``x`` itself). The
    error a balanced tensor carries into the layer that reads it."""
    a = torch.ones(x.shape[-1], dtype=x.dtype) if alpha is None else alpha.to(x.dtype)
    xb = x / a
    spec = QuantSpec(quantizer="uniform", bits=bits)
    p = init_params(xb.amin().reshape(1), xb.amax().reshape(1), spec)
    return float(((fake_quant(xb, p, spec) - xb) * a).pow(2).mean())


def _tile(a: Tensor, tile: int) -> Tensor:
    return a.repeat(tile) if tile > 1 else a


# -- statistics -----------------------------------------------------------------------------------
def _get(model: nn.Module, name: str) -> Any:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ModelError(f"module {name} not found in the model") from None


@torch.no_grad()
def _channel_minmax(model: nn.Module, batches: Iterable[Tensor], taps: dict[str, tuple[str, str, int]]
                    ) -> dict[str, tuple[Tensor, Tensor]]:
    """Per-channel ``(min, max)`` at named taps: ``key -> (module, "in" | "out", tile)``; a tap with
    ``tile`` k reads a last axis of k·C values, channel fastest, as C channels. Quantizers off."""
    out: dict[str, tuple[Tensor, Tensor]] = {}
    hooks = []

    def record(key: str, t: Tensor, tile: int) -> None:
        t = t.detach().reshape(-1, tile, t.shape[-1] // tile)
        lo, hi = t.amin((0, 1)).float().cpu(), t.amax((0, 1)).float().cpu()
        if key in out:
            lo, hi = torch.minimum(out[key][0], lo), torch.maximum(out[key][1], hi)
        out[key] = (lo, hi)

    for key, (name, where, tile) in taps.items():
        mod = _get(model, name)
        if where == "in":
            hooks.append(mod.register_forward_pre_hook(
                lambda _m, args, k=key, t=tile: record(k, args[0], t)))
        else:
            hooks.append(mod.register_forward_hook(
                lambda _m, _a, y, k=key, t=tile: record(k, y, t)))
    try:
        with disabled(model):
            model.eval()
            for x in batches:
                model(x)
    finally:
        for h in hooks:
            h.remove()
    return out


def ln_output_minmax(model: nn.Module, batches: Iterable[Tensor], adapter: Optional[Adapter] = None
                     ) -> dict[str, tuple[Tensor, Tensor]]:
    """Per-channel ``(min, max)`` of the output of every LayerNorm with known consumers (LN_alpha)."""
    adapter = adapter or get_adapter(model)
    return _channel_minmax(model, batches, {p.ln_name: (p.ln_name, "out", 1) for p in adapter.ln_consumers(model)})


def stream_minmax(model: nn.Module, batches: Iterable[Tensor], adapter: Optional[Adapter] = None
                  ) -> dict[str, tuple[Tensor, Tensor]]:
    """Per residual stream, per-channel ``(min, max)`` of every state (every reader's input), shape
    ``(S, C)``, in the stream's *stored* units (after any earlier Add_alpha). Add_alpha's statistics."""
    adapter = adapter or get_adapter(model)
    streams = adapter.residual_streams(model)
    taps = {f"{s.name}|{r.name}": (r.name, "in", r.tile) for s in streams for r in s.readers}
    got = _channel_minmax(model, batches, taps)
    return {s.name: (torch.stack([got[f"{s.name}|{r.name}"][0] for r in s.readers]),
                     torch.stack([got[f"{s.name}|{r.name}"][1] for r in s.readers])) for s in streams}


# -- rewrites -------------------------------------------------------------------------------------
@torch.no_grad()
def apply_ln_alpha(model: nn.Module, alphas: dict[str, Tensor], adapter: Optional[Adapter] = None) -> None:
    """LN_alpha: LayerNorm output channels divided by ``alphas[ln]``, consumers multiplied."""
    adapter = adapter or get_adapter(model)
    pairs = {p.ln_name: p for p in adapter.ln_consumers(model)}
    for name, a in alphas.items():
        if name not in pairs:
            raise ModelError(f"{name} is not a LayerNorm with known consumers in this model")
        fold_ln_affine(_get(model, name), [_get(model, c) for c in pairs[name].consumer_names], a)


@torch.no_grad()
def apply_add_alpha(model: nn.Module, alphas: dict[str, Tensor], adapter: Optional[Adapter] = None) -> None:
    """Add_alpha: residual stream ``s`` stored divided by ``alphas[s]`` (see the module docstring)."""
    adapter = adapter or get_adapter(model)
    streams = {s.name: s for s in adapter.residual_streams(model)}
    for sname, a in alphas.items():
        if sname not in streams:
            raise ModelError(f"no residual stream {sname!r} in this model: {', '.join(streams)}")
        _rescale_stream(model, streams[sname], a)


def _rescale_stream(model: nn.Module, s: ResidualStream, a: Tensor) -> None:
    if a.numel() != s.width or (a <= 0).any() or not torch.isfinite(a).all():
        raise ValueError(f"stream {s.name}: alpha must hold {s.width} finite positive values")
    for w in s.writers:
        if w.kind == "param":
            t = getattr(model, w.name) if "." not in w.name else _get_param(model, w.name)
            t.div_(a.to(t.dtype))
            continue
        mod = _get(model, w.name)
        av = a.to(mod.weight.dtype)
        if w.kind == "rows":
            mod.weight.div_(av.reshape(-1, *([1] * (mod.weight.ndim - 1))))
        elif w.kind == "affine":
            if mod.weight is None:
                raise ModelError(f"{w.name}: a LayerNorm without affine parameters cannot write a rescaled stream")
            mod.weight.div_(av)
        else:
            raise ModelError(f"unknown stream writer kind {w.kind!r} at {w.name}")
        if getattr(mod, "bias", None) is not None:
            mod.bias.div_(av)
    for r in s.readers:
        mod = _get(model, r.name)
        at = _tile(a, r.tile)
        if r.kind == "ln":
            if not isinstance(mod, QLayerNorm):
                raise ModelError(f"{r.name} reads a rescaled stream but is not a wrapped LayerNorm: wrap the model first")
            old = getattr(mod, "input_scale", None)
            new = at.to(mod.weight.dtype) if old is None else old * at.to(old.dtype)
            mod.register_buffer("input_scale", new.clone())
        elif r.kind == "cols":
            mod.weight.mul_(at.to(mod.weight.dtype).unsqueeze(0))
        else:
            raise ModelError(f"unknown stream reader kind {r.kind!r} at {r.name}")


def _get_param(model: nn.Module, name: str) -> Tensor:
    mod_name, _, attr = name.rpartition(".")
    return getattr(_get(model, mod_name), attr)


def _batches(ctx: Any, max_images: int) -> list[Tensor]:
    out, n = [], 0
    for x in ctx.calib_batches(desc="aocq_balance"):
        x = x[: max_images - n]
        out.append(x)
        n += x.shape[0]
        if n >= max_images:
            break
    return out


def balance(model: nn.Module, batches: list[Tensor], ln_alpha: bool = True, add_alpha: bool = True,
            max_exp: int = 10, adapter: Optional[Adapter] = None, ln_rule: str = "mse",
            add_rule: str = "mse") -> dict[str, Any]:
    """Apply Add_alpha then LN_alpha (independent: Add_alpha does not change LayerNorm outputs) from
    ranges measured on ``batches``; returns what was done (per tensor: max/median range before and
    after, the exponents ``log2 α`` used)."""
    adapter = adapter or get_adapter(model)
    report: dict[str, Any] = {"ln_alpha": {}, "add_alpha": {}}

    def summary(lo: Tensor, hi: Tensor, a: Tensor) -> dict[str, Any]:
        r = torch.maximum(lo.abs(), hi.abs()).reshape(-1, a.numel()).amax(0)
        rb = r / a
        e = torch.log2(a)
        zero = torch.zeros_like(e)
        lo2, hi2 = lo.reshape(-1, a.numel()), hi.reshape(-1, a.numel())
        return {"max_over_median_before": round(float(r.max() / r.median().clamp_min(1e-30)), 2),
                "max_over_median_after": round(float(rb.max() / rb.median().clamp_min(1e-30)), 2),
                "cost_ratio": round(float(balance_cost(lo2, hi2, e) / balance_cost(lo2, hi2, zero).clamp_min(1e-30)), 4),
                "exp_min": int(e.min()), "exp_max": int(e.max()), "channels_scaled": int((e != 0).sum()),
                "exponents": [int(v) for v in e.tolist()]}

    if add_alpha:
        stats = stream_minmax(model, batches, adapter)
        alphas = {k: pow2_balance(lo, hi, max_exp, add_rule) for k, (lo, hi) in stats.items()}
        apply_add_alpha(model, alphas, adapter)
        report["add_alpha"] = {k: summary(*stats[k], a) for k, a in alphas.items()}
    if ln_alpha:
        stats = ln_output_minmax(model, batches, adapter)
        alphas = {k: pow2_balance(lo, hi, max_exp, ln_rule) for k, (lo, hi) in stats.items()}
        apply_ln_alpha(model, alphas, adapter)
        report["ln_alpha"] = {k: summary(*stats[k], a) for k, a in alphas.items()}
    return report


@dataclass(frozen=True)
class BalanceOptions(Options):
    """``ln_alpha`` / ``add_alpha``: which balancing runs; ``ln_rule`` / ``add_rule``: how the
    exponents are chosen (:data:`RULES`); ``max_exp``: the largest power of two; ``max_images``."""

    ln_alpha: bool = True
    add_alpha: bool = True
    ln_rule: str = "mse"
    add_rule: str = "mse"
    max_exp: int = 10
    max_images: int = 256

    def validate(self) -> None:
        for k in ("ln_rule", "add_rule"):
            need(getattr(self, k) in RULES, f"aocq_balance {k}={getattr(self, k)!r}: use one of {', '.join(RULES)}")
        need(is_int(self.max_exp) and 0 <= self.max_exp <= 30,
             f"aocq_balance max_exp={self.max_exp!r} must be an integer from 0 to 30")
        need(is_int(self.max_images) and self.max_images >= 1,
             f"aocq_balance max_images={self.max_images!r} must be a positive integer")


@register_pass("aocq_balance", BalanceOptions)
def aocq_balance_pass(model: nn.Module, ctx: Any, opts: BalanceOptions = BalanceOptions()) -> nn.Module:
    """AOCQ operator level: LN_alpha / Add_alpha power-of-two channel balancing (exact in float)."""
    ln_alpha, add_alpha, max_images = opts.ln_alpha, opts.add_alpha, opts.max_images
    if any(bool(fq.initialized) for fq in fake_quants(model, "act")):
        raise ConfigError("aocq_balance must run before calibrate: it changes the tensors the quantizers are calibrated on")
    if not (ln_alpha or add_alpha):
        return model
    report = balance(model, _batches(ctx, max_images), ln_alpha, add_alpha, opts.max_exp,
                     getattr(ctx, "adapter", None), opts.ln_rule, opts.add_rule)
    for kind in ("add_alpha", "ln_alpha"):
        for name, r in report[kind].items():
            log.info("%s %s: max/median range %.1f -> %.1f (2^%d..2^%d, %d channels)", kind, name,
                     r["max_over_median_before"], r["max_over_median_after"], r["exp_min"], r["exp_max"],
                     r["channels_scaled"])
    ensure_state(model).balance = report
    return model
