"""Hugging Face BEiT: ``BeitForImageClassification`` / ``BeitModel``. (data2vec-vision, BEiT in transformers' older
module layout - ``attention.attention.query`` ... ``output.dense`` - is :mod:`~vitq.adapters.hf.data2vec`.)

* The attention is ViT's in form (``q_proj`` / ``k_proj`` / ``v_proj`` / ``o_proj``): :class:`~vitq.adapters.hf.vit.
  HFViTAttention` is mixed in. transformers hands the relative position bias (the layer's, the model's shared one)
  to the attention as its additive ``attention_mask``, so the core adds it after the softmax-input site: for the
  fully-quantized recipes' SOFTMAX_IN the bias is outside the quantized range (exact in float either way).
* :class:`HFBeitLayer` is mixed into ``BeitLayer``: the layer's relative position bias, ``lambda_1`` /
  ``lambda_2`` layer scale, residual adds as QAdd, the forward in two halves.
* The pooler (the mean of the patch tokens through a LayerNorm, or the class token) feeds the classifier; an
  encoder's embedding is the pooler's output.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional

from torch import Tensor, nn

from ...errors import ModelError
from ...nn import QAdd
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
from . import (
    HFAdapter,
    at,
    config_image_size,
)
from .vit import HFViTAttention

#: model class -> the base-model attribute ("" : the model is the base) and whether it has the classifier
MODELS = {
    "BeitForImageClassification": ("beit", True),
    "BeitModel": ("", False),
}


class HFBeitLayer(nn.Module):
    """Mixed into transformers' ``BeitLayer``."""

    if TYPE_CHECKING:  # mixed into a library's module: its attributes are the library's, untyped here
        def __getattr__(self, name: str) -> Any: ...

    add1: QAdd
    add2: QAdd

    def _bias(self, x: Tensor, attention_mask: Optional[Tensor], interpolate_pos_encoding: bool,
              resolution: Optional[tuple[int, int]]) -> Optional[Tensor]:
        if self.relative_position_bias is None:
            return attention_mask
        assert resolution is not None
        window = (resolution[0] // self.patch_size, resolution[1] // self.patch_size)
        bias = self.relative_position_bias(window, interpolate_pos_encoding, dim_size=x.shape[1])
        return bias + attention_mask if attention_mask is not None else bias

    def forward_attn(self, x: Tensor, attention_mask: Optional[Tensor] = None, interpolate_pos_encoding: bool = False,
                     resolution: Optional[tuple[int, int]] = None, **kwargs: Any) -> Tensor:
        mask = self._bias(x, attention_mask, interpolate_pos_encoding, resolution)
        h, _ = self.attention(self.layernorm_before(x), attention_mask=mask, **kwargs)
        return self.add1(self.drop_path(self.lambda_1 * self.dropout(h)), x)

    def forward_mlp(self, x: Tensor) -> Tensor:
        h = self.dropout(self.mlp(self.layernorm_after(x)))
        return self.add2(self.drop_path(self.lambda_2 * h), x)

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None,
                interpolate_pos_encoding: bool = False, resolution: Optional[tuple[int, int]] = None,
                **kwargs: Any) -> Tensor:
        return self.forward_mlp(self.forward_attn(hidden_states, attention_mask, interpolate_pos_encoding, resolution,
                                                  **kwargs))


@register_adapter
class HFBeitAdapter(HFAdapter):
    name = "hf-beit"
    description = ("Hugging Face BeitForImageClassification / BeitModel (hf:DIR): relative position bias, layer "
                   "scale, mean-pooling head")
    MODELS = MODELS

    def is_wrapped(self, model: Any) -> bool:
        layers = self._parts(model)[1].layers
        return len(layers) > 0 and isinstance(layers[0], HFBeitLayer)

    def check(self, model: Any) -> None:
        act = getattr(model.config, "hidden_act", None)
        if act != "gelu":
            raise ModelError(f"MLP activation {act!r} is not supported: hidden_act 'gelu' only")
        prefix, base, head = self._parts(model)
        for i, layer in enumerate(base.layers):
            for attr in ("q_proj", "k_proj", "v_proj", "o_proj"):
                if not isinstance(getattr(layer.attention, attr, None), nn.Linear):
                    raise ModelError(f"{at(prefix, f'layers.{i}')}.attention has no Linear {attr}: not supported")
        if head and not isinstance(model.classifier, (nn.Linear, nn.Identity)):
            raise ModelError(f"classifier of type {type(model.classifier).__name__} is not supported: nn.Linear only")

    def wrap(self, model: Any) -> nn.Module:
        self.check(model)
        _, base, head = self._parts(model)
        swap_conv(base.embeddings.patch_embeddings, "projection", Role.PATCH_EMBED)
        if isinstance(base.layernorm, nn.LayerNorm):
            swap_layernorm(base, "layernorm")
        if base.pooler is not None and isinstance(getattr(base.pooler, "layernorm", None), nn.LayerNorm):
            swap_layernorm(base.pooler, "layernorm")
        for layer in base.layers:
            mix_in(layer, HFBeitLayer)
            if "add1" not in layer._modules:
                layer.add1, layer.add2 = QAdd(), QAdd()
            swap_layernorm(layer, "layernorm_before")
            swap_layernorm(layer, "layernorm_after")
            att = layer.attention
            if not isinstance(att, HFViTAttention):
                mix_in(att, HFViTAttention)
                att.init_core()
            for attr in ("q_proj", "k_proj", "v_proj"):
                swap_linear(att, attr, Role.QKV_IN)
            swap_linear(att, "o_proj", Role.PROJ_IN)
            swap_linear(layer.mlp, "fc1", Role.FC1_IN)
            swap_linear(layer.mlp, "fc2", Role.FC2_IN)
        if head and isinstance(model.classifier, nn.Linear):
            swap_linear(model, "classifier", Role.HEAD_IN)
        check_nothing_left(model)
        return model

    def ln_consumers(self, model: Any) -> list[LNPair]:
        prefix, base, _ = self._parts(model)
        pairs = []
        for i, _ in enumerate(base.layers):
            p = at(prefix, f"layers.{i}")
            pairs.append(LNPair(f"{p}.layernorm_before", tuple(f"{p}.attention.{a}" for a in ("q_proj", "k_proj", "v_proj")),
                                Role.QKV_IN))
            pairs.append(LNPair(f"{p}.layernorm_after", (f"{p}.mlp.fc1",), Role.FC1_IN))
        return pairs

    def residual_streams(self, model: Any) -> list[ResidualStream]:
        """One stream: the patch projection's rows, the class token and the absolute position embedding (when there
        is one), then o_proj / fc2 of every layer (the lambda layer scales are per channel); read by the layer norms,
        and at the end by the final layernorm, or by the pooler's LayerNorm after the mean (a mean commutes with a
        per-channel scale), or the class token's classifier columns."""
        prefix, base, head = self._parts(model)
        emb = at(prefix, "embeddings")
        w = [StreamWriter(f"{emb}.patch_embeddings.projection", "rows")]
        for tok in ("cls_token", "position_embeddings"):
            if isinstance(getattr(base.embeddings, tok, None), nn.Parameter):
                w.append(StreamWriter(f"{emb}.{tok}", "param"))
        r: list[StreamReader] = []
        for i, _ in enumerate(base.layers):
            p = at(prefix, f"layers.{i}")
            w += [StreamWriter(f"{p}.attention.o_proj", "rows"), StreamWriter(f"{p}.mlp.fc2", "rows")]
            r += [StreamReader(f"{p}.layernorm_before", "ln"), StreamReader(f"{p}.layernorm_after", "ln")]
        if isinstance(base.layernorm, nn.LayerNorm):
            r.append(StreamReader(at(prefix, "layernorm"), "ln"))
        elif base.pooler is not None and isinstance(getattr(base.pooler, "layernorm", None), nn.LayerNorm):
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
            return base.embeddings(x)  # type: ignore[no-any-return]

        def shared(x: Tensor) -> Optional[Tensor]:
            if base.shared_position_bias is None:
                return None
            hw = res.get("hw") or config_image_size(model.config)
            window = (hw[0] // model.config.patch_size, hw[1] // model.config.patch_size)
            return base.shared_position_bias(window, interpolate_pos_encoding=False, dim_size=x.shape[1])  # type: ignore[no-any-return]

        def attn_half(layer: Any) -> Callable[[Tensor], Tensor]:
            def f(x: Tensor) -> Tensor:
                hw = res.get("hw") or config_image_size(model.config)
                return layer.forward_attn(x, shared(x), False, hw)  # type: ignore[no-any-return]
            return f

        def head(x: Tensor) -> Tensor:
            x = base.layernorm(x)
            pooled = base.pooler(x) if base.pooler is not None else x[:, 0]
            return model.classifier(pooled) if has_head else pooled  # type: ignore[no-any-return]

        pieces = [Piece("embed", "embed", embed, (base.embeddings,))]
        for i, layer in enumerate(base.layers):
            pieces.append(Piece(f"layers.{i}.attn", "attn", attn_half(layer),
                                (layer.layernorm_before, layer.attention, layer.add1), block=i))
            pieces.append(Piece(f"layers.{i}.mlp", "mlp", layer.forward_mlp,
                                (layer.layernorm_after, layer.mlp, layer.add2), block=i))
        tail = [m for m in (base.layernorm, base.pooler, model.classifier if has_head else None) if isinstance(m, nn.Module)]
        pieces.append(Piece("head", "head", head, tuple(tail)))
        return pieces
