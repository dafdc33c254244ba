"""``msff::lk_conv``: 1-D large-kernel "same" convolution with fused BN/ReLU prologue and
bias/ReLU/add/statistics epilogue, and its backward op ``msff::_lk_conv_backward``.

The contract is msff/ops/SPEC.md; :func:`lk_conv_ref` is its executable form. The op dispatches
to the implementation registered in :mod:`msff.ops.registry` for its ``backend`` argument.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from msff.ops.dispatch import resolve_backend
from msff.ops.registry import empty_grad, empty_like_layout, get_impl, register_impl

__all__ = ["acc_dtype", "lk_conv", "lk_conv_ref", "lk_conv_backward_ref", "check_lk_conv_args"]


def check_lk_conv_args(x, weight, bias, in_scale, in_shift, add):
    """Validate shapes/dtypes of lk_conv's arguments; raise ValueError saying what was expected."""
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (N, C, H, W), got {x.dim()}-D")
    if weight.dim() != 4 or (weight.shape[2] != 1 and weight.shape[3] != 1):
        raise ValueError(
            f"weight must be (Cout, Cin, 1, k) or (Cout, Cin, k, 1), got {tuple(weight.shape)}"
        )
    k = weight.shape[2] * weight.shape[3]
    if k % 2 == 0:
        raise ValueError(f"kernel size must be odd for 'same' padding, got {k}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight has Cin={weight.shape[1]} but x has C={x.shape[1]}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        # float64 exists for gradcheck; the fast paths are fp32/fp16/bf16
        raise ValueError(f"x must be float32/float16/bfloat16 (or float64), got {x.dtype}")
    if weight.dtype != x.dtype:
        raise ValueError(f"weight dtype {weight.dtype} must equal x dtype {x.dtype}")
    if (in_scale is None) != (in_shift is None):
        raise ValueError("in_scale and in_shift must be given together")
    vdt = acc_dtype(x.dtype)
    for name, v, n in (("bias", bias, weight.shape[0]), ("in_scale", in_scale, x.shape[1]),
                       ("in_shift", in_shift, x.shape[1])):
        if v is not None and (v.shape != (n,) or v.dtype != vdt):
            raise ValueError(f"{name} must be {vdt} of shape ({n},), got {v.dtype} {tuple(v.shape)}")
    if add is not None:
        want = (x.shape[0], weight.shape[0], x.shape[2], x.shape[3])
        if tuple(add.shape) != want or add.dtype != x.dtype:
            raise ValueError(f"add must be {x.dtype} of shape {want}, got {add.dtype} {tuple(add.shape)}")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation / per-channel-vector dtype: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _prologue(x, in_scale, in_shift):
    if in_scale is None:
        return x
    xf = x.to(acc_dtype(x.dtype)) * in_scale.view(1, -1, 1, 1) + in_shift.view(1, -1, 1, 1)
    return torch.relu(xf).to(x.dtype)


def _pad(weight):
    return (weight.shape[2] // 2, weight.shape[3] // 2)


def lk_conv_ref(x, weight, bias=None, in_scale=None, in_shift=None, add=None, relu=False,
                stats=False, pool=False):
    """Pure-PyTorch reference of ``msff::lk_conv`` (SPEC.md).

    Args:
        x: (N, Cin, H, W). weight: (Cout, Cin, 1, k) or (Cout, Cin, k, 1), x's dtype.
        bias: (Cout,) fp32 or None. in_scale, in_shift: (Cin,) fp32 or None (prologue
            ``relu(x*s + t)``). add: (N, Cout, H, W) or None. relu: ReLU after the bias.
        stats: also return per-channel Σy and the centred M2 = Σ(y - ȳ)² (fp32).
        pool: also return Σ_{h,w} y per image, (N, Cout) fp32, of the stored y.

    Returns:
        (y, ch_sum, ch_m2, pooled); the sums are empty (0,) tensors when ``stats`` is False,
        ``pooled`` when ``pool`` is False.

    Example:
        >>> y, _, _, _ = lk_conv_ref(torch.randn(1, 4, 5, 6), torch.randn(8, 4, 1, 7))
        >>> y.shape
        torch.Size([1, 8, 5, 6])
    """
    xin = _prologue(x, in_scale, in_shift)
    acc = F.conv2d(xin, weight, padding=_pad(weight)).to(acc_dtype(x.dtype))
    if bias is not None:
        acc = acc + bias.view(1, -1, 1, 1)
    if relu:
        acc = torch.relu(acc)
    if add is not None:
        acc = acc + add.to(acc.dtype)
    y = empty_like_layout(x, acc.shape, x.dtype)
    y.copy_(acc)
    if stats:
        s = acc.sum(dim=(0, 2, 3))
        count = max(1, acc.shape[0] * acc.shape[2] * acc.shape[3])
        q = (acc - (s / count).view(1, -1, 1, 1)).square().sum(dim=(0, 2, 3))
    else:
        s, q = empty_grad(x.device), empty_grad(x.device)
    return y, s, q, _pooled(y, pool)


def _pooled(y, pool):
    """Σ_{h,w} y per image in fp32 (the SE squeeze), or the empty placeholder."""
    if not pool:
        return empty_grad(y.device)
    return y.to(acc_dtype(y.dtype)).sum(dim=(2, 3))


def _grad_out_total(grad_y, grad_sum, grad_sumsq, y, add, relu):
    """(g, g_r) of SPEC: the gradient w.r.t. the fp32 epilogue value y, and past the ReLU."""
    adt = acc_dtype(y.dtype)
    g = grad_y.to(adt)
    if grad_sum is not None and grad_sum.numel():
        g = g + grad_sum.view(1, -1, 1, 1)
    if grad_sumsq is not None and grad_sumsq.numel():
        g = g + 2.0 * y.to(adt) * grad_sumsq.view(1, -1, 1, 1)
    g_r = g
    if relu:
        r = y.to(adt) - add.to(adt) if add is not None else y.to(adt)
        g_r = g * (r > 0)
    return g, g_r


def lk_conv_backward_ref(grad_y, grad_sum, grad_sumsq, x, weight, y, bias, in_scale, in_shift,
                         add, relu, output_mask):
    """Pure-PyTorch reference of ``msff::_lk_conv_backward`` (SPEC.md)."""
    dev = x.device
    adt = acc_dtype(x.dtype)
    g, g_r = _grad_out_total(grad_y, grad_sum, grad_sumsq, y, add, relu)
    pad = _pad(weight)
    outs = [empty_grad(dev) for _ in range(6)]
    need_xin_grad = output_mask[0] or (in_scale is not None and (output_mask[3] or output_mask[4]))
    if need_xin_grad:
        gxin = torch.nn.grad.conv2d_input(x.shape, weight.to(adt), g_r, padding=pad)
        if in_scale is not None:
            pre = x.to(adt) * in_scale.view(1, -1, 1, 1) + in_shift.view(1, -1, 1, 1)
            gm = gxin * (pre > 0)
            if output_mask[0]:
                outs[0] = _like(x, gm * in_scale.view(1, -1, 1, 1))
            outs[3] = (gm * x.to(adt)).sum(dim=(0, 2, 3)) if output_mask[3] else outs[3]
            outs[4] = gm.sum(dim=(0, 2, 3)) if output_mask[4] else outs[4]
        elif output_mask[0]:
            outs[0] = _like(x, gxin)
    if output_mask[1]:
        xin = _prologue(x, in_scale, in_shift).to(adt)
        gw = torch.nn.grad.conv2d_weight(xin, weight.shape, g_r, padding=pad)
        outs[1] = gw.to(weight.dtype).contiguous()
    if output_mask[2] and bias is not None:
        outs[2] = g_r.sum(dim=(0, 2, 3))
    if output_mask[5] and add is not None:
        outs[5] = _like(add, g)
    return tuple(outs)


def _like(ref, value):
    out = empty_like_layout(ref, value.shape, ref.dtype)
    out.copy_(value)
    return out


lk_conv_ref.epilogue_pool = True
register_impl("lk_conv", "reference", lk_conv_ref)
register_impl("_lk_conv_backward", "reference", lk_conv_backward_ref)


# ---- torch.library ops ----------------------------------------------------------------------
# custom_op (not triton_op + wrap_triton): ENV-NOTES measured that triton_op fails under
# torch.compile on CPU/interpreter, while custom_op passes opcheck, gradcheck and
# torch.compile(fullgraph=True); custom_op is also what lets the same op dispatch to the
# reference / triton / cuda implementations through the registry.
@torch.library.custom_op("msff::lk_conv", mutates_args=())
def _lk_conv_op(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
    in_scale: Optional[torch.Tensor], in_shift: Optional[torch.Tensor],
    add: Optional[torch.Tensor], relu: bool, stats: bool, backend: str, pool: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    check_lk_conv_args(x, weight, bias, in_scale, in_shift, add)
    impl = get_impl("lk_conv", backend)
    if getattr(impl, "epilogue_pool", False):  # the backend pools in its epilogue
        return impl(x, weight, bias, in_scale, in_shift, add, relu, stats, pool)
    y, s, q = impl(x, weight, bias, in_scale, in_shift, add, relu, stats)
    return y, s, q, _pooled(y, pool)


@_lk_conv_op.register_fake
def _(x, weight, bias, in_scale, in_shift, add, relu, stats, backend, pool=False):
    shape = (x.shape[0], weight.shape[0], x.shape[2], x.shape[3])
    y = empty_like_layout(x, shape, x.dtype)
    n = weight.shape[0] if stats else 0
    adt = acc_dtype(x.dtype) if stats else torch.float32
    pooled = (x.new_empty((x.shape[0], weight.shape[0]), dtype=acc_dtype(x.dtype)) if pool
              else x.new_empty((0,), dtype=torch.float32))
    return y, x.new_empty((n,), dtype=adt), x.new_empty((n,), dtype=adt), pooled


@torch.library.custom_op("msff::_lk_conv_backward", mutates_args=())
def _lk_conv_backward_op(
    grad_y: torch.Tensor, grad_sum: Optional[torch.Tensor], grad_sumsq: Optional[torch.Tensor],
    x: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, bias: Optional[torch.Tensor],
    in_scale: Optional[torch.Tensor], in_shift: Optional[torch.Tensor],
    add: Optional[torch.Tensor], relu: bool, output_mask: list[bool], backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return get_impl("_lk_conv_backward", backend)(
        grad_y, grad_sum, grad_sumsq, x, weight, y, bias, in_scale, in_shift, add, relu,
        list(output_mask),
    )


@_lk_conv_backward_op.register_fake
def _(grad_y, grad_sum, grad_sumsq, x, weight, y, bias, in_scale, in_shift, add, relu,
      output_mask, backend):
    e = lambda: x.new_empty((0,), dtype=torch.float32)
    return (
        empty_like_layout(x) if output_mask[0] else e(),
        torch.empty(weight.shape, dtype=weight.dtype, device=weight.device) if output_mask[1] else e(),
        torch.empty_like(bias) if output_mask[2] and bias is not None else e(),
        torch.empty_like(in_scale) if output_mask[3] and in_scale is not None else e(),
        torch.empty_like(in_shift) if output_mask[4] and in_shift is not None else e(),
        empty_like_layout(add) if output_mask[5] and add is not None else e(),
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, in_scale, in_shift, add, relu, stats, backend = inputs[:9]
    y, ch_sum = output[0], output[1]
    ctx.save_for_backward(x, weight, y, bias, in_scale, in_shift, add, ch_sum if stats else None)
    ctx.relu, ctx.stats, ctx.backend = relu, stats, backend


def backward_arguments(ctx, grad_y, grad_sum, grad_sumsq):
    """The positional arguments of a ``_lk_conv_backward`` op (without ``backend``) for an autograd
    context saved as ``(x, weight, y, bias, in_scale, in_shift, add)`` with ``ctx.relu`` and
    ``ctx.stats``; shared by the public op and the CUDA backend's own ``*_cuda`` op."""
    x, weight, y, bias, in_scale, in_shift, add = ctx.saved_tensors[:7]
    nig = ctx.needs_input_grad
    mask = [bool(nig[0]), bool(nig[1]), bool(nig[2]) and bias is not None,
            bool(nig[3]) and in_scale is not None, bool(nig[4]) and in_shift is not None,
            bool(nig[5]) and add is not None]
    if grad_y is None:
        grad_y = torch.zeros_like(y)
    if not ctx.stats:
        grad_sum = grad_sumsq = None
    return (grad_y, grad_sum, grad_sumsq, x, weight, y, bias, in_scale, in_shift, add, ctx.relu, mask)


def _m2_grads(ctx, grad_sum, grad_m2):
    """The output gradients (grad_sum, grad_sumsq) of the backward op (SPEC: g = grad_y + grad_sum
    + 2·y·grad_sumsq) for upstream gradients of (Σy, M2): ∂M2/∂y = 2(y - ȳ), so grad_sumsq =
    grad_m2 and grad_sum gains -2·ȳ·grad_m2."""
    if not ctx.stats or grad_m2 is None:
        return grad_sum, grad_m2
    x, ch_sum = ctx.saved_tensors[0], ctx.saved_tensors[7]
    count = max(1, x.shape[0] * x.shape[2] * x.shape[3])
    shift = -2.0 * (ch_sum / count) * grad_m2
    return (shift if grad_sum is None else grad_sum + shift), grad_m2


def _backward(ctx, grad_y, grad_sum, grad_m2, grad_pooled):
    grad_sum, grad_sumsq = _m2_grads(ctx, grad_sum, grad_m2)
    if grad_pooled is not None and grad_pooled.numel():  # pooled = Σ_hw y: broadcast back
        gp = grad_pooled[:, :, None, None]
        grad_y = gp.expand(*gp.shape[:2], *ctx.saved_tensors[2].shape[2:]) if grad_y is None \
            else grad_y + gp
    args = backward_arguments(ctx, grad_y, grad_sum, grad_sumsq)
    outs = _lk_conv_backward_op(*args, ctx.backend)
    grads = [o if m else None for o, m in zip(outs, args[-1], strict=True)]
    return (*grads, None, None, None, None)


_lk_conv_op.register_autograd(_backward, setup_context=_setup_context)


def lk_conv(x, weight, bias=None, in_scale=None, in_shift=None, add=None, relu=False,
            stats=False, backend="auto", pool=False):
    """Call ``msff::lk_conv`` (SPEC.md) with the given backend.

    Args:
        x: (N, Cin, H, W) fp32/fp16/bf16, any layout.
        weight: (Cout, Cin, 1, k) or (Cout, Cin, k, 1), x's dtype; k odd.
        bias: (Cout,) fp32. in_scale, in_shift: (Cin,) fp32 prologue ``relu(x*s + t)``.
        add: (N, Cout, H, W) added after the ReLU. relu: apply ReLU after the bias.
        stats: also return per-channel Σy and M2 = Σ(y - ȳ)² (fp32, (Cout,); the variance is
            M2 / (N·H·W), with no E[y²] - E[y]² cancellation).
        backend: ``auto`` (default: :func:`msff.backend.resolve_backend` decides; the reference
            unless a GPU validation record says a fused backend is correct and faster) |
            ``reference`` | ``triton`` | ``cuda``.
        pool: also return ``pooled`` (N, Cout) fp32 = Σ_{h,w} y per image of the stored y (the
            SE squeeze of the LKAM block, from the Triton epilogue: no extra pass over y).

    Returns:
        (y (N, Cout, H, W), ch_sum, ch_m2), and ``pooled`` as a fourth element when ``pool``.

    Example:
        >>> y, s, q = lk_conv(torch.randn(2, 3, 9, 9), torch.randn(8, 3, 1, 15), stats=True,
        ...                   backend="reference")
        >>> y.shape, s.shape
        (torch.Size([2, 8, 9, 9]), torch.Size([8]))
    """
    if backend == "auto":
        backend = resolve_backend("auto", x)
    out = _lk_conv_op(x, weight, bias, in_scale, in_shift, add, bool(relu), bool(stats), backend,
                      bool(pool))
    return out if pool else out[:3]


# ---- triton implementation --------------------------------------------------------------------
def _vec(v):
    # per-channel vectors are indexed as dense 1-D arrays by the kernels (a gradient such as
    # grad_sum can arrive as a stride-0 expansion)
    return v.contiguous() if v is not None else None


def _no_fp64(t):
    if t.dtype == torch.float64:
        raise ValueError("float64 runs on the reference backend only (it exists for gradcheck)")


def _lk_conv_triton(x, weight, bias, in_scale, in_shift, add, relu, stats, pool=False):
    from msff.kernels.lk_conv import lk_conv_fwd

    _no_fp64(x)
    bias, in_scale, in_shift = _vec(bias), _vec(in_scale), _vec(in_shift)
    shape = (x.shape[0], weight.shape[0], x.shape[2], x.shape[3])
    y = empty_like_layout(x, shape, x.dtype)
    s, q = empty_grad(x.device), empty_grad(x.device)
    if stats:
        s = torch.zeros(weight.shape[0], dtype=torch.float32, device=x.device)
        q = torch.zeros(weight.shape[0], dtype=torch.float32, device=x.device)
    pooled = empty_grad(x.device)
    if pool:
        pooled = torch.zeros((x.shape[0], weight.shape[0]), dtype=torch.float32, device=x.device)
    if y.numel():
        sums = lk_conv_fwd(x, weight, bias, in_scale, in_shift, add, relu, stats, y,
                           pool_out=pooled if pool else None)
        if stats:
            s, q = sums
    return y, s, q, pooled


_lk_conv_triton.epilogue_pool = True


def _lk_conv_backward_triton(grad_y, grad_sum, grad_sumsq, x, weight, y, bias, in_scale,
                             in_shift, add, relu, output_mask):
    from msff.kernels.lk_conv import lk_conv_fwd, lk_conv_grad_out, lk_conv_wgrad

    dev = x.device
    outs = [empty_grad(dev) for _ in range(6)]
    gs = _vec(grad_sum) if grad_sum is not None and grad_sum.numel() else None
    gq = _vec(grad_sumsq) if grad_sumsq is not None and grad_sumsq.numel() else None
    bias, in_scale, in_shift = _vec(bias), _vec(in_scale), _vec(in_shift)
    need_gadd = bool(output_mask[5]) and add is not None
    need_gbias = bool(output_mask[2]) and bias is not None
    g_add = empty_like_layout(add) if need_gadd else None
    # g_r comes back as a dense channels_last buffer: the operand of both backward GEMMs
    g_r, g_bias = lk_conv_grad_out(grad_y, y, add, gs, gq, relu, g_add, need_gbias)
    if need_gadd:
        outs[5] = g_add
    if need_gbias:
        outs[2] = g_bias
    has_pro = in_scale is not None
    if output_mask[0] or (has_pro and (output_mask[3] or output_mask[4])):
        # backward-data = "same" conv of g_r with the tap-flipped, Cin<->Cout-swapped weight,
        # with the backward of the prologue fused into its epilogue.
        kh = weight.shape[2]
        w_t = weight.flip(3 if kh == 1 else 2).transpose(0, 1)
        gx = empty_like_layout(x)
        pro = (x, in_scale, in_shift) if has_pro else None
        gsc = torch.zeros_like(in_scale) if has_pro else None
        gsh = torch.zeros_like(in_shift) if has_pro else None
        if gx.numel():
            sums = lk_conv_fwd(g_r, w_t, None, None, None, None, False, False, gx, pro_bwd=pro)
            if has_pro:
                gsc, gsh = sums
        if output_mask[0]:
            outs[0] = gx
        if has_pro:
            outs[3] = gsc if output_mask[3] else outs[3]
            outs[4] = gsh if output_mask[4] else outs[4]
    if output_mask[1]:
        if x.numel():
            gw = lk_conv_wgrad(g_r, x, in_scale, in_shift, (weight.shape[2], weight.shape[3]))
        else:
            gw = torch.zeros(weight.shape, dtype=torch.float32, device=dev)
        outs[1] = gw.to(weight.dtype).contiguous()
    return tuple(outs)


register_impl("lk_conv", "triton", _lk_conv_triton)
register_impl("_lk_conv_backward", "triton", _lk_conv_backward_triton)
