"""timm ``Eva``: EVA-02 (rotary position embeddings, SwiGLU, the MLP's inner LayerNorm) and the ViTs timm builds
on the same class (``vit_*_rope_*``, EVA).

* :class:`TimmEvaAttention` replaces ``EvaAttention``: it takes over the module's sub-modules and parameters
  (q / k / v as one fused ``qkv`` or three Linears; a fused ``qkv``'s separate ``q_bias`` / ``v_bias`` become the
  bias of its QLinear, the values timm concatenates for ``F.linear``) and computes attention through the
  :class:`~vitq.nn.QAttentionCore` in timm's non-fused order. Rotary embeddings are applied to q and k (after
  their norms, the prefix tokens untouched) *before* the core, so the rotated q, k are the ATTN_Q / ATTN_K sites.
  The attention output's LayerNorm (``scale_norm``) feeds ``proj``: one more LayerNorm -> Linear pair.
* :class:`TimmEvaBlock` is mixed into ``EvaBlock``: residual adds as QAdd, ``gamma_1`` / ``gamma_2`` layer scale,
  the forward in two halves (with the model's rotary embedding).
* MLPs: ``Mlp`` (GELU-like activation: fc2's input is post-GELU, FC2_IN), ``GluMlp`` (one packed fc1, SiLU gate)
  and ``SwiGLU`` (``fc1_g``, ``fc1_x``): fc2's input is the signed gated product (GLU_OUT: the post-GELU
  quantizers are not applied there, recipes quantize it by their ``act:*`` rule), or, with the inner LayerNorm
  (EVA-02 B / L, ``scale_mlp``), a LayerNorm output (FC1_IN: post-LayerNorm, reparameterized like norm2 -> fc1).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
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
from . import (
    TimmAdapter,
    accepts_any_size,
)
from .vit import _self_attn_bias, gelu_like


def adopt_qkv_bias(qkv: Optional[nn.Linear], attn: Any) -> None:
    """A fused ``qkv`` Linear whose bias the library keeps outside it (``q_bias``, a zero ``k_bias`` buffer,
    ``v_bias``: EVA, BEiT) computes ``F.linear(x, qkv.weight, cat(q_bias, k_bias, v_bias))``: the same values become
    the Linear's own bias, so its QLinear computes exactly that (and reparameterization folds into it)."""
    if qkv is not None and getattr(attn, "q_bias", None) is not None:
        qkv.bias = nn.Parameter(torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)).detach().clone())


def _rotate(t: Tensor, rope: Tensor, npt: int, half: bool, like: Tensor) -> Tensor:
    from timm.layers import apply_rot_embed_cat

    return torch.cat([t[:, :, :npt, :], apply_rot_embed_cat(t[:, :, npt:, :], rope, half=half)], dim=2).type_as(like)


class TimmEvaAttention(QAttentionCore):
    """Replacement for timm's ``EvaAttention`` and ``AttentionRope`` (ViT-RoPE; grouped-query attention too): see
    the module docstring."""

    if TYPE_CHECKING:  # takes over a library's module: its attributes are the library's, untyped here
        def __getattr__(self, name: str) -> Any: ...

    def __init__(self, attn: Any) -> None:
        super().__init__()
        for name in ("num_heads", "head_dim", "scale", "num_prefix_tokens", "qkv", "q_proj", "k_proj", "v_proj",
                     "q_norm", "k_norm", "attn_drop", "norm", "gate", "proj", "proj_drop"):
            setattr(self, name, getattr(attn, name))
        self.rotate_half = bool(getattr(attn, "rotate_half", False))
        self.num_kv_heads = int(getattr(attn, "num_kv_heads", self.num_heads))  # AttentionRope: grouped-query attention
        self.num_kv_groups = self.num_heads // self.num_kv_heads
        self.attn_dim = self.num_heads * self.head_dim
        adopt_qkv_bias(self.qkv, attn)
        self.init_core()

    def forward(self, x: Tensor, rope: Optional[Tensor] = None, attn_mask: Optional[Tensor] = None,
                is_causal: bool = False) -> Tensor:
        B, N, C = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        if self.qkv is not None:
            q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q = self.q_proj(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
            k = self.k_proj(x).reshape(B, N, self.num_kv_heads, -1).transpose(1, 2)
            v = self.v_proj(x).reshape(B, N, self.num_kv_heads, -1).transpose(1, 2)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q = _rotate(q, rope, self.num_prefix_tokens, self.rotate_half, v)
            k = _rotate(k, rope, self.num_prefix_tokens, self.rotate_half, v)
        if self.num_kv_groups > 1:  # grouped-query attention: each kv head serves its group of query heads
            k = k.repeat_interleave(self.num_kv_groups, dim=1)
            v = v.repeat_interleave(self.num_kv_groups, dim=1)
        x = self.attend(q, k, v, self.scale, mask=_self_attn_bias(N, q, attn_mask, is_causal), dropout=self.attn_drop)
        x = self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


class TimmEvaBlock(nn.Module):
    """Behaviour mixed into timm's ``EvaBlock``: residual adds as QAdd, forward in two halves."""

    if TYPE_CHECKING:  # mixed into a library's module: its attributes are the library's, untyped here
        def __getattr__(self, name: str) -> Any: ...

    add1: QAdd
    add2: QAdd

    @staticmethod
    def from_float(block: Any) -> nn.Module:
        mix_in(block, TimmEvaBlock)
        if "add1" not in block._modules:
            block.add1 = QAdd()
            block.add2 = QAdd()
        return block

    def forward_attn(self, x: Tensor, rope: Optional[Tensor] = None, attn_mask: Optional[Tensor] = None,
                     is_causal: bool = False) -> Tensor:
        a = self.attn(self.norm1(x), rope=rope, attn_mask=attn_mask, is_causal=is_causal)
        if self.gamma_1 is not None:
            a = self.gamma_1 * a
        return self.add1(x, self.drop_path1(a))

    def forward_mlp(self, x: Tensor) -> Tensor:
        m = self.mlp(self.norm2(x))
        if self.gamma_2 is not None:
            m = self.gamma_2 * m
        return self.add2(x, self.drop_path2(m))

    def forward(self, x: Tensor, rope: Optional[Tensor] = None, attn_mask: Optional[Tensor] = None,
                is_causal: bool = False) -> Tensor:
        return self.forward_mlp(self.forward_attn(x, rope=rope, attn_mask=attn_mask, is_causal=is_causal))


def _mlp_kind(mlp: Any) -> str:
    from timm.layers import GluMlp, Mlp, SwiGLU

    if isinstance(mlp, SwiGLU):
        return "swiglu"
    if isinstance(mlp, GluMlp):
        return "glu"
    if isinstance(mlp, Mlp):
        return "mlp"
    return type(mlp).__name__


def _fc1_names(mlp: Any) -> tuple[str, ...]:
    return ("fc1_g", "fc1_x") if _mlp_kind(mlp) == "swiglu" else ("fc1",)


def _fc2_role(mlp: Any) -> Role:
    """fc2's input: post-LayerNorm with the inner norm, else the gated product (GLU) or the post-GELU activation."""
    if isinstance(getattr(mlp, "norm", None), nn.LayerNorm):
        return Role.FC1_IN
    return Role.FC2_IN if _mlp_kind(mlp) == "mlp" else Role.GLU_OUT


@register_adapter
class TimmEvaAdapter(TimmAdapter):
    name = "timm-eva"
    description = ("timm Eva: EVA-02 (rotary embeddings, SwiGLU, inner LayerNorm) and the ViT-RoPE models built on "
                   "it (AttentionRope), global pool token / avg")

    @classmethod
    def matches(cls, model: Any) -> bool:
        from timm.models.eva import Eva

        return isinstance(model, Eva)

    def accepts_input_size(self, model: Any, hw: tuple[int, int]) -> bool:
        return accepts_any_size(model) or super().accepts_input_size(model, hw)

    def is_wrapped(self, model: Any) -> bool:
        return len(model.blocks) > 0 and isinstance(model.blocks[0], TimmEvaBlock)

    def check(self, model: Any) -> None:
        from timm.layers import PatchEmbed
        from timm.layers.attention import AttentionRope
        from timm.models.eva import EvaAttention, EvaBlock

        if not isinstance(model.patch_embed, PatchEmbed):
            raise ModelError(f"patch embedding {type(model.patch_embed).__name__} is not supported: a plain patch "
                             "embedding only")
        if getattr(model, "attn_pool", None) is not None:
            raise ModelError("Eva with an attention-pooling head is not supported yet: use global_pool token or avg")
        if getattr(model, "rope_mixed", False):
            raise ModelError("Eva with depth-dependent (mixed) rotary embeddings is not supported yet")
        if getattr(model, "dynamic_img_size", False):
            raise ModelError("Eva with dynamic_img_size is not supported yet: build it for a fixed input size")
        for i, blk in enumerate(model.blocks):
            require_type(blk, (EvaBlock,), "transformer block", f"blocks.{i}")
            require_type(blk.attn, (EvaAttention, AttentionRope, TimmEvaAttention), "attention", f"blocks.{i}.attn")
            if getattr(blk.attn, "qkv_bias_separate", False):
                raise ModelError(f"blocks.{i}.attn adds its qkv bias separately (qkv_bias_separate): not supported yet")
            if getattr(blk.attn, "gate", None) is not None:
                raise ModelError(f"gated attention at blocks.{i}.attn is not supported")
            kind = _mlp_kind(blk.mlp)
            if kind not in ("mlp", "glu", "swiglu"):
                raise ModelError(f"MLP {kind} at blocks.{i}.mlp is not supported: Mlp, GluMlp or SwiGLU")
            if kind == "mlp" and not isinstance(blk.mlp.act, gelu_like()):
                raise ModelError(f"MLP activation {type(blk.mlp.act).__name__} at blocks.{i}.mlp is not supported: the "
                                 "post-GELU quantizers assume GELU's range (GELU, GELU-tanh and QuickGELU are taken)")
            if kind == "glu" and (getattr(blk.mlp, "chunk_dim", -1) != -1 or blk.mlp.gate_last):
                raise ModelError(f"GluMlp at blocks.{i}.mlp gates on the last half or another dim: not supported yet")
        head = getattr(model, "head", None)
        if not isinstance(head, (nn.Linear, nn.Identity)):
            raise ModelError(f"head of type {type(head).__name__} is not supported: nn.Linear only")

    def wrap(self, model: Any) -> nn.Module:
        self.check(model)
        swap_conv(model.patch_embed, "proj", Role.PATCH_EMBED)
        for attr in ("norm_pre", "norm", "fc_norm"):
            swap_layernorm(model, attr)
        for blk in model.blocks:
            TimmEvaBlock.from_float(blk)
            swap_layernorm(blk, "norm1")
            swap_layernorm(blk, "norm2")
            if not isinstance(blk.attn, TimmEvaAttention):
                blk.attn = TimmEvaAttention(blk.attn)
            a = blk.attn
            for name in ("qkv", "q_proj", "k_proj", "v_proj"):
                if getattr(a, name, None) is not None:
                    swap_linear(a, name, Role.QKV_IN)
            swap_layernorm(a, "norm")
            swap_linear(a, "proj", Role.PROJ_IN)
            for name in _fc1_names(blk.mlp):
                swap_linear(blk.mlp, name, Role.FC1_IN)
            role = _fc2_role(blk.mlp)
            swap_layernorm(blk.mlp, "norm")
            swap_linear(blk.mlp, "fc2", role)
        if isinstance(getattr(model, "head", None), nn.Linear):
            swap_linear(model, "head", Role.HEAD_IN)
        self.check_wrapped(model)
        return model

    def ln_consumers(self, model: Any) -> list[LNPair]:
        pairs = []
        for i, blk in enumerate(model.blocks):
            a = blk.attn
            qkv = tuple(f"blocks.{i}.attn.{n}" for n in ("qkv", "q_proj", "k_proj", "v_proj") if getattr(a, n, None) is not None)
            pairs.append(LNPair(f"blocks.{i}.norm1", qkv, Role.QKV_IN))
            if isinstance(a.norm, nn.LayerNorm):  # scale_norm: the attention output's LayerNorm -> proj
                pairs.append(LNPair(f"blocks.{i}.attn.norm", (f"blocks.{i}.attn.proj",), Role.PROJ_IN))
            pairs.append(LNPair(f"blocks.{i}.norm2", tuple(f"blocks.{i}.mlp.{n}" for n in _fc1_names(blk.mlp)),
                                Role.FC1_IN))
            if isinstance(getattr(blk.mlp, "norm", None), nn.LayerNorm):  # the MLP's inner LayerNorm -> fc2
                pairs.append(LNPair(f"blocks.{i}.mlp.norm", (f"blocks.{i}.mlp.fc2",), Role.FC1_IN))
        return pairs

    def residual_streams(self, model: Any) -> list[ResidualStream]:
        """One stream, as a timm ViT's: the embedding (patch projection rows, prefix tokens, position embedding),
        then attn.proj / mlp.fc2 of every block (gamma layer scales are per channel: they commute); read by
        norm1 / norm2 and the final norm (or fc_norm after pooling, or the head's columns)."""
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
            for tok in ("cls_token", "reg_token", "pos_embed"):
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
        """embed (patch embed, position embedding, norm_pre) | per block: attn half (with the rotary embedding),
        mlp half | head (final norm, pooling, fc_norm, head)."""
        if not self.is_wrapped(model):
            self.wrap(model)

        def rope() -> Optional[Tensor]:
            return _rope(model)

        def embed(x: Tensor) -> Tensor:
            x = model.patch_embed(x)
            x, _ = model._pos_embed(x)
            return model.norm_pre(x)

        def head(x: Tensor) -> Tensor:
            return model.forward_head(model.norm(x))

        def attn_half(blk: Any) -> Callable[[Tensor], Tensor]:
            return lambda x: blk.forward_attn(x, rope=rope())  # type: ignore[no-any-return]

        pieces = [Piece("embed", "embed", embed, tuple(m for m in (model.patch_embed, model.norm_pre)
                                                       if isinstance(m, nn.Module)))]
        for i, blk in enumerate(model.blocks):
            pieces.append(Piece(f"blocks.{i}.attn", "attn", attn_half(blk), (blk.norm1, blk.attn, blk.add1), block=i))
            pieces.append(Piece(f"blocks.{i}.mlp", "mlp", blk.forward_mlp, (blk.norm2, blk.mlp, blk.add2), block=i))
        pieces.append(Piece("head", "head", head, tuple(m for m in (model.norm, model.fc_norm, model.head)
                                                        if isinstance(m, nn.Module))))
        return pieces


def _rope(model: Any) -> Optional[Tensor]:
    """The model's rotary embedding for its fixed grid (what ``Eva._pos_embed`` hands every block)."""
    if model.rope is None:
        return None
    if hasattr(model.rope, "feat_shape"):
        return model.rope.get_embed()  # type: ignore[no-any-return]
    return model.rope.get_embed(shape=model.patch_embed.grid_size)  # type: ignore[no-any-return]


def _predefine() -> None:
    # the mixed block class exists at import, so that pickled / deep-copied models find it by name
    from timm.models.eva import EvaBlock

    mixed_class(EvaBlock, TimmEvaBlock)


_predefine()
