"""Finding image/mask pairs in a dataset folder.

A dataset root holds an image folder and a mask folder (auto-detected among common names:
``images``/``image``/``img``/``imgs`` and ``masks``/``mask``/``labels``/``label``/``gt``/
``annotations``). Images pair with masks by identical file stem, or, when the names differ
(``Landslide012.png`` ↔ ``LandslideLabel012.png``, ``image_7.h5`` ↔ ``mask_7.h5``), by the number
in the name.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from msff.data.io import H5_SUFFIXES, RASTER_SUFFIXES, DataError

__all__ = ["Pair", "find_pairs", "IMAGE_DIR_NAMES", "MASK_DIR_NAMES"]

IMAGE_DIR_NAMES = ("images", "image", "img", "imgs", "Images", "IMAGES")
MASK_DIR_NAMES = ("masks", "mask", "labels", "label", "gt", "annotations", "Masks", "Labels")
_SUFFIXES = RASTER_SUFFIXES + H5_SUFFIXES


@dataclass(frozen=True)
class Pair:
    """One sample: an image file and its mask file (None for unlabelled prediction inputs)."""

    image: Path
    mask: Optional[Path]

    @property
    def name(self) -> str:
        return self.image.stem


def _list(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _SUFFIXES and not p.name.startswith("."))


def _number_key(stem: str) -> Optional[str]:
    nums = re.findall(r"\d+", stem)
    return nums[-1].lstrip("0") or "0" if nums else None


def _shown(paths: list[Path]) -> str:
    return ", ".join(str(p) for p in paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")


def _subdir(root: Path, given: Optional[str], names: tuple[str, ...], what: str) -> Path:
    if given is not None:
        d = Path(given) if os.path.isabs(given) else root / given
        if not d.is_dir():
            raise DataError(f"{d}: {what} folder not found")
        return d
    for n in names:
        if (root / n).is_dir():
            return root / n
    raise DataError(
        f"{root}: no {what} folder found (looked for {', '.join(names[:6])}); "
        f"name it with --{what}-dir"
    )


def find_pairs(
    root: str | os.PathLike,
    image_dir: Optional[str] = None,
    mask_dir: Optional[str] = None,
    pair_by: str = "auto",
    require_masks: bool = True,
) -> list[Pair]:
    """List the image/mask pairs of a dataset folder.

    Args:
        root: dataset folder holding an image folder and a mask folder.
        image_dir, mask_dir: folder names (relative to ``root``, or absolute); None auto-detects.
        pair_by: ``"stem"`` (identical file stem), ``"number"`` (the last number in the stem, e.g.
            ``Landslide012`` ↔ ``LandslideLabel012``) or ``"auto"`` (stem, then number for the rest).
        require_masks: raise when an image has no mask (False: unlabelled images get ``mask=None``).

    Returns:
        Pairs sorted by image name.

    Raises:
        DataError: folders missing, empty, an image without a mask or (with ``require_masks``) a
            mask without an image (named, with the count), ambiguous numbers.

    Example:
        >>> import tempfile
        >>> from msff.data.synthetic import write_scene_dataset
        >>> with tempfile.TemporaryDirectory() as d:
        ...     pairs = find_pairs(write_scene_dataset(d, n=2, size=32))
        ...     len(pairs), pairs[0].image.name, pairs[0].mask.name
        (2, 'scene_0000.png', 'scene_0000.png')

        A real dataset (on disk), whose image and mask names differ by more than the folder:

        >>> pairs = find_pairs("/data/sichuan_landslide")   # doctest: +SKIP
        >>> pairs[0].image.name, pairs[0].mask.name         # doctest: +SKIP
        ('Landslide003.png', 'LandslideLabel003.png')
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: dataset folder not found")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder (a dataset is a folder with images/ and masks/)")
    if pair_by not in ("auto", "stem", "number"):
        raise ValueError(f"pair_by must be 'auto', 'stem' or 'number', got {pair_by!r}")
    idir = _subdir(root, image_dir, IMAGE_DIR_NAMES, "image")
    images = _list(idir)
    if not images:
        raise DataError(f"{idir}: no image files ({', '.join(_SUFFIXES)})")
    try:
        mdir = _subdir(root, mask_dir, MASK_DIR_NAMES, "mask")
    except DataError:
        if require_masks:
            raise
        return [Pair(p, None) for p in images]
    masks = _list(mdir)
    by_stem = {p.stem: p for p in masks}
    by_num: dict[str, list[Path]] = {}
    for p in masks:
        k = _number_key(p.stem)
        if k is not None:
            by_num.setdefault(k, []).append(p)
    pairs, missing = [], []
    used: set[Path] = set()
    for img in images:
        m = by_stem.get(img.stem) if pair_by in ("auto", "stem") else None
        if m is None and pair_by in ("auto", "number"):
            k = _number_key(img.stem)
            cands = [c for c in by_num.get(k, []) if c not in used] if k is not None else []
            if len(cands) > 1:
                raise DataError(
                    f"{img}: pairing by number is ambiguous: masks {[c.name for c in cands]} share its "
                    "number; pair by stem (--pair stem) or rename"
                )
            m = cands[0] if cands else None
        if m is None:
            missing.append(img)
            continue
        used.add(m)
        pairs.append(Pair(img, m))
    if missing and require_masks:
        raise DataError(f"{len(missing)} unpaired image(s) without a mask in {mdir} (pair_by={pair_by}): {_shown(missing)}")
    orphans = [m for m in masks if m not in used]
    if orphans and require_masks:
        # Symmetric with images: a mask whose image is missing or misnamed would silently drop a sample.
        raise DataError(
            f"{len(orphans)} unpaired mask(s) without an image in {idir} (pair_by={pair_by}): {_shown(orphans)}; "
            "add or rename the image, or move the mask out of the mask folder"
        )
    pairs += [Pair(p, None) for p in missing]
    return sorted(pairs, key=lambda p: p.image.name)
