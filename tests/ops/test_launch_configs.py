"""The GPU launch configurations, exercised in the interpreter.

Under TRITON_INTERPRET the launchers pick few, large programs (the interpreter's cost grows with
the program count), so the GPU paths — several pixel blocks per image, several channel blocks,
the split pixel reductions of the weight gradient and the SE pool (fp32 atomics across programs)
— would go unverified without a GPU. These tests force small/split configurations and the GPU
default configurations and compare the whole LKAM block with the reference (tolerance rule of
``ops_testing.py``).
"""
from __future__ import annotations

import copy

import pytest
import torch
from ops_testing import DEVICE, assert_close, disable_tf32, make_layout, randomize_bn

import msff.kernels.lk_conv as klc
import msff.kernels.lkam_se as kse
from msff.models import LKAMBlock
from msff.ops.lkam import lkam_block

CONFIGS = {
    # many small programs; weight-gradient reduction split 5 ways; SE reductions split in 32-pixel chunks
    "split": dict(fwd=(32, 16, 16, 4, 1), wgrad=(16, 16, 16, 4, 1, 3), se=(16, 16, 4), se_split=16,
                  shape=(18, 20, 3, 2, 5, 7)),
    # the GPU defaults (num_stages is ignored by the interpreter)
    "gpu-default": dict(fwd=(128, 64, 32, 4, 3), wgrad=(64, 64, 64, 4, 3, 3), se=(64, 64, 4),
                        se_split=64, shape=(20, 36, 7, 2, 11, 13)),
}


@pytest.fixture(autouse=True)
def _ieee_fp32():
    disable_tf32()


@pytest.mark.parametrize("cfg", list(CONFIGS))
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_block_with_forced_launch_config(monkeypatch, cfg, train):
    c = CONFIGS[cfg]
    monkeypatch.setattr(klc, "_fwd_blocks", lambda M, cin, cout: c["fwd"])
    monkeypatch.setattr(klc, "_wgrad_cfg", lambda M, cin, cout, K, dev: c["wgrad"])
    monkeypatch.setattr(kse, "_blocks", lambda HW, C: c["se"])
    monkeypatch.setattr(kse, "_split", lambda N, C, HW, BP, BC, dev: c["se_split"])
    cin, cout, k, N, H, W = c["shape"]
    blk = randomize_bn(LKAMBlock(cin, cout, kernel_size=k, reduction=8)).to(DEVICE).train(train)
    fused, ref = copy.deepcopy(blk), copy.deepcopy(blk)
    x = make_layout(torch.randn(N, cin, H, W, device=DEVICE), "channels_last")
    xf, xr = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    y = lkam_block(fused, xf, backend="triton")
    yr = ref.forward_reference(xr)
    g = torch.randn_like(yr)
    y.backward(g)
    yr.backward(g)
    assert_close(y, yr, "out")
    assert_close(xf.grad, xr.grad, "grad x")
    for (n, p), (_, pr) in zip(fused.named_parameters(), ref.named_parameters(), strict=True):
        assert_close(p.grad, pr.grad, f"grad {n}")
    for (n, b), (_, br) in zip(fused.named_buffers(), ref.named_buffers(), strict=True):
        assert_close(b.double(), br.double(), f"buffer {n}")
