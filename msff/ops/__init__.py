"""Fused ops (torch.library) with their pure-PyTorch references; see msff.backend for dispatch.

Ops and their contract: ``msff/ops/SPEC.md``. Backend implementations are registered in
:mod:`msff.ops.registry`; the CUDA backend adds itself from ``msff.ops._cuda`` when present.
"""
import logging

from msff.ops.registry import get_impl, register_impl, registered

log = logging.getLogger("msff.ops")

try:  # the CUDA backend (issue 4) registers its implementations and probe here
    import msff.ops._cuda  # noqa: F401
except ImportError as e:
    log.debug("msff.ops._cuda not loaded: %s", e)


def fuse_for_inference(model):
    raise NotImplementedError("BN folding arrives with the fused LKAM ops (msff.ops.lkam)")


__all__ = ["fuse_for_inference", "get_impl", "register_impl", "registered"]
