"""The one place to ask which kernel backend runs: the public face of the backend policy.

Backends: ``reference`` (pure PyTorch, cuDNN on GPU; always available, the specification),
``triton`` (fused Triton kernels), ``cuda`` (fused CUDA C++ kernels of ``msff._C``) and ``auto``
(default: ``reference`` unless a GPU validation record shipped with the package shows a fused
backend correct and faster on this GPU family, dtype and mode; see :mod:`msff.ops.dispatch`).

Choose per model (``MSFFNet(..., backend="triton")``), per scope (``with msff.use_backend("cuda"):``)
or per process (``MSFF_BACKEND=reference``). Precedence: an explicit per-model choice other than
``auto`` wins, then the innermost ``use_backend`` scope, then ``MSFF_BACKEND``, then ``auto``.
An explicitly requested backend that cannot run raises :class:`BackendUnavailableError` saying why.
Export (torch.export / ONNX) and ``torch.use_deterministic_algorithms(True)`` always use
``reference``.

Where things live (the imports run one way, request <- ops <- this module):

* :mod:`msff.backend_request`: the request (argument, scope, environment); a leaf module.
* :mod:`msff.ops.dispatch`: probing, resolution, GPU validation records; next to the ops, which
  register their availability probes there.
* :mod:`msff._triton_env`: :func:`triton_interpret`; a leaf the Triton kernels import.

This module only re-exports their public names (importing it imports :mod:`msff.ops`).

Example:
    >>> import torch
    >>> from msff.backend import resolve_backend, use_backend
    >>> with use_backend("reference"):
    ...     resolve_backend(None, torch.randn(1, 3, 8, 8))
    'reference'
"""
from __future__ import annotations

from msff._triton_env import triton_interpret
from msff.backend_request import (
    BACKEND_ENV,
    BACKENDS,
    CHOICES,
    BackendUnavailableError,
    check_backend_name,
    current_backend,
    use_backend,
)
from msff.ops.dispatch import (
    _PROBES,  # noqa: F401 - the probe table (the same dict), for tests that replace a probe
    MIN_SPEEDUP,
    MODES,
    RECORD_SCHEMA,
    STRICT_ENV,
    auto_decision,
    backend_status,
    kernel_sources_hash,
    load_validation_records,
    register_backend_probe,
    reload_validation_records,
    resolve_backend,
    strict_probes,
    validate_record,
    validation_dirs,
)

#: the pre-split private name, still imported by msff.models.msffnet
_check_name = check_backend_name

__all__ = [
    "BACKENDS",
    "BACKEND_ENV",
    "CHOICES",
    "BackendUnavailableError",
    "use_backend",
    "current_backend",
    "check_backend_name",
    "resolve_backend",
    "backend_status",
    "register_backend_probe",
    "triton_interpret",
    "MODES",
    "MIN_SPEEDUP",
    "RECORD_SCHEMA",
    "STRICT_ENV",
    "strict_probes",
    "validation_dirs",
    "load_validation_records",
    "validate_record",
    "kernel_sources_hash",
    "auto_decision",
    "reload_validation_records",
]
