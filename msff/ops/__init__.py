"""Fused ops (torch.library) with their pure-PyTorch references; dispatch in :mod:`msff.ops.dispatch`.

Ops and their contract: ``msff/ops/SPEC.md``.

* ``msff::lk_conv`` / ``msff::_lk_conv_backward`` (:mod:`msff.ops.lk_conv`)
* ``msff::lkam_se`` / ``msff::_lkam_se_backward`` (:mod:`msff.ops.lkam_se`)
* the LKAM block built from them, and BN folding (:mod:`msff.ops.lkam`)

Backend implementations are registered in :mod:`msff.ops.registry`; the CUDA backend adds itself
from ``msff.ops._cuda`` (always imported: a missing extension is reported by its probe).
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from msff._triton_env import triton_interpret
from msff.ops.dispatch import is_missing_module, probe_failure, register_backend_probe
from msff.ops.lk_conv import lk_conv, lk_conv_ref
from msff.ops.lkam import fuse_for_inference, lkam_block
from msff.ops.lkam_se import lkam_se, lkam_se_ref
from msff.ops.registry import get_impl, missing_impls, register_impl, registered

log = logging.getLogger("msff.ops")

#: every op a backend must implement to run the LKAM block
OPS = ("lk_conv", "_lk_conv_backward", "lkam_se", "_lkam_se_backward")


_KERNELS_IMPORT: list = []  # [error or None] once known (not lru_cache: Dynamo warns on it)


def _import_triton_kernels() -> Optional[str]:
    """Import the Triton kernels; None on success, else why the triton backend cannot run.

    Only a missing triton (or a triton without a module the kernels use) is an expected failure;
    anything else is a bug or an incompatible triton and goes through ``probe_failure`` (raised
    under MSFF_STRICT_BACKEND=1, else logged with its traceback and warned).
    """
    try:
        import triton  # noqa: F401
    except ImportError as e:  # not installed, or an install missing one of its own modules
        log.debug("triton backend unavailable: triton is not importable: %s", e)
        return f"triton is not importable ({e})"
    except Exception as e:  # triton's own import-time code (driver discovery) raises its own types
        return probe_failure("triton", "importing triton", e)
    try:
        import msff.kernels.lk_conv  # noqa: F401
        import msff.kernels.lkam_se  # noqa: F401
    except ImportError as e:
        if not is_missing_module(e, "triton"):  # e.g. a typo in msff.kernels: a bug, not a setup
            return probe_failure("triton", "importing msff.kernels", e)
        log.debug("triton backend unavailable: %s", e)
        return f"the Triton kernels need a triton with {e.name!r} ({e})"
    except Exception as e:  # a bug in msff.kernels, or a triton API change that breaks @jit
        return probe_failure("triton", "importing msff.kernels", e)
    return None


def _triton_kernels_error() -> Optional[str]:
    if not _KERNELS_IMPORT:
        _KERNELS_IMPORT.append(_import_triton_kernels())  # raises under MSFF_STRICT_BACKEND=1
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

# The CUDA backend registers its implementations and probe; it handles a missing or CPU-only
# msff._C itself (the probe says why), so any error importing it is a bug and propagates.
import msff.ops._cuda  # noqa: E402, F401
from msff.ops._cuda import CONV_KERNELS as _CONV_KERNELS  # noqa: E402
from msff.ops._cuda import set_conv_kernel_default as _set_conv_kernel_default  # noqa: E402
from msff.ops.dispatch import register_conv_kernel_setter  # noqa: E402

# ``auto`` sets the conv kernel a GPU validation record chose through the backend's own setter
# (the policy in msff.ops.dispatch cannot import the backend: that would be an import cycle)
register_conv_kernel_setter(_CONV_KERNELS, _set_conv_kernel_default)

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
