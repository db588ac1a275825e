"""The family-neutral attention core: q·kᵀ, softmax and ·v, each through a quantizable module.

Libraries compute attention with fused kernels (SDPA) or bare ``@``, which leave nothing to hook.
Every adapter's attention module is a :class:`QAttentionCore` (a subclass, or the core mixed into
the library's own class) and hands its projected ``q, k, v`` to :meth:`QAttentionCore.attend`:

    matmul_qk: q @ k^T          slots ATTN_Q, ATTN_K
    (+ bias)                    relative position bias, part of the softmax input
    softmax                     QSoftmax: slot SOFTMAX_IN, pluggable implementation; a structural
                                mask (Swin's shifted windows, a user's attention mask) is added
                                after SOFTMAX_IN, so it never enters a calibrated range
    matmul_av: attn @ v         slots ATTN_PROBS (post-Softmax), ATTN_V

Where the softmax scale is applied follows the library, so that an empty core is bit-exact with
the library's own non-fused attention: ``scale_first`` multiplies ``q`` (timm: ``(q·s) @ kᵀ``),
otherwise the scores are multiplied after the matmul (Hugging Face: ``(q @ kᵀ)·s``). Passes find
attention by this type, never by a family's class.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

from torch import Tensor, nn

from ..roles import Role
from .blocks import QSoftmax
from .modules import QMatMul


class QAttentionCore(nn.Module):
    """Base (or mix-in) of every adapter's attention module: owns ``matmul_qk``, ``softmax`` and
    ``matmul_av`` and computes attention from projected ``q, k, v`` in :meth:`attend`."""

    matmul_qk: QMatMul
    softmax: QSoftmax
    matmul_av: QMatMul

    def init_core(self, softmax_first: bool = False) -> None:
        """Create the three quantizable modules (``softmax_first``: register the softmax before the
        matmuls, the order some families' modules were always built in; it fixes iteration order only)."""
        if softmax_first:
            self.softmax = QSoftmax(dim=-1)
        self.matmul_qk = QMatMul(Role.ATTN_Q, Role.ATTN_K)
        if not softmax_first:
            self.softmax = QSoftmax(dim=-1)
        self.matmul_av = QMatMul(Role.ATTN_PROBS, Role.ATTN_V)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, scale: "float | Tensor", *, scale_first: bool = True,
               bias: "Optional[Tensor | Sequence[Optional[Tensor]]]" = None, mask: Optional[Tensor] = None,
               dropout: Optional[Callable[[Tensor], Tensor]] = None, divide: bool = False) -> Tensor:
        """``softmax(q kᵀ · scale + bias, mask) v`` for ``q, k, v`` of shape (B, heads, N, d). ``bias`` may be a
        sequence (BEiT: the block's relative position bias, then the model's shared one), added in that order, as
        the library adds them (the sum's rounding follows). ``divide``: the library divides the scores by ``scale``
        (transformers' older modules: ``scores / sqrt(d)``, which rounds unlike ``scores * (1 / sqrt(d))``)."""
        if scale_first:
            q = q / scale if divide else q * scale
        attn = self.matmul_qk(q, k.transpose(-2, -1))
        if not scale_first:
            attn = attn / scale if divide else attn * scale
        for b in (bias if isinstance(bias, (list, tuple)) else (bias,)):
            if b is not None:
                attn = attn + b
        attn = self.softmax(attn, mask)
        if dropout is not None:
            attn = dropout(attn)
        return self.matmul_av(attn, v)


__all__ = ["QAttentionCore"]
