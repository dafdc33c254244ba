"""Triton kernels of ``msff::lk_conv`` (1-D large-kernel "same" convolution, msff/ops/SPEC.md).

* ``_lk_conv_fwd_kernel``: implicit GEMM. A program owns a tile of BLOCK_M output pixels
  (flattened n·h·w) × BLOCK_N output channels and accumulates, over the k taps and the input
  channels, ``shift(xin)[BLOCK_M, BLOCK_K] @ w_tap[BLOCK_K, BLOCK_N]`` with ``tl.dot`` (tensor
  cores for fp16/bf16, TF32/IEEE for fp32). Prologue: pending BN + ReLU on the input, zero
  padding applied after it. Epilogue: bias, ReLU, residual add, per-channel Σy/Σy² (atomics), or
  (backward-data mode) the backward of the *input's* prologue.
* ``_lk_conv_wgrad_kernel``: weight gradient, per tap ``g^T[BLOCK_N, BLOCK_M] @
  shift(xin)[BLOCK_M, BLOCK_K]`` reduced over the pixels (split over programs, fp32 atomics),
  recomputing the prologue instead of reading a stored activation.

Strides are passed for every tensor, so NCHW, channels_last and non-contiguous inputs all work.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from msff.backend import triton_interpret
from msff.kernels._common import fix_bf16, rtne_bf16

__all__ = ["lk_conv_fwd", "lk_conv_wgrad", "lk_conv_grad_out"]


@triton.jit
def _lk_conv_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, scale_ptr, shift_ptr, add_ptr, y_ptr, sum_ptr, sumsq_ptr,
    px_ptr, pscale_ptr, pshift_ptr, gscale_ptr, gshift_ptr,
    M, CIN, COUT, H, W, K,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_wo, stride_wi, stride_wk,
    stride_an, stride_ac, stride_ah, stride_aw,
    stride_yn, stride_yc, stride_yh, stride_yw,
    stride_pn, stride_pc, stride_ph, stride_pw,
    ALONG_W: tl.constexpr, HAS_PROLOGUE: tl.constexpr, HAS_BIAS: tl.constexpr,
    RELU: tl.constexpr, HAS_ADD: tl.constexpr, STATS: tl.constexpr, PRO_BWD: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, FIX_IN: tl.constexpr, FIX_OUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < COUT
    hw = H * W
    n_idx = offs_m // hw
    rem = offs_m % hw
    h_idx = rem // W
    w_idx = rem % W
    x_base = n_idx.to(tl.int64) * stride_xn
    half = K // 2

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tap in range(0, K):
        d = tap - half
        if ALONG_W:
            hs = h_idx
            ws = w_idx + d
        else:
            hs = h_idx + d
            ws = w_idx
        valid = mask_m & (hs >= 0) & (hs < H) & (ws >= 0) & (ws < W)
        row = x_base + hs.to(tl.int64) * stride_xh + ws.to(tl.int64) * stride_xw
        for c0 in range(0, CIN, BLOCK_K):
            offs_k = c0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < CIN
            amask = valid[:, None] & mask_k[None, :]
            a = tl.load(x_ptr + row[:, None] + offs_k[None, :] * stride_xc, mask=amask, other=0.0)
            if HAS_PROLOGUE:
                s = tl.load(scale_ptr + offs_k, mask=mask_k, other=0.0)
                t = tl.load(shift_ptr + offs_k, mask=mask_k, other=0.0)
                af = tl.maximum(a.to(tl.float32) * s[None, :] + t[None, :], 0.0)
                # zero padding applies to the activated input, not to x
                a = rtne_bf16(tl.where(amask, af, 0.0), FIX_IN).to(x_ptr.dtype.element_ty)
            b = tl.load(
                w_ptr + offs_n[None, :] * stride_wo + offs_k[:, None] * stride_wi + tap * stride_wk,
                mask=mask_k[:, None] & mask_n[None, :], other=0.0,
            )
            if UPCAST:
                acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=DOT_PRECISION)
            else:
                acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    mask2 = mask_m[:, None] & mask_n[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)
        acc += bias[None, :]
    if RELU:
        acc = tl.maximum(acc, 0.0)
    if HAS_ADD:
        a_off = (n_idx.to(tl.int64) * stride_an + h_idx.to(tl.int64) * stride_ah
                 + w_idx.to(tl.int64) * stride_aw)
        addv = tl.load(add_ptr + a_off[:, None] + offs_n[None, :] * stride_ac, mask=mask2, other=0.0)
        acc += addv.to(tl.float32)
    if STATS:
        accm = tl.where(mask2, acc, 0.0)
        tl.atomic_add(sum_ptr + offs_n, tl.sum(accm, axis=0), mask=mask_n)
        tl.atomic_add(sumsq_ptr + offs_n, tl.sum(accm * accm, axis=0), mask=mask_n)
    if PRO_BWD:
        # acc is d(loss)/d(xin) of the producer's prologue xin = relu(px*s + t): chain it to px.
        p_off = (n_idx.to(tl.int64) * stride_pn + h_idx.to(tl.int64) * stride_ph
                 + w_idx.to(tl.int64) * stride_pw)
        pxv = tl.load(px_ptr + p_off[:, None] + offs_n[None, :] * stride_pc, mask=mask2, other=0.0)
        pxv = pxv.to(tl.float32)
        ps = tl.load(pscale_ptr + offs_n, mask=mask_n, other=0.0)
        pt = tl.load(pshift_ptr + offs_n, mask=mask_n, other=0.0)
        live = mask2 & ((pxv * ps[None, :] + pt[None, :]) > 0)
        gm = tl.where(live, acc, 0.0)
        tl.atomic_add(gscale_ptr + offs_n, tl.sum(gm * pxv, axis=0), mask=mask_n)
        tl.atomic_add(gshift_ptr + offs_n, tl.sum(gm, axis=0), mask=mask_n)
        acc = gm * ps[None, :]

    y_off = (n_idx.to(tl.int64) * stride_yn + h_idx.to(tl.int64) * stride_yh
             + w_idx.to(tl.int64) * stride_yw)
    tl.store(y_ptr + y_off[:, None] + offs_n[None, :] * stride_yc,
             rtne_bf16(acc, FIX_OUT).to(y_ptr.dtype.element_ty), mask=mask2)


@triton.jit
def _lk_conv_wgrad_kernel(
    g_ptr, x_ptr, scale_ptr, shift_ptr, dw_ptr,
    M, CIN, COUT, H, W, K, M_PER_PROG,
    stride_gn, stride_gc, stride_gh, stride_gw,
    stride_xn, stride_xc, stride_xh, stride_xw,
    ALONG_W: tl.constexpr, HAS_PROLOGUE: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, FIX_IN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # dw[co, ci, tap] += Σ_m g[m, co] · xin[shift_tap(m), ci]; dw is fp32 (COUT, CIN, K) contiguous
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_z = tl.program_id(2)
    tap = pid_z % K
    split = pid_z // K
    d = tap - K // 2
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_n = offs_n < COUT
    mask_k = offs_k < CIN
    if HAS_PROLOGUE:
        s = tl.load(scale_ptr + offs_k, mask=mask_k, other=0.0)
        t = tl.load(shift_ptr + offs_k, mask=mask_k, other=0.0)
    hw = H * W
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    m_start = split * M_PER_PROG
    for m0 in range(m_start, m_start + M_PER_PROG, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        n_idx = offs_m // hw
        rem = offs_m % hw
        h_idx = rem // W
        w_idx = rem % W
        g_off = (n_idx.to(tl.int64) * stride_gn + h_idx.to(tl.int64) * stride_gh
                 + w_idx.to(tl.int64) * stride_gw)
        gt = tl.load(g_ptr + g_off[None, :] + offs_n[:, None] * stride_gc,
                     mask=mask_n[:, None] & mask_m[None, :], other=0.0)
        if ALONG_W:
            hs = h_idx
            ws = w_idx + d
        else:
            hs = h_idx + d
            ws = w_idx
        valid = mask_m & (hs >= 0) & (hs < H) & (ws >= 0) & (ws < W)
        row = n_idx.to(tl.int64) * stride_xn + hs.to(tl.int64) * stride_xh + ws.to(tl.int64) * stride_xw
        amask = valid[:, None] & mask_k[None, :]
        a = tl.load(x_ptr + row[:, None] + offs_k[None, :] * stride_xc, mask=amask, other=0.0)
        if HAS_PROLOGUE:
            af = tl.maximum(a.to(tl.float32) * s[None, :] + t[None, :], 0.0)
            a = rtne_bf16(tl.where(amask, af, 0.0), FIX_IN).to(x_ptr.dtype.element_ty)
        if UPCAST:
            acc = tl.dot(gt.to(tl.float32), a.to(tl.float32), acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(gt.to(a.dtype), a, acc, input_precision=DOT_PRECISION)
    dw_off = offs_n[:, None] * (CIN * K) + offs_k[None, :] * K + tap
    tl.atomic_add(dw_ptr + dw_off, acc, mask=mask_n[:, None] & mask_k[None, :])


@triton.jit
def _lk_conv_grad_out_kernel(
    gy_ptr, y_ptr, add_ptr, gsum_ptr, gsq_ptr, gr_ptr, gadd_ptr, gbias_ptr,
    M, C, H, W,
    stride_gn, stride_gc, stride_gh, stride_gw,
    stride_yn, stride_yc, stride_yh, stride_yw,
    stride_an, stride_ac, stride_ah, stride_aw,
    stride_rn, stride_rc, stride_rh, stride_rw,
    stride_dn, stride_dc, stride_dh, stride_dw,
    HAS_GSUM: tl.constexpr, HAS_GSQ: tl.constexpr, RELU: tl.constexpr, HAS_ADD: tl.constexpr,
    NEED_GADD: tl.constexpr, NEED_GBIAS: tl.constexpr, FIX_OUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # g = grad_y + grad_sum[c] + 2·y·grad_sumsq[c] (-> grad_add); g_r = g·[relu output > 0];
    # grad_bias[c] = Σ g_r. One pass instead of a chain of full-size fp32 temporaries.
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_m = offs_m < M
    mask_c = offs_c < C
    mask = mask_m[:, None] & mask_c[None, :]
    hw = H * W
    n = (offs_m // hw).to(tl.int64)
    rem = offs_m % hw
    h = (rem // W).to(tl.int64)
    w = (rem % W).to(tl.int64)
    c = offs_c.to(tl.int64)[None, :]
    g = tl.load(gy_ptr + (n * stride_gn + h * stride_gh + w * stride_gw)[:, None] + c * stride_gc,
                mask=mask, other=0.0).to(tl.float32)
    if HAS_GSUM:
        g += tl.load(gsum_ptr + offs_c, mask=mask_c, other=0.0)[None, :]
    if HAS_GSQ or RELU:
        y = tl.load(y_ptr + (n * stride_yn + h * stride_yh + w * stride_yw)[:, None] + c * stride_yc,
                    mask=mask, other=0.0).to(tl.float32)
    if HAS_GSQ:
        g += 2.0 * y * tl.load(gsq_ptr + offs_c, mask=mask_c, other=0.0)[None, :]
    if NEED_GADD:
        tl.store(gadd_ptr + (n * stride_dn + h * stride_dh + w * stride_dw)[:, None] + c * stride_dc,
                 rtne_bf16(g, FIX_OUT).to(gadd_ptr.dtype.element_ty), mask=mask)
    if RELU:
        r = y
        if HAS_ADD:
            r = y - tl.load(add_ptr + (n * stride_an + h * stride_ah + w * stride_aw)[:, None]
                            + c * stride_ac, mask=mask, other=0.0).to(tl.float32)
        g = tl.where(r > 0, g, 0.0)
    g = tl.where(mask, g, 0.0)
    if NEED_GBIAS:
        tl.atomic_add(gbias_ptr + offs_c, tl.sum(g, axis=0), mask=mask_c)
    tl.store(gr_ptr + (n * stride_rn + h * stride_rh + w * stride_rw)[:, None] + c * stride_rc,
             rtne_bf16(g, FIX_OUT).to(gr_ptr.dtype.element_ty), mask=mask)


def _next_pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.backends.cudnn.allow_tf32 and not triton_interpret():
        return "tf32"
    return "ieee"


def _upcast(dtype: torch.dtype) -> bool:
    # The interpreter mis-computes tl.dot with 16-bit operands (ENV-NOTES); GPU keeps them.
    return triton_interpret() and dtype != torch.float32


def _fwd_blocks(M: int, cin: int, cout: int):
    if triton_interpret():
        # few, large programs: the interpreter's cost grows with the program count
        return (min(256, max(16, _next_pow2(M))), min(64, max(16, _next_pow2(cout))),
                min(64, max(16, _next_pow2(cin))), 4, 1)
    bn = 64 if cout <= 64 else 128
    return 128, bn, 32, 4 if bn == 64 else 8, 3


def _sm_count(device) -> int:
    """Streaming multiprocessors of ``device``; an ``int`` is taken as the count itself (the
    offline kernel report plans launches for a GPU it does not have)."""
    if isinstance(device, int):
        return device
    return torch.cuda.get_device_properties(device).multi_processor_count


def _wgrad_cfg(M: int, cin: int, cout: int, K: int, device):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, split): the pixel reduction is split
    over ``split`` programs per (Cout, Cin, tap) tile, reduced with fp32 atomics."""
    if triton_interpret():
        return (min(256, max(16, _next_pow2(M))), min(64, max(16, _next_pow2(cout))),
                min(64, max(16, _next_pow2(cin))), 4, 1, 1)
    BM, BN, BK = 64, 64, 64
    tiles = triton.cdiv(cout, BN) * triton.cdiv(cin, BK) * K
    sms = _sm_count(device)
    split = max(1, min(triton.cdiv(M, BM * 8), triton.cdiv(4 * sms, tiles)))
    return BM, BN, BK, 4, 3, split


def _strides4(t):
    return tuple(int(s) for s in t.stride())


def lk_conv_fwd(x, weight, bias, in_scale, in_shift, add, relu, stats, y, ch_sum, ch_sumsq,
                pro_bwd=None):
    """Launch the forward kernel into the preallocated ``y`` (and ``ch_sum``/``ch_sumsq`` when
    ``stats``; they must be zeroed fp32). ``weight`` is (Cout, Cin, kh, kw) with kh == 1 or
    kw == 1 and any strides. ``pro_bwd``: None or (px, pscale, pshift, gscale, gshift) for the
    backward-data epilogue (gscale/gshift zeroed fp32)."""
    N, cin, H, W = x.shape
    cout, _, kh, kw = weight.shape
    along_w = kh == 1
    K = kw if along_w else kh
    M = N * H * W
    BM, BN, BK, warps, stages = _fwd_blocks(M, cin, cout)
    dummy = y
    has_pro = in_scale is not None
    a = add if add is not None else y
    px, ps, pt, gs, gt = pro_bwd if pro_bwd is not None else (y, y, y, y, y)
    grid = (triton.cdiv(M, BM), triton.cdiv(cout, BN))
    _lk_conv_fwd_kernel[grid](
        x, weight, bias if bias is not None else dummy,
        in_scale if has_pro else dummy, in_shift if has_pro else dummy,
        a, y, ch_sum if stats else dummy, ch_sumsq if stats else dummy,
        px, ps, pt, gs, gt,
        M, cin, cout, H, W, K,
        *_strides4(x),
        int(weight.stride(0)), int(weight.stride(1)), int(weight.stride(3 if along_w else 2)),
        *_strides4(a), *_strides4(y), *_strides4(px),
        ALONG_W=along_w, HAS_PROLOGUE=has_pro, HAS_BIAS=bias is not None, RELU=bool(relu),
        HAS_ADD=add is not None, STATS=bool(stats), PRO_BWD=pro_bwd is not None,
        UPCAST=_upcast(x.dtype), DOT_PRECISION=_dot_precision(x.dtype),
        FIX_IN=fix_bf16(x.dtype), FIX_OUT=fix_bf16(y.dtype),
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, num_warps=warps, num_stages=stages,
    )
    return y


def lk_conv_wgrad(g, x, in_scale, in_shift, kernel_shape):
    """Weight gradient (Cout, Cin, kh, kw) fp32 of the conv of ``xin`` (x after the optional
    prologue) whose output gradient is ``g`` (N, Cout, H, W)."""
    N, cin, H, W = x.shape
    cout = g.shape[1]
    kh, kw = kernel_shape
    along_w = kh == 1
    K = kw if along_w else kh
    M = N * H * W
    dw = torch.zeros((cout, cin, K), dtype=torch.float32, device=x.device)
    BM, BN, BK, warps, stages, split = _wgrad_cfg(M, cin, cout, K, x.device)
    m_per = triton.cdiv(triton.cdiv(M, split), BM) * BM
    split = triton.cdiv(M, m_per)
    has_pro = in_scale is not None
    grid = (triton.cdiv(cout, BN), triton.cdiv(cin, BK), K * split)
    _lk_conv_wgrad_kernel[grid](
        g, x, in_scale if has_pro else dw, in_shift if has_pro else dw, dw,
        M, cin, cout, H, W, K, m_per,
        *_strides4(g), *_strides4(x),
        ALONG_W=along_w, HAS_PROLOGUE=has_pro, UPCAST=_upcast(x.dtype),
        DOT_PRECISION=_dot_precision(x.dtype), FIX_IN=fix_bf16(x.dtype),
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, num_warps=warps, num_stages=stages,
    )
    return dw.view(cout, cin, kh, kw)


def _eltwise_blocks(M: int, C: int):
    if triton_interpret():
        bc = min(128, max(16, _next_pow2(C)))
        return min(max(16, _next_pow2(M)), max(16, 8192 // bc)), bc, 4
    return 128, min(64, max(16, _next_pow2(C))), 4


def lk_conv_grad_out(grad_y, y, add, grad_sum, grad_sumsq, relu, g_r, grad_add, grad_bias):
    """Fill ``g_r`` (and ``grad_add`` / ``grad_bias`` when not None; grad_bias zeroed fp32) per
    SPEC.md's backward: g = grad_y + grad_sum + 2·y·grad_sumsq, g_r = g past the ReLU."""
    N, C, H, W = y.shape
    M = N * H * W
    if M == 0 or C == 0:
        return
    BM, BC, warps = _eltwise_blocks(M, C)
    a = add if add is not None else y
    ga = grad_add if grad_add is not None else g_r
    grid = (triton.cdiv(M, BM), triton.cdiv(C, BC))
    _lk_conv_grad_out_kernel[grid](
        grad_y, y, a, grad_sum if grad_sum is not None else g_r,
        grad_sumsq if grad_sumsq is not None else g_r, g_r, ga,
        grad_bias if grad_bias is not None else g_r,
        M, C, H, W, *_strides4(grad_y), *_strides4(y), *_strides4(a), *_strides4(g_r),
        *_strides4(ga),
        HAS_GSUM=grad_sum is not None, HAS_GSQ=grad_sumsq is not None, RELU=bool(relu),
        HAS_ADD=add is not None, NEED_GADD=grad_add is not None, NEED_GBIAS=grad_bias is not None,
        FIX_OUT=fix_bf16(g_r.dtype), BLOCK_M=BM, BLOCK_C=BC, num_warps=warps,
    )


# ---- launch plans for the offline kernel report (msff/kernel_report.py) -----------------------
# compile_specs must describe exactly what the launchers above launch: it calls their config
# functions (_fwd_blocks, _wgrad_cfg, _eltwise_blocks) and passes the same flags and strides.
# Whoever changes a launcher or a kernel signature updates this section with it;
# tests/test_kernel_report.py checks that every spec compiles for sm_90a and sm_80.
_TRITON_DEFAULT_STAGES = 3  # what a launch without num_stages gets (triton 3.8 CUDAOptions)


class SpecPointer:
    """A stand-in for a tensor argument: its dtype and a 256-byte aligned address, which is all
    Triton's launch-time specialization (pointer type, 16-byte divisibility) looks at."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def data_ptr(self) -> int:
        return 1 << 20

    def __repr__(self) -> str:
        return f"SpecPointer({self.dtype})"


def spec_strides(shape, channels_last: bool):
    """The strides of a dense (N, C, H, W) tensor in NCHW or channels_last."""
    n, c, h, w = shape
    if channels_last:
        return (h * w * c, 1, w * c, c)
    return (c * h * w, h * w, w, 1)


def _kernel_spec(kernel, name, role, values, constexprs, num_warps, num_stages, grid, notes=""):
    """One launch: ``values`` maps every runtime parameter of ``kernel`` to its value (ints as
    launched, tensors as :class:`SpecPointer`), ``constexprs`` every constexpr parameter."""
    params = [p.name for p in kernel.params]
    missing = [p for p in params if p not in values and p not in constexprs]
    if missing:
        raise ValueError(f"{name}: no value for kernel parameters {missing}")
    args = [values[p] if p in values else constexprs[p] for p in params]
    signature = {}
    for p in params:
        if p in constexprs:
            signature[p] = "constexpr"
        else:
            v = values[p]
            if isinstance(v, SpecPointer):
                signature[p] = "*" + {torch.bfloat16: "bf16", torch.float16: "fp16",
                                      torch.float32: "fp32"}[v.dtype]
            else:
                signature[p] = "i64" if abs(int(v)) >= 2 ** 31 else "i32"
    return {
        "name": name, "role": role, "kernel": kernel, "kernel_name": kernel.fn.__name__,
        "signature": signature, "constexprs": dict(constexprs), "args": args,
        "options": {"num_warps": int(num_warps), "num_stages": int(num_stages)},
        "grid": tuple(int(g) for g in grid), "notes": notes,
    }


def _conv_fwd_spec(name, role, N, cin, cout, H, W, K, along_w, xdt, ydt, x_cl, y_cl, w_strides,
                   prologue, bias, relu, add, stats, pro_bwd):
    M = N * H * W
    BM, BN, BK, warps, stages = _fwd_blocks(M, cin, cout)
    P = SpecPointer
    f32 = torch.float32
    xs = spec_strides((N, cin, H, W), x_cl)
    ys = spec_strides((N, cout, H, W), y_cl)
    vals = dict(
        x_ptr=P(xdt), w_ptr=P(xdt), bias_ptr=P(f32) if bias else P(ydt),
        scale_ptr=P(f32) if prologue else P(ydt), shift_ptr=P(f32) if prologue else P(ydt),
        add_ptr=P(ydt), y_ptr=P(ydt), sum_ptr=P(f32) if stats else P(ydt),
        sumsq_ptr=P(f32) if stats else P(ydt),
        px_ptr=P(ydt), pscale_ptr=P(f32) if pro_bwd else P(ydt),
        pshift_ptr=P(f32) if pro_bwd else P(ydt), gscale_ptr=P(f32) if pro_bwd else P(ydt),
        gshift_ptr=P(f32) if pro_bwd else P(ydt),
        M=M, CIN=cin, COUT=cout, H=H, W=W, K=K,
        stride_wo=w_strides[0], stride_wi=w_strides[1], stride_wk=w_strides[2],
    )
    for pre, st in (("x", xs), ("a", ys), ("y", ys), ("p", ys)):
        for dim, v in zip("nchw", st, strict=True):
            vals[f"stride_{pre}{dim}"] = v
    cx = dict(ALONG_W=along_w, HAS_PROLOGUE=prologue, HAS_BIAS=bias, RELU=relu, HAS_ADD=add,
              STATS=stats, PRO_BWD=pro_bwd, UPCAST=_upcast(xdt), DOT_PRECISION=_dot_precision(xdt),
              FIX_IN=fix_bf16(xdt), FIX_OUT=fix_bf16(ydt), BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK)
    grid = (triton.cdiv(M, BM), triton.cdiv(cout, BN))
    return _kernel_spec(_lk_conv_fwd_kernel, name, role, vals, cx, warps, stages, grid)


def compile_specs(problems):
    """The Triton launches of ``msff::lk_conv`` (and its backward) for each problem, with the
    configurations the launchers above choose on a GPU.

    Args:
        problems: iterable of dicts describing one ``lk_conv`` op call each: ``N, cin, cout, H,
            W, K`` (ints), ``along_w`` (1×k kernel if True, k×1 if False), ``dtype`` (torch
            dtype of x / weight / y), ``channels_last`` (bool), ``prologue, bias, relu, add,
            stats`` (bools: the op's optional inputs / flags), ``backward`` (bool: also the
            launches of the Triton backward with every gradient needed), ``sms`` (int, SM count
            of the GPU planned for; 132 = H100/H200 SXM). Optional ``tag`` (str) prefixes names.

    Returns:
        list of dicts, one per kernel launch: ``name``, ``role`` (``conv_fwd`` / ``conv_dgrad``
        main loops, ``conv_wgrad``, ``pointwise``), ``kernel`` (the ``triton.JITFunction``),
        ``kernel_name``, ``signature`` (param -> Triton type or ``constexpr``; ints equal to 1
        are specialized further by Triton at launch), ``constexprs``, ``args`` (every parameter's
        launch value in order, tensors as :class:`SpecPointer`), ``options`` (num_warps,
        num_stages), ``grid``, ``problem`` (the input dict).

    Example:
        >>> specs = compile_specs([dict(N=2, cin=64, cout=64, H=64, W=64, K=15, along_w=True,
        ...     dtype=torch.bfloat16, channels_last=True, prologue=True, bias=False, relu=False,
        ...     add=False, stats=True, backward=True, sms=132)])  # doctest: +SKIP
        >>> [s["role"] for s in specs]  # doctest: +SKIP
        ['conv_fwd', 'pointwise', 'conv_dgrad', 'conv_wgrad']
    """
    if triton_interpret():
        raise RuntimeError("compile_specs describes GPU launches; unset TRITON_INTERPRET "
                           "before importing triton (the interpreter chooses other blocks)")
    out = []
    for pb in problems:
        N, cin, cout, H, W, K = (int(pb[k]) for k in ("N", "cin", "cout", "H", "W", "K"))
        along_w, dt, cl = bool(pb["along_w"]), pb["dtype"], bool(pb["channels_last"])
        pro, bias, relu, add, stats = (bool(pb.get(k, False))
                                       for k in ("prologue", "bias", "relu", "add", "stats"))
        tag = pb.get("tag", "")
        flags = ",".join(f for f, on in (("pro", pro), ("bias", bias), ("relu", relu),
                                         ("add", add), ("stats", stats)) if on) or "plain"
        base = f"{tag}{'1xk' if along_w else 'kx1'} {cin}->{cout} k{K} [{flags}]"
        # weight (Cout, Cin, 1, K) / (Cout, Cin, K, 1) contiguous: the tap stride is 1
        w_st = (cin * K, K, 1)
        specs = [_conv_fwd_spec(f"fwd {base}", "conv_fwd", N, cin, cout, H, W, K, along_w, dt, dt,
                                cl, cl, w_st, pro, bias, relu, add, stats, False)]
        if pb.get("backward", False):
            M = N * H * W
            BM, BC, warps = _eltwise_blocks(M, cout)
            P = SpecPointer
            f32 = torch.float32
            ys = spec_strides((N, cout, H, W), cl)
            vals = dict(gy_ptr=P(dt), y_ptr=P(dt), add_ptr=P(dt),
                        gsum_ptr=P(f32) if stats else P(dt), gsq_ptr=P(f32) if stats else P(dt),
                        gr_ptr=P(dt), gadd_ptr=P(dt), gbias_ptr=P(f32) if bias else P(dt),
                        M=M, C=cout, H=H, W=W)
            for pre in "gyard":
                for dim, v in zip("nchw", ys, strict=True):
                    vals[f"stride_{pre}{dim}"] = v
            cx = dict(HAS_GSUM=stats, HAS_GSQ=stats, RELU=relu, HAS_ADD=add, NEED_GADD=add,
                      NEED_GBIAS=bias, FIX_OUT=fix_bf16(dt), BLOCK_M=BM, BLOCK_C=BC)
            specs.append(_kernel_spec(_lk_conv_grad_out_kernel, f"grad_out {base}", "pointwise",
                                      vals, cx, warps, _TRITON_DEFAULT_STAGES,
                                      (triton.cdiv(M, BM), triton.cdiv(cout, BC))))
            # backward-data: the forward kernel on g_r with the tap-flipped, transposed weight
            # (flip copies; transpose(0, 1) swaps the first two strides)
            specs.append(_conv_fwd_spec(
                f"dgrad {base}", "conv_dgrad", N, cout, cin, H, W, K, along_w, dt, dt, cl, cl,
                (K, cin * K, 1), False, False, False, False, False, pro))
            BMw, BNw, BKw, warps_w, stages_w, split = _wgrad_cfg(M, cin, cout, K,
                                                                 int(pb.get("sms", 132)))
            m_per = triton.cdiv(triton.cdiv(M, split), BMw) * BMw
            split = triton.cdiv(M, m_per)
            xs = spec_strides((N, cin, H, W), cl)
            vals = dict(g_ptr=P(dt), x_ptr=P(dt), scale_ptr=P(f32), shift_ptr=P(f32),
                        dw_ptr=P(f32), M=M, CIN=cin, COUT=cout, H=H, W=W, K=K, M_PER_PROG=m_per)
            for pre, st in (("g", ys), ("x", xs)):
                for dim, v in zip("nchw", st, strict=True):
                    vals[f"stride_{pre}{dim}"] = v
            cx = dict(ALONG_W=along_w, HAS_PROLOGUE=pro, UPCAST=_upcast(dt),
                      DOT_PRECISION=_dot_precision(dt), FIX_IN=fix_bf16(dt),
                      BLOCK_M=BMw, BLOCK_N=BNw, BLOCK_K=BKw)
            specs.append(_kernel_spec(
                _lk_conv_wgrad_kernel, f"wgrad {base}", "conv_wgrad", vals, cx, warps_w, stages_w,
                (triton.cdiv(cout, BNw), triton.cdiv(cin, BKw), K * split),
                notes=f"pixel reduction split {split} ways (fp32 atomics)"))
        for s in specs:
            s["problem"] = dict(pb)
        out += specs
    return out
