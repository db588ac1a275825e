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
from typing import TYPE_CHECKING, Any, Callable, Optional

from torch import Tensor, nn

from ...errors import ModelError
from ...nn import QAdd, QAttentionCore
from ...roles import Role
from ..base import (
    LNPair,
    Piece,
    ResidualStream,
    StreamReader,
    StreamWriter,
    check_nothing_left,
    mix_in,
    register_adapter,
    swap_conv,
    swap_layernorm,
    swap_linear,
)
from . import HFAdapter, at, config_image_size

#: model class -> the base-model attribute ("" : the model is the base) and whether it has the classifier
MODELS = {
    "Data2VecVisionForImageClassification": ("data2vec_vision", True),
    "Data2VecVisionModel": ("", False),
}
QKV = ("attention.attention.query", "attention.attention.key", "attention.attention.value")
O_PROJ, FC1, FC2 = "attention.output.dense", "intermediate.dense", "output.dense"


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
class HFData2VecVisionAdapter(HFAdapter):
    name = "hf-data2vec-vision"
    description = ("Hugging Face Data2VecVisionForImageClassification / Data2VecVisionModel (hf:DIR): BEiT in the "
                   "older module layout; relative position bias, layer scale, mean-pooling head")
    MODELS = MODELS

    def is_wrapped(self, model: Any) -> bool:
        layers = self._parts(model)[1].encoder.layer
        return len(layers) > 0 and isinstance(layers[0], HFData2VecLayer)

    def check(self, model: Any) -> None:
        act = getattr(model.config, "hidden_act", None)
        if act != "gelu":
            raise ModelError(f"MLP activation {act!r} is not supported: hidden_act 'gelu' only")
        prefix, base, head = self._parts(model)
        for i, layer in enumerate(base.encoder.layer):
            for name in (*QKV, O_PROJ, FC1, FC2):
                if not isinstance(layer.get_submodule(name), nn.Linear):
                    raise ModelError(f"{at(prefix, f'encoder.layer.{i}')}.{name} is not a Linear: not supported")
        if head and not isinstance(model.classifier, (nn.Linear, nn.Identity)):
            raise ModelError(f"classifier of type {type(model.classifier).__name__} is not supported: nn.Linear only")

    def wrap(self, model: Any) -> nn.Module:
        self.check(model)
        _, base, head = self._parts(model)
        swap_conv(base.embeddings.patch_embeddings, "projection", Role.PATCH_EMBED)
        swap_layernorm(base, "layernorm")
        if base.pooler is not None and isinstance(base.pooler.layernorm, nn.LayerNorm):
            swap_layernorm(base.pooler, "layernorm")
        for layer in base.encoder.layer:
            mix_in(layer, HFData2VecLayer)
            if "add1" not in layer._modules:
                layer.add1, layer.add2 = QAdd(), QAdd()
            swap_layernorm(layer, "layernorm_before")
            swap_layernorm(layer, "layernorm_after")
            att = layer.attention.attention
            if not isinstance(att, HFData2VecSelfAttention):
                mix_in(att, HFData2VecSelfAttention)
                att.init_core()
            for attr in ("query", "key", "value"):
                swap_linear(att, attr, Role.QKV_IN)
            swap_linear(layer.attention.output, "dense", Role.PROJ_IN)
            swap_linear(layer.intermediate, "dense", Role.FC1_IN)
            swap_linear(layer.output, "dense", Role.FC2_IN)
        if head and isinstance(model.classifier, nn.Linear):
            swap_linear(model, "classifier", Role.HEAD_IN)
        check_nothing_left(model)
        return model

    def ln_consumers(self, model: Any) -> list[LNPair]:
        prefix, base, _ = self._parts(model)
        pairs = []
        for i, _ in enumerate(base.encoder.layer):
            p = at(prefix, f"encoder.layer.{i}")
            pairs.append(LNPair(f"{p}.layernorm_before", tuple(f"{p}.{q}" for q in QKV), Role.QKV_IN))
            pairs.append(LNPair(f"{p}.layernorm_after", (f"{p}.{FC1}",), Role.FC1_IN))
        return pairs

    def residual_streams(self, model: Any) -> list[ResidualStream]:
        """One stream: the patch projection's rows, the class token and the absolute position embedding (when there
        is one), then attention.output.dense / output.dense of every layer (lambda layer scales are per channel); read
        by the layer norms, and at the end by the final layernorm, the pooler's LayerNorm after the mean, or the class
        token's classifier columns."""
        prefix, base, head = self._parts(model)
        emb = at(prefix, "embeddings")
        w = [StreamWriter(f"{emb}.patch_embeddings.projection", "rows")]
        for tok in ("cls_token", "position_embeddings"):
            if isinstance(getattr(base.embeddings, tok, None), nn.Parameter):
                w.append(StreamWriter(f"{emb}.{tok}", "param"))
        r: list[StreamReader] = []
        for i, _ in enumerate(base.encoder.layer):
            p = at(prefix, f"encoder.layer.{i}")
            w += [StreamWriter(f"{p}.{O_PROJ}", "rows"), StreamWriter(f"{p}.{FC2}", "rows")]
            r += [StreamReader(f"{p}.layernorm_before", "ln"), StreamReader(f"{p}.layernorm_after", "ln")]
        if isinstance(base.layernorm, nn.LayerNorm):
            r.append(StreamReader(at(prefix, "layernorm"), "ln"))
        elif base.pooler is not None and isinstance(base.pooler.layernorm, nn.LayerNorm):
            r.append(StreamReader(at(prefix, "pooler.layernorm"), "ln"))
        elif head and isinstance(model.classifier, nn.Linear):
            r.append(StreamReader("classifier", "cols"))
        else:
            raise ModelError("the residual stream is the model output (no final norm, no head): Add_alpha cannot undo it")
        return [ResidualStream("stream", int(model.config.hidden_size), tuple(w), tuple(r))]

    def chain(self, model: Any) -> list[Piece]:
        """embed (patch embedding, class token, position embedding) | per layer: attn half (with the model's shared
        relative position bias and the image's resolution), mlp half | head (final layernorm, pooler, classifier)."""
        if not self.is_wrapped(model):
            self.wrap(model)
        _, base, has_head = self._parts(model)
        res: dict[str, Any] = {}

        def embed(x: Tensor) -> Tensor:
            res["hw"] = tuple(x.shape[2:])
            return base.embeddings(x)[0]  # type: ignore[no-any-return]

        def attn_half(layer: Any) -> Callable[[Tensor], Tensor]:
            def f(x: Tensor) -> Tensor:
                hw = res.get("hw") or config_image_size(model.config)
                shared = None
                if base.encoder.has_relative_position_bias:
                    window = (hw[0] // model.config.patch_size, hw[1] // model.config.patch_size)
                    shared = base.encoder.relative_position_bias(window, interpolate_pos_encoding=False,
                                                                 dim_size=x.shape[1])
                return layer.forward_attn(x, shared, False, hw)  # type: ignore[no-any-return]
            return f

        def head(x: Tensor) -> Tensor:
            x = base.layernorm(x)
            pooled = base.pooler(x) if base.pooler is not None else x[:, 0]
            return model.classifier(pooled) if has_head else pooled  # type: ignore[no-any-return]

        pieces = [Piece("embed", "embed", embed, (base.embeddings,))]
        for i, layer in enumerate(base.encoder.layer):
            pieces.append(Piece(f"encoder.layer.{i}.attn", "attn", attn_half(layer),
                                (layer.layernorm_before, layer.attention, layer.add1), block=i))
            pieces.append(Piece(f"encoder.layer.{i}.mlp", "mlp", layer.forward_mlp,
                                (layer.layernorm_after, layer.intermediate, layer.output, layer.add2), block=i))
        tail = [m for m in (base.layernorm, base.pooler, model.classifier if has_head else None) if isinstance(m, nn.Module)]
        pieces.append(Piece("head", "head", head, tuple(tail)))
        return pieces
