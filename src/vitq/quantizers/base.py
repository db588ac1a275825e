"""Quantizer spec and registry.

A quantizer is a small bundle of *pure* tensor functions, registered by name:

* ``init_params(lo, hi, spec) -> dict[str, Tensor]`` - parameters from a value range
  (``lo``/``hi`` are tensors with one value per granularity group);
* ``quantize(x, p, spec) -> codes`` (int32 tensor in ``[0, 2**bits)`` or the signed range);
* ``dequantize(codes, p, spec) -> Tensor``;
* ``fake_quant(x, p, spec) -> Tensor`` - ``dequantize(quantize(x))`` with a straight-through
  gradient. It is the only place a quantizer's formula lives: observers' searches, optimizers and
  modules call it, they never re-derive it.

Parameters are plain tensors so that :class:`vitq.nn.FakeQuant` can hold them as buffers.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping, Protocol

import torch
from torch import Tensor

from ..bits import check_width
from ..errors import ConfigError
from ..granularity import Granularity, PerTensor, PerToken, parse_granularity
from ..options import Options

Params = dict[str, Tensor]

OBSERVERS = ("minmax", "percentile", "mse", "pct_mse")


@dataclass(frozen=True)
class QuantSpec:
    """What a quantization site does. Frozen; unknown keys in :meth:`from_dict` are errors.

    ``options`` holds quantizer-specific settings as given, a sorted tuple of ``(key, value)`` pairs, so the
    spec stays hashable and serialisable (and an export records only what was set); :attr:`opts` is the
    quantizer's typed options object built from them once, here (``Quantizer.Options``: its field defaults
    are the quantizer's defaults, the only place they live; unknown keys and bad values are one-line errors).
    """

    quantizer: str = "uniform"
    bits: int = 8
    symmetric: bool = False
    granularity: Granularity = field(default_factory=PerTensor)
    observer: str = "minmax"
    percentile: float = 0.9999
    options: tuple[tuple[str, Any], ...] = ()
    _opts: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.quantizer not in QUANTIZERS:
            raise ConfigError(f"unknown quantizer {self.quantizer!r}: use one of {', '.join(sorted(QUANTIZERS))}")
        check_width(self.bits)
        if self.observer not in OBSERVERS:
            raise ConfigError(f"unknown observer {self.observer!r}: use one of {', '.join(OBSERVERS)}")
        if not 0.5 < self.percentile <= 1.0:
            raise ConfigError(f"percentile {self.percentile} must be in (0.5, 1]")
        object.__setattr__(self, "granularity", parse_granularity(self.granularity))
        if isinstance(self.options, Mapping):
            object.__setattr__(self, "options", tuple(sorted(self.options.items())))
        try:
            opts = QUANTIZERS[self.quantizer].Options.parse(dict(self.options))
        except ConfigError as e:
            raise ConfigError(f"quantizer {self.quantizer} {e}") from None
        object.__setattr__(self, "_opts", opts)
        QUANTIZERS[self.quantizer].check_spec(self)

    @property
    def opts(self) -> Any:
        """The quantizer's typed options (``Quantizer.Options``), every field set: given or its default."""
        return self._opts

    @property
    def dynamic(self) -> bool:
        return isinstance(self.granularity, PerToken)

    @property
    def integer_act(self) -> bool:
        """An activation quantizer integer runtimes execute (ONNX ``QuantizeLinear``, integer kernels):
        uniform, at most 8 bits (fewer-bit codes in an 8-bit container, their range kept by a clip before
        the quantize), one static scale and zero point per tensor."""
        return self.quantizer == "uniform" and self.bits <= 8 and isinstance(self.granularity, PerTensor)

    def with_(self, **kw: Any) -> "QuantSpec":
        return replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        return {
            "quantizer": self.quantizer, "bits": self.bits, "symmetric": self.symmetric,
            "granularity": str(self.granularity), "observer": self.observer,
            "percentile": self.percentile, "options": dict(self.options),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "QuantSpec":
        known = {f.name for f in fields(cls) if f.init}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown quantizer spec key(s) {sorted(unknown)}: allowed are {sorted(known)}")
        return cls(**dict(d))

    def describe(self) -> str:
        s = f"{self.quantizer}{self.bits}"
        if self.quantizer == "uniform":
            s += "-sym" if self.symmetric else "-asym"
        return f"{s}/{self.granularity}/{self.observer}"


class Quantizer(Protocol):
    name: str
    param_names: tuple[str, ...]
    @property
    def Options(self) -> type[Options]:  # noqa: N802  (a class: the quantizer's frozen options dataclass)
        ...

    def check_spec(self, spec: QuantSpec) -> None: ...
    def init_params(self, lo: Tensor, hi: Tensor, spec: QuantSpec) -> Params: ...
    def quantize(self, x: Tensor, p: Params, spec: QuantSpec) -> Tensor: ...
    def dequantize(self, codes: Tensor, p: Params, spec: QuantSpec) -> Tensor: ...
    def fake_quant(self, x: Tensor, p: Params, spec: QuantSpec) -> Tensor: ...
    def code_range(self, spec: QuantSpec) -> tuple[int, int]: ...


QUANTIZERS: dict[str, Quantizer] = {}


def register_quantizer(q: Quantizer) -> Quantizer:
    QUANTIZERS[q.name] = q
    return q


def get_quantizer(name: str) -> Quantizer:
    try:
        return QUANTIZERS[name]
    except KeyError:
        raise ConfigError(f"unknown quantizer {name!r}: use one of {', '.join(sorted(QUANTIZERS))}") from None


def round_ste(x: Tensor) -> Tensor:
    """Round to nearest with a straight-through (identity) gradient."""
    return (torch.round(x) - x).detach() + x


class _Clamp(torch.autograd.Function):
    """``torch.clamp(x, lo, hi)``: the same values and the same gradient (1 where lo < x < hi, else 0;
    torch's clamp passes no gradient on the bounds either), with the gradient mask kept as a float
    tensor. torch's own clamp backward builds a bool mask and calls ``torch.where``, which on the CPU
    is 20-50x slower than a multiply on the activation sizes of reconstruction
    (bench/results/recon_speed.md); in QDrop / LSQ training it ran once per activation quantizer per
    step. Values differ from torch's only for NaN inputs (NaN gradient instead of 0)."""

    @staticmethod
    def forward(ctx, x: Tensor, lo: float, hi: float) -> Tensor:  # type: ignore[no-untyped-def, override]
        y = torch.clamp(x, lo, hi)
        if ctx.needs_input_grad[0]:
            # [x > lo] * [x < hi] from float ops only: sign(x - lo) is 1 exactly when x > lo
            inside = torch.sign(x - lo).clamp_(min=0.0).mul_(torch.sign(hi - x).clamp_(min=0.0))
            ctx.save_for_backward(inside)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[no-untyped-def, override]
        (mask,) = ctx.saved_tensors
        return grad * mask, None, None


#: below this many elements the Python-level autograd function costs more than torch.where saves
_CLAMP_MIN_NUMEL = 16384


def clamp(x: Tensor, lo: float, hi: float) -> Tensor:
    """``torch.clamp(x, lo, hi)`` with scalar bounds and a faster backward on large tensors (see
    :class:`_Clamp`); identical values and gradients either way. Tensors that need no gradient, and
    small ones, go to torch.clamp itself."""
    if not (x.requires_grad and torch.is_grad_enabled()) or x.numel() < _CLAMP_MIN_NUMEL:
        return torch.clamp(x, lo, hi)
    return _Clamp.apply(x, lo, hi)


def fake_quant(x: Tensor, p: Params, spec: QuantSpec) -> Tensor:
    return QUANTIZERS[spec.quantizer].fake_quant(x, p, spec)


def quantize(x: Tensor, p: Params, spec: QuantSpec) -> Tensor:
    return QUANTIZERS[spec.quantizer].quantize(x, p, spec)


def dequantize(codes: Tensor, p: Params, spec: QuantSpec) -> Tensor:
    return QUANTIZERS[spec.quantizer].dequantize(codes, p, spec)


def init_params(lo: Tensor, hi: Tensor, spec: QuantSpec) -> Params:
    return QUANTIZERS[spec.quantizer].init_params(lo, hi, spec)


@dataclass(frozen=True)
class NoOptions(Options):
    """The options of a quantizer that has none: any key is an error."""


__all__ = [
    "NoOptions", "Params", "QuantSpec", "Quantizer", "QUANTIZERS", "register_quantizer", "get_quantizer",
    "round_ste", "fake_quant", "quantize", "dequantize", "init_params",
]

