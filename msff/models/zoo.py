"""Model zoo: every network of the paper's comparisons, built by name.

=============================  ===============================================  =================
name                           network                                          implementation
=============================  ===============================================  =================
``msffnet``                    MSFFNet (Yi & Tan 2025), full (LKAM + ASPP)      msff
``msffnet-baseline``           ablation: no LKAM, no ASPP (MSFFNet switches)    msff
``msffnet-lkam``               ablation: + LKAM                                 msff
``msffnet-aspp``               ablation: + ASPP                                 msff
``fcn``                        FCN-8s, VGG-16 encoder                           msff
``segnet``                     SegNet, VGG-16 encoder, max-unpooling            msff
``unet``                       U-Net (Ronneberger 2015), BN, same padding       msff
``deeplabv3plus-resnet101``    DeepLabV3+, ResNet-101 (alias ``deeplabv3plus``) msff
``deeplabv3plus-resnet50``     DeepLabV3+, ResNet-50                            msff
``deeplabv3plus-vgg16``        DeepLabV3+, VGG-16 (atrous stage 5)              msff
``resnet50-skip``              MSFFNet-style decoder/skips on ResNet-50         msff
``resnet101-skip``             MSFFNet-style decoder/skips on ResNet-101        msff
``tv-fcn-resnet50/101``        torchvision ``fcn_resnet50/101``                 torchvision
``tv-deeplabv3-resnet50/101``  torchvision ``deeplabv3_resnet50/101``           torchvision
``smp-unet``                   smp ``Unet`` (``encoder_name``, def. resnet34)   smp
``smp-deeplabv3plus``          smp ``DeepLabV3Plus`` (def. resnet101)           smp
=============================  ===============================================  =================

The ``msff`` networks take ``width_multiplier`` (for CPU-sized runs); their ResNet encoder is
torchvision's ResNet layer for layer (a torchvision state dict loads into it), written out so
the widths can scale. The ``tv-*`` and ``smp-*`` names wrap the libraries' own classes (fixed
widths, installed with the optional extra ``msff[zoo]``) and are there to cross-check ours at
full size. Everything is built with random weights (``weights=None``; nothing is downloaded),
takes any band count, returns ``classes`` logits and accepts any input size.

Example:
    >>> from msff.models.zoo import create_model
    >>> m = create_model("unet", in_channels=14, width_multiplier=0.125)
    >>> m(torch.randn(1, 14, 37, 53)).shape
    torch.Size([1, 1, 37, 53])
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from msff.models.base import SegmentationModel
from msff.models.card import ModelCard
from msff.models.deeplabv3plus import DeepLabV3Plus
from msff.models.fcn import FCN8s
from msff.models.msffnet import MSFFNet
from msff.models.resnet_skip import ResNetSkipNet
from msff.models.segnet import SegNet
from msff.models.unet import UNet

__all__ = [
    "ModelInfo",
    "available_models",
    "model_info",
    "create_model",
    "count_parameters",
    "save_model",
    "load_model",
    "LibrarySegmentationModel",
]


@dataclass(frozen=True)
class ModelInfo:
    """What a zoo name builds.

    Attributes:
        name: the zoo name.
        description: one line.
        implementation: ``"msff"``, ``"torchvision"`` or ``"segmentation_models_pytorch"``.
        defaults: keyword arguments applied before the caller's.
        requires: module that must be importable (None for msff's own).
        width_multiplier: whether the network accepts ``width_multiplier``.
    """

    name: str
    description: str
    implementation: str
    builder: Callable[..., nn.Module] = field(repr=False)
    defaults: dict = field(default_factory=dict)
    requires: Optional[str] = None
    width_multiplier: bool = True

    @property
    def installed(self) -> bool:
        return self.requires is None or importlib.util.find_spec(self.requires) is not None


class LibrarySegmentationModel(SegmentationModel):
    """Wraps a torchvision or segmentation_models_pytorch network behind msff's model contract
    (any input size by pad-and-crop, logits tensor out, input checks).

    Args:
        net: the library network (torchvision models return ``{"out": logits}``).
        in_channels, classes, activation: as for every msff model.
        input_multiple: H, W multiple the library network needs (smp checks it; 32 is safe).

    ``encoder``, ``decoder`` and ``segmentation_head`` are the library network's parts (smp:
    its own three; torchvision: ``backbone``, the classifier without its last conv, and that
    conv). Saved checkpoints are rebuilt by their zoo name (:func:`create_model`).

    Shapes: (N, in_channels, H, W) → (N, classes, H, W).
    """

    _rebuild_from_zoo_name = True

    def __init__(self, net: nn.Module, in_channels: int, classes: int, activation: Any = None, input_multiple: int = 32):
        super().__init__(in_channels, classes, activation)
        self.net = net
        self.input_multiple = input_multiple

    @property
    def encoder(self) -> nn.Module:
        return self.net.encoder if hasattr(self.net, "encoder") else self.net.backbone

    @property
    def decoder(self) -> nn.Module:
        return self.net.decoder if hasattr(self.net, "decoder") else self.net.classifier[:-1]

    @property
    def segmentation_head(self) -> nn.Module:
        return self.net.segmentation_head if hasattr(self.net, "segmentation_head") else self.net.classifier[-1]

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x)
        return y["out"] if isinstance(y, dict) else y


def _torchvision(fn_name: str) -> Callable[..., nn.Module]:
    def build(in_channels: int = 3, classes: int = 1, activation: Any = None, **kwargs) -> nn.Module:
        from torchvision.models import segmentation

        net = getattr(segmentation, fn_name)(
            weights=None, weights_backbone=None, num_classes=classes, aux_loss=False, **kwargs
        )
        if in_channels != 3:
            old = net.backbone.conv1
            net.backbone.conv1 = nn.Conv2d(in_channels, old.out_channels, 7, stride=2, padding=3, bias=False)
            nn.init.kaiming_normal_(net.backbone.conv1.weight, mode="fan_out", nonlinearity="relu")
        return LibrarySegmentationModel(net, in_channels, classes, activation, input_multiple=8)

    return build


_SMP_NOT_FX_TRACEABLE = {"DeepLabV3Plus"}


def _smp(cls_name: str) -> Callable[..., nn.Module]:
    def build(in_channels: int = 3, classes: int = 1, activation: Any = None, **kwargs) -> nn.Module:
        import segmentation_models_pytorch as smp

        net = getattr(smp, cls_name)(encoder_weights=None, in_channels=in_channels, classes=classes, **kwargs)
        model = LibrarySegmentationModel(net, in_channels, classes, activation, input_multiple=32)
        # smp's DeepLabV3Plus branches on tensor sizes in Python: torch.fx cannot trace it (smp 0.6).
        model._is_fx_traceable = cls_name not in _SMP_NOT_FX_TRACEABLE
        return model

    return build


def _msffnet(in_channels: int = 3, classes: int = 1, **kwargs) -> MSFFNet:
    return MSFFNet(in_channels=in_channels, classes=classes, **kwargs)


_REGISTRY: dict[str, ModelInfo] = {}


def _register(name: str, description: str, implementation: str, builder, defaults=None, requires=None, wm=True):
    _REGISTRY[name] = ModelInfo(name, description, implementation, builder, dict(defaults or {}), requires, wm)


_register("msffnet", "MSFFNet (Yi & Tan 2025): LKAM + ASPP, full model", "msff", _msffnet)
_register("msffnet-baseline", "MSFFNet ablation: baseline (no LKAM, no ASPP)", "msff", _msffnet,
          dict(use_lkam=False, use_aspp=False))
_register("msffnet-lkam", "MSFFNet ablation: baseline + LKAM", "msff", _msffnet, dict(use_lkam=True, use_aspp=False))
_register("msffnet-aspp", "MSFFNet ablation: baseline + ASPP", "msff", _msffnet, dict(use_lkam=False, use_aspp=True))
_register("fcn", "FCN-8s, VGG-16 encoder (Long et al. 2015)", "msff", FCN8s)
_register("segnet", "SegNet, VGG-16 encoder, max-unpooling decoder (Badrinarayanan et al. 2017)", "msff", SegNet)
_register("unet", "U-Net (Ronneberger et al. 2015), BN, same padding", "msff", UNet)
_register("deeplabv3plus", "DeepLabV3+ (Chen et al. 2018), ResNet-101 backbone", "msff", DeepLabV3Plus,
          dict(backbone="resnet101"))
for _bb, _label in (("resnet101", "ResNet-101"), ("resnet50", "ResNet-50"), ("vgg16", "VGG-16")):
    _register(f"deeplabv3plus-{_bb}", f"DeepLabV3+ (Chen et al. 2018), {_label} backbone", "msff", DeepLabV3Plus,
              dict(backbone=_bb))
for _bb, _label in (("resnet50", "ResNet-50"), ("resnet101", "ResNet-101")):
    _register(f"{_bb}-skip", f"MSFFNet decoder and skip connections on a {_label} encoder (paper Table 2)",
              "msff", ResNetSkipNet, dict(backbone=_bb))
    _register(f"tv-fcn-{_bb}", f"torchvision fcn_{_bb} (dilated {_label} + FCN head)", "torchvision",
              _torchvision(f"fcn_{_bb}"), requires="torchvision", wm=False)
    _register(f"tv-deeplabv3-{_bb}", f"torchvision deeplabv3_{_bb}", "torchvision",
              _torchvision(f"deeplabv3_{_bb}"), requires="torchvision", wm=False)
_register("smp-unet", "segmentation_models_pytorch Unet (encoder_name, default resnet34)",
          "segmentation_models_pytorch", _smp("Unet"), dict(encoder_name="resnet34"),
          requires="segmentation_models_pytorch", wm=False)
_register("smp-deeplabv3plus", "segmentation_models_pytorch DeepLabV3Plus (encoder_name, default resnet101)",
          "segmentation_models_pytorch", _smp("DeepLabV3Plus"), dict(encoder_name="resnet101"),
          requires="segmentation_models_pytorch", wm=False)


def available_models(include_uninstalled: bool = False) -> list[str]:
    """Sorted zoo names; those needing an uninstalled library are left out unless asked for.

    Example:
        >>> "msffnet" in available_models()
        True
    """
    return sorted(n for n, i in _REGISTRY.items() if include_uninstalled or i.installed)


def model_info(name: str) -> ModelInfo:
    """The :class:`ModelInfo` of a zoo name (raises ValueError for unknown names)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose from {available_models(include_uninstalled=True)}")
    return _REGISTRY[name]


def create_model(name: str, in_channels: int, classes: int = 1, **kwargs) -> nn.Module:
    """Build a zoo network with random weights.

    Args:
        name: a zoo name (see :func:`available_models` and the module docstring).
        in_channels: input bands.
        classes: output channels (1: binary landslide logits).
        **kwargs: network arguments, e.g. ``width_multiplier=0.25`` (msff networks),
            ``backend="reference"`` (MSFFNet variants), ``encoder_name="resnet50"`` (smp).
            They override the name's defaults (e.g. ``msffnet-baseline`` sets ``use_lkam=False,
            use_aspp=False``).

    Returns:
        The network, with ``zoo_name`` and ``zoo_kwargs`` attributes recording how it was built
        (what :func:`save_model` stores). Shapes: (N, in_channels, H, W) → (N, classes, H, W).

    Raises:
        ValueError: unknown name, or ``width_multiplier`` for a fixed-width library network.
        ImportError: the name needs a library that is not installed (``pip install msff[zoo]``).

    Example:
        >>> m = create_model("msffnet-lkam", 3, width_multiplier=0.125, kernel_size=7, lkam_blocks=1)
        >>> m.config["use_aspp"], m.zoo_name
        (False, 'msffnet-lkam')
    """
    info = model_info(name)
    if not info.installed:
        raise ImportError(
            f"model {name!r} wraps {info.implementation}, which is not installed; "
            f"install it with `pip install 'msff[zoo]'`"
        )
    if not info.width_multiplier and kwargs.get("width_multiplier", 1.0) != 1.0:
        raise ValueError(f"model {name!r} ({info.implementation}) has fixed widths; width_multiplier is not supported")
    kwargs = {k: v for k, v in kwargs.items() if info.width_multiplier or k != "width_multiplier"}
    cfg = dict(info.defaults)
    cfg.update(kwargs)
    model = info.builder(in_channels=in_channels, classes=classes, **cfg)
    model.zoo_name = name
    model.zoo_kwargs = dict(in_channels=int(in_channels), classes=int(classes), **cfg)
    return model


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters.

    Example:
        >>> count_parameters(torch.nn.Conv2d(3, 8, 3))
        224
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def save_model(model: nn.Module, directory: str | os.PathLike, metadata: "ModelCard | dict | None" = None) -> Path:
    """Save a zoo network: the same as ``model.save_pretrained(directory, card)``
    (:meth:`msff.models.base.SegmentationModel.save_pretrained`; one checkpoint format for every
    network), with ``card.model_name`` set to the zoo name.

    Args:
        model: any msff network (from :func:`create_model` or built from its class).
        directory: target folder (replaced, atomically, if it exists).
        metadata: the :class:`~msff.models.card.ModelCard`, or an old-style metadata dict.

    Returns:
        The checkpoint folder.

    Example:
        >>> import tempfile, pathlib
        >>> m = create_model("segnet", 3, width_multiplier=0.125)
        >>> path = save_model(m, pathlib.Path(tempfile.mkdtemp()) / "segnet", {"threshold": 0.5})
        >>> load_model(path)[1]["model_name"]
        'segnet'
    """
    if not isinstance(model, SegmentationModel):
        raise ValueError(f"save_model needs an msff network (a SegmentationModel), got {type(model).__name__}")
    card = ModelCard.from_dict(metadata, f"metadata for {directory}")
    name = model.zoo_name or card.model_name or type(model).__name__.lower()
    if card.model_name is None:
        card = card.replace(model_name=name)
    if model.zoo_name is None and card.model_name in _REGISTRY:
        model.zoo_name = card.model_name
    return model.save_pretrained(directory, card)


def load_model(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Load any msff checkpoint folder (this format, or those of older versions).

    Weights are read with ``torch.load(weights_only=True)``: no code is unpickled.

    Args:
        directory: checkpoint folder.
        map_location: device for the weights.

    Returns:
        ``(model, metadata)``: the model in eval mode (its typed card is ``model.card``) and the
        card as a plain dict (``metadata["model_name"]`` is its zoo name).

    Raises:
        FileNotFoundError: missing folder or files. CheckpointError: corrupt or mismatched files.
    """
    model = SegmentationModel.from_pretrained(directory, map_location=map_location)
    if model.card.model_name is None:
        model.card = model.card.replace(model_name=model.zoo_name or type(model).__name__.lower())
    if model.zoo_name is None:
        model.zoo_name = model.card.model_name
    return model, model.card.to_dict()
