"""Effective receptive field (ERF) of a network's encoder stages (Luo et al., NeurIPS 2016).

The paper's argument (Yi & Tan 2025) is that 1×15 / 15×1 kernels with channel attention give the
encoder a large receptive field early. The *theoretical* receptive field says little (channel
attention pools the whole image, so every LKAM stage formally sees every pixel); the *effective*
one measures how the output actually depends on the input:

1. feed inputs x (standard normal noise by default, as Luo et al.; or real images);
2. for each encoder stage, take the stage output's centre pixel summed over channels,
   y = Σ_c f_c(x)[h/2, w/2], and back-propagate: g = ∂y/∂x;
3. the ERF map is E = mean over inputs of Σ_bands |g| (an (H, W) map of gradient mass);
4. report the radius (Euclidean, in input pixels, around the input position of the centre
   pixel) that holds 50 % and 90 % of the mass, and the support (bounding box of E > 0).

Models are in eval mode (BatchNorm uses its running statistics, so images do not interact).
At random initialisation the BatchNorm statistics are the defaults (mean 0, var 1).

Encoder stages are found by model class (:func:`encoder_stages`): MSFFNet E1…E5 (E5 includes
ASPP when present), U-Net E1…E5, DeepLabV3+ stem, layer1…layer4 and ASPP (ResNet; VGG: its five
stages and ASPP), ResNet-skip stem and layer1…layer4; any model with explicit module names.

Example:
    >>> from msff.models.zoo import create_model
    >>> m = create_model("msffnet-baseline", in_channels=3, width_multiplier=0.0625)
    >>> r = effective_receptive_field(m, size=64, n_inputs=2)
    >>> [s["name"] for s in r["stages"]], r["stages"][0]["support"]   # E1: two 3×3 convs
    (['E1', 'E2', 'E3', 'E4', 'E5'], [5, 5])
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["effective_receptive_field", "encoder_stages", "mass_radius", "plot_erf", "add_erf_parser", "run_erf"]


class _StopForward(Exception):
    """Raised by the last stage's hook: the decoder is not needed."""


def encoder_stages(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The encoder stages of a known network, in input-to-output order.

    Returns:
        ``[(name, module), ...]``; the ERF of each module's output is measured.

    Raises:
        ValueError: a model class without a known stage list (pass module names instead).
    """
    from msff.models.backbones import ResNetEncoder, VGG16Encoder
    from msff.models.deeplabv3plus import DeepLabV3Plus
    from msff.models.msffnet import MSFFNet
    from msff.models.resnet_skip import ResNetSkipNet
    from msff.models.unet import UNet

    def resnet(enc: ResNetEncoder) -> list[tuple[str, nn.Module]]:
        # enc.relu is used once, on the stem (the bottlenecks have their own).
        return [("stem", enc.relu), ("layer1", enc.layer1), ("layer2", enc.layer2), ("layer3", enc.layer3),
                ("layer4", enc.layer4)]

    if isinstance(model, MSFFNet):
        e = model.encoder
        return [("E1", e.e1), ("E2", e.e2), ("E3", e.e3), ("E4", e.e4), ("E5", e.e5)]
    if isinstance(model, UNet):
        return [(f"E{i + 1}", m) for i, m in enumerate(model.encoder)]
    if isinstance(model, DeepLabV3Plus):
        if isinstance(model.encoder, VGG16Encoder):
            stages = [(f"stage{i + 1}", m) for i, m in enumerate(model.encoder.stages)]
        else:
            stages = resnet(model.encoder)
        return stages + [("ASPP", model.decoder.aspp)]
    if isinstance(model, ResNetSkipNet):
        return resnet(model.encoder)
    raise ValueError(
        f"no known encoder stages for {type(model).__name__}; name the modules to measure "
        "(e.g. stages=['encoder.layer1', ...], on the command line --stages)"
    )


def _in_channels(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    if isinstance(cfg, dict) and "in_channels" in cfg:
        return int(cfg["in_channels"])
    if hasattr(model, "in_channels"):
        return int(model.in_channels)
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is None:
        raise ValueError("cannot tell the model's input bands; pass in_channels")
    return int(first.in_channels)


def mass_radius(erf: np.ndarray, centre: tuple[float, float], fractions: Sequence[float] = (0.5, 0.9)) -> list[float]:
    """Smallest Euclidean radius around ``centre`` holding each fraction of the map's mass.

    Args:
        erf: (H, W) non-negative map.
        centre: (row, column), may be fractional.
        fractions: mass fractions in (0, 1].

    Returns:
        One radius per fraction (a pixel distance; NaN for an all-zero map).

    Example:
        >>> m = np.zeros((1, 15)); m[0, :] = 1.0
        >>> mass_radius(m, (0, 7))   # 9 of 15 pixels hold ≥ 50 %, 15 of 15 ≥ 90 %
        [4.0, 7.0]
    """
    e = np.asarray(erf, dtype=np.float64)
    total = e.sum()
    if not total > 0:
        return [float("nan")] * len(fractions)
    yy, xx = np.indices(e.shape)
    d = np.hypot(yy - centre[0], xx - centre[1]).ravel()
    order = np.argsort(d, kind="stable")
    d, cum = d[order], np.cumsum(e.ravel()[order])
    out = []
    for f in fractions:
        i = int(np.searchsorted(cum, f * total * (1 - 1e-12), side="left"))
        # Pixels at the same distance enter together: the radius is that distance.
        out.append(float(d[min(i, d.size - 1)]))
    return out


def effective_receptive_field(
    model: nn.Module,
    size: int = 256,
    n_inputs: int = 8,
    batch_size: int = 4,
    stages: Optional[Sequence[str] | Sequence[tuple[str, nn.Module]]] = None,
    inputs: Optional[torch.Tensor] = None,
    in_channels: Optional[int] = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    keep_maps: bool = True,
) -> dict:
    """Measure the ERF of every encoder stage.

    Args:
        model: the network (set to eval mode for the measurement and restored after).
        size: side of the square noise inputs (ignored with ``inputs``).
        n_inputs: number of noise inputs averaged over.
        batch_size: inputs per backward pass.
        stages: module names (``model.get_submodule`` paths) or ``(name, module)`` pairs;
            None: :func:`encoder_stages`.
        inputs: (N, C, H, W) images to use instead of noise (normalised as the model expects).
        in_channels: input bands (default: read from the model).
        seed: noise seed.
        device: where to run.
        keep_maps: return the (H, W) maps (for plotting).

    Returns:
        ``{"input_size": [H, W], "n_inputs", "stages": [{"name", "feature_size" [h, w],
        "stride", "centre" [row, col] in input pixels, "r50", "r90", "support" [rows, cols],
        "support_fraction" (share of the input with non-zero gradient)}], "maps": [(H, W) float64]}``.
    """
    if stages is None:
        named = encoder_stages(model)
    else:
        named = [(s, model.get_submodule(s)) if isinstance(s, str) else tuple(s) for s in stages]
    if inputs is None:
        c = in_channels if in_channels is not None else _in_channels(model)
        g = torch.Generator().manual_seed(int(seed))
        inputs = torch.randn(int(n_inputs), c, int(size), int(size), generator=g)
    if inputs.dim() != 4 or inputs.shape[0] < 1:
        raise ValueError(f"inputs must be (N, C, H, W) with N >= 1, got {tuple(inputs.shape)}")
    device = torch.device(device)
    was_training = model.training
    model.eval()
    H, W = inputs.shape[-2:]
    maps = [torch.zeros(H, W, dtype=torch.float64) for _ in named]
    sizes: list[Optional[tuple[int, int]]] = [None] * len(named)
    try:
        for s in range(0, inputs.shape[0], batch_size):
            x = inputs[s : s + batch_size].to(device).float().requires_grad_(True)
            feats: dict[int, torch.Tensor] = {}
            hooks = []
            for k, (_, mod) in enumerate(named):
                def hook(_m, _i, out, k=k, feats=feats):
                    feats[k] = out
                    if len(feats) == len(named):
                        raise _StopForward
                hooks.append(mod.register_forward_hook(hook))
            try:
                with torch.enable_grad():
                    model(x)
            except _StopForward:
                pass
            finally:
                for h in hooks:
                    h.remove()
            missing = [named[k][0] for k in range(len(named)) if k not in feats]
            if missing:
                raise ValueError(f"stage(s) {missing} did not run in the model's forward pass")
            for k in range(len(named)):
                f = feats[k]
                h, w = f.shape[-2:]
                sizes[k] = (int(h), int(w))
                y = f[:, :, h // 2, w // 2].sum()
                (grad,) = torch.autograd.grad(y, x, retain_graph=k < len(named) - 1)
                maps[k] += grad.detach().abs().sum(1).sum(0).double().cpu()
    finally:
        model.train(was_training)
    n = inputs.shape[0]
    out_stages = []
    for k, (name, _) in enumerate(named):
        m = (maps[k] / n).numpy()
        h, w = sizes[k]
        sy, sx = H / h, W / w
        centre = ((h // 2 + 0.5) * sy - 0.5, (w // 2 + 0.5) * sx - 0.5)
        r50, r90 = mass_radius(m, centre)
        nz = np.argwhere(m > 0)
        support = [int(nz[:, 0].max() - nz[:, 0].min() + 1), int(nz[:, 1].max() - nz[:, 1].min() + 1)] if nz.size else [0, 0]
        out_stages.append({"name": name, "feature_size": [h, w], "stride": round(float(sy), 4),
                           "centre": [float(centre[0]), float(centre[1])], "r50": r50, "r90": r90,
                           "support": support, "support_fraction": float((m > 0).mean())})
        maps[k] = m
    res = {"input_size": [int(H), int(W)], "n_inputs": int(n), "stages": out_stages}
    if keep_maps:
        res["maps"] = maps
    return res


def plot_erf(result: dict, path: str | os.PathLike, title: str = "") -> None:
    """Heat-map PNG: one panel per stage, log10 of the ERF map normalised to its maximum, with
    circles at the 50 % (dashed) and 90 % mass radii."""
    from msff.engine.report import _plt, atomic_write_bytes

    plt = _plt()
    stages, maps = result["stages"], result["maps"]
    n = len(stages)
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n, 3.0), dpi=90, squeeze=False)
    for ax, st, m in zip(axes[0], stages, maps, strict=True):
        peak = m.max()
        img = np.log10(np.maximum(m / peak, 1e-6)) if peak > 0 else np.full_like(m, -6.0)
        im = ax.imshow(img, cmap="magma", vmin=-6, vmax=0)
        cy, cx = st["centre"]
        for r, ls in ((st["r50"], "--"), (st["r90"], "-")):
            if math.isfinite(r):
                ax.add_patch(plt.Circle((cx, cy), r, fill=False, color="cyan", ls=ls, lw=1))
        ax.set_title(f"{st['name']} (/{st['stride']:g})\nr50 {st['r50']:.1f}  r90 {st['r90']:.1f} px", fontsize=8)
        ax.axis("off")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="log10 ERF / max")
    if title:
        fig.suptitle(title, fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


# ---- command line -------------------------------------------------------------------------------
def add_erf_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``msff erf MODEL_OR_CHECKPOINT`` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "erf", help="effective receptive field of each encoder stage (Luo et al. 2016)",
        description="Measure the effective receptive field of every encoder stage: the radius holding 50 %% / "
                    "90 %% of the gradient of the stage's centre pixel w.r.t. the input, averaged over "
                    "inputs; writes erf_<name>.json and erf_<name>.png. MODEL_OR_CHECKPOINT is a zoo name "
                    "(random init) or a checkpoint / run folder (trained weights).",
    )
    p.add_argument("model", metavar="MODEL_OR_CHECKPOINT", help="zoo name (e.g. msffnet, unet) or checkpoint folder")
    p.add_argument("--out", "-o", default=".", help="output folder (default: current)")
    p.add_argument("--size", type=int, default=256, help="input side in pixels")
    p.add_argument("--inputs", type=int, default=8, help="noise inputs averaged over")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--in-channels", type=int, default=3, help="input bands of a zoo model")
    p.add_argument("--width-multiplier", type=float, default=0.125, help="width of a zoo model")
    p.add_argument("--model-kwargs", default="{}", metavar="JSON", help="extra arguments of a zoo model")
    p.add_argument("--stages", default=None, metavar="NAMES", help="comma-separated module names to measure")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights (zoo model) and of the noise")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=run_erf)
    return p


def load_model_or_checkpoint(spec: str, in_channels: int = 3, width_multiplier: float = 0.125,
                             model_kwargs: Optional[dict] = None, seed: int = 0) -> tuple[nn.Module, str]:
    """A zoo name (random weights, seeded) or a checkpoint/run folder. Returns ``(model, label)``."""
    path = Path(spec)
    if path.exists():
        from msff.engine.train import load_checkpoint

        model, _ = load_checkpoint(path)
        label = (path.parent.name if path.name == "best" else path.name) or "checkpoint"
        return model, label
    from msff.models.zoo import available_models, create_model, model_info

    if spec not in available_models(include_uninstalled=True):
        raise ValueError(f"{spec!r} is neither a checkpoint folder nor a zoo model ({', '.join(available_models())})")
    kw = dict(model_kwargs or {})
    if model_info(spec).width_multiplier:
        kw.setdefault("width_multiplier", width_multiplier)
    torch.manual_seed(seed)
    return create_model(spec, in_channels=in_channels, **kw), spec


def run_erf(args: argparse.Namespace) -> int:
    """Entry point of ``msff erf``. Returns the process exit code."""
    from msff.engine.report import atomic_write_json

    try:
        kwargs = json.loads(args.model_kwargs)
        if not isinstance(kwargs, dict):
            raise ValueError("--model-kwargs must be a JSON object")
        if args.size < 8 or args.inputs < 1 or args.batch_size < 1:
            raise ValueError("--size must be >= 8, --inputs and --batch-size >= 1")
        model, label = load_model_or_checkpoint(args.model, args.in_channels, args.width_multiplier, kwargs, args.seed)
        stages = [s for s in args.stages.split(",") if s] if args.stages else None
        res = effective_receptive_field(model, args.size, args.inputs, args.batch_size, stages, seed=args.seed,
                                        device=args.device)
    except (OSError, ValueError, AttributeError) as e:
        print(f"msff erf: {args.model}: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    safe = label.replace(os.sep, "_")
    atomic_write_json(out / f"erf_{safe}.json", {"model": args.model, **{k: v for k, v in res.items() if k != "maps"}})
    plot_erf(res, out / f"erf_{safe}.png", title=f"{label}: ERF, {res['n_inputs']} inputs of {res['input_size']}")
    print(f"{label}: effective receptive field ({res['n_inputs']} noise inputs of {res['input_size'][0]}×"
          f"{res['input_size'][1]})")
    print(f"{'stage':<8} {'stride':>6} {'r50 px':>7} {'r90 px':>7} {'support':>9}")
    for s in res["stages"]:
        print(f"{s['name']:<8} {s['stride']:>6g} {s['r50']:>7.1f} {s['r90']:>7.1f} {s['support'][0]:>4}×{s['support'][1]:<4}")
    print(f"written: {out / f'erf_{safe}.json'}, {out / f'erf_{safe}.png'}")
    return 0
