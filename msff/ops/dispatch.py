"""Which kernel backend runs: availability probes, resolution, and ``auto``'s GPU validation records.

This is the policy of :mod:`msff.backend` (the public face), kept next to the ops it dispatches.
The request (argument, :func:`~msff.backend_request.use_backend` scope, ``MSFF_BACKEND``) lives in
the leaf :mod:`msff.backend_request`; the ops register their availability probes here when
:mod:`msff.ops` is imported (importing this module imports its parent package ``msff.ops`` first,
so the probes are always registered before anyone asks).

Backends:

* ``reference``: pure PyTorch (cuDNN on GPU). Always available; the specification.
* ``triton``: fused Triton kernels (``msff.kernels``). Needs CUDA tensors, or CPU tensors with
  ``TRITON_INTERPRET=1`` set before Triton is imported (that is how CI verifies them).
* ``cuda``: fused CUDA C++ kernels from the compiled extension ``msff._C``. Needs CUDA tensors
  and an extension built with CUDA.
* ``auto`` (default): ``reference`` unless a **GPU validation record** shipped with the package
  (``msff/validation/*.json``, written by ``make gpu-check`` on a real GPU) shows that a fused
  backend matched the reference and was faster on this GPU family (compute capability), dtype
  and mode (``train``: gradients enabled; ``eval``: no gradients), for the kernel sources
  installed here; then the fastest such backend that can run. A kernel nobody has run on a GPU
  is never a default. Non-CUDA tensors always get ``reference`` (auto never picks the Triton
  interpreter). A corrupt record is ignored with a warning. ``MSFF_VALIDATION_DIR`` (paths
  separated by ``os.pathsep``) adds record folders; ``python -m msff.env`` says which record
  applies and why.

CUDA conv kernel variant (``MSFF_CUDA_CONV``: generic, tc, tc-cpasync, sm80): when a record for this
GPU family (schema 2, written by the gpu-check sweep) shows variants whose every parity case passed
and whose compute-sanitizer memcheck and racecheck were clean, the fastest of them (geometric mean
of its recorded block speedups) becomes the process default conv kernel the first time the ``cuda``
backend is resolved for a CUDA tensor (auto or explicit), through the setter the cuda backend
registers (:func:`register_conv_kernel_setter`); the ``cuda`` backend is then ranked by that
variant's entries. An ``MSFF_CUDA_CONV`` set in the environment always wins (the ranking then uses
that variant's entries, and only if the record validates it). With no such record nothing changes:
the C++ default runs. Records without variants (schema 1) rank ``cuda`` as before.

An explicitly requested backend that cannot run raises :class:`BackendUnavailableError` saying why.
Export (torch.export / ONNX) and ``torch.use_deterministic_algorithms(True)`` always use
``reference``.

Probe failures: a probe reports an *expected* unavailability (triton or the compiled extension not
installed, a CPU tensor, ...) as a reason string. An *unexpected* error while probing (a bug in
msff's own kernels, a triton whose import crashes) is never a silent fallback: with
``MSFF_STRICT_BACKEND=1`` (set by the test suite's ``conftest.py``) it is raised; otherwise it is
logged with its traceback, warned once, and becomes the backend's reason.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch

from msff._version import __version__ as _msff_version
from msff.backend_request import (
    BACKENDS,
    BackendUnavailableError,
    check_backend_name,
    current_backend,
)

log = logging.getLogger("msff.backend")
_local = threading.local()  # per-thread: which auto fallbacks were logged

__all__ = [
    "STRICT_ENV",
    "auto_decision",
    "backend_status",
    "conv_kernel_verdicts",
    "is_missing_module",
    "kernel_sources_hash",
    "load_validation_records",
    "probe_failure",
    "register_backend_probe",
    "register_conv_kernel_setter",
    "reload_validation_records",
    "resolve_backend",
    "strict_probes",
    "validate_record",
    "validation_dirs",
    "MIN_SPEEDUP",
    "MODES",
    "RECORD_SCHEMA",
    "RECORD_SCHEMAS",
]

# ---- availability probes --------------------------------------------------------------------
# A probe takes the input tensor and returns None when the backend can run on it, or a string
# saying why not. msff.ops registers them (msff/ops/__init__.py: triton; msff/ops/_cuda.py: cuda).
_PROBES: dict[str, Callable[[Optional[torch.Tensor]], Optional[str]]] = {}

#: ``1`` raises unexpected errors met while probing a backend; anything else logs and warns
STRICT_ENV = "MSFF_STRICT_BACKEND"


def register_backend_probe(name: str, probe: Callable[[Optional[torch.Tensor]], Optional[str]]):
    """Install the availability check for backend ``name`` (used by msff.ops)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}")
    _PROBES[name] = probe


def strict_probes() -> bool:
    """True when ``MSFF_STRICT_BACKEND=1``: unexpected probe errors are raised, not reported."""
    return os.environ.get(STRICT_ENV, "").strip() == "1"


def is_missing_module(err: ImportError, package: str) -> bool:
    """True when ``err`` says that ``package`` (or one of its submodules / names) is missing, the
    expected failure of an optional dependency, as opposed to an ImportError raised by a bug in
    msff's own modules.

    Example:
        >>> try:
        ...     import triton_that_does_not_exist
        ... except ImportError as e:
        ...     is_missing_module(e, "triton_that_does_not_exist"), is_missing_module(e, "triton")
        (True, False)
    """
    name = getattr(err, "name", None) or ""
    return name == package or name.startswith(package + ".")


def probe_failure(backend: str, what: str, err: BaseException) -> str:
    """Handle an unexpected error ``err`` met while ``what`` for ``backend``'s probe.

    Raises ``err`` when :func:`strict_probes`; otherwise logs it with its traceback, warns once
    (a RuntimeWarning naming the error), and returns the reason the backend cannot run.
    """
    if strict_probes():
        raise err
    reason = (f"{what} failed unexpectedly ({type(err).__name__}: {err}); this is a bug or an "
              f"incompatible dependency, not a missing one (set {STRICT_ENV}=1 to raise it)")
    log.warning("backend %s unavailable: %s", backend, reason, exc_info=err)
    warnings.warn(f"msff backend {backend!r} unavailable: {reason}", RuntimeWarning, stacklevel=3)
    return reason


def _probe(name: str, x: Optional[torch.Tensor]) -> Optional[str]:
    if name == "reference":
        return None
    probe = _PROBES.get(name)
    if probe is None:  # only while msff.ops is still being imported
        return f"no availability probe registered for {name!r} (msff.ops registers them)"
    return probe(x)


def _is_exporting() -> bool:
    """torch.export is tracing (not a plain torch.compile). torch.compiler.is_exporting() returns
    the module flag ``_is_exporting_flag``, but Dynamo of torch 2.11 folds the *call* to True under
    any torch.compile (the fused backends then silently ran the reference there); reading the flag
    itself is right under both, so read it where torch has it."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    if isinstance(flag, bool):
        return flag
    try:
        return bool(torch.compiler.is_exporting())
    except AttributeError:  # pragma: no cover - older torch
        return False


def _forced_reference() -> Optional[str]:
    if _is_exporting():
        return "torch.export is tracing"
    if torch.onnx.is_in_onnx_export():
        return "ONNX export is running"
    if torch.are_deterministic_algorithms_enabled():
        return "deterministic algorithms are enabled"
    return None


def resolve_backend(requested: Optional[str] = None, x: Optional[torch.Tensor] = None,
                    mode: Optional[str] = None) -> str:
    """Decide the backend that runs for input ``x``.

    Args:
        requested: a per-call/per-model choice (``None`` or ``"auto"`` defers to the scope and
            ``MSFF_BACKEND``).
        x: the input tensor the op will see (device decides availability; its dtype, or the
            autocast dtype, selects the validation entry).
        mode: ``"train"`` or ``"eval"`` for the validation lookup; default ``"train"`` when
            gradients are enabled, ``"eval"`` otherwise.

    Returns:
        One of ``reference``, ``triton``, ``cuda``.

    Raises:
        BackendUnavailableError: an explicitly requested backend cannot run on ``x``.

    Example:
        >>> resolve_backend("auto", torch.randn(1, 3, 8, 8))  # CPU tensor
        'reference'
    """
    name = check_backend_name(requested) if requested is not None else "auto"
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
        if name == "cuda":
            _use_recorded_conv_kernel(x)
        return name
    if x is not None and not x.is_cuda:
        # auto never picks the interpreter: it is a verification tool, not a fast path.
        _log_fallback_once(x, "not a CUDA tensor")
        return "reference"
    index = -1 if x is None else (x.device.index if x.device.index is not None else -1)
    dtype = _compute_dtype(x)
    mode = _check_mode(mode) if mode is not None else _current_mode()
    for candidate in _validated_ranking(index, dtype, mode):
        if _probe(candidate, x) is None:
            if candidate == "cuda":
                _use_recorded_conv_kernel(x)
            return candidate
    _log_fallback_once(x, "no validated fused backend (python -m msff.env says why)")
    return "reference"


@torch.compiler.assume_constant_result
def _validated_ranking(index: int, dtype: str, mode: str) -> tuple:
    """The validated fused backends, fastest first, for CUDA device ``index`` (-1: current).
    A constant for torch.compile: the records are read once, never traced."""
    if index < 0:
        if not torch.cuda.is_available():
            return ()
        index = torch.cuda.current_device()
    return tuple(_decide(_gpu_info(index), dtype, mode, _conv_env())["ranked"])


def _use_recorded_conv_kernel(x) -> None:
    if x is not None and getattr(x, "is_cuda", False):
        _recorded_conv_kernel(x.device.index if x.device.index is not None else -1)


@torch.compiler.assume_constant_result
def _recorded_conv_kernel(index: int) -> str:
    """The conv kernel variant the validation records choose for CUDA device ``index`` (-1:
    current), set once as the process default through the registered setter; "" when none (or
    when ``MSFF_CUDA_CONV`` is set: the environment wins). A constant for torch.compile: the
    default is set when tracing, and the C++ glue reads it at every call."""
    if _conv_env() is not None or _CONV_API.get("set") is None:
        return ""
    if index < 0:
        index = torch.cuda.current_device()
    gpu = _gpu_info(index)
    if gpu not in _CONV_APPLIED:
        kernel = _conv_choice(gpu)["kernel"] or ""
        if kernel:
            previous = _CONV_API["set"](kernel)
            log.debug("cuda conv kernel %s (was %s) from the validation record for %s", kernel,
                      previous, gpu[0])
        _CONV_APPLIED[gpu] = kernel
    return _CONV_APPLIED[gpu]


# ---- GPU validation records ------------------------------------------------------------------
#: written by ``make gpu-check``; 2 added per-unit verdicts (``units``) and CUDA conv ``variant``s
RECORD_SCHEMA = "msff-validation/2"
#: every schema the loader reads (1: no units, no variants; its cuda entries rank cuda as before)
RECORD_SCHEMAS = ("msff-validation/1", RECORD_SCHEMA)
#: the environment variable choosing the CUDA conv kernel; it always wins over a record
CONV_ENV = "MSFF_CUDA_CONV"
_UNIT_STATUS = ("passed", "failed", "timeout", "crashed", "skipped", "pending")
MODES = ("train", "eval")
#: a fused backend must beat the reference by this factor to become a default: smaller gains are
#: within run-to-run noise and not worth a less exercised code path.
MIN_SPEEDUP = 1.05
_DTYPES = ("float32", "float16", "bfloat16")
_MSFF_DIR = Path(__file__).resolve().parent.parent  # msff/
_PACKAGE_RECORDS = _MSFF_DIR / "validation"


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


def _current_mode() -> str:
    return "train" if torch.is_grad_enabled() else "eval"


def _compute_dtype(x: Optional[torch.Tensor]) -> str:
    dev = x.device.type if x is not None else "cuda"
    if torch.is_autocast_enabled(dev):
        return str(torch.get_autocast_dtype(dev)).replace("torch.", "")
    return str(x.dtype).replace("torch.", "") if x is not None else "float32"


def _current_gpu() -> Optional[tuple[str, str]]:
    """(name, compute capability "major.minor") of the current CUDA device, or None."""
    if not torch.cuda.is_available():
        return None
    return _gpu_info(torch.cuda.current_device())


_GPU_INFO: dict = {}


def _gpu_info(index: int) -> tuple[str, str]:
    """(name, "major.minor") of CUDA device ``index``; tests replace this to mock a GPU."""
    if index not in _GPU_INFO:
        major, minor = torch.cuda.get_device_capability(index)
        _GPU_INFO[index] = (torch.cuda.get_device_name(index), f"{major}.{minor}")
    return _GPU_INFO[index]


def validation_dirs() -> list[Path]:
    """Folders searched for records: the package's ``msff/validation`` then ``MSFF_VALIDATION_DIR``."""
    dirs = [_PACKAGE_RECORDS]
    extra = os.environ.get("MSFF_VALIDATION_DIR", "")
    dirs += [Path(p) for p in extra.split(os.pathsep) if p.strip()]
    return dirs


def validate_record(rec) -> Optional[str]:
    """None if ``rec`` (parsed JSON) is a well-formed validation record, else what is wrong."""
    if not isinstance(rec, dict):
        return f"top level must be an object, got {type(rec).__name__}"
    if rec.get("schema") not in RECORD_SCHEMAS:
        return f"schema must be one of {RECORD_SCHEMAS}, got {rec.get('schema')!r}"
    gpu = rec.get("gpu")
    if not isinstance(gpu, dict) or not isinstance(gpu.get("name"), str) \
            or not isinstance(gpu.get("capability"), str) or "." not in gpu["capability"]:
        return 'gpu must be {"name": str, "capability": "major.minor", ...}'
    if not isinstance(rec.get("versions"), dict) or not isinstance(rec.get("sources"), dict):
        return "versions and sources must be objects"
    entries = rec.get("entries")
    if not isinstance(entries, list):
        return "entries must be a list"
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            return f"entries[{i}] must be an object"
        if e.get("backend") not in ("triton", "cuda"):
            return f"entries[{i}].backend must be 'triton' or 'cuda', got {e.get('backend')!r}"
        if e.get("dtype") not in _DTYPES:
            return f"entries[{i}].dtype must be one of {_DTYPES}, got {e.get('dtype')!r}"
        if e.get("mode") not in MODES:
            return f"entries[{i}].mode must be one of {MODES}, got {e.get('mode')!r}"
        if not isinstance(e.get("parity"), bool):
            return f"entries[{i}].parity must be true or false"
        sp = e.get("speedup")
        if sp is not None and (isinstance(sp, bool) or not isinstance(sp, (int, float))
                               or not math.isfinite(sp) or sp <= 0):
            return f"entries[{i}].speedup must be a positive number or null, got {sp!r}"
        v = e.get("variant")
        if v is not None and (e["backend"] != "cuda" or not isinstance(v, str) or not v):
            return f"entries[{i}].variant must be a CUDA conv kernel name (cuda entries only), got {v!r}"
    units = rec.get("units", {})
    if not isinstance(units, dict):
        return "units must be an object"
    for name, u in units.items():
        if not isinstance(u, dict) or u.get("status") not in _UNIT_STATUS:
            return f"units[{name!r}].status must be one of {_UNIT_STATUS}"
        san = u.get("sanitizer", {})
        if not isinstance(san, dict) or not all(isinstance(v, str) for v in san.values()):
            return f"units[{name!r}].sanitizer must map tool names to result strings"
    return None


_RECORDS: dict = {}  # "records" -> list[(path, record)], filled once; see reload_validation_records
_WARNED: set = set()


def load_validation_records(dirs=None) -> list[tuple[Path, dict]]:
    """Every well-formed record (``*.json``) in ``dirs`` (default :func:`validation_dirs`), as
    (path, record), sorted by path. A file that is not valid JSON or not a record is skipped
    with one warning naming the file and the problem."""
    out = []
    for d in (validation_dirs() if dirs is None else dirs):
        d = Path(d)
        if not d.is_dir():
            continue
        for path in sorted(d.glob("*.json")):
            try:
                rec = json.loads(path.read_text(encoding="utf-8"))
                why = validate_record(rec)
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                why = f"{type(e).__name__}: {e}"
            if why is not None:
                if str(path) not in _WARNED:
                    _WARNED.add(str(path))
                    warnings.warn(f"{path}: ignored, not a valid msff validation record ({why})",
                                  RuntimeWarning, stacklevel=2)
                continue
            out.append((path, rec))
    return out


def _records() -> list[tuple[Path, dict]]:
    if "records" not in _RECORDS:
        _RECORDS["records"] = load_validation_records()
    return _RECORDS["records"]


def reload_validation_records() -> None:
    """Forget the cached records and decisions (after writing a record, or in tests). A conv kernel
    default already set stays set; the next cuda resolution sets the new records' choice."""
    _RECORDS.clear()
    _DECISIONS.clear()
    _CONV_APPLIED.clear()
    _WARNED.clear()
    _SOURCE_HASHES.clear()


_SOURCE_HASHES: dict = {}


def _source_files(backend: str) -> tuple[Optional[Path], list[Path]]:
    if backend == "triton":
        import importlib.util

        spec = importlib.util.find_spec("msff.kernels")
        locs = list(spec.submodule_search_locations or []) if spec else []
        if not locs:
            return None, []
        root = Path(locs[0])
        return root, sorted(root.glob("*.py"))
    csrc = _MSFF_DIR.parent / "csrc"  # a source checkout / editable install
    pats = ("*.cpp", "*.h", "cuda/*.cu", "cuda/*.cuh")
    return csrc, sorted(p for pat in pats for p in csrc.glob(pat))


def kernel_sources_hash(backend: str) -> Optional[str]:
    """sha256 (hex, first 16) over the source files of ``backend``'s kernels (``msff/kernels/*.py``
    for triton; ``csrc`` for cuda), or None when the sources are not on disk (a wheel without
    csrc). A record validates the kernels whose hash it carries, and no others."""
    if backend not in _SOURCE_HASHES:
        root, files = _source_files(backend)
        if not files:
            _SOURCE_HASHES[backend] = None
        else:
            h = hashlib.sha256()
            for f in files:
                h.update(f.relative_to(root).as_posix().encode())
                h.update(b"\0")
                h.update(f.read_bytes())
            _SOURCE_HASHES[backend] = h.hexdigest()[:16]
    return _SOURCE_HASHES[backend]


def _versions_now() -> dict:
    v = {"msff": _msff_version, "torch": torch.__version__}
    try:
        import triton

        v["triton"] = triton.__version__
    except ImportError:
        v["triton"] = None
    return v


def _entry_blocker(path: Path, rec: dict, entry: dict, gpu: tuple[str, str]) -> Optional[str]:
    """Why ``entry`` of ``rec`` does not make ``entry['backend']`` a default here, or None."""
    backend = entry["backend"]
    if rec.get("dry_run"):
        return f"{path.name}: a --dry-run record (CPU stand-in), not a GPU measurement"
    if rec["gpu"]["capability"] != gpu[1]:
        return f"{path.name}: recorded on sm_{rec['gpu']['capability'].replace('.', '')} " \
               f"({rec['gpu']['name']}), this GPU is sm_{gpu[1].replace('.', '')} ({gpu[0]})"
    if not entry["parity"]:
        return f"{path.name}: {backend} failed parity with the reference"
    sp = entry.get("speedup")
    if sp is None or sp < MIN_SPEEDUP:
        return f"{path.name}: {backend} speedup {sp} < {MIN_SPEEDUP} over the reference"
    want = rec["sources"].get(backend)
    have = kernel_sources_hash(backend)
    if have is not None and want != have:
        return f"{path.name}: {backend} kernels changed since the record (sources {want} != {have})"
    now = _versions_now()
    if have is None and rec["versions"].get("msff") != now["msff"]:
        return f"{path.name}: made with msff {rec['versions'].get('msff')}, this is {now['msff']}"
    if backend == "triton":
        rt = str(rec["versions"].get("triton") or "")
        if rt.split(".")[:2] != str(now["triton"] or "").split(".")[:2]:
            return f"{path.name}: triton kernels validated with triton {rt}, this is {now['triton']}"
    return None


_DECISIONS: dict = {}


# ---- CUDA conv kernel variants ---------------------------------------------------------------
_CONV_API: dict = {}      # "kernels": the names, "set": set_conv_kernel_default (from msff.ops)
_CONV_APPLIED: dict = {}  # gpu -> the variant set as the process default ("" when none)


def register_conv_kernel_setter(kernels, setter: Callable[[str], str]) -> None:
    """Install the cuda backend's conv kernel names and its ``set_conv_kernel_default(name)``
    (returns the previous default). msff.ops wires msff.ops._cuda's in: this policy module cannot
    import the backend without an import cycle."""
    _CONV_API.update(kernels=tuple(kernels), set=setter)
    _CONV_APPLIED.clear()


def _conv_env() -> Optional[str]:
    v = os.environ.get(CONV_ENV, "").strip()
    return v or None


def _geomean(xs) -> Optional[float]:
    xs = [float(x) for x in xs if x]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def conv_kernel_verdicts(records, gpu: tuple[str, str]) -> dict:
    """What validation ``records`` (``[(path, record)]``) say of each CUDA conv kernel variant on
    ``gpu`` (name, "major.minor"), ignoring the environment.

    Returns:
        ``{"kernel": the fastest variant (geometric mean of its recorded block speedups) whose every
        parity case passed and whose memcheck and racecheck were clean, or None; "why"; "variants":
        {name: {"ok", "speedup", "why", "record"}}}``.

    Example:
        >>> conv_kernel_verdicts([], ("NVIDIA H200", "9.0"))["kernel"] is None
        True
    """
    variants: dict = {}
    known = _CONV_API.get("kernels")
    for path, rec in records:
        if rec.get("dry_run") or rec["gpu"]["capability"] != gpu[1]:
            continue
        want, have = rec["sources"].get("cuda"), kernel_sources_hash("cuda")
        for name, u in (rec.get("units") or {}).items():
            if not name.startswith("cuda:"):
                continue
            v = name.split(":", 1)[1]
            sp = _geomean(e.get("speedup") for e in rec["entries"]
                          if e["backend"] == "cuda" and e.get("variant") == v)
            san = u.get("sanitizer") or {}
            problems = []
            if have is not None and want != have:
                problems.append(f"cuda kernels changed since the record (sources {want} != {have})")
            if u["status"] != "passed":
                problems.append(f"parity {u['status']}" + (f" ({u['reason']})" if u.get("reason") else ""))
            bad = [f"{t} {san.get(t, 'not run')}" for t in ("memcheck", "racecheck")
                   if san.get(t) != "clean"]
            if bad:
                problems.append("sanitizer " + ", ".join(bad))
            if sp is None:
                problems.append("not timed")
            if known is not None and v not in known:
                problems.append(f"not a conv kernel of this build {known}")
            verdict = {"ok": not problems, "speedup": sp, "record": str(path), "why": "; ".join(
                problems) or f"parity passed, memcheck and racecheck clean, {sp:.2f}x the reference"}
            old = variants.get(v)
            if old is None or (verdict["ok"], verdict["speedup"] or 0) > (old["ok"], old["speedup"] or 0):
                variants[v] = verdict
    ok = sorted((v for v in variants if variants[v]["ok"]), key=lambda v: -variants[v]["speedup"])
    if ok:
        why = f"{ok[0]}: {variants[ok[0]]['why']} ({Path(variants[ok[0]]['record']).name})"
    elif variants:
        why = "no variant passed parity and both sanitizers: " + "; ".join(
            f"{v}: {d['why']}" for v, d in variants.items())
    else:
        why = "no record of CUDA conv kernel variants for this GPU family"
    return {"kernel": ok[0] if ok else None, "why": why, "variants": variants}


def _conv_choice(gpu: tuple[str, str]) -> dict:
    """:func:`conv_kernel_verdicts` over the loaded records, with ``kernel`` = what runs: the
    variant of ``MSFF_CUDA_CONV`` when set (the environment wins), else the records' choice."""
    env = _conv_env()
    key = ("conv", gpu, env)
    if key not in _DECISIONS:
        d = conv_kernel_verdicts(_records(), gpu)
        if env is not None:
            d = dict(d, kernel=env, why=f"{CONV_ENV}={env} is set and wins over the records "
                     f"(their choice: {d['kernel'] or 'none'})")
        _DECISIONS[key] = d
    return _DECISIONS[key]


def _decide(gpu: tuple[str, str], dtype: str, mode: str, env: Optional[str] = None) -> dict:
    """The ranking for (gpu, dtype, mode); ``env`` (the MSFF_CUDA_CONV value) is part of the key
    because the cuda backend is ranked by the entries of the conv kernel variant that will run."""
    key = (gpu, dtype, mode, env)
    if key in _DECISIONS:
        return _DECISIONS[key]
    best: dict[str, tuple[float, Path, Optional[str]]] = {}
    reasons = []
    matching = 0
    conv = None
    for path, rec in _records():
        noted = False
        for e in rec["entries"]:
            if e["dtype"] != dtype or e["mode"] != mode:
                continue
            matching += 1
            if e["backend"] == "cuda" and e.get("variant") is not None:
                conv = conv or _conv_choice(gpu)
                if conv["kernel"] is None:
                    if not noted:
                        reasons.append(f"{path.name}: cuda: {conv['why']}")
                        noted = True
                    continue
                if e["variant"] != conv["kernel"]:
                    continue  # only the conv kernel that will run speaks for the cuda backend
                verdict = conv["variants"].get(e["variant"])
                if verdict is None or not verdict["ok"]:
                    reasons.append(f"{path.name}: cuda conv kernel {e['variant']}: "
                                   f"{verdict['why'] if verdict else 'no verdict in the record'}")
                    continue
            why = _entry_blocker(path, rec, e, gpu)
            if why is not None:
                reasons.append(why)
                continue
            if e["backend"] not in best or e["speedup"] > best[e["backend"]][0]:
                best[e["backend"]] = (float(e["speedup"]), path, e.get("variant"))
    ranked = sorted(best, key=lambda b: -best[b][0])
    if ranked:
        why = "; ".join(f"{b}: {best[b][0]:.2f}x the reference, parity passed ({best[b][1].name}"
                        + (f", conv kernel {best[b][2]}" if best[b][2] else "") + ")"
                        for b in ranked)
    elif matching == 0:
        why = (f"no validation record for sm_{gpu[1].replace('.', '')} ({gpu[0]}), {dtype}, "
               f"{mode} (run `make gpu-check` on this GPU)")
    else:
        why = "no record makes a fused backend a default: " + "; ".join(reasons)
    _DECISIONS[key] = {"ranked": ranked, "why": why,
                       "records": sorted({str(best[b][1]) for b in ranked})}
    return _DECISIONS[key]


def auto_decision(dtype: str = "bfloat16", mode: str = "train",
                  gpu: Optional[tuple[str, str]] = None) -> dict:
    """What ``auto`` does on ``gpu`` (default: this machine's current GPU) for ``dtype`` and
    ``mode``, and why: ``{"gpu", "dtype", "mode", "ranked": [validated backends, fastest first],
    "backend": what runs (the first ranked that can run, else "reference"), "why", "records",
    "cuda_conv": {"kernel": the conv kernel variant the cuda backend runs by the records or
    MSFF_CUDA_CONV (None: the C++ default), "why"}}``.

    Example (a GPU family no shipped record covers, so ``auto`` runs the reference):
        >>> d = auto_decision("float32", "eval", gpu=("Tesla T4", "7.5"))
        >>> d["backend"], d["ranked"], d["why"]
        ('reference', [], 'no validation record for sm_75 (Tesla T4), float32, eval (run `make gpu-check` on this GPU)')
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    _check_mode(mode)
    gpu = gpu if gpu is not None else _current_gpu()
    if gpu is None:
        return {"gpu": None, "dtype": dtype, "mode": mode, "ranked": [], "backend": "reference",
                "why": "no CUDA GPU: auto runs the reference", "records": [],
                "cuda_conv": {"kernel": _conv_env(), "why": "no CUDA GPU"}}
    d = _decide(tuple(gpu), dtype, mode, _conv_env())
    backend = "reference"
    if torch.cuda.is_available():
        x = torch.empty(0, device="cuda")
        backend = next((b for b in d["ranked"] if _probe(b, x) is None), "reference")
    conv = _conv_choice(tuple(gpu))
    return {"gpu": list(gpu), "dtype": dtype, "mode": mode, "ranked": list(d["ranked"]),
            "backend": backend, "why": d["why"], "records": d["records"],
            "cuda_conv": {"kernel": conv["kernel"], "why": conv["why"]}}


def _log_fallback_once(x: Optional[torch.Tensor], why: str) -> None:
    key = (x.device.type if x is not None else "none", why)
    seen = getattr(_local, "fallback_logged", set())
    if key not in seen:
        seen.add(key)
        _local.fallback_logged = seen
        log.debug("backend auto -> reference for %s tensors: %s", key[0], why)


def backend_status(device: Optional[str] = None) -> dict[str, Optional[str]]:
    """For each backend, None if it can run on ``device`` (default: cuda if present else cpu),
    otherwise the reason it cannot."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.empty(0, device=device) if (device == "cpu" or torch.cuda.is_available()) else None
    return {name: _probe(name, x) for name in BACKENDS}
