"""timm ``VisionTransformer`` (ViT, DeiT) and ``VisionTransformerDistilled`` (DeiT with
distillation token)."""

from __future__ import annotations

from torch import nn

from ..errors import ModelError
from ..nn import QAttention
from ..roles import Role
from .base import Adapter, LNPair, check_nothing_left, register_adapter, require_type, swap_conv, swap_linear


@register_adapter
class TimmViTAdapter(Adapter):
    name = "timm-vit"
    description = ("timm VisionTransformer (ViT / DeiT, any size) and VisionTransformerDistilled "
                   "(DeiT with distillation token), global pool token/avg")

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from timm.models.vision_transformer import VisionTransformer

        return isinstance(model, VisionTransformer)

    def check(self, model: nn.Module) -> None:
        from timm.layers import Mlp
        from timm.layers.attention import Attention
        from timm.models.vision_transformer import Block

        if getattr(model, "attn_pool", None) is not None:
            raise ModelError("attention-pooling head (global_pool='map') is not supported: use 'token' or 'avg'")
        for i, blk in enumerate(model.blocks):
            require_type(blk, (Block,), "transformer block", f"blocks.{i}")
            require_type(blk.attn, (Attention, QAttention), "attention", f"blocks.{i}.attn")
            require_type(blk.mlp, (Mlp,), "MLP", f"blocks.{i}.mlp")
            if getattr(blk.attn, "gate", None) is not None:
                raise ModelError(f"gated attention at blocks.{i}.attn is not supported")
            if not isinstance(blk.mlp.act, nn.GELU):
                raise ModelError(f"MLP activation {type(blk.mlp.act).__name__} at blocks.{i}.mlp is not supported: GELU only")
        head = getattr(model, "head", None)
        if not isinstance(head, (nn.Linear, nn.Identity)):
            raise ModelError(f"head of type {type(head).__name__} is not supported: nn.Linear only")

    def wrap(self, model: nn.Module) -> nn.Module:
        self.check(model)
        swap_conv(model.patch_embed, "proj", Role.PATCH_EMBED)
        for blk in model.blocks:
            if not isinstance(blk.attn, QAttention):
                blk.attn = QAttention(blk.attn)
            swap_linear(blk.attn, "qkv", Role.QKV_IN)
            swap_linear(blk.attn, "proj", Role.PROJ_IN)
            swap_linear(blk.mlp, "fc1", Role.FC1_IN)
            swap_linear(blk.mlp, "fc2", Role.FC2_IN)
        for head in ("head", "head_dist"):
            if isinstance(getattr(model, head, None), nn.Linear):
                swap_linear(model, head, Role.HEAD_IN)
        check_nothing_left(model)
        return model

    def ln_consumers(self, model: nn.Module) -> list[LNPair]:
        pairs = []
        for i, _ in enumerate(model.blocks):
            pairs.append(LNPair(f"blocks.{i}.norm1", (f"blocks.{i}.attn.qkv",), Role.QKV_IN))
            pairs.append(LNPair(f"blocks.{i}.norm2", (f"blocks.{i}.mlp.fc1",), Role.FC1_IN))
        return pairs
