"""timm ``Beit`` (BEiT, BEiT v2; the timm class data2vec-vision checkpoints load into).

* :class:`TimmBeitAttention` replaces BEiT's ``Attention``: the fused ``qkv`` with its outside ``q_bias`` /
  ``v_bias`` (adopted as the QLinear's bias, :func:`~vitq.adapters.timm.eva.adopt_qkv_bias`), attention through the
  :class:`~vitq.nn.QAttentionCore` in timm's non-fused order, the block's relative position bias and then the
  model's shared one added to the scores before the softmax (both float, part of the softmax input).
* :class:`TimmBeitBlock` is mixed into BEiT's ``Block``: residual adds as QAdd, ``gamma_1`` / ``gamma_2`` layer
  scale, the forward in two halves (with the shared relative position bias).
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
    mix_in,
    mixed_class,
    register_adapter,
    require_type,
    swap_conv,
    swap_layernorm,
    swap_linear,
)
from . import TimmAdapter
from .eva import adopt_qkv_bias
from .vit import gelu_like


class TimmBeitAttention(QAttentionCore):
    """Replacement for timm's BEiT ``Attention`` (see the module docstring)."""

    if TYPE_CHECKING:  # takes over a library's module: its attributes are the library's, untyped here
        def __getattr__(self, name: str) -> Any: ...

    def __init__(self, attn: Any) -> None:
        super().__init__()
        for name in ("num_heads", "scale", "qkv", "window_size", "relative_position_bias_table", "attn_drop", "proj",
                     "proj_drop"):
            setattr(self, name, getattr(attn, name))
        if self.relative_position_bias_table is not None:
            self.register_buffer("relative_position_index", attn.relative_position_index, persistent=False)
        adopt_qkv_bias(self.qkv, attn)
        self.init_core()

    def _rel_pos_bias(self) -> Optional[Tensor]:
        if self.relative_position_bias_table is None:
            return None
        n = self.window_size[0] * self.window_size[1] + 1
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1).contiguous().unsqueeze(0)

    def forward(self, x: Tensor, shared_rel_pos_bias: Optional[Tensor] = None) -> Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        x = self.attend(q, k, v, self.scale, bias=(self._rel_pos_bias(), shared_rel_pos_bias), dropout=self.attn_drop)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


class TimmBeitBlock(nn.Module):
    """Behaviour mixed into timm's BEiT ``Block``: residual adds as QAdd, forward in two halves."""

    if TYPE_CHECKING:  # mixed into a library's module: its attributes are the library's, untyped here
        def __getattr__(self, name: str) -> Any: ...

    add1: QAdd
    add2: QAdd

    @staticmethod
    def from_float(block: Any) -> nn.Module:
        mix_in(block, TimmBeitBlock)
        if "add1" not in block._modules:
            block.add1 = QAdd()
            block.add2 = QAdd()
        return block

    def forward_attn(self, x: Tensor, shared_rel_pos_bias: Optional[Tensor] = None) -> Tensor:
        a = self.attn(self.norm1(x), shared_rel_pos_bias=shared_rel_pos_bias)
        if self.gamma_1 is not None:
            a = self.gamma_1 * a
        return self.add1(x, self.drop_path1(a))

    def forward_mlp(self, x: Tensor) -> Tensor:
        m = self.mlp(self.norm2(x))
        if self.gamma_2 is not None:
            m = self.gamma_2 * m
        return self.add2(x, self.drop_path2(m))

    def forward(self, x: Tensor, shared_rel_pos_bias: Optional[Tensor] = None) -> Tensor:
        return self.forward_mlp(self.forward_attn(x, shared_rel_pos_bias=shared_rel_pos_bias))


def _shared_bias(model: Any) -> Optional[Tensor]:
    return model.rel_pos_bias() if model.rel_pos_bias is not None else None


@register_adapter
class TimmBeitAdapter(TimmAdapter):
    name = "timm-beit"
    description = "timm Beit (BEiT, BEiT v2, data2vec-vision weights): relative position bias, layer scale"

    @classmethod
    def matches(cls, model: Any) -> bool:
        from timm.models.beit import Beit

        return isinstance(model, Beit)

    def is_wrapped(self, model: Any) -> bool:
        return len(model.blocks) > 0 and isinstance(model.blocks[0], TimmBeitBlock)

    def check(self, model: Any) -> None:
        from timm.layers import Mlp, PatchEmbed
        from timm.models.beit import Attention, Block

        if not isinstance(model.patch_embed, PatchEmbed):
            raise ModelError(f"patch embedding {type(model.patch_embed).__name__} is not supported: a plain patch "
                             "embedding only")
        for i, blk in enumerate(model.blocks):
            require_type(blk, (Block,), "transformer block", f"blocks.{i}")
            require_type(blk.attn, (Attention, TimmBeitAttention), "attention", f"blocks.{i}.attn")
            if getattr(blk.attn, "qkv_bias_separate", False):
                raise ModelError(f"blocks.{i}.attn adds its qkv bias separately (qkv_bias_separate): not supported yet")
            require_type(blk.mlp, (Mlp,), "MLP", f"blocks.{i}.mlp")
            if not isinstance(blk.mlp.act, gelu_like()):
                raise ModelError(f"MLP activation {type(blk.mlp.act).__name__} at blocks.{i}.mlp is not supported: the "
                                 "post-GELU quantizers assume GELU's range (GELU, GELU-tanh and QuickGELU are taken)")
        head = getattr(model, "head", None)
        if not isinstance(head, (nn.Linear, nn.Identity)):
            raise ModelError(f"head of type {type(head).__name__} is not supported: nn.Linear only")

    def wrap(self, model: Any) -> nn.Module:
        self.check(model)
        swap_conv(model.patch_embed, "proj", Role.PATCH_EMBED)
        for attr in ("norm", "fc_norm"):
            swap_layernorm(model, attr)
        for blk in model.blocks:
            TimmBeitBlock.from_float(blk)
            swap_layernorm(blk, "norm1")
            swap_layernorm(blk, "norm2")
            if not isinstance(blk.attn, TimmBeitAttention):
                blk.attn = TimmBeitAttention(blk.attn)
            swap_linear(blk.attn, "qkv", Role.QKV_IN)
            swap_linear(blk.attn, "proj", Role.PROJ_IN)
            swap_linear(blk.mlp, "fc1", Role.FC1_IN)
            swap_layernorm(blk.mlp, "norm")
            swap_linear(blk.mlp, "fc2", Role.FC1_IN if isinstance(blk.mlp.norm, nn.LayerNorm) else Role.FC2_IN)
        if isinstance(getattr(model, "head", None), nn.Linear):
            swap_linear(model, "head", Role.HEAD_IN)
        self.check_wrapped(model)
        return model

    def ln_consumers(self, model: Any) -> list[LNPair]:
        pairs = []
        for i, blk in enumerate(model.blocks):
            pairs.append(LNPair(f"blocks.{i}.norm1", (f"blocks.{i}.attn.qkv",), Role.QKV_IN))
            pairs.append(LNPair(f"blocks.{i}.norm2", (f"blocks.{i}.mlp.fc1",), Role.FC1_IN))
            if isinstance(blk.mlp.norm, nn.LayerNorm):  # the MLP's inner LayerNorm (scale_mlp) -> fc2
                pairs.append(LNPair(f"blocks.{i}.mlp.norm", (f"blocks.{i}.mlp.fc2",), Role.FC1_IN))
        return pairs

    def residual_streams(self, model: Any) -> list[ResidualStream]:
        """One stream: the patch projection's rows, the class token and the position embedding, then attn.proj /
        mlp.fc2 of every block (the gamma layer scales are per channel); read by norm1 / norm2 and the final norm,
        fc_norm after pooling, or the head's columns."""
        w: list[StreamWriter] = [StreamWriter("patch_embed.proj", "rows")]
        for tok in ("cls_token", "pos_embed"):
            if isinstance(getattr(model, tok, None), nn.Parameter):
                w.append(StreamWriter(tok, "param"))
        r: list[StreamReader] = []
        for i, _ in enumerate(model.blocks):
            w += [StreamWriter(f"blocks.{i}.attn.proj", "rows"), StreamWriter(f"blocks.{i}.mlp.fc2", "rows")]
            r += [StreamReader(f"blocks.{i}.norm1", "ln"), StreamReader(f"blocks.{i}.norm2", "ln")]
        if isinstance(model.norm, nn.LayerNorm):
            r.append(StreamReader("norm", "ln"))
        elif isinstance(model.fc_norm, nn.LayerNorm):
            r.append(StreamReader("fc_norm", "ln"))
        elif isinstance(getattr(model, "head", None), nn.Linear):
            r.append(StreamReader("head", "cols"))
        else:
            raise ModelError("the residual stream is the model output (no final norm, no head): Add_alpha cannot undo it")
        return [ResidualStream("stream", int(model.embed_dim), tuple(w), tuple(r))]

    def chain(self, model: Any) -> list[Piece]:
        """embed (patch embed, class token, position embedding) | per block: attn half (with the shared relative
        position bias), mlp half | head (final norm, pooling, fc_norm, head)."""
        if not self.is_wrapped(model):
            self.wrap(model)

        def embed(x: Tensor) -> Tensor:
            import torch

            x = model.patch_embed(x)
            x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
            if model.pos_embed is not None:
                x = x + model.pos_embed
            return model.pos_drop(x)  # type: ignore[no-any-return]

        def head(x: Tensor) -> Tensor:
            return model.forward_head(model.norm(x))  # type: ignore[no-any-return]

        def attn_half(blk: Any) -> Callable[[Tensor], Tensor]:
            return lambda x: blk.forward_attn(x, shared_rel_pos_bias=_shared_bias(model))  # type: ignore[no-any-return]

        pieces = [Piece("embed", "embed", embed, (model.patch_embed,))]
        for i, blk in enumerate(model.blocks):
            pieces.append(Piece(f"blocks.{i}.attn", "attn", attn_half(blk), (blk.norm1, blk.attn, blk.add1), block=i))
            pieces.append(Piece(f"blocks.{i}.mlp", "mlp", blk.forward_mlp, (blk.norm2, blk.mlp, blk.add2), block=i))
        pieces.append(Piece("head", "head", head, tuple(m for m in (model.norm, model.fc_norm, model.head)
                                                        if isinstance(m, nn.Module))))
        return pieces


def _predefine() -> None:
    # the mixed block class exists at import, so that pickled / deep-copied models find it by name
    from timm.models.beit import Block

    mixed_class(Block, TimmBeitBlock)


_predefine()
