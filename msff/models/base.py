"""The one base class of every msff network (MSFFNet and the comparison networks).

:class:`SegmentationModel` owns what every segmentation network shares, as
segmentation_models_pytorch's base class does:

* input checks (4-D, the band count it was built for), one clear message;
* pad-and-crop: any H, W is zero-padded (bottom, right) to the network's :attr:`input_multiple`
  and the logits are cropped back, written without Python control flow on tensor values so
  ``torch.fx.symbolic_trace``, ``torch.export`` and ``torch.compile`` see one graph;
* the output activation (``None`` = logits, ``"sigmoid"``, ``"softmax"`` or a callable);
* capability flags ``_is_torch_scriptable``, ``_is_torch_exportable``, ``_is_torch_compilable``
  and ``_is_fx_traceable``, each held to by ``tests/models/test_contract.py``. No msff network
  scripts (``forward`` takes any callable activation and the LKAM blocks dispatch to kernel
  backends by Python logic); all export, compile as one graph and trace with torch.fx;
* ``save_pretrained`` / ``from_pretrained`` in the one checkpoint format
  (:mod:`msff.models.checkpoint`): the constructor arguments are recorded when the model is built,
  so ``from_pretrained`` rebuilds the right class; the :class:`~msff.models.card.ModelCard`
  travels with the weights;
* the smp/torchgeo attribute names ``encoder``, ``decoder``, ``segmentation_head`` (so
  ``freeze_encoder()`` and torchgeo's freezing work the same on every network).

Subclasses implement :meth:`forward_logits` for inputs whose H and W are multiples of
:attr:`input_multiple`.
"""
from __future__ import annotations

import functools
import inspect
import numbers
import os
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from msff.models.card import CheckpointError, ModelCard
from msff.models.checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    WEIGHTS_NAME,
    load_weights_file,
    read_checkpoint_config,
    write_checkpoint,
)

__all__ = ["SegmentationModel", "apply_activation", "model_classes"]

_ACTIVATIONS = ("sigmoid", "softmax")


def apply_activation(y: torch.Tensor, activation: Any) -> torch.Tensor:
    """Apply an smp-style output activation: None (logits), "sigmoid", "softmax" (dim 1) or a callable.

    Example:
        >>> apply_activation(torch.zeros(1, 1, 2, 2), "sigmoid").unique().tolist()
        [0.5]
    """
    if activation is None:
        return y
    if activation == "sigmoid":
        return torch.sigmoid(y)
    if activation == "softmax":
        return torch.softmax(y, dim=1)
    return activation(y)


# The three helpers below are leaves for torch.fx (``torch.fx.wrap``): a symbolic trace records a
# call to them instead of tracing their shape arithmetic and checks, which need real sizes.
@torch.fx.wrap
def _check_input(x: torch.Tensor, in_channels: int, name: str) -> torch.Tensor:
    if x.dim() != 4:
        raise ValueError(f"{name} expects a 4-D input (N, C, H, W), got {x.dim()}-D {tuple(x.shape)}")
    if x.shape[1] != in_channels:
        raise ValueError(f"{name} was built for {in_channels} input bands, got {x.shape[1]}")
    return x


@torch.fx.wrap
def _pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    ph, pw = (-x.shape[-2]) % multiple, (-x.shape[-1]) % multiple
    return F.pad(x, (0, pw, 0, ph)) if (ph or pw) else x


@torch.fx.wrap
def _crop_like(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return y[..., : x.shape[-2], : x.shape[-1]]


def _check_int(key: str, val: Any) -> int:
    if isinstance(val, bool) or not isinstance(val, numbers.Integral) or val < 1:
        raise ValueError(f"{key} must be an integer >= 1, got {val!r}")
    return int(val)


def _jsonable(v: Any) -> Any:
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        return float(v)
    raise TypeError(f"{type(v).__name__} value {v!r}")


def _record_init_args(init):
    """Wrap a subclass ``__init__`` so the outermost call records its bound arguments."""
    sig = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        if "_init_args" not in self.__dict__:
            bound = sig.bind(self, *args, **kwargs)
            bound.apply_defaults()
            recorded = {}
            for name, value in list(bound.arguments.items())[1:]:
                kind = sig.parameters[name].kind
                if kind is inspect.Parameter.VAR_KEYWORD:
                    recorded.update(value)
                elif kind is inspect.Parameter.VAR_POSITIONAL:
                    if value:
                        recorded[name] = list(value)
                else:
                    recorded[name] = value
            self.__dict__["_init_args"] = recorded
        init(self, *args, **kwargs)

    return wrapper


_REGISTRY: dict[str, type] = {}


def model_classes() -> dict[str, type]:
    """Every :class:`SegmentationModel` subclass defined so far, by ``module.QualName``
    (what ``config.json`` records as ``class``)."""
    return dict(_REGISTRY)


def _resolve_class(name: str, source: Path) -> type:
    if name in _REGISTRY:
        return _REGISTRY[name]
    short = [c for n, c in _REGISTRY.items() if n.rsplit(".", 1)[-1] == name.rsplit(".", 1)[-1]]
    if len(short) == 1:  # the class moved to another module since the checkpoint was written
        return short[0]
    raise CheckpointError(f"{source} holds a {name!r}, which is not an msff network class")


class SegmentationModel(nn.Module):
    """Base class of every msff segmentation network.

    Args:
        in_channels: input bands (any count >= 1).
        classes: output channels (1: binary landslide logits).
        activation: None (logits, default), ``"sigmoid"``, ``"softmax"`` or a callable.

    Attributes:
        encoder, decoder, segmentation_head: the three parts (smp / torchgeo names).
        card: the :class:`~msff.models.card.ModelCard` (empty until trained or loaded).
        input_multiple: H and W are padded to a multiple of this inside ``forward``.

    Shapes: (N, in_channels, H, W) → (N, classes, H, W), any H, W.
    """

    input_multiple: int = 16
    _is_torch_scriptable: ClassVar[bool] = False
    _is_torch_exportable: ClassVar[bool] = True
    _is_torch_compilable: ClassVar[bool] = True
    #: ``torch.fx.symbolic_trace`` works (pad-and-crop and the checks are fx leaves, see above).
    _is_fx_traceable: ClassVar[bool] = True
    #: ``(old_prefix, new_prefix)`` renames applied when loading state dicts of older versions.
    _legacy_state_renames: ClassVar[tuple[tuple[str, str], ...]] = (("head.", "segmentation_head."),)
    #: Rebuild from the zoo name (``create_model``) instead of the class (library wrappers).
    _rebuild_from_zoo_name: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _REGISTRY[f"{cls.__module__}.{cls.__qualname__}"] = cls
        if "__init__" in cls.__dict__:
            cls.__init__ = _record_init_args(cls.__init__)

    def __init__(self, in_channels: int, classes: int = 1, activation: Any = None):
        super().__init__()
        self.in_channels = _check_int("in_channels", in_channels)
        self.classes = _check_int("classes", classes)
        if isinstance(activation, str) and activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be None, 'sigmoid', 'softmax' or a callable, got {activation!r}")
        if activation is not None and not isinstance(activation, str) and not callable(activation):
            raise ValueError(f"activation must be None, 'sigmoid', 'softmax' or a callable, got {activation!r}")
        self._activation = activation
        self.card = ModelCard()
        self.zoo_name: Optional[str] = None

    # ---- forward ---------------------------------------------------------------------------------
    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Logits for ``x`` whose H, W are multiples of :attr:`input_multiple`."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _check_input(x, self.in_channels, type(self).__name__)
        y = _crop_like(self.forward_logits(_pad_to_multiple(x, self.input_multiple)), x)
        return apply_activation(y, self._activation)

    @property
    def activation(self) -> Any:
        return self._activation

    # ---- parts -----------------------------------------------------------------------------------
    @property
    def head(self) -> nn.Module:
        """Old name of :attr:`segmentation_head` (kept for code written before the rename)."""
        return self.segmentation_head

    def freeze_encoder(self, frozen: bool = True) -> "SegmentationModel":
        """Stop (or restart) training the encoder's parameters, as torchgeo's ``freeze_backbone``
        does; batch-norm statistics keep updating in train mode. Returns self."""
        for p in self.encoder.parameters():
            p.requires_grad_(not frozen)
        return self

    # ---- metadata --------------------------------------------------------------------------------
    @property
    def metadata(self) -> ModelCard:
        """The model card read as the old metadata dict (a read-only Mapping); prefer :attr:`card`."""
        return self.card

    @metadata.setter
    def metadata(self, value) -> None:
        self.card = ModelCard.from_dict(value)

    @property
    def init_args(self) -> dict:
        """The constructor arguments this model was built with (what ``save_pretrained`` records)."""
        return dict(self.__dict__.get("_init_args", {}))

    def _checkpoint_init_args(self) -> tuple[Optional[str], dict]:
        if self._rebuild_from_zoo_name:
            if not self.zoo_name or not hasattr(self, "zoo_kwargs"):
                raise ValueError(f"{type(self).__name__} is saved by its zoo name: build it with create_model")
            return None, dict(self.zoo_kwargs)
        args = self.init_args
        if callable(args.get("activation")):
            args["activation"] = None  # a callable is not stored; set it again after loading
        return f"{type(self).__module__}.{type(self).__qualname__}", args

    # ---- persistence -----------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike, card: "ModelCard | dict | None" = None,
                        *, metadata: Optional[dict] = None) -> Path:
        """Write ``config.json`` (class, constructor arguments, model card) and ``model.pt`` (a
        plain state dict) to ``directory``.

        Written into a temporary folder beside it and moved into place when complete; an existing
        checkpoint there is replaced only by a complete one. Everything is validated before
        anything is written.

        Args:
            directory: target folder.
            card: the :class:`~msff.models.card.ModelCard` (or an old-style metadata dict) to store;
                default :attr:`card`. It becomes the model's :attr:`card`.
            metadata: old name of ``card``.

        Returns:
            The checkpoint folder.

        Example:
            >>> import tempfile, pathlib
            >>> from msff.models import UNet
            >>> m = UNet(3, width_multiplier=0.125)
            >>> path = m.save_pretrained(pathlib.Path(tempfile.mkdtemp()) / "unet", {"threshold": 0.4})
            >>> SegmentationModel.from_pretrained(path).card.threshold
            0.4
        """
        if card is not None and metadata is not None:
            raise ValueError("give card or metadata, not both")
        given = card if card is not None else metadata
        card = self.card if given is None else ModelCard.from_dict(given, f"card for {directory}")
        if card.model_name is None and self.zoo_name:
            card = card.replace(model_name=self.zoo_name)
        class_name, args = self._checkpoint_init_args()
        try:
            args = _jsonable(args)
        except TypeError as e:
            raise ValueError(f"{type(self).__name__} cannot be saved: a constructor argument is not JSON-able ({e})") from None
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "class": class_name,
            "init_args": args,
            "model_name": self.zoo_name,
            "card": card.to_dict(),
        }
        out = write_checkpoint(directory, config, self.state_dict())
        self.card = card
        return out

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu",
                        **overrides) -> "SegmentationModel":
        """Build a model from a checkpoint folder (any format msff has written). Never unpickles
        code (``torch.load(weights_only=True)``).

        Args:
            directory: checkpoint folder.
            map_location: device for the weights.
            **overrides: constructor arguments to override (e.g. ``backend="triton"``); arguments
                that change parameter shapes make loading fail with CheckpointError.

        Returns:
            The model in eval mode, with its :attr:`card` and ``zoo_name``.

        Raises:
            FileNotFoundError: missing folder or files.
            CheckpointError: corrupt files, a network of another class than ``cls``, or weights
                that do not match the config (one line naming the file).
        """
        directory = Path(directory)
        cfg = read_checkpoint_config(directory)
        folder = cfg.path.parent
        kwargs = dict(cfg.init_args)
        kwargs.update(overrides)
        if cfg.class_name is not None:
            klass = _resolve_class(cfg.class_name, cfg.path)
            if not issubclass(klass, cls):
                raise CheckpointError(f"{cfg.path} holds a {klass.__name__}, not a {cls.__name__}")
            build = functools.partial(klass, **kwargs)
        else:
            from msff.models.zoo import create_model, model_info

            try:
                info = model_info(cfg.model_name)
            except ValueError as e:
                raise CheckpointError(f"{cfg.path}: {e}") from None
            if not info.installed:
                raise CheckpointError(f"{cfg.path} holds a {cfg.model_name!r}, which needs {info.requires} "
                                      "(not installed; `pip install 'msff[zoo]'`)")
            build = functools.partial(create_model, cfg.model_name, **kwargs)
        try:
            model = build()
        except (TypeError, ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint {folder} has an invalid config: {e}") from None
        if not isinstance(model, cls):
            raise CheckpointError(f"{cfg.path} holds a {type(model).__name__}, not a {cls.__name__}")
        load_weights_file(model, folder / WEIGHTS_NAME, map_location)
        model.card = cfg.card
        if cfg.model_name is not None:
            model.zoo_name = cfg.model_name
        if not hasattr(model, "zoo_kwargs"):
            model.zoo_kwargs = dict(cfg.init_args)
        return model.eval()
