"""The one checkpoint format of every msff network, and readers for the older ones.

A checkpoint is a folder with two files:

* ``config.json``: ``{"format": "msff.model", "format_version": 2, "class": <the network class>,
  "init_args": <its constructor arguments>, "model_name": <zoo name or null>, "card": <the
  model card>}``;
* ``model.pt``: a plain state dict of tensors, read with ``torch.load(weights_only=True)`` (no code
  is ever unpickled).

It is written into a temporary folder beside the target and moved into place when complete
(:func:`msff.fileio.publish_dir`), so an interrupted save never leaves half a checkpoint and an
older checkpoint at the same place is replaced only by a complete one.

Folders written before this format (``"format": "msff.MSFFNet"`` by ``MSFFNet.save_pretrained``,
``"format": "msff.zoo"`` by ``msff.models.zoo.save_model``, both version 1) are read as well;
anything else fails with one :class:`CheckpointError` line naming the file.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from msff.fileio import make_temp_dir, publish_dir
from msff.models.card import CheckpointError, ModelCard

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "FORMAT",
    "FORMAT_VERSION",
    "CheckpointError",
    "CheckpointConfig",
    "read_checkpoint_config",
    "write_checkpoint",
    "load_weights_file",
    "load_state_dict_checked",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.pt"
FORMAT = "msff.model"
FORMAT_VERSION = 2
_LEGACY_MSFFNET = "msff.MSFFNet"
_LEGACY_ZOO = "msff.zoo"


@dataclass
class CheckpointConfig:
    """``config.json`` of a checkpoint, in any format msff has written, read into one shape.

    Attributes:
        path: the ``config.json`` file.
        class_name: the network class (``"msff.models.unet.UNet"``), or None when the network is
            rebuilt by its zoo name (library wrappers, old zoo checkpoints).
        init_args: constructor arguments (for a zoo rebuild: ``create_model`` arguments, with
            ``in_channels`` and ``classes``).
        model_name: zoo name, if any.
        card: the :class:`~msff.models.card.ModelCard`.
        format: the format the file was written in (``msff.model``, or a legacy one).
    """

    path: Path
    class_name: Optional[str]
    init_args: dict
    model_name: Optional[str]
    card: ModelCard
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    raw: dict = field(default_factory=dict, repr=False)


def _config_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint folder not found: {path}")
    cfg_path = path / CONFIG_NAME if path.is_dir() else path
    if not cfg_path.is_file():
        raise FileNotFoundError(f"checkpoint {path} has no {CONFIG_NAME}")
    return cfg_path


def _version(cfg: dict, newest: int, cfg_path: Path) -> int:
    v = cfg.get("format_version", 0)
    if isinstance(v, bool) or not isinstance(v, int):
        raise CheckpointError(f"{cfg_path}: format_version must be an integer, got {v!r}")
    if v > newest:
        raise CheckpointError(
            f"{cfg_path} has format_version {v}, newer than this msff supports ({newest}); upgrade msff"
        )
    return v


def _dict_entry(cfg: dict, key: str, cfg_path: Path) -> dict:
    v = cfg.get(key)
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise CheckpointError(f"{cfg_path}: {key!r} must be a dict, got {type(v).__name__}")
    return v


def read_checkpoint_config(path: str | os.PathLike) -> CheckpointConfig:
    """Read and validate a checkpoint's ``config.json`` (this format or a legacy one).

    Args:
        path: checkpoint folder, or its ``config.json``.

    Raises:
        FileNotFoundError: no such folder, or no ``config.json`` in it.
        CheckpointError: unreadable JSON, an unknown format, or a malformed entry (one line naming
            the file).
    """
    cfg_path = _config_path(path)
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint config {cfg_path} is corrupt: {e}") from None
    fmt = cfg.get("format") if isinstance(cfg, dict) else None
    src = str(cfg_path)
    if fmt == FORMAT:
        version = _version(cfg, FORMAT_VERSION, cfg_path)
        class_name, model_name = cfg.get("class"), cfg.get("model_name")
        if class_name is not None and not isinstance(class_name, str):
            raise CheckpointError(f"{cfg_path}: 'class' must be a string, got {class_name!r}")
        if model_name is not None and not isinstance(model_name, str):
            raise CheckpointError(f"{cfg_path}: 'model_name' must be a string, got {model_name!r}")
        if class_name is None and model_name is None:
            raise CheckpointError(f"{cfg_path} names neither a network class nor a zoo model")
        card = ModelCard.from_dict(_dict_entry(cfg, "card", cfg_path), src)
        return CheckpointConfig(cfg_path, class_name, _dict_entry(cfg, "init_args", cfg_path), model_name, card,
                                fmt, version, cfg)
    if fmt == _LEGACY_MSFFNET and "config" in cfg:
        version = _version(cfg, 1, cfg_path)
        meta = _dict_entry(cfg, "metadata", cfg_path)
        card = ModelCard.from_dict(meta, src)
        name = card.model_name or "msffnet"
        if card.model_name is None:
            card = card.replace(model_name=name)
        return CheckpointConfig(cfg_path, "msff.models.msffnet.MSFFNet", _dict_entry(cfg, "config", cfg_path), name,
                                card, fmt, version, cfg)
    if fmt == _LEGACY_ZOO:
        version = _version(cfg, 1, cfg_path)
        name = cfg.get("model_name")
        ins, classes = cfg.get("in_channels"), cfg.get("classes")
        if not isinstance(name, str) or not isinstance(ins, int) or not isinstance(classes, int):
            raise CheckpointError(f"{cfg_path}: an msff.zoo checkpoint needs 'model_name', 'in_channels' and 'classes'")
        meta = dict(_dict_entry(cfg, "metadata", cfg_path))
        meta.setdefault("model_name", name)
        init = dict(_dict_entry(cfg, "kwargs", cfg_path), in_channels=ins, classes=classes)
        return CheckpointConfig(cfg_path, None, init, name, ModelCard.from_dict(meta, src), fmt, version, cfg)
    raise CheckpointError(f"{cfg_path} is not an msff checkpoint config (format {fmt!r})")


def write_checkpoint(directory: str | os.PathLike, config: dict, state: dict) -> Path:
    """Write ``config`` (JSON) and ``state`` (tensors) as a checkpoint folder, atomically.

    Everything is validated (JSON-serialised) before anything is created on disk.
    """
    directory = Path(directory)
    try:
        text = json.dumps(config, indent=2, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint config for {directory} is not JSON-serialisable: {e}") from None
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(directory)  # the umask's folder mode, owned by this process
    try:
        (tmp / CONFIG_NAME).write_text(text)
        torch.save({k: v.detach().cpu() for k, v in state.items()}, tmp / WEIGHTS_NAME)
        publish_dir(tmp, directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return directory


def load_weights_file(model: nn.Module, weights: Path, map_location: str | torch.device = "cpu",
                      renames: Sequence[tuple[str, str]] = ()) -> None:
    """Load a plain state-dict file into ``model`` without unpickling code
    (``torch.load(weights_only=True)``); every problem is one CheckpointError naming the file.

    ``renames``: ``(old_prefix, new_prefix)`` pairs for state dicts written before a submodule
    was renamed (see :func:`load_state_dict_checked`).
    """
    weights = Path(weights)
    if not weights.is_file():
        raise FileNotFoundError(f"checkpoint {weights.parent} has no {weights.name}")
    try:
        state = torch.load(weights, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's refusal comes with a hint to retry with weights_only=False: never for a checkpoint.
        if "GLOBAL" in str(e):
            raise CheckpointError(f"{weights} is not a valid msff checkpoint (it holds pickled Python objects, "
                                  "not only tensors); it was not loaded") from None
        raise CheckpointError(f"checkpoint weights {weights} are corrupt or unreadable (not a valid msff "
                              "checkpoint); it was not loaded") from None
    except (RuntimeError, OSError, EOFError, ValueError, AttributeError, ImportError, IndexError, KeyError) as e:
        # torch.load reports a damaged zip/pickle as any of these; all mean "this file is not a checkpoint".
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"checkpoint weights {weights} are corrupt or unreadable: {why}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint weights {weights} do not hold a state dict")
    load_state_dict_checked(model, state, source=str(weights), renames=renames)


def _remap(state: dict, own: dict, renames: Sequence[tuple[str, str]]) -> dict:
    if not renames:
        return state
    out = {}
    for k, v in state.items():
        if k not in own:
            for old, new in renames:
                if k.startswith(old) and new + k[len(old):] in own:
                    k = new + k[len(old):]
                    break
        out[k] = v
    return out


def load_state_dict_checked(model: nn.Module, state: dict, source: str = "state dict",
                            renames: Sequence[tuple[str, str]] = ()) -> None:
    """``model.load_state_dict(state)`` with one clear CheckpointError listing every mismatch.

    Args:
        renames: ``(old_prefix, new_prefix)`` pairs; a key the model does not have is renamed by
            the first pair whose result it has (e.g. ``("head.", "segmentation_head.")``).
            Defaults to the model's ``_legacy_state_renames``.
    """
    own = model.state_dict()
    renames = tuple(renames) or tuple(getattr(model, "_legacy_state_renames", ()))
    state = _remap(state, own, renames)
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

