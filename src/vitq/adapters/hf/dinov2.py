"""Hugging Face DINOv2: ``Dinov2Model`` / ``Dinov2ForImageClassification`` and the same with registers
(``Dinov2WithRegistersModel`` / ``...ForImageClassification``).

* The attention is ViT's in form (``q_proj`` / ``k_proj`` / ``v_proj`` / ``o_proj``, ``head_dim``, ``scaling``):
  :class:`~vitq.adapters.hf.vit.HFViTAttention` is mixed into it as into ``ViTAttention``.
* :class:`HFDinov2Layer` is mixed into the layer: residual adds as QAdd, the two layer scales, the forward in two
  halves. The MLP is ``fc1 -> GELU -> fc2`` (post-GELU FC2_IN) or the SwiGLU FFN (``gate_proj`` / ``up_proj`` ->
  ``down_proj``: the gated product is GLU_OUT, which the post-GELU quantizers do not reach).
* The classifier reads the class token beside the mean of the patch tokens (registers left out); the encoder's
  embedding is the final LayerNorm's class token (its ``pooler_output``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import Tensor, nn

from ...data import PreprocessConfig
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
    hf_data_config,
)
from .vit import HFViTAttention

#: model class -> the base-model attribute ("" : the model is the base) and whether it has the classifier
MODELS = {
    "Dinov2ForImageClassification": ("dinov2", True),
    "Dinov2Model": ("", False),
    "Dinov2WithRegistersForImageClassification": ("dinov2_with_registers", True),
    "Dinov2WithRegistersModel": ("", False),
}


def _swiglu(mlp: Any) -> bool:
    return hasattr(mlp, "gate_proj")


class HFDinov2Layer(nn.Module):
    """Mixed into transformers' ``Dinov2Layer`` (and with registers)."""

    if TYPE_CHECKING:  # mixed into a library's module: its attributes are the library's, untyped here
        def __getattr__(self, name: str) -> Any: ...

    add1: QAdd
    add2: QAdd

    def forward_attn(self, x: Tensor, attention_mask: Optional[Tensor] = None, **kwargs: Any) -> Tensor:
        h, _ = self.attention(self.norm1(x), attention_mask=attention_mask, **kwargs)
        return self.add1(self.drop_path(self.layer_scale1(h)), x)

    def forward_mlp(self, x: Tensor) -> Tensor:
        return self.add2(self.drop_path(self.layer_scale2(self.mlp(self.norm2(x)))), x)

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None, **kwargs: Any) -> Tensor:
        return self.forward_mlp(self.forward_attn(hidden_states, attention_mask, **kwargs))


@register_adapter
class HFDinov2Adapter(HFAdapter):
    name = "hf-dinov2"
    description = ("Hugging Face Dinov2Model / Dinov2ForImageClassification and the same with registers (hf:DIR): "
                   "layer scale, GELU MLP or SwiGLU FFN")
    MODELS = MODELS

    def _layers(self, model: Any) -> Any:
        return self._parts(model)[1].encoder.layer

    def data_config(self, model: Any) -> PreprocessConfig:
        # DINOv2 interpolates its position embeddings: its input size is the processor's crop (224 for a 518 config)
        return hf_data_config(model, int(model.config.num_channels), config_image_size(model.config), any_size=True)

    def accepts_input_size(self, model: Any, hw: tuple[int, int]) -> bool:
        p = int(model.config.patch_size)
        return hw[0] % p == 0 and hw[1] % p == 0

    def is_wrapped(self, model: Any) -> bool:
        layers = self._layers(model)
        return len(layers) > 0 and isinstance(layers[0], HFDinov2Layer)

    def check(self, model: Any) -> None:
        prefix, base, head = self._parts(model)
        act = getattr(model.config, "hidden_act", None)
        if act != "gelu":
            raise ModelError(f"MLP activation {act!r} is not supported: hidden_act 'gelu' only")
        for i, layer in enumerate(self._layers(model)):
            where = at(prefix, f"encoder.layer.{i}")
            for attr in ("q_proj", "k_proj", "v_proj", "o_proj"):
                if not isinstance(getattr(layer.attention, attr, None), nn.Linear):
                    raise ModelError(f"{where}.attention has no Linear {attr}: this DINOv2 variant is not supported")
        if head and not isinstance(model.classifier, (nn.Linear, nn.Identity)):
            raise ModelError(f"classifier of type {type(model.classifier).__name__} is not supported: nn.Linear only")

    def wrap(self, model: Any) -> nn.Module:
        self.check(model)
        _, base, head = self._parts(model)
        swap_conv(base.embeddings.patch_embeddings, "projection", Role.PATCH_EMBED)
        swap_layernorm(base, "layernorm")
        for layer in self._layers(model):
            mix_in(layer, HFDinov2Layer)
            if "add1" not in layer._modules:
                layer.add1, layer.add2 = QAdd(), QAdd()
            swap_layernorm(layer, "norm1")
            swap_layernorm(layer, "norm2")
            att = layer.attention
            if not isinstance(att, HFViTAttention):
                mix_in(att, HFViTAttention)
                att.init_core()
            for attr in ("q_proj", "k_proj", "v_proj"):
                swap_linear(att, attr, Role.QKV_IN)
            swap_linear(att, "o_proj", Role.PROJ_IN)
            if _swiglu(layer.mlp):
                swap_linear(layer.mlp, "gate_proj", Role.FC1_IN)
                swap_linear(layer.mlp, "up_proj", Role.FC1_IN)
                swap_linear(layer.mlp, "down_proj", Role.GLU_OUT)
            else:
                swap_linear(layer.mlp, "fc1", Role.FC1_IN)
                swap_linear(layer.mlp, "fc2", Role.FC2_IN)
        if head and isinstance(model.classifier, nn.Linear):
            swap_linear(model, "classifier", Role.HEAD_IN)
        self.check_wrapped(model)
        return model

    def ln_consumers(self, model: Any) -> list[LNPair]:
        prefix, _, _ = self._parts(model)
        pairs = []
        for i, layer in enumerate(self._layers(model)):
            p = at(prefix, f"encoder.layer.{i}")
            pairs.append(LNPair(f"{p}.norm1", tuple(f"{p}.attention.{a}" for a in ("q_proj", "k_proj", "v_proj")),
                                Role.QKV_IN))
            fc1 = ("gate_proj", "up_proj") if _swiglu(layer.mlp) else ("fc1",)
            pairs.append(LNPair(f"{p}.norm2", tuple(f"{p}.mlp.{a}" for a in fc1), Role.FC1_IN))
        return pairs

    def residual_streams(self, model: Any) -> list[ResidualStream]:
        """One stream: the patch projection's rows, the class token, the register tokens and the position embedding
        (interpolated linearly per channel: a per-channel scale commutes), then o_proj and the MLP's output of every
        layer (the layer scales are per channel); read by norm1 / norm2 and the final layernorm."""
        prefix, base, _ = self._parts(model)
        emb = at(prefix, "embeddings")
        w = [StreamWriter(f"{emb}.patch_embeddings.projection", "rows")]
        for tok in ("cls_token", "register_tokens", "position_embeddings"):
            if isinstance(getattr(base.embeddings, tok, None), nn.Parameter):
                w.append(StreamWriter(f"{emb}.{tok}", "param"))
        r: list[StreamReader] = []
        for i, layer in enumerate(self._layers(model)):
            p = at(prefix, f"encoder.layer.{i}")
            out = "down_proj" if _swiglu(layer.mlp) else "fc2"
            w += [StreamWriter(f"{p}.attention.o_proj", "rows"), StreamWriter(f"{p}.mlp.{out}", "rows")]
            r += [StreamReader(f"{p}.norm1", "ln"), StreamReader(f"{p}.norm2", "ln")]
        r.append(StreamReader(at(prefix, "layernorm"), "ln"))
        return [ResidualStream("stream", int(model.config.hidden_size), tuple(w), tuple(r))]

    def chain(self, model: Any) -> list[Piece]:
        """embed (patch embedding, tokens, position embedding) | per layer: attn half, mlp half | head (final
        layernorm; the classifier on the class token beside the mean patch token, or the class token)."""
        if not self.is_wrapped(model):
            self.wrap(model)
        _, base, has_head = self._parts(model)
        registers = int(getattr(model.config, "num_register_tokens", 0) or 0)

        def embed(x: Tensor) -> Tensor:
            return base.embeddings(x.to(base.embeddings.patch_embeddings.projection.weight.dtype))  # type: ignore[no-any-return]

        def head(x: Tensor) -> Tensor:
            x = base.layernorm(x)
            if not has_head:
                return x[:, 0]
            return model.classifier(torch.cat([x[:, 0], x[:, 1 + registers:].mean(dim=1)], dim=1))  # type: ignore[no-any-return]

        pieces = [Piece("embed", "embed", embed, (base.embeddings,))]
        for i, layer in enumerate(self._layers(model)):
            pieces.append(Piece(f"layers.{i}.attn", "attn", layer.forward_attn,
                                (layer.norm1, layer.attention, layer.layer_scale1, layer.add1), block=i))
            pieces.append(Piece(f"layers.{i}.mlp", "mlp", layer.forward_mlp,
                                (layer.norm2, layer.mlp, layer.layer_scale2, layer.add2), block=i))
        pieces.append(Piece("head", "head", head, (base.layernorm, *([model.classifier] if has_head else []))))
        return pieces
