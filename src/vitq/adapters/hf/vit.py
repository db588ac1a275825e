"""Hugging Face ``ViTForImageClassification``, ``DeiTForImageClassification`` and
``DeiTForImageClassificationWithTeacher`` (one adapter: the same encoder, different heads).

The library's classes keep every module and parameter name (state dicts unchanged); behaviour is
mixed in place (:func:`~vitq.adapters.base.mix_in`):

* :class:`HFViTAttention` into ``ViTAttention`` / ``DeiTAttention``: ``q_proj`` / ``k_proj`` /
  ``v_proj`` stay three Linears (three QKV_IN sites over the same LayerNorm output, calibrated on
  the same values), attention through the :class:`~vitq.nn.QAttentionCore` in the library's eager
  order (``(q @ k^T) * scaling``);
* :class:`HFViTLayer` into ``ViTLayer`` / ``DeiTLayer``: the residual additions as
  :class:`~vitq.nn.QAdd`, forward in two halves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.nn.functional as F
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
    mix_in,
    register_adapter,
    require_type,
    swap_conv,
    swap_layernorm,
    swap_linear,
)
from . import (
    HFAdapter,
    at,
)

#: model class -> (base-model attribute, head Linear attributes)
MODELS = {
    "ViTForImageClassification": ("vit", ("classifier",)),
    "DeiTForImageClassification": ("deit", ("classifier",)),
    "DeiTForImageClassificationWithTeacher": ("deit", ("cls_classifier", "distillation_classifier")),
    # encoders without a head ("" : the model is the base): their embedding is the pooler's output, or the class token
    "ViTModel": ("", ()),
    "DeiTModel": ("", ()),
    "ViTMSNForImageClassification": ("vit", ("classifier",)),
    "ViTMSNModel": ("", ()),
}


def additive_mask(mask: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """A transformers attention mask as an additive one (0 attended, -inf not)."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def attention_dropout(module: Any) -> Any:
    p = float(getattr(module, "attention_dropout", 0.0) or 0.0)
    if not module.training or p == 0.0:
        return None
    return lambda a: F.dropout(a, p=p, training=True)


class HFViTAttention(QAttentionCore):
    """Mixed into transformers' ``ViTAttention`` / ``DeiTAttention``."""

    if TYPE_CHECKING:  # mixed into a library's module: its attributes are the library's, untyped here
        def __getattr__(self, name: str) -> Any: ...

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None, **kwargs: Any
                ) -> tuple[Tensor, None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        out = self.attend(q, k, v, self.scaling, scale_first=False, mask=additive_mask(attention_mask, q.dtype),
                          dropout=attention_dropout(self))
        out = out.transpose(1, 2).contiguous().reshape(*input_shape, -1).contiguous()
        return self.o_proj(out), None


class HFViTLayer(nn.Module):
    """Mixed into transformers' ``ViTLayer`` / ``DeiTLayer``."""

    if TYPE_CHECKING:  # mixed into a library's module: its attributes are the library's, untyped here
        def __getattr__(self, name: str) -> Any: ...

    add1: QAdd
    add2: QAdd

    def forward_attn(self, x: Tensor, attention_mask: Optional[Tensor] = None, **kwargs: Any) -> Tensor:
        h, _ = self.attention(self.layernorm_before(x), attention_mask, **kwargs)
        return self.add1(self.dropout(h), x)

    def forward_mlp(self, x: Tensor) -> Tensor:
        return self.add2(self.dropout(self.mlp(self.layernorm_after(x))), x)

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None, **kwargs: Any) -> Tensor:
        return self.forward_mlp(self.forward_attn(hidden_states, attention_mask, **kwargs))


@register_adapter
class HFViTAdapter(HFAdapter):
    name = "hf-vit"
    description = ("Hugging Face ViTForImageClassification, DeiTForImageClassification and "
                   "DeiTForImageClassificationWithTeacher, ViTMSNForImageClassification, and the encoders ViTModel / "
                   "DeiTModel / ViTMSNModel (hf:DIR)")
    MODELS = MODELS

    def is_wrapped(self, model: Any) -> bool:
        _, base, _ = self._parts(model)
        return len(base.layers) > 0 and isinstance(base.layers[0], HFViTLayer)

    def check(self, model: Any) -> None:
        from transformers.models.deit.modeling_deit import DeiTAttention, DeiTLayer, DeiTMLP
        from transformers.models.vit.modeling_vit import ViTAttention, ViTLayer, ViTMLP
        from transformers.models.vit_msn.modeling_vit_msn import ViTMSNAttention, ViTMSNLayer, ViTMSNMLP

        prefix, base, heads = self._parts(model)
        act = getattr(model.config, "hidden_act", None)
        if act != "gelu":
            raise ModelError(f"MLP activation {act!r} is not supported: hidden_act 'gelu' only")
        pooler = getattr(base, "pooler", None)
        if pooler is not None and heads:
            raise ModelError("a ViT classifier with a pooler layer is not supported: build it with add_pooling_layer=False")
        if pooler is not None and not (type(getattr(pooler, "dense", None)) is nn.Linear
                                       and isinstance(getattr(pooler, "activation", None), nn.Tanh)):
            raise ModelError(f"pooler {type(pooler).__name__} is not supported: a dense layer with tanh only")
        for i, layer in enumerate(base.layers):
            where = at(prefix, f"layers.{i}")
            require_type(layer, (ViTLayer, DeiTLayer, ViTMSNLayer), "transformer layer", where)
            require_type(layer.attention, (ViTAttention, DeiTAttention, ViTMSNAttention), "attention", where + ".attention")
            require_type(layer.mlp, (ViTMLP, DeiTMLP, ViTMSNMLP), "MLP", where + ".mlp")
        for h in heads:
            if not isinstance(getattr(model, h), (nn.Linear, nn.Identity)):
                raise ModelError(f"head {h} of type {type(getattr(model, h)).__name__} is not supported: nn.Linear only")

    def wrap(self, model: Any) -> nn.Module:
        self.check(model)
        _, base, heads = self._parts(model)
        swap_conv(base.embeddings.patch_embeddings, "projection", Role.PATCH_EMBED)
        swap_layernorm(base, "layernorm")
        for layer in base.layers:
            mix_in(layer, HFViTLayer)
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
        for h in heads:
            if isinstance(getattr(model, h), nn.Linear):
                swap_linear(model, h, Role.HEAD_IN)
        if getattr(base, "pooler", None) is not None:  # an encoder's pooler: its output is the embedding
            swap_linear(base.pooler, "dense", Role.HEAD_IN)
        self.check_wrapped(model)
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
        """One stream: written by the patch projection, the class / distillation tokens and the
        position embedding, and by o_proj / fc2 of every layer; read by layernorm_before / _after and
        the final layernorm."""
        prefix, base, _ = self._parts(model)
        emb = at(prefix, "embeddings")
        w = [StreamWriter(f"{emb}.patch_embeddings.projection", "rows")]
        for tok in ("cls_token", "distillation_token", "position_embeddings"):
            if isinstance(getattr(base.embeddings, tok, None), nn.Parameter):
                w.append(StreamWriter(f"{emb}.{tok}", "param"))
        r: list[StreamReader] = []
        for i, _ in enumerate(base.layers):
            p = at(prefix, f"layers.{i}")
            w += [StreamWriter(f"{p}.attention.o_proj", "rows"), StreamWriter(f"{p}.mlp.fc2", "rows")]
            r += [StreamReader(f"{p}.layernorm_before", "ln"), StreamReader(f"{p}.layernorm_after", "ln")]
        r.append(StreamReader(at(prefix, "layernorm"), "ln"))
        return [ResidualStream("stream", int(model.config.hidden_size), tuple(w), tuple(r))]

    def chain(self, model: Any) -> list[Piece]:
        """embed (patch embedding, tokens, position embedding) | per layer: attn half, mlp half |
        head (final layernorm, token pooling, classifier(s))."""
        if not self.is_wrapped(model):
            self.wrap(model)
        _, base, heads = self._parts(model)

        def embed(x: Tensor) -> Tensor:
            return base.embeddings(x.to(base.embeddings.patch_embeddings.projection.weight.dtype))

        def head(x: Tensor) -> Tensor:
            x = base.layernorm(x)
            if not heads:  # an encoder: its embedding, as vitq.features.as_embedding reads the output
                return base.pooler(x) if getattr(base, "pooler", None) is not None else x[:, 0, :]
            if len(heads) == 1:
                return getattr(model, heads[0])(x[:, 0, :])
            return (getattr(model, heads[0])(x[:, 0, :]) + getattr(model, heads[1])(x[:, 1, :])) / 2

        pieces = [Piece("embed", "embed", embed, (base.embeddings,))]
        for i, layer in enumerate(base.layers):
            pieces.append(Piece(f"layers.{i}.attn", "attn", layer.forward_attn,
                                (layer.layernorm_before, layer.attention, layer.add1), block=i))
            pieces.append(Piece(f"layers.{i}.mlp", "mlp", layer.forward_mlp,
                                (layer.layernorm_after, layer.mlp, layer.add2), block=i))
        tail = [getattr(model, h) for h in heads] + ([base.pooler] if getattr(base, "pooler", None) is not None else [])
        pieces.append(Piece("head", "head", head, (base.layernorm, *tail)))
        return pieces
