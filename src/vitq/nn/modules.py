"""Quantizable layers: QLinear, QConv2d, QMatMul.

Each layer has *slots* - named places where a :class:`FakeQuant` may sit - tagged with a role by
the adapter that created the layer. A slot holding ``None`` is not quantized, so a freshly wrapped
model computes exactly what the float model computes.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..roles import Role
from .fake_quant import FakeQuant


def quantized_weight(layer: Any) -> Tensor:
    """The layer's weight through its weight quantizer.

    In inference (no grad, eval mode) the result is cached and reused until the weight or any of the
    quantizer's parameter tensors change (tracked by identity and version counter), since weights do
    not change between batches: evaluation then costs one weight fake-quant per layer, not per batch.
    """
    wq = layer.weight_quant
    w = layer.weight
    if wq is None:
        return w
    if torch.is_grad_enabled() or layer.training or not wq.enabled or wq.calibrating:
        return wq(w)
    params = tuple(wq.params.values())
    key = (id(w), w._version, wq.spec) + tuple((id(t), t._version) for t in params)
    cache = layer.__dict__.get("_wq_cache")
    if cache is not None and cache[0] == key:
        return cache[1]
    out = wq(w)
    # the cache holds the tensors its key names: while it lives no other tensor can take their ids (a
    # parameter replaced by set_params is freed otherwise, and its successor often gets the same id and
    # version 0: the cache would then return the weight quantized with the old parameters)
    layer.__dict__["_wq_cache"] = (key, out, (w, *params))
    return out


class QuantSlots:
    """Mixin: ``slot_roles`` maps slot attribute -> (role, kind)."""

    slot_roles: dict[str, tuple[Role, str]]

    def slots(self) -> Iterator[tuple[str, Role, str]]:
        for slot, (role, kind) in self.slot_roles.items():
            yield slot, role, kind


class _FoldedBias:
    """Mixin of QLinear / QConv2d: a RepQ-ViT / MOSF fold gives a bias-free consumer a bias (the LayerNorm's shift
    through its weight; BEiT's and data2vec's key, CLIP's and SigLIP's bias-free layers), so a checkpoint of the folded
    model holds one the rebuilt architecture lacks: make room before loading."""

    def adopt_shapes(self, state_dict: dict[str, Tensor], prefix: str) -> None:
        stored = state_dict.get(prefix + "bias")
        layer = cast(nn.Module, self)
        if getattr(layer, "bias", None) is None and isinstance(stored, Tensor):
            nn.Module.__setattr__(layer, "bias", nn.Parameter(torch.zeros_like(stored)))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        self.adopt_shapes(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[misc]


class QLinear(_FoldedBias, nn.Linear, QuantSlots):
    """``nn.Linear`` with an input and a weight quantization slot. Same parameter names as Linear."""

    input_quant: Optional[FakeQuant]
    weight_quant: Optional[FakeQuant]
    role: Role

    @classmethod
    def from_float(cls, lin: nn.Linear, role: Role) -> "QLinear":
        q = cls.__new__(cls)
        nn.Module.__init__(q)
        q.in_features, q.out_features = lin.in_features, lin.out_features
        q.weight, q.bias = lin.weight, lin.bias
        q.input_quant = None
        q.weight_quant = None
        q.slot_roles = {"input_quant": (role, "act"), "weight_quant": (role, "weight")}
        q.role = role
        return q

    def forward(self, x: Tensor) -> Tensor:
        if self.input_quant is not None:
            x = self.input_quant(x)
        return F.linear(x, quantized_weight(self), self.bias)


class QConv2d(_FoldedBias, nn.Conv2d, QuantSlots):
    """``nn.Conv2d`` with an input and a weight quantization slot."""

    input_quant: Optional[FakeQuant]
    weight_quant: Optional[FakeQuant]
    role: Role

    @classmethod
    def from_float(cls, conv: nn.Conv2d, role: Role) -> "QConv2d":
        q = cls.__new__(cls)
        nn.Module.__init__(q)
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                     "transposed", "output_padding", "groups", "padding_mode", "_reversed_padding_repeated_twice"):
            setattr(q, attr, getattr(conv, attr))
        q.weight, q.bias = conv.weight, conv.bias
        q.input_quant = None
        q.weight_quant = None
        q.slot_roles = {"input_quant": (role, "act"), "weight_quant": (role, "weight")}
        q.role = role
        return q

    def forward(self, x: Tensor) -> Tensor:
        if self.input_quant is not None:
            x = self.input_quant(x)
        return self._conv_forward(x, quantized_weight(self), self.bias)


class QMatMul(nn.Module, QuantSlots):
    """``a @ b`` with a quantization slot on each operand."""

    def __init__(self, role_a: Role, role_b: Role) -> None:
        super().__init__()
        self.quant_a: Optional[FakeQuant] = None
        self.quant_b: Optional[FakeQuant] = None
        self.slot_roles = {"quant_a": (role_a, "act"), "quant_b": (role_b, "act")}

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        if self.quant_a is not None:
            a = self.quant_a(a)
        if self.quant_b is not None:
            b = self.quant_b(b)
        return a @ b
