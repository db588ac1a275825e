"""timm ``VisionTransformerRelPos`` (ViTs with a relative position bias instead of a position embedding:
``vit_relpos_*``, ``vit_srelpos_*`` with one bias shared by every block, ``*_rpn_*`` with residual post-norm blocks).

* :class:`TimmRelPosAttention` is mixed into ``RelPosAttention``: attention through the
  :class:`~vitq.nn.QAttentionCore` in timm's non-fused order, the block's relative position bias (``RelPosMlp``: a
  small MLP on log-spaced coordinates; ``RelPosBias``: a table) or the model's shared one added to the scores before
  the softmax. The bias reads constant coordinates, not the image: it stays float (its MLP's Linears are kept float
  by name, no quantization site), as Swin V2's continuous position bias does.
* :class:`TimmRelPosBlock` is mixed into ``RelPosBlock`` (pre-norm, LayerScale ``ls1`` / ``ls2``) and
  ``ResPostRelPosBlock`` (``x + norm1(attn(x))``): residual adds as QAdd, the forward in two halves.

Pre-norm blocks give the usual LayerNorm -> Linear pairs; post-norm blocks none (RepQ-ViT / MOSF say so), and their
stream is balanced between the post-norms that write it and the q / k / v and fc1 columns that read it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional

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
    mixed_class,
    register_adapter,
    require_type,
    swap_conv,
    swap_layernorm,
    swap_linear,
)
from . import TimmAdapter
from .vit import gelu_like

#: sub-modules that stay float: they compute the position bias from constant coordinates
FLOAT_MODULES = ("rel_pos", "shared_rel_pos")


class TimmRelPosAttention(QAttentionCore):
    """Mixed into timm's ``RelPosAttention``."""

    if TYPE_CHECKING:  # mixed into a library's module: its attributes are the library's, untyped here
        def __getattr__(self, name: str) -> Any: ...

    def forward(self, x: Tensor, shared_rel_pos: Optional[Tensor] = None) -> Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.rel_pos.get_bias() if self.rel_pos is not None else shared_rel_pos
        x = self.attend(q, k, v, self.scale, bias=bias, dropout=self.attn_drop)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))  # type: ignore[no-any-return]


class TimmRelPosBlock(nn.Module):
    """Mixed into timm's ``RelPosBlock`` and ``ResPostRelPosBlock``."""

    if TYPE_CHECKING:  # mixed into a library's module: its attributes are the library's, untyped here
        def __getattr__(self, name: str) -> Any: ...

    add1: QAdd
    add2: QAdd

    @property
    def post_norm(self) -> bool:
        return not hasattr(self, "ls1")

    def forward_attn(self, x: Tensor, shared_rel_pos: Optional[Tensor] = None) -> Tensor:
        if self.post_norm:
            return self.add1(x, self.drop_path1(self.norm1(self.attn(x, shared_rel_pos=shared_rel_pos))))
        return self.add1(x, self.drop_path1(self.ls1(self.attn(self.norm1(x), shared_rel_pos=shared_rel_pos))))

    def forward_mlp(self, x: Tensor) -> Tensor:
        if self.post_norm:
            return self.add2(x, self.drop_path2(self.norm2(self.mlp(x))))
        return self.add2(x, self.drop_path2(self.ls2(self.mlp(self.norm2(x)))))

    def forward(self, x: Tensor, shared_rel_pos: Optional[Tensor] = None) -> Tensor:
        return self.forward_mlp(self.forward_attn(x, shared_rel_pos=shared_rel_pos))


def _shared(model: Any) -> Optional[Tensor]:
    return model.shared_rel_pos.get_bias() if model.shared_rel_pos is not None else None


def _post_norm(model: Any) -> bool:
    from timm.models.vision_transformer_relpos import ResPostRelPosBlock

    return len(model.blocks) > 0 and isinstance(model.blocks[0], ResPostRelPosBlock)


@register_adapter
class TimmRelPosAdapter(TimmAdapter):
    name = "timm-relpos"
    description = ("timm VisionTransformerRelPos (relative position bias per block or shared, kept float; pre-norm "
                   "or residual post-norm blocks)")

    @classmethod
    def matches(cls, model: Any) -> bool:
        from timm.models.vision_transformer_relpos import VisionTransformerRelPos

        return isinstance(model, VisionTransformerRelPos)

    def is_wrapped(self, model: Any) -> bool:
        return len(model.blocks) > 0 and isinstance(model.blocks[0], TimmRelPosBlock)

    def check(self, model: Any) -> None:
        from timm.layers import Mlp, PatchEmbed
        from timm.models.vision_transformer_relpos import RelPosAttention, RelPosBlock, ResPostRelPosBlock

        if not isinstance(model.patch_embed, PatchEmbed):
            raise ModelError(f"patch embedding {type(model.patch_embed).__name__} is not supported: a plain patch "
                             "embedding only")
        kinds = set()
        for i, blk in enumerate(model.blocks):
            require_type(blk, (RelPosBlock, ResPostRelPosBlock), "transformer block", f"blocks.{i}")
            kinds.add(isinstance(blk, ResPostRelPosBlock))
            require_type(blk.attn, (RelPosAttention,), "attention", f"blocks.{i}.attn")
            if not (isinstance(blk.attn.q_norm, nn.Identity) and isinstance(blk.attn.k_norm, nn.Identity)):
                raise ModelError(f"blocks.{i}.attn normalizes q and k (qk_norm): not supported yet")
            require_type(blk.mlp, (Mlp,), "MLP", f"blocks.{i}.mlp")
            if not isinstance(blk.mlp.act, gelu_like()):
                raise ModelError(f"MLP activation {type(blk.mlp.act).__name__} at blocks.{i}.mlp is not supported: the "
                                 "post-GELU quantizers assume GELU's range (GELU, GELU-tanh and QuickGELU are taken)")
        if len(kinds) > 1:
            raise ModelError("pre-norm and post-norm blocks in one model are not supported")
        if not isinstance(model.patch_embed.norm, nn.Identity):
            raise ModelError("a normalized patch embedding (patch_embed.norm) is not supported yet")
        if not isinstance(model.head, (nn.Linear, nn.Identity)):
            raise ModelError(f"head of type {type(model.head).__name__} is not supported: nn.Linear only")

    def wrap(self, model: Any) -> nn.Module:
        self.check(model)
        swap_conv(model.patch_embed, "proj", Role.PATCH_EMBED)
        for attr in ("norm", "fc_norm"):
            swap_layernorm(model, attr)
        for blk in model.blocks:
            mix_in(blk, TimmRelPosBlock)
            if "add1" not in blk._modules:
                blk.add1, blk.add2 = QAdd(), QAdd()
            swap_layernorm(blk, "norm1")
            swap_layernorm(blk, "norm2")
            if not isinstance(blk.attn, TimmRelPosAttention):
                mix_in(blk.attn, TimmRelPosAttention)
                blk.attn.init_core()
            swap_linear(blk.attn, "qkv", Role.QKV_IN)
            swap_linear(blk.attn, "proj", Role.PROJ_IN)
            swap_linear(blk.mlp, "fc1", Role.FC1_IN)
            swap_linear(blk.mlp, "fc2", Role.FC2_IN)
        if isinstance(model.head, nn.Linear):
            swap_linear(model, "head", Role.HEAD_IN)
        self.check_wrapped(model)
        return model

    def float_parts(self, model: Any) -> list[tuple[str, str]]:
        return float_modules(model, FLOAT_MODULES, "the relative position bias: it reads constant coordinates, not the image")

    def ln_consumers(self, model: Any) -> list[LNPair]:
        if _post_norm(model):  # the post-norms write the stream: no LayerNorm output meets a Linear
            return []
        pairs = []
        for i, _ in enumerate(model.blocks):
            pairs.append(LNPair(f"blocks.{i}.norm1", (f"blocks.{i}.attn.qkv",), Role.QKV_IN))
            pairs.append(LNPair(f"blocks.{i}.norm2", (f"blocks.{i}.mlp.fc1",), Role.FC1_IN))
        return pairs

    def residual_streams(self, model: Any) -> list[ResidualStream]:
        """One stream: the patch projection's rows and the class token, then per block attn.proj / mlp.fc2 (pre-norm;
        the LayerScale is per channel) or the post-norms norm1 / norm2; read by norm1 / norm2 (pre-norm) or the qkv /
        fc1 columns (post-norm), and at the end by the final norm, fc_norm after pooling, or the head's columns."""
        post = _post_norm(model)
        w: list[StreamWriter] = [StreamWriter("patch_embed.proj", "rows")]
        if isinstance(getattr(model, "cls_token", None), nn.Parameter):
            w.append(StreamWriter("cls_token", "param"))
        r: list[StreamReader] = []
        for i, _ in enumerate(model.blocks):
            p = f"blocks.{i}"
            if post:
                w += [StreamWriter(f"{p}.norm1", "affine"), StreamWriter(f"{p}.norm2", "affine")]
                r += [StreamReader(f"{p}.attn.qkv", "cols"), StreamReader(f"{p}.mlp.fc1", "cols")]
            else:
                w += [StreamWriter(f"{p}.attn.proj", "rows"), StreamWriter(f"{p}.mlp.fc2", "rows")]
                r += [StreamReader(f"{p}.norm1", "ln"), StreamReader(f"{p}.norm2", "ln")]
        if isinstance(model.norm, nn.LayerNorm):
            r.append(StreamReader("norm", "ln"))
        elif isinstance(model.fc_norm, nn.LayerNorm):
            r.append(StreamReader("fc_norm", "ln"))
        elif isinstance(model.head, nn.Linear):
            r.append(StreamReader("head", "cols"))
        else:
            raise ModelError("the residual stream is the model output (no final norm, no head): Add_alpha cannot undo it")
        return [ResidualStream("stream", int(model.embed_dim), tuple(w), tuple(r))]

    def chain(self, model: Any) -> list[Piece]:
        """embed (patch embed, class token) | per block: attn half (with the shared relative position bias), mlp half |
        head (final norm, pooling, fc_norm, head)."""
        if not self.is_wrapped(model):
            self.wrap(model)

        def embed(x: Tensor) -> Tensor:
            import torch

            x = model.patch_embed(x)
            if model.cls_token is not None:
                x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
            return x  # type: ignore[no-any-return]

        def head(x: Tensor) -> Tensor:
            return model.forward_head(model.norm(x))  # type: ignore[no-any-return]

        def attn_half(blk: Any) -> Callable[[Tensor], Tensor]:
            return lambda x: blk.forward_attn(x, shared_rel_pos=_shared(model))  # type: ignore[no-any-return]

        pieces = [Piece("embed", "embed", embed, (model.patch_embed,))]
        for i, blk in enumerate(model.blocks):
            pieces.append(Piece(f"blocks.{i}.attn", "attn", attn_half(blk), (blk.norm1, blk.attn, blk.add1), block=i))
            pieces.append(Piece(f"blocks.{i}.mlp", "mlp", blk.forward_mlp, (blk.norm2, blk.mlp, blk.add2), block=i))
        pieces.append(Piece("head", "head", head, tuple(m for m in (model.norm, model.fc_norm, model.head)
                                                        if isinstance(m, nn.Module))))
        return pieces


def _predefine() -> None:
    # the mixed classes exist at import, so that pickled / deep-copied models find them by name
    from timm.models.vision_transformer_relpos import RelPosAttention, RelPosBlock, ResPostRelPosBlock

    mixed_class(RelPosBlock, TimmRelPosBlock)
    mixed_class(ResPostRelPosBlock, TimmRelPosBlock)
    mixed_class(RelPosAttention, TimmRelPosAttention)


_predefine()
