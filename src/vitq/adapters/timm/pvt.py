"""timm ``PyramidVisionTransformerV2`` (PVTv2: overlapping patch embeddings, spatial-reduction attention, an MLP with
a depthwise 3x3 conv, four stages).

* :class:`TokenConv` takes over the attention's spatial-reduction conv (``sr``: kernel = stride = sr_ratio, no
  padding). It reads norm1's output *as tokens* - the same tensor, in the same layout, as ``q`` - so its input
  quantizer is channel-last like q's: RepQ-ViT / MOSF fold norm1 into q and sr together (one quantizer rule for both
  consumers, :func:`~vitq.passes.reparam.fold_ln_affine`'s unpadded-conv case), and the reduced tokens' own
  LayerNorm (``attn.norm``) into kv.
* :class:`TimmPvtAttention` is mixed into PVTv2's ``Attention``: q from the tokens, k / v from the reduced tokens,
  through the :class:`~vitq.nn.QAttentionCore` in timm's non-fused order.
* :class:`TimmPvtBlock` is mixed into ``Block``: residual adds as QAdd, the forward in two halves on ``(B, H, W, C)``
  (the chain's layout) as well as on tokens with the feature size (the library's).
* The MLP's depthwise conv reads fc1's output before the activation: role DWCONV_IN (NCHW: per-tensor by the
  recipes' ``act:*`` rule). The stages' overlapping patch embeddings (3x3 convs, stride 2, padded) are PATCH_EMBED
  convs: their weights quantized, their inputs float as the first patch embedding's (a padded conv cannot take an
  exact LayerNorm fold, and the recipes keep a patch embedding's input float).

The linear-attention variant (``linear=True``: pooling, a 1x1 conv and a GELU before kv) is refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from torch import Tensor, nn

from ...data import PreprocessConfig
from ...errors import ModelError
from ...nn import QAdd, QAttentionCore, QConv2d
from ...nn.modules import quantized_weight
from ...roles import Role
from ..base import (
    LNPair,
    Piece,
    ResidualStream,
    StreamReader,
    StreamWriter,
    mix_in,
    mixed_class,
    register_adapter,
    require_type,
    swap_conv,
    swap_layernorm,
    swap_linear,
)
from . import TimmAdapter, timm_data_config
from .vit import gelu_like


class TokenConv(QConv2d):
    """A conv applied to tokens ``(B, H*W, C)`` of a ``feat_size`` grid, returning tokens: its input quantizer sees
    the channel-last tokens (as a Linear's does), the conv runs on ``(B, C, H, W)`` with its quantized weight, as timm
    computes it."""

    tokens_out = True  # the output's channel axis is the last (PTQ4ViT's per-channel search reads it)

    def forward(self, x: Tensor, feat_size: Sequence[int] = ()) -> Tensor:  # type: ignore[override]
        B, N, C = x.shape
        if self.input_quant is not None:
            x = self.input_quant(x)
        x = x.permute(0, 2, 1).reshape(B, C, int(feat_size[0]), int(feat_size[1]))
        y = self._conv_forward(x, quantized_weight(self), self.bias)
        return y.reshape(B, y.shape[1], -1).permute(0, 2, 1)


def token_conv(conv: nn.Conv2d, role: Role) -> TokenConv:
    q = QConv2d.from_float(conv, role)
    q.__class__ = TokenConv
    return q  # type: ignore[return-value]


class TimmPvtAttention(QAttentionCore):
    """Mixed into timm's PVTv2 ``Attention`` (spatial reduction through a :class:`TokenConv`)."""

    if TYPE_CHECKING:  # mixed into a library's module: its attributes are the library's, untyped here
        def __getattr__(self, name: str) -> Any: ...

    def forward(self, x: Tensor, feat_size: Sequence[int]) -> Tensor:
        B, N, C = x.shape
        q = self.q(x).reshape(B, N, self.num_heads, -1).permute(0, 2, 1, 3)
        if self.sr is not None:
            x = self.norm(self.sr(x, feat_size))
        k, v = self.kv(x).reshape(B, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = self.attend(q, k, v, self.scale, dropout=self.attn_drop)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))  # type: ignore[no-any-return]


class TimmPvtBlock(nn.Module):
    """Mixed into timm's PVTv2 ``Block``."""

    if TYPE_CHECKING:  # mixed into a library's module: its attributes are the library's, untyped here
        def __getattr__(self, name: str) -> Any: ...

    add1: QAdd
    add2: QAdd

    def attn_tokens(self, x: Tensor, feat_size: Sequence[int]) -> Tensor:
        return self.add1(x, self.drop_path1(self.attn(self.norm1(x), feat_size)))

    def mlp_tokens(self, x: Tensor, feat_size: Sequence[int]) -> Tensor:
        return self.add2(x, self.drop_path2(self.mlp(self.norm2(x), feat_size)))

    def forward(self, x: Tensor, feat_size: Sequence[int]) -> Tensor:
        return self.mlp_tokens(self.attn_tokens(x, feat_size), feat_size)

    def forward_attn(self, x: Tensor) -> Tensor:
        """The attention half on ``(B, H, W, C)`` (the chain's layout)."""
        B, H, W, C = x.shape
        return self.attn_tokens(x.reshape(B, -1, C), (H, W)).reshape(B, H, W, C)

    def forward_mlp(self, x: Tensor) -> Tensor:
        B, H, W, C = x.shape
        return self.mlp_tokens(x.reshape(B, -1, C), (H, W)).reshape(B, H, W, C)


def _to_nchw(x: Tensor) -> Tensor:
    return x.permute(0, 3, 1, 2).contiguous()


@register_adapter
class TimmPvtAdapter(TimmAdapter):
    name = "timm-pvt-v2"
    description = ("timm PyramidVisionTransformerV2 (PVTv2: spatial-reduction attention, depthwise-conv MLP, overlapping "
                   "patch embeddings)")

    @classmethod
    def matches(cls, model: Any) -> bool:
        from timm.models.pvt_v2 import PyramidVisionTransformerV2

        return isinstance(model, PyramidVisionTransformerV2)

    def data_config(self, model: Any) -> PreprocessConfig:
        return timm_data_config(model, int(model.patch_embed.proj.in_channels), None)  # any size (a multiple of 32)

    def accepts_input_size(self, model: Any, hw: tuple[int, int]) -> bool:
        return hw[0] % 32 == 0 and hw[1] % 32 == 0  # four stages: stride 4, then 2, 2, 2

    def is_wrapped(self, model: Any) -> bool:
        return isinstance(model.stages[0].blocks[0], TimmPvtBlock)

    def check(self, model: Any) -> None:
        from timm.models.pvt_v2 import Attention, Block, MlpWithDepthwiseConv, OverlapPatchEmbed

        require_type(model.patch_embed, (OverlapPatchEmbed,), "patch embedding", "patch_embed")
        for si, stage in enumerate(model.stages):
            if stage.downsample is not None:
                require_type(stage.downsample, (OverlapPatchEmbed,), "downsample", f"stages.{si}.downsample")
            for bi, blk in enumerate(stage.blocks):
                where = f"stages.{si}.blocks.{bi}"
                require_type(blk, (Block,), "PVTv2 block", where)
                require_type(blk.attn, (Attention,), "attention", where + ".attn")
                if blk.attn.pool is not None:
                    raise ModelError(f"{where}.attn is linear attention (PVTv2-Li: pooling, a 1x1 conv and a GELU before "
                                     "k / v): not supported yet")
                require_type(blk.mlp, (MlpWithDepthwiseConv,), "MLP", where + ".mlp")
                if not isinstance(blk.mlp.act, gelu_like()):
                    raise ModelError(f"MLP activation {type(blk.mlp.act).__name__} at {where}.mlp is not supported: the "
                                     "post-GELU quantizers assume GELU's range")
        if not isinstance(model.head, (nn.Linear, nn.Identity)):
            raise ModelError(f"head of type {type(model.head).__name__} is not supported: nn.Linear only")

    def wrap(self, model: Any) -> nn.Module:
        self.check(model)
        swap_conv(model.patch_embed, "proj", Role.PATCH_EMBED)
        swap_layernorm(model.patch_embed, "norm")
        for stage in model.stages:
            if stage.downsample is not None:
                swap_conv(stage.downsample, "proj", Role.PATCH_EMBED)
                swap_layernorm(stage.downsample, "norm")
            swap_layernorm(stage, "norm")
            for blk in stage.blocks:
                mix_in(blk, TimmPvtBlock)
                if "add1" not in blk._modules:
                    blk.add1, blk.add2 = QAdd(), QAdd()
                swap_layernorm(blk, "norm1")
                swap_layernorm(blk, "norm2")
                att = blk.attn
                if not isinstance(att, TimmPvtAttention):
                    mix_in(att, TimmPvtAttention)
                    att.init_core()
                swap_linear(att, "q", Role.QKV_IN)
                swap_linear(att, "kv", Role.QKV_IN)
                swap_linear(att, "proj", Role.PROJ_IN)
                if att.sr is not None and not isinstance(att.sr, TokenConv):
                    att.sr = token_conv(att.sr, Role.QKV_IN)
                    swap_layernorm(att, "norm")
                swap_linear(blk.mlp, "fc1", Role.FC1_IN)
                swap_conv(blk.mlp, "dwconv", Role.DWCONV_IN)
                swap_linear(blk.mlp, "fc2", Role.FC2_IN)
        if isinstance(model.head, nn.Linear):
            swap_linear(model, "head", Role.HEAD_IN)
        self.check_wrapped(model)
        return model

    def ln_consumers(self, model: Any) -> list[LNPair]:
        """norm1 -> q and the spatial reduction (both read its output as tokens) or q and kv (no reduction); the
        reduced tokens' norm -> kv; norm2 -> fc1."""
        pairs = []
        for si, stage in enumerate(model.stages):
            for bi, blk in enumerate(stage.blocks):
                p = f"stages.{si}.blocks.{bi}"
                if blk.attn.sr is not None:
                    pairs.append(LNPair(f"{p}.norm1", (f"{p}.attn.q", f"{p}.attn.sr"), Role.QKV_IN))
                    pairs.append(LNPair(f"{p}.attn.norm", (f"{p}.attn.kv",), Role.QKV_IN))
                else:
                    pairs.append(LNPair(f"{p}.norm1", (f"{p}.attn.q", f"{p}.attn.kv"), Role.QKV_IN))
                pairs.append(LNPair(f"{p}.norm2", (f"{p}.mlp.fc1",), Role.FC1_IN))
        return pairs

    def residual_streams(self, model: Any) -> list[ResidualStream]:
        """One stream per stage: written by the stage's patch-embedding norm and every block's attn.proj / mlp.fc2;
        read by norm1 / norm2 and the stage's final norm."""
        streams = []
        for si, stage in enumerate(model.stages):
            emb = "patch_embed" if stage.downsample is None else f"stages.{si}.downsample"
            w = [StreamWriter(f"{emb}.norm", "affine")]
            r: list[StreamReader] = []
            for bi, _ in enumerate(stage.blocks):
                p = f"stages.{si}.blocks.{bi}"
                w += [StreamWriter(f"{p}.attn.proj", "rows"), StreamWriter(f"{p}.mlp.fc2", "rows")]
                r += [StreamReader(f"{p}.norm1", "ln"), StreamReader(f"{p}.norm2", "ln")]
            r.append(StreamReader(f"stages.{si}.norm", "ln"))
            width = int(stage.blocks[0].norm1.normalized_shape[0])
            streams.append(ResidualStream(f"stage{si}", width, tuple(w), tuple(r)))
        return streams

    def chain(self, model: Any) -> list[Piece]:
        """embed (the first patch embedding) | per stage: attn half, mlp half of every block, then merge (the stage's
        norm and the next stage's patch embedding) | head (the last stage's norm, pooling, head). Pieces pass
        ``(B, H, W, C)``."""
        if not self.is_wrapped(model):
            self.wrap(model)
        stages = list(model.stages)
        pieces = [Piece("embed", "embed", model.patch_embed, (model.patch_embed,))]
        nblk = 0
        for si, stage in enumerate(stages):
            for bi, blk in enumerate(stage.blocks):
                p = f"stages.{si}.blocks.{bi}"
                pieces.append(Piece(f"{p}.attn", "attn", blk.forward_attn, (blk.norm1, blk.attn, blk.add1),
                                    block=nblk, stage=si))
                pieces.append(Piece(f"{p}.mlp", "mlp", blk.forward_mlp, (blk.norm2, blk.mlp, blk.add2),
                                    block=nblk, stage=si))
                nblk += 1
            if si + 1 < len(stages):
                nxt = stages[si + 1]

                def merge(x: Tensor, norm: nn.Module = stage.norm, ds: nn.Module = nxt.downsample) -> Tensor:
                    return ds(_to_nchw(norm(x)))  # type: ignore[no-any-return]

                pieces.append(Piece(f"stages.{si + 1}.downsample", "merge", merge, (stage.norm, nxt.downsample),
                                    stage=si + 1))

        def head(x: Tensor) -> Tensor:
            return model.forward_head(_to_nchw(stages[-1].norm(x)))  # type: ignore[no-any-return]

        pieces.append(Piece("head", "head", head, (stages[-1].norm, model.head)))
        return pieces


def _predefine() -> None:
    # the mixed classes exist at import, so that pickled / deep-copied models find them by name
    from timm.models.pvt_v2 import Attention, Block

    mixed_class(Block, TimmPvtBlock)
    mixed_class(Attention, TimmPvtAttention)


_predefine()
