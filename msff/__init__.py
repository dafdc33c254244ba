"""msff: MSFFNet (Yi & Tan 2025) for landslide segmentation, with fused Triton/CUDA kernels.

Example:
    >>> import torch
    >>> from msff import MSFFNet
    >>> MSFFNet(width_multiplier=0.125)(torch.randn(1, 3, 64, 64)).shape
    torch.Size([1, 1, 64, 64])
"""
from msff._version import __version__
from msff.backend import BackendUnavailableError, backend_status, use_backend
from msff.models import PRESETS, CheckpointError, MSFFNet, build_model


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
