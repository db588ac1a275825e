"""timm ``Cait`` (CaiT: talking-heads self-attention blocks, then class-attention blocks; LayerScale everywhere).

* :class:`TimmTalkingHeadAttention` is mixed into ``TalkingHeadAttn``: q kᵀ through the core's ``matmul_qk``, the
  scores mixed across heads by ``proj_l`` before the softmax and the probabilities by ``proj_w`` after it, then
  ``matmul_av``. The two head-mixing Linears (heads x heads, about 1 % of a block's multiply-adds) stay float: the
  mixed weights are signed and no longer probabilities, so the operand of ``attn @ v`` is the site
  ``ATTN_MIXED`` (quantized uniformly by the recipes' activation rule), not ``ATTN_PROBS``: a post-Softmax
  quantizer (log2, TanQ, twin uniform) has no softmax output to act on in these blocks.
* :class:`TimmClassAttention` is mixed into ``ClassAttn``: the class token's q against every token's k, v through the
  core (its softmax output *is* a probability: ``ATTN_PROBS``, so TanQ / log2 apply).
* :class:`TimmCaitBlock` / :class:`TimmCaitClassBlock` are mixed into ``LayerScaleBlock`` /
  ``LayerScaleBlockClassAttn``: residual adds as QAdd, the forward in two halves. A class-attention block updates only
  the class token; its halves take and return ``cat(class token, patch tokens)``, so the reconstruction chain is one
  tensor from end to end.

norm1 -> qkv and norm2 -> fc1 in the self-attention blocks, norm1 -> q / k / v and norm2 -> fc1 in the class-attention
blocks are the LayerNorm -> Linear pairs (RepQ-ViT / MOSF). One residual stream: the patch tokens and the class token
are concatenated into every class-attention block's norm1, so they share a channel scaling (Add_alpha).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import Tensor, nn

from ...errors import ModelError
from ...nn import QAdd, QAttentionCore
from ...nn.modules import QMatMul
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

#: sub-modules that stay float: the talking heads' mixing across heads (heads x heads Linears)
FLOAT_MODULES = ("proj_l", "proj_w")


class TimmTalkingHeadAttention(QAttentionCore):
    """Mixed into timm's ``TalkingHeadAttn`` (see the module docstring)."""

    if TYPE_CHECKING:  # mixed into a library's module: its attributes are the library's, untyped here
        def __getattr__(self, name: str) -> Any: ...

    def init_talking_heads(self) -> None:
        self.init_core()
        self.matmul_av = QMatMul(Role.ATTN_MIXED, Role.ATTN_V)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
        attn = self.matmul_qk(q, k.transpose(-2, -1))
        attn = self.proj_l(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        attn = self.softmax(attn)
        attn = self.proj_w(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        attn = self.attn_drop(attn)
        x = self.matmul_av(attn, v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))  # type: ignore[no-any-return]


class TimmClassAttention(QAttentionCore):
    """Mixed into timm's ``ClassAttn``: the class token attends to every token, in timm's non-fused order."""

    if TYPE_CHECKING:  # mixed into a library's module: its attributes are the library's, untyped here
        def __getattr__(self, name: str) -> Any: ...

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        h = self.num_heads
        # q reads every token and keeps the class token's row: its input quantizer then sees what k's and v's see (one
        # LayerNorm output, one quantizer: RepQ-ViT / MOSF fold norm1 into all three, and an integer file quantizes it
        # once); the extra rows cost (N - 1) x C x C multiply-adds in each of the few class-attention blocks
        q = self.q(x)[:, :1].reshape(B, 1, h, C // h).permute(0, 2, 1, 3)
        k = self.k(x).reshape(B, N, h, C // h).permute(0, 2, 1, 3)
        v = self.v(x).reshape(B, N, h, C // h).permute(0, 2, 1, 3)
        x_cls = self.attend(q, k, v, self.scale, dropout=self.attn_drop)
        return self.proj_drop(self.proj(x_cls.transpose(1, 2).reshape(B, 1, C)))  # type: ignore[no-any-return]


class TimmCaitBlock(nn.Module):
    """Mixed into timm's ``LayerScaleBlock`` (talking-heads self-attention)."""

    if TYPE_CHECKING:  # mixed into a library's module: its attributes are the library's, untyped here
        def __getattr__(self, name: str) -> Any: ...

    add1: QAdd
    add2: QAdd

    def forward_attn(self, x: Tensor) -> Tensor:
        return self.add1(x, self.drop_path(self.gamma_1 * self.attn(self.norm1(x))))

    def forward_mlp(self, x: Tensor) -> Tensor:
        return self.add2(x, self.drop_path(self.gamma_2 * self.mlp(self.norm2(x))))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_mlp(self.forward_attn(x))


class TimmCaitClassBlock(nn.Module):
    """Mixed into timm's ``LayerScaleBlockClassAttn``: its halves map ``u = cat(class token, patch tokens)`` to the same
    with the class token updated (the patch tokens pass through unchanged)."""

    if TYPE_CHECKING:  # mixed into a library's module: its attributes are the library's, untyped here
        def __getattr__(self, name: str) -> Any: ...

    add1: QAdd
    add2: QAdd

    def forward_attn(self, u: Tensor) -> Tensor:
        cls = self.add1(u[:, :1], self.drop_path(self.gamma_1 * self.attn(self.norm1(u))))
        return torch.cat((cls, u[:, 1:]), dim=1)

    def forward_mlp(self, u: Tensor) -> Tensor:
        cls = u[:, :1]
        cls = self.add2(cls, self.drop_path(self.gamma_2 * self.mlp(self.norm2(cls))))
        return torch.cat((cls, u[:, 1:]), dim=1)

    def forward(self, x: Tensor, x_cls: Tensor) -> Tensor:
        return self.forward_mlp(self.forward_attn(torch.cat((x_cls, x), dim=1)))[:, :1]


def _mlp_ok(mlp: Any, where: str) -> None:
    from timm.layers import Mlp

    require_type(mlp, (Mlp,), "MLP", where)
    if not isinstance(mlp.act, gelu_like()):
        raise ModelError(f"MLP activation {type(mlp.act).__name__} at {where} is not supported: the post-GELU "
                         "quantizers assume GELU's range (GELU, GELU-tanh and QuickGELU are taken)")
    if not isinstance(mlp.norm, nn.Identity):
        raise ModelError(f"{where} has an inner LayerNorm: not supported yet in CaiT")


def _with_cls(model: Any, x: Tensor) -> Tensor:
    return torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)


@register_adapter
class TimmCaitAdapter(TimmAdapter):
    name = "timm-cait"
    description = ("timm Cait (CaiT): talking-heads self-attention (the heads x heads mixes stay float), "
                   "class-attention blocks, LayerScale")

    @classmethod
    def matches(cls, model: Any) -> bool:
        from timm.models.cait import Cait

        return isinstance(model, Cait)

    def is_wrapped(self, model: Any) -> bool:
        return len(model.blocks) > 0 and isinstance(model.blocks[0], TimmCaitBlock)

    def check(self, model: Any) -> None:
        from timm.layers import PatchEmbed
        from timm.models.cait import ClassAttn, LayerScaleBlock, LayerScaleBlockClassAttn, TalkingHeadAttn

        if type(model.patch_embed) is not PatchEmbed or not isinstance(model.patch_embed.norm, nn.Identity):
            raise ModelError(f"patch embedding {type(model.patch_embed).__name__} is not supported: a plain patch "
                             "embedding only")
        for i, blk in enumerate(model.blocks):
            require_type(blk, (LayerScaleBlock,), "transformer block", f"blocks.{i}")
            require_type(blk.attn, (TalkingHeadAttn,), "attention", f"blocks.{i}.attn")
            _mlp_ok(blk.mlp, f"blocks.{i}.mlp")
        for i, blk in enumerate(model.blocks_token_only):
            require_type(blk, (LayerScaleBlockClassAttn,), "class-attention block", f"blocks_token_only.{i}")
            require_type(blk.attn, (ClassAttn,), "class attention", f"blocks_token_only.{i}.attn")
            _mlp_ok(blk.mlp, f"blocks_token_only.{i}.mlp")
        if not isinstance(model.head, (nn.Linear, nn.Identity)):
            raise ModelError(f"head of type {type(model.head).__name__} is not supported: nn.Linear only")

    def wrap(self, model: Any) -> nn.Module:
        self.check(model)
        swap_conv(model.patch_embed, "proj", Role.PATCH_EMBED)
        swap_layernorm(model, "norm")
        for blk in model.blocks:
            mix_in(blk, TimmCaitBlock)
            if not isinstance(blk.attn, TimmTalkingHeadAttention):
                mix_in(blk.attn, TimmTalkingHeadAttention)
                blk.attn.init_talking_heads()
            swap_linear(blk.attn, "qkv", Role.QKV_IN)
            swap_linear(blk.attn, "proj", Role.PROJ_IN)
        for blk in model.blocks_token_only:
            mix_in(blk, TimmCaitClassBlock)
            if not isinstance(blk.attn, TimmClassAttention):
                mix_in(blk.attn, TimmClassAttention)
                blk.attn.init_core()
            for name in ("q", "k", "v"):
                swap_linear(blk.attn, name, Role.QKV_IN)
            swap_linear(blk.attn, "proj", Role.PROJ_IN)
        for blk in (*model.blocks, *model.blocks_token_only):
            if "add1" not in blk._modules:
                blk.add1, blk.add2 = QAdd(), QAdd()
            swap_layernorm(blk, "norm1")
            swap_layernorm(blk, "norm2")
            swap_linear(blk.mlp, "fc1", Role.FC1_IN)
            swap_linear(blk.mlp, "fc2", Role.FC2_IN)
        if isinstance(model.head, nn.Linear):
            swap_linear(model, "head", Role.HEAD_IN)
        self.check_wrapped(model)
        return model

    def float_parts(self, model: Any) -> list[tuple[str, str]]:
        return float_modules(model, FLOAT_MODULES, "talking heads' mix across heads (heads x heads, about 1 % of a block's multiply-adds)")

    def ln_consumers(self, model: Any) -> list[LNPair]:
        pairs = []
        for i, _ in enumerate(model.blocks):
            pairs.append(LNPair(f"blocks.{i}.norm1", (f"blocks.{i}.attn.qkv",), Role.QKV_IN))
            pairs.append(LNPair(f"blocks.{i}.norm2", (f"blocks.{i}.mlp.fc1",), Role.FC1_IN))
        for i, _ in enumerate(model.blocks_token_only):
            p = f"blocks_token_only.{i}"
            pairs.append(LNPair(f"{p}.norm1", (f"{p}.attn.q", f"{p}.attn.k", f"{p}.attn.v"), Role.QKV_IN))
            pairs.append(LNPair(f"{p}.norm2", (f"{p}.mlp.fc1",), Role.FC1_IN))
        return pairs

    def residual_streams(self, model: Any) -> list[ResidualStream]:
        """One stream: the patch projection's rows and the position embedding, the class token, then attn.proj /
        mlp.fc2 of every block (gamma layer scales are per channel); read by norm1 / norm2 of every block and the final
        norm (or the head's columns)."""
        w: list[StreamWriter] = [StreamWriter("patch_embed.proj", "rows"), StreamWriter("pos_embed", "param"),
                                 StreamWriter("cls_token", "param")]
        r: list[StreamReader] = []
        for prefix, blocks in (("blocks", model.blocks), ("blocks_token_only", model.blocks_token_only)):
            for i, _ in enumerate(blocks):
                p = f"{prefix}.{i}"
                w += [StreamWriter(f"{p}.attn.proj", "rows"), StreamWriter(f"{p}.mlp.fc2", "rows")]
                r += [StreamReader(f"{p}.norm1", "ln"), StreamReader(f"{p}.norm2", "ln")]
        if isinstance(model.norm, nn.LayerNorm):
            r.append(StreamReader("norm", "ln"))
        elif isinstance(model.head, nn.Linear):
            r.append(StreamReader("head", "cols"))
        else:
            raise ModelError("the residual stream is the model output (no final norm, no head): Add_alpha cannot undo it")
        return [ResidualStream("stream", int(model.embed_dim), tuple(w), tuple(r))]

    def chain(self, model: Any) -> list[Piece]:
        """embed (patch embed, position embedding) | per self-attention block: attn half, mlp half | per
        class-attention block (on ``cat(class token, patch tokens)``; the first prepends the class token): attn
        half, mlp half | head (final norm, pooling, head)."""
        if not self.is_wrapped(model):
            self.wrap(model)
        tokens = list(model.blocks_token_only)

        def embed(x: Tensor) -> Tensor:
            return model.pos_drop(model.patch_embed(x) + model.pos_embed)  # type: ignore[no-any-return]

        def head(x: Tensor) -> Tensor:
            u = x if tokens else _with_cls(model, x)
            return model.forward_head(model.norm(u))  # type: ignore[no-any-return]

        def first_attn(blk: Any) -> Callable[[Tensor], Tensor]:
            return lambda x: blk.forward_attn(_with_cls(model, x))  # type: ignore[no-any-return]

        pieces = [Piece("embed", "embed", embed, (model.patch_embed,))]
        for i, blk in enumerate(model.blocks):
            pieces.append(Piece(f"blocks.{i}.attn", "attn", blk.forward_attn, (blk.norm1, blk.attn, blk.add1), block=i))
            pieces.append(Piece(f"blocks.{i}.mlp", "mlp", blk.forward_mlp, (blk.norm2, blk.mlp, blk.add2), block=i))
        n = len(model.blocks)
        for j, blk in enumerate(tokens):
            attn = first_attn(blk) if j == 0 else blk.forward_attn
            p = f"blocks_token_only.{j}"
            pieces.append(Piece(f"{p}.attn", "attn", attn, (blk.norm1, blk.attn, blk.add1), block=n + j))
            pieces.append(Piece(f"{p}.mlp", "mlp", blk.forward_mlp, (blk.norm2, blk.mlp, blk.add2), block=n + j))
        pieces.append(Piece("head", "head", head, tuple(m for m in (model.norm, model.head) if isinstance(m, nn.Module))))
        return pieces


def _predefine() -> None:
    # the mixed classes exist at import, so that pickled / deep-copied models find them by name
    from timm.models.cait import ClassAttn, LayerScaleBlock, LayerScaleBlockClassAttn, TalkingHeadAttn

    mixed_class(LayerScaleBlock, TimmCaitBlock)
    mixed_class(LayerScaleBlockClassAttn, TimmCaitClassBlock)
    mixed_class(TalkingHeadAttn, TimmTalkingHeadAttention)
    mixed_class(ClassAttn, TimmClassAttention)


_predefine()
