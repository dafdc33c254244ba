"""Backend implementation registry of the fused ops (see msff/ops/SPEC.md).

The torch.library ops of :mod:`msff.ops` (``msff::lk_conv``, ``msff::lkam_se`` and their
``_..._backward`` ops) take a trailing ``backend`` string and call the implementation registered
here for that backend. Backends (``reference``, ``triton``, ``cuda``) register themselves at
import time, so a new backend only adds a module:

Example:
    >>> from msff.ops.registry import register_impl, get_impl, has_impl
    >>> add_one = register_impl("my_op", "reference", lambda x: x + 1)  # returns the function
    >>> get_impl("my_op", "reference")(1), has_impl("my_op", "reference")
    (2, True)
"""
from __future__ import annotations

import threading
from typing import Callable, Optional, Sequence

import torch

__all__ = [
    "register_impl",
    "get_impl",
    "has_impl",
    "registered",
    "missing_impls",
    "empty_like_layout",
    "empty_grad",
    "OpImplementationMissing",
]

_lock = threading.Lock()
_IMPLS: dict[tuple[str, str], Callable] = {}


class OpImplementationMissing(RuntimeError):
    """No implementation of an op is registered for the requested backend."""


def register_impl(op: str, backend: str, fn: Callable) -> Callable:
    """Register ``fn`` as the ``backend`` implementation of ``op`` (replaces an earlier one).

    Args:
        op: the op name without namespace, e.g. ``"lk_conv"`` or ``"_lk_conv_backward"``.
        backend: ``"reference"``, ``"triton"`` or ``"cuda"``.
        fn: callable taking the op's arguments (SPEC.md) without the trailing ``backend``.

    Returns:
        ``fn`` (so it can be used as a decorator via ``functools.partial``).
    """
    if not callable(fn):
        raise TypeError(f"implementation of {op!r} for {backend!r} must be callable")
    with _lock:
        _IMPLS[(op, backend)] = fn
    return fn


def get_impl(op: str, backend: str) -> Callable:
    """The ``backend`` implementation of ``op``.

    Raises:
        OpImplementationMissing: nothing registered for (op, backend); the message lists what is.
    """
    try:
        return _IMPLS[(op, backend)]
    except KeyError:
        have = sorted(b for (o, b) in _IMPLS if o == op)
        raise OpImplementationMissing(
            f"op msff::{op} has no {backend!r} implementation (registered: {have or 'none'})"
        ) from None


def has_impl(op: str, backend: str) -> bool:
    return (op, backend) in _IMPLS


def registered() -> dict[str, list[str]]:
    """``{op: [backends]}`` of everything registered."""
    out: dict[str, list[str]] = {}
    for op, backend in sorted(_IMPLS):
        out.setdefault(op, []).append(backend)
    return out


def missing_impls(backend: str, ops: Sequence[str]) -> list[str]:
    """The ops of ``ops`` that have no ``backend`` implementation."""
    return [op for op in ops if (op, backend) not in _IMPLS]


def empty_like_layout(
    ref: torch.Tensor, shape: Optional[Sequence[int]] = None, dtype: Optional[torch.dtype] = None
) -> torch.Tensor:
    """Allocate a 4-D output following SPEC.md's layout rule: channels_last iff ``ref`` is
    channels_last-contiguous and not plain contiguous, else contiguous NCHW."""
    shape = tuple(ref.shape if shape is None else shape)
    dtype = ref.dtype if dtype is None else dtype
    if ref.dim() == 4 and not ref.is_contiguous() and ref.is_contiguous(
        memory_format=torch.channels_last
    ):
        return torch.empty(shape, dtype=dtype, device=ref.device, memory_format=torch.channels_last)
    return torch.empty(shape, dtype=dtype, device=ref.device)


def empty_grad(device) -> torch.Tensor:
    """The placeholder for a gradient that is not computed: an empty (0,) float32 tensor."""
    return torch.empty((0,), dtype=torch.float32, device=device)
