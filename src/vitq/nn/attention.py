"""Our own attention cores, so that q@k^T, softmax and attn@v can each be quantized.

timm computes attention with fused SDPA (or a bare ``@``), which leaves nothing to hook. These
modules take over a timm attention module's sub-modules and parameters (same names, so state
dicts are unchanged) and compute attention explicitly, in exactly timm's non-fused order of
operations, through two :class:`QMatMul` layers:

    matmul_qk: (q * scale) @ k^T      slots ATTN_Q, ATTN_K
    softmax                          QSoftmax: slot SOFTMAX_IN, pluggable implementation
    matmul_av: attn @ v              slots ATTN_PROBS (post-Softmax), ATTN_V
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..roles import Role
from .blocks import QSoftmax
from .modules import QMatMul


def _self_attn_bias(n: int, attn: Tensor, attn_mask: Optional[Tensor], is_causal: bool) -> Optional[Tensor]:
    if is_causal:
        return attn.new_full((n, n), float("-inf")).triu_(1)
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        bias = torch.zeros_like(attn_mask, dtype=attn.dtype)
        return bias.masked_fill_(~attn_mask, float("-inf"))
    return attn_mask


class QAttention(nn.Module):
    """Replacement for ``timm.layers.Attention`` (ViT, DeiT, and most plain ViT variants)."""

    def __init__(self, attn: nn.Module) -> None:
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
        self.matmul_qk = QMatMul(Role.ATTN_Q, Role.ATTN_K)
        self.softmax = QSoftmax(dim=-1)
        self.matmul_av = QMatMul(Role.ATTN_PROBS, Role.ATTN_V)

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        B, N, C = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        q = q * self.scale
        attn = self.matmul_qk(q, k.transpose(-2, -1))
        bias = _self_attn_bias(N, attn, attn_mask, is_causal)
        attn = self.softmax(attn, bias)  # the mask is added after SOFTMAX_IN quantization
        attn = self.attn_drop(attn)
        x = self.matmul_av(attn, v)
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        x = self.proj(x)
        x = self.proj_drop(x)
        return x


class QWindowAttention(nn.Module):
    """Replacement for ``timm.models.swin_transformer.WindowAttention`` (relative position bias,
    shifted-window mask)."""

    def __init__(self, attn: nn.Module) -> None:
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
        self.softmax = QSoftmax(dim=-1)
        self.matmul_qk = QMatMul(Role.ATTN_Q, Role.ATTN_K)
        self.matmul_av = QMatMul(Role.ATTN_PROBS, Role.ATTN_V)

    def _get_rel_pos_bias(self) -> Tensor:
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(
            self.window_area, self.window_area, -1)
        return bias.permute(2, 0, 1).contiguous().unsqueeze(0)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        B_, N, C = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q = q * self.scale
        attn = self.matmul_qk(q, k.transpose(-2, -1))
        attn = attn + self._get_rel_pos_bias()
        if mask is not None:  # (num_win, N, N) -> (B_, 1, N, N), window index fastest as in B_
            mask = mask.unsqueeze(1).repeat(B_ // mask.shape[0], 1, 1, 1)
        # the shifted-window mask (-100) is added after SOFTMAX_IN quantization: it is structure, not
        # a logit, and would otherwise stretch the per-tensor range by ~100
        attn = self.softmax(attn, mask)
        attn = self.attn_drop(attn)
        x = self.matmul_av(attn, v)
        x = x.transpose(1, 2).reshape(B_, N, -1)
        x = self.proj(x)
        x = self.proj_drop(x)
        return x
