"""Synthetic landslide-like scenes: a small labelled dataset built on the spot (no download), for
the demo and tests.

Each scene is vegetated terrain (smooth noise in greens and browns, shaded by a random
illumination of a random height field) with 0–3 landslide scars: elongated, irregular bright
bare-soil bodies with a rough texture, plus distractors that are *not* landslides (a road, a
rectangular bare field, dark water), so a model must learn shape and texture, not only colour.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["make_scene", "write_scene_dataset"]


def _smooth_noise(rng: np.random.Generator, h: int, w: int, scale: float) -> np.ndarray:
    f = np.fft.rfft2(rng.standard_normal((h, w)))
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    f *= np.exp(-((fx**2 + fy**2) * (scale**2)) * 2)
    n = np.fft.irfft2(f, s=(h, w))
    return (n - n.mean()) / (n.std() + 1e-8)


def make_scene(rng: np.random.Generator, size: int = 128, max_slides: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic scene.

    Args:
        rng: numpy generator.
        size: height and width in pixels.
        max_slides: most landslide bodies in the scene.

    Returns:
        ``(image, mask)``: uint8 (3, size, size) RGB and uint8 (size, size) 0/1.

    Example:
        >>> import numpy as np
        >>> img, mask = make_scene(np.random.default_rng(0), 64)
        >>> img.shape, mask.shape
        ((3, 64, 64), (64, 64))
    """
    h = w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    height = _smooth_noise(rng, h, w, size / 6)
    gy, gx = np.gradient(height)
    az = rng.uniform(0, 2 * np.pi)
    shade = 1.0 + 0.25 * (np.cos(az) * gx + np.sin(az) * gy) * size / 16
    veg = _smooth_noise(rng, h, w, size / 10)
    fine = rng.standard_normal((h, w)) * 0.05
    base = np.array([70, 100, 50], np.float32) + rng.uniform(-15, 15, 3)
    dry = np.array([110, 105, 70], np.float32)
    mix = np.clip(0.5 + 0.25 * veg, 0, 1)[None]
    img = (base[:, None, None] * (1 - mix) + dry[:, None, None] * mix) * (shade + fine)[None]
    # Distractors (background class).
    if rng.random() < 0.6:  # road: a thin bright curve
        a, b = rng.uniform(-0.6, 0.6), rng.uniform(0.2, 0.8) * h
        curve = b + a * xx + 6 * np.sin(xx / rng.uniform(8, 20))
        road = np.abs(yy - curve) < rng.uniform(1.0, 2.0)
        img[:, road] = np.array([170, 165, 150], np.float32)[:, None]
    if rng.random() < 0.5:  # field: a sharp-edged rectangle of bare soil, smooth texture
        y0, x0 = rng.integers(0, h * 3 // 4), rng.integers(0, w * 3 // 4)
        fh, fw = rng.integers(h // 10, h // 4), rng.integers(w // 10, w // 4)
        img[:, y0 : y0 + fh, x0 : x0 + fw] = np.array([150, 125, 90], np.float32)[:, None, None]
    if rng.random() < 0.4:  # water: a dark smooth blob
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(h / 12, h / 6)
        water = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        img[:, water] = np.array([35, 50, 60], np.float32)[:, None]
    mask = np.zeros((h, w), np.uint8)
    for _ in range(rng.integers(0, max_slides + 1)):
        cy, cx = rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w
        length, width = rng.uniform(0.12, 0.35) * h, rng.uniform(0.04, 0.10) * h
        th = rng.uniform(0, np.pi)
        u = (xx - cx) * np.cos(th) + (yy - cy) * np.sin(th)
        v = -(xx - cx) * np.sin(th) + (yy - cy) * np.cos(th)
        # Wider at the toe than at the scarp: width grows along the body.
        wid = width * (0.6 + 0.8 * np.clip((u / length + 1) / 2, 0, 1))
        edge = 0.35 * _smooth_noise(rng, h, w, size / 20)
        body = (u / length) ** 2 + (v / wid) ** 2 < 1 + edge
        mask |= body.astype(np.uint8)
    if mask.any():
        soil = np.array([185, 160, 125], np.float32) + rng.uniform(-20, 20, 3)
        rough = 1 + 0.12 * rng.standard_normal((h, w)) + 0.1 * _smooth_noise(rng, h, w, 3)
        m = mask.astype(bool)
        img[:, m] = (soil[:, None] * rough[m][None]) * shade[m][None]
    img += rng.normal(0, 3, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), mask


def write_scene_dataset(root: str | os.PathLike, n: int, size: int = 128, seed: int = 0) -> Path:
    """Write ``n`` scenes as ``root/images/scene_XXXX.png`` (RGB) and ``root/masks/scene_XXXX.png``
    (0/255), the folder layout :func:`msff.data.find_pairs` reads.

    Args:
        root: output folder (created).
        n: number of scenes.
        size: scene size in pixels.
        seed: generator seed (same seed, same files).

    Returns:
        ``root``.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     root = write_scene_dataset(d, n=4, size=64)
        ...     sorted(p.name for p in (root / "images").iterdir())[:2]
        ['scene_0000.png', 'scene_0001.png']
    """
    import warnings

    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    warnings.filterwarnings("ignore", category=NotGeoreferencedWarning)
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        img, mask = make_scene(rng, size)
        name = f"scene_{i:04d}.png"
        with rasterio.open(root / "images" / name, "w", driver="PNG", width=size, height=size, count=3, dtype="uint8") as dst:
            dst.write(img)
        with rasterio.open(root / "masks" / name, "w", driver="PNG", width=size, height=size, count=1, dtype="uint8") as dst:
            dst.write(mask[None] * 255)
    return root
