"""GPU-only parity of the fused LKAM block at larger shapes (many programs, split reductions,
real tensor-core paths): fp32 with TF32 off under the fp32 rule, bf16 autocast + channels_last
under the low-precision rule of ``ops_testing.py``. Marked ``gpu``: skipped without a CUDA GPU
(``make test-gpu`` runs them).
"""
from __future__ import annotations

import copy

import pytest
import torch
from ops_testing import assert_close, assert_close_lowp, disable_tf32, randomize_bn

from msff.backend import triton_interpret
from msff.models import LKAMBlock
from msff.ops.lkam import lkam_block

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or triton_interpret(),
                       reason="needs a CUDA GPU (without TRITON_INTERPRET)"),
]


def _pair(blk, x, train, ctx):
    fused, ref = copy.deepcopy(blk).train(train), copy.deepcopy(blk).train(train)
    xf, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    with ctx():
        y = lkam_block(fused, xf, backend="triton")
        yr = ref.forward_reference(xr)
    g = torch.randn_like(yr)
    y.backward(g)
    yr.backward(g)
    return (y, xf.grad, fused), (yr, xr.grad, ref)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("cin,cout", [(64, 64), (64, 128)])
def test_gpu_block_fp32(train, cin, cout):
    disable_tf32()
    blk = randomize_bn(LKAMBlock(cin, cout, kernel_size=15)).cuda()
    x = torch.randn(4, cin, 67, 93, device="cuda")
    (y, gx, f), (yr, gxr, r) = _pair(blk, x, train, lambda: torch.autocast("cuda", enabled=False))
    assert_close(y, yr, "out", rtol=1e-4)
    assert_close(gx, gxr, "grad x", rtol=1e-4)
    for (n, p), (_, pr) in zip(f.named_parameters(), r.named_parameters(), strict=True):
        assert_close(p.grad, pr.grad, f"grad {n}", rtol=1e-4)
    for (n, b), (_, br) in zip(f.named_buffers(), r.named_buffers(), strict=True):
        assert_close(b.double(), br.double(), f"buffer {n}", rtol=1e-4)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_gpu_block_bf16_channels_last(train):
    blk = randomize_bn(LKAMBlock(128, 128, kernel_size=15)).cuda().to(memory_format=torch.channels_last)
    x = torch.randn(8, 128, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
    (y, gx, f), (ylp, gxlp, _) = _pair(blk, x, train, lambda: torch.autocast("cuda", dtype=torch.bfloat16))
    ref64 = copy.deepcopy(blk).double().train(train)
    x64 = x.double().requires_grad_()
    y64 = ref64.forward_reference(x64)
    for name, a, lp, hi in (("out", y, ylp, y64),):
        assert_close_lowp(a, hi, lp, name)
    assert y.is_contiguous(memory_format=torch.channels_last)
