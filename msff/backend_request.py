"""Which kernel backend the caller asks for: by argument, by scope, or by environment variable.

A leaf module (standard library only). It records the *request*; :mod:`msff.ops.dispatch` decides
what runs (probing what can run, GPU validation records for ``auto``) and :mod:`msff.backend` is
the public face of both.

Precedence: an explicit per-model/per-call choice other than ``auto`` wins, then the innermost
:func:`use_backend` scope, then ``MSFF_BACKEND``, then ``auto``.

Example:
    >>> from msff.backend_request import current_backend, use_backend
    >>> with use_backend("reference"):
    ...     current_backend()
    'reference'
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator

BACKENDS = ("reference", "triton", "cuda")
CHOICES = ("auto",) + BACKENDS
#: the environment variable read by :func:`current_backend` when no scope is active
BACKEND_ENV = "MSFF_BACKEND"

__all__ = [
    "BACKENDS",
    "BACKEND_ENV",
    "CHOICES",
    "BackendUnavailableError",
    "check_backend_name",
    "current_backend",
    "use_backend",
]


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run for the given inputs."""


_local = threading.local()


def _stack() -> list:
    if not hasattr(_local, "stack"):
        _local.stack = []
    return _local.stack


def check_backend_name(name: str) -> str:
    """``name`` normalised (stripped, lower case) if it is one of :data:`CHOICES`.

    Raises:
        TypeError: ``name`` is not a string.
        ValueError: ``name`` is not a known backend.

    Example:
        >>> check_backend_name(" Triton ")
        'triton'
    """
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, one of {CHOICES}; got {type(name).__name__}")
    name = name.strip().lower()
    if name not in CHOICES:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(CHOICES)}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Run the enclosed code with ``name`` as the default backend (per thread, nestable).

    Args:
        name: one of ``auto``, ``reference``, ``triton``, ``cuda``.

    Example:
        >>> import torch, msff
        >>> model = msff.MSFFNet(width_multiplier=0.125).eval()
        >>> with msff.use_backend("reference"):
        ...     y = model(torch.randn(1, 3, 64, 64))
        >>> y.shape
        torch.Size([1, 1, 64, 64])
    """
    name = check_backend_name(name)
    _stack().append(name)
    try:
        yield name
    finally:
        _stack().pop()


def current_backend() -> str:
    """The backend requested by the innermost scope or ``MSFF_BACKEND`` (may be ``auto``).

    Raises:
        ValueError: ``MSFF_BACKEND`` names no backend (the message names the variable).
    """
    stack = _stack()
    if stack:
        return stack[-1]
    env = os.environ.get(BACKEND_ENV, "").strip()
    if env:
        try:
            return check_backend_name(env)
        except ValueError as e:
            raise ValueError(f"{BACKEND_ENV}: {e}") from None
    return "auto"
