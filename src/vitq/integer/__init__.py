"""Integer-arithmetic reference kernels (plain PyTorch integer ops, for checking fake-quant maths).

They are references, not fast kernels: they show that what a fake-quant path simulates can be
computed with integer codes, shifts and int32/int64 accumulation plus one final float rescale.
"""

from .two_scale_ref import integer_layernorm, shifted_integer_values, two_scale_matmul

__all__ = ["integer_layernorm", "shifted_integer_values", "two_scale_matmul"]
