"""``python -m msff.env``: versions, device, and which kernel backends can run here."""
from __future__ import annotations

import importlib
import json
import platform
import sys


def collect() -> dict:
    """Return a dict describing the environment (versions, GPU, backend availability)."""
    import torch

    import msff
    from msff.backend import backend_status, strict_probes, triton_interpret

    info: dict = {
        "msff": msff.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "triton_interpret": triton_interpret(),
        "strict_backend": strict_probes(),  # MSFF_STRICT_BACKEND=1: probe errors raise
    }
    for mod in ("triton", "numpy", "rasterio"):
        try:
            info[mod] = importlib.import_module(mod).__version__
        except Exception as e:  # third-party import-time code raises its own types; a report never fails
            info[mod] = f"not available ({type(e).__name__})"
    try:
        ext = importlib.import_module("msff._C")
        info["extension"] = getattr(ext, "__file__", "loaded")
        info["extension_cuda"] = bool(getattr(ext, "WITH_CUDA", 0))
    except ImportError as e:  # not built, or unloadable (missing symbol, other torch): ImportError
        info["extension"] = f"not built ({type(e).__name__}: {e})"
    status = backend_status()
    info["backends"] = {k: ("available" if v is None else f"unavailable: {v}") for k, v in status.items()}
    info["auto"] = _auto_report()
    return info


def _auto_report() -> dict:
    """Which validation records exist and what ``auto`` picks for each dtype and mode, and why."""
    import warnings

    from msff import backend as B

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        B.reload_validation_records()
        records = B.load_validation_records()
    out: dict = {
        "record_dirs": [str(d) for d in B.validation_dirs()],
        "records": [
            f"{p}: {r['gpu']['name']} sm_{r['gpu']['capability'].replace('.', '')}, "
            f"{len(r['entries'])} entries, made {r.get('created', '?')}" for p, r in records
        ],
        "ignored": [str(w.message) for w in caught],
        "kernel_sources": {b: B.kernel_sources_hash(b) for b in ("triton", "cuda")},
        "decisions": {},
    }
    for dtype in ("bfloat16", "float16", "float32"):
        for mode in B.MODES:
            d = B.auto_decision(dtype, mode)
            out["decisions"][f"{dtype}/{mode}"] = f"{d['backend']} ({d['why']})"
    if not torch_cuda_available():
        # no GPU here: show what auto would rank on each recorded GPU (if its backends can run)
        for gpu in sorted({(r["gpu"]["name"], r["gpu"]["capability"]) for _, r in records}):
            for dtype in ("bfloat16", "float16", "float32"):
                for mode in B.MODES:
                    d = B.auto_decision(dtype, mode, gpu=gpu)
                    ranked = " > ".join(d["ranked"] + ["reference"])
                    out["decisions"][f"on {gpu[0]} {dtype}/{mode}"] = f"{ranked} ({d['why']})"
    return out


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m msff.env", description=__doc__)
    p.add_argument("--json", action="store_true", help="print JSON")
    args = p.parse_args(argv)
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for k, v in info.items():
        if k == "backends":
            print("backends:")
            for b, s in v.items():
                print(f"  {b:10s} {s}")
        elif k == "auto":
            print("auto (validation records, msff/validation/*.json from `make gpu-check`):")
            print(f"  searched         {', '.join(v['record_dirs'])}")
            for r in v["records"] or ["none"]:
                print(f"  record           {r}")
            for r in v["ignored"]:
                print(f"  ignored          {r}")
            print(f"  kernel sources   {v['kernel_sources']}")
            for dm, d in v["decisions"].items():
                print(f"  {dm:16s} {d}")
        else:
            print(f"{k:17s} {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
