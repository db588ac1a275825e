"""timm ``VisionTransformer`` (ViT, DeiT) and ``VisionTransformerDistilled`` (DeiT with
distillation token).

* :class:`TimmAttention` replaces ``timm.layers.Attention``: it takes over the timm module's
  sub-modules and parameters (same names, so state dicts are unchanged) and computes attention
  through the :class:`~vitq.nn.QAttentionCore`, in exactly timm's non-fused order of operations
  (``(q * scale) @ k^T``), so an empty one is bit-exact with timm's non-fused path.
* :class:`TimmBlock` is mixed into timm's ``Block`` in place (:func:`~vitq.adapters.base.mix_in`):
  the two residual additions become :class:`~vitq.nn.QAdd` and the forward splits into
  ``forward_attn`` / ``forward_mlp``, the halves reconstruction uses as units.
* A hybrid ViT (``HybridEmbed``: a ResNet makes the tokens) keeps its CNN stem float (:meth:`float_parts` says so;
  timm's ResNet stems standardize their weights in every forward, ``StdConv2d``); the 1x1 projection is the
  PATCH_EMBED conv (weight quantized, input float).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import Tensor, nn

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
    mixed_class,
    register_adapter,
    require_type,
    swap_conv,
    swap_layernorm,
    swap_linear,
)
from . import (
    TimmAdapter,
    accepts_any_size,
)


def _self_attn_bias(n: int, attn: Tensor, attn_mask: Optional[Tensor], is_causal: bool) -> Optional[Tensor]:
    if is_causal:
        return attn.new_full((n, n), float("-inf")).triu_(1)
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        bias = torch.zeros_like(attn_mask, dtype=attn.dtype)
        return bias.masked_fill_(~attn_mask, float("-inf"))
    return attn_mask


class TimmAttention(QAttentionCore):
    """Replacement for ``timm.layers.Attention`` (ViT, DeiT, and most plain ViT variants)."""

    if TYPE_CHECKING:  # mixed into a library's module: its attributes are the library's, untyped here
        def __getattr__(self, name: str) -> Any: ...

    def __init__(self, attn: Any) -> None:
        super().__init__()
        self.num_heads = attn.num_heads
        self.head_dim = attn.head_dim
        self.attn_dim = getattr(attn, "attn_dim", attn.num_heads * attn.head_dim)
        self.scale = attn.scale
        self.qkv = attn.qkv
        self.q_norm = attn.q_norm
        self.k_norm = attn.k_norm
        self.attn_drop = attn.attn_drop
        self.norm = getattr(attn, "norm", nn.Identity())
        self.gate = getattr(attn, "gate", None)
        self.proj = attn.proj
        self.proj_drop = attn.proj_drop
        self.init_core()

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        B, N, C = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        mask = _self_attn_bias(N, q, attn_mask, is_causal)
        x = self.attend(q, k, v, self.scale, mask=mask, dropout=self.attn_drop)
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        x = self.proj(x)
        x = self.proj_drop(x)
        return x


class TimmAttentionPool(QAttentionCore):
    """Replacement for timm's ``AttentionPoolLatent`` (``global_pool='map'``: SigLIP's head): a learned latent query
    cross-attends to the tokens through the attention core, in timm's non-fused order, then ``proj`` and a residual
    MLP on its own LayerNorm (the residual add a :class:`~vitq.nn.QAdd`). Sub-modules and parameters keep timm's
    names."""

    if TYPE_CHECKING:  # takes over a library's module: its attributes are the library's, untyped here
        def __getattr__(self, name: str) -> Any: ...

    def __init__(self, pool: Any) -> None:
        super().__init__()
        for name in ("num_heads", "head_dim", "scale", "pool", "latent_len", "latent_dim", "pos_embed", "latent", "q", "kv",
                     "q_norm", "k_norm", "proj", "proj_drop", "norm", "mlp"):  # timm's order: state dicts unchanged
            setattr(self, name, getattr(pool, name))
        self.add = QAdd()
        self.init_core()

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None) -> Tensor:
        B, N, C = x.shape
        if self.pos_embed is not None:
            x = x + self.pos_embed.unsqueeze(0).to(x.dtype)
        q_latent = self.latent.expand(B, -1, -1)
        q = self.q(q_latent).reshape(B, self.latent_len, self.num_heads, self.head_dim).transpose(1, 2)
        kv = self.kv(x).reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        mask = None if attn_mask is None else _self_attn_bias(N, q, attn_mask, False)
        x = self.attend(q, k, v, self.scale, mask=mask)
        x = x.transpose(1, 2).reshape(B, self.latent_len, C)
        x = self.proj_drop(self.proj(x))
        x = self.add(x, self.mlp(self.norm(x)))
        if self.pool == "token":
            return x[:, 0]
        if self.pool == "avg":
            return x.mean(1)
        return x


class TimmParallelBlock(nn.Module):
    """Behaviour mixed into timm's ``ParallelThingsBlock`` (parallel attention and MLP branches, their outputs summed
    into the stream): one QAdd per half, over the branches' sum, in timm's order."""

    if TYPE_CHECKING:  # mixed into a library's module: its attributes are the library's, untyped here
        def __getattr__(self, name: str) -> Any: ...

    add1: QAdd
    add2: QAdd

    @staticmethod
    def from_float(block: Any) -> nn.Module:
        mix_in(block, TimmParallelBlock)
        if "add1" not in block._modules:
            block.add1 = QAdd()
            block.add2 = QAdd()
        return block

    def forward_attn(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        outs = [a.drop_path(a.ls(a.attn(a.norm(x), attn_mask=attn_mask, is_causal=is_causal))) for a in self.attns]
        return self.add1(x, torch.stack(outs).sum(dim=0))

    def forward_mlp(self, x: Tensor) -> Tensor:
        return self.add2(x, torch.stack([f(x) for f in self.ffns]).sum(dim=0))

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        return self.forward_mlp(self.forward_attn(x, attn_mask=attn_mask, is_causal=is_causal))


def _hybrid(model: Any) -> bool:
    """A hybrid ViT: a CNN (timm's ``HybridEmbed``: a ResNet stem) makes the tokens, a 1x1 projection maps them."""
    from timm.layers import HybridEmbed

    return isinstance(model.patch_embed, HybridEmbed)


def _branches(blk: Any, prefix: str) -> list[tuple[str, Any, str, Any]]:
    """A block's (attention part name, the module holding norm / attn, MLP part name, the module holding norm / mlp)
    pairs: one for a Block (norm1 / attn, norm2 / mlp), one per branch of a parallel block."""
    if isinstance(blk, TimmParallelBlock) or hasattr(blk, "attns"):
        return [(f"{prefix}.attns.{j}", a, f"{prefix}.ffns.{j}", f) for j, (a, f) in enumerate(zip(blk.attns, blk.ffns))]
    return [(prefix, blk, prefix, blk)]


def _norm_names(blk: Any) -> tuple[str, str]:
    return ("norm", "norm") if hasattr(blk, "attns") else ("norm1", "norm2")


def gelu_like() -> tuple[type, ...]:
    """MLP activations whose negative range is GELU's (the post-GELU quantizers' fixed negative grid covers them):
    GELU (min -0.16997), GELU-tanh (-0.17004: 7e-5 below, far under one 8-bit step) and OpenAI CLIP's QuickGELU
    ``x * sigmoid(1.702 x)`` (-0.16361). SiLU (-0.27846) and others would be clipped: not taken."""
    from timm.layers import GELU, GELUTanh, QuickGELU

    return (nn.GELU, GELU, GELUTanh, QuickGELU)


class TimmBlock(nn.Module):
    """Behaviour mixed into timm's ViT ``Block``: residual adds as QAdd, forward in two halves."""

    if TYPE_CHECKING:  # mixed into a library's module: its attributes are the library's, untyped here
        def __getattr__(self, name: str) -> Any: ...

    add1: QAdd
    add2: QAdd

    @staticmethod
    def from_float(block: Any) -> nn.Module:
        mix_in(block, TimmBlock)
        if "add1" not in block._modules:
            block.add1 = QAdd()
            block.add2 = QAdd()
        return block

    def forward_attn(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        return self.add1(x, self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask,
                                                               is_causal=is_causal))))

    def forward_mlp(self, x: Tensor) -> Tensor:
        return self.add2(x, self.drop_path2(self.ls2(self.mlp(self.norm2(x)))))

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        return self.forward_mlp(self.forward_attn(x, attn_mask=attn_mask, is_causal=is_causal))


@register_adapter
class TimmViTAdapter(TimmAdapter):
    name = "timm-vit"
    description = ("timm VisionTransformer (ViT / DeiT / DeiT-III / DINOv2 / CLIP image towers, any size; GELU or "
                   "QuickGELU) and VisionTransformerDistilled (DeiT with distillation token), global pool token / avg / "
                   "map (SigLIP's attention-pool head)")

    @classmethod
    def matches(cls, model: Any) -> bool:
        from timm.models.vision_transformer import VisionTransformer

        return isinstance(model, VisionTransformer)

    def accepts_input_size(self, model: Any, hw: tuple[int, int]) -> bool:
        return accepts_any_size(model) or super().accepts_input_size(model, hw)

    def is_wrapped(self, model: Any) -> bool:
        return len(model.blocks) > 0 and isinstance(model.blocks[0], (TimmBlock, TimmParallelBlock))

    def check(self, model: Any) -> None:
        from timm.layers import Mlp, PatchEmbed
        from timm.layers.attention import Attention
        from timm.models.vision_transformer import Block, ParallelThingsBlock

        pool = getattr(model, "attn_pool", None)
        if pool is not None and not isinstance(pool, TimmAttentionPool):
            from timm.layers import AttentionPoolLatent

            require_type(pool, (AttentionPoolLatent,), "attention-pooling head", "attn_pool")
            if pool.mlp is None or not isinstance(pool.q, nn.Linear):
                raise ModelError("attention-pooling head without its projection / MLP (out_features=0) or without a "
                                 "query projection is not supported yet")
            if not isinstance(pool.mlp.act, gelu_like()):
                raise ModelError(f"attention-pooling head activation {type(pool.mlp.act).__name__} is not supported: "
                                 "GELU, GELU-tanh and QuickGELU are taken")
        if _hybrid(model):
            if not isinstance(model.patch_embed.proj, nn.Conv2d):
                raise ModelError("a hybrid ViT whose CNN stem feeds the blocks without a projection (patch_embed.proj "
                                 f"is {type(model.patch_embed.proj).__name__}) is not supported: the stem stays float")
        elif not isinstance(model.patch_embed, PatchEmbed):
            raise ModelError(f"patch embedding {type(model.patch_embed).__name__} is not supported: a plain patch "
                             "embedding or a hybrid CNN stem (HybridEmbed)")
        for i, blk in enumerate(model.blocks):
            require_type(blk, (Block, ParallelThingsBlock), "transformer block", f"blocks.{i}")
            for aname, a, fname, f in _branches(blk, f"blocks.{i}"):
                require_type(a.attn, (Attention, TimmAttention), "attention", f"{aname}.attn")
                require_type(f.mlp, (Mlp,), "MLP", f"{fname}.mlp")
                if getattr(a.attn, "gate", None) is not None:
                    raise ModelError(f"gated attention at {aname}.attn is not supported")
                if not isinstance(f.mlp.act, gelu_like()):
                    raise ModelError(f"MLP activation {type(f.mlp.act).__name__} at {fname}.mlp is not supported: the "
                                     "post-GELU quantizers assume GELU's range (GELU, GELU-tanh and QuickGELU are taken)")
                if not isinstance(getattr(f.mlp, "norm", nn.Identity()), nn.Identity):
                    raise ModelError(f"an MLP with an inner norm at {fname}.mlp is not supported in a timm ViT yet")
        head = getattr(model, "head", None)
        if not isinstance(head, (nn.Linear, nn.Identity)):
            raise ModelError(f"head of type {type(head).__name__} is not supported: nn.Linear only")

    def wrap(self, model: Any) -> nn.Module:
        self.check(model)
        swap_conv(model.patch_embed, "proj", Role.PATCH_EMBED)
        for attr in ("norm_pre", "norm", "fc_norm"):
            swap_layernorm(model, attr)
        for blk in model.blocks:
            (TimmParallelBlock if hasattr(blk, "attns") else TimmBlock).from_float(blk)
            n1, n2 = _norm_names(blk)
            for _, a, _, f in _branches(blk, ""):
                swap_layernorm(a, n1)
                swap_layernorm(f, n2)
                if not isinstance(a.attn, TimmAttention):
                    a.attn = TimmAttention(a.attn)
                swap_linear(a.attn, "qkv", Role.QKV_IN)
                swap_linear(a.attn, "proj", Role.PROJ_IN)
                swap_linear(f.mlp, "fc1", Role.FC1_IN)
                swap_linear(f.mlp, "fc2", Role.FC2_IN)
        if getattr(model, "attn_pool", None) is not None:
            if not isinstance(model.attn_pool, TimmAttentionPool):
                model.attn_pool = TimmAttentionPool(model.attn_pool)
            pool = model.attn_pool
            # pool.q, the latent query's projection, reads a learned constant: float by design (float_parts)
            swap_linear(pool, "kv", Role.QKV_IN)
            swap_linear(pool, "proj", Role.PROJ_IN)
            swap_layernorm(pool, "norm")
            swap_linear(pool.mlp, "fc1", Role.FC1_IN)
            swap_linear(pool.mlp, "fc2", Role.FC2_IN)
        for head in ("head", "head_dist"):
            if isinstance(getattr(model, head, None), nn.Linear):
                swap_linear(model, head, Role.HEAD_IN)
        self.check_wrapped(model)
        return model

    def float_parts(self, model: Any) -> list[tuple[str, str]]:
        parts = []
        if getattr(model, "attn_pool", None) is not None:
            parts.append(("attn_pool.q", ATTN_POOL_Q_WHY))
        if not _hybrid(model):
            return parts
        return parts + [("patch_embed.backbone", f"a hybrid ViT's CNN stem ({type(model.patch_embed.backbone).__name__}): it "
                 "runs in float; the projection that reads its features has a quantized weight (its input float, as "
                 "an image patch embedding's)")]

    def ln_consumers(self, model: Any) -> list[LNPair]:
        pairs = []
        for i, blk in enumerate(model.blocks):
            n1, n2 = _norm_names(blk)
            for aname, _, fname, _ in _branches(blk, f"blocks.{i}"):
                pairs.append(LNPair(f"{aname}.{n1}", (f"{aname}.attn.qkv",), Role.QKV_IN))
                pairs.append(LNPair(f"{fname}.{n2}", (f"{fname}.mlp.fc1",), Role.FC1_IN))
        if getattr(model, "attn_pool", None) is not None:
            if isinstance(model.norm, nn.LayerNorm):  # the final norm feeds only the pool's keys and values
                pairs.append(LNPair("norm", ("attn_pool.kv",), Role.QKV_IN))
            if isinstance(model.attn_pool.norm, nn.LayerNorm):
                pairs.append(LNPair("attn_pool.norm", ("attn_pool.mlp.fc1",), Role.FC1_IN))
        return pairs

    def residual_streams(self, model: Any) -> list[ResidualStream]:
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
        for i, blk in enumerate(model.blocks):
            n1, n2 = _norm_names(blk)
            for aname, _, fname, _ in _branches(blk, f"blocks.{i}"):
                w += [StreamWriter(f"{aname}.attn.proj", "rows"), StreamWriter(f"{fname}.mlp.fc2", "rows")]
                r += [StreamReader(f"{aname}.{n1}", "ln"), StreamReader(f"{fname}.{n2}", "ln")]
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

    def chain(self, model: Any) -> list[Piece]:
        """embed (patch embed, position embedding, norm_pre) | per block: attn half, mlp half |
        head (final norm, pooling, fc_norm, head / head_dist)."""
        if not self.is_wrapped(model):
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
            if hasattr(blk, "attns"):
                attn_mods: tuple[nn.Module, ...] = (blk.attns, blk.add1)
                mlp_mods: tuple[nn.Module, ...] = (blk.ffns, blk.add2)
            else:
                attn_mods, mlp_mods = (blk.norm1, blk.attn, blk.ls1, blk.add1), (blk.norm2, blk.mlp, blk.ls2, blk.add2)
            pieces.append(Piece(f"blocks.{i}.attn", "attn", blk.forward_attn, attn_mods, block=i))
            pieces.append(Piece(f"blocks.{i}.mlp", "mlp", blk.forward_mlp, mlp_mods, block=i))
        head_mods = tuple(m for m in (model.norm, getattr(model, "attn_pool", None), model.fc_norm, model.head,
                                      getattr(model, "head_dist", None)) if isinstance(m, nn.Module))
        pieces.append(Piece("head", "head", head, head_mods))
        return pieces


def _predefine() -> None:
    # the mixed block classes exist at import, so that pickled / deep-copied models find them by name
    from timm.models.vision_transformer import Block, ParallelThingsBlock

    mixed_class(Block, TimmBlock)
    mixed_class(ParallelThingsBlock, TimmParallelBlock)


_predefine()
