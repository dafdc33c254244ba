"""Inference engines: how the network's forward pass runs during prediction and evaluation.

Three ways to run the same weights, all behind one ``nn.Module`` interface (``engine(x)`` with
``x`` float32 ``(N, C, H, W)`` returns the model's output ``(N, K, H, W)``):

* ``onnx``: the model exported once with ``torch.onnx.export(dynamo=True)`` and run by
  onnxruntime's CPU execution provider (optional extra ``msff[onnx]``). The exported graph is
  cached per checkpoint under :func:`cache_dir`, keyed by a hash of the weights, the model
  config, the input band count and the torch / onnx / onnxruntime versions; it is written to a
  temporary file and renamed, so a cache entry is complete or absent. A fresh export is checked
  against the torch model on a random batch before it is used or cached.
* ``torch``: eager PyTorch; on CPU in channels_last memory format (the weights are converted
  on a copy; the caller's model is untouched).
* ``nchw``: the model exactly as given (eager NCHW; today's path, and the GPU default).

``auto`` (the default) picks, for an MSFFNet on the CPU, ``onnx`` when onnxruntime is
importable, else ``torch``; on CUDA, and for any other network (not measured), it keeps ``nchw``
(the fused kernels and cuDNN run NCHW; no GPU measurement says otherwise). The choice is what
``benchmarks/test_bench_cpu_engine.py`` measured on 2-core AVX2 and AVX-512 CPUs: onnxruntime
1.8-3.8x, channels_last 1.3-1.4x, channels_last + ``torch.compile`` with frozen weights ~1.9x the
NCHW eager model (see README).

Example:
    >>> import torch
    >>> from msff import build_model
    >>> m = build_model("tiny", in_channels=3).eval()
    >>> eng = make_engine(m, "torch", "cpu")
    >>> eng(torch.randn(1, 3, 32, 32)).shape
    torch.Size([1, 1, 32, 32])
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

__all__ = [
    "ENGINES",
    "EngineError",
    "OnnxEngine",
    "ChannelsLastEngine",
    "make_engine",
    "resolve_engine",
    "onnx_available",
    "weights_digest",
    "cache_dir",
    "engine_name",
]

log = logging.getLogger("msff.inference")

ENGINES = ("auto", "onnx", "torch", "nchw")
#: Bump when the export recipe changes so stale cache entries are never reused.
EXPORT_FORMAT = 1
#: Inputs are padded to a multiple of this inside MSFFNet; the ONNX graph takes multiples of it.
_ALIGN = 16
#: Parity tolerance of a fresh export against torch (fp32, summation order only).
PARITY_ATOL = 1e-3
PARITY_RTOL = 1e-3


class EngineError(ValueError, RuntimeError):
    """An engine asked for explicitly cannot run (missing package, failed export or parity)."""


def onnx_available() -> Optional[str]:
    """None when onnxruntime, onnx and onnxscript import, else the reason they do not."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        return f"{e.name or e} is not installed (pip install 'msff[onnx]')"
    return None


def cache_dir() -> Path:
    """Where exported graphs are kept: ``$MSFF_CACHE_DIR``, else ``$XDG_CACHE_HOME/msff``, else
    ``~/.cache/msff`` (an ``onnx/`` folder inside)."""
    root = os.environ.get("MSFF_CACHE_DIR")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "msff")
    return Path(root) / "onnx"


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of the model's state dict (names, dtypes, shapes and bytes, in key order)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _model_config(model: nn.Module) -> dict:
    for attr in ("config", "zoo_kwargs"):
        cfg = getattr(model, attr, None)
        if isinstance(cfg, dict):
            return {k: v for k, v in cfg.items() if k != "backend"}
    return {}


def _versions() -> dict:
    import onnx
    import onnxruntime
    import onnxscript

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxscript": onnxscript.__version__,
            "onnxruntime": onnxruntime.__version__, "format": EXPORT_FORMAT}


def engine_name(model: nn.Module) -> str:
    """``onnx``, ``torch`` (channels_last) or ``nchw`` for a model returned by :func:`make_engine`."""
    if isinstance(model, OnnxEngine):
        return "onnx"
    if isinstance(model, ChannelsLastEngine):
        return "torch"
    return "nchw"


def _source(model: nn.Module) -> nn.Module:
    """The torch network an engine was made from (``model`` itself when it is not an engine)."""
    if isinstance(model, ChannelsLastEngine):
        return model.source
    if isinstance(model, OnnxEngine):
        return model.model
    return model


def _measured(model: Optional[nn.Module]) -> bool:
    from msff.models import MSFFNet

    return model is None or isinstance(_source(model), MSFFNet)


def resolve_engine(engine: Optional[str], device, model: Optional[nn.Module] = None) -> str:
    """The concrete engine for ``engine`` (``auto``/None resolved) on ``device`` for ``model``.

    Raises:
        ValueError: unknown name. EngineError: ``onnx`` asked for where it cannot run.
    """
    engine = "auto" if engine is None else str(engine).lower()
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if engine == "auto":
        if dev.type != "cpu" or not _measured(model):
            return "nchw"
        return "onnx" if onnx_available() is None else "torch"
    if engine == "onnx":
        if dev.type != "cpu":
            raise EngineError(f"engine 'onnx' runs on the CPU only (device {dev}); use --engine nchw or torch")
        why = onnx_available()
        if why:
            raise EngineError(f"engine 'onnx' unavailable: {why}")
    return engine


def make_engine(
    model: nn.Module,
    engine: Optional[str] = "auto",
    device="cpu",
    *,
    in_channels: Optional[int] = None,
    threads: Optional[int] = None,
    cache: bool = True,
) -> nn.Module:
    """Wrap ``model`` (eval mode) in the engine ``engine`` on ``device``.

    Args:
        model: the network (``(N, C, H, W)`` → ``(N, K, H, W)``), or an engine made before
            (returned unchanged when it is of the kind asked for).
        engine: ``auto``, ``onnx``, ``torch`` or ``nchw`` (see the module docstring).
        device: where it runs.
        in_channels: input bands (default: from the model's config or first convolution).
        threads: onnxruntime intra-op threads (default ``torch.get_num_threads()``, which follows
            ``OMP_NUM_THREADS`` and torchrun's per-process setting).
        cache: reuse / store the exported ONNX graph under :func:`cache_dir`.

    Returns:
        An ``nn.Module`` in eval mode; :func:`engine_name` tells which engine it is.

    Raises:
        EngineError: ``onnx`` asked for explicitly and unavailable, failed to export, or did not
            match the torch model. Under ``auto`` an export failure falls back to ``torch`` with a
            warning.
    """
    asked = "auto" if engine is None else str(engine).lower()
    kind = resolve_engine(asked, device, model)
    if engine_name(model) == kind and (kind != "nchw" or not isinstance(model, (OnnxEngine, ChannelsLastEngine))):
        return model
    base = _source(model)
    base.eval()
    if kind == "nchw":
        return base.to(device)
    if kind == "torch":
        if torch.device(device).type != "cpu":
            return base.to(device)
        return ChannelsLastEngine(base)
    try:
        return OnnxEngine(base, in_channels=in_channels, threads=threads, cache=cache)
    except EngineError as e:
        if asked == "onnx":
            raise
        warnings.warn(f"onnxruntime engine unavailable ({e}); using torch channels_last", RuntimeWarning, stacklevel=2)
        return ChannelsLastEngine(base)


class ChannelsLastEngine(nn.Module):
    """Eager torch in channels_last memory format (a copy of the model; outputs are the same
    values as the NCHW model up to float summation order).

    Args:
        model: the network (not modified).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = copy.deepcopy(model).eval().to(memory_format=torch.channels_last)
        self.__dict__["source"] = model  # the caller's model (not a submodule: not saved twice)
        self.config = getattr(model, "config", None)
        self.metadata = getattr(model, "metadata", {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.contiguous(memory_format=torch.channels_last))


def _pad_to(x: torch.Tensor, align: int) -> tuple[torch.Tensor, int, int]:
    h, w = x.shape[-2:]
    ph, pw = (-h) % align, (-w) % align
    if ph or pw:
        x = torch.nn.functional.pad(x, (0, pw, 0, ph))
    return x, h, w


class OnnxEngine(nn.Module):
    """The model exported to ONNX and run by onnxruntime on the CPU.

    The graph takes any batch size and any height and width that are multiples of 16 (MSFFNet pads
    to 16 inside; this engine does the same zero padding before the graph and crops after), so
    one export serves every tile and image size.

    Args:
        model: the torch network (eval mode, CPU weights are copied for export; not modified).
        in_channels: input bands (default from the model).
        threads: intra-op threads (default ``torch.get_num_threads()``).
        cache: use the on-disk cache of exported graphs.

    Attributes:
        path: the ``.onnx`` file used; cache_hit: whether it came from the cache;
        parity: max |onnx - torch| of the parity check (None when loaded from the cache, where the
        check ran when it was written: see the ``.json`` beside it).
    """

    def __init__(self, model: nn.Module, in_channels: Optional[int] = None, threads: Optional[int] = None,
                 cache: bool = True):
        super().__init__()
        why = onnx_available()
        if why:
            raise EngineError(why)
        from msff.inference.predictor import model_in_channels

        self.model = model
        self.config = getattr(model, "config", None)
        self.metadata = getattr(model, "metadata", {})
        self.in_channels = int(in_channels or model_in_channels(model) or 3)
        self.threads = int(threads or torch.get_num_threads())
        self.parity: Optional[float] = None
        key_doc = {"weights": weights_digest(model), "class": type(model).__name__, "config": _model_config(model),
                   "in_channels": self.in_channels, "align": _ALIGN, **_versions()}
        self.key = hashlib.sha256(json.dumps(key_doc, sort_keys=True, default=str).encode()).hexdigest()[:40]
        folder = cache_dir() if cache else Path(tempfile.mkdtemp(prefix="msff-onnx-"))
        self.path = folder / f"{self.key}.onnx"
        self.cache_hit = cache and self.path.is_file()
        self.session = None
        if self.cache_hit:
            try:
                self.session = self._session(self.path)
            except Exception as e:  # a corrupt entry: onnxruntime raises its own exception types
                log.warning("cached ONNX graph %s unreadable (%s); exporting again", self.path, e)
                self.cache_hit = False
        if self.session is None:
            self._export(key_doc)

    # ---- export ---------------------------------------------------------------------------------
    def _export(self, key_doc: dict) -> None:
        folder = self.path.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise EngineError(f"cannot create the ONNX cache folder {folder}: {e.strerror or e}") from None
        src = copy.deepcopy(self.model).float().cpu().eval()
        if hasattr(src, "set_backend"):
            src.set_backend("reference")
        x = torch.randn(2, self.in_channels, 64, 96, generator=torch.Generator().manual_seed(0))
        batch = torch.export.Dim("batch", min=1, max=4096)
        h16 = torch.export.Dim("h16", min=1, max=4096)
        w16 = torch.export.Dim("w16", min=1, max=4096)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".part", dir=folder)
        os.close(fd)
        tmp = Path(tmp)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    prog = torch.onnx.export(
                        src, (x,), dynamo=True, input_names=["x"], output_names=["y"],
                        dynamic_shapes={"x": {0: batch, 2: _ALIGN * h16, 3: _ALIGN * w16}},
                        optimize=True, verbose=False,
                    )
                except Exception as e:  # the exporter raises many types (torch._dynamo, onnxscript)
                    raise EngineError(f"ONNX export of {type(self.model).__name__} failed: {type(e).__name__}: "
                                      f"{str(e).splitlines()[0] if str(e) else ''}") from None
                prog.save(str(tmp))
            session = self._session(tmp)
            xc = torch.randn(2, self.in_channels, 80, 48, generator=torch.Generator().manual_seed(1))
            with torch.inference_mode():
                ref = src(xc)
            got = torch.from_numpy(session.run(None, {"x": xc.numpy()})[0])
            err = float((got - ref).abs().max())
            tol = PARITY_ATOL + PARITY_RTOL * float(ref.abs().max())
            if not (got.shape == ref.shape and err <= tol):
                raise EngineError(f"the ONNX graph does not match the torch model (max |diff| {err:.3g} > {tol:.3g})")
            self.parity = err
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.path)
            meta = dict(key_doc, parity_max_abs_diff=err, parity_shape=list(xc.shape))
            mtmp = self.path.with_suffix(".json.part")
            mtmp.write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
            os.replace(mtmp, self.path.with_suffix(".json"))
            self.session = self._session(self.path)
        finally:
            if tmp.exists():
                tmp.unlink()

    def _session(self, path: Path):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    # ---- run ------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"expected a 4-D input (N, C, H, W), got {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"the ONNX engine was exported for {self.in_channels} input bands, got {x.shape[1]}")
        xp, h, w = _pad_to(x.detach().to("cpu", torch.float32), _ALIGN)
        y = torch.from_numpy(self.session.run(None, {"x": np.ascontiguousarray(xp.numpy())})[0])
        return y[..., :h, :w]

    def to(self, *args, **kwargs):  # the session lives on the CPU; keep the torch copy where it is
        return self

    def extra_repr(self) -> str:
        return f"path={self.path}, threads={self.threads}, cache_hit={self.cache_hit}"
