"""Triton kernels of ``msff::lkam_se`` (branch sum + SE attention + scale + residual, SPEC.md).

Tiles are (BLOCK_P pixels of one image) × (BLOCK_C channels); every tensor comes with its four
strides, so NCHW, channels_last and non-contiguous views work. ``F`` (the branch sum after the
pending BN + ReLU) is recomputed from the raw conv outputs in every pass, never stored.

* ``_lkam_se_pool_kernel``: Σ_{h,w} F per (n, c), split over pixel chunks; each program writes an
  fp32 partial and ``msff.kernels.lk_conv.reduce_partials`` sums them in fp64 in a fixed order
  (deterministic, no atomics — as every reduction below). Inside a program the (N, C)
  reductions (pool, Σ grad_out·F, Σ grad_out·residual, Σ grad_out) accumulate in fp64, so each
  partial is its exact sum rounded once to fp32: an fp32 tile sum is a sequential sum of BLOCK_P
  rows under the interpreter and a sequential running sum over the chunk loop on a GPU, whose
  error (~√n ulp) was up to 16× torch's cascade sum and decided the SE-weight gradients
  (seed-sensitive test failures, notes/flakes.md).
* ``_lkam_se_fwd_kernel``: out = R + F · z[n, c] (R = residual, optionally BN-affine).
* ``_lkam_se_bwd_reduce_kernel``: Σ grad_out·F per (n, c); Σ grad_out·residual, Σ grad_out per c.
* ``_lkam_se_bwd_kernel``: grad of the branches (through BN+ReLU) and of the residual, with
  per-program partials of the per-channel BN-affine gradients.

With channels_last tensors Triton specializes the channel stride to 1, so the pointwise loads
and stores are 16-byte vectors along C.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from msff._triton_env import triton_interpret
from msff.kernels._common import fix_bf16, rtne_bf16
from msff.kernels.lk_conv import reduce_partials

__all__ = ["se_pool", "se_apply", "se_backward_reduce", "se_backward_apply"]


@triton.jit
def _act(t_ptr, off, mask, s_ptr, h_ptr, offs_c, mask_c, HAS_AFFINE: tl.constexpr):
    t = tl.load(t_ptr + off, mask=mask, other=0.0).to(tl.float32)
    if HAS_AFFINE:
        s = tl.load(s_ptr + offs_c, mask=mask_c, other=0.0)
        h = tl.load(h_ptr + offs_c, mask=mask_c, other=0.0)
        t = tl.where(mask, tl.maximum(t * s[None, :] + h[None, :], 0.0), 0.0)
    return t


@triton.jit
def _tile(n, offs_p, offs_c, W, stride_n, stride_c, stride_h, stride_w):
    h = offs_p // W
    w = offs_p % W
    row = n.to(tl.int64) * stride_n + h.to(tl.int64) * stride_h + w.to(tl.int64) * stride_w
    return row[:, None] + offs_c[None, :].to(tl.int64) * stride_c


@triton.jit
def _branch_sum(fa_ptr, fb_ptr, sa_ptr, ha_ptr, sb_ptr, hb_ptr, n, offs_p, offs_c, mask, mask_c, W,
                san, sac, sah, saw, sbn, sbc, sbh, sbw,
                HAS_B: tl.constexpr, AFF_A: tl.constexpr, AFF_B: tl.constexpr):
    f = _act(fa_ptr, _tile(n, offs_p, offs_c, W, san, sac, sah, saw), mask, sa_ptr, ha_ptr,
             offs_c, mask_c, AFF_A)
    if HAS_B:
        f += _act(fb_ptr, _tile(n, offs_p, offs_c, W, sbn, sbc, sbh, sbw), mask, sb_ptr, hb_ptr,
                  offs_c, mask_c, AFF_B)
    return f


@triton.jit
def _lkam_se_pool_kernel(
    fa_ptr, fb_ptr, sa_ptr, ha_ptr, sb_ptr, hb_ptr, part_ptr,
    N, C, HW, W, P_PER_PROG,
    san, sac, sah, saw, sbn, sbc, sbh, sbw,
    HAS_B: tl.constexpr, AFF_A: tl.constexpr, AFF_B: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    n = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    p_start = tl.program_id(2) * P_PER_PROG
    # fp64 accumulation (see the module docstring): the partial is Σ F rounded once to fp32
    acc = tl.zeros((BLOCK_C,), dtype=tl.float64)
    for p0 in range(p_start, p_start + P_PER_PROG, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask = (offs_p < HW)[:, None] & mask_c[None, :]
        f = _branch_sum(fa_ptr, fb_ptr, sa_ptr, ha_ptr, sb_ptr, hb_ptr, n, offs_p, offs_c, mask,
                        mask_c, W, san, sac, sah, saw, sbn, sbc, sbh, sbw, HAS_B, AFF_A, AFF_B)
        acc += tl.sum(f.to(tl.float64), axis=0)
    # part[split, n, c]
    tl.store(part_ptr + (tl.program_id(2) * N + n).to(tl.int64) * C + offs_c,
             acc.to(tl.float32), mask=mask_c)


@triton.jit
def _lkam_se_fwd_kernel(
    fa_ptr, fb_ptr, sa_ptr, ha_ptr, sb_ptr, hb_ptr, z_ptr, r_ptr, rs_ptr, rh_ptr, out_ptr,
    C, HW, W, P_BLOCKS,
    san, sac, sah, saw, sbn, sbc, sbh, sbw, srn, src, srh, srw, son, soc, soh, sow,
    HAS_B: tl.constexpr, AFF_A: tl.constexpr, AFF_B: tl.constexpr, AFF_R: tl.constexpr,
    FIX_OUT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    n = pid // P_BLOCKS
    offs_p = (pid % P_BLOCKS) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mask = (offs_p < HW)[:, None] & mask_c[None, :]
    f = _branch_sum(fa_ptr, fb_ptr, sa_ptr, ha_ptr, sb_ptr, hb_ptr, n, offs_p, offs_c, mask,
                    mask_c, W, san, sac, sah, saw, sbn, sbc, sbh, sbw, HAS_B, AFF_A, AFF_B)
    z = tl.load(z_ptr + n * C + offs_c, mask=mask_c, other=0.0)
    r = tl.load(r_ptr + _tile(n, offs_p, offs_c, W, srn, src, srh, srw), mask=mask, other=0.0)
    r = r.to(tl.float32)
    if AFF_R:
        rs = tl.load(rs_ptr + offs_c, mask=mask_c, other=0.0)
        rh = tl.load(rh_ptr + offs_c, mask=mask_c, other=0.0)
        r = r * rs[None, :] + rh[None, :]
    out = r + f * z[None, :]
    tl.store(out_ptr + _tile(n, offs_p, offs_c, W, son, soc, soh, sow),
             rtne_bf16(out, FIX_OUT).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lkam_se_bwd_reduce_kernel(
    go_ptr, fa_ptr, fb_ptr, sa_ptr, ha_ptr, sb_ptr, hb_ptr, r_ptr, part_ptr,
    N, C, HW, W, P_PER_PROG,
    sgn, sgc, sgh, sgw, san, sac, sah, saw, sbn, sbc, sbh, sbw, srn, src, srh, srw,
    HAS_B: tl.constexpr, AFF_A: tl.constexpr, AFF_B: tl.constexpr, AFF_R: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    n = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    p_start = tl.program_id(2) * P_PER_PROG
    # fp64 accumulation of the fp32 products (see the module docstring)
    acc_z = tl.zeros((BLOCK_C,), dtype=tl.float64)
    acc_rs = tl.zeros((BLOCK_C,), dtype=tl.float64)
    acc_rh = tl.zeros((BLOCK_C,), dtype=tl.float64)
    for p0 in range(p_start, p_start + P_PER_PROG, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask = (offs_p < HW)[:, None] & mask_c[None, :]
        go = tl.load(go_ptr + _tile(n, offs_p, offs_c, W, sgn, sgc, sgh, sgw), mask=mask,
                     other=0.0).to(tl.float32)
        f = _branch_sum(fa_ptr, fb_ptr, sa_ptr, ha_ptr, sb_ptr, hb_ptr, n, offs_p, offs_c, mask,
                        mask_c, W, san, sac, sah, saw, sbn, sbc, sbh, sbw, HAS_B, AFF_A, AFF_B)
        acc_z += tl.sum((go * f).to(tl.float64), axis=0)
        if AFF_R:
            r = tl.load(r_ptr + _tile(n, offs_p, offs_c, W, srn, src, srh, srw), mask=mask,
                        other=0.0).to(tl.float32)
            acc_rs += tl.sum((go * r).to(tl.float64), axis=0)
            acc_rh += tl.sum(go.to(tl.float64), axis=0)
    # part[g, split, n, c] for g = Σgo·F, Σgo·residual, Σgo
    row = part_ptr + (tl.program_id(2) * N + n).to(tl.int64) * C + offs_c
    tl.store(row, acc_z.to(tl.float32), mask=mask_c)
    if AFF_R:
        plane = tl.num_programs(2).to(tl.int64) * N * C
        tl.store(row + plane, acc_rs.to(tl.float32), mask=mask_c)
        tl.store(row + 2 * plane, acc_rh.to(tl.float32), mask=mask_c)


@triton.jit
def _branch_grad(gf, t_ptr, off, mask, s_ptr, h_ptr, gs_ptr, gh_ptr, gt_ptr, goff, offs_c, mask_c,
                 AFF: tl.constexpr, FIX_OUT: tl.constexpr):
    # gs_ptr / gh_ptr point at this program's row of the partial planes
    if AFF:
        t = tl.load(t_ptr + off, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(s_ptr + offs_c, mask=mask_c, other=0.0)
        h = tl.load(h_ptr + offs_c, mask=mask_c, other=0.0)
        gm = tl.where(mask & ((t * s[None, :] + h[None, :]) > 0), gf, 0.0)
        tl.store(gs_ptr + offs_c, tl.sum(gm * t, axis=0), mask=mask_c)
        tl.store(gh_ptr + offs_c, tl.sum(gm, axis=0), mask=mask_c)
        g = gm * s[None, :]
    else:
        g = gf
    tl.store(gt_ptr + goff, rtne_bf16(g, FIX_OUT).to(gt_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lkam_se_bwd_kernel(
    go_ptr, fa_ptr, fb_ptr, sa_ptr, ha_ptr, sb_ptr, hb_ptr, z_ptr, gp_ptr, rs_ptr,
    gfa_ptr, gfb_ptr, part_ptr, gr_ptr,
    C, HW, W, P_BLOCKS,
    sgn, sgc, sgh, sgw, san, sac, sah, saw, sbn, sbc, sbh, sbw,
    s1n, s1c, s1h, s1w, s2n, s2c, s2h, s2w, s3n, s3c, s3h, s3w,
    HAS_B: tl.constexpr, AFF_A: tl.constexpr, AFF_B: tl.constexpr, AFF_R: tl.constexpr,
    NEED_R: tl.constexpr, FIX_OUT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    n = pid // P_BLOCKS
    offs_p = (pid % P_BLOCKS) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mask = (offs_p < HW)[:, None] & mask_c[None, :]
    go = tl.load(go_ptr + _tile(n, offs_p, offs_c, W, sgn, sgc, sgh, sgw), mask=mask,
                 other=0.0).to(tl.float32)
    z = tl.load(z_ptr + n * C + offs_c, mask=mask_c, other=0.0)
    gp = tl.load(gp_ptr + n * C + offs_c, mask=mask_c, other=0.0)
    gf = go * z[None, :] + gp[None, :]
    # partial planes [4, programs, C]: Σ for scale_a, shift_a, scale_b, shift_b
    plane = tl.num_programs(0).to(tl.int64) * C
    prow = part_ptr + pid.to(tl.int64) * C
    _branch_grad(gf, fa_ptr, _tile(n, offs_p, offs_c, W, san, sac, sah, saw), mask, sa_ptr, ha_ptr,
                 prow, prow + plane, gfa_ptr, _tile(n, offs_p, offs_c, W, s1n, s1c, s1h, s1w),
                 offs_c, mask_c, AFF_A, FIX_OUT)
    if HAS_B:
        _branch_grad(gf, fb_ptr, _tile(n, offs_p, offs_c, W, sbn, sbc, sbh, sbw), mask, sb_ptr,
                     hb_ptr, prow + 2 * plane, prow + 3 * plane, gfb_ptr,
                     _tile(n, offs_p, offs_c, W, s2n, s2c, s2h, s2w), offs_c, mask_c, AFF_B, FIX_OUT)
    if NEED_R:
        gr = go
        if AFF_R:
            rs = tl.load(rs_ptr + offs_c, mask=mask_c, other=0.0)
            gr = go * rs[None, :]
        tl.store(gr_ptr + _tile(n, offs_p, offs_c, W, s3n, s3c, s3h, s3w),
                 rtne_bf16(gr, FIX_OUT).to(gr_ptr.dtype.element_ty), mask=mask)


def _next_pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


def _blocks(HW: int, C: int):
    if triton_interpret():
        bc = min(128, max(16, _next_pow2(C)))
        return min(max(16, _next_pow2(HW)), max(16, 4096 // bc)), bc, 4
    return 64, min(64, max(16, _next_pow2(C))), 4


def _apply_warps(warps: int) -> int:
    # se_apply on a GPU: 8 warps over the 64 x 64 tile (4 warps spilled 8 B on sm_80 with both
    # branches' BN affines, 96 registers; 8 warps: 64 registers, 0 spills, same 16-byte vectors)
    return warps if triton_interpret() else 8


def _sms(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def _split(N, C, HW, BP, BC, device):
    if triton_interpret():
        return HW
    sms = device if isinstance(device, int) else torch.cuda.get_device_properties(device).multi_processor_count
    progs = N * triton.cdiv(C, BC)
    split = max(1, min(triton.cdiv(HW, BP * 4), triton.cdiv(4 * sms, progs)))
    return triton.cdiv(triton.cdiv(HW, split), BP) * BP


def _s(t):
    return tuple(int(v) for v in t.stride())


def _opt(t, dummy):
    return t if t is not None else dummy


def se_pool(fa, fb, sa, ha, sb, hb):
    """Σ_{h,w} F as (N, C) fp32 (deterministic)."""
    N, C, H, W = fa.shape
    HW = H * W
    if HW == 0 or N == 0 or C == 0:
        return torch.zeros((N, C), dtype=torch.float32, device=fa.device)
    BP, BC, warps = _blocks(HW, C)
    per = _split(N, C, HW, BP, BC, _sms(fa.device))
    S = triton.cdiv(HW, per)
    part = torch.empty((1, S, N * C), dtype=torch.float32, device=fa.device)
    fbt = _opt(fb, fa)
    grid = (N, triton.cdiv(C, BC), S)
    _lkam_se_pool_kernel[grid](
        fa, fbt, _opt(sa, part), _opt(ha, part), _opt(sb, part), _opt(hb, part), part,
        N, C, HW, W, per, *_s(fa), *_s(fbt),
        HAS_B=fb is not None, AFF_A=sa is not None, AFF_B=sb is not None,
        BLOCK_P=BP, BLOCK_C=BC, num_warps=warps,
    )
    return reduce_partials(part).view(N, C)


def se_apply(fa, fb, sa, ha, sb, hb, z, residual, rs, rh, out):
    """out = R + F · z (into the preallocated ``out``)."""
    N, C, H, W = fa.shape
    HW = H * W
    if out.numel() == 0:
        return out
    BP, BC, warps = _blocks(HW, C)
    pb = triton.cdiv(HW, BP)
    fbt = _opt(fb, fa)
    grid = (N * pb, triton.cdiv(C, BC))
    _lkam_se_fwd_kernel[grid](
        fa, fbt, _opt(sa, z), _opt(ha, z), _opt(sb, z), _opt(hb, z), z, residual,
        _opt(rs, z), _opt(rh, z), out, C, HW, W, pb,
        *_s(fa), *_s(fbt), *_s(residual), *_s(out),
        HAS_B=fb is not None, AFF_A=sa is not None, AFF_B=sb is not None, AFF_R=rs is not None,
        FIX_OUT=fix_bf16(out.dtype), BLOCK_P=BP, BLOCK_C=BC, num_warps=_apply_warps(warps),
    )
    return out


def se_backward_reduce(go, fa, fb, sa, ha, sb, hb, residual, aff_r):
    """(Σ_hw go·F (N, C), Σ go·residual (C,), Σ go (C,)) in fp32 (the last two only if aff_r),
    deterministic."""
    N, C, H, W = fa.shape
    HW = H * W
    dev = fa.device
    if HW == 0 or N == 0 or C == 0:
        return (torch.zeros((N, C), dtype=torch.float32, device=dev),
                torch.zeros((C,), dtype=torch.float32, device=dev),
                torch.zeros((C,), dtype=torch.float32, device=dev))
    BP, BC, warps = _blocks(HW, C)
    per = _split(N, C, HW, BP, BC, _sms(dev))
    S = triton.cdiv(HW, per)
    part = torch.empty((3 if aff_r else 1, S, N, C), dtype=torch.float32, device=dev)
    fbt = _opt(fb, fa)
    grid = (N, triton.cdiv(C, BC), S)
    _lkam_se_bwd_reduce_kernel[grid](
        go, fa, fbt, _opt(sa, part), _opt(ha, part), _opt(sb, part), _opt(hb, part), residual,
        part, N, C, HW, W, per, *_s(go), *_s(fa), *_s(fbt), *_s(residual),
        HAS_B=fb is not None, AFF_A=sa is not None, AFF_B=sb is not None, AFF_R=bool(aff_r),
        BLOCK_P=BP, BLOCK_C=BC, num_warps=warps,
    )
    gz = reduce_partials(part[:1].view(1, S, N * C)).view(N, C)
    if not aff_r:
        z = torch.zeros((C,), dtype=torch.float32, device=dev)
        return gz, z, z.clone()
    r = reduce_partials(part[1:].view(2, S * N, C))
    return gz, r[0].clone(), r[1].clone()


def se_backward_apply(go, fa, fb, sa, ha, sb, hb, z, gp, rs, gfa, gfb, gsa, gha, gsb, ghb, gr):
    """Branch and residual gradients (into preallocated gfa/gfb/gr, and the (C,) fp32 vectors
    gs*/gh* when not None; their sums are deterministic)."""
    N, C, H, W = fa.shape
    HW = H * W
    if fa.numel() == 0:
        for v in (gsa, gha, gsb, ghb):
            if v is not None:
                v.zero_()
        return
    BP, BC, warps = _blocks(HW, C)
    pb = triton.cdiv(HW, BP)
    fbt = _opt(fb, fa)
    gfbt = _opt(gfb, gfa)
    grt = _opt(gr, gfa)
    need = sa is not None or sb is not None
    part = torch.empty((4, N * pb, C) if need else (1,), dtype=torch.float32, device=fa.device)
    grid = (N * pb, triton.cdiv(C, BC))
    _lkam_se_bwd_kernel[grid](
        go, fa, fbt, _opt(sa, z), _opt(ha, z), _opt(sb, z), _opt(hb, z), z, gp, _opt(rs, z),
        gfa, gfbt, part, grt,
        C, HW, W, pb,
        *_s(go), *_s(fa), *_s(fbt), *_s(gfa), *_s(gfbt), *_s(grt),
        HAS_B=fb is not None, AFF_A=sa is not None, AFF_B=sb is not None, AFF_R=rs is not None,
        NEED_R=gr is not None, FIX_OUT=fix_bf16(gfa.dtype), BLOCK_P=BP, BLOCK_C=BC, num_warps=warps,
    )
    if need:
        sums = reduce_partials(part)
        for i, v in enumerate((gsa, gha, gsb, ghb)):
            if v is not None:
                v.copy_(sums[i])


# ---- launch plans for the offline kernel report (msff/kernel_report.py) -----------------------
# Like msff.kernels.lk_conv.compile_specs: built on _blocks/_split above, same flags and strides as
# the launchers; update it with them.
def compile_specs(problems):
    """The Triton launches of ``msff::lkam_se`` (and its backward) for each problem, with the
    configurations the launchers above choose on a GPU.

    Args:
        problems: iterable of dicts: ``N, C, H, W`` (ints), ``dtype`` (torch dtype of the branch
            outputs / residual), ``channels_last`` (bool), ``has_b`` (a second branch tensor),
            ``aff_a``/``aff_b`` (pending BN + ReLU on the branches), ``aff_r`` (pending BN on
            the residual), ``backward`` (bool: also the backward launches), ``pool_given``
            (bool: the pooled sums come from the last conv's epilogue), ``sms`` (int, SM
            count; 132 = H100/H200 SXM), optional ``tag``.

    Returns:
        list of spec dicts as :func:`msff.kernels.lk_conv.compile_specs` returns them; roles are
        ``reduction`` (pool / backward reduce) and ``pointwise`` (apply / backward apply).
    """
    from msff.kernels.lk_conv import (
        _TRITON_DEFAULT_STAGES,
        SpecPointer,
        _kernel_spec,
        _reduce_specs,
        spec_strides,
    )

    if triton_interpret():
        raise RuntimeError("compile_specs describes GPU launches; unset TRITON_INTERPRET "
                           "before importing triton (the interpreter chooses other blocks)")
    out = []
    P = SpecPointer
    f32 = torch.float32
    for pb in problems:
        N, C, H, W = (int(pb[k]) for k in ("N", "C", "H", "W"))
        dt, cl = pb["dtype"], bool(pb["channels_last"])
        has_b, aff_a, aff_b, aff_r = (bool(pb.get(k, False))
                                      for k in ("has_b", "aff_a", "aff_b", "aff_r"))
        HW = H * W
        BP, BC, warps = _blocks(HW, C)
        per = _split(N, C, HW, BP, BC, int(pb.get("sms", 132)))
        pbk = triton.cdiv(HW, BP)
        st = spec_strides((N, C, H, W), cl)
        flags = ",".join(f for f, on in (("b", has_b), ("affA", aff_a), ("affB", aff_b),
                                         ("affR", aff_r)) if on) or "plain"
        base = f"{pb.get('tag', '')}C{C} [{flags}]"

        def strides(*prefixes, st=st):
            return {f"{p}{d}": v for p in prefixes for d, v in zip("nchw", st, strict=True)}

        specs = []
        # absent per-channel vectors are fp32 dummies (pool / z / gz) in the launchers too
        vals = dict(fa_ptr=P(dt), fb_ptr=P(dt), sa_ptr=P(f32), ha_ptr=P(f32), sb_ptr=P(f32),
                    hb_ptr=P(f32), part_ptr=P(f32), N=N, C=C, HW=HW, W=W, P_PER_PROG=per,
                    **strides("sa", "sb"))
        cx = dict(HAS_B=has_b, AFF_A=aff_a, AFF_B=aff_b, BLOCK_P=BP, BLOCK_C=BC)
        if not pb.get("pool_given", False):  # else the last conv's epilogue pooled
            specs.append(_kernel_spec(_lkam_se_pool_kernel, f"se_pool {base}", "reduction", vals,
                                      cx, warps, _TRITON_DEFAULT_STAGES,
                                      (N, triton.cdiv(C, BC), triton.cdiv(HW, per))))
            specs += _reduce_specs(f"se_pool {base}", 1, triton.cdiv(HW, per), N * C)
        vals = dict(fa_ptr=P(dt), fb_ptr=P(dt), sa_ptr=P(f32), ha_ptr=P(f32), sb_ptr=P(f32),
                    hb_ptr=P(f32), z_ptr=P(f32), r_ptr=P(dt), rs_ptr=P(f32), rh_ptr=P(f32),
                    out_ptr=P(dt), C=C, HW=HW, W=W, P_BLOCKS=pbk,
                    **strides("sa", "sb", "sr", "so"))
        cx = dict(HAS_B=has_b, AFF_A=aff_a, AFF_B=aff_b, AFF_R=aff_r, FIX_OUT=fix_bf16(dt),
                  BLOCK_P=BP, BLOCK_C=BC)
        specs.append(_kernel_spec(_lkam_se_fwd_kernel, f"se_apply {base}", "pointwise", vals, cx,
                                  _apply_warps(warps), _TRITON_DEFAULT_STAGES,
                                  (N * pbk, triton.cdiv(C, BC))))
        if pb.get("backward", False):
            vals = dict(go_ptr=P(dt), fa_ptr=P(dt), fb_ptr=P(dt), sa_ptr=P(f32), ha_ptr=P(f32),
                        sb_ptr=P(f32), hb_ptr=P(f32), r_ptr=P(dt), part_ptr=P(f32),
                        N=N, C=C, HW=HW, W=W, P_PER_PROG=per,
                        **strides("sg", "sa", "sb", "sr"))
            cx = dict(HAS_B=has_b, AFF_A=aff_a, AFF_B=aff_b, AFF_R=aff_r, BLOCK_P=BP, BLOCK_C=BC)
            specs.append(_kernel_spec(_lkam_se_bwd_reduce_kernel, f"se_bwd_reduce {base}",
                                      "reduction", vals, cx, warps, _TRITON_DEFAULT_STAGES,
                                      (N, triton.cdiv(C, BC), triton.cdiv(HW, per))))
            S = triton.cdiv(HW, per)
            specs += _reduce_specs(f"se_bwd_reduce gz {base}", 1, S, N * C)
            if aff_r:
                specs += _reduce_specs(f"se_bwd_reduce res {base}", 2, S * N, C)
            vals = dict(go_ptr=P(dt), fa_ptr=P(dt), fb_ptr=P(dt), sa_ptr=P(f32), ha_ptr=P(f32),
                        sb_ptr=P(f32), hb_ptr=P(f32), z_ptr=P(f32), gp_ptr=P(f32), rs_ptr=P(f32),
                        gfa_ptr=P(dt), gfb_ptr=P(dt), part_ptr=P(f32), gr_ptr=P(dt), C=C, HW=HW, W=W,
                        P_BLOCKS=pbk, **strides("sg", "sa", "sb", "s1", "s2", "s3"))
            cx = dict(HAS_B=has_b, AFF_A=aff_a, AFF_B=aff_b, AFF_R=aff_r, NEED_R=True,
                      FIX_OUT=fix_bf16(dt), BLOCK_P=BP, BLOCK_C=BC)
            specs.append(_kernel_spec(_lkam_se_bwd_kernel, f"se_bwd_apply {base}", "pointwise",
                                      vals, cx, warps, _TRITON_DEFAULT_STAGES,
                                      (N * pbk, triton.cdiv(C, BC))))
            if aff_a or aff_b:
                specs += _reduce_specs(f"se_bwd_apply {base}", 4, N * pbk, C)
        for s in specs:
            s["problem"] = dict(pb)
        out += specs
    return out
