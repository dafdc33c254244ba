"""The fused LKAM block: orchestration of ``msff::lk_conv`` and ``msff::lkam_se`` (SPEC.md).

:func:`lkam_block` computes exactly what ``LKAMBlock.forward_reference`` computes, from the
block's own parameters and buffers, on any backend that implements the ops (``triton``,
``cuda``, or ``reference`` for testing the decomposition itself):

* training (BN with batch statistics): the four separable convolutions run raw with per-channel
  Σy/Σy² in their epilogue; each BN (+ ReLU) is applied in the *next* op's prologue; BN running
  statistics are updated exactly as ``nn.BatchNorm2d`` does. Autograd flows through the BN
  affine maps (small (C,) torch ops) into the ops' backward ops, which recompute the activated
  inputs instead of storing them.
* eval without gradients: BN folded into the weights, bias + ReLU in the epilogue, branch sum
  fused into the last convolution's epilogue, which also emits the SE squeeze (per-image
  Σ_hw), then one SE op that only applies the attention. The folded (and, for Triton,
  packed) weights are cached per block until a parameter or buffer changes (``_EVAL_CACHE``).
* eval with gradients: the training graph with running-statistics BN (γ, β get gradients).

:func:`fuse_for_inference` folds every Conv2d → BatchNorm2d pair of a model for deployment.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import nn

from msff.ops.dispatch import resolve_backend
from msff.ops.lk_conv import acc_dtype, lk_conv
from msff.ops.lkam_se import lkam_se

__all__ = ["lkam_block", "fuse_for_inference", "bn_affine"]


def _bn_of(module: nn.Module) -> Optional[nn.BatchNorm2d]:
    return module if isinstance(module, nn.modules.batchnorm._BatchNorm) else None


def _uses_batch_stats(bn: Optional[nn.BatchNorm2d]) -> bool:
    return bn is not None and (bn.training or (bn.running_mean is None and bn.running_var is None))


def bn_affine(conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d], ch_sum, ch_m2, count: int,
              dtype: torch.dtype = torch.float32):
    """(scale, shift), fp32 (C,), such that ``bn(conv(x)) == t * scale + shift`` where ``t`` is
    the raw convolution output *without* conv's bias. Updates ``bn``'s running statistics
    exactly as ``nn.BatchNorm2d.forward`` does when it uses batch statistics.

    Args:
        conv: the convolution feeding the BN (its bias, if any, is accounted for).
        bn: a BatchNorm2d or None (then the map is ``t + conv.bias``).
        ch_sum, ch_m2: per-channel Σt and M2 = Σ(t - t̄)² (fp32, lk_conv's ``stats``) when bn
            uses batch statistics; the variance is M2 / count (numerically sound at any mean).
        count: N·H·W, the number of values per channel.
        dtype: of the result (float32; float64 for gradcheck).

    Returns:
        (scale, shift), differentiable w.r.t. bn.weight, bn.bias, conv.bias and the sums.
    """
    c = conv.out_channels
    dev = conv.weight.device
    cbias = conv.bias.to(dtype) if conv.bias is not None else None
    if bn is None:
        scale = torch.ones(c, device=dev, dtype=dtype)
        shift = cbias if cbias is not None else torch.zeros(c, device=dev, dtype=dtype)
        return scale, shift
    gamma = bn.weight.to(dtype) if bn.weight is not None else torch.ones(c, device=dev, dtype=dtype)
    beta = bn.bias.to(dtype) if bn.bias is not None else torch.zeros(c, device=dev, dtype=dtype)
    if _uses_batch_stats(bn):
        if count <= 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {count}"
            )
        mean_t = ch_sum / count
        var = (ch_m2 / count).clamp_min(0.0)
        scale = gamma * torch.rsqrt(var + bn.eps)
        shift = beta - mean_t * scale
        _update_running(bn, mean_t, var, cbias, count)
        return scale, shift
    rm = bn.running_mean.to(dtype)
    rv = bn.running_var.to(dtype)
    scale = gamma * torch.rsqrt(rv + bn.eps)
    shift = beta + ((cbias if cbias is not None else 0.0) - rm) * scale
    return scale, shift


@torch.no_grad()
def _update_running(bn, mean_t, var, cbias, count):
    # nn.BatchNorm2d.forward: running stats are passed to batch_norm (and so updated) only when
    # training with track_running_stats; momentum None means a cumulative average.
    if not (bn.training and bn.track_running_stats) or bn.running_mean is None:
        return
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    mean_y = mean_t.detach() + (cbias.detach() if cbias is not None else 0.0)
    unbiased = var.detach() * (count / (count - 1))
    bn.running_mean.mul_(1 - factor).add_(mean_y.to(bn.running_mean.dtype), alpha=factor)
    bn.running_var.mul_(1 - factor).add_(unbiased.to(bn.running_var.dtype), alpha=factor)


def _parts(block):
    convs = [block.conv.branch_a[0], block.conv.branch_a[1], block.conv.branch_b[0],
             block.conv.branch_b[1]]
    parts = [(cbr[0], _bn_of(cbr[1])) for cbr in convs]
    if isinstance(block.shortcut, nn.Identity):
        short = None
    else:
        short = (block.shortcut[0], _bn_of(block.shortcut[1]) if len(block.shortcut) > 1 else None)
    return parts, short


def _se_weights(att, vdt):
    fc1, fc2 = att.fc1, att.fc2
    hid, c = fc1.out_channels, fc1.in_channels
    dev = fc1.weight.device
    w1 = fc1.weight.to(vdt).reshape(hid, c)
    w2 = fc2.weight.to(vdt).reshape(c, hid)
    b1 = fc1.bias.to(vdt) if fc1.bias is not None else torch.zeros(hid, device=dev, dtype=vdt)
    b2 = fc2.bias.to(vdt) if fc2.bias is not None else torch.zeros(c, device=dev, dtype=vdt)
    return w1, b1, w2, b2


def _needs_grad(block, x) -> bool:
    if not torch.is_grad_enabled():
        return False
    return x.requires_grad or any(p.requires_grad for p in block.parameters())


def lkam_block(block: nn.Module, x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Run an ``LKAMBlock`` through the fused ops of ``backend``.

    Args:
        block: an ``msff.models.LKAMBlock`` (its parameters and buffers are read; BN running
            statistics are updated in training mode, as ``forward_reference`` would).
        x: (N, C_in, H, W), any layout; fp32/fp16/bf16 (autocast is honoured: x and the conv
            weights run in the autocast dtype, BN/SE vectors in fp32).
        backend: ``auto`` (default: :func:`msff.backend.resolve_backend` decides once for the
            block; the reference unless a GPU validation record says a fused backend is
            correct and faster) | ``triton`` | ``cuda`` | ``reference`` (ops' pure-PyTorch
            implementations).

    Returns:
        (N, C_out, H, W), equal to ``block.forward_reference(x)``.

    Example:
        >>> from msff.models import LKAMBlock
        >>> blk = LKAMBlock(4, 8, kernel_size=7)
        >>> lkam_block(blk, torch.randn(2, 4, 9, 9), backend="reference").shape
        torch.Size([2, 8, 9, 9])
    """
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (N, C, H, W), got {x.dim()}-D")
    if backend == "auto":
        backend = resolve_backend("auto", x)
    dev_type = x.device.type
    cdt = x.dtype
    if torch.is_autocast_enabled(dev_type):
        cdt = torch.get_autocast_dtype(dev_type)
    with torch.autocast(dev_type, enabled=False):
        out = _lkam_block(block, x, cdt, backend)
    if isinstance(block.shortcut, nn.Identity):
        out = out.to(torch.promote_types(out.dtype, x.dtype))
    return out


def _lkam_block(block, x, cdt, backend):
    xc = x.to(cdt)
    parts, short = _parts(block)
    bns = [bn for _, bn in parts] + ([short[1]] if short is not None else [])
    count = x.shape[0] * x.shape[2] * x.shape[3]
    vdt = acc_dtype(cdt)
    if not any(_uses_batch_stats(bn) for bn in bns) and not _needs_grad(block, x):
        return _eval_fused(_eval_weights(block, parts, short, cdt, vdt), xc, backend)
    _EVAL_CACHE.pop(block, None)  # training / gradients: the folded copies would only go stale

    (ca1, bna1), (ca2, bna2), (cb1, bnb1), (cb2, bnb2) = parts

    def conv(inp, c, bn, scale=None, shift=None):
        t, s, q = lk_conv(inp, c.weight.to(cdt), None, scale, shift, None, False,
                          _uses_batch_stats(bn), backend)
        return (t, *bn_affine(c, bn, s, q, count, vdt))

    ta1, sa1, ha1 = conv(xc, ca1, bna1)
    tb1, sb1, hb1 = conv(xc, cb1, bnb1)
    ta2, sa2, ha2 = conv(ta1, ca2, bna2, sa1, ha1)
    tb2, sb2, hb2 = conv(tb1, cb2, bnb2, sb1, hb1)
    if short is None:
        residual, rs, rh = xc, None, None
    else:
        residual, rs, rh = conv(xc, *short)
    w1, b1, w2, b2 = _se_weights(block.attention, vdt)
    out, _ = lkam_se(ta2, tb2, sa2, ha2, sb2, hb2, w1, b1, w2, b2, residual, rs, rh,
                     backend=backend)
    return out


def _folded(c, bn, cdt, vdt):
    scale, shift = bn_affine(c, bn, None, None, 0, vdt)
    return (c.weight.to(vdt) * scale.view(-1, 1, 1, 1)).to(cdt), shift


#: Folded eval weights per block (weak keys: an entry dies with its block; no module sees
#: another's). Each entry is (key, weights); the key holds (data_ptr, version counter, dtype,
#: shape) of every parameter and buffer of the block, so an optimizer step, a load_state_dict,
#: any in-place update or a ``.data`` swap misses, and so does a change of compute dtype.
_EVAL_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _eval_key(block, cdt):
    try:
        tensors = [*block.parameters(), *block.buffers()]
        key = tuple((t.data_ptr(), t._version, t.dtype, tuple(t.shape)) for t in tensors)
    except RuntimeError:  # inference-mode tensors have no version counter: no caching
        return None
    eps = tuple(float(m.eps) for m in block.modules() if _bn_of(m) is not None)
    return (cdt, eps, key)


def _eval_weights(block, parts, short, cdt, vdt):
    """The BN-folded weights of the eval path, cached per block while its parameters and buffers
    are unchanged. The folded weight tensors carry a pack cache (``_msff_pack_cache``) that the
    Triton launcher fills with its packed GEMM operand, so a repeated eval call neither refolds
    nor repacks."""
    key = None if torch.compiler.is_compiling() else _eval_key(block, cdt)
    hit = _EVAL_CACHE.get(block) if key is not None else None
    if hit is not None and hit[0] == key:
        return hit[1]
    convs = [_folded(c, bn, cdt, vdt) for c, bn in parts]
    res = _folded(short[0], short[1], cdt, vdt) if short is not None else None
    se = _se_weights(block.attention, vdt)
    weights = (convs, res, se)
    if key is not None:
        for w, _ in convs + ([res] if res is not None else []):
            w._msff_pack_cache = {}
        _EVAL_CACHE[block] = (key, weights)
    return weights


def _eval_fused(weights, xc, backend):
    convs, res, se = weights
    (wa1, ba1), (wa2, ba2), (wb1, bb1), (wb2, bb2) = convs
    a1, _, _ = lk_conv(xc, wa1, ba1, relu=True, backend=backend)
    b1, _, _ = lk_conv(xc, wb1, bb1, relu=True, backend=backend)
    a2, _, _ = lk_conv(a1, wa2, ba2, relu=True, backend=backend)
    # the SE squeeze (Σ_hw f per image) rides in the last conv's epilogue
    f, _, _, pool_sum = lk_conv(b1, wb2, bb2, relu=True, add=a2, backend=backend, pool=True)
    if res is None:
        residual = xc
    else:
        residual, _, _ = lk_conv(xc, res[0], res[1], backend=backend)
    out, _ = lkam_se(f, None, None, None, None, None, *se, residual, None, None, backend=backend,
                     pool_sum=pool_sum)
    return out


@torch.no_grad()
def fuse_for_inference(model: nn.Module) -> nn.Module:
    """Fold every ``Conv2d → BatchNorm2d`` pair (consecutive children of an ``nn.Sequential``)
    into the convolution, for deployment. The BN becomes ``nn.Identity`` and the convolution
    gains a bias; the model is switched to eval mode and computes the same function as before
    (in eval mode). Fused LKAM blocks then skip the BN folding at every call.

    Args:
        model: any module (e.g. ``MSFFNet``); modified in place.

    Returns:
        ``model`` (in eval mode).

    Example:
        >>> import msff
        >>> m = msff.fuse_for_inference(msff.MSFFNet(width_multiplier=0.125))
        >>> m(torch.randn(1, 3, 32, 32)).shape
        torch.Size([1, 1, 32, 32])
    """
    model.eval()
    for seq in list(model.modules()):
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules.keys())
        for a, b in zip(names[:-1], names[1:], strict=True):
            conv, bn = seq._modules[a], seq._modules[b]
            if not isinstance(conv, nn.Conv2d) or type(bn) is not nn.BatchNorm2d:
                continue
            if bn.running_mean is None or bn.running_var is None:
                continue  # batch statistics even in eval: nothing to fold
            scale, shift = bn_affine(conv, bn, None, None, 0)
            conv.weight.copy_(conv.weight.float().mul(scale.view(-1, 1, 1, 1)).to(conv.weight.dtype))
            if conv.bias is None:
                conv.bias = nn.Parameter(shift.to(conv.weight.dtype))
            else:
                conv.bias.copy_(shift.to(conv.bias.dtype))
            seq._modules[b] = nn.Identity()
    return model
