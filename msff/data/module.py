"""The data module: splits, input scaling, normalisation and transforms owned in one place.

A :class:`SegmentationDataModule` is built once from datasets (or image/mask pairs and split
ratios). It fits the input scale and the normalisation statistics on the training split, checks
that every split has the training split's bands, and hands out *derived* datasets
(:meth:`SegmentationDataset.replace`): the training dataset with crop, augmentation and seed, the
validation/test datasets as whole images, all normalised alike. Nothing it was given is changed,
and the engine only reads what it hands out (as torchgeo's DataModule and Lightning's
``LightningDataModule``).

Example:
    >>> from msff.data import find_pairs, write_scene_dataset
    >>> import tempfile
    >>> root = write_scene_dataset(tempfile.mkdtemp(), n=5, size=32, seed=0)
    >>> dm = SegmentationDataModule.from_pairs(find_pairs(root), val_ratio=0.2, crop=16, seed=1)
    >>> len(dm.train_dataset), len(dm.val_dataset), dm.train_dataset[0]["image"].shape
    (4, 1, torch.Size([3, 16, 16]))
    >>> dm.train_dataset.normalization == dm.val_dataset.normalization == dm.normalization.to_dict()
    True
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

import torch  # noqa: F401  (the doctest shows torch.Size)

from msff.data.dataset import SegmentationDataset, fit_input_scale, normalization_stats, split_pairs
from msff.data.discover import Pair
from msff.data.io import DataError
from msff.data.normalization import Normalization
from msff.data.scaling import InputScale
from msff.data.transforms import Augment

__all__ = ["SegmentationDataModule"]


def _augment(augment: "Augment | bool | None") -> Optional[Augment]:
    if augment is True:
        return Augment()
    if augment is False or augment is None:
        return None
    if not isinstance(augment, Augment):
        raise TypeError(f"augment must be an Augment, True/False or None, got {augment!r}")
    return augment


class SegmentationDataModule:
    """Training, validation and test datasets with one input scale, one normalisation and the
    training transforms.

    Args:
        train: the training split (a :class:`SegmentationDataset` as built from files; its own crop,
            augmentation and normalisation are ignored and it is not changed).
        val, test: validation / test splits, or None.
        crop: training crop size (None: whole images).
        augment: :class:`Augment`, True (the paper's), or False/None.
        seed: seed of the training crops and augmentation draws.
        normalization: statistics to use (``{"mean", "std"}`` or :class:`Normalization`, e.g. from
            a checkpoint or an earlier run); None: computed on ``train``.
        input_scale: input scale to use (fitted or not); None: ``train.input_scale``. A percentile
            stretch not fitted yet is fitted on ``train``.

    Attributes:
        train_dataset, val_dataset, test_dataset: the derived datasets (None where not given).
        normalization: :class:`Normalization`; input_scale: fitted :class:`InputScale`;
        in_channels: bands of every split.

    Raises:
        DataError: a split whose band count differs from the training split's, or no valid pixels.
    """

    def __init__(
        self,
        train: SegmentationDataset,
        val: Optional[SegmentationDataset] = None,
        test: Optional[SegmentationDataset] = None,
        *,
        crop: Optional[int] = None,
        augment: "Augment | bool | None" = None,
        seed: int = 0,
        normalization: "Normalization | Mapping | None" = None,
        input_scale: "InputScale | str | None" = None,
    ):
        for name, ds in (("validation", val), ("test", test)):
            if ds is not None and ds.in_channels != train.in_channels:
                raise DataError(
                    f"{name} images have {ds.in_channels} bands, training images {train.in_channels} "
                    f"(e.g. {ds.pairs[0].image})"
                )
        self._raw = (train, val, test)
        scale = train.input_scale if input_scale is None else InputScale.parse(input_scale)
        if scale.needs_fit:
            scale = fit_input_scale(train.replace(input_scale=scale))
        self.input_scale: InputScale = scale
        if normalization is None:
            normalization = normalization_stats(train, scale)
        self.normalization: Normalization = Normalization.from_dict(normalization)
        if self.normalization.bands != train.in_channels:
            raise DataError(f"normalisation has {self.normalization.bands} band(s), the images {train.in_channels}")
        self.crop, self.augment, self.seed = crop, _augment(augment), int(seed)
        self.in_channels = train.in_channels
        self.train_dataset = train.replace(normalization=self.normalization, input_scale=scale, crop=crop,
                                           augment=self.augment, seed=self.seed)
        self.val_dataset = self.eval_view(val) if val is not None else None
        self.test_dataset = self.eval_view(test) if test is not None else None

    @classmethod
    def from_pairs(
        cls,
        pairs: Sequence[Pair],
        val_ratio: float = 0.2,
        test_ratio: float = 0.0,
        split_seed: int = 0,
        *,
        crop: Optional[int] = None,
        augment: "Augment | bool | None" = None,
        seed: int = 0,
        normalization: "Normalization | Mapping | None" = None,
        **dataset_kwargs: Any,
    ) -> "SegmentationDataModule":
        """Split ``pairs`` by ratio (:func:`~msff.data.split_pairs`, seeded) and build the module;
        ``dataset_kwargs`` go to every :class:`SegmentationDataset` (encoding, bands, input_scale,
        cache, dem, terrain, dates, extra_rasters)."""
        tr, va, te = split_pairs(pairs, val_ratio, test_ratio, split_seed)
        return cls.from_splits(tr, va, te, crop=crop, augment=augment, seed=seed, normalization=normalization,
                               **dataset_kwargs)

    @classmethod
    def from_splits(
        cls,
        train: Sequence[Pair],
        val: Sequence[Pair] = (),
        test: Sequence[Pair] = (),
        *,
        crop: Optional[int] = None,
        augment: "Augment | bool | None" = None,
        seed: int = 0,
        normalization: "Normalization | Mapping | None" = None,
        **dataset_kwargs: Any,
    ) -> "SegmentationDataModule":
        """Build the module from explicit train/val/test pair lists (empty: no such split)."""
        mk = lambda ps: SegmentationDataset(ps, **dataset_kwargs) if len(ps) else None  # noqa: E731
        train_ds = SegmentationDataset(train, **dataset_kwargs)
        return cls(train_ds, mk(val), mk(test), crop=crop, augment=augment, seed=seed, normalization=normalization)

    def eval_view(self, dataset: SegmentationDataset) -> SegmentationDataset:
        """``dataset`` as this module evaluates: whole images, this input scale and normalisation (a
        new dataset; ``dataset`` is not changed)."""
        if dataset.in_channels != self.in_channels:
            raise DataError(f"images have {dataset.in_channels} bands, training images {self.in_channels} "
                            f"(e.g. {dataset.pairs[0].image})")
        return dataset.replace(normalization=self.normalization, input_scale=self.input_scale, crop=None,
                               augment=None)

    def replace(self, **changes: Any) -> "SegmentationDataModule":
        """A new module with other ``crop``, ``augment``, ``seed`` or ``normalization`` (the input
        scale and, unless given, the normalisation are kept: nothing is computed again)."""
        unknown = sorted(set(changes) - {"crop", "augment", "seed", "normalization"})
        if unknown:
            raise TypeError(f"replace() can change crop, augment, seed, normalization; not {unknown}")
        kw = dict(crop=self.crop, augment=self.augment, seed=self.seed, normalization=self.normalization,
                  input_scale=self.input_scale)
        kw.update(changes)
        return SegmentationDataModule(*self._raw, **kw)

    def for_run(self, config: Any) -> "SegmentationDataModule":
        """This module with a training config's ``crop``, ``augment`` (bool) and ``seed``; itself when
        they already agree."""
        want = dict(crop=config.crop, augment=_augment(config.augment), seed=int(config.seed))
        if (self.crop, self.augment, self.seed) == (want["crop"], want["augment"], want["seed"]):
            return self
        return self.replace(**want)

    @property
    def train_names(self) -> list[str]:
        return [p.name for p in self.train_dataset.pairs]

    def splits(self) -> dict[str, list[str]]:
        """Image names per split (for run metadata)."""
        return {k: ([p.name for p in ds.pairs] if ds is not None else [])
                for k, ds in (("train", self.train_dataset), ("val", self.val_dataset), ("test", self.test_dataset))}

    def model_card(self) -> dict:
        """What a checkpoint records of the data: ``normalization``, ``bands``, ``in_channels``,
        ``mask_encoding``, and the training dataset's ``input_scale``, ``domain``, ``stack``."""
        tr = self.train_dataset
        return {"normalization": self.normalization.to_dict(), "bands": tr.bands, "in_channels": self.in_channels,
                "mask_encoding": dataclasses.asdict(tr.encoding), **tr.model_card()}

    def __repr__(self) -> str:
        n = lambda d: 0 if d is None else len(d)  # noqa: E731
        return (f"SegmentationDataModule(train={n(self.train_dataset)}, val={n(self.val_dataset)}, "
                f"test={n(self.test_dataset)}, bands={self.in_channels}, crop={self.crop}, seed={self.seed})")


