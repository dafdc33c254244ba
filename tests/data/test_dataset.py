"""Datasets: checks at construction, normalisation, splits, augmentation applied identically to
image and mask, reproducible draws, epoch sampling."""
import numpy as np
import pytest
import rasterio
import torch

from msff.data import (
    IGNORE_INDEX,
    Augment,
    DataError,
    EpochSampler,
    SegmentationDataset,
    collate,
    compute_normalization,
    find_pairs,
    random_crop_affine,
    read_list,
    select_pairs,
    split_pairs,
    write_scene_dataset,
)

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")


def write(path, arr):
    arr = arr[None] if arr.ndim == 2 else arr
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="PNG", width=arr.shape[2], height=arr.shape[1], count=arr.shape[0], dtype="uint8") as d:
        d.write(arr)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return write_scene_dataset(tmp_path_factory.mktemp("scenes"), n=10, size=48, seed=3)


def test_scenes_dataset_items(scenes):
    ds = SegmentationDataset(find_pairs(scenes))
    assert len(ds) == 10 and ds.in_channels == 3
    it = ds[0]
    assert it["image"].dtype == torch.float32 and it["image"].shape == (3, 48, 48)
    assert it["target"].dtype == torch.uint8 and set(it["target"].unique().tolist()) <= {0, 1}
    assert sum(int((ds.raw(i)[1] == 1).sum()) for i in range(10)) > 0


def test_size_and_band_mismatch_named(tmp_path):
    write(tmp_path / "images" / "a.png", np.zeros((3, 10, 12), np.uint8))
    write(tmp_path / "masks" / "a.png", np.zeros((10, 11), np.uint8))
    with pytest.raises(DataError, match="a.png.*mask size 11x10.*12x10"):
        SegmentationDataset(find_pairs(tmp_path))
    write(tmp_path / "masks" / "a.png", np.zeros((10, 12), np.uint8))
    write(tmp_path / "images" / "b.png", np.zeros((1, 10, 12), np.uint8))
    write(tmp_path / "masks" / "b.png", np.zeros((10, 12), np.uint8))
    with pytest.raises(DataError, match="b.png.*1 bands"):
        SegmentationDataset(find_pairs(tmp_path))


def test_normalization_matches_numpy(scenes):
    ds = SegmentationDataset(find_pairs(scenes))
    st = compute_normalization(ds)
    allpx = np.concatenate([ds.raw(i)[0].reshape(3, -1) for i in range(len(ds))], axis=1).astype(np.float64)
    np.testing.assert_allclose(st["mean"], allpx.mean(1), rtol=1e-9)
    np.testing.assert_allclose(st["std"], allpx.std(1), rtol=1e-6)
    ds.normalization = st
    x = torch.cat([ds[i]["image"].reshape(3, -1) for i in range(len(ds))], 1)
    torch.testing.assert_close(x.mean(1), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(x.std(1, unbiased=False), torch.ones(3), atol=1e-4, rtol=0)


def test_split_ratio_is_seeded_and_disjoint(scenes):
    pairs = find_pairs(scenes)
    tr, va, te = split_pairs(pairs, 0.2, 0.2, seed=1)
    assert (len(tr), len(va), len(te)) == (6, 2, 2)
    assert not ({p.image for p in tr} & {p.image for p in va + te})
    assert split_pairs(list(reversed(pairs)), 0.2, 0.2, seed=1) == (tr, va, te)
    assert split_pairs(pairs, 0.2, 0.2, seed=2) != (tr, va, te)


def test_split_lists(scenes, tmp_path):
    pairs = find_pairs(scenes)
    (tmp_path / "val.txt").write_text("# validation\nscene_0001\nscene_0003.png\n")
    sel = select_pairs(pairs, read_list(tmp_path / "val.txt"))
    assert [p.name for p in sel] == ["scene_0001", "scene_0003"]
    (tmp_path / "bad.txt").write_text("scene_0001\nnot_there\n")
    with pytest.raises(DataError, match="not_there"):
        select_pairs(pairs, read_list(tmp_path / "bad.txt"), "bad.txt")


def test_flips_and_translation_move_image_and_mask_together():
    rng = np.random.default_rng(0)
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 40, 56, generator=g)
    tgt = (img[0] > 0.5).to(torch.uint8)
    aug = Augment(rotate=0, hflip=0.5, vflip=0.5, translate=0.3)
    for _ in range(20):
        x, y = random_crop_affine(img, tgt, 24, rng, aug)
        valid = y != IGNORE_INDEX
        assert valid.float().mean() > 0.3
        # unrotated crops copy pixels exactly, so the mask is still image band 0 > 0.5
        torch.testing.assert_close(y[valid], (x[0][valid] > 0.5).to(torch.uint8))
        assert x[:, ~valid].abs().max() < 1e-5 if (~valid).any() else True


def test_rotation_keeps_image_and_mask_aligned():
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(80.0), indexing="ij")
    # an off-centre ellipse: its pixels must stay under the mask whatever the angle
    inside = ((yy - 20) / 12) ** 2 + ((xx - 50) / 20) ** 2 < 1
    img = inside.float()[None].repeat(3, 1, 1)
    tgt = inside.to(torch.uint8)
    rng = np.random.default_rng(1)
    for _ in range(10):
        x, y = random_crop_affine(img, tgt, 48, rng, Augment(rotate=180, translate=0.1))
        v = y != IGNORE_INDEX
        agree = ((x[0] > 0.5) == (y == 1))[v].float().mean()
        assert agree > 0.97


def test_crop_without_augmentation_is_a_window_of_the_image():
    img = torch.arange(3 * 30 * 40, dtype=torch.float32).reshape(3, 30, 40)
    tgt = torch.randint(0, 2, (30, 40), dtype=torch.uint8)
    x, y = random_crop_affine(img, tgt, 16, np.random.default_rng(5), Augment.none())
    r0, c0 = divmod(int(x[0, 0, 0].item()), 40)
    torch.testing.assert_close(x, img[:, r0 : r0 + 16, c0 : c0 + 16])
    torch.testing.assert_close(y, tgt[r0 : r0 + 16, c0 : c0 + 16])


def test_crop_larger_than_image_pads_with_ignore():
    img, tgt = torch.rand(3, 10, 12), torch.ones(10, 12, dtype=torch.uint8)
    x, y = random_crop_affine(img, tgt, 16, np.random.default_rng(0), Augment.none())
    assert x.shape == (3, 16, 16) and int((y == 1).sum()) == 120 and int((y == IGNORE_INDEX).sum()) == 256 - 120


def test_draws_are_reproducible(scenes):
    ds = SegmentationDataset(find_pairs(scenes), crop=32, augment=Augment(), seed=7)
    ds.set_epoch(3)
    a = ds[(2, 11)]
    ds2 = SegmentationDataset(find_pairs(scenes), crop=32, augment=Augment(), seed=7)
    ds2.set_epoch(3)
    b = ds2[(2, 11)]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["target"], b["target"])
    ds2.set_epoch(4)
    assert not torch.equal(a["image"], ds2[(2, 11)]["image"])


def test_epoch_sampler_shards_cover_the_epoch():
    full = EpochSampler(7, samples_per_epoch=12, seed=3)
    full.set_epoch(2)
    keys = list(full)
    assert len(keys) == 12 and len({k[1] for k in keys}) == 12
    assert sorted(k[0] for k in keys[:7]) == list(range(7))  # each pass is a permutation
    shards = []
    for r in range(2):
        s = EpochSampler(7, samples_per_epoch=12, seed=3, rank=r, world_size=2)
        s.set_epoch(2)
        shards.append(list(s))
    assert len(shards[0]) == len(shards[1]) == 6
    assert sorted(shards[0] + shards[1]) == sorted(keys)
    full.set_epoch(3)
    assert list(full) != keys


def test_collate_pads_with_ignore():
    items = [{"image": torch.rand(3, 10, 12), "target": torch.zeros(10, 12, dtype=torch.uint8), "name": "a"},
             {"image": torch.rand(3, 14, 9), "target": torch.ones(14, 9, dtype=torch.uint8), "name": "b"}]
    b = collate(items)
    assert b["image"].shape == (2, 3, 14, 12) and b["name"] == ["a", "b"]
    assert (b["target"][0, 10:] == IGNORE_INDEX).all() and (b["target"][1, :, 9:] == IGNORE_INDEX).all()
