"""Helpers shared by the Triton kernels."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from msff._triton_env import triton_interpret


@triton.jit
def rtne_bf16(v, FIX_BF16: tl.constexpr):
    """``v`` (fp32) rounded to the nearest bf16 value (ties to even), still as fp32, when
    FIX_BF16. Needed only in the interpreter, whose fp32 -> bf16 cast truncates (measured: twice
    the error of round-to-nearest, and biased); GPU casts already round to nearest even, so the
    GPU path passes FIX_BF16=False and is unchanged."""
    if FIX_BF16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        v = bits.to(tl.float32, bitcast=True)
    return v


def fix_bf16(dtype: torch.dtype) -> bool:
    return triton_interpret() and dtype == torch.bfloat16
