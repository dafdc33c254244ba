"""The data module and the one normalisation: derived datasets, nothing handed in is changed,
one input scale and normalisation for every split, and train-time == predict-time normalisation
bit for bit."""
import copy

import numpy as np
import pytest
import torch

from msff.data import (
    Augment,
    DataError,
    Normalization,
    SegmentationDataModule,
    SegmentationDataset,
    find_pairs,
    normalization_stats,
    split_pairs,
    write_scene_dataset,
)
from msff.data.dataset import EpochSampler

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")

WATCHED = ("normalization", "input_scale", "crop", "augment", "seed", "epoch", "in_channels", "bands", "encoding")


def snapshot(ds):
    """Every setting of a dataset, and the identity of its file list and decoded cache."""
    return ({k: copy.deepcopy(getattr(ds, k)) for k in WATCHED}, id(ds.pairs), list(ds.pairs), id(ds._cache),
            sorted(ds._cache))


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return write_scene_dataset(tmp_path_factory.mktemp("scenes"), n=8, size=40, seed=11)


@pytest.fixture
def splits(scenes):
    tr, va, te = split_pairs(find_pairs(scenes), 0.25, 0.25, seed=0)
    return SegmentationDataset(tr), SegmentationDataset(va), SegmentationDataset(te)


def test_module_hands_out_derived_datasets_and_changes_nothing_given(splits):
    tr, va, te = splits
    before = [snapshot(d) for d in splits]
    dm = SegmentationDataModule(tr, va, te, crop=24, augment=True, seed=5)
    assert [snapshot(d) for d in splits] == before
    assert dm.train_dataset is not tr and dm.val_dataset is not va and dm.test_dataset is not te
    assert dm.train_dataset._cache is tr._cache  # the decoded files are shared, not read again
    t = dm.train_dataset
    assert (t.crop, t.augment, t.seed) == (24, Augment(), 5)
    for d in (dm.val_dataset, dm.test_dataset):
        assert d.crop is None and d.augment is None
    stats = normalization_stats(tr)
    assert dm.normalization == stats
    assert t.normalization == dm.val_dataset.normalization == dm.test_dataset.normalization == stats
    assert t[(0, 3, 1)]["image"].shape == (3, 24, 24) and dm.val_dataset[0]["image"].shape == (3, 40, 40)


def test_items_are_the_training_statistics_applied(splits):
    tr, va, _ = splits
    dm = SegmentationDataModule(tr, va)
    n = dm.normalization
    raw = va.raw(0)[0].astype(np.float32)
    want = (torch.from_numpy(raw) - torch.tensor(n.mean).view(-1, 1, 1)) / torch.tensor(n.std).view(-1, 1, 1)
    assert torch.equal(dm.val_dataset[0]["image"], want)
    assert torch.equal(va[0]["image"], torch.from_numpy(raw))  # the raw dataset still gives raw values


def test_percentile_scale_is_fitted_on_train_and_shared(scenes):
    tr, va, _ = split_pairs(find_pairs(scenes), 0.25, 0.0, seed=0)
    tr_ds, va_ds = SegmentationDataset(tr, input_scale="percentile:2,98:1"), SegmentationDataset(va)
    dm = SegmentationDataModule(tr_ds, va_ds)
    assert tr_ds.input_scale.needs_fit  # not changed
    assert dm.input_scale.fitted_on == "training split" and not dm.input_scale.needs_fit
    assert dm.train_dataset.input_scale == dm.val_dataset.input_scale == dm.input_scale
    assert all(0.2 < m < 0.8 for m in dm.normalization.mean)  # statistics in stretched units


def test_band_mismatch_is_one_error_naming_the_split(tmp_path, splits):
    import rasterio

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for sub, arr in (("images", np.zeros((1, 8, 8), np.uint8)), ("masks", np.zeros((1, 8, 8), np.uint8))):
        with rasterio.open(tmp_path / sub / "a.png", "w", driver="PNG", width=8, height=8, count=1,
                           dtype="uint8") as d:
            d.write(arr)
    one_band = SegmentationDataset(find_pairs(tmp_path))
    with pytest.raises(DataError, match="validation images have 1 bands, training images 3"):
        SegmentationDataModule(splits[0], one_band)
    with pytest.raises(DataError, match="normalisation has 2 band"):
        SegmentationDataModule(splits[0], normalization={"mean": [0, 0], "std": [1, 1]})


def test_for_run_and_replace_give_new_modules_with_the_same_statistics(splits):
    from msff.config import TrainConfig

    dm = SegmentationDataModule(*splits)
    cfg = TrainConfig(crop=16, augment=False, seed=9)
    run = dm.for_run(cfg)
    assert run is not dm and (run.crop, run.augment, run.seed) == (16, None, 9)
    assert run.normalization is dm.normalization and run.input_scale == dm.input_scale
    assert dm.crop is None and dm.train_dataset.crop is None  # the first module is unchanged
    assert run.for_run(cfg) is run
    other = dm.replace(normalization={"mean": [1, 2, 3], "std": [4, 5, 6]})
    assert other.val_dataset.normalization == {"mean": [1, 2, 3], "std": [4, 5, 6]}
    assert dm.val_dataset.normalization != other.val_dataset.normalization
    with pytest.raises(TypeError, match="replace"):
        dm.replace(bands=[1])


def test_from_pairs_splits_by_seed(scenes):
    dm = SegmentationDataModule.from_pairs(find_pairs(scenes), val_ratio=0.25, test_ratio=0.25, split_seed=1)
    tr, va, te = split_pairs(find_pairs(scenes), 0.25, 0.25, seed=1)
    assert dm.splits() == {"train": [p.name for p in tr], "val": [p.name for p in va], "test": [p.name for p in te]}
    card = dm.model_card()
    assert card["normalization"] == dm.normalization.to_dict() and card["in_channels"] == 3 and "domain" in card
    bands = SegmentationDataModule.from_pairs(find_pairs(scenes), val_ratio=0.25, bands=[3, 1], crop=8)
    assert bands.in_channels == 2 and bands.val_dataset.bands == [3, 1] and bands.train_dataset.crop == 8


def test_dataset_replace_is_a_copy(splits):
    tr = splits[0]
    before = snapshot(tr)
    new = tr.replace(crop=16, seed=3, augment=Augment.none(), normalization={"mean": [0] * 3, "std": [2] * 3})
    assert snapshot(tr) == before and (new.crop, new.seed) == (16, 3)
    with pytest.raises(TypeError, match="not \\['bands'\\]"):
        tr.replace(bands=[1])
    with pytest.raises(DataError, match="crop must be a positive integer"):
        tr.replace(crop=True)
    with pytest.raises(DataError, match="normalisation has 1 band"):
        tr.replace(normalization={"mean": [0], "std": [1]})


def test_sampler_keys_carry_the_epoch(splits):
    ds = splits[0].replace(crop=16, augment=Augment(), seed=2)
    s = EpochSampler(len(ds), 4, seed=2)
    s.set_epoch(3)
    keys = list(s)
    assert all(k[2] == 3 for k in keys)
    ds.set_epoch(3)  # the older way: the epoch set on the dataset, keys (index, draw)
    for i, draw, _ in keys:
        assert torch.equal(ds[(i, draw, 3)]["image"], ds[(i, draw)]["image"])
    assert not torch.equal(ds[(keys[0][0], keys[0][1], 4)]["image"], ds[(keys[0][0], keys[0][1], 3)]["image"])


# ---- the one normalisation ----------------------------------------------------------------------
def test_normalization_checks_and_round_trip():
    n = Normalization([0.1, 0.2], [0.3, 0.4])
    assert n.to_dict() == {"mean": [0.1, 0.2], "std": [0.3, 0.4]}  # float64 values kept as given
    assert Normalization.from_dict(n.to_dict()) == n and n == {"mean": [0.1, 0.2], "std": [0.3, 0.4]}
    assert Normalization.from_dict(None) is None and Normalization.from_dict({"mean": None, "std": None}) is None
    assert n.mean.dtype == np.float32 and not n.mean.flags.writeable
    with pytest.raises(AttributeError):
        n.mean = [1, 2]
    for mean, std, match in (([0.0], [0.0], "std must be finite and > 0"), ([0.0, 1.0], [1.0], "one mean and one std"),
                             ([float("nan")], [1.0], "mean must be finite"), ([], [], "one mean")):
        with pytest.raises(ValueError, match=match):
            Normalization(mean, std)
    with pytest.raises(ValueError, match="must be"):
        Normalization.from_dict({"avg": [1]})
    with pytest.raises(ValueError, match="2 band"):
        n.apply_numpy(np.zeros((3, 4, 4), np.float32))
    with pytest.raises(TypeError, match="float32"):
        n.apply_numpy(np.zeros((2, 4, 4), np.float64))


@pytest.mark.parametrize("scale", [None, "divide:255", "percentile:2,98:1"])
def test_training_and_prediction_normalise_bit_for_bit(scenes, scale):
    from msff.inference.predictor import Predictor

    tr, va, _ = split_pairs(find_pairs(scenes), 0.25, 0.0, seed=0)
    dm = SegmentationDataModule(SegmentationDataset(tr, input_scale=scale), SegmentationDataset(va))
    n = dm.normalization
    pred = Predictor(torch.nn.Conv2d(3, 1, 1), mean=n.to_dict()["mean"], std=n.to_dict()["std"],
                     input_scale=dm.input_scale)
    for ds in (dm.val_dataset, dm.train_dataset.replace(crop=None, augment=None)):
        for i in range(len(ds)):
            item = ds[i]["image"].numpy()
            raw = ds.raw(i)[0].astype(np.float32)
            predicted = pred.normalize(raw[None].copy())[0]
            assert predicted.dtype == np.float32
            assert np.array_equal(item.view(np.uint32), predicted.view(np.uint32)), (scale, i)
    # and the two implementations agree on awkward values too (negative, huge, tiny, subnormal-adjacent)
    x = np.random.default_rng(0).standard_normal((2, 3, 17, 19)).astype(np.float32) * np.float32(1e4)
    x[0, 0, 0, :3] = (1e-38, -3e30, 0.0)
    a = n.apply_numpy(x.copy())
    b = n.apply_torch(torch.from_numpy(x)).numpy()
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32))


def test_normalization_survives_pickle_and_copy():
    """Immutable, yet picklable and copyable (DataLoader workers under spawn, deepcopy of a model card)."""
    import copy
    import pickle

    import numpy as np

    from msff.data.normalization import Normalization

    n = Normalization([1234.5678901234, 2.0], [0.1, 3.0])
    for m in (pickle.loads(pickle.dumps(n)), copy.copy(n), copy.deepcopy(n)):
        assert m == n and m.to_dict() == n.to_dict()  # the stored float64 values round-trip exactly
        x = np.full((2, 3, 3), 7.0, dtype="float32")
        assert np.array_equal(m.apply_numpy(x.copy()), n.apply_numpy(x.copy()))
