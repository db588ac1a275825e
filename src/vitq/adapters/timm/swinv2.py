"""timm ``SwinTransformerV2`` (Swin V2: cosine window attention with a learned logit scale, the continuous
position bias from a small MLP, residual post-normalization, patch merging that normalizes after its reduction).

* :class:`TimmWindowAttentionV2` is mixed into timm's ``WindowAttention`` (v2) in place. Attention goes through the
  :class:`~vitq.nn.QAttentionCore` in timm's order: the *normalized* q and k are the ATTN_Q / ATTN_K sites (cosine
  attention: values in [-1, 1]), the scores are multiplied by ``exp(clamp(logit_scale))`` per head, then
  ``16 * sigmoid(cpb_mlp(coords))`` is added before the softmax. The position-bias MLP (``cpb_mlp``) stays float: it
  reads fixed coordinates, not the image, so it is a constant of the model (said in the manifest's notes).
* The q / v biases (timm keeps them beside a bias-free ``qkv`` and adds them in ``F.linear``) are folded into the
  ``qkv`` Linear at wrap time, so the quantized Linear carries them (state dicts of wrapped models hold
  ``qkv.bias`` in their place). Bit-exact with timm's default ``F.linear(x, W, cat(q, 0, v))``; with
  ``qkv_bias_separate`` the float sum is rounded once instead of twice.
* :class:`TimmSwinV2Block` is mixed into ``SwinTransformerV2Block``: ``x + norm1(attn(x))``, ``x + norm2(mlp(x))``
  with the residual additions as :class:`~vitq.nn.QAdd`, forward in two halves.

Post-norm blocks have no LayerNorm -> Linear pair: q / k / v and fc1 read the residual stream itself. RepQ-ViT and
MOSF reparameterize LayerNorm outputs, so they have nothing to fold here (the manifest says so); AOCQ's Add_alpha
balances the stream between its writers (the post-norms, the patch embedding's and patch merging's norms) and its
readers (the q / k / v and fc1 columns, the next merging's reduction, the final norm).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.nn.functional as F
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
from . import (
    TimmAdapter,
    accepts_any_size,
)

#: the sub-module name that stays float (the continuous position-bias MLP)
FLOAT_MODULE = "cpb_mlp"


class TimmWindowAttentionV2(QAttentionCore):
    """Mixed into ``timm.models.swin_transformer_v2.WindowAttention``."""

    if TYPE_CHECKING:  # mixed into a library's module: its attributes are the library's, untyped here
        def __getattr__(self, name: str) -> Any: ...

    def position_bias(self) -> Tensor:
        """``16 * sigmoid(cpb_mlp(coords))`` as (heads, N, N), as timm computes it."""
        n = self.window_size[0] * self.window_size[1]
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        bias = table[self.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1).contiguous()
        return 16 * torch.sigmoid(bias)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        B_, N, C = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        logit_scale = torch.clamp(self.logit_scale, max=math.log(1.0 / 0.01)).exp()
        if mask is not None:  # (num_win, N, N) -> (B_, 1, N, N), window index fastest as in B_
            mask = mask.unsqueeze(1).repeat(B_ // mask.shape[0], 1, 1, 1)
        x = self.attend(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, logit_scale, scale_first=False,
                        bias=self.position_bias().unsqueeze(0), mask=mask, dropout=self.attn_drop)
        x = x.transpose(1, 2).reshape(B_, N, C)
        return self.proj_drop(self.proj(x))  # type: ignore[no-any-return]


class TimmSwinV2Block(nn.Module):
    """Mixed into timm's ``SwinTransformerV2Block`` (inputs and outputs are B,H,W,C)."""

    if TYPE_CHECKING:  # mixed into a library's module: its attributes are the library's, untyped here
        def __getattr__(self, name: str) -> Any: ...

    add1: QAdd
    add2: QAdd

    def forward_attn(self, x: Tensor) -> Tensor:
        return self.add1(x, self.drop_path1(self.norm1(self._attn(x))))

    def forward_mlp(self, x: Tensor) -> Tensor:
        B, H, W, C = x.shape
        x = x.reshape(B, -1, C)
        x = self.add2(x, self.drop_path2(self.norm2(self.mlp(x))))
        return x.reshape(B, H, W, C)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_mlp(self.forward_attn(x))


def fold_qkv_bias(att: Any) -> None:
    """Move Swin V2's ``q_bias`` / ``k_bias`` (zeros) / ``v_bias`` into ``att.qkv.bias``. Idempotent."""
    if getattr(att, "q_bias", None) is None:
        return
    bias = torch.cat((att.q_bias, att.k_bias, att.v_bias)).detach().clone()
    for name in ("q_bias", "k_bias", "v_bias"):
        delattr(att, name)
        setattr(att, name, None)
    att.qkv.bias = nn.Parameter(bias)


@register_adapter
class TimmSwinV2Adapter(TimmAdapter):
    name = "timm-swinv2"
    description = ("timm SwinTransformerV2 (Swin V2: cosine window attention, continuous position bias kept float, "
                   "residual post-norm, patch merging)")

    @classmethod
    def matches(cls, model: Any) -> bool:
        from timm.models.swin_transformer_v2 import SwinTransformerV2

        return isinstance(model, SwinTransformerV2)

    def accepts_input_size(self, model: Any, hw: tuple[int, int]) -> bool:
        return accepts_any_size(model) or super().accepts_input_size(model, hw)

    def is_wrapped(self, model: Any) -> bool:
        return isinstance(model.layers[0].blocks[0], TimmSwinV2Block)

    def check(self, model: Any) -> None:
        from timm.layers import Mlp
        from timm.models.swin_transformer_v2 import PatchMerging, SwinTransformerV2Block, WindowAttention

        for si, stage in enumerate(model.layers):
            ds = stage.downsample
            if not isinstance(ds, nn.Identity):
                require_type(ds, (PatchMerging,), "downsample", f"layers.{si}.downsample")
            for bi, blk in enumerate(stage.blocks):
                where = f"layers.{si}.blocks.{bi}"
                require_type(blk, (SwinTransformerV2Block,), "Swin V2 block", where)
                require_type(blk.attn, (WindowAttention,), "window attention", where + ".attn")
                require_type(blk.mlp, (Mlp,), "MLP", where + ".mlp")
                if getattr(blk, "dynamic_mask", False):
                    raise ModelError(f"dynamic attention mask at {where} (strict_img_size=False) is not supported: "
                                     "build the model for one image size")
        if not isinstance(model.norm, nn.LayerNorm):
            raise ModelError(f"Swin V2 final norm of type {type(model.norm).__name__} is not supported: LayerNorm only")
        fc = getattr(model.head, "fc", None)
        if not isinstance(fc, (nn.Linear, nn.Identity)):
            raise ModelError(f"Swin V2 head fc of type {type(fc).__name__} is not supported: nn.Linear only")

    def wrap(self, model: Any) -> nn.Module:
        self.check(model)
        swap_conv(model.patch_embed, "proj", Role.PATCH_EMBED)
        swap_layernorm(model.patch_embed, "norm")
        swap_layernorm(model, "norm")
        for stage in model.layers:
            if not isinstance(stage.downsample, nn.Identity):
                swap_linear(stage.downsample, "reduction", Role.REDUCTION_IN)
                swap_layernorm(stage.downsample, "norm")
            for blk in stage.blocks:
                mix_in(blk, TimmSwinV2Block)
                if "add1" not in blk._modules:
                    blk.add1, blk.add2 = QAdd(), QAdd()
                swap_layernorm(blk, "norm1")
                swap_layernorm(blk, "norm2")
                att = blk.attn
                if not isinstance(att, TimmWindowAttentionV2):
                    fold_qkv_bias(att)
                    mix_in(att, TimmWindowAttentionV2)
                    att.init_core(softmax_first=True)
                swap_linear(att, "qkv", Role.QKV_IN)
                swap_linear(att, "proj", Role.PROJ_IN)
                swap_linear(blk.mlp, "fc1", Role.FC1_IN)
                swap_linear(blk.mlp, "fc2", Role.FC2_IN)
        if isinstance(getattr(model.head, "fc", None), nn.Linear):
            swap_linear(model.head, "fc", Role.HEAD_IN)
        self.check_wrapped(model)
        return model

    def float_parts(self, model: Any) -> list[tuple[str, str]]:
        return float_modules(model, (FLOAT_MODULE,), "the continuous position-bias MLP: it reads constant coordinates, not the image")

    def ln_consumers(self, model: Any) -> list[LNPair]:
        """None: every LayerNorm of a post-norm block writes the residual stream; nothing reads a LayerNorm's output
        through a Linear (RepQ-ViT / MOSF have nothing to fold)."""
        return []

    def residual_streams(self, model: Any) -> list[ResidualStream]:
        """One stream per stage. Written by the patch embedding's norm (stage 0) or the stage's patch merging's norm,
        and by every block's post-norms norm1 / norm2 (affine); read by q / k / v (the qkv columns) and fc1 directly,
        at the end by the next patch merging's reduction (the 2x2 neighbours concatenated: the channels 4 times,
        channel fastest) or the final norm."""
        if not isinstance(getattr(model.patch_embed, "norm", None), nn.LayerNorm):
            raise ModelError("Swin V2 without a patch-embedding LayerNorm is not supported by Add_alpha")
        streams: list[ResidualStream] = []
        w: list[StreamWriter] = [StreamWriter("patch_embed.norm", "affine")]
        r: list[StreamReader] = []
        width = int(model.patch_embed.proj.out_channels)
        for si, stage in enumerate(model.layers):
            if not isinstance(stage.downsample, nn.Identity):
                r.append(StreamReader(f"layers.{si}.downsample.reduction", "cols", tile=4))
                streams.append(ResidualStream(f"stage{len(streams)}", width, tuple(w), tuple(r)))
                w, r = [StreamWriter(f"layers.{si}.downsample.norm", "affine")], []
                width = int(stage.downsample.reduction.out_features)
            for bi, _ in enumerate(stage.blocks):
                p = f"layers.{si}.blocks.{bi}"
                w += [StreamWriter(f"{p}.norm1", "affine"), StreamWriter(f"{p}.norm2", "affine")]
                r += [StreamReader(f"{p}.attn.qkv", "cols"), StreamReader(f"{p}.mlp.fc1", "cols")]
        r.append(StreamReader("norm", "ln"))
        streams.append(ResidualStream(f"stage{len(streams)}", width, tuple(w), tuple(r)))
        return streams

    def chain(self, model: Any) -> list[Piece]:
        """embed (patch embed) | per stage: merge (patch merging), then per block: attn half, mlp half | head (final
        norm, pooling, fc)."""
        if not self.is_wrapped(model):
            self.wrap(model)

        def head(x: Tensor) -> Tensor:
            return model.forward_head(model.norm(x))  # type: ignore[no-any-return]

        pieces = [Piece("embed", "embed", model.patch_embed, (model.patch_embed,))]
        nblk = 0
        for si, stage in enumerate(model.layers):
            if not isinstance(stage.downsample, nn.Identity):
                pieces.append(Piece(f"layers.{si}.downsample", "merge", stage.downsample, (stage.downsample,),
                                    stage=si))
            for bi, blk in enumerate(stage.blocks):
                p = f"layers.{si}.blocks.{bi}"
                pieces.append(Piece(f"{p}.attn", "attn", blk.forward_attn, (blk.attn, blk.norm1, blk.add1),
                                    block=nblk, stage=si))
                pieces.append(Piece(f"{p}.mlp", "mlp", blk.forward_mlp, (blk.mlp, blk.norm2, blk.add2),
                                    block=nblk, stage=si))
                nblk += 1
        pieces.append(Piece("head", "head", head, (model.norm, model.head)))
        return pieces


def _predefine() -> None:
    # the mixed classes exist at import, so that pickled / deep-copied models find them by name
    from timm.models.swin_transformer_v2 import SwinTransformerV2Block, WindowAttention

    mixed_class(SwinTransformerV2Block, TimmSwinV2Block)
    mixed_class(WindowAttention, TimmWindowAttentionV2)


_predefine()
