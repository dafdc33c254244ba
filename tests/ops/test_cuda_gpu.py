"""The CUDA backend (msff._C kernels) on a GPU: parity with the reference exactly as the Triton
tests check it (forward, Σy/Σy², the gradient of every input, BN running statistics, train and
eval, awkward shapes and layouts), plus shapes that span several tiles, TF32, opcheck, input
checks, AMP, torch.compile, and cross-backend parity cuda vs triton.

Tolerance rule: tests/ops/ops_testing.py (STYLE.md). All tests are marked ``gpu``: they are
skipped without a CUDA GPU (tests/conftest.py) and run with ``pytest -m gpu tests/ops``.
"""
from __future__ import annotations

import copy

import pytest
import torch
from network_parity import assert_network_parity
from ops_testing import assert_close, assert_close_lowp, disable_tf32, make_layout, randomize_bn
from test_lk_conv import CASES as LK_CASES
from test_lk_conv import _make as lk_make
from test_lk_conv import _run as lk_run
from test_lkam import BLOCK_CASES, _block, _compare_modules, _run_pair
from test_lkam_se import CASES as SE_CASES
from test_lkam_se import _make as se_make
from test_lkam_se import _run as se_run

from msff.models import MSFFNet
from msff.ops import lkam_block
from msff.ops.lk_conv import _lk_conv_op
from msff.ops.lkam_se import _lkam_se_op

pytestmark = pytest.mark.gpu

DEV = "cuda"


@pytest.fixture(autouse=True)
def _ieee_fp32_and_kernels():
    import msff.ops._cuda as cb

    assert cb.unavailable_reason(None) is None, cb.unavailable_reason(None)
    disable_tf32()


def _lk_compare(case, backend="cuda", other="reference"):
    x, w, kw = lk_make(*case)
    (y, s, q), grads = lk_run(x, w, kw, backend)
    (yr, sr, qr), grads_r = lk_run(x, w, kw, other)
    assert_close(y, yr, "y")
    assert_close(s, sr, "ch_sum")
    assert_close(q, qr, "ch_sumsq")
    names = ["x", "weight"] + [k for k in ("bias", "in_scale", "in_shift", "add") if k in kw]
    for n, g, gr in zip(names, grads, grads_r, strict=True):
        assert_close(g, gr, f"grad {n}")
    assert y.stride() == yr.stride()


# Shapes beyond the tiles of the kernels: lines longer than the 64-pixel segment, more output
# channels than one 64-channel tile, more input channels than one K-chunk, the largest k.
BIG_CASES = [
    (2, 70, 66, 9, 150, 15, "w", "all", "channels_last"),
    (2, 33, 130, 131, 5, 15, "h", "pro_stats", "contiguous"),
    (1, 17, 9, 70, 67, 31, "w", "bias_relu_add", "strided"),
    (2, 40, 72, 65, 3, 31, "h", "all", "channels_last"),
]


@pytest.mark.parametrize("case", LK_CASES + BIG_CASES, ids=lambda c: "-".join(map(str, c)))
def test_lk_conv_cuda_matches_reference(case):
    _lk_compare(case)


@pytest.mark.parametrize("case", LK_CASES[:4] + BIG_CASES[:2], ids=lambda c: "-".join(map(str, c)))
def test_lk_conv_cuda_matches_triton(case):
    _lk_compare(case, "cuda", "triton")


def _lowp(x, w, kw, backend):
    (y, s, q), grads = lk_run(x, w, kw, backend)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    kw64 = {k: (v.detach().double().requires_grad_() if torch.is_tensor(v) else v) for k, v in kw.items()}
    (y64, s64, _), g64 = lk_run(x64, w64, kw64, "reference")
    (ylp, slp, _), glp = lk_run(x, w, kw, "reference")
    assert y.dtype == x.dtype
    assert_close_lowp(y, y64, ylp, "y")
    assert_close_lowp(s, s64, slp, "ch_sum")
    for i, (g, gr, gl) in enumerate(zip(grads, g64, glp, strict=True)):
        assert_close_lowp(g, gr, gl, f"grad {i}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", [LK_CASES[4], BIG_CASES[0], BIG_CASES[1]], ids=["small", "big_w", "big_h"])
def test_lk_conv_cuda_low_precision(dtype, case):
    x, w, kw = lk_make(*case[:-1], case[-1], dtype)
    _lowp(x, w, kw, "cuda")


def test_lk_conv_cuda_tf32_follows_the_cudnn_flag():
    case = BIG_CASES[0]
    x, w, kw = lk_make(*case)
    torch.backends.cudnn.allow_tf32 = True
    try:
        # TF32 is a low precision like bf16: held to 2× cuDNN's own TF32 error against fp64.
        _lowp(x, w, kw, "cuda")
    finally:
        disable_tf32()


@pytest.mark.parametrize("case", SE_CASES, ids=lambda c: "-".join(map(str, c)))
def test_lkam_se_cuda_matches_reference(case):
    args = se_make(*case)
    (out, pooled), grads = se_run(args, "cuda")
    (outr, pooledr), grads_r = se_run(args, "reference")
    assert_close(out, outr, "out")
    assert_close(pooled, pooledr, "pooled")
    for i, (g, gr) in enumerate(zip(grads, grads_r, strict=True)):
        assert_close(g, gr, f"grad {i}")
    assert out.stride() == outr.stride()


def _se_lowp_compare(args, out, pooled, grads):
    """Low-precision lkam_se results within 2x of the reference's own error in that precision
    (both against a float64 reference run)."""
    args64 = [a.detach().double().requires_grad_() if a is not None else None for a in args]
    (out64, p64), g64 = se_run(args64, "reference")
    (outlp, plp), glp = se_run(args, "reference")
    assert_close_lowp(out, out64, outlp, "out")
    assert_close_lowp(pooled, p64, plp, "pooled")
    for i, (g, gr, gl) in enumerate(zip(grads, g64, glp, strict=True)):
        assert_close_lowp(g, gr, gl, f"grad {i}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lkam_se_cuda_low_precision(dtype):
    args = se_make(2, 70, 33, 67, 8, "train_proj", "channels_last", dtype)
    (out, pooled), grads = se_run(args, "cuda")
    _se_lowp_compare(args, out, pooled, grads)


@pytest.mark.parametrize("features", ["plain", "all"])
def test_opcheck_cuda_ops(features):
    x, w, kw = lk_make(2, 5, 7, 9, 70, 7, "w", features, "channels_last")
    args = (x, w, kw.get("bias"), kw.get("in_scale"), kw.get("in_shift"), kw.get("add"),
            kw.get("relu", False), kw.get("stats", False))
    torch.library.opcheck(torch.ops.msff.lk_conv_cuda.default, args)
    torch.library.opcheck(_lk_conv_op, (*args, "cuda"))
    se = se_make(2, 12, 9, 7, 3, "train_proj", "contiguous")
    torch.library.opcheck(torch.ops.msff.lkam_se_cuda.default, tuple(se))
    torch.library.opcheck(_lkam_se_op, (*se, "cuda"))


def test_cuda_input_checks_say_what_was_expected():
    x = torch.randn(1, 4, 8, 8, device=DEV)
    op = torch.ops.msff.lk_conv_cuda

    def call(x, w, **kw):
        return op(x, w, kw.get("bias"), kw.get("s"), kw.get("t"), None, False, False)

    with pytest.raises(RuntimeError, match=r"kernel size must be odd and in \[1, 31\].*33"):
        call(x, torch.randn(4, 4, 1, 33, device=DEV))
    with pytest.raises(RuntimeError, match="x must be float32, float16 or bfloat16"):
        call(x.double(), torch.randn(4, 4, 1, 3, device=DEV, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="weight must have the dtype of x"):
        call(x, torch.randn(4, 4, 1, 3, device=DEV, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="weight must be a line kernel"):
        call(x, torch.randn(4, 4, 3, 3, device=DEV))
    with pytest.raises(RuntimeError, match="x must be 4-D"):
        call(x[0], torch.randn(4, 4, 1, 3, device=DEV))
    with pytest.raises(RuntimeError, match="weight must be a CUDA tensor"):
        call(x, torch.randn(4, 4, 1, 3))
    with pytest.raises(RuntimeError, match="in_scale and in_shift must be given together"):
        call(x, torch.randn(4, 4, 1, 3, device=DEV), s=torch.ones(4, device=DEV))
    with pytest.raises(RuntimeError, match=r"bias must have shape \(4,\)"):
        call(x, torch.randn(4, 4, 1, 3, device=DEV), bias=torch.ones(5, device=DEV))


@pytest.mark.parametrize("case", BLOCK_CASES, ids=lambda c: "-".join(map(str, c)))
def test_lkam_block_cuda_matches_reference(case):
    cin, cout, k, N, H, W, train, layout = case
    blk = _block(cin, cout, k).to(DEV)
    x = make_layout(torch.randn(N, cin, H, W, device=DEV), layout)
    (y, gx, fused), (yr, gxr, ref), ref64 = _run_pair(
        blk, x, train, lambda b, x: lkam_block(b, x, backend="cuda"), steps=2 if train else 1, with64=True
    )
    assert_close(y, yr, "out")
    assert_close(gx, gxr, "grad x")
    _compare_modules(fused, ref, ref64=ref64)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_lkam_block_cuda_matches_triton(train):
    blk = _block(24, 40, 15).to(DEV)
    x = torch.randn(2, 24, 37, 83, device=DEV).contiguous(memory_format=torch.channels_last)
    (y, gx, fused), _ = _run_pair(blk, x, train, lambda b, x: lkam_block(b, x, backend="cuda"))
    (yt, gxt, trit), _ = _run_pair(blk, x, train, lambda b, x: lkam_block(b, x, backend="triton"))
    assert_close(y, yt, "out")
    assert_close(gx, gxt, "grad x")
    _compare_modules(fused, trit)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("other", ["reference", "triton"])
def test_msffnet_cuda_matches(train, other):
    model = randomize_bn(MSFFNet(width_multiplier=0.125, lkam_blocks=1, kernel_size=7)).to(DEV)
    x = torch.randn(2, 3, 64, 64, device=DEV)
    g = torch.randn(2, 1, 64, 64, device=DEV)
    # as in test_lkam: compared on the branch the cuda run took (rounding-level ReLU / max-pool
    # flips pinned, network_parity.py), against `other` in fp32 and the reference in float64
    assert_network_parity(model, "cuda", train, x, g, other=other)


def test_lkam_block_cuda_autocast_bf16_channels_last():
    blk = _block(16, 16, 15).to(DEV).train()
    x = torch.randn(2, 16, 33, 70, device=DEV).contiguous(memory_format=torch.channels_last)
    fused, ref, ref64 = copy.deepcopy(blk), copy.deepcopy(blk), copy.deepcopy(blk).double()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = lkam_block(fused, x, backend="cuda")
        ylp = ref.forward_reference(x)
    y64 = ref64.forward_reference(x.double())
    assert y.dtype == ylp.dtype == torch.bfloat16
    assert_close_lowp(y, y64, ylp, "out")


def test_lkam_block_cuda_torch_compile():
    blk = _block(8, 12, 7).to(DEV).train()
    x = torch.randn(2, 8, 19, 23, device=DEV)
    fused, ref = copy.deepcopy(blk), copy.deepcopy(blk)
    fused.backend = "cuda"
    compiled = torch.compile(fused, fullgraph=True)
    xf, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, yr = compiled(xf), ref.forward_reference(xr)
    g = torch.randn_like(yr)
    y.backward(g)
    yr.backward(g)
    assert_close(y, yr)
    assert_close(xf.grad, xr.grad)
    _compare_modules(fused, ref)


def test_cuda_kernels_run_on_a_side_stream():
    x, w, kw = lk_make(2, 6, 10, 9, 70, 7, "w", "all", "contiguous")
    want, _ = lk_run(x, w, kw, "reference")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        got, _ = lk_run(x, w, kw, "cuda")
    torch.cuda.current_stream().wait_stream(s)
    for a, b in zip(got, want, strict=True):
        assert_close(a, b)


# ---- the tensor-core kernels (csrc/cuda/line_conv_tc.cu), opt-in through MSFF_CUDA_CONV ----------
# bf16/fp16, channels_last, Cin and Cout multiples of 8: lines longer than one 128-pixel tile,
# Cin not a multiple of 16 (a zero-filled channel chunk), Cout below one channel tile, H and W
# below k, the E2 channel count (a 32-channel tile on Hopper), k = 31 (forward only: the weight
# gradient falls back to the generic kernel above 15 taps), 1×1.
TC_CASES = [
    (2, 64, 64, 9, 150, 15, "w", "all", "channels_last"),
    (2, 24, 40, 131, 5, 15, "h", "pro_stats", "channels_last"),
    (1, 16, 8, 4, 5, 15, "w", "bias_relu_add", "channels_last"),
    (2, 128, 128, 5, 140, 15, "w", "all", "channels_last"),
    (1, 32, 16, 70, 3, 31, "h", "all", "channels_last"),
    (2, 8, 16, 7, 7, 1, "w", "pro_stats", "channels_last"),
]
TC_KERNELS = {"tc": ("line_conv_tma_kernel", "line_conv_sm80_kernel"),
              "tc-cpasync": ("line_conv_sm90a_kernel", "line_conv_sm80_kernel"),
              "sm80": ("line_conv_sm80_kernel",)}
TC_VARIANTS = ["tc", "tc-cpasync", "sm80"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", TC_VARIANTS)
@pytest.mark.parametrize("case", TC_CASES, ids=lambda c: "-".join(map(str, c)))
def test_lk_conv_tensor_core_kernels_match_reference(case, variant, dtype, monkeypatch):
    monkeypatch.setenv("MSFF_CUDA_CONV", variant)
    x, w, kw = lk_make(*case[:-1], case[-1], dtype)
    _lowp(x, w, kw, "cuda")


@pytest.mark.parametrize("variant", TC_VARIANTS)
def test_lk_conv_tensor_core_kernels_match_generic_and_triton(variant, monkeypatch):
    x, w, kw = lk_make(*TC_CASES[0][:-1], TC_CASES[0][-1], torch.bfloat16)
    monkeypatch.setenv("MSFF_CUDA_CONV", "generic")
    (yg, sg, qg), gg = lk_run(x, w, kw, "cuda")
    (yt, st, qt), gt = lk_run(x, w, kw, "triton")
    monkeypatch.setenv("MSFF_CUDA_CONV", variant)
    (y, s, q), g = lk_run(x, w, kw, "cuda")
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    kw64 = {k: (v.detach().double().requires_grad_() if torch.is_tensor(v) else v) for k, v in kw.items()}
    (y64, s64, _), g64 = lk_run(x64, w64, kw64, "reference")
    # each fused kernel within 2× of the other's own error against float64
    for other_y, other_s, other_g in ((yg, sg, gg), (yt, st, gt)):
        assert_close_lowp(y, y64, other_y, "y")
        assert_close_lowp(s, s64, other_s, "ch_sum")
        for i, (a, r, o) in enumerate(zip(g, g64, other_g, strict=True)):
            assert_close_lowp(a, r, o, f"grad {i}")


@pytest.mark.parametrize("variant", TC_VARIANTS)
def test_lk_conv_tensor_core_kernels_run_and_are_deterministic(variant, monkeypatch):
    monkeypatch.setenv("MSFF_CUDA_CONV", variant)
    x, w, kw = lk_make(*TC_CASES[3][:-1], TC_CASES[3][-1], torch.bfloat16)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        first = lk_run(x, w, kw, "cuda")
        torch.cuda.synchronize()
    names = " ".join(e.name for e in prof.events())
    assert any(k in names for k in TC_KERNELS[variant]), names[:2000]
    if variant == "tc" and torch.cuda.get_device_capability() == (9, 0):
        # Hopper: the TMA + mbarrier forward / input gradient, the wgmma weight gradient
        assert "line_conv_tma_kernel" in names and "line_conv_wgrad_sm90a_kernel" in names
    elif variant == "tc-cpasync" and torch.cuda.get_device_capability() == (9, 0):
        assert "line_conv_sm90a_kernel" in names and "line_conv_tma_kernel" not in names
        assert "line_conv_wgrad_sm90a_kernel" in names
    else:
        assert "line_conv_wgrad_tc_kernel" in names
    second = lk_run(x, w, kw, "cuda")
    # statistics and weight gradient are reduced in a fixed order: bitwise reproducible
    (_, s1, q1), g1 = first
    (_, s2, q2), g2 = second
    assert torch.equal(s1, s2) and torch.equal(q1, q2)
    assert torch.equal(g1[1], g2[1])


# ---- the pointwise / SE kernels (csrc/cuda/pointwise.cu): 16-byte vector and scalar paths -----
# The vector path runs when every tensor is dense with the lead's contiguous axis and that axis'
# length is a multiple of the vector (8 bf16/fp16, 4 fp32); the scalar path otherwise. Shapes
# span several 64-channel tiles (with a tail), several 256-pixel sub-tiles, NCHW (pixels
# contiguous) and channels_last, and one CTA walking more than one sub-tile (E1-like batch).
PW_CASES = [
    (2, 64, 33, 40, 8, "train_proj", "channels_last"),   # vector along channels
    (2, 72, 16, 16, 8, "train", "contiguous"),           # vector along pixels, 2 channel tiles
    (1, 136, 70, 37, 8, "train_proj", "channels_last"),  # 3 channel tiles, an 8-channel tail
    (2, 20, 9, 7, 4, "train", "contiguous"),             # H*W = 63: scalar path
    (1, 12, 64, 65, 3, "train_proj", "channels_last"),   # 12 channels: scalar (bf16) / vector (fp32)
    (2, 16, 6, 5, 4, "eval", "strided"),                 # strided views: scalar path
    (32, 64, 128, 256, 8, "train_proj", "channels_last"),  # span 512: two sub-tiles per CTA
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", PW_CASES, ids=lambda c: "-".join(map(str, c)))
def test_pointwise_kernels_vector_and_scalar_paths(case, dtype):
    args = se_make(*case, dtype)
    (out, pooled), grads = se_run(args, "cuda")
    if dtype == torch.float32:
        (outr, pooledr), grads_r = se_run(args, "reference")
        assert_close(out, outr, "out")
        assert_close(pooled, pooledr, "pooled")
        for i, (g, gr) in enumerate(zip(grads, grads_r, strict=True)):
            assert_close(g, gr, f"grad {i}")
        return
    _se_lowp_compare(args, out, pooled, grads)


@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_pointwise_reductions_are_bitwise_reproducible(layout):
    # per-CTA fp64 partials summed in a fixed order, no atomics: same bits run to run
    args = se_make(4, 64, 64, 72, 8, "train_proj", layout, torch.bfloat16)
    (o1, p1), g1 = se_run(args, "cuda")
    (o2, p2), g2 = se_run(args, "cuda")
    assert torch.equal(o1, o2) and torch.equal(p1, p2)
    for a, b in zip(g1, g2, strict=True):
        assert torch.equal(a, b)
    x, w, kw = lk_make(2, 64, 64, 9, 150, 15, "w", "all", "channels_last", torch.bfloat16)
    (_, _, _), ga = lk_run(x, w, kw, "cuda")
    (_, _, _), gb = lk_run(x, w, kw, "cuda")
    assert torch.equal(ga[2], gb[2])  # grad_bias: lk_conv_bwd_prep's reduction


# ---- the generic conv kernels (csrc/cuda/line_conv.cu): 16-byte path and scalar fallback --------
# MSFF_CUDA_CONV=generic. The 16-byte instantiation <T, 8> (bf16/fp16) / <float, 4> runs when every
# activation is channels_last with Cin and Cout multiples of the vector (host rule:
# line_conv_vector_ok / line_conv_wgrad_vector_ok); the scalar <T, 1> otherwise. Cases: two
# output-channel tiles with a tail, an input-channel chunk with a zero-filled tail (40 = 32 + 8),
# H and W below k, k = 31, 1×1, 12 channels (scalar in bf16, vector in fp32), NCHW, a strided
# view; prologue (pending BN + ReLU) on and off.
_BF, _HF, _F32 = torch.bfloat16, torch.float16, torch.float32
GENERIC_CASES = [
    (2, 64, 72, 9, 150, 15, "w", "all", "channels_last", _BF),
    (2, 40, 16, 131, 5, 15, "h", "pro_stats", "channels_last", _BF),
    (1, 16, 8, 4, 5, 15, "w", "bias_relu_add", "channels_last", _BF),
    (2, 24, 16, 70, 3, 31, "h", "plain", "channels_last", _HF),
    (1, 12, 20, 9, 70, 7, "w", "all", "channels_last", _BF),
    (1, 12, 20, 9, 70, 7, "w", "all", "channels_last", _F32),
    (2, 8, 8, 7, 7, 1, "w", "pro_stats", "channels_last", _F32),
    (2, 16, 16, 9, 70, 15, "w", "all", "contiguous", _BF),
    (2, 16, 16, 9, 70, 15, "h", "all", "strided", _F32),
]


def _generic_expected_width(case):
    cin, cout, layout, dtype = case[1], case[2], case[8], case[9]
    v = 4 if dtype == torch.float32 else 8
    return v if layout == "channels_last" and cin % v == 0 and cout % v == 0 else 1


def _generic_widths(events) -> set:
    """{(kernel, V)} of the generic conv launches among profiler events (demangled or mangled)."""
    import re

    out = set()
    for e in events:
        m = re.search(r"(line_conv_(?:fwd|wgrad)_kernel)(?:<[^<>]*?,\s*(\d+)>|I\w*?Li(\d+)E)", e.name)
        if m:
            out.add((m.group(1), int(m.group(2) or m.group(3))))
    return out


@pytest.mark.parametrize("case", GENERIC_CASES, ids=lambda c: "-".join(map(str, c)))
def test_generic_conv_vector_and_scalar_paths_match_reference(case, monkeypatch):
    from torch.profiler import ProfilerActivity, profile

    monkeypatch.setenv("MSFF_CUDA_CONV", "generic")
    x, w, kw = lk_make(*case)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        (y, s, q), grads = lk_run(x, w, kw, "cuda")
        torch.cuda.synchronize()
    v = _generic_expected_width(case)
    # forward, input gradient (the same kernel) and weight gradient all took the expected path
    assert _generic_widths(prof.events()) == {("line_conv_fwd_kernel", v), ("line_conv_wgrad_kernel", v)}
    if case[9] == torch.float32:
        (yr, sr, qr), grads_r = lk_run(x, w, kw, "reference")
        assert_close(y, yr, "y")
        assert_close(s, sr, "ch_sum")
        assert_close(q, qr, "ch_sumsq")
        for i, (g, gr) in enumerate(zip(grads, grads_r, strict=True)):
            assert_close(g, gr, f"grad {i}")
        assert y.stride() == yr.stride()
    else:
        _lowp(x, w, kw, "cuda")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_generic_conv_vector_path_agrees_with_scalar_path(dtype, monkeypatch):
    # The same values through both instantiations: channels_last (16-byte path) and NCHW (scalar).
    # Staging differs, the arithmetic does not: forward and input gradient agree to rounding.
    monkeypatch.setenv("MSFF_CUDA_CONV", "generic")
    x, w, kw = lk_make(2, 32, 64, 9, 150, 15, "w", "all", "channels_last", dtype)
    (yv, sv, _), gv = lk_run(x, w, kw, "cuda")
    xs = make_layout(x, "contiguous").requires_grad_()
    kws = dict(kw, add=make_layout(kw["add"], "contiguous").requires_grad_())
    (ys, ss, _), gs = lk_run(xs, w, kws, "cuda")
    # bf16: two ulps (an FMA contracted differently flips one rounding); fp32: the 1e-5 rule
    # (the weight gradient's fp32 atomics add the pixel splits in any order)
    rtol = max(2 * torch.finfo(dtype).eps, 1e-5)
    for name, a, b in (("y", yv, ys), ("ch_sum", sv, ss), ("grad x", gv[0], gs[0]), ("grad w", gv[1], gs[1])):
        tol = rtol * b.abs().max().item() + 1e-6
        assert (a.float() - b.float()).abs().max().item() <= tol, name


@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_generic_conv_weight_gradient_is_bitwise_reproducible(layout, monkeypatch):
    # per-split fp32 tiles summed in split order by reduce_wgrad_kernel (no atomics); the
    # shape gives many pixel splits (2 x 9 lines x 3 segments, >= 8 segments per split)
    monkeypatch.setenv("MSFF_CUDA_CONV", "generic")
    x, w, kw = lk_make(4, 32, 64, 9, 150, 15, "w", "all", layout, torch.bfloat16)
    (_, _, _), g1 = lk_run(x, w, kw, "cuda")
    (_, _, _), g2 = lk_run(x, w, kw, "cuda")
    assert torch.equal(g1[1], g2[1])


@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_generic_conv_statistics_keep_their_digits_when_the_mean_dominates(layout, monkeypatch):
    # y = 1e3 + O(0.1): fp32 sums of y and y² per block lose every digit of M2 = Σ(y - ȳ)²; the
    # generic epilogue's shifted sums (c = the block's first value) keep them (SPEC.md, lk_conv)
    from msff.ops.lk_conv import lk_conv

    monkeypatch.setenv("MSFF_CUDA_CONV", "generic")
    x, w, _ = lk_make(2, 16, 24, 9, 150, 15, "w", "plain", layout)
    w = (w.detach() * 0.1).requires_grad_()
    bias = torch.full((24,), 1e3, device=DEV)
    y, s, q = lk_conv(x, w, bias, stats=True, backend="cuda")
    yr, sr, qr = lk_conv(x, w, bias, stats=True, backend="reference")
    assert_close(y, yr, "y")
    assert_close(s, sr, "ch_sum")
    assert_close(q, qr, "M2")


@pytest.mark.parametrize("variant", TC_VARIANTS)
def test_tensor_core_statistics_keep_their_digits_when_the_mean_dominates(variant, monkeypatch):
    # the same as above for the tensor-core kernels' tile_stats (shift c = the value of each row
    # group's first row), bf16 channels_last with lines longer than one tile
    from msff.ops.lk_conv import lk_conv

    monkeypatch.setenv("MSFF_CUDA_CONV", variant)
    x, w, _ = lk_make(2, 16, 24, 9, 150, 15, "w", "plain", "channels_last", torch.bfloat16)
    w = (w.detach() * 0.1).requires_grad_()
    bias = torch.full((24,), 1e3, device=DEV)
    y, s, q = lk_conv(x, w, bias, stats=True, backend="cuda")
    # float64 reference on the same bf16 inputs: the kernel's fp32 epilogue values differ by
    # rounding only, so Σy to ~1e-7 and M2 (~27 per channel here) to ~1e-5; fp32 per-tile Σy²
    # (|y| ~ 1e3) would be off by hundreds
    xd, wd = x.detach().double(), w.detach().double()
    _, sd, qd = lk_conv(xd, wd, bias.double(), stats=True, backend="reference")
    assert torch.allclose(s.double(), sd, rtol=1e-5), (s[:4], sd[:4])
    assert torch.allclose(q.double(), qd, rtol=1e-3), (q[:4], qd[:4])


def test_mma_sync_kernel_runs_its_64_pixel_tile(monkeypatch):
    # Cin 160, k 15 on an H100/H200: 32 channels of resident weights + two 128-pixel halo stages
    # exceed 227 KB, two 64-pixel stages fit: MSFF_CUDA_CONV=sm80 runs line_conv_sm80_kernel<.., 64>
    from msff.ops._cuda import conv_plan

    props = torch.cuda.get_device_properties(0)
    smem = getattr(props, "shared_memory_per_block_optin", 232448)
    plan = conv_plan(2, 160, 64, 9, 150, 15, 1, smem, props.multi_processor_count, cc=80)
    if plan["fwd_bm"] != 64:
        pytest.skip(f"this GPU's {smem} B of shared memory plan {plan['fwd_bm']} x {plan['fwd_bn']}")
    monkeypatch.setenv("MSFF_CUDA_CONV", "sm80")
    x, w, kw = lk_make(2, 160, 64, 9, 150, 15, "w", "all", "channels_last", torch.bfloat16)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        _lowp(x, w, kw, "cuda")
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if "line_conv_sm80_kernel" in e.name]
    # line_conv_sm80_kernel<T, BN, BM>: BM = 64
    assert names and all(n.replace(" ", "").endswith(",64>(msff::LineConvParams)") or "Li64EEEv" in n
                         for n in names), names[:4]
