"""Fused ops (torch.library) with their pure-PyTorch references; see msff.backend for dispatch.

Ops and their contract: ``msff/ops/SPEC.md``.

* ``msff::lk_conv`` / ``msff::_lk_conv_backward`` (:mod:`msff.ops.lk_conv`)
* ``msff::lkam_se`` / ``msff::_lkam_se_backward`` (:mod:`msff.ops.lkam_se`)
* the LKAM block built from them, and BN folding (:mod:`msff.ops.lkam`)

Backend implementations are registered in :mod:`msff.ops.registry`; the CUDA backend adds itself
from ``msff.ops._cuda`` when present.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from msff.backend import register_backend_probe, triton_interpret
from msff.ops.lk_conv import lk_conv, lk_conv_ref
from msff.ops.lkam import fuse_for_inference, lkam_block
from msff.ops.lkam_se import lkam_se, lkam_se_ref
from msff.ops.registry import get_impl, missing_impls, register_impl, registered

log = logging.getLogger("msff.ops")

#: every op a backend must implement to run the LKAM block
OPS = ("lk_conv", "_lk_conv_backward", "lkam_se", "_lkam_se_backward")


_KERNELS_IMPORT: list = []  # [error or None] once tried (not lru_cache: Dynamo warns on it)


def _triton_kernels_error() -> Optional[str]:
    if not _KERNELS_IMPORT:
        try:
            import msff.kernels.lk_conv  # noqa: F401
            import msff.kernels.lkam_se  # noqa: F401

            _KERNELS_IMPORT.append(None)
        except Exception as e:  # pragma: no cover - depends on the environment
            _KERNELS_IMPORT.append(f"the Triton kernels failed to import ({type(e).__name__}: {e})")
    return _KERNELS_IMPORT[0]


def _triton_probe(x: Optional[torch.Tensor]) -> Optional[str]:
    """None if the triton backend can run on ``x``, else why not."""
    interp = triton_interpret()
    if x is not None:
        if x.is_cuda:
            if interp:
                return "TRITON_INTERPRET=1 is set but the input is a CUDA tensor"
        elif not (interp and x.device.type == "cpu"):
            return (f"the input is on {x.device.type}; Triton kernels need CUDA tensors (or CPU "
                    "tensors with TRITON_INTERPRET=1 set before triton is imported)")
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return f"dtype {x.dtype} is not supported (float32, float16, bfloat16)"
    elif not interp and not torch.cuda.is_available():
        return "no CUDA GPU and TRITON_INTERPRET is not set"
    err = _triton_kernels_error()
    if err:
        return err
    missing = missing_impls("triton", OPS)
    return f"no triton implementation of {missing}" if missing else None


register_backend_probe("triton", _triton_probe)

try:  # the CUDA backend (issue 4) registers its implementations and probe here
    import msff.ops._cuda  # noqa: F401
except ImportError as e:
    log.debug("msff.ops._cuda not loaded: %s", e)


__all__ = [
    "OPS",
    "fuse_for_inference",
    "get_impl",
    "lk_conv",
    "lk_conv_ref",
    "lkam_block",
    "lkam_se",
    "lkam_se_ref",
    "register_impl",
    "registered",
]
