"""Hugging Face SigLIP image towers: ``SiglipVisionModel`` (the embedding: the attention-pool head's output, its
``pooler_output``) and ``SiglipForImageClassification`` (a classifier on the mean token).

* The encoder layers are CLIP's in form: :class:`~vitq.adapters.hf.clip.HFCLIPAttention` and
  :class:`~vitq.adapters.hf.clip.HFCLIPLayer` are mixed in as into CLIP's.
* :class:`HFSiglipPoolHead` replaces the attention-pool head, whose attention is a ``torch.nn.MultiheadAttention``
  (one packed in-projection): its query rows become a QLinear ``q`` and its key / value rows one QLinear ``kv``,
  computed as torch's ``multi_head_attention_forward`` does (the query projected alone, keys and values in one
  matmul, ``q * sqrt(1 / head_dim)``), through the attention core; then ``out_proj`` and the residual MLP on its
  own LayerNorm. Bit-exact with torch's path; the parameter names change (``head.q`` / ``head.kv`` /
  ``head.out_proj`` for ``head.attention.*``): a checkpoint loads into the float model before it is wrapped.
* The head reads the encoder's output through its **own copy of** ``post_layernorm`` (``head.norm``):
  :class:`HFSiglipTower` is mixed into the tower so that ``post_layernorm`` gives ``last_hidden_state`` (the patch
  features a vision-language model reads) and ``head.norm`` the pool's keys / values. The two are the same function
  until RepQ-ViT / MOSF fold the pool's channel-wise kv input quantizer into ``head.norm``, which leaves
  ``last_hidden_state`` as it was and lets the kv input be per-tensor (an integer matmul in ONNX; folded into the
  shared norm it would have rescaled the patch features). ``output_hidden_states`` / ``output_attentions`` are not
  returned by the wrapped tower.
* ``SiglipForImageClassification`` reads the mean token: the pool head it does not use is removed when it is wrapped
  (its output reaches nothing).
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Any, Optional

from torch import Tensor, nn

from ...data import PreprocessConfig
from ...errors import ModelError
from ...nn import QAdd, QAttentionCore
from ...roles import Role
from ..base import (
    ATTN_POOL_Q_WHY,
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
from .clip import GELU_LIKE, HFCLIPAttention, HFCLIPLayer

#: model class -> the vision tower's attribute ("" : the model is the tower) and whether it has a classifier
MODELS = {"SiglipVisionModel": ("", False), "SiglipForImageClassification": ("vision_model", True)}


def _vision_config(model: Any) -> Any:
    """The vision tower's config (a classifier's config holds it as ``vision_config``)."""
    return getattr(model.config, "vision_config", None) or model.config


def _linear(weight: Tensor, bias: Optional[Tensor]) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    lin.weight = nn.Parameter(weight.detach().clone())
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach().clone())
    return lin


class HFSiglipPoolHead(QAttentionCore):
    """Replacement for ``SiglipMultiheadAttentionPoolingHead`` (see the module docstring)."""

    if TYPE_CHECKING:  # takes over a library's module: its attributes are the library's, untyped here
        def __getattr__(self, name: str) -> Any: ...

    def __init__(self, head: Any, post_layernorm: nn.Module) -> None:
        super().__init__()
        self.norm = copy.deepcopy(post_layernorm)
        mha = head.attention
        e = mha.embed_dim
        self.num_heads, self.head_dim = mha.num_heads, mha.head_dim
        self.probe = head.probe
        w, b = mha.in_proj_weight, mha.in_proj_bias
        self.q = _linear(w[:e], None if b is None else b[:e])
        self.kv = _linear(w[e:], None if b is None else b[e:])
        self.out_proj = _linear(mha.out_proj.weight, mha.out_proj.bias)
        self.layernorm = head.layernorm
        self.mlp = head.mlp
        self.add = QAdd()
        self.init_core()

    def forward(self, hidden_state: Tensor) -> Tensor:
        """``hidden_state``: the encoder's output *before* ``post_layernorm`` (the head normalizes it itself)."""
        hidden_state = self.norm(hidden_state)
        B, N, E = hidden_state.shape
        probe = self.probe.repeat(B, 1, 1)
        L = probe.shape[1]
        q = self.q(probe).reshape(B, L, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(hidden_state).unflatten(-1, (2, E)).unbind(-2)
        k = k.reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        v = v.reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        x = self.attend(q, k, v, math.sqrt(1.0 / float(self.head_dim)))
        x = self.out_proj(x.transpose(1, 2).reshape(B, L, E))
        x = self.add(x, self.mlp(self.layernorm(x)))
        return x[:, 0]


class HFSiglipTower:
    """Mixed into the SigLIP vision tower when it keeps its pool head: ``post_layernorm`` for ``last_hidden_state``,
    the head on the encoder's output through its own norm (module docstring)."""

    if TYPE_CHECKING:  # mixed into a library's module: its attributes are the library's, untyped here
        def __getattr__(self, name: str) -> Any: ...

    def forward(self, pixel_values: Tensor, interpolate_pos_encoding: Optional[bool] = False, **kwargs: Any) -> Any:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        asked = [k for k in ("output_hidden_states", "output_attentions") if kwargs.get(k)]
        if asked:  # transformers collects them with hooks around its own forward, which this one replaces
            raise ModelError(f"{', '.join(asked)}: the quantized SigLIP tower returns last_hidden_state and "
                             "pooler_output only; hook the encoder layers (model.encoder.layers) for per-layer outputs")
        h = self.embeddings(pixel_values, interpolate_pos_encoding=bool(interpolate_pos_encoding))
        h = self.encoder(inputs_embeds=h, **kwargs)[0]
        return BaseModelOutputWithPooling(last_hidden_state=self.post_layernorm(h), pooler_output=self.head(h))


@register_adapter
class HFSiglipAdapter(HFAdapter):
    name = "hf-siglip"
    description = ("Hugging Face SiglipVisionModel / SiglipForImageClassification (hf:DIR): SigLIP image towers, the "
                   "attention-pool head")
    MODELS = MODELS

    def data_config(self, model: Any) -> PreprocessConfig:
        vc = _vision_config(model)
        return hf_data_config(model, int(vc.num_channels), config_image_size(vc))

    def is_wrapped(self, model: Any) -> bool:
        layers = self._parts(model)[1].encoder.layers
        return len(layers) > 0 and isinstance(layers[0], HFCLIPLayer)

    def check(self, model: Any) -> None:
        act = getattr(_vision_config(model), "hidden_act", None)
        if act not in GELU_LIKE:
            raise ModelError(f"MLP activation {act!r} is not supported: the post-GELU quantizers assume GELU's range "
                             f"({', '.join(GELU_LIKE)} are taken)")
        _, tower, has_cls = self._parts(model)
        head = getattr(tower, "head", None)
        if head is not None and not isinstance(head, HFSiglipPoolHead):
            mha = getattr(head, "attention", None)
            if not isinstance(mha, nn.MultiheadAttention) or not mha.batch_first or mha.in_proj_weight is None:
                raise ModelError("a SigLIP pooling head without a batch-first packed nn.MultiheadAttention is not "
                                 "supported")
        if has_cls and not isinstance(model.classifier, (nn.Linear, nn.Identity)):
            raise ModelError(f"classifier of type {type(model.classifier).__name__} is not supported: nn.Linear only")

    def wrap(self, model: Any) -> nn.Module:
        self.check(model)
        _, tower, has_cls = self._parts(model)
        swap_conv(tower.embeddings, "patch_embedding", Role.PATCH_EMBED)
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
        if has_cls and getattr(tower, "head", None) is not None:
            # the classifier reads the mean token: the pool head's output reaches nothing (and an exporter drops it)
            tower.head, tower.use_head = None, False
        if getattr(tower, "head", None) is not None:
            if not isinstance(tower.head, HFSiglipPoolHead):
                tower.head = HFSiglipPoolHead(tower.head, tower.post_layernorm)
                mix_in(tower, HFSiglipTower)
            h = tower.head
            # h.q, the probe's projection, reads a learned constant: float by design (float_parts)
            swap_layernorm(h, "norm")
            swap_linear(h, "kv", Role.QKV_IN)
            swap_linear(h, "out_proj", Role.PROJ_IN)
            swap_layernorm(h, "layernorm")
            swap_linear(h.mlp, "fc1", Role.FC1_IN)
            swap_linear(h.mlp, "fc2", Role.FC2_IN)
        if has_cls and isinstance(model.classifier, nn.Linear):
            swap_linear(model, "classifier", Role.HEAD_IN)
        self.check_wrapped(model)
        return model

    def float_parts(self, model: Any) -> list[tuple[str, str]]:
        prefix, tower, _ = self._parts(model)
        if isinstance(getattr(tower, "head", None), HFSiglipPoolHead):
            return [(at(prefix, "head.q"), ATTN_POOL_Q_WHY)]
        return []

    def ln_consumers(self, model: Any) -> list[LNPair]:
        """layer_norm1 -> q / k / v, layer_norm2 -> fc1 of every layer, and the head's two LayerNorms: its copy of the
        post-LayerNorm -> kv and its own -> its MLP. ``post_layernorm`` itself is not folded: it gives
        ``last_hidden_state`` (patch features), and a classifier reads its mean token. The copy is made when the model is
        wrapped, so an unwrapped model is wrapped first (as for :meth:`chain`)."""
        if not self.is_wrapped(model):
            self.wrap(model)
        prefix, tower, has_cls = self._parts(model)
        pairs = []
        for i, _ in enumerate(tower.encoder.layers):
            p = at(prefix, f"encoder.layers.{i}")
            pairs.append(LNPair(f"{p}.layer_norm1", tuple(f"{p}.self_attn.{a}" for a in ("q_proj", "k_proj", "v_proj")),
                                Role.QKV_IN))
            pairs.append(LNPair(f"{p}.layer_norm2", (f"{p}.mlp.fc1",), Role.FC1_IN))
        if getattr(tower, "head", None) is not None and not has_cls:  # a classifier's pool head is removed
            pairs.append(LNPair(at(prefix, "head.norm"), (at(prefix, "head.kv"),), Role.QKV_IN))
            pairs.append(LNPair(at(prefix, "head.layernorm"), (at(prefix, "head.mlp.fc1"),), Role.FC1_IN))
        return pairs

    def residual_streams(self, model: Any) -> list[ResidualStream]:
        """One stream: the patch projection's rows and the position embedding, then out_proj / fc2 of every layer;
        read by layer_norm1 / layer_norm2, the post-LayerNorm and the pool head's copy of it."""
        prefix, tower, _ = self._parts(model)
        emb = at(prefix, "embeddings")
        w = [StreamWriter(f"{emb}.patch_embedding", "rows"), StreamWriter(f"{emb}.position_embedding.weight", "param")]
        r: list[StreamReader] = []
        for i, _ in enumerate(tower.encoder.layers):
            p = at(prefix, f"encoder.layers.{i}")
            w += [StreamWriter(f"{p}.self_attn.out_proj", "rows"), StreamWriter(f"{p}.mlp.fc2", "rows")]
            r += [StreamReader(f"{p}.layer_norm1", "ln"), StreamReader(f"{p}.layer_norm2", "ln")]
        r.append(StreamReader(at(prefix, "post_layernorm"), "ln"))
        if isinstance(getattr(tower, "head", None), HFSiglipPoolHead):
            r.append(StreamReader(at(prefix, "head.norm"), "ln"))
        return [ResidualStream("stream", int(_vision_config(model).hidden_size), tuple(w), tuple(r))]

    def chain(self, model: Any) -> list[Piece]:
        """embed (patch embedding, position embedding) | per layer: attn half, mlp half | head (post-LayerNorm, the
        attention-pool head; the classifier on the mean token)."""
        if not self.is_wrapped(model):
            self.wrap(model)
        _, tower, has_cls = self._parts(model)

        def head(x: Tensor) -> Tensor:
            y = tower.post_layernorm(x)  # last_hidden_state: computed as the model does, so its quantizers see data
            if has_cls:
                return model.classifier(y.mean(dim=1))  # type: ignore[no-any-return]
            # the pool head reads the encoder's output through its own norm
            return tower.head(x) if getattr(tower, "head", None) is not None else y[:, 0]  # type: ignore[no-any-return]

        pieces = [Piece("embed", "embed", tower.embeddings, (tower.embeddings,))]
        for i, layer in enumerate(tower.encoder.layers):
            pieces.append(Piece(f"layers.{i}.attn", "attn", layer.forward_attn,
                                (layer.layer_norm1, layer.self_attn, layer.add1), block=i))
            pieces.append(Piece(f"layers.{i}.mlp", "mlp", layer.forward_mlp, (layer.layer_norm2, layer.mlp, layer.add2),
                                block=i))
        tail = [m for m in (getattr(tower, "head", None), getattr(model, "classifier", None) if has_cls else None)
                if isinstance(m, nn.Module)]
        pieces.append(Piece("head", "head", head, (tower.post_layernorm, *tail)))
        return pieces
