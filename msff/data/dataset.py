"""Segmentation datasets: image/mask pairs → normalised tensors, with splits, normalisation
statistics and reproducible per-epoch augmentation."""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from msff.data.discover import Pair
from msff.data.io import IGNORE_INDEX, DataError, MaskEncoding, raster_shape, read_image, read_mask
from msff.data.normalization import Normalization
from msff.data.scaling import InputScale
from msff.data.transforms import Augment, pad_to, random_crop_affine

__all__ = [
    "SegmentationDataset",
    "EpochSampler",
    "collate",
    "compute_normalization",
    "normalization_stats",
    "fit_input_scale",
    "sample_pixels",
    "split_pairs",
    "read_list",
    "select_pairs",
]


class SegmentationDataset(Dataset):
    """Image/mask pairs as tensors.

    Each item is a dict: ``image`` float32 (C, H, W) normalised as ``(x - mean) / std`` (raw
    values when ``normalization`` is None), ``target`` uint8 (H, W) with 1 landslide, 0 background,
    255 ignore (nodata, padding), and ``name`` (the image stem).

    With ``crop`` and/or ``augment`` set (training), items are random crops of size ``crop`` with the
    paper's augmentations, drawn from a generator seeded by ``(seed, epoch, draw)`` so a seeded run
    repeats exactly, resumed or not and with any number of loader workers (use
    :class:`EpochSampler`, whose keys carry the draw and epoch numbers). Without them (evaluation),
    items are whole images.

    A dataset is not changed once built: :meth:`replace` gives a copy with other normalisation, input
    scale, crop, augmentation or seed (sharing the decoded files), which is what
    :class:`~msff.data.module.SegmentationDataModule` hands to training and evaluation.

    All files are checked when the dataset is built (existence, sizes, band counts, and with
    ``cache=True`` the full decode), so bad input fails before any training starts.

    Args:
        pairs: :class:`~msff.data.discover.Pair` list (masks required).
        encoding: :class:`~msff.data.io.MaskEncoding` of the masks.
        bands: 1-based band indices to read; None: all.
        crop: training crop size; None: whole images.
        augment: :class:`~msff.data.transforms.Augment`; None: no augmentation.
        normalization: :class:`~msff.data.normalization.Normalization` or ``{"mean": [...],
            "std": [...]}`` per band (in model-input units, i.e. after ``input_scale``), or None.
        input_scale: :class:`~msff.data.scaling.InputScale` (or its text form, e.g.
            ``"divide:10000"``) applied to raw values before normalisation; a percentile stretch
            is fitted on this dataset by :func:`compute_normalization` when not fitted yet.
        extra_rasters: rasters on any grid/CRS (e.g. a 30 m slope or DEM raster) whose bands are
            reprojected onto each georeferenced image's grid (bilinear; nearest for files with a
            colour table) and appended after the image bands, before terrain bands.
        dem, terrain: derived terrain bands (``slope``, ``hillshade``) computed from the DEM raster
            on each (georeferenced) image's grid and appended after the image bands
            (:mod:`msff.data.terrain`); stored in the model card so prediction builds the same stack.
        dates: names of the acquisition dates whose bands are channel-stacked in each image, in
            order (e.g. ``["pre", "post"]``: the first half of the bands is pre-event); stored in the
            model card, where prediction enforces the order.
        seed: augmentation seed.
        cache: read and decode every file now and keep them in memory (raw dtype).

    Example:
        >>> raw = SegmentationDataset(find_pairs("/data/bijie_landslide"))  # doctest: +SKIP
        >>> ds = raw.replace(normalization=normalization_stats(raw), crop=256, augment=Augment())  # doctest: +SKIP
        >>> item = ds[0]; item["image"].shape, item["target"].shape  # doctest: +SKIP
        (torch.Size([3, 256, 256]), torch.Size([256, 256]))
    """

    def __init__(
        self,
        pairs: Sequence[Pair],
        encoding: Optional[MaskEncoding] = None,
        bands: Optional[Sequence[int]] = None,
        crop: Optional[int] = None,
        augment: Optional[Augment] = None,
        normalization: Optional[dict] = None,
        seed: int = 0,
        cache: bool = True,
        input_scale: "InputScale | str | None" = None,
        dem: "str | os.PathLike | None" = None,
        terrain: Sequence[str] = (),
        dates: Optional[Sequence[str]] = None,
        extra_rasters: Sequence[str | os.PathLike] = (),
    ):
        if len(pairs) == 0:
            raise DataError("empty dataset: no image/mask pairs")
        self.pairs = list(pairs)
        self.encoding = encoding or MaskEncoding()
        self.bands = list(bands) if bands is not None else None
        self.crop = _check_crop(crop)
        self.augment = augment
        self._norm = Normalization.from_dict(normalization)
        self.input_scale = InputScale.parse(input_scale)
        from msff.data.terrain import check_terrain

        self.terrain = check_terrain(terrain or ())
        if self.terrain and dem is None:
            raise DataError(f"terrain bands {', '.join(self.terrain)} need a DEM raster (--dem DEM.tif)")
        self.dem = None if dem is None else Path(dem)
        if self.dem is not None and not self.dem.is_file():
            raise DataError(f"{self.dem}: DEM file not found")
        self.dates = list(dates) if dates else None
        self.extra_rasters = [Path(p) for p in extra_rasters or ()]
        for p in self.extra_rasters:
            if not p.is_file():
                raise DataError(f"{p}: extra raster not found")
        self._extra_count = sum(raster_shape(p)[0] for p in self.extra_rasters)
        self._file_dtype: Optional[str] = None
        self.seed = int(seed)
        self.epoch = 0
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        nimg = self._check_headers()
        self.in_channels = nimg + self._extra_count + len(self.terrain)
        if self.dates and nimg % len(self.dates):
            raise DataError(
                f"{len(self.dates)} dates ({', '.join(self.dates)}) do not divide the {nimg} image bands evenly"
            )
        if cache:
            for i in range(len(self.pairs)):
                self._cache[i] = self._read(i)

    def _check_headers(self) -> int:
        nb = None
        for p in self.pairs:
            if p.mask is None:
                raise DataError(f"{p.image}: no mask file paired with this image")
            c, h, w = raster_shape(p.image)
            if self.bands is not None:
                bad = [b for b in self.bands if b < 1 or b > c]
                if bad:
                    raise DataError(f"{p.image}: band(s) {bad} out of range; the file has {c} bands")
                c = len(self.bands)
            _, mh, mw = raster_shape(p.mask)
            if (mh, mw) != (h, w):
                raise DataError(f"{p.mask}: mask size {mw}x{mh} (WxH) differs from image {p.image.name} size {w}x{h}")
            if nb is None:
                nb, first = c, p.image
            elif c != nb:
                raise DataError(f"{p.image}: has {c} bands but {first.name} has {nb}; all images need the same bands")
        return int(nb)

    def _read(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if i in self._cache:
            return self._cache[i]
        p = self.pairs[i]
        img, valid = read_image(p.image, self.bands)
        self._file_dtype = self._file_dtype or str(img.dtype)
        if self.extra_rasters:
            from msff.data.terrain import raster_on_grid

            crs, transform = _grid_of(p.image)
            extra = []
            for er in self.extra_rasters:
                try:
                    extra.append(raster_on_grid(er, crs, transform, img.shape[2], img.shape[1]))
                except ValueError as e:
                    raise DataError(f"{p.image}: stacking {er.name}: {e}") from None
            extra = np.concatenate(extra)
            ev = np.all(np.isfinite(extra), axis=0)
            valid = ev if valid is None else (valid & ev)
            img = np.concatenate([img.astype(np.float32), np.nan_to_num(extra)], axis=0)
        if self.terrain:
            from msff.data.terrain import terrain_for_raster

            try:
                t = terrain_for_raster(p.image, self.dem, self.terrain)
            except ValueError as e:
                raise DataError(f"{p.image}: terrain bands: {e}") from None
            tv = np.all(np.isfinite(t), axis=0)
            valid = tv if valid is None else (valid & tv)
            img = np.concatenate([img.astype(np.float32), np.nan_to_num(t)], axis=0)
        tgt = read_mask(p.mask, self.encoding)
        if tgt.shape != img.shape[1:]:
            raise DataError(f"{p.mask}: mask size {tgt.shape[::-1]} differs from image {p.image.name} size {img.shape[:0:-1]}")
        if valid is not None:
            tgt = tgt.copy()
            tgt[~valid] = IGNORE_INDEX
        return img, tgt

    def __len__(self) -> int:
        return len(self.pairs)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of ``epoch`` for keys without an epoch (``(index, draw)``);
        :class:`EpochSampler` keys carry their epoch, so training does not call this."""
        self.epoch = int(epoch)

    #: What :meth:`replace` may change; everything else (files, bands, encoding, stack) stays.
    REPLACEABLE = ("normalization", "input_scale", "crop", "augment", "seed")

    def replace(self, **changes) -> "SegmentationDataset":
        """A copy with other ``normalization``, ``input_scale``, ``crop``, ``augment`` or ``seed``
        (this dataset is left as it is; the decoded files are shared, not read again).

        Example:
            >>> train = raw.replace(crop=256, augment=Augment(), seed=3)  # doctest: +SKIP
        """
        unknown = sorted(set(changes) - set(self.REPLACEABLE))
        if unknown:
            raise TypeError(f"replace() can change {', '.join(self.REPLACEABLE)}; not {unknown}")
        new = copy.copy(self)
        if "normalization" in changes:
            new._norm = Normalization.from_dict(changes["normalization"])
        if "input_scale" in changes:
            new.input_scale = InputScale.parse(changes["input_scale"])
        if "crop" in changes:
            new.crop = _check_crop(changes["crop"])
        if "augment" in changes:
            new.augment = changes["augment"]
        if "seed" in changes:
            new.seed = int(changes["seed"])
        if new._norm is not None and new._norm.bands != new.in_channels:
            raise DataError(f"normalisation has {new._norm.bands} band(s), the images {new.in_channels}")
        return new

    @property
    def normalization(self) -> Optional[dict]:
        """``{"mean": [...], "std": [...]}`` (the form stored in checkpoints), or None."""
        return None if self._norm is None else self._norm.to_dict()

    @normalization.setter
    def normalization(self, value) -> None:
        # Kept for existing callers; msff itself builds datasets with replace() and never sets this.
        self._norm = Normalization.from_dict(value)

    @property
    def normalizer(self) -> Optional[Normalization]:
        """The :class:`~msff.data.normalization.Normalization` applied to items, or None."""
        return self._norm

    def raw(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(image (C, H, W) as stored, target (H, W) uint8) of sample ``i``, unnormalised."""
        return self._read(i)

    def model_card(self, max_pixels: int = 1_000_000) -> dict:
        """What prediction needs to build the same input and to check new input against this
        (training) data: ``input_scale`` and ``domain`` (see :mod:`msff.data.domain`)."""
        from msff.data.domain import training_domain

        raw, dtypes = sample_pixels(self, max_pixels)
        fractions, pos, tot = [], 0, 0
        for i in range(len(self)):
            tgt = self._read(i)[1]
            v = tgt != IGNORE_INDEX
            nv = int(v.sum())
            if nv:
                k = int((tgt[v] == 1).sum())
                fractions.append(k / nv)
                pos, tot = pos + k, tot + nv
        nfile = self.in_channels - len(self.terrain) - self._extra_count
        names = [f"band {b}" for b in self.bands] if self.bands else [f"band {b + 1}" for b in range(nfile)]
        names += [f"{p.name}:{i + 1}" for p in self.extra_rasters for i in range(raster_shape(p)[0])]
        names += self.terrain
        return {
            "input_scale": self.input_scale.to_dict(),
            "domain": training_domain(raw, dtypes, self.input_scale, names, fractions, (pos, tot)),
            "stack": {"terrain": list(self.terrain), "dates": self.dates,
                      "extra_rasters": [p.name for p in self.extra_rasters],
                      "bands_per_date": nfile // len(self.dates) if self.dates else None},
        }

    @property
    def band_dtypes(self) -> list:
        """Stored dtype of each input band (file bands, then float32 terrain bands)."""
        if self._file_dtype is None:
            self._read(0)
        nfile = self.in_channels - len(self.terrain) - self._extra_count
        extra = []
        for p in self.extra_rasters:
            with _open_grid(p) as ds:
                extra += list(ds.dtypes)
        return [self._file_dtype] * nfile + extra + ["float32"] * len(self.terrain)

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        """``(image - mean) / std`` of a float32 (C, H, W) image in model-input units
        (:meth:`Normalization.apply_torch`); the image itself when there is no normalisation."""
        return image if self._norm is None else self._norm.apply_torch(image)

    def __getitem__(self, key) -> dict:
        # key is an index, (index, draw) or (index, draw, epoch) from EpochSampler: draw numbers the
        # random crop within the epoch.
        if isinstance(key, tuple):
            i, draw, epoch = key if len(key) == 3 else (*key, self.epoch)
        else:
            i, draw, epoch = key, key, self.epoch
        img, tgt = self._read(i)
        image = torch.from_numpy(self.input_scale.apply(img.astype(np.float32, copy=self.input_scale.kind != "none")))
        target = torch.from_numpy(np.ascontiguousarray(tgt))
        valid = target != IGNORE_INDEX
        # Invalid pixels become 0 after normalisation (the band mean), not nodata values.
        image = self.normalize(image)
        image = torch.where(valid[None], image, torch.zeros(()))
        if self.crop is not None or self.augment is not None:
            rng = np.random.default_rng([self.seed, int(epoch), int(draw)])
            image, target = random_crop_affine(image, target, self.crop, rng, self.augment or Augment.none())
        return {"image": image.contiguous(), "target": target.contiguous(), "name": self.pairs[i].name}


def _open_grid(path: Path):
    import warnings

    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        return rasterio.open(path)


def _grid_of(path: Path):
    with _open_grid(path) as ds:
        if ds.crs is None:
            raise DataError(f"{path}: has no CRS, so other rasters cannot be placed on its grid")
        return ds.crs, ds.transform


def _check_crop(crop):
    if crop is not None and (isinstance(crop, bool) or not isinstance(crop, int) or crop < 1):
        raise DataError(f"crop must be a positive integer or None, got {crop!r}")
    return crop


class EpochSampler(torch.utils.data.Sampler):
    """Yields ``(index, draw, epoch)`` keys for one epoch: ``samples_per_epoch`` draws from shuffled
    passes over the dataset, seeded by ``(seed, epoch)``, split across ``world_size`` ranks.

    Args:
        n: dataset length.
        samples_per_epoch: draws per epoch over all ranks (None: ``n``).
        seed: shuffle seed.
        rank, world_size: this process's share under DDP (each rank gets the same count).

    Example:
        >>> s = EpochSampler(5, samples_per_epoch=8, seed=0); s.set_epoch(1); len(list(s))
        8
    """

    def __init__(self, n: int, samples_per_epoch: Optional[int] = None, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.n, self.seed, self.rank, self.world = int(n), int(seed), int(rank), int(world_size)
        self.total = int(samples_per_epoch or n)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        reps = -(-self.total // self.n)
        return torch.cat([torch.randperm(self.n, generator=g) for _ in range(reps)])[: self.total].tolist()

    def __len__(self) -> int:
        return self.total // self.world

    def __iter__(self):
        order = self._order()
        per = len(self)
        for k in range(self.rank, per * self.world, self.world):
            yield (order[k], self.epoch * 1_000_003 + k, self.epoch)


def collate(items: list[dict]) -> dict:
    """Batch items, padding images (0) and targets (255, ignored) to the largest size in the batch."""
    h = max(it["image"].shape[-2] for it in items)
    w = max(it["image"].shape[-1] for it in items)
    imgs, tgts = zip(*(pad_to(it["image"], it["target"], h, w) for it in items), strict=True)
    return {"image": torch.stack(imgs), "target": torch.stack(tgts), "name": [it["name"] for it in items]}


def sample_pixels(dataset: SegmentationDataset, max_pixels: int = 1_000_000, seed: int = 0) -> tuple[np.ndarray, list]:
    """Raw values of valid pixels of ``dataset``: a seeded sample of at most ``max_pixels`` per band,
    spread evenly over the images, plus the stored dtype of each band.

    Returns:
        ``(samples (C, N) float64, dtypes)``.
    """
    rng = np.random.default_rng(seed)
    per_image = max(1, max_pixels // max(len(dataset), 1))
    parts, dtypes = [], None
    for i in range(len(dataset)):
        img, tgt = dataset.raw(i)
        dtypes = dtypes or dataset.band_dtypes
        x = img.reshape(img.shape[0], -1)
        keep = np.flatnonzero(tgt.reshape(-1) != IGNORE_INDEX)
        if keep.size > per_image:
            keep = np.sort(rng.choice(keep, per_image, replace=False))
        parts.append(x[:, keep].astype(np.float64))
    samples = np.concatenate(parts, axis=1) if parts else np.zeros((dataset.in_channels, 0))
    return samples, dtypes or ["float32"] * dataset.in_channels


def fit_input_scale(dataset: SegmentationDataset, source: str = "training split") -> InputScale:
    """``dataset.input_scale`` fitted on a seeded pixel sample of ``dataset`` when it is a percentile
    stretch not fitted yet, else unchanged (the dataset is not changed).

    Example:
        >>> scale = fit_input_scale(train_ds)  # doctest: +SKIP
    """
    if not dataset.input_scale.needs_fit:
        return dataset.input_scale
    return dataset.input_scale.fit(sample_pixels(dataset)[0], source)


def normalization_stats(dataset: SegmentationDataset, input_scale: "InputScale | None" = None) -> dict:
    """Per-band mean and standard deviation over valid pixels of ``dataset``, in model-input units
    (after ``input_scale``, default ``dataset.input_scale``, which must be fitted). Pure: the
    dataset is not changed.

    Returns:
        ``{"mean": [float per band], "std": [float per band]}`` (std floored at 1e-6), the
        checkpoint metadata form: prediction applies ``(x - mean) / std`` after the input scale.

    Example:
        >>> stats = normalization_stats(train_ds, fit_input_scale(train_ds))  # doctest: +SKIP
    """
    scale = dataset.input_scale if input_scale is None else InputScale.parse(input_scale)
    if scale.needs_fit:
        raise DataError("normalisation statistics need a fitted input scale (fit_input_scale first)")
    c = dataset.in_channels
    s = np.zeros(c, np.float64)
    ss = np.zeros(c, np.float64)
    n = 0
    for i in range(len(dataset)):
        img, tgt = dataset.raw(i)
        x = scale.apply(img.astype(np.float32, copy=True)).reshape(img.shape[0], -1).astype(np.float64)
        keep = tgt.reshape(-1) != IGNORE_INDEX
        x = x[:, keep]
        s += x.sum(axis=1)
        ss += (x * x).sum(axis=1)
        n += x.shape[1]
    if n == 0:
        raise DataError("cannot compute normalisation: the training split has no valid pixels")
    mean = s / n
    std = np.sqrt(np.maximum(ss / n - mean * mean, 0.0))
    return {"mean": [float(v) for v in mean], "std": [float(max(v, 1e-6)) for v in std]}


def compute_normalization(dataset: SegmentationDataset) -> dict:
    """:func:`normalization_stats` of ``dataset`` after :func:`fit_input_scale`, whose result is
    stored in ``dataset.input_scale`` (the older, mutating form; the engine and
    :class:`~msff.data.module.SegmentationDataModule` use the two pure functions).

    Example:
        >>> stats = compute_normalization(train_ds)  # doctest: +SKIP
    """
    dataset.input_scale = fit_input_scale(dataset)
    return normalization_stats(dataset)


def split_pairs(
    pairs: Sequence[Pair], val_ratio: float = 0.2, test_ratio: float = 0.0, seed: int = 0
) -> tuple[list[Pair], list[Pair], list[Pair]]:
    """Random train/val/test split by ratio (seeded; independent of file order on disk).

    Returns:
        ``(train, val, test)``; val and test get at least one pair when their ratio is > 0.

    Example:
        >>> tr, va, te = split_pairs(pairs, val_ratio=0.2, seed=0)  # doctest: +SKIP
    """
    if not 0 <= val_ratio < 1 or not 0 <= test_ratio < 1 or val_ratio + test_ratio >= 1:
        raise ValueError(f"need 0 <= val_ratio, test_ratio and val_ratio + test_ratio < 1; got {val_ratio}, {test_ratio}")
    pairs = sorted(pairs, key=lambda p: str(p.image))
    n = len(pairs)
    order = np.random.default_rng(seed).permutation(n)
    nv = max(1, round(n * val_ratio)) if val_ratio > 0 else 0
    nt = max(1, round(n * test_ratio)) if test_ratio > 0 else 0
    if nv + nt >= n:
        raise DataError(f"dataset of {n} pairs is too small for val_ratio={val_ratio}, test_ratio={test_ratio}")
    val = [pairs[i] for i in order[:nv]]
    test = [pairs[i] for i in order[nv : nv + nt]]
    train = [pairs[i] for i in order[nv + nt :]]
    return train, val, test


def read_list(path: str | os.PathLike) -> list[str]:
    """Names from a split list file: one per line (stem, file name or path); ``#`` comments."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: split list file not found")
    names = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(line)
    if not names:
        raise DataError(f"{path}: split list is empty")
    return names


def select_pairs(pairs: Sequence[Pair], names: Sequence[str], source: str = "list") -> list[Pair]:
    """The pairs whose image stem, file name or path matches ``names`` (every name must match)."""
    index: dict[str, Pair] = {}
    for p in pairs:
        for k in (p.image.stem, p.image.name, str(p.image)):
            index.setdefault(k, p)
    out, missing = [], []
    for n in names:
        key = Path(n).name if n not in index else n
        p = index.get(key) or index.get(Path(n).stem)
        (out.append(p) if p is not None else missing.append(n))
    if missing:
        raise DataError(f"{source}: {len(missing)} name(s) match no image: {missing[:5]}")
    return out
