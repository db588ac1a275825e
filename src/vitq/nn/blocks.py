"""Family-neutral block-level pieces for *fully-quantized* mode and for reconstruction.

* :class:`QLayerNorm` - LayerNorm with an input slot (role LN_IN).
* :class:`QAdd` - residual addition with an output slot (role RESIDUAL).
* :class:`QSoftmax` - softmax with an input slot (SOFTMAX_IN); the post-Softmax output is the
  ATTN_PROBS slot of the following matmul.

Adapters build their families' blocks from these (the residual additions of a transformer block
become :class:`QAdd`, its LayerNorms :class:`QLayerNorm`). With every slot empty each computes
exactly what the torch operation computes.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..roles import Role
from .fake_quant import FakeQuant
from .modules import QuantSlots


class QLayerNorm(nn.LayerNorm, QuantSlots):
    """LayerNorm with an input slot and an optional per-channel ``input_scale`` buffer (``None``:
    identity). AOCQ's Add_alpha stores the residual stream divided per channel by alpha (powers of
    two); the LayerNorm reading it multiplies the (quantized) input back before its statistics, the
    shift an integer LayerNorm would do (``vitq.passes.outlier``)."""

    input_quant: Optional[FakeQuant]
    input_scale: Optional[Tensor]

    @classmethod
    def from_float(cls, ln: nn.LayerNorm) -> "QLayerNorm":
        q = cls.__new__(cls)
        nn.Module.__init__(q)
        q.normalized_shape = ln.normalized_shape
        q.eps = ln.eps
        q.elementwise_affine = ln.elementwise_affine
        q.weight, q.bias = ln.weight, ln.bias
        q.input_quant = None
        q.register_buffer("input_scale", None)
        q.slot_roles = {"input_quant": (Role.LN_IN, "act")}
        return q

    def adopt_shapes(self, state_dict: dict[str, Tensor], prefix: str) -> None:
        """A checkpoint of an Add_alpha model holds ``input_scale``: make room before loading."""
        key = prefix + "input_scale"
        if key in state_dict and getattr(self, "input_scale", None) is None:
            self.input_scale = torch.empty_like(state_dict[key])

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        self.adopt_shapes(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        if self.input_quant is not None:
            x = self.input_quant(x)
        scale = getattr(self, "input_scale", None)
        if scale is not None:
            x = x * scale
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class QAdd(nn.Module, QuantSlots):
    """``a + b``, the sum optionally quantized (residual stream)."""

    def __init__(self, role: Role = Role.RESIDUAL) -> None:
        super().__init__()
        self.output_quant: Optional[FakeQuant] = None
        self.slot_roles = {"output_quant": (role, "act")}

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        y = a + b
        return y if self.output_quant is None else self.output_quant(y)


class QSoftmax(nn.Module, QuantSlots):
    """Softmax over the last dim with an input slot and an optional additive mask applied after it.
    ``impl`` names the softmax implementation: ``float`` (torch) here; integer approximations register
    more (see fully-quantized recipes)."""

    def __init__(self, dim: int = -1) -> None:
        super().__init__()
        self.dim = dim
        self.input_quant: Optional[FakeQuant] = None
        self.impl = "float"
        self.slot_roles = {"input_quant": (Role.SOFTMAX_IN, "act")}

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """``mask``: an additive structural mask (0 where attended, a large negative number or
        ``-inf`` where not: Swin's shifted-window mask, a user's attention mask). It is added *after*
        the input quantizer, so its -100s never enter the calibrated range (a masked logit is
        "not attended", not a value to represent); the float result is ``softmax(x + mask)`` as before.
        """
        if self.input_quant is not None:
            x = self.input_quant(x)
        if mask is not None:
            x = x + mask
        fn = SOFTMAX_IMPLS[self.impl]
        if getattr(fn, "takes_input_quant", False):  # integer softmax needs the input's grid
            return fn(x, self.dim, self.input_quant)
        return fn(x, self.dim)


def _float_softmax(x: Tensor, dim: int) -> Tensor:
    return x.softmax(dim=dim)


#: name -> function(x, dim); an integer-softmax approximation registers itself here
SOFTMAX_IMPLS: dict[str, Callable[..., Tensor]] = {"float": _float_softmax}
