"""nn.Modules: MSFFNet, the comparison networks, their blocks, the model card, and presets.

Every network derives from :class:`SegmentationModel` (input checks, pad-and-crop, activation,
capability flags, ``save_pretrained`` / ``from_pretrained``) and has ``encoder``, ``decoder``
and ``segmentation_head``; build them from their class or by zoo name (:func:`create_model`).
"""
from msff.models.base import SegmentationModel
from msff.models.blocks import (
    ASPP,
    ChannelAttention,
    ConvBNReLU,
    DecoderBlock,
    LKAMBlock,
    LKAMLayer,
    SeparableLargeKernelConv,
    VGGLayer,
)
from msff.models.card import MaskEncodingCard, ModelCard, Normalization
from msff.models.msffnet import CheckpointError, MSFFEncoder, MSFFNet, load_state_dict_checked

#: Named configurations. ``paper`` is Yi & Tan (2025); ``cpu`` is sized for 2-core CPU runs;
#: the ablation variants of the paper's Table 4 are switches, not copies of the model.
PRESETS = {
    "paper": dict(),
    "cpu": dict(width_multiplier=0.25),
    "tiny": dict(width_multiplier=0.125, lkam_blocks=1, kernel_size=7),
    "baseline": dict(use_lkam=False, use_aspp=False),
    "lkam": dict(use_lkam=True, use_aspp=False),
    "aspp": dict(use_lkam=False, use_aspp=True),
    "full": dict(use_lkam=True, use_aspp=True),
}


def build_model(preset: str = "paper", **kwargs) -> MSFFNet:
    """Build an MSFFNet from a named preset, overridden by keyword arguments.

    Example:
        >>> m = build_model("cpu", in_channels=14)
        >>> m.widths
        (16, 32, 64, 128, 256)
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    cfg = dict(PRESETS[preset])
    cfg.update(kwargs)
    return MSFFNet(**cfg)


from msff.models.deeplabv3plus import DeepLabV3Plus  # noqa: E402
from msff.models.fcn import FCN8s  # noqa: E402
from msff.models.resnet_skip import ResNetSkipNet  # noqa: E402
from msff.models.segnet import SegNet  # noqa: E402
from msff.models.unet import UNet  # noqa: E402
from msff.models.zoo import (  # noqa: E402
    LibrarySegmentationModel,
    available_models,
    create_model,
    load_model,
    save_model,
)

__all__ = [
    "available_models",
    "create_model",
    "load_model",
    "save_model",
    "ASPP",
    "DeepLabV3Plus",
    "FCN8s",
    "LibrarySegmentationModel",
    "ResNetSkipNet",
    "SegNet",
    "SegmentationModel",
    "UNet",
    "ChannelAttention",
    "CheckpointError",
    "ConvBNReLU",
    "DecoderBlock",
    "LKAMBlock",
    "LKAMLayer",
    "MSFFEncoder",
    "MSFFNet",
    "MaskEncodingCard",
    "ModelCard",
    "Normalization",
    "PRESETS",
    "SeparableLargeKernelConv",
    "VGGLayer",
    "build_model",
    "load_state_dict_checked",
]
