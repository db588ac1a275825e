"""Roles: the places in a ViT that quantization methods care about.

Adapters tag every quantization slot with a role; recipes map roles to quantizer specs. Method
code speaks in roles, never in module names.
"""

from __future__ import annotations

from enum import Enum


class Role(str, Enum):
    # inputs of Linear / Conv layers (the role of a layer is the role of its input)
    PATCH_EMBED = "PATCH_EMBED"    # patch-embedding conv: input is the image
    QKV_IN = "QKV_IN"              # post-LayerNorm (norm1 -> qkv)
    PROJ_IN = "PROJ_IN"            # attention output -> proj
    FC1_IN = "FC1_IN"              # post-LayerNorm (norm2 -> fc1)
    FC2_IN = "FC2_IN"              # post-GELU
    GLU_OUT = "GLU_OUT"            # a gated linear unit's signed product act(x_gate) * x -> fc2 (SwiGLU, EVA-02)
    REDUCTION_IN = "REDUCTION_IN"  # post-LayerNorm in Swin patch merging
    DWCONV_IN = "DWCONV_IN"        # fc1's output -> the MLP's depthwise 3x3 conv, before its activation (PVTv2)
    HEAD_IN = "HEAD_IN"            # classifier input (after final norm + pooling)
    # attention matmul operands
    ATTN_Q = "ATTN_Q"
    ATTN_K = "ATTN_K"
    ATTN_V = "ATTN_V"
    ATTN_PROBS = "ATTN_PROBS"      # post-Softmax
    ATTN_MIXED = "ATTN_MIXED"      # talking heads (CaiT): the probabilities mixed across heads (signed) -> attn @ v
    # fully-quantized extras
    LN_IN = "LN_IN"
    SOFTMAX_IN = "SOFTMAX_IN"
    RESIDUAL = "RESIDUAL"

    def __str__(self) -> str:  # "QKV_IN", not "Role.QKV_IN"
        return self.value


#: Roles whose inputs come straight out of a LayerNorm (RepQ / MOSF reparameterization targets).
POST_LN_ROLES = frozenset({Role.QKV_IN, Role.FC1_IN, Role.REDUCTION_IN})
#: Sites of fully-quantized mode (FQ-ViT, TSPTQ-ViT, AOCQ). A recipe's wildcard rule ``act:*`` does
#: not reach them: they are quantized only where a rule names them.
FULL_QUANT_ROLES = frozenset({Role.LN_IN, Role.SOFTMAX_IN, Role.RESIDUAL})
LAYER_ROLES = frozenset({Role.PATCH_EMBED, Role.QKV_IN, Role.PROJ_IN, Role.FC1_IN, Role.FC2_IN, Role.GLU_OUT,
                         Role.REDUCTION_IN, Role.DWCONV_IN, Role.HEAD_IN})


def parse_role(name: str) -> Role:
    from .errors import ConfigError

    try:
        return Role(name.upper())
    except ValueError:
        raise ConfigError(f"unknown role {name!r}: use one of {', '.join(r.value for r in Role)}") from None
