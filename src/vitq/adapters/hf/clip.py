"""Hugging Face CLIP image towers: ``CLIPVisionModel`` (the embedding: the post-LayerNorm class token, its
``pooler_output``) and ``CLIPVisionModelWithProjection`` (its ``image_embeds``, through ``visual_projection``).

* :class:`HFCLIPAttention` is mixed into ``CLIPAttention``: ``q_proj`` / ``k_proj`` / ``v_proj`` stay three Linears,
  attention through the :class:`~vitq.nn.QAttentionCore` in transformers' eager order (``(q @ k^T) * scale``).
* :class:`HFCLIPLayer` is mixed into ``CLIPEncoderLayer``: residual adds as QAdd, the forward in two halves.
* The MLP's activation is QuickGELU (OpenAI CLIP) or GELU: fc2's input is post-GELU either way (QuickGELU's
  minimum lies inside GELU's negative range). The pre-LayerNorm writes the residual stream (AOCQ's Add_alpha
  scales its affine); the post-LayerNorm and the projection are the head (HEAD_IN), as timm's fc_norm -> head.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

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
    swap_conv,
    swap_layernorm,
    swap_linear,
)
from . import HFAdapter, at
from .vit import additive_mask

#: model class -> the vision tower's attribute ("" : the model is the tower) and its projection's ("" : none)
MODELS = {"CLIPVisionModel": ("", ""), "CLIPVisionModelWithProjection": ("vision_model", "visual_projection")}
#: MLP activations whose negative range the post-GELU quantizers cover (QuickGELU's minimum is -0.1636)
GELU_LIKE = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh")


class HFCLIPAttention(QAttentionCore):
    """Mixed into transformers' ``CLIPAttention``."""

    if TYPE_CHECKING:  # mixed into a library's module: its attributes are the library's, untyped here
        def __getattr__(self, name: str) -> Any: ...

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None, **kwargs: Any
                ) -> tuple[Tensor, None]:
        import torch.nn.functional as F

        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        p = float(getattr(self, "dropout", 0.0) or 0.0)
        drop = (lambda a: F.dropout(a, p=p, training=True)) if self.training and p > 0 else None
        out = self.attend(q, k, v, self.scale, scale_first=False, mask=additive_mask(attention_mask, q.dtype),
                          dropout=drop)
        out = out.transpose(1, 2).contiguous().reshape(*input_shape, -1).contiguous()
        return self.out_proj(out), None


class HFCLIPLayer(nn.Module):
    """Mixed into transformers' ``CLIPEncoderLayer``."""

    if TYPE_CHECKING:  # mixed into a library's module: its attributes are the library's, untyped here
        def __getattr__(self, name: str) -> Any: ...

    add1: QAdd
    add2: QAdd

    def forward_attn(self, x: Tensor, attention_mask: Optional[Tensor] = None, **kwargs: Any) -> Tensor:
        h, _ = self.self_attn(hidden_states=self.layer_norm1(x), attention_mask=attention_mask, **kwargs)
        return self.add1(x, h)

    def forward_mlp(self, x: Tensor) -> Tensor:
        return self.add2(x, self.mlp(self.layer_norm2(x)))

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None, **kwargs: Any) -> Tensor:
        return self.forward_mlp(self.forward_attn(hidden_states, attention_mask, **kwargs))


@register_adapter
class HFCLIPAdapter(HFAdapter):
    name = "hf-clip"
    description = "Hugging Face CLIPVisionModel / CLIPVisionModelWithProjection (hf:DIR): CLIP image towers"
    MODELS = MODELS

    def num_outputs(self, model: Any) -> Optional[int]:
        return None  # an image tower: an encoder

    def is_wrapped(self, model: Any) -> bool:
        layers = self._parts(model)[1].encoder.layers
        return len(layers) > 0 and isinstance(layers[0], HFCLIPLayer)

    def check(self, model: Any) -> None:
        act = getattr(model.config, "hidden_act", None)
        if act not in GELU_LIKE:
            raise ModelError(f"MLP activation {act!r} is not supported: the post-GELU quantizers assume GELU's range "
                             f"({', '.join(GELU_LIKE)} are taken)")
        _, tower, proj = self._parts(model)
        for i, layer in enumerate(tower.encoder.layers):
            for attr in ("q_proj", "k_proj", "v_proj", "out_proj"):
                if not isinstance(getattr(layer.self_attn, attr, None), nn.Linear):
                    raise ModelError(f"encoder.layers.{i}.self_attn has no Linear {attr}: not supported")

    def wrap(self, model: Any) -> nn.Module:
        self.check(model)
        _, tower, proj = self._parts(model)
        swap_conv(tower.embeddings, "patch_embedding", Role.PATCH_EMBED)
        swap_layernorm(tower, "pre_layrnorm")
        swap_layernorm(tower, "post_layernorm")
        for layer in tower.encoder.layers:
            mix_in(layer, HFCLIPLayer)
            if "add1" not in layer._modules:
                layer.add1, layer.add2 = QAdd(), QAdd()
            swap_layernorm(layer, "layer_norm1")
            swap_layernorm(layer, "layer_norm2")
            att = layer.self_attn
            if not isinstance(att, HFCLIPAttention):
                mix_in(att, HFCLIPAttention)
                att.init_core()
            for attr in ("q_proj", "k_proj", "v_proj"):
                swap_linear(att, attr, Role.QKV_IN)
            swap_linear(att, "out_proj", Role.PROJ_IN)
            swap_linear(layer.mlp, "fc1", Role.FC1_IN)
            swap_linear(layer.mlp, "fc2", Role.FC2_IN)
        if proj:
            swap_linear(model, proj, Role.HEAD_IN)
        self.check_wrapped(model)
        return model

    def ln_consumers(self, model: Any) -> list[LNPair]:
        prefix, tower, proj = self._parts(model)
        pairs = []
        for i, _ in enumerate(tower.encoder.layers):
            p = at(prefix, f"encoder.layers.{i}")
            pairs.append(LNPair(f"{p}.layer_norm1", tuple(f"{p}.self_attn.{a}" for a in ("q_proj", "k_proj", "v_proj")),
                                Role.QKV_IN))
            pairs.append(LNPair(f"{p}.layer_norm2", (f"{p}.mlp.fc1",), Role.FC1_IN))
        return pairs  # the post-LayerNorm -> projection is the head (HEAD_IN), not reparameterized, as timm's fc_norm -> head

    def residual_streams(self, model: Any) -> list[ResidualStream]:
        """One stream: written by the pre-LayerNorm (its affine) and by out_proj / fc2 of every layer; read by
        layer_norm1 / layer_norm2 and the post-LayerNorm."""
        prefix, tower, _ = self._parts(model)
        w = [StreamWriter(at(prefix, "pre_layrnorm"), "affine")]
        r: list[StreamReader] = []
        for i, _ in enumerate(tower.encoder.layers):
            p = at(prefix, f"encoder.layers.{i}")
            w += [StreamWriter(f"{p}.self_attn.out_proj", "rows"), StreamWriter(f"{p}.mlp.fc2", "rows")]
            r += [StreamReader(f"{p}.layer_norm1", "ln"), StreamReader(f"{p}.layer_norm2", "ln")]
        r.append(StreamReader(at(prefix, "post_layernorm"), "ln"))
        return [ResidualStream("stream", int(model.config.hidden_size), tuple(w), tuple(r))]

    def chain(self, model: Any) -> list[Piece]:
        """embed (patch embedding, class embedding, position embedding, pre-LayerNorm) | per layer: attn half, mlp
        half | head (the post-LayerNorm class token, through the projection)."""
        if not self.is_wrapped(model):
            self.wrap(model)
        _, tower, proj = self._parts(model)

        def embed(x: Tensor) -> Tensor:
            return tower.pre_layrnorm(tower.embeddings(x))  # type: ignore[no-any-return]

        def head(x: Tensor) -> Tensor:
            pooled = tower.post_layernorm(x[:, 0, :])
            return getattr(model, proj)(pooled) if proj else pooled  # type: ignore[no-any-return]

        pieces = [Piece("embed", "embed", embed, (tower.embeddings, tower.pre_layrnorm))]
        for i, layer in enumerate(tower.encoder.layers):
            pieces.append(Piece(f"layers.{i}.attn", "attn", layer.forward_attn,
                                (layer.layer_norm1, layer.self_attn, layer.add1), block=i))
            pieces.append(Piece(f"layers.{i}.mlp", "mlp", layer.forward_mlp, (layer.layer_norm2, layer.mlp, layer.add2),
                                block=i))
        pieces.append(Piece("head", "head", head, (tower.post_layernorm, *([getattr(model, proj)] if proj else []))))
        return pieces
