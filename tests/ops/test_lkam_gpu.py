"""GPU-only parity of the fused LKAM block at larger shapes (many programs, split reductions,
real tensor-core paths): fp32 with TF32 off under the fp32 rule, bf16 autocast + channels_last
under the low-precision rule of ``ops_testing.py``. Every check covers the output, the input
gradient, every parameter gradient and every buffer (BN running statistics,
``num_batches_tracked``). The GPU tests are marked ``gpu``: skipped without a CUDA GPU
(``make test-gpu`` runs them).

The bf16 checker is also run on CPU at a tiny shape under the Triton interpreter
(``test_bf16_checker_interpreted``), so the checks themselves are exercised (and shown able to
fail) on machines without a GPU.
"""
from __future__ import annotations

import copy

import pytest
import torch
from ops_testing import DEVICE, assert_close, assert_close_lowp, disable_tf32, randomize_bn

from msff.backend import triton_interpret
from msff.models import LKAMBlock
from msff.ops.lkam import lkam_block

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available() or triton_interpret(),
                               reason="needs a CUDA GPU (without TRITON_INTERPRET)")


def _pair(blk, x, train, ctx):
    """Forward + backward of a fused copy and a reference copy of ``blk`` under ``ctx``, with one
    shared output gradient ``g``: ((y, x.grad, module), (y_ref, x_ref.grad, module_ref), g)."""
    fused, ref = copy.deepcopy(blk).train(train), copy.deepcopy(blk).train(train)
    xf, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    with ctx():
        y = lkam_block(fused, xf, backend="triton")
        yr = ref.forward_reference(xr)
    g = torch.randn(yr.shape, device=yr.device, dtype=torch.float32)
    y.backward(g.to(y.dtype))
    yr.backward(g.to(yr.dtype))
    return (y, xf.grad, fused), (yr, xr.grad, ref), g


def check_block_fp32(blk, x, train, rtol):
    disable_tf32()
    (y, gx, f), (yr, gxr, r), _ = _pair(blk, x, train, lambda: torch.autocast(x.device.type, enabled=False))
    assert_close(y, yr, "out", rtol=rtol)
    assert_close(gx, gxr, "grad x", rtol=rtol)
    for (n, p), (_, pr) in zip(f.named_parameters(), r.named_parameters(), strict=True):
        assert_close(p.grad, pr.grad, f"grad {n}", rtol=rtol)
    for (n, b), (_, br) in zip(f.named_buffers(), r.named_buffers(), strict=True):
        assert_close(b.double(), br.double(), f"buffer {n}", rtol=rtol)


def check_block_bf16(blk, x, train):
    """The fused block under bf16 autocast against a float64 run of the reference, every tensor
    under the low-precision rule (``assert_close_lowp``): the fused error may be at most twice
    PyTorch's own bf16 error (the reference under the same autocast) plus two bf16 ulps. Outputs
    and buffers use max-abs errors; gradients Frobenius norms (see ops_testing)."""
    dt = torch.bfloat16
    (y, gx, f), (ylp, gxlp, lp), g = _pair(blk, x, train, lambda: torch.autocast(x.device.type, dtype=dt))
    ref64 = copy.deepcopy(blk).double().train(train)
    x64 = x.double().requires_grad_()
    y64 = ref64.forward_reference(x64)
    y64.backward(g.double())
    assert y.dtype == ylp.dtype == dt
    assert_close_lowp(y, y64, ylp, "out")
    assert_close_lowp(gx, x64.grad, gxlp, "grad x", norm="l2", dtype=dt)
    for (n, p), (_, p64), (_, plp) in zip(f.named_parameters(), ref64.named_parameters(),
                                          lp.named_parameters(), strict=True):
        assert (p.grad is None) == (p64.grad is None), f"grad presence of {n}"
        if p64.grad is not None:
            assert p.grad.dtype == p.dtype, f"grad {n}: {p.grad.dtype} for a {p.dtype} parameter"
            assert_close_lowp(p.grad, p64.grad, plp.grad, f"grad {n}", norm="l2", dtype=dt)
    for (n, b), (_, b64), (_, blp) in zip(f.named_buffers(), ref64.named_buffers(),
                                          lp.named_buffers(), strict=True):
        if b.dtype.is_floating_point:
            assert b.dtype == blp.dtype, f"buffer {n}: {b.dtype} != {blp.dtype}"
            assert_close_lowp(b, b64, blp, f"buffer {n}", dtype=dt)
        else:
            assert torch.equal(b, b64), f"buffer {n}: {b} != {b64}"
    if x.is_contiguous(memory_format=torch.channels_last):
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert gx.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("cin,cout", [(64, 64), (64, 128)])
def test_gpu_block_fp32(train, cin, cout):
    blk = randomize_bn(LKAMBlock(cin, cout, kernel_size=15)).cuda()
    x = torch.randn(4, cin, 67, 93, device="cuda")
    check_block_fp32(blk, x, train, rtol=1e-4)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_gpu_block_bf16_channels_last(train):
    blk = randomize_bn(LKAMBlock(128, 128, kernel_size=15)).cuda().to(memory_format=torch.channels_last)
    x = torch.randn(8, 128, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
    check_block_bf16(blk, x, train)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_bf16_checker_interpreted(train):
    """The same bf16 checks at a tiny shape on this machine's Triton backend (the interpreter on
    CPU), projection shortcut and channels_last included."""
    blk = randomize_bn(LKAMBlock(6, 8, kernel_size=7)).to(DEVICE).to(memory_format=torch.channels_last)
    x = torch.randn(2, 6, 9, 11, device=DEVICE).contiguous(memory_format=torch.channels_last)
    check_block_bf16(blk, x, train)
