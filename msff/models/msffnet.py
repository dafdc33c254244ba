"""MSFFNet: large-kernel attention + multi-scale feature fusion network (Yi & Tan 2025)."""
from __future__ import annotations

import json
import numbers
import os
import pickle
import shutil
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from msff.backend import _check_name
from msff.fileio import make_temp_dir, publish_dir
from msff.models.blocks import ASPP, DecoderBlock, LKAMLayer, VGGLayer
from msff.models.card import CheckpointError

__all__ = ["MSFFNet", "apply_activation", "load_weights_file", "MSFFEncoder", "CheckpointError", "PAPER_CHANNELS", "CONFIG_NAME", "WEIGHTS_NAME"]

PAPER_CHANNELS = (64, 128, 256, 512, 1024)
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.pt"
FORMAT_VERSION = 1
_DOWNSAMPLE = 16  # four stride-2 max-pools


def _scaled(channels: Sequence[int], mult: float) -> tuple[int, ...]:
    if mult <= 0:
        raise ValueError(f"width_multiplier must be > 0, got {mult}")
    return tuple(max(4, int(round(c * mult))) for c in channels)


class MSFFEncoder(nn.Module):
    """E1…E5 of MSFFNet.

    E1, E2: LKAM layers (or VGG 3×3 layers when ``use_lkam=False``); E3, E4: VGG-16 3×3 layers
    (3 convs); max-pool stride 2 after E1…E4; E5: a 3×3 conv layer followed by ASPP (or a plain
    3×3 layer of the same width when ``use_aspp=False``).

    ``forward`` returns the pre-pool features of E1…E4 (the skips, at 1, 1/2, 1/4, 1/8 of the input)
    and E5's output at 1/16. The paper's Table 1 lists the pooled outputs: for 512×512×3 they are
    256²×64, 128²×128, 64²×256, 32²×512 (outputs of ``pools[0..3]``) and ASPP 32²×1024.
    """

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int],
        kernel_size: int,
        reduction: int,
        lkam_blocks: int,
        aspp_rates: Sequence[int],
        use_lkam: bool,
        use_aspp: bool,
        backend: str,
    ):
        super().__init__()
        c1, c2, c3, c4, c5 = channels
        if use_lkam:
            self.e1: nn.Module = LKAMLayer(in_channels, c1, kernel_size, reduction, lkam_blocks, backend)
            self.e2: nn.Module = LKAMLayer(c1, c2, kernel_size, reduction, lkam_blocks, backend)
        else:
            self.e1 = VGGLayer(in_channels, c1, num_convs=2)
            self.e2 = VGGLayer(c1, c2, num_convs=2)
        self.e3 = VGGLayer(c2, c3, num_convs=3)
        self.e4 = VGGLayer(c3, c4, num_convs=3)
        self.pools = nn.ModuleList([nn.MaxPool2d(2, 2) for _ in range(4)])
        if use_aspp:
            self.e5 = nn.Sequential(VGGLayer(c4, c4, num_convs=1), ASPP(c4, c5, aspp_rates))
        else:
            self.e5 = VGGLayer(c4, c5, num_convs=2)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips = []
        for stage, pool in zip((self.e1, self.e2, self.e3, self.e4), self.pools, strict=True):
            x = stage(x)
            skips.append(x)
            x = pool(x)
        skips.append(self.e5(x))
        return skips


class MSFFNet(nn.Module):
    """Multi-scale feature fusion network for landslide segmentation (Yi & Tan 2025).

    Encoder E1…E5 (:class:`MSFFEncoder`), decoder D4…D1 (stride-2 transposed convolutions, each
    fused with the same-scale encoder skip), 1×1 head giving ``classes`` logits at the input
    resolution. Inputs of any size work: they are padded (zeros) to a multiple of 16 inside and
    the logits are cropped back.

    Args:
        in_channels: input bands (1, 3, 4, 14, …).
        classes: output channels (1 for binary landslide logits).
        activation: None (logits, default), ``"sigmoid"``, ``"softmax"`` or a callable.
        channels: widths of E1…E5 (paper: 64, 128, 256, 512, 1024).
        width_multiplier: scales all widths (e.g. 0.25 for CPU-sized runs).
        kernel_size: k of the LKAM separable convolutions (paper: 15).
        reduction: SE reduction ratio (paper: 8).
        lkam_blocks: LKAM blocks per LKAM layer (paper: 3).
        aspp_rates: ASPP dilation rates (paper: 6, 12, 18).
        use_lkam: False replaces E1, E2 by VGG 3×3 layers (ablation "baseline"/"+ASPP").
        use_aspp: False replaces ASPP by a 3×3 layer (ablation "baseline"/"+LKAM").
        backend: kernel backend of the LKAM blocks (``auto``, ``reference``, ``triton``, ``cuda``).

    Shapes: (N, in_channels, H, W) → (N, classes, H, W).

    Example:
        >>> import torch
        >>> from msff import MSFFNet
        >>> model = MSFFNet(in_channels=3, classes=1, width_multiplier=0.125)
        >>> model(torch.randn(2, 3, 97, 123)).shape
        torch.Size([2, 1, 97, 123])
    """

    def __init__(
        self,
        in_channels: int = 3,
        classes: int = 1,
        activation: Any = None,
        channels: Sequence[int] = PAPER_CHANNELS,
        width_multiplier: float = 1.0,
        kernel_size: int = 15,
        reduction: int = 8,
        lkam_blocks: int = 3,
        aspp_rates: Sequence[int] = (6, 12, 18),
        use_lkam: bool = True,
        use_aspp: bool = True,
        backend: str = "auto",
    ):
        super().__init__()
        for key, val in (("in_channels", in_channels), ("classes", classes), ("kernel_size", kernel_size),
                         ("reduction", reduction), ("lkam_blocks", lkam_blocks)):
            if isinstance(val, bool) or not isinstance(val, numbers.Integral):
                raise ValueError(f"{key} must be an integer, got {val!r}")
        if isinstance(width_multiplier, bool) or not isinstance(width_multiplier, numbers.Real) or not width_multiplier > 0:
            raise ValueError(f"width_multiplier must be a number > 0, got {width_multiplier!r}")
        if in_channels < 1 or classes < 1:
            raise ValueError(f"in_channels and classes must be >= 1, got {in_channels}, {classes}")
        if len(channels) != 5:
            raise ValueError(f"channels must list 5 widths (E1…E5), got {len(channels)}")
        if isinstance(activation, str) and activation not in ("sigmoid", "softmax"):
            raise ValueError(f"activation must be None, 'sigmoid', 'softmax' or a callable, got {activation!r}")
        backend = _check_name(backend)
        self.config: dict[str, Any] = dict(
            in_channels=int(in_channels),
            classes=int(classes),
            activation=activation if (activation is None or isinstance(activation, str)) else None,
            channels=[int(c) for c in channels],
            width_multiplier=float(width_multiplier),
            kernel_size=int(kernel_size),
            reduction=int(reduction),
            lkam_blocks=int(lkam_blocks),
            aspp_rates=[int(r) for r in aspp_rates],
            use_lkam=bool(use_lkam),
            use_aspp=bool(use_aspp),
            backend=backend,
        )
        self._activation = activation
        self.metadata: dict[str, Any] = {}
        ch = _scaled(channels, width_multiplier)
        self.widths = ch
        self.encoder = MSFFEncoder(
            in_channels, ch, kernel_size, reduction, lkam_blocks, aspp_rates, use_lkam, use_aspp, backend
        )
        c1, c2, c3, c4, c5 = ch
        self.decoder = nn.ModuleList(
            [
                DecoderBlock(c5, c4, c4),  # D4: 1/16 → 1/8
                DecoderBlock(c4, c3, c3),  # D3: 1/8 → 1/4
                DecoderBlock(c3, c2, c2),  # D2: 1/4 → 1/2
                DecoderBlock(c2, c1, c1),  # D1: 1/2 → 1
            ]
        )
        self.head = nn.Conv2d(c1, classes, kernel_size=1)

    @property
    def backend(self) -> str:
        return self.config["backend"]

    def set_backend(self, backend: str) -> "MSFFNet":
        """Switch the kernel backend of every LKAM block (weights unchanged). Returns self."""
        backend = _check_name(backend)
        self.config["backend"] = backend
        for m in self.modules():
            if hasattr(m, "backend") and not isinstance(m, MSFFNet):
                m.backend = backend
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"MSFFNet expects a 4-D input (N, C, H, W), got {x.dim()}-D {tuple(x.shape)}")
        if x.shape[1] != self.config["in_channels"]:
            raise ValueError(
                f"MSFFNet was built for {self.config['in_channels']} input bands, got {x.shape[1]}"
            )
        h, w = x.shape[-2:]
        ph = (-h) % _DOWNSAMPLE
        pw = (-w) % _DOWNSAMPLE
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        feats = self.encoder(x)
        y = feats[-1]
        for block, skip in zip(self.decoder, reversed(feats[:-1]), strict=True):
            y = block(y, skip)
        y = self.head(y)
        if ph or pw:
            y = y[..., :h, :w]
        return self._activate(y)

    def _activate(self, y: torch.Tensor) -> torch.Tensor:
        return apply_activation(y, self._activation)

    # ---- persistence ----------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike, metadata: Optional[dict] = None) -> Path:
        """Write ``config.json`` and ``model.pt`` (a plain state dict) to ``directory``.

        Written into a temporary folder beside it and moved into place when complete, so an
        interrupted save never leaves a half-written checkpoint.

        Args:
            directory: target folder (created; an existing checkpoint there is replaced).
            metadata: JSON-serialisable extras stored in the config (e.g. normalisation stats).

        Returns:
            The checkpoint folder.
        """
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        cfg = {"format": "msff.MSFFNet", "format_version": FORMAT_VERSION, "config": self.config}
        if metadata:
            cfg["metadata"] = metadata
        tmp = make_temp_dir(directory)  # the umask's folder mode, owned by this process
        try:
            (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True))
            state = {k: v.detach().cpu() for k, v in self.state_dict().items()}
            torch.save(state, tmp / WEIGHTS_NAME)
            publish_dir(tmp, directory)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return directory

    @staticmethod
    def read_checkpoint_config(directory: str | os.PathLike) -> dict:
        """Read and validate ``config.json`` of a checkpoint folder (``config`` and ``metadata``)."""
        directory = Path(directory)
        if not directory.exists():
            raise FileNotFoundError(f"checkpoint folder not found: {directory}")
        cfg_path = directory / CONFIG_NAME if directory.is_dir() else directory
        if not cfg_path.is_file():
            raise FileNotFoundError(f"checkpoint {directory} has no {CONFIG_NAME}")
        try:
            cfg = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"checkpoint config {cfg_path} is corrupt: {e}") from None
        if not isinstance(cfg, dict) or cfg.get("format") != "msff.MSFFNet" or "config" not in cfg:
            raise CheckpointError(f"{cfg_path} is not an msff MSFFNet checkpoint config")
        if cfg.get("format_version", 0) > FORMAT_VERSION:
            raise CheckpointError(
                f"{cfg_path} has format_version {cfg['format_version']}, newer than this msff "
                f"supports ({FORMAT_VERSION}); upgrade msff"
            )
        return cfg

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu", **overrides
    ) -> "MSFFNet":
        """Build a model from ``save_pretrained`` output. Never unpickles code
        (``torch.load(weights_only=True)``).

        Args:
            directory: checkpoint folder.
            map_location: device for the weights.
            **overrides: constructor arguments to override (e.g. ``backend="triton"``); architecture
                arguments that change parameter shapes make loading fail with CheckpointError.

        Returns:
            The model in eval mode; ``model.metadata`` holds the stored metadata.

        Raises:
            FileNotFoundError: missing folder or files.
            CheckpointError: corrupt files, or weights that do not match the config.
        """
        directory = Path(directory)
        cfg = cls.read_checkpoint_config(directory)
        weights = directory / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"checkpoint {directory} has no {WEIGHTS_NAME}")
        kwargs = dict(cfg["config"])
        kwargs.update(overrides)
        try:
            model = cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"checkpoint {directory} has an invalid config: {e}") from None
        load_weights_file(model, weights, map_location)
        model.metadata = cfg.get("metadata", {})
        return model.eval()


def apply_activation(y: torch.Tensor, activation: Any) -> torch.Tensor:
    """Apply an smp-style output activation: None (logits), "sigmoid", "softmax" (dim 1) or a callable."""
    if activation is None:
        return y
    if activation == "sigmoid":
        return torch.sigmoid(y)
    if activation == "softmax":
        return torch.softmax(y, dim=1)
    return activation(y)


def load_weights_file(model: nn.Module, weights: Path, map_location: str | torch.device = "cpu") -> None:
    """Load a plain state-dict file into ``model`` without unpickling code
    (``torch.load(weights_only=True)``); every problem is one CheckpointError naming the file."""
    try:
        state = torch.load(weights, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's refusal comes with a hint to retry with weights_only=False: never for a checkpoint.
        if "GLOBAL" in str(e):
            raise CheckpointError(f"{weights} is not a valid msff checkpoint (it holds pickled Python objects, "
                                  "not only tensors); it was not loaded") from None
        raise CheckpointError(f"checkpoint weights {weights} are corrupt or unreadable (not a valid msff "
                              "checkpoint); it was not loaded") from None
    except Exception as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"checkpoint weights {weights} are corrupt or unreadable: {why}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint weights {weights} do not hold a state dict")
    load_state_dict_checked(model, state, source=str(weights))


def load_state_dict_checked(model: nn.Module, state: dict, source: str = "state dict") -> None:
    """``model.load_state_dict(state)`` with one clear CheckpointError listing every mismatch."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {shapes[:3]})")
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(parts))
    model.load_state_dict(state)
