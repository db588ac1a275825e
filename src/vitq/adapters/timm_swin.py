"""timm ``SwinTransformer`` (window attention with relative position bias, shifted windows,
patch merging)."""

from __future__ import annotations

from torch import nn

from ..errors import ModelError
from torch import Tensor

from ..nn import QSwinBlock, QWindowAttention
from ..roles import Role
from .base import (
    Adapter, LNPair, Piece, check_nothing_left, register_adapter, require_type, swap_conv, swap_layernorm,
    swap_linear,
)


@register_adapter
class TimmSwinAdapter(Adapter):
    name = "timm-swin"
    description = "timm SwinTransformer (Swin v1, any size: window attention, shifted windows, patch merging)"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from timm.models.swin_transformer import SwinTransformer

        return isinstance(model, SwinTransformer)

    def check(self, model: nn.Module) -> None:
        from timm.layers import Mlp
        from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock, WindowAttention

        for si, stage in enumerate(model.layers):
            ds = stage.downsample
            if not isinstance(ds, nn.Identity):
                require_type(ds, (PatchMerging,), "downsample", f"layers.{si}.downsample")
            for bi, blk in enumerate(stage.blocks):
                where = f"layers.{si}.blocks.{bi}"
                require_type(blk, (SwinTransformerBlock,), "Swin block", where)
                require_type(blk.attn, (WindowAttention, QWindowAttention), "window attention", where + ".attn")
                require_type(blk.mlp, (Mlp,), "MLP", where + ".mlp")
                if getattr(blk, "dynamic_mask", False):
                    raise ModelError(f"dynamic attention mask at {where} is not supported")
        fc = getattr(model.head, "fc", None)
        if not isinstance(fc, (nn.Linear, nn.Identity)):
            raise ModelError(f"Swin head fc of type {type(fc).__name__} is not supported: nn.Linear only")

    def wrap(self, model: nn.Module) -> nn.Module:
        self.check(model)
        swap_conv(model.patch_embed, "proj", Role.PATCH_EMBED)
        swap_layernorm(model.patch_embed, "norm")
        swap_layernorm(model, "norm")
        for stage in model.layers:
            if not isinstance(stage.downsample, nn.Identity):
                swap_linear(stage.downsample, "reduction", Role.REDUCTION_IN)
                swap_layernorm(stage.downsample, "norm")
            for blk in stage.blocks:
                QSwinBlock.from_float(blk)
                swap_layernorm(blk, "norm1")
                swap_layernorm(blk, "norm2")
                if not isinstance(blk.attn, QWindowAttention):
                    blk.attn = QWindowAttention(blk.attn)
                swap_linear(blk.attn, "qkv", Role.QKV_IN)
                swap_linear(blk.attn, "proj", Role.PROJ_IN)
                swap_linear(blk.mlp, "fc1", Role.FC1_IN)
                swap_linear(blk.mlp, "fc2", Role.FC2_IN)
        if isinstance(getattr(model.head, "fc", None), nn.Linear):
            swap_linear(model.head, "fc", Role.HEAD_IN)
        check_nothing_left(model)
        return model

    def ln_consumers(self, model: nn.Module) -> list[LNPair]:
        pairs = []
        for si, stage in enumerate(model.layers):
            if not isinstance(stage.downsample, nn.Identity):
                pairs.append(LNPair(f"layers.{si}.downsample.norm", (f"layers.{si}.downsample.reduction",),
                                    Role.REDUCTION_IN))
            for bi, _ in enumerate(stage.blocks):
                p = f"layers.{si}.blocks.{bi}"
                pairs.append(LNPair(f"{p}.norm1", (f"{p}.attn.qkv",), Role.QKV_IN))
                pairs.append(LNPair(f"{p}.norm2", (f"{p}.mlp.fc1",), Role.FC1_IN))
        return pairs

    def chain(self, model: nn.Module) -> list[Piece]:
        """embed (patch embed) | per stage: merge (patch merging), then per block: attn half, mlp
        half | head (final norm, pooling, fc)."""
        if not getattr(model, "vitq_wrapped", False) and not isinstance(model.layers[0].blocks[0], QSwinBlock):
            self.wrap(model)

        def head(x: Tensor) -> Tensor:
            return model.forward_head(model.norm(x))

        pieces = [Piece("embed", "embed", model.patch_embed, (model.patch_embed,))]
        nblk = 0
        for si, stage in enumerate(model.layers):
            if not isinstance(stage.downsample, nn.Identity):
                pieces.append(Piece(f"layers.{si}.downsample", "merge", stage.downsample, (stage.downsample,),
                                    stage=si))
            for bi, blk in enumerate(stage.blocks):
                p = f"layers.{si}.blocks.{bi}"
                pieces.append(Piece(f"{p}.attn", "attn", blk.forward_attn, (blk.norm1, blk.attn, blk.add1),
                                    block=nblk, stage=si))
                pieces.append(Piece(f"{p}.mlp", "mlp", blk.forward_mlp, (blk.norm2, blk.mlp, blk.add2),
                                    block=nblk, stage=si))
                nblk += 1
        pieces.append(Piece("head", "head", head, (model.norm, model.head)))
        return pieces
