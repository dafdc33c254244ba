"""Triton kernels of ``msff::lk_conv`` (1-D large-kernel "same" convolution, msff/ops/SPEC.md).

Design (v2, issue 11), built for sm_90a and checked offline by the kernel report:

* Operands are channels_last and dense: a pixel ``m`` (flattened n·h·w) of a tensor with ``C``
  channels starts at element ``m·C``. The launchers make them so (a no-op for the channels_last
  activations of the model); the kernels then know the channel axis is contiguous and the row
  starts are multiples of ``C`` (a constexpr), so every operand load is a 16-byte vector
  (``LDGSTS`` once pipelined) rather than a 2-byte scalar.
* ``_lk_conv_fwd_kernel``: implicit GEMM ``y[M, Cout] = im2col(xin)[M, k·Cin] @ Wp[k·Cin, Cout]``
  with ONE K loop over taps × channel chunks (``BLOCK_K`` ≥ 64 on the GPU at the paper's shapes),
  so Triton's software pipeline reaches a steady state. The tap and channel chunk of an iteration
  are scalars: the A tile is a shifted row block whose out-of-range rows are masked to zero ("same"
  padding); the weights are packed once per call into a zero-padded ``[k·Cin_p, Cout_p]`` matrix, so
  B loads need no mask at all. Epilogue: bias, ReLU, residual add, per-CTA partial Σy and
  Σ(y - ȳ_tile)² (no atomics; combined by ``_stats_combine_kernel`` with Chan's formula in fp64), or (backward-data mode) the backward of the *input's* BN+ReLU with per-CTA
  partial Σ for its scale/shift gradients.
* The input prologue relu(x·s + t) is materialised once per element by ``_lk_conv_prologue_kernel``
  (one vectorised pass) instead of being recomputed for each of the k taps in the main loop: see
  ``PROLOGUE_ROOFLINE`` for the numbers behind that choice.
* ``_lk_conv_wgrad_kernel``: weight gradient as a GEMM ``dW[Cout, k·Cin] = g^T[Cout, M] @
  im2col(xin)[M, k·Cin]`` (N = k·Cin): a program owns ``TAPS`` taps × ``BLOCK_C`` channels of the N
  axis, so g is read k/TAPS times, not k times; the pixel axis is split over programs and each
  writes an fp32 partial; ``_reduce_rows_kernel`` sums partials deterministically in fp64.
* ``_reduce_rows_kernel``: the second, small kernel of every other reduction (bias / BN
  gradients, weight-gradient split-K): fixed order, fp64 accumulation, no atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from msff._triton_env import triton_interpret
from msff.kernels._common import fix_bf16, rtne_bf16

__all__ = ["lk_conv_fwd", "lk_conv_wgrad", "lk_conv_grad_out", "lk_conv_prologue", "nhwc",
           "conv_operand", "padded_channels", "fwd_config", "wgrad_config", "reduce_partials",
           "combine_stats",
           "PROLOGUE_ROOFLINE"]

#: Why the prologue is materialised in one pass (bf16, H100: 3.35 TB/s HBM, ~31 T fp32 lane-op/s,
#: 989 TFLOP/s). Per second conv of a branch, elements = N·Cin·H·W:
#: E1 (32×64×512²): in-loop = k·(Cout/BLOCK_N)·elements ≈ 8.1 G transforms × ~5 instructions
#: ≈ 1.3 ms of ALU issue competing with the MMA (compute floor 1.04 ms); one pass = read + write
#: 2·1.07 GB ≈ 0.64 ms of HBM and a main loop with no register-path A operand.
#: E2 (32×128×256²): in-loop ≈ 4.0 G transforms ≈ 0.65 ms; one pass 1.07 GB ≈ 0.32 ms.
PROLOGUE_ROOFLINE = {
    "E1": {"in_loop_transforms": 15 * 32 * 64 * 512 * 512, "pass_bytes": 4 * 32 * 64 * 512 * 512},
    "E2": {"in_loop_transforms": 15 * 32 * 128 * 256 * 256, "pass_bytes": 4 * 32 * 128 * 256 * 256},
}


@triton.jit
def _pixels(offs, H, W, ALONG_W: tl.constexpr):
    """(dense NHWC pixel index, position along the conv axis, n, h, w) of GEMM rows ``offs``.
    Rows run along the convolved axis (w for 1×k, h for k×1), so the k shifted A tiles of a
    program overlap in all but k-1 rows and their re-reads hit L1."""
    if ALONG_W:
        w = offs % W
        r = offs // W
        h = r % H
        n = r // H
        return offs, w, n, h, w
    h = offs % H
    r = offs // H
    w = r % W
    n = r // W
    return (n * H + h) * W + w, h, n, h, w


@triton.jit
def _lk_conv_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, add_ptr, y_ptr, part_ptr, px_ptr, pscale_ptr, pshift_ptr, pool_ptr,
    M, H, W, COUT, COUT_P, TS, NUM_M_TILES, HW, POOL_J,
    stride_an, stride_ac, stride_ah, stride_aw,
    stride_yn, stride_yc, stride_yh, stride_yw,
    CIN: tl.constexpr, KT: tl.constexpr, ALONG_W: tl.constexpr,
    HAS_BIAS: tl.constexpr, RELU: tl.constexpr, HAS_ADD: tl.constexpr, STATS: tl.constexpr,
    POOL: tl.constexpr, PRO_BWD: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    FIX_OUT: tl.constexpr, A_VEC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # x: dense NHWC (pixel m at m*CIN); w: dense [KT*CIN_P, COUT_P], zero padded.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    NCB: tl.constexpr = (CIN + BLOCK_K - 1) // BLOCK_K
    CIN_P: tl.constexpr = NCB * BLOCK_K
    HALF: tl.constexpr = KT // 2
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    pix, pos, _, _, _ = _pixels(offs_m, H, W, ALONG_W)
    if ALONG_W:
        L = W
    else:
        L = H
    # A_VEC-element (8-byte) async copies: cp.async of 16 bytes is always .cg (L1 bypassed), 8
    # bytes is .ca, so the k-1 rows each tap shares with the previous one come from L1, not L2.
    x_rows = x_ptr + pix.to(tl.int64)[:, None] * CIN + offs_k[None, :]
    w_cols = w_ptr + offs_k[:, None] * COUT_P + offs_n[None, :]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(0, KT * NCB):
        tap = kk // NCB
        c0 = (kk - tap * NCB) * BLOCK_K
        d = tap - HALF
        p = pos + d
        valid = mask_m & (p >= 0) & (p < L)
        a_ptrs = tl.max_contiguous(x_rows + (d * TS * CIN + c0), [1, A_VEC])
        if CIN % BLOCK_K == 0:
            a = tl.load(a_ptrs, mask=valid[:, None], other=0.0)
        else:
            a = tl.load(a_ptrs, mask=valid[:, None] & ((c0 + offs_k) < CIN)[None, :], other=0.0)
        b = tl.load(w_cols + (tap * CIN_P + c0) * COUT_P)
        if UPCAST:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    # epilogue: indices recomputed here so they are not live across the main loop
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    mask_n = offs_n < COUT
    mask2 = mask_m[:, None] & mask_n[None, :]
    pix, _, n_idx, h_idx, w_idx = _pixels(offs_m, H, W, ALONG_W)
    n_idx = n_idx.to(tl.int64)
    h_idx = h_idx.to(tl.int64)
    w_idx = w_idx.to(tl.int64)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)
        acc += bias[None, :]
    if RELU:
        acc = tl.maximum(acc, 0.0)
    if HAS_ADD:
        a_off = n_idx * stride_an + h_idx * stride_ah + w_idx * stride_aw
        addv = tl.load(add_ptr + a_off[:, None] + offs_n[None, :] * stride_ac, mask=mask2, other=0.0)
        acc += addv.to(tl.float32)
    if STATS:
        # this tile's statistics as (K, D, M2): K the rough fp32 tile mean, D = Σ(y - K), M2 =
        # Σ(y - K)² - D²/n. Shifted by K, D and M2 are sums of small numbers (no cancellation at
        # any mean; the exact tile mean is K + D/n). _stats_combine_kernel merges tiles (Chan).
        n_t = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
        kmean = tl.sum(tl.where(mask2, acc, 0.0), axis=0) / n_t
        dev = tl.where(mask2, acc - kmean[None, :], 0.0)
        dsum = tl.sum(dev, axis=0)
        prow = part_ptr + pid_m * COUT_P + offs_n
        tl.store(prow, kmean)
        tl.store(prow + NUM_M_TILES * COUT_P, dsum)
        tl.store(prow + 2 * NUM_M_TILES * COUT_P, tl.sum(dev * dev, axis=0) - dsum * dsum / n_t)
    if PRO_BWD:
        # acc is d(loss)/d(xin) of the producer's prologue xin = relu(px*s + t): chain it to px.
        # px is dense NHWC with COUT channels (the launcher passes nhwc(x))
        pxv = tl.load(px_ptr + pix.to(tl.int64)[:, None] * COUT + offs_n[None, :], mask=mask2,
                      other=0.0)
        pxv = pxv.to(tl.float32)
        ps = tl.load(pscale_ptr + offs_n, mask=mask_n, other=0.0)
        pt = tl.load(pshift_ptr + offs_n, mask=mask_n, other=0.0)
        live = mask2 & ((pxv * ps[None, :] + pt[None, :]) > 0)
        gm = tl.where(live, acc, 0.0)
        prow = part_ptr + pid_m * COUT_P + offs_n
        tl.store(prow, tl.sum(gm * pxv, axis=0))
        tl.store(prow + NUM_M_TILES * COUT_P, tl.sum(gm, axis=0))
        acc = gm * ps[None, :]
    yout = rtne_bf16(acc, FIX_OUT).to(y_ptr.dtype.element_ty)
    if POOL:
        # per-image Σ_{h,w} y of the stored y (the SE squeeze of the next op): GEMM rows are
        # image-major in both row orders, so this tile meets images n0 .. n0 + POOL_J - 1; one
        # partial row per (tile, image slot), gathered by _pool_gather_kernel (no atomics)
        yq = tl.where(mask2, yout.to(tl.float32), 0.0)
        img = offs_m // HW
        n0 = (pid_m * BLOCK_M) // HW
        for j in range(0, POOL_J):
            sel = (img == n0 + j)[:, None]
            tl.store(pool_ptr + (pid_m * POOL_J + j).to(tl.int64) * COUT_P + offs_n,
                     tl.sum(tl.where(sel, yq, 0.0), axis=0))
    y_off = n_idx * stride_yn + h_idx * stride_yh + w_idx * stride_yw
    tl.store(y_ptr + y_off[:, None] + offs_n[None, :] * stride_yc, yout, mask=mask2)


@triton.jit
def _lk_conv_wgrad_kernel(
    g_ptr, x_ptr, part_ptr,
    M, H, W, COUT, TS, M_PER_SPLIT,
    CIN: tl.constexpr, KT: tl.constexpr, ALONG_W: tl.constexpr, TAPS: tl.constexpr,
    EVEN_CO: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    A_VEC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # part[split, co, tap*CIN + ci] = Σ_{m in split} g[m, co] · xin[m shifted by tap, ci]
    # g: dense NHWC (COUT channels); x: dense NHWC xin (CIN channels).
    pid_j = tl.program_id(0)
    pid_co = tl.program_id(1)
    pid_s = tl.program_id(2)
    NCB: tl.constexpr = (CIN + BLOCK_C - 1) // BLOCK_C
    HALF: tl.constexpr = KT // 2
    BLOCK_N: tl.constexpr = TAPS * BLOCK_C
    tg = pid_j // NCB
    c0 = (pid_j - tg * NCB) * BLOCK_C
    col = tl.arange(0, BLOCK_N)
    tap = tg * TAPS + col // BLOCK_C
    cc = c0 + col % BLOCK_C
    d = tap - HALF
    col_ok = tap < KT
    if CIN % BLOCK_C != 0:
        col_ok = col_ok & (cc < CIN)
    col_off = d * (TS * CIN) + cc
    offs_co = pid_co * BLOCK_M + tl.arange(0, BLOCK_M)
    co_ok = offs_co < COUT
    offs_p0 = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    m_start = pid_s * M_PER_SPLIT
    for m0 in range(m_start, m_start + M_PER_SPLIT, BLOCK_K):
        offs_p = m0 + offs_p0
        p_ok = offs_p < M
        pix, pos, _, _, _ = _pixels(offs_p, H, W, ALONG_W)
        g_ptrs = g_ptr + pix.to(tl.int64)[:, None] * COUT + offs_co[None, :]
        if EVEN_CO:
            gt = tl.load(g_ptrs, mask=p_ok[:, None], other=0.0)
        else:
            gt = tl.load(g_ptrs, mask=p_ok[:, None] & co_ok[None, :], other=0.0)
        if ALONG_W:
            L = W
        else:
            L = H
        pp = pos[:, None] + d[None, :]
        xmask = p_ok[:, None] & (pp >= 0) & (pp < L) & col_ok[None, :]
        # the TAPS shifted copies of x overlap: 8-byte (.ca) copies let L1 serve the re-reads
        xt = tl.load(x_ptr + pix.to(tl.int64)[:, None] * CIN
                     + tl.max_contiguous(col_off, A_VEC)[None, :], mask=xmask, other=0.0)
        if UPCAST:
            acc = tl.dot(tl.trans(gt.to(tl.float32)), xt.to(tl.float32), acc,
                         input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(tl.trans(gt), xt, acc, input_precision=DOT_PRECISION)
    dst = part_ptr + pid_s.to(tl.int64) * COUT * (KT * CIN) + offs_co[:, None] * (KT * CIN) \
        + (tap * CIN + cc)[None, :]
    tl.store(dst, acc, mask=co_ok[:, None] & col_ok[None, :])


@triton.jit
def _lk_conv_prologue_kernel(
    x_ptr, scale_ptr, shift_ptr, out_ptr, M, C, C_P, H, W,
    stride_xn, stride_xc, stride_xh, stride_xw,
    FIX_OUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # out (dense NHWC, C_P >= C channels, the padding zero) = relu(x*s + t) in x's dtype: the
    # conv prologue, once per element
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mask = (offs_m < M)[:, None] & mask_c[None, :]
    mask_out = (offs_m < M)[:, None] & (offs_c < C_P)[None, :]
    hw = H * W
    n = (offs_m // hw).to(tl.int64)
    rem = offs_m % hw
    src = n * stride_xn + (rem // W).to(tl.int64) * stride_xh + (rem % W).to(tl.int64) * stride_xw
    v = tl.load(x_ptr + src[:, None] + offs_c[None, :] * stride_xc, mask=mask, other=0.0)
    s = tl.load(scale_ptr + offs_c, mask=mask_c, other=0.0)
    t = tl.load(shift_ptr + offs_c, mask=mask_c, other=0.0)
    v = tl.maximum(v.to(tl.float32) * s[None, :] + t[None, :], 0.0)
    v = tl.where(mask, v, 0.0)
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * C_P + offs_c[None, :],
             rtne_bf16(v, FIX_OUT).to(out_ptr.dtype.element_ty), mask=mask_out)


@triton.jit
def _lk_conv_grad_out_kernel(
    gy_ptr, y_ptr, add_ptr, gsum_ptr, gsq_ptr, gr_ptr, gadd_ptr, part_ptr,
    M, C, C_P, H, W,
    stride_gn, stride_gc, stride_gh, stride_gw,
    stride_yn, stride_yc, stride_yh, stride_yw,
    stride_an, stride_ac, stride_ah, stride_aw,
    stride_dn, stride_dc, stride_dh, stride_dw,
    HAS_GSUM: tl.constexpr, HAS_GSQ: tl.constexpr, RELU: tl.constexpr, HAS_ADD: tl.constexpr,
    NEED_GADD: tl.constexpr, NEED_GBIAS: tl.constexpr, FIX_OUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # g = grad_y + grad_sum[c] + 2·y·grad_sumsq[c] (-> grad_add); g_r = g·[relu output > 0] into
    # a dense NHWC buffer (the operand of the two backward GEMMs); per-CTA partial Σ g_r.
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
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
        tl.store(part_ptr + pid_m * C_P + offs_c, tl.sum(g, axis=0))
    tl.store(gr_ptr + offs_m.to(tl.int64)[:, None] * C + c,
             rtne_bf16(g, FIX_OUT).to(gr_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _reduce_rows_kernel(
    in_ptr, out_ptr, R, C, ROWS_PER_PROG, stride_ig, stride_og,
    OUT_FP32: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # out[g, s, c] = Σ_{r in chunk s} in[g, r, c], fixed order, fp64 accumulation
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_g = tl.program_id(2)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    base = in_ptr + pid_g.to(tl.int64) * stride_ig
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float64)
    r_start = pid_s * ROWS_PER_PROG
    for r0 in range(r_start, r_start + ROWS_PER_PROG, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask = (offs_r < R)[:, None] & mask_c[None, :]
        v = tl.load(base + offs_r.to(tl.int64)[:, None] * C + offs_c[None, :], mask=mask, other=0.0)
        acc += v.to(tl.float64)
    tot = tl.sum(acc, axis=0)
    dst = out_ptr + pid_g.to(tl.int64) * stride_og + pid_s.to(tl.int64) * C + offs_c
    if OUT_FP32:
        tl.store(dst, tot.to(tl.float32), mask=mask_c)
    else:
        tl.store(dst, tot, mask=mask_c)


@triton.jit
def _pool_gather_kernel(
    part_ptr, out_ptr, C, COUT_P, HW, POOL_J, BM,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # out[n, c] = Σ over the M tiles t that meet image n of part[t, n - first image of t, c]:
    # fixed order, fp64 accumulation
    n = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    t0 = (n * HW) // BM
    t1 = ((n + 1) * HW - 1) // BM
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float64)
    for t in range(t0, t1 + 1, BLOCK_T):
        offs_t = t + tl.arange(0, BLOCK_T)
        ok = offs_t <= t1
        j = n - (offs_t * BM) // HW
        row = tl.where(ok, offs_t * POOL_J + j, 0)
        v = tl.load(part_ptr + row[:, None] * COUT_P + offs_c[None, :],
                    mask=ok[:, None] & mask_c[None, :], other=0.0)
        acc += v.to(tl.float64)
    tl.store(out_ptr + n * C + offs_c, tl.sum(acc, axis=0).to(tl.float32), mask=mask_c)


@triton.jit
def _stats_combine_kernel(
    in_ptr, out_ptr, R, C, M, UNIT, ROWS_PER_PROG, stride_ig, stride_og,
    OUT_FINAL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Chan's parallel-variance combination, deterministic, in fp64. in: (3, R, C) rows (K, D, M2)
    # where row r covers n_r = min(UNIT, M - r·UNIT) values of mean K + D/n_r and centred sum of
    # squares M2. Each program merges ROWS_PER_PROG rows in two passes (their mean, then M2 =
    # Σ M2_r + Σ n_r·(mean_r - mean)²) and writes (mean, 0, M2) in fp64 for the next level, or,
    # OUT_FINAL, (Σy, M2) in fp32 as (2, C).
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    r_start = pid_s * ROWS_PER_PROG
    r_end = tl.minimum(r_start + ROWS_PER_PROG, R)
    s_acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float64)
    for r0 in range(r_start, r_end, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        ok_r = offs_r < r_end
        mask = ok_r[:, None] & mask_c[None, :]
        row = offs_r.to(tl.int64)[:, None] * C + offs_c[None, :]
        kv = tl.load(in_ptr + row, mask=mask, other=0.0).to(tl.float64)
        dv = tl.load(in_ptr + stride_ig + row, mask=mask, other=0.0).to(tl.float64)
        n_r = tl.minimum(UNIT, M - offs_r.to(tl.int64) * UNIT)
        n_r = tl.where(ok_r, n_r, 0).to(tl.float64)[:, None]
        s_acc += n_r * kv + dv
    tot = tl.sum(s_acc, axis=0)
    first = r_start.to(tl.int64) * UNIT
    n_chunk = tl.minimum(r_end.to(tl.int64) * UNIT, M) - first
    mean = tot / n_chunk.to(tl.float64)
    m_acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float64)
    for r0 in range(r_start, r_end, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        ok_r = offs_r < r_end
        mask = ok_r[:, None] & mask_c[None, :]
        row = offs_r.to(tl.int64)[:, None] * C + offs_c[None, :]
        kv = tl.load(in_ptr + row, mask=mask, other=0.0).to(tl.float64)
        dv = tl.load(in_ptr + stride_ig + row, mask=mask, other=0.0).to(tl.float64)
        m2 = tl.load(in_ptr + 2 * stride_ig + row, mask=mask, other=0.0).to(tl.float64)
        n_r = tl.minimum(UNIT, M - offs_r.to(tl.int64) * UNIT)
        n_r = tl.where(ok_r, n_r, 1).to(tl.float64)[:, None]
        dm = kv + dv / n_r - mean[None, :]
        m_acc += tl.where(mask, m2 + n_r * dm * dm, 0.0)
    tm2 = tl.sum(m_acc, axis=0)
    dst = out_ptr + pid_s.to(tl.int64) * C + offs_c
    if OUT_FINAL:
        tl.store(dst, tot.to(tl.float32), mask=mask_c)
        tl.store(dst + stride_og, tm2.to(tl.float32), mask=mask_c)
    else:
        tl.store(dst, mean, mask=mask_c)
        tl.store(dst + stride_og, tl.zeros_like(mean), mask=mask_c)
        tl.store(dst + 2 * stride_og, tm2, mask=mask_c)


# ---- launch configurations ---------------------------------------------------------------------
def _next_pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.backends.cudnn.allow_tf32 and not triton_interpret():
        return "tf32"
    return "ieee"


def _a_vec(dtype: torch.dtype) -> int:
    """Elements per async copy of the shifted operand: 8 bytes (the widest cp.async kind that
    allocates in L1)."""
    return 8 // (torch.finfo(dtype).bits // 8)


def _upcast(dtype: torch.dtype) -> bool:
    # The interpreter mis-computes tl.dot with 16-bit operands (ENV-NOTES); GPU keeps them.
    return triton_interpret() and dtype != torch.float32


#: GPU candidates of ``_lk_conv_fwd_kernel`` (forward and input gradient), autotuned per shape
#: key at the first launch (:func:`choose_config`); BLOCK_N / BLOCK_K are clipped to the channel
#: counts. The first is the default (and what the kernel report compiles). 256 x 128 spilled
#: (316-320 B with the stats epilogue), so wide N tiles use BLOCK_M = 128. Every candidate runs in
#: the interpreter (tests/ops/test_launch_configs.py).
FWD_CANDIDATES = {
    "m256n64k64w8s3": dict(BLOCK_M=256, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=3),
    "m128n64k64w4s4": dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4),
    "m128n128k64w8s3": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
}
#: GPU candidates of ``_lk_conv_wgrad_kernel``: the N tile (TAPS x BLOCK_C) and pixel step.
WGRAD_CANDIDATES = {
    "n512k32w8": dict(N_TILE=512, BLOCK_K=32),
    "n256k64w8": dict(N_TILE=256, BLOCK_K=64),
}
#: Per-dtype defaults (first candidate tried / used without autotuning) where the global default
#: spills: fp32 wgrad on sm_80 spilled 36 B at n512k32w8 (255 registers); n256k64w8: 0 (sm_80,
#: sm_90a, paper shapes).
DTYPE_DEFAULTS = {("wgrad", torch.float32): "n256k64w8"}
CONFIG_ENV = "MSFF_TRITON_CONFIG"
AUTOTUNE_ENV = "MSFF_TRITON_AUTOTUNE"
_TUNED: dict = {}


def config_override(kind: str):
    """The candidate name pinned for ``kind`` ("fwd" | "wgrad") by ``MSFF_TRITON_CONFIG``
    (e.g. ``fwd=m128n64k64w4s4,wgrad=n256k64w8``), or None. Pinning makes runs reproducible: the
    autotuner's timing-based choice can differ between runs and so can the summation order."""
    import os

    spec = os.environ.get(CONFIG_ENV, "").strip()
    if not spec:
        return None
    table = {"fwd": FWD_CANDIDATES, "wgrad": WGRAD_CANDIDATES}
    for item in spec.split(","):
        k, sep, name = item.partition("=")
        k, name = k.strip(), name.strip()
        if not sep or k not in table:
            raise ValueError(f"{CONFIG_ENV}: expected 'fwd=NAME' / 'wgrad=NAME' items, got "
                             f"{item!r}")
        if name not in table[k]:
            raise ValueError(f"{CONFIG_ENV}: unknown {k} config {name!r}; known: "
                             f"{', '.join(table[k])}")
        if k == kind:
            return name
    return None


def default_config_name(kind: str, dtype: torch.dtype) -> str:
    """The candidate used for ``kind`` ("fwd" | "wgrad") and ``dtype`` when nothing is pinned and
    nothing is autotuned (and the one the kernel report compiles)."""
    table = FWD_CANDIDATES if kind == "fwd" else WGRAD_CANDIDATES
    return DTYPE_DEFAULTS.get((kind, dtype), next(iter(table)))


def _ordered(kind: str, dtype: torch.dtype, names) -> list:
    first = default_config_name(kind, dtype)
    return [first] + [n for n in names if n != first] if first in names else list(names)


def autotune_enabled() -> bool:
    import os

    return os.environ.get(AUTOTUNE_ENV, "1").strip() not in ("0", "false", "no", "off")


def choose_config(kind: str, key: tuple, run, candidates) -> str:
    """The candidate to launch for a shape ``key``: the ``MSFF_TRITON_CONFIG`` pin if any; else,
    on a GPU with autotuning on (``MSFF_TRITON_AUTOTUNE``, default on), the fastest of
    ``candidates`` by ``triton.testing.do_bench`` of ``run(name)`` (once per key and process);
    else the first candidate. A candidate whose launch needs more shared memory than the GPU
    has (Triton's ``OutOfResources``, raised before the kernel runs: fp32 tiles are twice the
    bytes, e.g. m256n64k64w8s3 wants 240 KB and n256k64w8 288 KB at 128 channels against 227 KB
    per block on H100/H200) is left out of the timing; only when none fits is its error raised."""
    pinned = config_override(kind)
    if pinned is not None:
        return pinned
    names = list(candidates)
    if triton_interpret() or not autotune_enabled() or len(names) == 1:
        return names[0]
    if key not in _TUNED:
        from triton.runtime.errors import OutOfResources
        from triton.testing import do_bench

        times, refused = {}, []
        for n in names:
            try:
                times[n] = do_bench(lambda n=n: run(n), warmup=3, rep=10)
            except OutOfResources as e:
                refused.append(e)
        if not times:
            raise refused[0]
        _TUNED[key] = min(times, key=times.get)
    return _TUNED[key]


def fwd_config(M: int, cin: int, cout: int, pro_bwd: bool = False,
               interpret: bool | None = None, name: str | None = None) -> dict:
    """Launch config of ``_lk_conv_fwd_kernel`` (also the input gradient, with cin/cout swapped
    and ``pro_bwd``): BLOCK_M/N/K, num_warps, num_stages and ``name``. ``name`` picks a GPU
    candidate of :data:`FWD_CANDIDATES` (default: the ``MSFF_TRITON_CONFIG`` pin, else the
    first); BLOCK_N / BLOCK_K are clipped to Cout / Cin. Under the interpreter without a name
    or pin: few, large programs."""
    interpret = triton_interpret() if interpret is None else interpret
    name = name or config_override("fwd")
    if interpret and name is None:
        # few, large programs: the interpreter's cost grows with the program count
        return dict(BLOCK_M=min(256, max(16, _next_pow2(M))),
                    BLOCK_N=min(64, max(16, _next_pow2(cout))),
                    BLOCK_K=min(64, max(16, _next_pow2(cin))), num_warps=4, num_stages=1,
                    name="interpret")
    name = name or next(iter(FWD_CANDIDATES))
    c = FWD_CANDIDATES[name]
    return dict(c, BLOCK_N=min(c["BLOCK_N"], max(16, _next_pow2(cout))),
                BLOCK_K=min(c["BLOCK_K"], max(16, _next_pow2(cin))), name=name)


def wgrad_config(M: int, cin: int, cout: int, K: int, sms: int = 132,
                 interpret: bool | None = None, name: str | None = None) -> dict:
    """Launch config of ``_lk_conv_wgrad_kernel``: BLOCK_M (Cout), BLOCK_C (Cin chunk), TAPS (taps
    per N tile, N tile = TAPS·BLOCK_C), BLOCK_K (pixels per K step), SPLIT (pixel split-K) and
    ``name`` (a :data:`WGRAD_CANDIDATES` key; default the pin, else the first)."""
    interpret = triton_interpret() if interpret is None else interpret
    name = name or config_override("wgrad")
    # L2 traffic of the GEMM ∝ 1/BLOCK_N (g re-read per N tile) + 1/(BLOCK_M·TAPS) (x re-read per
    # M tile, its TAPS shifted copies overlapping): N tile = TAPS·BLOCK_C of 512 (Cout <= 64) or 256.
    bm = min(128, max(16, _next_pow2(cout)))
    bc = min(64, max(16, _next_pow2(cin)))
    if interpret and name is None:
        taps = max(1, min(_next_pow2(K), (512 if bm <= 64 else 256) // bc))
        return dict(BLOCK_M=bm, BLOCK_C=bc, TAPS=taps, BLOCK_K=min(256, max(16, _next_pow2(M))),
                    SPLIT=1, num_warps=4, num_stages=1, name="interpret")
    name = name or next(iter(WGRAD_CANDIDATES))
    c = WGRAD_CANDIDATES[name]
    n_tile = c["N_TILE"] if bm <= 64 else min(c["N_TILE"], 256)
    taps = max(1, min(_next_pow2(K), n_tile // bc))
    bk = c["BLOCK_K"]
    tiles = triton.cdiv(K, taps) * triton.cdiv(cin, bc) * triton.cdiv(cout, bm)
    split = max(1, min(triton.cdiv(M, bk * 16), triton.cdiv(2 * sms, tiles)))
    return dict(BLOCK_M=bm, BLOCK_C=bc, TAPS=taps, BLOCK_K=bk, SPLIT=split,
                num_warps=8 if bm * taps * bc >= 128 * 128 else 4, num_stages=3, name=name)


def _eltwise_blocks(M: int, C: int):
    if triton_interpret():
        bc = min(128, max(16, _next_pow2(C)))
        return min(max(16, _next_pow2(M)), max(16, 8192 // bc)), bc, 4
    return 64, min(128, max(16, _next_pow2(C))), 4


def _reduce_cfg(R: int):
    if triton_interpret():
        return max(16, min(256, _next_pow2(R))), max(1, R)
    return 32, 2048


# ---- host launchers ----------------------------------------------------------------------------
def _strides4(t):
    return tuple(int(s) for s in t.stride())


def nhwc(t: torch.Tensor) -> torch.Tensor:
    """``t`` (N, C, H, W) as a tensor whose memory is dense NHWC (pixel m at element m·C);
    no copy when it already is (channels_last activations)."""
    if t.permute(0, 2, 3, 1).is_contiguous():
        return t
    out = torch.empty((t.shape[0], t.shape[2], t.shape[3], t.shape[1]), dtype=t.dtype,
                      device=t.device)
    out.copy_(t.permute(0, 2, 3, 1))
    return out.permute(0, 3, 1, 2)


def _reduce_plan(R: int, C: int):
    """The launches of :func:`reduce_partials` for R rows: (R, rows_per_prog, S, BLOCK_R,
    BLOCK_C, final) per level; level i+1 reduces the S fp64 rows level i wrote."""
    plan = []
    BC = min(128, max(16, _next_pow2(C)))
    while True:
        BR, rpp = _reduce_cfg(R)
        rpp = triton.cdiv(rpp, BR) * BR
        S = triton.cdiv(R, rpp)
        plan.append((R, rpp, S, BR, BC, S == 1))
        if S == 1:
            return plan
        R = S


def reduce_partials(part: torch.Tensor) -> torch.Tensor:
    """(G, R, C) fp32 partials -> (G, C) fp32 sums over R, deterministic (fp64, fixed order)."""
    G, R, C = part.shape
    out = torch.empty((G, C), dtype=torch.float32, device=part.device)
    if C == 0:
        return out
    if R == 0:
        return out.zero_()
    src = part.contiguous()
    for rows, rpp, S, BR, BC, final in _reduce_plan(R, C):
        dst = out if final else torch.empty((G, S, C), dtype=torch.float64, device=part.device)
        _reduce_rows_kernel[(triton.cdiv(C, BC), S, G)](
            src, dst, rows, C, rpp, rows * C, S * C,
            OUT_FP32=final, BLOCK_R=BR, BLOCK_C=BC, num_warps=4,
        )
        src = dst
    return out


def _combine_block_r(BR: int) -> int:
    # 8 fp64 rows x 128 channels per step on a GPU: 32 rows (the fp32 reduction's) spilled
    # (255 registers, 588 B at the fp64 second level, sm_90a)
    return BR if triton_interpret() else 8


def combine_stats(part: torch.Tensor, M: int, unit: int) -> torch.Tensor:
    """(3, R, C) per-tile statistics (K, D, M2) — row r covers n_r = min(unit, M - r·unit) values
    with mean K + D/n_r and centred sum of squares M2 — -> (2, C) fp32 (Σy, M2 = Σ(y - ȳ)²) over
    all M values: Chan's combination in fp64, deterministic (fixed order, two levels when R is
    large). Used for the BN statistics of the forward's STATS epilogue."""
    _, R, C = part.shape
    out = torch.empty((2, C), dtype=torch.float32, device=part.device)
    if C == 0:
        return out
    if R == 0 or M == 0:
        return out.zero_()
    src = part.contiguous()
    for rows, rpp, S, BR, BC, final in _reduce_plan(R, C):
        dst = out if final else torch.empty((3, S, C), dtype=torch.float64, device=part.device)
        _stats_combine_kernel[(triton.cdiv(C, BC), S)](
            src, dst, rows, C, M, unit, rpp, rows * C, S * C,
            OUT_FINAL=final, BLOCK_R=_combine_block_r(BR), BLOCK_C=BC, num_warps=4,
        )
        src, unit = dst, unit * rpp
    return out


def _pack_weight(weight: torch.Tensor, cin_p: int, cout_p: int) -> torch.Tensor:
    """(Cout, Cin, kh, kw) -> zero-padded [k·cin_p, cout_p] with row tap·cin_p + ci."""
    cout, cin, kh, kw = weight.shape
    K = kh * kw
    wp = torch.zeros((K, cin_p, cout_p), dtype=weight.dtype, device=weight.device)
    wp[:, :cin, :cout] = weight.reshape(cout, cin, K).permute(2, 1, 0)
    return wp.view(K * cin_p, cout_p)


def packed_weight(weight: torch.Tensor, cin_p: int, cout_p: int) -> torch.Tensor:
    """:func:`_pack_weight`, reusing the previous pack when ``weight`` carries a pack cache (the
    BN-folded eval weights of msff.ops.lkam do) and neither its storage nor its version counter
    changed; other weights (training) are packed per call."""
    cache = getattr(weight, "_msff_pack_cache", None)
    if cache is None:
        return _pack_weight(weight, cin_p, cout_p)
    key = (weight.data_ptr(), weight._version, cin_p, cout_p)
    wp = cache.get(key)
    if wp is None:
        cache.clear()
        wp = cache[key] = _pack_weight(weight, cin_p, cout_p)
    return wp


def padded_channels(c: int) -> int:
    """Channels of a conv operand buffer: a multiple of 16, so every pixel row starts 32-byte
    aligned and a row of channels is whole 16-byte vectors (3-band inputs would otherwise be
    loaded two bytes at a time)."""
    return triton.cdiv(c, 16) * 16


def lk_conv_prologue(x, in_scale, in_shift, c_pad=None):
    """relu(x·s + t) in x's dtype, as a dense NHWC tensor (N, c_pad, H, W) whose channels
    beyond C are zero (one vectorised pass)."""
    N, C, H, W = x.shape
    cp = C if c_pad is None else c_pad
    M = N * H * W
    out = torch.empty((N, H, W, cp), dtype=x.dtype, device=x.device).permute(0, 3, 1, 2)
    if out.numel() == 0:
        return out
    BM, BC, warps = _eltwise_blocks(M, cp)
    _lk_conv_prologue_kernel[(triton.cdiv(M, BM), triton.cdiv(cp, BC))](
        x, in_scale, in_shift, out, M, C, cp, H, W, *_strides4(x),
        FIX_OUT=fix_bf16(x.dtype), BLOCK_M=BM, BLOCK_C=BC, num_warps=warps,
    )
    return out


def conv_operand(x, in_scale, in_shift):
    """The activation operand of the conv GEMMs: ``xin`` (after the optional prologue) as dense
    NHWC with :func:`padded_channels` channels (zero padding). No copy for a channels_last ``x``
    with C % 16 == 0 and no prologue."""
    N, C, H, W = x.shape
    cp = padded_channels(C)
    if in_scale is not None:
        return lk_conv_prologue(x, in_scale, in_shift, cp)
    if cp == C:
        return nhwc(x)
    buf = torch.zeros((N, H, W, cp), dtype=x.dtype, device=x.device)
    buf[..., :C].copy_(x.permute(0, 2, 3, 1))
    return buf.permute(0, 3, 1, 2)


def pool_slots(block_m: int, hw: int) -> int:
    """Images a run of ``block_m`` image-major GEMM rows can meet (images of ``hw`` pixels)."""
    return triton.cdiv(block_m - 1, hw) + 1


def _pool_gather_blocks(C: int):
    return (64 if triton_interpret() else 16), min(128, max(16, _next_pow2(C)))


def lk_conv_fwd(x, weight, bias, in_scale, in_shift, add, relu, stats, y, pro_bwd=None,
                pool_out=None):
    """Launch the forward conv into the preallocated ``y``; returns ``(ch_sum, ch_m2)`` fp32
    (Σy and the centred Σ(y - ȳ)²) when ``stats`` (else None). ``weight`` is (Cout, Cin, kh, kw)
    with kh == 1 or kw == 1, any strides. The tile config is :func:`choose_config`'s (pinned,
    autotuned once per shape key on a GPU, or the interpreter's). ``pro_bwd``: None or (px, pscale, pshift) for the backward-data epilogue; then the
    return value is ``(grad_pscale, grad_pshift)``. ``pool_out``: None or an (N, Cout) fp32 tensor
    that receives Σ_{h,w} y per image (of the stored y), from the epilogue's partials."""
    N, _, H, W = x.shape
    cout, _, kh, kw = weight.shape
    along_w = kh == 1
    K = kw if along_w else kh
    M = N * H * W
    xin = conv_operand(x, in_scale, in_shift)
    cin = xin.shape[1]  # padded: the extra input channels are zero, so are their weights
    a = add if add is not None else y
    px, ps, pt = pro_bwd if pro_bwd is not None else (y, None, None)
    px = nhwc(px)
    want_part = bool(stats) or pro_bwd is not None

    def launch(name):
        cfg = fwd_config(M, cin, cout, pro_bwd=pro_bwd is not None, name=name)
        BM, BN, BK = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
        cin_p = triton.cdiv(cin, BK) * BK
        cout_p = triton.cdiv(cout, BN) * BN
        wp = packed_weight(weight, cin_p, cout_p)
        n_m = triton.cdiv(M, BM)
        part = torch.empty(((3 if stats else 2), n_m, cout_p) if want_part else (1,),
                           dtype=torch.float32, device=x.device)
        pool_j = pool_slots(BM, H * W) if pool_out is not None else 1
        ppart = torch.empty((n_m * pool_j, cout_p) if pool_out is not None else (1,),
                            dtype=torch.float32, device=x.device)
        _lk_conv_fwd_kernel[(n_m, triton.cdiv(cout, BN))](
            xin, wp, bias if bias is not None else part, a, y, part, px,
            ps if ps is not None else part, pt if pt is not None else part, ppart,
            M, H, W, cout, cout_p, 1 if along_w else W, n_m, H * W, pool_j,
            *_strides4(a), *_strides4(y),
            CIN=cin, KT=K, ALONG_W=along_w,
            HAS_BIAS=bias is not None, RELU=bool(relu), HAS_ADD=add is not None,
            STATS=bool(stats), POOL=pool_out is not None, PRO_BWD=pro_bwd is not None,
            UPCAST=_upcast(x.dtype), DOT_PRECISION=_dot_precision(x.dtype),
            FIX_OUT=fix_bf16(y.dtype), A_VEC=_a_vec(x.dtype), BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
        return BM, cout_p, part, ppart, pool_j

    if triton_interpret() and config_override("fwd") is None:
        name = None  # the interpreter's own blocks
    else:
        key = ("fwd", x.device.index, x.dtype, M, H * W, cin, cout, K, along_w, bias is not None,
               bool(relu), add is not None, bool(stats), pool_out is not None, pro_bwd is not None)
        # 128 x 128 tiles spill with the prologue-backward epilogue (12-24 B, sm_90a): not tried
        cands = [n for n, c in FWD_CANDIDATES.items() if pro_bwd is None or c["BLOCK_N"] <= 64]
        name = choose_config("fwd", key, launch, _ordered("fwd", x.dtype, cands))
    BM, cout_p, part, ppart, pool_j = launch(name)
    if pool_out is not None:
        BT, BCg = _pool_gather_blocks(cout)
        _pool_gather_kernel[(N, triton.cdiv(cout, BCg))](
            ppart, pool_out, cout, cout_p, H * W, pool_j, BM, BLOCK_T=BT, BLOCK_C=BCg,
            num_warps=4,
        )
    if not want_part:
        return None
    if stats:
        sums = combine_stats(part, M, BM)[:, :cout]
        return sums[0].clone(), sums[1].clone()
    sums = reduce_partials(part)[:, :cout]
    return sums[0].clone(), sums[1].clone()  # separate storages (custom ops forbid aliased outputs)


def lk_conv_wgrad(g_r, x, in_scale, in_shift, kernel_shape):
    """Weight gradient (Cout, Cin, kh, kw) fp32 of the conv of ``xin`` (x after the optional
    prologue) whose output gradient is ``g_r`` (N, Cout, H, W)."""
    N, cin0, H, W = x.shape
    cout = g_r.shape[1]
    kh, kw = kernel_shape
    along_w = kh == 1
    K = kw if along_w else kh
    M = N * H * W
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count \
        if x.device.type == "cuda" else 132
    xin = conv_operand(x, in_scale, in_shift)
    cin = xin.shape[1]  # padded with zero channels; their gradient rows are dropped below
    g = nhwc(g_r)

    def launch(name):
        cfg = wgrad_config(M, cin, cout, K, sms, name=name)
        BKp = cfg["BLOCK_K"]
        m_per = triton.cdiv(triton.cdiv(M, cfg["SPLIT"]), BKp) * BKp
        split = triton.cdiv(M, m_per)
        part = torch.empty((1, split, cout * K * cin), dtype=torch.float32, device=x.device)
        grid = (triton.cdiv(K, cfg["TAPS"]) * triton.cdiv(cin, cfg["BLOCK_C"]),
                triton.cdiv(cout, cfg["BLOCK_M"]), split)
        _lk_conv_wgrad_kernel[grid](
            g, xin, part, M, H, W, cout, 1 if along_w else W, m_per,
            CIN=cin, KT=K, ALONG_W=along_w, TAPS=cfg["TAPS"], EVEN_CO=cout % cfg["BLOCK_M"] == 0,
            UPCAST=_upcast(x.dtype),
            DOT_PRECISION=_dot_precision(x.dtype), A_VEC=_a_vec(x.dtype), BLOCK_M=cfg["BLOCK_M"],
            BLOCK_C=cfg["BLOCK_C"],
            BLOCK_K=BKp, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
        return part

    if triton_interpret() and config_override("wgrad") is None:
        name = None
    else:
        key = ("wgrad", x.device.index, x.dtype, M, cin, cout, K, along_w)
        name = choose_config("wgrad", key, launch, _ordered("wgrad", x.dtype, WGRAD_CANDIDATES))
    part = launch(name)
    dw = reduce_partials(part)[0].view(cout, K, cin)[:, :, :cin0]
    return dw.permute(0, 2, 1).reshape(cout, cin0, kh, kw)


def lk_conv_grad_out(grad_y, y, add, grad_sum, grad_sumsq, relu, grad_add, need_gbias):
    """SPEC.md's backward head: g = grad_y + grad_sum + 2·y·grad_sumsq (written to ``grad_add``
    when not None), g_r = g past the ReLU. Returns (g_r as dense NHWC, grad_bias or None)."""
    N, C, H, W = y.shape
    M = N * H * W
    g_r = torch.empty((N, H, W, C), dtype=y.dtype, device=y.device).permute(0, 3, 1, 2)
    if M == 0 or C == 0:
        gb = torch.zeros((C,), dtype=torch.float32, device=y.device) if need_gbias else None
        return g_r, gb
    BM, BC, warps = _eltwise_blocks(M, C)
    n_m = triton.cdiv(M, BM)
    c_p = triton.cdiv(C, BC) * BC
    part = torch.empty((1, n_m, c_p) if need_gbias else (1,), dtype=torch.float32, device=y.device)
    a = add if add is not None else y
    ga = grad_add if grad_add is not None else g_r
    grid = (n_m, triton.cdiv(C, BC))
    _lk_conv_grad_out_kernel[grid](
        grad_y, y, a, grad_sum if grad_sum is not None else part,
        grad_sumsq if grad_sumsq is not None else part, g_r, ga, part,
        M, C, c_p, H, W, *_strides4(grad_y), *_strides4(y), *_strides4(a), *_strides4(ga),
        HAS_GSUM=grad_sum is not None, HAS_GSQ=grad_sumsq is not None, RELU=bool(relu),
        HAS_ADD=add is not None, NEED_GADD=grad_add is not None, NEED_GBIAS=bool(need_gbias),
        FIX_OUT=fix_bf16(g_r.dtype), BLOCK_M=BM, BLOCK_C=BC, num_warps=warps,
    )
    gb = reduce_partials(part)[0, :C].clone() if need_gbias else None
    return g_r, gb


# ---- launch plans for the offline kernel report (msff/kernel_report.py) -----------------------
# compile_specs must describe exactly what the launchers above launch: it calls their config
# functions (fwd_config, wgrad_config, _eltwise_blocks, _reduce_plan) and passes the same flags
# and strides. Whoever changes a launcher or a kernel signature updates this section with it;
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
                                      torch.float32: "fp32", torch.float64: "fp64"}[v.dtype]
            else:
                signature[p] = "i64" if abs(int(v)) >= 2 ** 31 else "i32"
    return {
        "name": name, "role": role, "kernel": kernel, "kernel_name": kernel.fn.__name__,
        "signature": signature, "constexprs": dict(constexprs), "args": args,
        "options": {"num_warps": int(num_warps), "num_stages": int(num_stages)},
        "grid": tuple(int(g) for g in grid), "notes": notes,
    }


def _reduce_specs(name, G, R, C):
    specs = []
    for lvl, (r, rpp, S, BR, BC, final) in enumerate(_reduce_plan(R, C)):
        src = SpecPointer(torch.float32 if lvl == 0 else torch.float64)
        dst = SpecPointer(torch.float32 if final else torch.float64)
        vals = dict(in_ptr=src, out_ptr=dst, R=r, C=C, ROWS_PER_PROG=rpp, stride_ig=r * C,
                    stride_og=S * C)
        specs.append(_kernel_spec(_reduce_rows_kernel, f"{name} reduce L{lvl}", "reduction", vals,
                                  dict(OUT_FP32=final, BLOCK_R=BR, BLOCK_C=BC), 4,
                                  _TRITON_DEFAULT_STAGES, (triton.cdiv(C, BC), S, G)))
        nbytes = G * C * (r * (4 if lvl == 0 else 8) + S * (4 if final else 8))
        specs[-1]["traffic"] = dict(hbm_bytes=nbytes, tile_a_bytes=nbytes, tile_b_bytes=0,
                                    tiling_note=f"{G}x{r}x{C} partials read once")
    return specs


def _combine_specs(name, R, C, M, unit):
    specs = []
    for lvl, (r, rpp, S, BR, BC, final) in enumerate(_reduce_plan(R, C)):
        src = SpecPointer(torch.float32 if lvl == 0 else torch.float64)
        dst = SpecPointer(torch.float32 if final else torch.float64)
        vals = dict(in_ptr=src, out_ptr=dst, R=r, C=C, M=M, UNIT=unit, ROWS_PER_PROG=rpp,
                    stride_ig=r * C, stride_og=S * C)
        specs.append(_kernel_spec(_stats_combine_kernel, f"{name} stats L{lvl}", "reduction",
                                  vals, dict(OUT_FINAL=final, BLOCK_R=_combine_block_r(BR),
                                             BLOCK_C=BC), 4,
                                  _TRITON_DEFAULT_STAGES, (triton.cdiv(C, BC), S)))
        # two passes over the rows: K, D in both, M2 in the second (fp32 at level 0, else fp64)
        nbytes = C * (r * (5 if lvl == 0 else 10) * 4 + S * (8 if final else 24))
        specs[-1]["traffic"] = dict(hbm_bytes=nbytes, tile_a_bytes=nbytes, tile_b_bytes=0,
                                    tiling_note=f"3x{r}x{C} (K, D, M2) partials, Chan's "
                                                "combination in two passes")
        unit *= rpp
    return specs


def _prologue_spec(name, N, C, H, W, dt, x_cl):
    M = N * H * W
    cp = padded_channels(C)
    BM, BC, warps = _eltwise_blocks(M, cp)
    P = SpecPointer
    vals = dict(x_ptr=P(dt), scale_ptr=P(torch.float32), shift_ptr=P(torch.float32), out_ptr=P(dt),
                M=M, C=C, C_P=cp, H=H, W=W)
    for dim, v in zip("nchw", spec_strides((N, C, H, W), x_cl), strict=True):
        vals[f"stride_x{dim}"] = v
    spec = _kernel_spec(_lk_conv_prologue_kernel, name, "pointwise", vals,
                        dict(FIX_OUT=fix_bf16(dt), BLOCK_M=BM, BLOCK_C=BC), warps,
                        _TRITON_DEFAULT_STAGES, (triton.cdiv(M, BM), triton.cdiv(cp, BC)))
    nbytes = M * (C + cp) * (torch.finfo(dt).bits // 8)
    spec["traffic"] = dict(hbm_bytes=nbytes, tile_a_bytes=nbytes, tile_b_bytes=0,
                           tiling_note="x read once, relu(x*s+t) written once (NHWC)")
    return spec


def _conv_fwd_spec(name, role, N, cin, cout, H, W, K, along_w, dt, y_cl, bias, relu, add, stats,
                   pro_bwd, pool=False):
    """The forward-kernel launch of :func:`lk_conv_fwd` (x dense NHWC after prologue/nhwc)."""
    M = N * H * W
    cin = padded_channels(cin)  # the launcher's operand buffer
    cfg = fwd_config(M, cin, cout, pro_bwd=pro_bwd, interpret=False,
                     name=config_override("fwd") or default_config_name("fwd", dt))
    BM, BN, BK = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    P = SpecPointer
    f32 = torch.float32
    n_m = triton.cdiv(M, BM)
    ys = spec_strides((N, cout, H, W), y_cl)
    pool_j = pool_slots(BM, H * W) if pool else 1
    vals = dict(x_ptr=P(dt), w_ptr=P(dt), bias_ptr=P(f32), add_ptr=P(dt), y_ptr=P(dt),
                part_ptr=P(f32), px_ptr=P(dt), pscale_ptr=P(f32), pshift_ptr=P(f32),
                pool_ptr=P(f32), M=M, H=H, W=W, COUT=cout, COUT_P=triton.cdiv(cout, BN) * BN,
                TS=1 if along_w else W, NUM_M_TILES=n_m, HW=H * W, POOL_J=pool_j)
    for pre in "ay":
        for dim, v in zip("nchw", ys, strict=True):
            vals[f"stride_{pre}{dim}"] = v
    cx = dict(CIN=cin, KT=K, ALONG_W=along_w, HAS_BIAS=bias, RELU=relu, HAS_ADD=add, STATS=stats,
              POOL=pool, PRO_BWD=pro_bwd, UPCAST=False, DOT_PRECISION=_dot_precision(dt),
              FIX_OUT=False, A_VEC=_a_vec(dt), BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK)
    specs = [_kernel_spec(_lk_conv_fwd_kernel, name, role, vals, cx, cfg["num_warps"],
                          cfg["num_stages"], (n_m, triton.cdiv(cout, BN)))]
    specs[0]["config_name"] = cfg["name"]
    # L2 -> SM traffic of this tiling. A: rows run along the convolved axis and are copied with
    # 8-byte cp.async.ca (L1-allocating), so the k shifted tiles of a channel chunk cost one halo
    # of BLOCK_M + k - 1 rows from L2 (assumption: L1 keeps the <= 2·BLOCK_M·128-byte working set
    # between consecutive taps; to be confirmed with ncu's lts__t_sectors on a GPU). Without L1
    # reuse it would be k·BLOCK_M rows (tile_a_bytes_no_l1). B: 16-byte .cg copies of the whole
    # packed weight slice per program.
    e = torch.finfo(dt).bits // 8
    progs = n_m * triton.cdiv(cout, BN)
    cin_p = triton.cdiv(cin, BK) * BK
    specs[0]["traffic"] = dict(
        tile_a_bytes=progs * (BM + K - 1) * cin_p * e, tile_b_bytes=progs * K * cin_p * BN * e,
        tile_a_bytes_no_l1=progs * K * BM * cin_p * e,
        tiling_note=f"x halo ({BM}+{K - 1} rows) from L2 once per channel chunk by each of "
                    f"{triton.cdiv(cout, BN)} n-tiles, the {K} taps' re-reads from L1; packed "
                    f"weight {K * cin_p * BN * e / 1e3:.0f} kB streamed by each of {n_m} m-tiles")
    if stats:
        specs += _combine_specs(name, n_m, triton.cdiv(cout, BN) * BN, M, BM)
    if pool:
        BT, BCg = _pool_gather_blocks(cout)
        vals = dict(part_ptr=P(f32), out_ptr=P(f32), C=cout, COUT_P=triton.cdiv(cout, BN) * BN,
                    HW=H * W, POOL_J=pool_j, BM=BM)
        specs.append(_kernel_spec(_pool_gather_kernel, f"{name} pool", "reduction", vals,
                                  dict(BLOCK_T=BT, BLOCK_C=BCg), 4, _TRITON_DEFAULT_STAGES,
                                  (N, triton.cdiv(cout, BCg))))
        nbytes = (n_m * pool_j * triton.cdiv(cout, BN) * BN + N * cout) * 4
        specs[-1]["traffic"] = dict(hbm_bytes=nbytes, tile_a_bytes=nbytes, tile_b_bytes=0,
                                    tiling_note=f"{n_m}x{pool_j} per-image partial rows read once")
    if pro_bwd:
        specs += _reduce_specs(name, 2, n_m, triton.cdiv(cout, BN) * BN)
    return specs


def compile_specs(problems):
    """The Triton launches of ``msff::lk_conv`` (and its backward) for each problem, with the
    configurations the launchers above choose on a GPU.

    Args:
        problems: iterable of dicts describing one ``lk_conv`` op call each: ``N, cin, cout, H,
            W, K`` (ints), ``along_w`` (1×k kernel if True, k×1 if False), ``dtype`` (torch
            dtype of x / weight / y), ``channels_last`` (bool), ``prologue, bias, relu, add,
            stats`` (bools: the op's optional inputs / flags), ``backward`` (bool: also the
            launches of the Triton backward with every gradient needed), ``pool`` (bool: the
            per-image Σ_hw y epilogue of the SE squeeze, inference), ``sms`` (int, SM count
            of the GPU planned for; 132 = H100/H200 SXM). Optional ``tag`` (str) prefixes names.

    Returns:
        list of dicts, one per kernel launch: ``name``, ``role`` (``conv_fwd`` / ``conv_dgrad``
        main loops, ``conv_wgrad``, ``pointwise``, ``reduction``), ``kernel`` (the
        ``triton.JITFunction``), ``kernel_name``, ``signature`` (param -> Triton type or
        ``constexpr``; ints equal to 1 are specialized further by Triton at launch),
        ``constexprs``, ``args`` (every parameter's launch value in order, tensors as
        :class:`SpecPointer`), ``options`` (num_warps, num_stages), ``grid``, ``problem`` (the
        input dict).

    Example:
        >>> specs = compile_specs([dict(N=2, cin=64, cout=64, H=64, W=64, K=15, along_w=True,
        ...     dtype=torch.bfloat16, channels_last=True, prologue=True, bias=False, relu=False,
        ...     add=False, stats=True, backward=True, sms=132)])  # doctest: +SKIP
        >>> [s["role"] for s in specs][:3]  # doctest: +SKIP
        ['pointwise', 'conv_fwd', 'reduction']
    """
    if triton_interpret():
        raise RuntimeError("compile_specs describes GPU launches; unset TRITON_INTERPRET "
                           "before importing triton (the interpreter chooses other blocks)")
    out = []
    for pb in problems:
        N, cin, cout, H, W, K = (int(pb[k]) for k in ("N", "cin", "cout", "H", "W", "K"))
        along_w, dt, cl = bool(pb["along_w"]), pb["dtype"], bool(pb["channels_last"])
        pro, bias, relu, add, stats, pool = (
            bool(pb.get(k, False)) for k in ("prologue", "bias", "relu", "add", "stats", "pool"))
        tag = pb.get("tag", "")
        flags = ",".join(f for f, on in (("pro", pro), ("bias", bias), ("relu", relu),
                                         ("add", add), ("stats", stats), ("pool", pool))
                         if on) or "plain"
        base = f"{tag}{'1xk' if along_w else 'kx1'} {cin}->{cout} k{K} [{flags}]"
        M = N * H * W
        specs = []
        if pro:
            specs.append(_prologue_spec(f"prologue {base}", N, cin, H, W, dt, cl))
        specs += _conv_fwd_spec(f"fwd {base}", "conv_fwd", N, cin, cout, H, W, K, along_w, dt, cl,
                                bias, relu, add, stats, False, pool)
        if pb.get("backward", False):
            BM, BC, warps = _eltwise_blocks(M, cout)
            P = SpecPointer
            f32 = torch.float32
            ys = spec_strides((N, cout, H, W), cl)
            n_m = triton.cdiv(M, BM)
            vals = dict(gy_ptr=P(dt), y_ptr=P(dt), add_ptr=P(dt),
                        gsum_ptr=P(f32), gsq_ptr=P(f32), gr_ptr=P(dt), gadd_ptr=P(dt),
                        part_ptr=P(f32), M=M, C=cout, C_P=triton.cdiv(cout, BC) * BC, H=H, W=W)
            for pre in "gyad":
                for dim, v in zip("nchw", ys, strict=True):
                    vals[f"stride_{pre}{dim}"] = v
            cx = dict(HAS_GSUM=stats, HAS_GSQ=stats, RELU=relu, HAS_ADD=add, NEED_GADD=add,
                      NEED_GBIAS=bias, FIX_OUT=fix_bf16(dt), BLOCK_M=BM, BLOCK_C=BC)
            specs.append(_kernel_spec(_lk_conv_grad_out_kernel, f"grad_out {base}", "pointwise",
                                      vals, cx, warps, _TRITON_DEFAULT_STAGES,
                                      (n_m, triton.cdiv(cout, BC))))
            if bias:
                specs += _reduce_specs(f"grad_bias {base}", 1, n_m, triton.cdiv(cout, BC) * BC)
            # backward-data: the forward kernel on g_r (dense NHWC) with the tap-flipped,
            # transposed weight packed like any other, the prologue's backward in its epilogue
            specs += _conv_fwd_spec(f"dgrad {base}", "conv_dgrad", N, cout, cin, H, W, K, along_w,
                                    dt, cl, False, False, False, False, pro, False)
            if pro:
                specs.append(_prologue_spec(f"wgrad prologue {base}", N, cin, H, W, dt, cl))
            cin = padded_channels(cin)  # the launcher's operand buffer
            cfg = wgrad_config(M, cin, cout, K, int(pb.get("sms", 132)), interpret=False,
                               name=config_override("wgrad") or default_config_name("wgrad", dt))
            m_per = triton.cdiv(triton.cdiv(M, cfg["SPLIT"]), cfg["BLOCK_K"]) * cfg["BLOCK_K"]
            split = triton.cdiv(M, m_per)
            vals = dict(g_ptr=P(dt), x_ptr=P(dt), part_ptr=P(f32), M=M, H=H, W=W, COUT=cout,
                        TS=1 if along_w else W, M_PER_SPLIT=m_per)
            cx = dict(CIN=cin, KT=K, ALONG_W=along_w, TAPS=cfg["TAPS"],
                      EVEN_CO=cout % cfg["BLOCK_M"] == 0, UPCAST=False,
                      DOT_PRECISION=_dot_precision(dt), A_VEC=_a_vec(dt), BLOCK_M=cfg["BLOCK_M"],
                      BLOCK_C=cfg["BLOCK_C"], BLOCK_K=cfg["BLOCK_K"])
            specs.append(_kernel_spec(
                _lk_conv_wgrad_kernel, f"wgrad {base}", "conv_wgrad", vals, cx, cfg["num_warps"],
                cfg["num_stages"],
                (triton.cdiv(K, cfg["TAPS"]) * triton.cdiv(cin, cfg["BLOCK_C"]),
                 triton.cdiv(cout, cfg["BLOCK_M"]), split),
                notes=f"pixel split-K {split} ways, fp32 partials reduced in fp64"))
            specs[-1]["config_name"] = cfg["name"]
            e = torch.finfo(dt).bits // 8
            n_j = triton.cdiv(K, cfg["TAPS"]) * triton.cdiv(cin, cfg["BLOCK_C"])
            n_co = triton.cdiv(cout, cfg["BLOCK_M"])
            bn = cfg["TAPS"] * cfg["BLOCK_C"]
            bk, taps = cfg["BLOCK_K"], cfg["TAPS"]
            specs[-1]["traffic"] = dict(
                tile_a_bytes=n_j * n_co * M * cfg["BLOCK_M"] * e,
                # x: TAPS shifted copies by 8-byte .ca cp.async, one halo per pixel step from L2
                tile_b_bytes=n_j * n_co * M * cfg["BLOCK_C"] * e * (bk + taps - 1) // bk,
                tile_b_bytes_no_l1=n_j * n_co * M * bn * e,
                partial_bytes=2 * split * cout * K * cin * 4,
                tiling_note=f"g read once per N tile ({n_j}x); x halo once per N tile x {n_co} "
                            f"co-tiles, its {taps} shifted copies from L1; {split} fp32 partials "
                            "written and re-read by the fp64 reduction")
            specs += _reduce_specs(f"wgrad {base}", 1, split, cout * K * cin)
        for s in specs:
            s["problem"] = dict(pb)
        out += specs
    return out
