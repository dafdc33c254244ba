"""msff: MSFFNet (Yi & Tan 2025) for landslide segmentation, with fused Triton/CUDA kernels.

Example:
    >>> import torch
    >>> from msff import MSFFNet
    >>> MSFFNet(width_multiplier=0.125)(torch.randn(1, 3, 64, 64)).shape
    torch.Size([1, 1, 64, 64])
"""


def _bind_source_tree_kernels() -> None:
    """Make the top-level ``kernels/`` folder importable as ``msff.kernels`` in a source tree run
    without an install (``PYTHONPATH=<repo>``, as ``make gpu-check-device`` runs on the lent GPU
    machine, where nothing can be installed). An installed or editable msff already maps it (setup.py
    ``package_dir``); then this does nothing."""
    import importlib.util
    import os
    import sys

    if "msff.kernels" in sys.modules or importlib.util.find_spec("msff.kernels") is not None:
        return
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
    init = os.path.join(folder, "__init__.py")
    if not os.path.isfile(init):
        return
    spec = importlib.util.spec_from_file_location("msff.kernels", init, submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules["msff.kernels"] = module
    spec.loader.exec_module(module)
    sys.modules[__name__].kernels = module  # what the import system sets on a parent package


_bind_source_tree_kernels()

from msff._version import __version__  # noqa: E402
from msff.backend import BackendUnavailableError, backend_status, use_backend  # noqa: E402
from msff.models import PRESETS, CheckpointError, MSFFNet, build_model  # noqa: E402


def fuse_for_inference(model):
    """Fold BatchNorm into the LKAM convolutions for deployment (see msff.ops.lkam)."""
    from msff.ops import fuse_for_inference as _fuse

    return _fuse(model)


__all__ = [
    "BackendUnavailableError",
    "CheckpointError",
    "MSFFNet",
    "PRESETS",
    "backend_status",
    "build_model",
    "fuse_for_inference",
    "use_backend",
    "__version__",
]
