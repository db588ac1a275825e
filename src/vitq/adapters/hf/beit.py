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
    """BEiT-style encoders. The module layout is data (class attributes and two hooks), so data2vec-vision - the same
    computation in transformers' older layout - is a subclass that names its own modules."""

    name = "hf-beit"
    description = ("Hugging Face BeitForImageClassification / BeitModel (hf:DIR): relative position bias, layer "
                   "scale, mean-pooling head")
    MODELS = MODELS
    #: where a layer's modules are, relative to the base model / to the layer
    LAYERS = "layers"
    QKV: tuple[str, ...] = ("attention.q_proj", "attention.k_proj", "attention.v_proj")
    O_PROJ, FC1, FC2 = "attention.o_proj", "mlp.fc1", "mlp.fc2"
    LAYER_MIXIN: type = HFBeitLayer

    def _layers(self, base: Any) -> Any:
        return base.get_submodule(self.LAYERS)

    def _wrap_layer(self, layer: Any) -> None:
        """The layer's and its attention's behaviour mixed in."""
        mix_in(layer, HFBeitLayer)
        att = layer.attention
        if not isinstance(att, HFViTAttention):
            mix_in(att, HFViTAttention)
            att.init_core()

    def _shared_bias_module(self, base: Any) -> Optional[nn.Module]:
        """The model's relative position bias shared by every layer (None: each layer has its own, or none)."""
        return base.shared_position_bias  # type: ignore[no-any-return]

    def _mlp_modules(self, layer: Any) -> tuple[nn.Module, ...]:
        return (layer.layernorm_after, layer.mlp, layer.add2)

    def is_wrapped(self, model: Any) -> bool:
        layers = self._layers(self._parts(model)[1])
        return len(layers) > 0 and isinstance(layers[0], self.LAYER_MIXIN)

    def check(self, model: Any) -> None:
        act = getattr(model.config, "hidden_act", None)
        if act != "gelu":
            raise ModelError(f"MLP activation {act!r} is not supported: hidden_act 'gelu' only")
        prefix, base, head = self._parts(model)
        for i, layer in enumerate(self._layers(base)):
            for name in (*self.QKV, self.O_PROJ, self.FC1, self.FC2):
                if not isinstance(layer.get_submodule(name), nn.Linear):
                    raise ModelError(f"{at(prefix, f'{self.LAYERS}.{i}')}.{name} is not a Linear: not supported")
        if head and not isinstance(model.classifier, (nn.Linear, nn.Identity)):
            raise ModelError(f"classifier of type {type(model.classifier).__name__} is not supported: nn.Linear only")

    def wrap(self, model: Any) -> nn.Module:
        self.check(model)
        _, base, head = self._parts(model)
        swap_conv(base.embeddings.patch_embeddings, "projection", Role.PATCH_EMBED)
        swap_layernorm(base, "layernorm")
        if base.pooler is not None:
            swap_layernorm(base.pooler, "layernorm")
        roles = [(n, Role.QKV_IN) for n in self.QKV] + [(self.O_PROJ, Role.PROJ_IN), (self.FC1, Role.FC1_IN),
                                                       (self.FC2, Role.FC2_IN)]
        for layer in self._layers(base):
            self._wrap_layer(layer)
            if "add1" not in layer._modules:
                layer.add1, layer.add2 = QAdd(), QAdd()
            swap_layernorm(layer, "layernorm_before")
            swap_layernorm(layer, "layernorm_after")
            for name, role in roles:
                parent, attr = name.rsplit(".", 1)
                swap_linear(layer.get_submodule(parent), attr, role)
        if head and isinstance(model.classifier, nn.Linear):
            swap_linear(model, "classifier", Role.HEAD_IN)
        self.check_wrapped(model)
        return model

    def ln_consumers(self, model: Any) -> list[LNPair]:
        prefix, base, _ = self._parts(model)
        pairs = []
        for i, _ in enumerate(self._layers(base)):
            p = at(prefix, f"{self.LAYERS}.{i}")
            pairs.append(LNPair(f"{p}.layernorm_before", tuple(f"{p}.{q}" for q in self.QKV), Role.QKV_IN))
            pairs.append(LNPair(f"{p}.layernorm_after", (f"{p}.{self.FC1}",), Role.FC1_IN))
        return pairs

    def residual_streams(self, model: Any) -> list[ResidualStream]:
        """One stream: the patch projection's rows, the class token and the absolute position embedding (when there
        is one), then the attention output projection / fc2 of every layer (the lambda layer scales are per channel);
        read by the layer norms, and at the end by the final layernorm, or by the pooler's LayerNorm after the mean (a
        mean commutes with a per-channel scale), or the class token's classifier columns."""
        prefix, base, head = self._parts(model)
        emb = at(prefix, "embeddings")
        w = [StreamWriter(f"{emb}.patch_embeddings.projection", "rows")]
        for tok in ("cls_token", "position_embeddings"):
            if isinstance(getattr(base.embeddings, tok, None), nn.Parameter):
                w.append(StreamWriter(f"{emb}.{tok}", "param"))
        r: list[StreamReader] = []
        for i, _ in enumerate(self._layers(base)):
            p = at(prefix, f"{self.LAYERS}.{i}")
            w += [StreamWriter(f"{p}.{self.O_PROJ}", "rows"), StreamWriter(f"{p}.{self.FC2}", "rows")]
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
        shared_bias = self._shared_bias_module(base)
        res: dict[str, Any] = {}

        def embed(x: Tensor) -> Tensor:
            res["hw"] = tuple(x.shape[2:])
            out = base.embeddings(x)
            return out[0] if isinstance(out, tuple) else out  # type: ignore[no-any-return]

        def attn_half(layer: Any) -> Callable[[Tensor], Tensor]:
            def f(x: Tensor) -> Tensor:
                hw = res.get("hw") or config_image_size(model.config)
                shared = None
                if shared_bias is not None:
                    window = (hw[0] // model.config.patch_size, hw[1] // model.config.patch_size)
                    shared = shared_bias(window, interpolate_pos_encoding=False, dim_size=x.shape[1])
                return layer.forward_attn(x, shared, False, hw)  # type: ignore[no-any-return]
            return f

        def head(x: Tensor) -> Tensor:
            x = base.layernorm(x)
            pooled = base.pooler(x) if base.pooler is not None else x[:, 0]
            return model.classifier(pooled) if has_head else pooled  # type: ignore[no-any-return]

        pieces = [Piece("embed", "embed", embed, (base.embeddings,))]
        for i, layer in enumerate(self._layers(base)):
            pieces.append(Piece(f"{self.LAYERS}.{i}.attn", "attn", attn_half(layer),
                                (layer.layernorm_before, layer.attention, layer.add1), block=i))
            pieces.append(Piece(f"{self.LAYERS}.{i}.mlp", "mlp", layer.forward_mlp, self._mlp_modules(layer), block=i))
        tail = [m for m in (base.layernorm, base.pooler, model.classifier if has_head else None) if isinstance(m, nn.Module)]
        pieces.append(Piece("head", "head", head, tuple(tail)))
        return pieces
