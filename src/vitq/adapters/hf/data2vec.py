"""Hugging Face data2vec-vision: ``Data2VecVisionForImageClassification`` / ``Data2VecVisionModel``.

BEiT in transformers' older module layout (``encoder.layer.N.attention.attention.query`` ... ``attention.output.dense``,
``intermediate.dense``, ``output.dense``); the computation is BEiT's (see :mod:`~vitq.adapters.hf.beit`):

* :class:`HFData2VecSelfAttention` is mixed into ``Data2VecVisionSelfAttention`` (eager or SDPA): three Linears
  over one LayerNorm output, attention through the :class:`~vitq.nn.QAttentionCore` in the library's order
  (``(q @ kᵀ) / sqrt(d)``, then the layer's relative position bias, then the model's shared one).
* :class:`HFData2VecLayer` is mixed into ``Data2VecVisionLayer``: ``lambda_1`` / ``lambda_2`` layer scale, residual
  adds as QAdd, the forward in two halves.
* The pooler (the mean of the patch tokens through a LayerNorm, or the class token) feeds the classifier; a bare
  ``Data2VecVisionModel`` (no pooler) gives the class token of its last hidden state.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Optional

from torch import Tensor, nn

from ...errors import ModelError
from ...nn import QAdd, QAttentionCore
from ..base import mix_in, register_adapter
from .beit import HFBeitAdapter

#: model class -> the base-model attribute ("" : the model is the base) and whether it has the classifier
MODELS = {
    "Data2VecVisionForImageClassification": ("data2vec_vision", True),
    "Data2VecVisionModel": ("", False),
}


class HFData2VecSelfAttention(QAttentionCore):
    """Mixed into transformers' ``Data2VecVisionSelfAttention`` (and its SDPA subclass)."""

    if TYPE_CHECKING:  # mixed into a library's module: its attributes are the library's, untyped here
        def __getattr__(self, name: str) -> Any: ...

    def forward(self, hidden_states: Tensor, output_attentions: bool = False,
                relative_position_bias: Optional[Tensor] = None, interpolate_pos_encoding: bool = False,
                resolution: Optional[tuple[int, int]] = None) -> tuple[Tensor]:
        shape = (*hidden_states.shape[:-1], -1, self.attention_head_size)
        q = self.query(hidden_states).view(shape).transpose(1, 2)
        k = self.key(hidden_states).view(shape).transpose(1, 2)
        v = self.value(hidden_states).view(shape).transpose(1, 2)
        own = None
        if self.has_relative_position_bias:
            assert resolution is not None
            window = (resolution[0] // self.config.patch_size, resolution[1] // self.config.patch_size)
            own = self.relative_position_bias(window, interpolate_pos_encoding, dim_size=hidden_states.shape[1])
        out = self.attend(q, k, v, math.sqrt(self.attention_head_size), scale_first=False, divide=True,
                          bias=(own, relative_position_bias), dropout=self.dropout)
        out = out.permute(0, 2, 1, 3).contiguous()
        return (out.view(*out.shape[:-2], self.all_head_size),)


class HFData2VecLayer(nn.Module):
    """Mixed into transformers' ``Data2VecVisionLayer``."""

    if TYPE_CHECKING:  # mixed into a library's module: its attributes are the library's, untyped here
        def __getattr__(self, name: str) -> Any: ...

    add1: QAdd
    add2: QAdd

    def forward_attn(self, x: Tensor, relative_position_bias: Optional[Tensor] = None,
                     interpolate_pos_encoding: bool = False, resolution: Optional[tuple[int, int]] = None) -> Tensor:
        a = self.attention(self.layernorm_before(x), False, relative_position_bias, interpolate_pos_encoding,
                           resolution)[0]
        if self.lambda_1 is not None:
            a = self.lambda_1 * a
        return self.add1(self.drop_path(a), x)

    def forward_mlp(self, x: Tensor) -> Tensor:
        h = self.output(self.intermediate(self.layernorm_after(x)))
        if self.lambda_2 is not None:
            h = self.lambda_2 * h
        return self.add2(self.drop_path(h), x)

    def forward(self, hidden_states: Tensor, output_attentions: bool = False,
                relative_position_bias: Optional[Tensor] = None, interpolate_pos_encoding: bool = False,
                resolution: Optional[tuple[int, int]] = None) -> tuple[Tensor]:
        if output_attentions:
            raise ModelError("output_attentions is not available from a quantized data2vec-vision model")
        x = self.forward_attn(hidden_states, relative_position_bias, interpolate_pos_encoding, resolution)
        return (self.forward_mlp(x),)


@register_adapter
class HFData2VecVisionAdapter(HFBeitAdapter):
    """BEiT's adapter with data2vec-vision's module layout."""

    name = "hf-data2vec-vision"
    description = ("Hugging Face Data2VecVisionForImageClassification / Data2VecVisionModel (hf:DIR): BEiT in the "
                   "older module layout; relative position bias, layer scale, mean-pooling head")
    MODELS = MODELS
    LAYERS = "encoder.layer"
    QKV = ("attention.attention.query", "attention.attention.key", "attention.attention.value")
    O_PROJ, FC1, FC2 = "attention.output.dense", "intermediate.dense", "output.dense"
    LAYER_MIXIN = HFData2VecLayer

    def _wrap_layer(self, layer: Any) -> None:
        mix_in(layer, HFData2VecLayer)
        att = layer.attention.attention
        if not isinstance(att, HFData2VecSelfAttention):
            mix_in(att, HFData2VecSelfAttention)
            att.init_core()

    def _shared_bias_module(self, base: Any) -> Optional[nn.Module]:
        enc = base.encoder
        return enc.relative_position_bias if enc.has_relative_position_bias else None  # type: ignore[no-any-return]

    def _mlp_modules(self, layer: Any) -> tuple[nn.Module, ...]:
        return (layer.layernorm_after, layer.intermediate, layer.output, layer.add2)
