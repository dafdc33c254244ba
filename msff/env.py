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
    from msff.backend import backend_status, triton_interpret

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
    }
    for mod in ("triton", "numpy", "rasterio"):
        try:
            info[mod] = importlib.import_module(mod).__version__
        except Exception as e:  # report, never fail
            info[mod] = f"not available ({type(e).__name__})"
    try:
        ext = importlib.import_module("msff._C")
        info["extension"] = getattr(ext, "__file__", "loaded")
        info["extension_cuda"] = bool(getattr(ext, "WITH_CUDA", 0))
    except Exception as e:
        info["extension"] = f"not built ({type(e).__name__}: {e})"
    status = backend_status()
    info["backends"] = {k: ("available" if v is None else f"unavailable: {v}") for k, v in status.items()}
    return info


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
        else:
            print(f"{k:17s} {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
