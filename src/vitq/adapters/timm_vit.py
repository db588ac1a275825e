"""timm ``VisionTransformer`` (ViT, DeiT) and ``VisionTransformerDistilled`` (DeiT with
distillation token)."""

from __future__ import annotations

from torch import Tensor, nn

from ..errors import ModelError
from ..nn import QAttention, QBlock
from ..roles import Role
from .base import (
    Adapter,
    LNPair,
    Piece,
    ResidualStream,
    StreamReader,
    StreamWriter,
    check_nothing_left,
    register_adapter,
    require_type,
    swap_conv,
    swap_layernorm,
    swap_linear,
)


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
        for attr in ("norm_pre", "norm", "fc_norm"):
            swap_layernorm(model, attr)
        for blk in model.blocks:
            QBlock.from_float(blk)
            swap_layernorm(blk, "norm1")
            swap_layernorm(blk, "norm2")
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

    def residual_streams(self, model: nn.Module) -> list[ResidualStream]:
        """One stream: written by the embedding (norm_pre if it is a LayerNorm; else the patch
        embedding's norm or conv, plus the prefix tokens and position embedding) and by attn.proj /
        mlp.fc2 of every block; read by norm1 / norm2 and the final norm (fc_norm, or the heads'
        columns, when the final norm is absent)."""
        w: list[StreamWriter] = []
        if isinstance(model.norm_pre, nn.LayerNorm):
            w.append(StreamWriter("norm_pre", "affine"))
        else:
            pe_norm = getattr(model.patch_embed, "norm", None)
            if isinstance(pe_norm, nn.LayerNorm):
                w.append(StreamWriter("patch_embed.norm", "affine"))
            elif isinstance(pe_norm, (nn.Identity, type(None))):
                w.append(StreamWriter("patch_embed.proj", "rows"))
            else:
                raise ModelError(f"patch-embedding norm {type(pe_norm).__name__} is not supported by Add_alpha")
            for tok in ("cls_token", "reg_token", "dist_token", "pos_embed"):
                if isinstance(getattr(model, tok, None), nn.Parameter):
                    w.append(StreamWriter(tok, "param"))
        r: list[StreamReader] = []
        for i, _ in enumerate(model.blocks):
            w += [StreamWriter(f"blocks.{i}.attn.proj", "rows"), StreamWriter(f"blocks.{i}.mlp.fc2", "rows")]
            r += [StreamReader(f"blocks.{i}.norm1", "ln"), StreamReader(f"blocks.{i}.norm2", "ln")]
        # pooling (class token / average / max) commutes with a positive per-channel scale
        if isinstance(model.norm, nn.LayerNorm):
            r.append(StreamReader("norm", "ln"))
        elif isinstance(model.fc_norm, nn.LayerNorm):
            r.append(StreamReader("fc_norm", "ln"))
        else:
            heads = [h for h in ("head", "head_dist") if isinstance(getattr(model, h, None), nn.Linear)]
            if not heads:
                raise ModelError("the residual stream is the model output (no final norm, no head): Add_alpha cannot undo it")
            r += [StreamReader(h, "cols") for h in heads]
        return [ResidualStream("stream", int(model.embed_dim), tuple(w), tuple(r))]

    def chain(self, model: nn.Module) -> list[Piece]:
        """embed (patch embed, position embedding, norm_pre) | per block: attn half, mlp half |
        head (final norm, pooling, fc_norm, head / head_dist)."""
        if not getattr(model, "vitq_wrapped", False) and not isinstance(model.blocks[0], QBlock):
            self.wrap(model)

        def embed(x: Tensor) -> Tensor:
            x = model.patch_embed(x)
            x = model._pos_embed(x)
            x = model.patch_drop(x)
            return model.norm_pre(x)

        def head(x: Tensor) -> Tensor:
            return model.forward_head(model.norm(x))

        embed_mods = tuple(m for m in (model.patch_embed, model.norm_pre) if isinstance(m, nn.Module))
        pieces = [Piece("embed", "embed", embed, embed_mods)]
        for i, blk in enumerate(model.blocks):
            pieces.append(Piece(f"blocks.{i}.attn", "attn", blk.forward_attn, (blk.norm1, blk.attn, blk.ls1, blk.add1),
                                block=i))
            pieces.append(Piece(f"blocks.{i}.mlp", "mlp", blk.forward_mlp, (blk.norm2, blk.mlp, blk.ls2, blk.add2),
                                block=i))
        head_mods = tuple(m for m in (model.norm, model.fc_norm, model.head, getattr(model, "head_dist", None))
                          if isinstance(m, nn.Module))
        pieces.append(Piece("head", "head", head, head_mods))
        return pieces
