"""The ``cuda`` backend: CUDA C++ kernels of the compiled extension ``msff._C`` (csrc/).

``msff._C`` defines the ops ``msff::lk_conv_cuda``, ``msff::_lk_conv_backward_cuda``,
``msff::lkam_se_cuda`` and ``msff::_lkam_se_backward_cuda`` (the arguments of the public ops of
msff/ops/SPEC.md without the trailing ``backend``) and, when built with nvcc, their CUDA kernels.
This module, imported by :mod:`msff.ops`:

* registers those ops as the ``cuda`` implementation of ``lk_conv``, ``_lk_conv_backward``,
  ``lkam_se``, ``_lkam_se_backward`` in :mod:`msff.ops.registry` (only when the kernels exist);
* gives the ``_cuda`` ops fake (meta) implementations and autograd formulas (each backward is
  its own op), so they can also be used, traced and checked on their own;
* installs the ``cuda`` availability probe of :mod:`msff.backend`, which says why the backend
  cannot run: extension missing, built without CUDA, no GPU, CPU input, unsupported dtype.

Example:
    >>> import msff.ops._cuda as cuda_backend
    >>> cuda_backend.unavailable_reason(None) is None or isinstance(
    ...     cuda_backend.unavailable_reason(None), str)
    True
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch

from msff.ops.dispatch import register_backend_probe
from msff.ops.registry import empty_like_layout, register_impl

log = logging.getLogger("msff.ops.cuda")

__all__ = ["CONV_KERNELS", "CONV_KERNEL_ENV", "CUDA_OPS", "conv_kernel", "conv_plan",
           "extension_error", "kernels_built", "set_conv_kernel_default", "unavailable_reason"]

#: Environment variable choosing the lk_conv forward / input-gradient / weight-gradient kernels;
#: when set it wins over the process default (:func:`set_conv_kernel_default`). See CONV_KERNELS.
CONV_KERNEL_ENV = "MSFF_CUDA_CONV"
#: The lk_conv kernel requests of the CUDA backend: ``generic`` (csrc/cuda/line_conv.cu, every
#: dtype and layout; the default until a GPU validation record says otherwise), ``tc`` (the
#: tensor-core pipeline of this GPU where the shape allows: on sm_90a builds on Hopper wgmma fed by
#: TMA + mbarriers, mma.sync on sm_80+, else generic), ``tc-cpasync`` (on Hopper wgmma with
#: cp.async staging instead of TMA) and ``sm80`` (the mma.sync pipeline even on Hopper).
CONV_KERNELS = ("generic", "tc", "tc-cpasync", "sm80")

_PLAN_KEYS = (
    "fwd_bm", "fwd_bn", "fwd_threads", "fwd_smem_bytes", "fwd_grid_x", "fwd_grid_y",
    "wgrad_bm", "wgrad_bn", "wgrad_pixels", "wgrad_threads", "wgrad_smem_bytes",
    "wgrad_grid_x", "wgrad_grid_y", "wgrad_splits", "wgrad_kmax",
)
_PW_PLAN_KEYS = (
    "channels_per_cta", "pixels_per_subtile", "threads", "grid_x", "grid_y", "grid_z", "span",
    "partial_elems", "vector_elems_bf16", "vector_elems_fp32",
)

#: public op name -> the compiled op implementing it
CUDA_OPS = {
    "lk_conv": "lk_conv_cuda",
    "_lk_conv_backward": "_lk_conv_backward_cuda",
    "lkam_se": "lkam_se_cuda",
    "_lkam_se_backward": "_lkam_se_backward_cuda",
}
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_C = None
_C_ERROR: Optional[str] = None
try:
    import msff._C as _C  # noqa: N811 - loads the library: op schemas (+ CUDA kernels)
except ImportError as e:  # pure-Python install (MSFF_BUILD_EXT=0) or a broken build
    _C_ERROR = (
        f"the compiled extension msff._C is not importable ({e}); build it with "
        "`pip install --no-build-isolation .` using torch's CUDA build and nvcc"
    )


def extension_error() -> Optional[str]:
    """None if ``msff._C`` loaded with CUDA kernels, else why it did not."""
    if _C is None:
        return _C_ERROR
    if not getattr(_C, "WITH_CUDA", 0):
        return (
            "msff._C was built without CUDA kernels (torch was not a CUDA build, nvcc was not found, "
            "or MSFF_BUILD_CUDA=0; see build/msff-build-decision.txt and rebuild)"
        )
    return None


def kernels_built() -> bool:
    """True when every ``msff::*_cuda`` op has a kernel for the CUDA dispatch key."""
    if extension_error() is not None:
        return False
    return all(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"msff::{name}", "CUDA")
        for name in CUDA_OPS.values()
    )


def unavailable_reason(x: Optional[torch.Tensor]) -> Optional[str]:
    """The ``cuda`` backend probe: None if it can run on ``x``, else the reason it cannot.

    Args:
        x: the input the op will see, or None to ask about the machine.

    Returns:
        None or a sentence saying what is missing.
    """
    err = extension_error()
    if err is not None:
        return err
    if x is not None:
        if not x.is_cuda:
            return f"the input is on {x.device.type}; the CUDA kernels need CUDA tensors"
        if x.dtype not in _DTYPES:
            return f"dtype {x.dtype} is not supported by the CUDA kernels (float32, float16, bfloat16)"
    elif not torch.cuda.is_available():
        return "no CUDA GPU is available (torch.cuda.is_available() is False)"
    if not kernels_built():
        return "msff._C has no CUDA kernel registered for some msff::*_cuda op"
    return None


register_backend_probe("cuda", unavailable_reason)


def conv_kernel() -> str:
    """The lk_conv kernel request the CUDA backend uses now: ``$MSFF_CUDA_CONV`` when set (an
    unknown value raises at the next CUDA call), else the process default.

    Example:
        >>> conv_kernel() in CONV_KERNELS
        True
    """
    env = os.environ.get(CONV_KERNEL_ENV, "")
    if env:
        return env
    if _C is None:
        return CONV_KERNELS[0]
    return str(torch.ops.msff._cuda_conv_default(""))


def set_conv_kernel_default(name: str) -> str:
    """Sets the process default lk_conv kernel request (one of :data:`CONV_KERNELS`; used when
    ``$MSFF_CUDA_CONV`` is unset) and returns the previous one. Kernels that have not passed a GPU
    validation record should only be chosen explicitly (``auto`` sets it from the record).

    Example:
        >>> prev = set_conv_kernel_default("tc")
        >>> set_conv_kernel_default(prev)
        'tc'
    """
    if name not in CONV_KERNELS:
        raise ValueError(f"the CUDA conv kernel must be one of {', '.join(CONV_KERNELS)}, "
                         f"got {name!r}")
    if _C is None:
        raise RuntimeError(extension_error())
    return str(torch.ops.msff._cuda_conv_default(name))


def conv_plan(n: int, cin: int, cout: int, h: int, w: int, k: int, axis: int = 1,
              smem_optin: int = 232448, num_sms: int = 132, cc: int = 90) -> dict:
    """The launch plan of the tensor-core lk_conv kernels for one shape, computed by the same C++
    functions their launchers call (csrc/cuda/line_conv_plan.h); needs ``msff._C``, not a GPU.

    Forward / input gradient: persistent CTAs of ``fwd_threads`` threads over tiles of ``fwd_bm``
    pixels x ``fwd_bn`` output channels, all taps' weights resident in ``fwd_smem_bytes`` of shared
    memory (one CTA per SM). Weight gradient: CTAs of ``wgrad_bm`` output x ``wgrad_bn`` input
    channels x all taps, split over pixels into ``wgrad_splits`` deterministic partials.

    Args:
        n, cin, cout, h, w, k: the convolution's shape (x is (N, Cin, H, W), weight k taps).
        axis: 1 for a 1×k kernel (along W), 0 for k×1 (along H).
        smem_optin: the device's opt-in shared memory per block in bytes (H100/H200: 232448,
            A100: 166912).
        num_sms: the device's SM count (H100 SXM/H200: 132, A100: 108).
        cc: compute capability x 10: 90 plans the wgmma kernels (``tc`` / ``tc-cpasync`` on
            Hopper: 128-pixel tiles), anything else the mma.sync kernel, which takes a 64-pixel
            tile where 128 pixels leave room for 16 channels only (A100 at E2: 64 x 32).

    Returns:
        dict of the ints named in ``_PLAN_KEYS`` (``fwd_bn == 0``: no tile fits, the generic kernel
        runs).

    Example:
        >>> plan = conv_plan(32, 64, 64, 512, 512, 15)
        >>> plan["fwd_bn"], plan["fwd_grid_x"]
        (64, 132)
    """
    if _C is None:
        raise RuntimeError(extension_error())
    vals = torch.ops.msff._lk_conv_cuda_plan(n, cin, cout, h, w, k, axis, smem_optin, num_sms, cc)
    return dict(zip(_PLAN_KEYS, (int(v) for v in vals), strict=True))


def pointwise_plan(n: int, c: int, h: int, w: int) -> dict:
    """The launch plan of the pointwise / SE kernels (csrc/cuda/pointwise.cu) for an (N, C, H, W)
    activation, computed by the C++ function their launchers call (csrc/cuda/pointwise_plan.h);
    needs ``msff._C``, not a GPU.

    A CTA of ``threads`` threads owns ``channels_per_cta`` channels x ``span`` pixels of one image
    (walked in sub-tiles of ``pixels_per_subtile``), moving 16-byte vectors of
    ``vector_elems_bf16`` / ``vector_elems_fp32`` elements; each reduced quantity leaves
    ``partial_elems`` fp64 per-CTA partials that a second kernel sums in a fixed order.

    Example:
        >>> plan = pointwise_plan(32, 64, 512, 512)
        >>> plan["span"], plan["grid_x"], plan["grid_x"] * plan["grid_z"]
        (4096, 64, 2048)
    """
    if _C is None:
        raise RuntimeError(extension_error())
    vals = torch.ops.msff._pointwise_cuda_plan(n, c, h, w)
    return dict(zip(_PW_PLAN_KEYS, (int(v) for v in vals), strict=True))


_TMA_KEYS = ("dims", "strides_bytes", "box", "chunks", "box_bytes", "chunk_bytes", "ok", "stages",
             "smem_bytes", "stage_bytes", "threads")


def tma_plan(n: int, c: int, h: int, w: int, strides: tuple, k: int, axis: int = 1, bn: int = 64,
             smem_optin: int = 232448) -> dict:
    """The halo tensor map and the pipeline of the sm_90a TMA forward (``line_conv_tma_kernel``)
    for an (N, C, H, W) bf16/fp16 activation with element ``strides`` (sn, sc, sh, sw), computed by
    the C++ functions its launcher encodes and plans with (csrc/cuda/line_conv_plan.h); needs
    ``msff._C``, not a GPU.

    ``dims`` / ``strides_bytes`` / ``box`` are what ``cuTensorMapEncodeTiled`` receives (innermost
    first: channels, the convolution axis, the other spatial axis, batch); ``ok`` says whether TMA
    can describe the tensor (else the cp.async kernel runs); ``stages`` halo stages of
    ``stage_bytes`` fit in ``smem_bytes`` with the resident weights of ``bn`` channels.

    Example:
        >>> p = tma_plan(32, 64, 512, 512, (64 * 512 * 512, 1, 512 * 64, 64), 15)
        >>> p["dims"], p["box"], p["stages"]
        ([64, 512, 512, 32], [64, 142, 1, 1], 4)
    """
    if _C is None:
        raise RuntimeError(extension_error())
    sn, sc, sh, sw = strides
    v = [int(x) for x in torch.ops.msff._lk_conv_cuda_tma_plan(n, c, h, w, sn, sc, sh, sw, k, axis,
                                                                 bn, smem_optin)]
    out = dict(dims=v[0:4], strides_bytes=v[4:7], box=v[7:11])
    out.update(zip(_TMA_KEYS[3:], v[11:], strict=True))
    out["ok"] = bool(out["ok"])
    return out


# ---- fake (meta) implementations and autograd of the compiled ops ---------------------------
def _empty(ref: torch.Tensor) -> torch.Tensor:
    return ref.new_empty((0,), dtype=torch.float32)


def _register_python_side() -> None:
    lib = "msff::"

    @torch.library.register_fake(lib + "lk_conv_cuda")
    def _(x, weight, bias, in_scale, in_shift, add, relu, stats):
        y = empty_like_layout(x, (x.shape[0], weight.shape[0], x.shape[2], x.shape[3]), x.dtype)
        n = weight.shape[0] if stats else 0
        return y, x.new_empty((n,), dtype=torch.float32), x.new_empty((n,), dtype=torch.float32)

    @torch.library.register_fake(lib + "_lk_conv_backward_cuda")
    def _(grad_y, grad_sum, grad_sumsq, x, weight, y, bias, in_scale, in_shift, add, relu,
          output_mask):
        m = output_mask
        pro = in_scale is not None
        return (
            empty_like_layout(x) if m[0] else _empty(x),
            weight.new_empty(weight.shape) if m[1] else _empty(x),
            torch.empty_like(bias) if m[2] and bias is not None else _empty(x),
            torch.empty_like(in_scale) if m[3] and pro else _empty(x),
            torch.empty_like(in_shift) if m[4] and pro else _empty(x),
            empty_like_layout(add) if m[5] and add is not None else _empty(x),
        )

    @torch.library.register_fake(lib + "lkam_se_cuda")
    def _(fa, fb, scale_a, shift_a, scale_b, shift_b, w1, b1, w2, b2, residual, res_scale,
          res_shift):
        return empty_like_layout(fa), fa.new_empty((fa.shape[0], fa.shape[1]), dtype=torch.float32)

    @torch.library.register_fake(lib + "_lkam_se_backward_cuda")
    def _(grad_out, grad_pooled, pooled, fa, fb, scale_a, shift_a, scale_b, shift_b, w1, b1, w2,
          b2, residual, res_scale, res_shift):
        e = lambda: _empty(fa)  # noqa: E731
        vec = lambda t: torch.empty_like(t) if t is not None else e()  # noqa: E731
        return (
            empty_like_layout(fa),
            empty_like_layout(fb) if fb is not None else e(),
            vec(scale_a), vec(shift_a), vec(scale_b), vec(shift_b),
            torch.empty_like(w1), torch.empty_like(b1), torch.empty_like(w2), torch.empty_like(b2),
            empty_like_layout(residual),
            vec(res_scale), vec(res_shift),
        )

    def _lk_setup(ctx, inputs, output):
        x, weight, bias, in_scale, in_shift, add, relu, stats = inputs
        ctx.save_for_backward(x, weight, output[0], bias, in_scale, in_shift, add,
                              output[1] if stats else None)
        ctx.relu, ctx.stats = relu, stats

    def _lk_backward(ctx, grad_y, grad_sum, grad_m2):
        from msff.ops.lk_conv import _m2_grads, backward_arguments

        # the third output is M2 = Σ(y - ȳ)² (SPEC.md), as for the public op
        args = backward_arguments(ctx, grad_y, *_m2_grads(ctx, grad_sum, grad_m2))
        outs = torch.ops.msff._lk_conv_backward_cuda(*args)
        return (*[o if m else None for o, m in zip(outs, args[-1], strict=True)], None, None)

    torch.library.register_autograd(lib + "lk_conv_cuda", _lk_backward, setup_context=_lk_setup)

    def _se_setup(ctx, inputs, output):
        ctx.save_for_backward(output[1], *inputs)

    def _se_backward(ctx, grad_out, grad_pooled):
        pooled, *args = ctx.saved_tensors
        (fa, fb, scale_a, shift_a, scale_b, shift_b, w1, b1, w2, b2, residual, res_scale,
         res_shift) = args
        if grad_out is None:
            grad_out = torch.zeros_like(fa)
        grads = torch.ops.msff._lkam_se_backward_cuda(
            grad_out, grad_pooled, pooled, fa, fb, scale_a, shift_a, scale_b, shift_b, w1, b1, w2,
            b2, residual, res_scale, res_shift,
        )
        return tuple(g if a is not None and ctx.needs_input_grad[i] else None
                     for i, (g, a) in enumerate(zip(grads, args, strict=True)))

    torch.library.register_autograd(lib + "lkam_se_cuda", _se_backward, setup_context=_se_setup)


def _register_impls() -> None:
    ops = torch.ops.msff
    lk_conv = ops.lk_conv_cuda
    lk_conv_bwd = ops._lk_conv_backward_cuda
    lkam_se = ops.lkam_se_cuda
    lkam_se_bwd = ops._lkam_se_backward_cuda

    def _lk_conv_cuda(x, weight, bias, in_scale, in_shift, add, relu, stats):
        # (y, Σy, M2): csrc forms M2 from its fp64 sums (SPEC.md)
        return tuple(lk_conv(x, weight, bias, in_scale, in_shift, add, relu, stats))

    def _lk_conv_backward_cuda(grad_y, grad_sum, grad_sumsq, x, weight, y, bias, in_scale,
                               in_shift, add, relu, output_mask):
        return tuple(lk_conv_bwd(grad_y, grad_sum, grad_sumsq, x, weight, y, bias, in_scale,
                                 in_shift, add, relu, [bool(m) for m in output_mask]))

    def _lkam_se_cuda(*args):
        return tuple(lkam_se(*args))

    def _lkam_se_backward_cuda(*args):
        return tuple(lkam_se_bwd(*args))

    register_impl("lk_conv", "cuda", _lk_conv_cuda)
    register_impl("_lk_conv_backward", "cuda", _lk_conv_backward_cuda)
    register_impl("lkam_se", "cuda", _lkam_se_cuda)
    register_impl("_lkam_se_backward", "cuda", _lkam_se_backward_cuda)


if _C is not None:
    _register_python_side()
    if kernels_built():
        _register_impls()
    else:
        log.debug("cuda backend not registered: %s", extension_error())
