"""The one place that decides which kernel backend runs.

Backends:

* ``reference``: pure PyTorch (cuDNN on GPU). Always available; the specification.
* ``triton``: fused Triton kernels (``msff.kernels``). Needs CUDA tensors, or CPU tensors with
  ``TRITON_INTERPRET=1`` set before Triton is imported (that is how CI verifies them).
* ``cuda``: fused CUDA C++ kernels from the compiled extension ``msff._C``. Needs CUDA tensors
  and an extension built with CUDA.
* ``auto`` (default): the first available of ``triton`` > ``cuda`` > ``reference``; falls back
  quietly (one debug log line) when a faster backend cannot run.

Choose per model (``MSFFNet(..., backend="triton")``), per scope (``with msff.use_backend("cuda"):``)
or per process (``MSFF_BACKEND=reference``). Precedence: an explicit per-model choice other than
``auto`` wins, then the innermost ``use_backend`` scope, then ``MSFF_BACKEND``, then ``auto``.

An explicitly requested backend that cannot run raises :class:`BackendUnavailableError` saying why.
Export (torch.export / ONNX) and ``torch.use_deterministic_algorithms(True)`` always use
``reference``.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from typing import Callable, Iterator, Optional

import torch

log = logging.getLogger("msff.backend")

BACKENDS = ("reference", "triton", "cuda")
CHOICES = ("auto",) + BACKENDS

__all__ = [
    "BACKENDS",
    "CHOICES",
    "BackendUnavailableError",
    "use_backend",
    "current_backend",
    "resolve_backend",
    "backend_status",
    "register_backend_probe",
]


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run for the given inputs."""


_local = threading.local()


def _stack() -> list:
    if not hasattr(_local, "stack"):
        _local.stack = []
    return _local.stack


def _check_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, one of {CHOICES}; got {type(name).__name__}")
    name = name.strip().lower()
    if name not in CHOICES:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(CHOICES)}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Run the enclosed code with ``name`` as the default backend.

    Args:
        name: one of ``auto``, ``reference``, ``triton``, ``cuda``.

    Example:
        >>> import torch, msff
        >>> model = msff.MSFFNet(width_multiplier=0.125).eval()
        >>> with msff.use_backend("reference"):
        ...     y = model(torch.randn(1, 3, 64, 64))
    """
    name = _check_name(name)
    _stack().append(name)
    try:
        yield name
    finally:
        _stack().pop()


def current_backend() -> str:
    """The backend requested by the innermost scope or ``MSFF_BACKEND`` (may be ``auto``)."""
    stack = _stack()
    if stack:
        return stack[-1]
    env = os.environ.get("MSFF_BACKEND", "").strip()
    if env:
        try:
            return _check_name(env)
        except ValueError as e:
            raise ValueError(f"MSFF_BACKEND: {e}") from None
    return "auto"


# ---- availability probes --------------------------------------------------------------------
# A probe takes the input tensor and returns None when the backend can run on it, or a string
# saying why not. ops modules register richer probes (e.g. "extension built without CUDA").
_PROBES: dict[str, Callable[[Optional[torch.Tensor]], Optional[str]]] = {}


def register_backend_probe(name: str, probe: Callable[[Optional[torch.Tensor]], Optional[str]]):
    """Install the availability check for backend ``name`` (used by msff.ops)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}")
    _PROBES[name] = probe


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the environment
        return f"triton is not importable ({type(e).__name__}: {e})"
    return None


def _default_triton_probe(x: Optional[torch.Tensor]) -> Optional[str]:
    err = _triton_import_error()
    if err:
        return err
    if x is not None and not x.is_cuda and not triton_interpret():
        return (
            f"the input is on {x.device.type}; Triton kernels need CUDA tensors "
            "(or TRITON_INTERPRET=1 set before import to interpret them on CPU)"
        )
    if x is None and not torch.cuda.is_available() and not triton_interpret():
        return "no CUDA GPU and TRITON_INTERPRET is not set"
    return "the Triton ops are not registered (msff.ops did not load its Triton kernels)"


def _default_cuda_probe(x: Optional[torch.Tensor]) -> Optional[str]:
    return "the msff._C extension was not built with CUDA kernels"


def _probe(name: str, x: Optional[torch.Tensor]) -> Optional[str]:
    if name == "reference":
        return None
    _load_ops()
    probe = _PROBES.get(name)
    if probe is None:
        probe = _default_triton_probe if name == "triton" else _default_cuda_probe
    return probe(x)


_ops_loaded = False


def _load_ops() -> None:
    # msff.ops registers the probes of the backends it provides; import lazily to avoid a cycle.
    # A plain flag, not lru_cache: Dynamo traces through this under torch.compile.
    global _ops_loaded
    if _ops_loaded:
        return
    _ops_loaded = True
    try:
        import msff.ops  # noqa: F401
    except Exception as e:  # pragma: no cover
        log.debug("msff.ops failed to import: %s", e)


def _forced_reference() -> Optional[str]:
    try:
        if torch.compiler.is_exporting():
            return "torch.export is tracing"
    except AttributeError:  # pragma: no cover - older torch
        pass
    if torch.onnx.is_in_onnx_export():
        return "ONNX export is running"
    if torch.are_deterministic_algorithms_enabled():
        return "deterministic algorithms are enabled"
    return None


def resolve_backend(requested: Optional[str] = None, x: Optional[torch.Tensor] = None) -> str:
    """Decide the backend that runs for input ``x``.

    Args:
        requested: a per-call/per-model choice (``None`` or ``"auto"`` defers to the scope and
            ``MSFF_BACKEND``).
        x: the input tensor the op will see (device decides availability).

    Returns:
        One of ``reference``, ``triton``, ``cuda``.

    Raises:
        BackendUnavailableError: an explicitly requested backend cannot run on ``x``.
    """
    name = _check_name(requested) if requested is not None else "auto"
    if name == "auto":
        name = current_backend()
    forced = _forced_reference()
    if forced:
        if name not in ("auto", "reference"):
            log.debug("backend %s replaced by reference: %s", name, forced)
        return "reference"
    if name != "auto":
        why = _probe(name, x)
        if why is not None:
            raise BackendUnavailableError(f"backend {name!r} cannot run: {why}")
        return name
    # Order: triton first. Both fused paths are verified against the reference (triton in the
    # interpreter, cuda only compiled so far); until GPU benchmarks rank them, auto prefers the
    # one whose numerics CI checks on every run.
    for candidate in ("triton", "cuda"):
        if x is not None and not x.is_cuda:
            # auto never picks the interpreter: it is a verification tool, not a fast path.
            break
        if _probe(candidate, x) is None:
            return candidate
    _log_fallback_once(x)
    return "reference"


def _log_fallback_once(x: Optional[torch.Tensor]) -> None:
    key = (x.device.type if x is not None else "none",)
    seen = getattr(_local, "fallback_logged", set())
    if key not in seen:
        seen.add(key)
        _local.fallback_logged = seen
        log.debug("backend auto -> reference for %s tensors", key[0])


def backend_status(device: Optional[str] = None) -> dict[str, Optional[str]]:
    """For each backend, None if it can run on ``device`` (default: cuda if present else cpu),
    otherwise the reason it cannot."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.empty(0, device=device) if (device == "cpu" or torch.cuda.is_available()) else None
    return {name: _probe(name, x) for name in BACKENDS}
