"""``msff::lkam_se``: the tail of the LKAM block in one op — branch sum (with the branches'
pending BN + ReLU), squeeze-and-excitation attention, scale, and the residual (with the projection
shortcut's pending BN) — and its backward op ``msff::_lkam_se_backward``.

The contract is msff/ops/SPEC.md; :func:`lkam_se_ref` is its executable form.
"""
from __future__ import annotations

from typing import Optional

import torch

from msff.ops.dispatch import resolve_backend
from msff.ops.lk_conv import acc_dtype
from msff.ops.registry import empty_grad, empty_like_layout, get_impl, register_impl

__all__ = ["lkam_se", "lkam_se_ref", "lkam_se_backward_ref"]


def _act(t, s, h):
    if s is None:
        return t.to(acc_dtype(t.dtype))
    return torch.relu(t.to(acc_dtype(t.dtype)) * s.view(1, -1, 1, 1) + h.view(1, -1, 1, 1))


def _branch_sum(fa, fb, scale_a, shift_a, scale_b, shift_b):
    f = _act(fa, scale_a, shift_a)
    if fb is not None:
        f = f + _act(fb, scale_b, shift_b)
    return f


def _excite(pooled, w1, b1, w2, b2):
    u = pooled @ w1.t() + b1
    v = torch.relu(u)
    z = torch.sigmoid(v @ w2.t() + b2)
    return u, v, z


def _check(fa, fb, scale_a, shift_a, scale_b, shift_b, w1, b1, w2, b2, residual, res_scale,
           res_shift):
    if fa.dim() != 4:
        raise ValueError(f"fa must be 4-D (N, C, H, W), got {fa.dim()}-D")
    N, C, H, W = fa.shape
    vdt = acc_dtype(fa.dtype)
    for name, t in (("fb", fb), ("residual", residual)):
        if t is not None and (tuple(t.shape) != (N, C, H, W) or t.dtype != fa.dtype):
            raise ValueError(f"{name} must be {fa.dtype} {(N, C, H, W)}, got {t.dtype} {tuple(t.shape)}")
    for a, b, name in ((scale_a, shift_a, "a"), (scale_b, shift_b, "b"), (res_scale, res_shift, "res")):
        if (a is None) != (b is None):
            raise ValueError(f"scale/shift of {name} must be given together")
        for v in (a, b):
            if v is not None and (tuple(v.shape) != (C,) or v.dtype != vdt):
                raise ValueError(f"per-channel vectors of {name} must be {vdt} ({C},), got {v.dtype} {tuple(v.shape)}")
    if fb is None and scale_b is not None:
        raise ValueError("scale_b/shift_b given without fb")
    hid = w1.shape[0]
    if tuple(w1.shape) != (hid, C) or tuple(w2.shape) != (C, hid) or tuple(b1.shape) != (hid,) \
            or tuple(b2.shape) != (C,):
        raise ValueError(
            f"SE weights must be w1 (Hid, {C}), b1 (Hid,), w2 ({C}, Hid), b2 ({C},); got "
            f"{tuple(w1.shape)}, {tuple(b1.shape)}, {tuple(w2.shape)}, {tuple(b2.shape)}"
        )
    if any(t.dtype != vdt for t in (w1, b1, w2, b2)):
        raise ValueError(f"SE weights must be {vdt}")


def lkam_se_ref(fa, fb, scale_a, shift_a, scale_b, shift_b, w1, b1, w2, b2, residual,
                res_scale=None, res_shift=None):
    """Pure-PyTorch reference of ``msff::lkam_se`` (SPEC.md).

    Args:
        fa, fb: (N, C, H, W) branch outputs (fb may be None). scale_*/shift_*: (C,) fp32 pending
            BN of each branch (``relu(t*s + h)``) or None (used as is).
        w1, b1, w2, b2: SE MLP, (Hid, C), (Hid,), (C, Hid), (C,) fp32.
        residual: (N, C, H, W); res_scale/res_shift: (C,) pending BN (no ReLU) or None.

    Returns:
        (out (N, C, H, W) in fa's dtype, pooled (N, C) fp32 mean of the branch sum).

    Example:
        >>> f = torch.randn(2, 8, 5, 5)
        >>> out, pooled = lkam_se_ref(f, None, None, None, None, None, torch.randn(1, 8),
        ...     torch.randn(1), torch.randn(8, 1), torch.randn(8), f)
        >>> out.shape, pooled.shape
        (torch.Size([2, 8, 5, 5]), torch.Size([2, 8]))
    """
    f = _branch_sum(fa, fb, scale_a, shift_a, scale_b, shift_b)
    pooled = f.mean(dim=(2, 3))
    _, _, z = _excite(pooled, w1, b1, w2, b2)
    r = _act_res(residual, res_scale, res_shift)
    out = empty_like_layout(fa)
    out.copy_(r + f * z[:, :, None, None])
    return out, pooled.clone()


def _act_res(residual, rs, rh):
    r = residual.to(acc_dtype(residual.dtype))
    if rs is not None:
        r = r * rs.view(1, -1, 1, 1) + rh.view(1, -1, 1, 1)
    return r


def _mlp_backward(gz, pooled, w1, b1, w2, b2, grad_pooled, hw):
    """From Σ_hw grad_out·F (gz) to the SE weight grads and the per-(n, c) gradient of F."""
    u, v, z = _excite(pooled, w1, b1, w2, b2)
    gq = gz * z * (1 - z)
    gw2 = gq.t() @ v
    gb2 = gq.sum(0)
    gu = (gq @ w2) * (u > 0)
    gw1 = gu.t() @ pooled
    gb1 = gu.sum(0)
    gp = gu @ w1
    if grad_pooled is not None and grad_pooled.numel():
        gp = gp + grad_pooled
    return z, gp / max(hw, 1), gw1, gb1, gw2, gb2


def lkam_se_backward_ref(grad_out, grad_pooled, pooled, fa, fb, scale_a, shift_a, scale_b,
                         shift_b, w1, b1, w2, b2, residual, res_scale, res_shift):
    """Pure-PyTorch reference of ``msff::_lkam_se_backward`` (SPEC.md)."""
    dev = fa.device
    go = grad_out.to(acc_dtype(fa.dtype))
    f = _branch_sum(fa, fb, scale_a, shift_a, scale_b, shift_b)
    gz = (go * f).sum(dim=(2, 3))
    hw = fa.shape[2] * fa.shape[3]
    z, gp, gw1, gb1, gw2, gb2 = _mlp_backward(gz, pooled, w1, b1, w2, b2, grad_pooled, hw)
    gf = go * z[:, :, None, None] + gp[:, :, None, None]

    def branch(t, s, h):
        if t is None:
            return empty_grad(dev), empty_grad(dev), empty_grad(dev)
        if s is None:
            return _like(t, gf), empty_grad(dev), empty_grad(dev)
        tf = t.to(go.dtype)
        gm = gf * ((tf * s.view(1, -1, 1, 1) + h.view(1, -1, 1, 1)) > 0)
        return _like(t, gm * s.view(1, -1, 1, 1)), (gm * tf).sum(dim=(0, 2, 3)), gm.sum(dim=(0, 2, 3))

    gfa, gsa, gha = branch(fa, scale_a, shift_a)
    gfb, gsb, ghb = branch(fb, scale_b, shift_b)
    if res_scale is not None:
        gr = _like(residual, go * res_scale.view(1, -1, 1, 1))
        grs = (go * residual.to(go.dtype)).sum(dim=(0, 2, 3))
        grh = go.sum(dim=(0, 2, 3))
    else:
        gr, grs, grh = _like(residual, go), empty_grad(dev), empty_grad(dev)
    return gfa, gfb, gsa, gha, gsb, ghb, gw1, gb1, gw2, gb2, gr, grs, grh


def _like(ref, value):
    out = empty_like_layout(ref, value.shape, ref.dtype)
    out.copy_(value)
    return out


register_impl("lkam_se", "reference", lkam_se_ref)
register_impl("_lkam_se_backward", "reference", lkam_se_backward_ref)


# custom_op rather than triton_op: see msff/ops/lk_conv.py.
@torch.library.custom_op("msff::lkam_se", mutates_args=())
def _lkam_se_op(
    fa: torch.Tensor, fb: Optional[torch.Tensor], scale_a: Optional[torch.Tensor],
    shift_a: Optional[torch.Tensor], scale_b: Optional[torch.Tensor],
    shift_b: Optional[torch.Tensor], w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
    b2: torch.Tensor, residual: torch.Tensor, res_scale: Optional[torch.Tensor],
    res_shift: Optional[torch.Tensor], backend: str, pool_sum: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    args = (fa, fb, scale_a, shift_a, scale_b, shift_b, w1, b1, w2, b2, residual, res_scale,
            res_shift)
    _check(*args)
    impl = get_impl("lkam_se", backend)
    if pool_sum is not None:
        _check_pool_sum(pool_sum, fa, fb, scale_a)
        if getattr(impl, "accepts_pool_sum", False):
            return impl(*args, pool_sum=pool_sum)
    return impl(*args)


def _check_pool_sum(pool_sum, fa, fb, scale_a):
    want = (fa.shape[0], fa.shape[1])
    if tuple(pool_sum.shape) != want or pool_sum.dtype != acc_dtype(fa.dtype):
        raise ValueError(f"pool_sum must be {acc_dtype(fa.dtype)} {want}, got {pool_sum.dtype} "
                         f"{tuple(pool_sum.shape)}")
    if fb is not None or scale_a is not None:
        raise ValueError("pool_sum is Σ_hw fa: only without fb and without scale_a/shift_a")


@_lkam_se_op.register_fake
def _(fa, fb, scale_a, shift_a, scale_b, shift_b, w1, b1, w2, b2, residual, res_scale, res_shift,
      backend, pool_sum=None):
    return empty_like_layout(fa), fa.new_empty((fa.shape[0], fa.shape[1]), dtype=acc_dtype(fa.dtype))


@torch.library.custom_op("msff::_lkam_se_backward", mutates_args=())
def _lkam_se_backward_op(
    grad_out: torch.Tensor, grad_pooled: Optional[torch.Tensor], pooled: torch.Tensor,
    fa: torch.Tensor, fb: Optional[torch.Tensor], scale_a: Optional[torch.Tensor],
    shift_a: Optional[torch.Tensor], scale_b: Optional[torch.Tensor],
    shift_b: Optional[torch.Tensor], w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
    b2: torch.Tensor, residual: torch.Tensor, res_scale: Optional[torch.Tensor],
    res_shift: Optional[torch.Tensor], backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    return get_impl("_lkam_se_backward", backend)(
        grad_out, grad_pooled, pooled, fa, fb, scale_a, shift_a, scale_b, shift_b, w1, b1, w2,
        b2, residual, res_scale, res_shift,
    )


@_lkam_se_backward_op.register_fake
def _(grad_out, grad_pooled, pooled, fa, fb, scale_a, shift_a, scale_b, shift_b, w1, b1, w2, b2,
      residual, res_scale, res_shift, backend):
    e = lambda: fa.new_empty((0,), dtype=torch.float32)
    vec = lambda v: torch.empty_like(v) if v is not None else e()
    return (
        empty_like_layout(fa),
        empty_like_layout(fb) if fb is not None else e(),
        vec(scale_a) if scale_a is not None else e(), vec(shift_a) if scale_a is not None else e(),
        vec(scale_b) if fb is not None and scale_b is not None else e(),
        vec(shift_b) if fb is not None and scale_b is not None else e(),
        torch.empty_like(w1), torch.empty_like(b1), torch.empty_like(w2), torch.empty_like(b2),
        empty_like_layout(residual),
        vec(res_scale) if res_scale is not None else e(),
        vec(res_shift) if res_scale is not None else e(),
    )


def _setup_context(ctx, inputs, output):
    (fa, fb, scale_a, shift_a, scale_b, shift_b, w1, b1, w2, b2, residual, res_scale,
     res_shift, backend) = inputs[:14]
    ctx.save_for_backward(output[1], fa, fb, scale_a, shift_a, scale_b, shift_b, w1, b1, w2, b2,
                          residual, res_scale, res_shift)
    ctx.backend = backend


def _backward(ctx, grad_out, grad_pooled):
    saved = ctx.saved_tensors
    fa = saved[1]
    if grad_out is None:
        grad_out = torch.zeros_like(fa)
    grads = _lkam_se_backward_op(grad_out, grad_pooled, *saved, ctx.backend)
    out = [g if need else None for g, need in zip(grads, ctx.needs_input_grad[:13], strict=True)]
    return (*out, None, None)


_lkam_se_op.register_autograd(_backward, setup_context=_setup_context)


def lkam_se(fa, fb, scale_a, shift_a, scale_b, shift_b, w1, b1, w2, b2, residual,
            res_scale=None, res_shift=None, backend="auto", pool_sum=None):
    """Call ``msff::lkam_se`` (SPEC.md) with the given backend.

    ``pool_sum`` (inference only): (N, C) fp32 Σ_{h,w} fa, e.g. from ``lk_conv(..., pool=True)``
    of the conv that produced ``fa``; a backend that accepts it skips its own pooling pass
    (``fb`` and ``scale_a`` must be None). No gradient flows into it.

    Returns:
        (out (N, C, H, W), pooled (N, C) fp32).

    Example:
        >>> f = torch.randn(2, 8, 5, 5)
        >>> out, _ = lkam_se(f, None, None, None, None, None, torch.randn(1, 8), torch.randn(1),
        ...                  torch.randn(8, 1), torch.randn(8), f, backend="reference")
        >>> out.shape
        torch.Size([2, 8, 5, 5])
    """
    if backend == "auto":  # msff.backend decides: reference unless a GPU record validates one
        backend = resolve_backend("auto", fa)
    if pool_sum is not None and torch.is_grad_enabled() and pool_sum.requires_grad:
        raise ValueError("pool_sum is an inference input: no gradient flows into it")
    return _lkam_se_op(fa, fb, scale_a, shift_a, scale_b, shift_b, w1, b1, w2, b2, residual,
                       res_scale, res_shift, backend, pool_sum)


def _lkam_se_triton(fa, fb, scale_a, shift_a, scale_b, shift_b, w1, b1, w2, b2, residual,
                    res_scale, res_shift, pool_sum=None):
    from msff.kernels.lkam_se import se_apply, se_pool

    if fa.dtype == torch.float64:
        raise ValueError("float64 runs on the reference backend only (it exists for gradcheck)")
    scale_a, shift_a, scale_b, shift_b, res_scale, res_shift = (
        v.contiguous() if v is not None else None
        for v in (scale_a, shift_a, scale_b, shift_b, res_scale, res_shift))
    hw = fa.shape[2] * fa.shape[3]
    if pool_sum is None:
        pool_sum = se_pool(fa, fb, scale_a, shift_a, scale_b, shift_b)
    pooled = pool_sum / max(hw, 1)
    _, _, z = _excite(pooled, w1, b1, w2, b2)
    out = empty_like_layout(fa)
    se_apply(fa, fb, scale_a, shift_a, scale_b, shift_b, z.contiguous(), residual, res_scale,
             res_shift, out)
    return out, pooled


def _lkam_se_backward_triton(grad_out, grad_pooled, pooled, fa, fb, scale_a, shift_a, scale_b,
                             shift_b, w1, b1, w2, b2, residual, res_scale, res_shift):
    from msff.kernels.lkam_se import se_backward_apply, se_backward_reduce

    dev = fa.device
    hw = fa.shape[2] * fa.shape[3]
    aff_r = res_scale is not None
    scale_a, shift_a, scale_b, shift_b, res_scale, res_shift = (
        v.contiguous() if v is not None else None
        for v in (scale_a, shift_a, scale_b, shift_b, res_scale, res_shift))
    gz, grs, grh = se_backward_reduce(grad_out, fa, fb, scale_a, shift_a, scale_b, shift_b,
                                      residual, aff_r)
    z, gp, gw1, gb1, gw2, gb2 = _mlp_backward(gz, pooled, w1, b1, w2, b2, grad_pooled, hw)
    gfa = empty_like_layout(fa)
    gfb = empty_like_layout(fb) if fb is not None else None
    zeros = lambda v: torch.zeros_like(v) if v is not None else None
    gsa, gha = zeros(scale_a), zeros(shift_a)
    gsb, ghb = (zeros(scale_b), zeros(shift_b)) if fb is not None else (None, None)
    gr = empty_like_layout(residual)
    se_backward_apply(grad_out, fa, fb, scale_a, shift_a, scale_b, shift_b, z.contiguous(),
                      gp.contiguous(), res_scale, gfa, gfb, gsa, gha, gsb, ghb, gr)
    e = lambda v: v if v is not None else empty_grad(dev)
    return (gfa, e(gfb), e(gsa), e(gha), e(gsb), e(ghb), gw1, gb1, gw2, gb2, gr,
            grs if aff_r else empty_grad(dev), grh if aff_r else empty_grad(dev))


_lkam_se_triton.accepts_pool_sum = True
register_impl("lkam_se", "triton", _lkam_se_triton)
register_impl("_lkam_se_backward", "triton", _lkam_se_backward_triton)
