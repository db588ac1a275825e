"""timm ``SwinTransformer`` (window attention with relative position bias, shifted windows,
patch merging).

* :class:`TimmWindowAttention` replaces timm's ``WindowAttention`` (same sub-module and parameter
  names), computing attention through the :class:`~vitq.nn.QAttentionCore` in timm's order
  (``(q * scale) @ k^T + relative position bias``; the shifted-window mask after SOFTMAX_IN).
* :class:`TimmSwinBlock` is mixed into timm's ``SwinTransformerBlock`` in place: residual adds as
  :class:`~vitq.nn.QAdd`, forward in two halves (inputs and outputs are B,H,W,C).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

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


class TimmWindowAttention(QAttentionCore):
    """Replacement for ``timm.models.swin_transformer.WindowAttention`` (relative position bias,
    shifted-window mask)."""

    if TYPE_CHECKING:  # mixed into a library's module: its attributes are the library's, untyped here
        def __getattr__(self, name: str) -> Any: ...

    def __init__(self, attn: Any) -> None:
        super().__init__()
        self.dim = attn.dim
        self.window_size = attn.window_size
        self.window_area = attn.window_area
        self.num_heads = attn.num_heads
        self.scale = attn.scale
        self.relative_position_bias_table = attn.relative_position_bias_table
        self.register_buffer("relative_position_index", attn.relative_position_index, persistent=False)
        self.qkv = attn.qkv
        self.attn_drop = attn.attn_drop
        self.proj = attn.proj
        self.proj_drop = attn.proj_drop
        self.init_core(softmax_first=True)

    def _get_rel_pos_bias(self) -> Tensor:
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(
            self.window_area, self.window_area, -1)
        return bias.permute(2, 0, 1).contiguous().unsqueeze(0)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        B_, N, C = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if mask is not None:  # (num_win, N, N) -> (B_, 1, N, N), window index fastest as in B_
            mask = mask.unsqueeze(1).repeat(B_ // mask.shape[0], 1, 1, 1)
        x = self.attend(q, k, v, self.scale, bias=self._get_rel_pos_bias(), mask=mask, dropout=self.attn_drop)
        x = x.transpose(1, 2).reshape(B_, N, -1)
        x = self.proj(x)
        x = self.proj_drop(x)
        return x


class TimmSwinBlock(nn.Module):
    """Behaviour mixed into timm's ``SwinTransformerBlock`` (inputs and outputs are B,H,W,C)."""

    if TYPE_CHECKING:  # mixed into a library's module: its attributes are the library's, untyped here
        def __getattr__(self, name: str) -> Any: ...

    add1: QAdd
    add2: QAdd

    @staticmethod
    def from_float(block: Any) -> nn.Module:
        mix_in(block, TimmSwinBlock)
        if "add1" not in block._modules:
            block.add1 = QAdd()
            block.add2 = QAdd()
        return block

    def forward_attn(self, x: Tensor) -> Tensor:
        return self.add1(x, self.drop_path1(self._attn(self.norm1(x))))

    def forward_mlp(self, x: Tensor) -> Tensor:
        B, H, W, C = x.shape
        x = x.reshape(B, -1, C)
        x = self.add2(x, self.drop_path2(self.mlp(self.norm2(x))))
        return x.reshape(B, H, W, C)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_mlp(self.forward_attn(x))


@register_adapter
class TimmSwinAdapter(TimmAdapter):
    name = "timm-swin"
    description = "timm SwinTransformer (Swin v1, any size: window attention, shifted windows, patch merging)"

    @classmethod
    def matches(cls, model: Any) -> bool:
        from timm.models.swin_transformer import SwinTransformer

        return isinstance(model, SwinTransformer)

    def accepts_input_size(self, model: Any, hw: tuple[int, int]) -> bool:
        return accepts_any_size(model) or super().accepts_input_size(model, hw)

    def is_wrapped(self, model: Any) -> bool:
        return isinstance(model.layers[0].blocks[0], TimmSwinBlock)

    def check(self, model: Any) -> None:
        from timm.layers import Mlp
        from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock, WindowAttention

        for si, stage in enumerate(model.layers):
            ds = stage.downsample
            if not isinstance(ds, nn.Identity):
                require_type(ds, (PatchMerging,), "downsample", f"layers.{si}.downsample")
            for bi, blk in enumerate(stage.blocks):
                where = f"layers.{si}.blocks.{bi}"
                require_type(blk, (SwinTransformerBlock,), "Swin block", where)
                require_type(blk.attn, (WindowAttention, TimmWindowAttention), "window attention", where + ".attn")
                require_type(blk.mlp, (Mlp,), "MLP", where + ".mlp")
                if getattr(blk, "dynamic_mask", False):
                    raise ModelError(f"dynamic attention mask at {where} is not supported")
        fc = getattr(model.head, "fc", None)
        if not isinstance(fc, (nn.Linear, nn.Identity)):
            raise ModelError(f"Swin head fc of type {type(fc).__name__} is not supported: nn.Linear only")

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
                TimmSwinBlock.from_float(blk)
                swap_layernorm(blk, "norm1")
                swap_layernorm(blk, "norm2")
                if not isinstance(blk.attn, TimmWindowAttention):
                    blk.attn = TimmWindowAttention(blk.attn)
                swap_linear(blk.attn, "qkv", Role.QKV_IN)
                swap_linear(blk.attn, "proj", Role.PROJ_IN)
                swap_linear(blk.mlp, "fc1", Role.FC1_IN)
                swap_linear(blk.mlp, "fc2", Role.FC2_IN)
        if isinstance(getattr(model.head, "fc", None), nn.Linear):
            swap_linear(model.head, "fc", Role.HEAD_IN)
        self.check_wrapped(model)
        return model

    def ln_consumers(self, model: Any) -> list[LNPair]:
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

    def residual_streams(self, model: Any) -> list[ResidualStream]:
        """One stream per run of stages between patch mergings. Stage 0's is written by the patch
        embedding (its norm if present, else its conv), a later stage's by its patch-merging
        reduction; within a stage by attn.proj / mlp.fc2 of every block. Read by norm1 / norm2, and
        at the end by the next patch merging's norm (which sees the 2x2 neighbours concatenated:
        the channels 4 times, channel fastest) or the final norm."""
        streams: list[ResidualStream] = []
        w: list[StreamWriter] = []
        r: list[StreamReader] = []
        width = 0

        def close() -> None:
            if w:
                streams.append(ResidualStream(f"stage{len(streams)}", width, tuple(w), tuple(r)))

        pe_norm = getattr(model.patch_embed, "norm", None)
        if isinstance(pe_norm, nn.LayerNorm):
            w.append(StreamWriter("patch_embed.norm", "affine"))
        elif isinstance(pe_norm, (nn.Identity, type(None))):
            w.append(StreamWriter("patch_embed.proj", "rows"))
        else:
            raise ModelError(f"patch-embedding norm {type(pe_norm).__name__} is not supported by Add_alpha")
        width = int(model.patch_embed.proj.out_channels)
        for si, stage in enumerate(model.layers):
            if not isinstance(stage.downsample, nn.Identity):
                r.append(StreamReader(f"layers.{si}.downsample.norm", "ln", tile=4))
                close()
                w, r = [StreamWriter(f"layers.{si}.downsample.reduction", "rows")], []
                width = int(stage.downsample.reduction.out_features)
            for bi, _ in enumerate(stage.blocks):
                p = f"layers.{si}.blocks.{bi}"
                w += [StreamWriter(f"{p}.attn.proj", "rows"), StreamWriter(f"{p}.mlp.fc2", "rows")]
                r += [StreamReader(f"{p}.norm1", "ln"), StreamReader(f"{p}.norm2", "ln")]
        if not isinstance(model.norm, nn.LayerNorm):
            raise ModelError("Swin without a final LayerNorm is not supported by Add_alpha")
        r.append(StreamReader("norm", "ln"))
        close()
        return streams

    def chain(self, model: Any) -> list[Piece]:
        """embed (patch embed) | per stage: merge (patch merging), then per block: attn half, mlp
        half | head (final norm, pooling, fc)."""
        if not self.is_wrapped(model):
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


def _predefine() -> None:
    # the mixed block class exists at import, so that pickled / deep-copied models find it by name
    from timm.models.swin_transformer import SwinTransformerBlock

    mixed_class(SwinTransformerBlock, TimmSwinBlock)


_predefine()
