"""The soil-like proxy against a direct numpy computation, and its invariances."""
import numpy as np
import pytest
import torch

from msff.analysis.confusable import soil_like_mask, soil_mask_for_batch


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


def test_normalised_batch_is_undone_and_bad_bands_rejected():
    rng = np.random.default_rng(1)
    raw = torch.from_numpy(rng.uniform(0, 255, (1, 3, 8, 9)).astype(np.float32))
    norm = {"mean": [100.0, 110.0, 90.0], "std": [50.0, 40.0, 60.0]}
    x = (raw - torch.tensor(norm["mean"]).view(1, 3, 1, 1)) / torch.tensor(norm["std"]).view(1, 3, 1, 1)
    t = torch.zeros(1, 8, 9, dtype=torch.uint8)
    t[0, 0] = 255
    got = soil_mask_for_batch(x, t, norm, {})
    ref = soil_like_mask(raw, t != 255)
    assert (got == ref).all() and not got[0, 0].any()
    with pytest.raises(ValueError, match="out of range"):
        soil_like_mask(raw, nir=5)
