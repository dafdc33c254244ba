"""The soil-like proxy against a direct numpy computation, and its invariances."""
import numpy as np
import pytest
import torch

from msff.analysis.confusable import dataset_soil_masks, soil_like_mask


def numpy_soil(img, valid, nir=None, gmax=0.05, nmax=0.2, q=0.5):
    r, g, b = img[0], img[1], img[2]
    s = r + g + b
    if nir is None:
        green = (2 * g - r - b) / np.maximum(s, 1e-12) > gmax
    else:
        n = img[nir]
        green = (n - r) / np.maximum(n + r, 1e-12) > nmax
    bright = s >= np.quantile(s[valid], q)
    return ~green & bright & valid & (s > 0)


@pytest.mark.parametrize("nir", [None, 3])
def test_matches_numpy_and_is_scale_invariant(nir):
    rng = np.random.default_rng(0)
    img = rng.uniform(0, 255, (2, 4, 19, 23)).astype(np.float32)
    valid = rng.random((2, 19, 23)) > 0.2
    got = soil_like_mask(torch.from_numpy(img), torch.from_numpy(valid), nir=nir)
    for i in range(2):
        ref = numpy_soil(img[i].astype(np.float64), valid[i], nir)
        assert (got[i].numpy() == ref).mean() > 0.995  # float32 vs float64 ties at the thresholds
        assert 0 < ref.sum() < valid[i].sum()
    scaled = soil_like_mask(torch.from_numpy(img) / 255.0 * 0.37, torch.from_numpy(valid), nir=nir)
    assert (scaled == got).float().mean() > 0.995


def test_dataset_masks_read_raw_bands_and_pad():
    rng = np.random.default_rng(1)

    class DS:
        raws = [(rng.uniform(0, 255, (3, 8, 9)).astype(np.uint8), np.zeros((8, 9), np.uint8)),
                (rng.uniform(0, 255, (3, 6, 7)).astype(np.uint8), np.full((6, 7), 1, np.uint8))]

        def raw(self, i):
            return self.raws[i]

    DS.raws[0][1][0] = 255
    got = dataset_soil_masks(DS(), [1, 0], (2, 10, 11), {})
    for j, i in enumerate([1, 0]):
        raw, t = DS.raws[i]
        ref = soil_like_mask(torch.from_numpy(raw.astype(np.float32))[None], torch.from_numpy(t != 255)[None])[0]
        h, w = t.shape
        assert (got[j, :h, :w] == ref).all() and not got[j, h:].any() and not got[j, :, w:].any()
    assert not got[1, 0].any() and got.any()
    with pytest.raises(ValueError, match="out of range"):
        soil_like_mask(torch.zeros(1, 3, 2, 2), nir=5)
