"""Shared helpers of the op tests: device choice, the written tolerance rule, random modules.

Tolerance rule (STYLE.md), applied by :func:`assert_close`:

* float32 (TF32 off): ``max|out - ref| <= 1e-5 * max|ref| + 1e-6`` per tensor, where ``ref`` is
  the reference backend's value; gradients use the same rule (they are reductions of the same
  size as the reference's, with fp32 accumulation on both sides).
* float16 / bfloat16: with ``ref64`` the float64 reference and ``torch_lp`` PyTorch's own result
  in the same low precision, ``max|out - ref64| <= 2 * max|torch_lp - ref64| + max(1e-3, 2·eps(dtype)) * max|ref64|`` (two ulps of the output dtype: a differently-rounded final cast costs one).
"""
from __future__ import annotations

import torch

from msff.backend import triton_interpret

#: the device the Triton backend runs on here: CUDA on a GPU machine, CPU under the interpreter
DEVICE = "cuda" if torch.cuda.is_available() and not triton_interpret() else "cpu"


def disable_tf32():
    """fp32 parity tests compare IEEE fp32 on both sides."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def assert_close(out, ref, name="", rtol=1e-5, atol=1e-6):
    assert out is not None and ref is not None, f"{name}: missing tensor"
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert out.dtype == ref.dtype, f"{name}: dtype {out.dtype} != {ref.dtype}"
    if ref.numel() == 0:
        return
    err = (out.double() - ref.double()).abs().max().item()
    scale = ref.double().abs().max().item()
    assert err <= rtol * scale + atol, f"{name}: max err {err:.3e} > {rtol:g}*{scale:.3e}+{atol:g}"


def assert_close_lowp(out, ref64, torch_lp, name="", norm="max", dtype=None):
    """Low-precision rule: the kernel's error against a float64 reference is at most 2x PyTorch's
    own error in the same precision, plus ``max(1e-3, 2·eps(dtype))`` of the reference's scale.

    ``norm="max"`` (outputs) uses max-abs errors. ``norm="l2"`` (gradients) uses Frobenius norms:
    ReLU masks evaluated on values within rounding distance of 0 may legitimately differ between two
    correct low-precision implementations (fp32 accumulator vs bf16-rounded output), and one flipped
    mask moves a few gradient entries by O(|w|) — a max-abs bound would flag that, a norm bound
    weighs it by how much of the gradient it is (seen in CI: one bf16 flip, max err 0.77 of 5.4).
    The atol is two ulps of the compute dtype ``dtype`` (default: ``out.dtype``; pass the
    activation dtype for fp32 parameter gradients computed from bf16/fp16 activations): a
    differently-rounded cast costs one.
    """
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    diff, base_diff, ref = out.double() - ref64, torch_lp.double() - ref64, ref64
    if norm == "max":
        err, base, scale = diff.abs().max().item(), base_diff.abs().max().item(), ref.abs().max().item()
    elif norm == "l2":
        err, base, scale = diff.norm().item(), base_diff.norm().item(), ref.norm().item()
    else:
        raise ValueError(norm)
    dtype = dtype or out.dtype
    rel = max(1e-3, 2 * torch.finfo(dtype).eps) if dtype.is_floating_point else 1e-3
    assert err <= 2 * base + rel * scale, (
        f"{name}: {norm} err {err:.3e} > 2 x torch's own {base:.3e} + {rel:.2e} x {scale:.3e}"
    )


def make_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """Return ``t``'s values as ``contiguous``, ``channels_last`` or ``strided`` (a
    non-contiguous view: every other column of a wider tensor)."""
    t = t.detach()
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        v = wide[..., ::2]
        assert not v.is_contiguous()
        return v
    raise ValueError(layout)


def randomize_bn(module: torch.nn.Module, generator=None):
    """Non-trivial BN parameters and running statistics (never test on the identity)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.5)
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return module
