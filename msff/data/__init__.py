"""Datasets for real landslide data: image/mask folders (PNG/JPEG/TIFF, colour or binary masks),
GeoTIFF rasters with nodata, Landslide4Sense ``.h5`` patches; splits, normalisation statistics and
the paper's augmentations.

Example:
    >>> from msff.data import find_pairs, SegmentationDataset, compute_normalization
    >>> pairs = find_pairs("/data/sichuan_landslide")   # doctest: +SKIP
    >>> ds = SegmentationDataset(pairs)                 # doctest: +SKIP
"""
from msff.data.dataset import (
    EpochSampler,
    SegmentationDataset,
    collate,
    compute_normalization,
    fit_input_scale,
    normalization_stats,
    read_list,
    select_pairs,
    split_pairs,
)
from msff.data.discover import Pair, find_pairs
from msff.data.io import (
    IGNORE_INDEX,
    DataError,
    MaskEncoding,
    decode_mask,
    raster_shape,
    read_image,
    read_mask,
)
from msff.data.module import SegmentationDataModule
from msff.data.normalization import Normalization
from msff.data.synthetic import make_scene, write_scene_dataset
from msff.data.transforms import Augment, random_crop_affine

__all__ = [
    "Augment",
    "DataError",
    "EpochSampler",
    "IGNORE_INDEX",
    "MaskEncoding",
    "Normalization",
    "Pair",
    "SegmentationDataModule",
    "SegmentationDataset",
    "collate",
    "compute_normalization",
    "decode_mask",
    "find_pairs",
    "fit_input_scale",
    "make_scene",
    "normalization_stats",
    "random_crop_affine",
    "raster_shape",
    "read_image",
    "read_list",
    "read_mask",
    "select_pairs",
    "split_pairs",
    "write_scene_dataset",
]
