"""Hugging Face ``SwinForImageClassification`` (window attention with relative position bias,
shifted windows, patch merging at the end of every stage but the last).

Behaviour is mixed into the library's classes in place (names and state dicts unchanged):

* :class:`HFSwinAttention` into ``SwinAttention``: three QKV_IN Linears, attention through the
  :class:`~vitq.nn.QAttentionCore` in the library's eager order (``(q @ k^T) * scaling + relative
  position bias``), the shifted-window mask added after SOFTMAX_IN;
* :class:`HFSwinLayer` into ``SwinLayer``: residual additions as :class:`~vitq.nn.QAdd`, forward in
  two halves on ``(B, H*W, C)`` tokens.

Reconstruction's chain needs each stage's resolution: it is the one the model was built for
(``input_resolution`` of every layer), so the chain runs on images of ``config.image_size``.
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
    require_type,
    swap_conv,
    swap_layernorm,
    swap_linear,
)
from . import (
    HFAdapter,
    at,
)
from .vit import attention_dropout


class HFSwinAttention(QAttentionCore):
    """Mixed into transformers' ``SwinAttention``."""

    if TYPE_CHECKING:  # mixed into a library's module: its attributes are the library's, untyped here
        def __getattr__(self, name: str) -> Any: ...

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None, **kwargs: Any
                ) -> tuple[Tensor, None]:
        input_shape = hidden_states.shape[:-1]  # (batch * windows, window area)
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        mask = None
        if attention_mask is not None:  # (windows, L, L) -> (batch * windows, 1, L, L), as the library does
            num_windows, seq_len = attention_mask.shape[0], input_shape[1]
            mask = (attention_mask.unsqueeze(1).unsqueeze(0).expand(input_shape[0] // num_windows, -1, -1, -1, -1)
                    .reshape(-1, 1, seq_len, seq_len))
        out = self.attend(q, k, v, self.scaling, scale_first=False, bias=self.relative_position_bias(), mask=mask,
                          dropout=attention_dropout(self))
        out = out.transpose(1, 2).contiguous().reshape(*input_shape, -1).contiguous()
        return self.o_proj(out), None


class HFSwinLayer(nn.Module):
    """Mixed into transformers' ``SwinLayer``."""

    if TYPE_CHECKING:  # mixed into a library's module: its attributes are the library's, untyped here
        def __getattr__(self, name: str) -> Any: ...

    add1: QAdd
    add2: QAdd

    def forward_attn(self, x: Tensor, input_dimensions: tuple[int, int], always_partition: bool = False,
                     **kwargs: Any) -> Tensor:
        from transformers.models.swin.modeling_swin import window_partition, window_reverse

        if not always_partition:
            self.set_shift_and_window_size(input_dimensions)
        height, width = input_dimensions
        batch, _, channels = x.shape
        h = self.layernorm_before(x).view(batch, height, width, channels)
        h, pad = self.maybe_pad(h, height, width)
        _, hp, wp, _ = h.shape
        windows = window_partition(self.cyclic_shift(h), self.window_size).view(-1, self.window_size ** 2, channels)
        mask = self.get_attn_mask(hp, wp, dtype=h.dtype, device=windows.device)
        out, _ = self.attention(windows, mask, **kwargs)
        out = self.dropout(out).view(-1, self.window_size, self.window_size, channels)
        out = self.cyclic_shift(window_reverse(out, self.window_size, hp, wp), reverse=True)
        if pad[3] > 0 or pad[5] > 0:
            out = out[:, :height, :width, :].contiguous()
        return self.add1(x, self.drop_path(out.view(batch, height * width, channels)))

    def forward_mlp(self, x: Tensor) -> Tensor:
        return self.add2(self.dropout(self.mlp(self.layernorm_after(x))), x)

    def forward(self, hidden_states: Tensor, input_dimensions: tuple[int, int], always_partition: bool = False,
                **kwargs: Any) -> tuple[Tensor, None]:
        x = self.forward_attn(hidden_states, input_dimensions, always_partition, **kwargs)
        return self.forward_mlp(x), None


#: model class -> the base-model attribute ("" : the model is the base) and whether it has the classifier
MODELS = {
    "SwinForImageClassification": ("swin", True),
    "SwinModel": ("", False),
}


@register_adapter
class HFSwinAdapter(HFAdapter):
    name = "hf-swin"
    description = ("Hugging Face SwinForImageClassification, SwinModel (the pooled embedding) (hf:DIR; window "
                   "attention, shifted windows, patch merging)")
    MODELS = MODELS

    def is_wrapped(self, model: Any) -> bool:
        return isinstance(self._parts(model)[1].encoder.layers[0].blocks[0], HFSwinLayer)

    def check(self, model: Any) -> None:
        from transformers.models.swin.modeling_swin import SwinAttention, SwinLayer, SwinMLP, SwinPatchMerging

        act = getattr(model.config, "hidden_act", None)
        if act != "gelu":
            raise ModelError(f"MLP activation {act!r} is not supported: hidden_act 'gelu' only")
        prefix, base, has_head = self._parts(model)
        for si, stage in enumerate(base.encoder.layers):
            if stage.downsample is not None:
                require_type(stage.downsample, (SwinPatchMerging,), "downsample",
                             at(prefix, f"encoder.layers.{si}.downsample"))
            for bi, blk in enumerate(stage.blocks):
                where = at(prefix, f"encoder.layers.{si}.blocks.{bi}")
                require_type(blk, (SwinLayer,), "Swin layer", where)
                require_type(blk.attention, (SwinAttention,), "window attention", where + ".attention")
                require_type(blk.mlp, (SwinMLP,), "MLP", where + ".mlp")
        if has_head and not isinstance(model.classifier, (nn.Linear, nn.Identity)):
            raise ModelError(f"classifier of type {type(model.classifier).__name__} is not supported: nn.Linear only")
        if not has_head and base.pooler is None:
            raise ModelError("a SwinModel built without its pooling layer has no image embedding to quantize for: "
                             "load it with add_pooling_layer=True (the default)")

    def wrap(self, model: Any) -> nn.Module:
        self.check(model)
        _, sw, has_head = self._parts(model)
        swap_conv(sw.embeddings.patch_embeddings, "projection", Role.PATCH_EMBED)
        swap_layernorm(sw.embeddings, "norm")
        swap_layernorm(sw, "layernorm")
        for stage in sw.encoder.layers:
            for blk in stage.blocks:
                mix_in(blk, HFSwinLayer)
                if "add1" not in blk._modules:
                    blk.add1, blk.add2 = QAdd(), QAdd()
                swap_layernorm(blk, "layernorm_before")
                swap_layernorm(blk, "layernorm_after")
                att = blk.attention
                if not isinstance(att, HFSwinAttention):
                    mix_in(att, HFSwinAttention)
                    att.init_core()
                for attr in ("q_proj", "k_proj", "v_proj"):
                    swap_linear(att, attr, Role.QKV_IN)
                swap_linear(att, "o_proj", Role.PROJ_IN)
                swap_linear(blk.mlp, "fc1", Role.FC1_IN)
                swap_linear(blk.mlp, "fc2", Role.FC2_IN)
            if stage.downsample is not None:
                swap_layernorm(stage.downsample, "norm")
                swap_linear(stage.downsample, "reduction", Role.REDUCTION_IN)
        if has_head and isinstance(model.classifier, nn.Linear):
            swap_linear(model, "classifier", Role.HEAD_IN)
        self.check_wrapped(model)
        return model

    def ln_consumers(self, model: Any) -> list[LNPair]:
        prefix, base, _ = self._parts(model)
        pairs = []
        for si, stage in enumerate(base.encoder.layers):
            for bi, _ in enumerate(stage.blocks):
                p = at(prefix, f"encoder.layers.{si}.blocks.{bi}")
                pairs.append(LNPair(f"{p}.layernorm_before",
                                    tuple(f"{p}.attention.{a}" for a in ("q_proj", "k_proj", "v_proj")), Role.QKV_IN))
                pairs.append(LNPair(f"{p}.layernorm_after", (f"{p}.mlp.fc1",), Role.FC1_IN))
            if stage.downsample is not None:
                d = at(prefix, f"encoder.layers.{si}.downsample")
                pairs.append(LNPair(f"{d}.norm", (f"{d}.reduction",), Role.REDUCTION_IN))
        return pairs

    def residual_streams(self, model: Any) -> list[ResidualStream]:
        """One stream per stage: stage 0's written by the patch-embedding norm (and the absolute
        position embedding if any), a later stage's by the previous stage's patch-merging reduction;
        within a stage by o_proj / fc2 of every layer. Read by layernorm_before / _after, and at the
        end of the stage by its patch merging's norm (the 2x2 neighbours concatenated: the channels
        4 times, channel fastest) or the final layernorm."""
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
                w += [StreamWriter(f"{p}.attention.o_proj", "rows"), StreamWriter(f"{p}.mlp.fc2", "rows")]
                r += [StreamReader(f"{p}.layernorm_before", "ln"), StreamReader(f"{p}.layernorm_after", "ln")]
            if stage.downsample is not None:
                d = at(prefix, f"encoder.layers.{si}.downsample")
                r.append(StreamReader(f"{d}.norm", "ln", tile=4))
                streams.append(ResidualStream(f"stage{len(streams)}", width, tuple(w), tuple(r)))
                w, r = [StreamWriter(f"{d}.reduction", "rows")], []
                width = int(stage.downsample.reduction.out_features)
        r.append(StreamReader(at(prefix, "layernorm"), "ln"))
        streams.append(ResidualStream(f"stage{len(streams)}", width, tuple(w), tuple(r)))
        return streams

    def chain(self, model: Any) -> list[Piece]:
        """embed (patch embedding + its norm) | per stage: per layer attn half, mlp half, then merge
        (patch merging; counted in the next stage, as timm's Swin places it) | head (final layernorm,
        average pooling, classifier)."""
        if not self.is_wrapped(model):
            self.wrap(model)
        _, sw, has_head = self._parts(model)
        grid = tuple(sw.embeddings.patch_grid)

        def embed(x: Tensor) -> Tensor:
            out, dims = sw.embeddings(x)
            if tuple(dims) != grid:
                raise ModelError(f"reconstruction of a Hugging Face Swin runs on {model.config.image_size}-pixel images "
                                 f"(the patch grid it was built for, {grid}), got a {tuple(dims)} grid: resize the inputs")
            return out

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
                    return blk.forward_attn(x, dims)

                pieces.append(Piece(f"{p}.attn", "attn", attn, (blk.layernorm_before, blk.attention, blk.add1),
                                    block=nblk, stage=si))
                pieces.append(Piece(f"{p}.mlp", "mlp", blk.forward_mlp, (blk.layernorm_after, blk.mlp, blk.add2),
                                    block=nblk, stage=si))
                nblk += 1
            if stage.downsample is not None:
                dims = tuple(stage.blocks[0].input_resolution)

                def merge(x: Tensor, ds: nn.Module = stage.downsample, dims: tuple[int, ...] = dims) -> Tensor:
                    return ds(x, dims)

                pieces.append(Piece(f"layers.{si}.downsample", "merge", merge, (stage.downsample,), stage=si + 1))
        pieces.append(Piece("head", "head", head, (sw.layernorm, model.classifier) if has_head else (sw.layernorm,)))
        return pieces
