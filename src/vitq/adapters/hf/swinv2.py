"""Hugging Face ``Swinv2ForImageClassification`` and ``Swinv2Model`` (Swin V2: cosine window attention with a learned
logit scale, the continuous position bias from a small MLP, residual post-normalization, patch merging that
normalizes after its reduction, at the end of every stage but the last).

Behaviour is mixed into the library's classes in place (names and state dicts unchanged):

* :class:`HFSwinv2SelfAttention` into ``Swinv2SelfAttention``: three QKV_IN Linears; the *normalized* q and k into
  the :class:`~vitq.nn.QAttentionCore` (ATTN_Q / ATTN_K), the scores multiplied by ``exp(clamp(logit_scale))`` per
  head, ``16 * sigmoid(continuous_position_bias_mlp(coords))`` added before the softmax. The position-bias MLP stays
  float (it reads constant coordinates). transformers adds the shifted-window mask twice (-200 where masked); the
  core adds that sum once after SOFTMAX_IN (the same softmax: a masked score's exponential is 0 either way).
* :class:`HFSwinv2Layer` into ``Swinv2Layer``: ``x + layernorm_before(attn(x))``, ``x + layernorm_after(mlp(x))``
  with the residual additions as :class:`~vitq.nn.QAdd`, forward in two halves on ``(B, H*W, C)`` tokens.

As in timm's Swin V2 (:mod:`vitq.adapters.timm.swinv2`), there is no LayerNorm -> Linear pair (RepQ-ViT / MOSF have
nothing to fold); Add_alpha balances each stage's stream between the post-norms and the columns that read it.
Reconstruction's chain runs on images of ``config.image_size`` (each layer's ``input_resolution``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Optional

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
    float_modules,
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

#: model class -> the base-model attribute ("" : the model is the base) and whether it has the classifier
MODELS = {
    "Swinv2ForImageClassification": ("swinv2", True),
    "Swinv2Model": ("", False),
}
#: the sub-module that stays float (the continuous position-bias MLP reads constant coordinates)
FLOAT_MODULE = "continuous_position_bias_mlp"


class HFSwinv2SelfAttention(QAttentionCore):
    """Mixed into transformers' ``Swinv2SelfAttention``."""

    if TYPE_CHECKING:  # mixed into a library's module: its attributes are the library's, untyped here
        def __getattr__(self, name: str) -> Any: ...

    def position_bias(self) -> Tensor:
        n = self.window_size[0] * self.window_size[1]
        table = self.continuous_position_bias_mlp(self.relative_coords_table).view(-1, self.num_attention_heads)
        bias = table[self.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1).contiguous()
        return 16 * torch.sigmoid(bias)

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None,
                output_attentions: Optional[bool] = False) -> tuple[Tensor]:
        batch, n, _ = hidden_states.shape
        shape = (batch, -1, self.num_attention_heads, self.attention_head_size)
        q = self.query(hidden_states).view(shape).transpose(1, 2)
        k = self.key(hidden_states).view(shape).transpose(1, 2)
        v = self.value(hidden_states).view(shape).transpose(1, 2)
        logit_scale = torch.clamp(self.logit_scale, max=math.log(1.0 / 0.01)).exp()
        mask = None
        if attention_mask is not None:  # (windows, N, N) -> (batch * windows, 1, N, N); added twice by the library
            windows = attention_mask.shape[0]
            m = attention_mask.unsqueeze(1).unsqueeze(0).expand(batch // windows, -1, -1, -1, -1).reshape(-1, 1, n, n)
            mask = m + m
        out = self.attend(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, logit_scale, scale_first=False,
                          bias=self.position_bias().unsqueeze(0), mask=mask, dropout=attention_dropout_of(self))
        out = out.permute(0, 2, 1, 3).contiguous()
        return (out.view(*out.shape[:-2], self.all_head_size),)


def attention_dropout_of(att: Any) -> Optional[Callable[[Tensor], Tensor]]:
    return att.dropout if att.training and att.dropout.p > 0 else None


class HFSwinv2Layer(nn.Module):
    """Mixed into transformers' ``Swinv2Layer``."""

    if TYPE_CHECKING:  # mixed into a library's module: its attributes are the library's, untyped here
        def __getattr__(self, name: str) -> Any: ...

    add1: QAdd
    add2: QAdd

    def forward_attn(self, x: Tensor, input_dimensions: tuple[int, int]) -> Tensor:
        from transformers.models.swinv2.modeling_swinv2 import window_partition, window_reverse

        height, width = input_dimensions
        batch, _, channels = x.shape
        h, pad = self.maybe_pad(x.view(batch, height, width, channels), height, width)
        _, hp, wp, _ = h.shape
        if self.shift_size > 0:
            h = torch.roll(h, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
        windows = window_partition(h, self.window_size).view(-1, self.window_size * self.window_size, channels)
        mask = self.get_attn_mask(hp, wp, dtype=h.dtype, device=windows.device)
        out = self.attention(windows, mask)[0].view(-1, self.window_size, self.window_size, channels)
        out = window_reverse(out, self.window_size, hp, wp)
        if self.shift_size > 0:
            out = torch.roll(out, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        if pad[3] > 0 or pad[5] > 0:
            out = out[:, :height, :width, :].contiguous()
        out = self.layernorm_before(out.view(batch, height * width, channels))
        return self.add1(x, self.drop_path(out))

    def forward_mlp(self, x: Tensor) -> Tensor:
        return self.add2(x, self.drop_path(self.layernorm_after(self.output(self.intermediate(x)))))

    def forward(self, hidden_states: Tensor, input_dimensions: tuple[int, int], output_attentions: Optional[bool] = False
                ) -> tuple[Tensor]:
        if output_attentions:
            raise ModelError("output_attentions is not supported by a vitq-wrapped Swin V2")
        return (self.forward_mlp(self.forward_attn(hidden_states, input_dimensions)),)


@register_adapter
class HFSwinv2Adapter(HFAdapter):
    name = "hf-swinv2"
    description = ("Hugging Face Swinv2ForImageClassification, Swinv2Model (hf:DIR; cosine window attention, "
                   "continuous position bias kept float, residual post-norm, patch merging)")
    MODELS = MODELS

    def is_wrapped(self, model: Any) -> bool:
        return isinstance(self._parts(model)[1].encoder.layers[0].blocks[0], HFSwinv2Layer)

    def check(self, model: Any) -> None:
        from transformers.models.swinv2.modeling_swinv2 import (
            Swinv2Attention,
            Swinv2Layer,
            Swinv2PatchMerging,
            Swinv2SelfAttention,
        )

        act = getattr(model.config, "hidden_act", None)
        if act != "gelu":
            raise ModelError(f"MLP activation {act!r} is not supported: hidden_act 'gelu' only")
        prefix, base, has_head = self._parts(model)
        for si, stage in enumerate(base.encoder.layers):
            if stage.downsample is not None:
                require_type(stage.downsample, (Swinv2PatchMerging,), "downsample",
                             at(prefix, f"encoder.layers.{si}.downsample"))
            for bi, blk in enumerate(stage.blocks):
                where = at(prefix, f"encoder.layers.{si}.blocks.{bi}")
                require_type(blk, (Swinv2Layer,), "Swin V2 layer", where)
                require_type(blk.attention, (Swinv2Attention,), "window attention", where + ".attention")
                require_type(blk.attention.self, (Swinv2SelfAttention,), "window attention", where + ".attention.self")
        if has_head and not isinstance(model.classifier, (nn.Linear, nn.Identity)):
            raise ModelError(f"classifier of type {type(model.classifier).__name__} is not supported: nn.Linear only")
        if not has_head and base.pooler is None:
            raise ModelError("a Swinv2Model built without its pooling layer has no image embedding to quantize for: "
                             "load it with add_pooling_layer=True (the default)")

    def wrap(self, model: Any) -> nn.Module:
        self.check(model)
        _, sw, has_head = self._parts(model)
        swap_conv(sw.embeddings.patch_embeddings, "projection", Role.PATCH_EMBED)
        swap_layernorm(sw.embeddings, "norm")
        swap_layernorm(sw, "layernorm")
        for stage in sw.encoder.layers:
            for blk in stage.blocks:
                mix_in(blk, HFSwinv2Layer)
                if "add1" not in blk._modules:
                    blk.add1, blk.add2 = QAdd(), QAdd()
                swap_layernorm(blk, "layernorm_before")
                swap_layernorm(blk, "layernorm_after")
                att = blk.attention.self
                if not isinstance(att, HFSwinv2SelfAttention):
                    mix_in(att, HFSwinv2SelfAttention)
                    att.init_core()
                for attr in ("query", "key", "value"):
                    swap_linear(att, attr, Role.QKV_IN)
                swap_linear(blk.attention.output, "dense", Role.PROJ_IN)
                swap_linear(blk.intermediate, "dense", Role.FC1_IN)
                swap_linear(blk.output, "dense", Role.FC2_IN)
            if stage.downsample is not None:
                swap_linear(stage.downsample, "reduction", Role.REDUCTION_IN)
                swap_layernorm(stage.downsample, "norm")
        if has_head and isinstance(model.classifier, nn.Linear):
            swap_linear(model, "classifier", Role.HEAD_IN)
        self.check_wrapped(model)
        return model

    def float_parts(self, model: Any) -> list[tuple[str, str]]:
        return float_modules(model, (FLOAT_MODULE,), "the continuous position-bias MLP: it reads constant coordinates, not the image")

    def ln_consumers(self, model: Any) -> list[LNPair]:
        """None: every LayerNorm of a post-norm layer writes the residual stream (RepQ-ViT / MOSF: nothing to fold)."""
        return []

    def residual_streams(self, model: Any) -> list[ResidualStream]:
        """One stream per stage: stage 0's written by the patch-embedding norm (and the absolute position embedding if
        any), a later stage's by the previous stage's patch-merging norm; within a stage by every layer's post-norms
        layernorm_before / _after (affine). Read by query / key / value and intermediate.dense (columns), at the end
        of the stage by its patch merging's reduction (the 2x2 neighbours concatenated: the channels 4 times,
        channel fastest) or the final layernorm."""
        prefix, sw, _ = self._parts(model)
        streams: list[ResidualStream] = []
        w: list[StreamWriter] = [StreamWriter(at(prefix, "embeddings.norm"), "affine")]
        if isinstance(getattr(sw.embeddings, "position_embeddings", None), nn.Parameter):
            w.append(StreamWriter(at(prefix, "embeddings.position_embeddings"), "param"))
        r: list[StreamReader] = []
        width = int(model.config.embed_dim)
        for si, stage in enumerate(sw.encoder.layers):
            for bi, _ in enumerate(stage.blocks):
                p = at(prefix, f"encoder.layers.{si}.blocks.{bi}")
                w += [StreamWriter(f"{p}.layernorm_before", "affine"), StreamWriter(f"{p}.layernorm_after", "affine")]
                r += [StreamReader(f"{p}.attention.self.{a}", "cols") for a in ("query", "key", "value")]
                r.append(StreamReader(f"{p}.intermediate.dense", "cols"))
            if stage.downsample is not None:
                d = at(prefix, f"encoder.layers.{si}.downsample")
                r.append(StreamReader(f"{d}.reduction", "cols", tile=4))
                streams.append(ResidualStream(f"stage{len(streams)}", width, tuple(w), tuple(r)))
                w, r = [StreamWriter(f"{d}.norm", "affine")], []
                width = int(stage.downsample.reduction.out_features)
        r.append(StreamReader(at(prefix, "layernorm"), "ln"))
        streams.append(ResidualStream(f"stage{len(streams)}", width, tuple(w), tuple(r)))
        return streams

    def chain(self, model: Any) -> list[Piece]:
        """embed (patch embedding + its norm) | per stage: per layer attn half, mlp half, then merge (patch merging;
        counted in the next stage) | head (final layernorm, average pooling, classifier)."""
        if not self.is_wrapped(model):
            self.wrap(model)
        _, sw, has_head = self._parts(model)
        grid = tuple(sw.embeddings.patch_grid)

        def embed(x: Tensor) -> Tensor:
            out, dims = sw.embeddings(x)
            if tuple(dims) != grid:
                raise ModelError(f"reconstruction of a Hugging Face Swin V2 runs on {model.config.image_size}-pixel "
                                 f"images (the patch grid it was built for, {grid}), got a {tuple(dims)} grid: resize "
                                 "the inputs")
            return out  # type: ignore[no-any-return]

        def head(x: Tensor) -> Tensor:
            pooled = sw.pooler(sw.layernorm(x).transpose(1, 2)).flatten(1)
            return model.classifier(pooled) if has_head else pooled  # type: ignore[no-any-return]

        pieces = [Piece("embed", "embed", embed, (sw.embeddings,))]
        nblk = 0
        for si, stage in enumerate(sw.encoder.layers):
            for bi, blk in enumerate(stage.blocks):
                dims = tuple(blk.input_resolution)
                p = f"layers.{si}.blocks.{bi}"

                def attn(x: Tensor, blk: Any = blk, dims: tuple[int, ...] = dims) -> Tensor:
                    return blk.forward_attn(x, dims)  # type: ignore[no-any-return]

                pieces.append(Piece(f"{p}.attn", "attn", attn, (blk.attention, blk.layernorm_before, blk.add1),
                                    block=nblk, stage=si))
                pieces.append(Piece(f"{p}.mlp", "mlp", blk.forward_mlp,
                                    (blk.intermediate, blk.output, blk.layernorm_after, blk.add2), block=nblk, stage=si))
                nblk += 1
            if stage.downsample is not None:
                dims = tuple(stage.blocks[0].input_resolution)

                def merge(x: Tensor, ds: nn.Module = stage.downsample, dims: tuple[int, ...] = dims) -> Tensor:
                    return ds(x, dims)  # type: ignore[no-any-return]

                pieces.append(Piece(f"layers.{si}.downsample", "merge", merge, (stage.downsample,), stage=si + 1))
        pieces.append(Piece("head", "head", head, (sw.layernorm, model.classifier) if has_head else (sw.layernorm,)))
        return pieces
