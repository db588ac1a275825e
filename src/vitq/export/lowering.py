"""Lowering a calibrated fake-quant model to what a runtime executes: per site, what it becomes.

Reparameterizations (RepQ, MOSF, Add_alpha / LN_alpha) are already folded into LayerNorm and
Linear parameters by their passes, so post-LayerNorm activations are per-tensor by the time a model
is exported. Then, per quantization site (:func:`plan`):

* weight, uniform, at most 8 bits: its integer codes, stored as uint8 / int8 (a 3-, 4- or 6-bit code
  fits an 8-bit container exactly, with the same scale and zero point), dequantized in the graph
  (``DequantizeLinear``, per tensor or per output channel): ``int-weight``;
* activation, uniform, at most 8 bits, per tensor, static: a quantize -> dequantize pair with its
  scale and zero point (``QuantizeLinear`` / ``DequantizeLinear``), which onnxruntime fuses with the
  consumer into an integer kernel: ``qdq``. A 3- to 7-bit code sits in an 8-bit container, and a float
  clip to its code range comes first (``QuantizeLinear`` saturates only to the container's range). A fractional zero point (RepQ-ViT's reparameterized ``zt`` is a
  mean of integers) has no ``QuantizeLinear`` form; on a post-LayerNorm site its fraction ``f`` is
  folded away exactly: ``round(x/s + z) = round((x + f s)/s + round(z))``, so the LayerNorm's bias
  gains ``f s`` and every consumer's bias loses ``W_q (f s)`` (``W_q`` its quantized weight). Elsewhere
  such a site is emulated;
* everything else (log2 / log-sqrt2 / TanQ post-Softmax, two-scale, PTF, per-channel or per-token
  activations, activations above 8 bits, non-uniform weights): the quantizer's own formula, exported
  as float operations - exact, but no integer kernel: ``emulated``. A static per-tensor quantizer
  with at most 2^10 codes is emulated as its code formula followed by a table of its levels
  (:class:`LUTQuant`: the table holds ``dequantize(code)`` for every code, so the values are the
  fake-quant values; about half the float operations of the dequantization formula);
  ``emulate="uniform8"`` lowers a non-uniform post-Softmax site instead to an 8-bit uniform grid on
  [0, 1] (integer kernel, a different quantizer: the verification measures its cost).

:func:`export_form` switches a model into that form (and back): weights replaced by their
dequantized grid values (the exporter then stores them as constants that the ONNX backend turns
into codes), activation sites of kind ``qdq`` by :class:`QDQ` modules.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Optional

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers the quantized_decomposed ops)
from torch import Tensor, nn

from ..errors import ConfigError, ModelError
from ..granularity import PerChannel, PerTensor
from ..nn import FakeQuant, QConv2d, QLinear
from ..passes.quantize import iter_slots
from ..quantizers.base import QuantSpec, dequantize, get_quantizer, quantize
from ..roles import Role
from ..state import state_of

EMULATE_MODES = ("exact", "uniform8")
POST_SOFTMAX = (Role.ATTN_PROBS,)


@dataclass(frozen=True)
class SiteLowering:
    """What one quantization site becomes: ``how`` is ``int-weight``, ``qdq``, ``emulated``,
    ``uniform8`` (a non-uniform post-Softmax site lowered to 8-bit uniform) or ``float``."""

    site: str
    role: str
    kind: str
    quantizer: str
    bits: Optional[int]
    how: str
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _weight_lowerable(spec: QuantSpec) -> tuple[bool, str]:
    if spec.quantizer != "uniform":
        return False, f"{spec.quantizer} weights have no integer form: kept as float values on the quantizer's grid"
    if spec.bits > 8:
        return False, f"{spec.bits}-bit weights exceed 8 bits: kept as float values on the grid"
    g = spec.granularity
    if not isinstance(g, PerTensor) and not (isinstance(g, PerChannel) and g.axis == 0):
        return False, f"weight granularity {g} has no DequantizeLinear form: kept as float values on the grid"
    if spec.bits == 8:
        return True, ""
    if spec.bits <= 4:  # export/onnx.py nibble_codes: INT4 / UINT4 in the file, widened by a Cast the runtime folds
        return True, f"{spec.bits}-bit codes stored in 4 bits, widened to an 8-bit container at load"
    return True, f"{spec.bits}-bit codes in an 8-bit container"


#: what a kind of fallback cost where measured (bench/results/fallback_cost.md: DeiT-S, W8A8, onnxruntime, the
#: kind emulated at every block against the all-integer file, batch 1 / 32), cited in its note
MEASURED_COST = {
    "post-softmax": "50-66 %",   # TanQ (dopq-calib) and log-sqrt2 (repq), 12 sites
    "two-scale": "86-89 %",      # V-2SF after GELU, 12 sites
    "channel-wise": "56-59 %",   # q / k / v and fc1 inputs without RepQ's fold, 24 sites
}


def _cost(kind: str) -> str:
    return (f"; measured: this kind at every block cost {MEASURED_COST[kind]} of a DeiT-S file's images/s in "
            "onnxruntime (bench/results/fallback_cost.md)")


def _act_note(fq: FakeQuant) -> str:
    spec = fq.spec
    if spec.dynamic:
        return "dynamic per-token ranges: emulated in float (exact)"
    if spec.quantizer != "uniform":
        how = "its code formula and a table of its levels" if lut_lowerable(fq) else "float"
        kind = "post-softmax" if fq.role in POST_SOFTMAX else "two-scale" if spec.quantizer in ("v2sf", "twin_uniform") \
            else None
        return f"{spec.quantizer} has no QuantizeLinear form: emulated in {how} (exact)" + (_cost(kind) if kind else "")
    if not isinstance(spec.granularity, PerTensor):
        return (f"{spec.granularity} activations: emulated in float (exact; integer kernels take per-tensor inputs)"
                + _cost("channel-wise"))
    return f"{spec.bits}-bit activations: emulated in float (exact; integer kernels take at most 8-bit inputs)"


def _fraction(fq: FakeQuant) -> float:
    z = float(fq.zero_point.reshape(-1)[0])
    return z - round(z)


def post_ln_sites(model: nn.Module) -> dict[str, tuple[str, list[str]]]:
    """Activation site -> (its LayerNorm, the LayerNorm's consumers) for every post-LayerNorm input."""
    from ..adapters import get_adapter

    out = {}
    for pair in get_adapter(model).ln_consumers(model):
        for c in pair.consumer_names:
            out[f"{c}.input_quant"] = (pair.ln_name, list(pair.consumer_names))
    return out


def plan(model: nn.Module, emulate: str = "exact") -> list[SiteLowering]:
    """How every quantization site of ``model`` is lowered (see the module docstring)."""
    if emulate not in EMULATE_MODES:
        raise ConfigError(f"unknown lowering {emulate!r} for inexpressible sites: use one of {', '.join(EMULATE_MODES)}")
    post_ln = post_ln_sites(model)
    out = []
    for name, mod, slot, role, kind in iter_slots(model):
        fq = getattr(mod, slot)
        site = f"{name}.{slot}"
        if not isinstance(fq, FakeQuant) or not fq.enabled:
            out.append(SiteLowering(site, str(role), kind, "float", None, "float", "not quantized"))
            continue
        spec = fq.spec
        if kind == "weight":
            ok, note = _weight_lowerable(spec)
            out.append(SiteLowering(site, str(role), kind, spec.quantizer, spec.bits, "int-weight" if ok else "emulated", note))
        elif spec.integer_act:
            f = _fraction(fq)
            if abs(f) < 1e-6:
                out.append(SiteLowering(site, str(role), kind, spec.quantizer, spec.bits, "qdq"))
            elif site in post_ln:
                out.append(SiteLowering(site, str(role), kind, spec.quantizer, spec.bits, "qdq",
                                        f"fractional zero point {float(fq.zero_point):.4g}: the fraction is folded "
                                        f"into {post_ln[site][0]} and its consumers' biases (exact)"))
            else:
                out.append(SiteLowering(site, str(role), kind, spec.quantizer, spec.bits, "emulated",
                                        f"fractional zero point {float(fq.zero_point):.4g} and no LayerNorm to fold it "
                                        "into: emulated in float (exact)"))
        elif emulate == "uniform8" and role in POST_SOFTMAX:
            out.append(SiteLowering(site, str(role), kind, spec.quantizer, spec.bits, "uniform8",
                                    f"{spec.quantizer} post-Softmax lowered to 8-bit uniform on [0, 1] (scale 1/255)"))
        else:
            out.append(SiteLowering(site, str(role), kind, spec.quantizer, spec.bits, "emulated", _act_note(fq)))
    return out


def check_exportable(model: nn.Module, float_ok: bool = False) -> None:
    """One-line errors for a model that cannot be exported: not quantized by vitq, or uncalibrated. ``float_ok``: a
    model whose recipe quantizes no site is the float baseline (:func:`vitq.export.deploy.export_float`)."""
    st = state_of(model)
    if st is None or st.recipe is None:
        raise ModelError("only a model quantized by vitq (run_recipe / quantize, or a vitq quantize --out folder) "
                         "can be exported")
    missing = [m.site for m in model.modules() if isinstance(m, FakeQuant) and m.enabled and not m.ready]
    if missing:
        raise ModelError(f"{len(missing)} quantization site(s) are not calibrated ({missing[0]}, ...): "
                         "calibrate the model (vitq quantize) before exporting it")
    if not float_ok and not any(isinstance(m, FakeQuant) and m.enabled for m in model.modules()):
        raise ModelError(f"recipe {st.recipe.name} quantizes no site, so there is nothing to export as integers: "
                         "quantize with a recipe that does (vitq list), or export the float model itself (vitq "
                         "export MODEL --format onnx --out DIR)")


def check_lowerable(lowering: list[SiteLowering], fmt: str) -> None:
    """A one-line error when no site has an integer form in ``fmt``: the file would run float maths only."""
    if not any(s.how in ("int-weight", "qdq", "uniform8") for s in lowering):
        quantized = sorted({s.quantizer for s in lowering if s.how != "float"})
        raise ModelError(f"no quantization site of this model has an integer form in {fmt} (quantizers: "
                         f"{', '.join(quantized)}): use --format vitq, or a recipe with uniform weights "
                         "of at most 8 bits")


class QDQ(nn.Module):
    """Quantize -> dequantize with constant per-tensor parameters, in the op pair ONNX exporters map
    to ``QuantizeLinear`` / ``DequantizeLinear`` (``quantized_decomposed``). Eager values are those
    of torch's quantize_per_tensor (``round(x * (1/s))``); the runtime follows the ONNX definition
    (``round(x / s)``), which :mod:`vitq`'s uniform quantizer rounds like except for ties.

    Codes of fewer than 8 bits sit in an 8-bit container: ``QuantizeLinear`` saturates only to the
    container's range, so the input is first clipped to the values of the lowest and highest code,
    ``[(qmin - z) s, (qmax - z) s]`` (a float ``Clip``; ``round`` of a clipped value is the clamped code)."""

    def __init__(self, scale: float, zero_point: int, qmin: int, qmax: int) -> None:
        super().__init__()
        self.scale, self.zero_point, self.qmin, self.qmax = float(scale), int(zero_point), int(qmin), int(qmax)
        self.dtype = torch.uint8 if qmin >= 0 else torch.int8
        full = (0, 255) if self.dtype == torch.uint8 else (-128, 127)
        self.clip: Optional[tuple[float, float]] = None
        if (self.qmin, self.qmax) != full:
            self.clip = ((self.qmin - self.zero_point) * self.scale, (self.qmax - self.zero_point) * self.scale)

    def forward(self, x: Tensor) -> Tensor:
        if self.clip is not None:
            x = x.clamp(self.clip[0], self.clip[1])
        ops = torch.ops.quantized_decomposed
        c = ops.quantize_per_tensor(x, self.scale, self.zero_point, self.qmin, self.qmax, self.dtype)
        return ops.dequantize_per_tensor(c, self.scale, self.zero_point, self.qmin, self.qmax, self.dtype)


class LUTQuant(nn.Module):
    """``table[quantize(x)]``: the quantizer's codes, then its levels from a lookup table (exported as
    the code formula and one ``Gather``) - the values of its fake-quant, in fewer operations."""

    table: Tensor

    def __init__(self, fq: FakeQuant) -> None:
        super().__init__()
        q = get_quantizer(fq.spec.quantizer)
        qmin, qmax = q.code_range(fq.spec)
        self.spec, self.quantizer, self.qmin = fq.spec, q, int(qmin)
        self.params = {k: v.detach().clone() for k, v in fq.params.items()}
        codes = torch.arange(qmin, qmax + 1, dtype=torch.int32)
        self.register_buffer("table", dequantize(codes, self.params, fq.spec).reshape(-1).float())

    def forward(self, x: Tensor) -> Tensor:
        codes = self.quantizer.quantize(x, self.params, self.spec)
        if self.qmin:
            codes = codes - self.qmin
        # index_select on the flat codes: a plain Gather (advanced indexing exports as a slow GatherND)
        return torch.index_select(self.table, 0, codes.reshape(-1)).reshape(codes.shape).to(x.dtype)


def lut_lowerable(fq: FakeQuant) -> bool:
    """A static per-tensor quantizer with a small code set whose ``dequantize`` is a function of the
    code alone (all its parameters are scalars)."""
    spec = fq.spec
    if spec.dynamic or spec.quantizer == "uniform" or not isinstance(spec.granularity, PerTensor):
        return False
    if any(v.numel() != 1 for v in fq.params.values()):
        return False
    qmin, qmax = get_quantizer(spec.quantizer).code_range(spec)
    return qmax - qmin < 1 << 10


@dataclass
class LoweredWeight:
    """A weight in its exported form: ``codes`` (integer, the layer's weight layout), ``scale`` and
    ``zero_point`` (one per output channel, or one), the dequantized ``values`` the exported graph
    holds until the backend replaces them, and the code range."""

    site: str
    codes: Tensor
    scale: Tensor
    zero_point: Tensor
    values: Tensor
    qmin: int
    qmax: int
    per_channel: bool


def weight_codes(layer: Any) -> LoweredWeight:
    """The integer codes of a layer's quantized weight (AdaRound's learned rounding included)."""
    fq = layer.weight_quant
    w = layer.weight.detach()
    codes = quantize(w, fq.params, fq.spec)
    values = dequantize(codes, fq.params, fq.spec).to(w.dtype)
    qmin, qmax = get_quantizer(fq.spec.quantizer).code_range(fq.spec)
    return LoweredWeight(fq.site, codes, fq.scale.detach().reshape(-1).float(), fq.zero_point.detach().reshape(-1).float(),
                         values, qmin, qmax, fq.scale.numel() > 1)


@contextmanager
def export_form(model: nn.Module, lowering: list[SiteLowering]) -> Iterator[list[LoweredWeight]]:
    """``model`` in its export form for the duration (restored after, also on error); yields the
    lowered weights (for the backend to store as codes)."""
    how = {s.site: s for s in lowering}
    restore: list[Any] = []
    weights: list[LoweredWeight] = []
    try:
        for name, mod, slot, _role, kind in iter_slots(model):
            fq = getattr(mod, slot)
            site = how.get(f"{name}.{slot}")
            if not isinstance(fq, FakeQuant) or site is None or not fq.enabled:
                continue
            if kind == "weight" and site.how == "int-weight" and isinstance(mod, (QLinear, QConv2d)):
                lw = weight_codes(mod)
                old = mod.weight.data
                mod.weight.data = lw.values.clone()
                setattr(mod, slot, None)
                restore.append((mod, slot, fq, old))
                weights.append(lw)
            elif kind == "weight":  # grid values as float constants
                old = mod.weight.data
                with torch.no_grad():
                    mod.weight.data = fq(mod.weight).detach().clone()
                setattr(mod, slot, None)
                restore.append((mod, slot, fq, old))
            elif site.how == "qdq":
                qmin, qmax = get_quantizer(fq.spec.quantizer).code_range(fq.spec)
                setattr(mod, slot, QDQ(float(fq.scale), int(round(float(fq.zero_point))), qmin, qmax))
                restore.append((mod, slot, fq, None))
            elif site.how == "uniform8":
                setattr(mod, slot, QDQ(1.0 / 255.0, 0, 0, 255))
                restore.append((mod, slot, fq, None))
            elif site.how == "emulated" and lut_lowerable(fq):
                setattr(mod, slot, LUTQuant(fq))
                restore.append((mod, slot, fq, None))
        _fold_fractions(model, how, restore)
        yield weights
    finally:
        for item in reversed(restore):
            if item[0] == "param":  # a bias changed by a zero-point fold
                _, owner, name, old = item
                setattr(owner, name, old)
                continue
            mod, slot, fq, old = item
            setattr(mod, slot, fq)
            if old is not None:
                mod.weight.data = old


@torch.no_grad()
def _fold_fractions(model: nn.Module, how: dict[str, SiteLowering], restore: list[Any]) -> None:
    """The exact fold of fractional zero points of post-LayerNorm QDQ sites (module docstring)."""
    done: set[str] = set()
    for site, (ln_name, consumers) in post_ln_sites(model).items():
        low = how.get(site)
        if low is None or low.how != "qdq" or ln_name in done:
            continue
        layers: list[Any] = [model.get_submodule(c) for c in consumers]
        qdqs = [getattr(layer, "input_quant", None) for layer in layers]
        if not all(isinstance(q, QDQ) for q in qdqs):
            continue
        originals = {id(item[0]): item[2] for item in restore if item[0] != "param" and item[1] == "input_quant"}
        fq = originals.get(id(layers[0]))
        frac = 0.0 if fq is None else _fraction(fq)
        if abs(frac) < 1e-6:
            continue
        ln: Any = model.get_submodule(ln_name)
        assert fq is not None
        shift = frac * float(fq.scale)
        restore.append(("param", ln, "bias", ln.bias))
        ln.bias = nn.Parameter(ln.bias.detach() + shift, requires_grad=False)
        for layer in layers:
            w = layer.weight.detach() if layer.weight_quant is None else layer.weight_quant(layer.weight).detach()
            restore.append(("param", layer, "bias", layer.bias))
            base = layer.bias.detach() if layer.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
            layer.bias = nn.Parameter(base - shift * w.sum(dim=1), requires_grad=False)
        done.add(ln_name)


def summary(lowering: list[SiteLowering]) -> dict[str, Any]:
    """Counts per ``how``, and the fallback sites (quantized sites without an integer form)."""
    counts: dict[str, int] = {}
    for s in lowering:
        counts[s.how] = counts.get(s.how, 0) + 1
    fallbacks = [s.to_dict() for s in lowering if s.how in ("emulated", "uniform8")]
    return {"counts": counts, "fallbacks": fallbacks}


__all__ = ["EMULATE_MODES", "LUTQuant", "QDQ", "lut_lowerable", "LoweredWeight", "SiteLowering", "check_exportable",
           "check_lowerable", "export_form", "plan",
           "summary", "weight_codes"]
