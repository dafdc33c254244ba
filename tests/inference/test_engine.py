"""Inference engines (msff.inference.engine): ONNX parity with the torch model, the per-checkpoint
export cache, channels_last parity, and the engine choice."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from msff import MSFFNet
from msff.inference import engine as E
from msff.inference.predict import predict_array

NORM3 = {"mean": [0.0] * 3, "std": [1.0] * 3}
ONNX_MISSING = E.onnx_available()
needs_onnx = pytest.mark.skipif(ONNX_MISSING is not None, reason=f"onnx engine: {ONNX_MISSING}")


def _tiny(seed: int = 0, bands: int = 3) -> MSFFNet:
    torch.manual_seed(seed)
    m = MSFFNet(in_channels=bands, width_multiplier=0.0625, lkam_blocks=1, kernel_size=3).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding them is checked too
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    return m


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MSFF_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "onnx"


@needs_onnx
def test_onnx_matches_torch_and_is_cached(cache):
    m = _tiny(0)
    eng = E.make_engine(m, "onnx", "cpu")
    assert isinstance(eng, E.OnnxEngine) and not eng.cache_hit and eng.parity is not None
    assert eng.path.parent == cache and eng.path.is_file() and eng.path.with_suffix(".json").is_file()
    assert not [p for p in cache.iterdir() if p.name.endswith(".part")]  # written atomically
    # awkward shapes: batch 3, odd sizes (padded to 16 inside), larger than the export's sample
    for shape in ((3, 3, 37, 53), (1, 3, 128, 96)):
        x = torch.randn(*shape)
        with torch.inference_mode():
            ref = m(x)
            got = eng(x)
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    again = E.make_engine(m, "onnx", "cpu")
    assert again.cache_hit and again.path == eng.path
    # different weights: a different cache entry
    other = E.make_engine(_tiny(1), "onnx", "cpu")
    assert other.path != eng.path and not other.cache_hit
    assert E.weights_digest(m) != E.weights_digest(_tiny(1)) and E.weights_digest(m) == E.weights_digest(_tiny(0))


@needs_onnx
def test_corrupt_cache_entry_is_exported_again(cache):
    m = _tiny(2)
    eng = E.make_engine(m, "onnx", "cpu")
    eng.path.write_bytes(b"not an onnx graph")
    fresh = E.make_engine(m, "onnx", "cpu")
    assert not fresh.cache_hit and fresh.parity is not None
    x = torch.randn(2, 3, 32, 48)
    with torch.inference_mode():
        torch.testing.assert_close(fresh(x), m(x), rtol=1e-4, atol=1e-4)


@needs_onnx
def test_predict_array_onnx_equals_nchw(cache):
    m = _tiny(3)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 90, 130)).astype(np.float32)
    a = predict_array(m, x, normalization=NORM3, tile=64, overlap=16, engine="nchw")
    b = predict_array(m, x, normalization=NORM3, tile=64, overlap=16, engine="onnx")
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
    assert ((a >= 0.5) == (b >= 0.5)).mean() > 0.999


def test_channels_last_matches_and_leaves_model_alone():
    m = _tiny(4)
    eng = E.make_engine(m, "torch", "cpu")
    assert isinstance(eng, E.ChannelsLastEngine) and E.engine_name(eng) == "torch"
    conv = next(p for p in m.parameters() if p.dim() == 4 and p.shape[-1] > 1)
    assert conv.is_contiguous()  # the caller's model is not converted
    x = torch.randn(2, 3, 45, 61)
    with torch.inference_mode():
        torch.testing.assert_close(eng(x), m(x), rtol=1e-4, atol=1e-5)
    assert E.make_engine(eng, "torch", "cpu") is eng
    assert E.make_engine(eng, "nchw", "cpu") is m


def test_engine_choice(monkeypatch):
    m = _tiny(5)
    with pytest.raises(ValueError, match="engine must be one of"):
        E.resolve_engine("fast", "cpu", m)
    assert E.resolve_engine("auto", "cpu", torch.nn.Conv2d(3, 1, 1)) == "nchw"  # not measured
    assert E.resolve_engine("auto", "cuda", m) == "nchw"
    with pytest.raises(E.EngineError, match="CPU only"):
        E.resolve_engine("onnx", "cuda", m)
    monkeypatch.setattr(E, "onnx_available", lambda: "onnxruntime is not installed (pip install 'msff[onnx]')")
    assert E.resolve_engine("auto", "cpu", m) == "torch"
    assert isinstance(E.make_engine(m, "auto", "cpu"), E.ChannelsLastEngine)
    with pytest.raises(E.EngineError, match="msff\\[onnx\\]"):
        E.make_engine(m, "onnx", "cpu")


@needs_onnx
def test_auto_is_onnx_on_cpu_for_msffnet():
    assert E.resolve_engine("auto", "cpu", _tiny(6)) == "onnx"


@needs_onnx
def test_export_failure_falls_back_under_auto(cache, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(torch.onnx, "export", boom)
    m = _tiny(7)
    with pytest.warns(RuntimeWarning, match="unsupported operator"):
        eng = E.make_engine(m, "auto", "cpu")
    assert isinstance(eng, E.ChannelsLastEngine)
    with pytest.raises(E.EngineError, match="export .* failed"):
        E.make_engine(m, "onnx", "cpu")
    assert not list(cache.glob("*.onnx")) and not list(cache.glob("*.part"))


@needs_onnx
def test_predict_cli_engine_option(cache, tmp_path, scene, tiny_ckpt):
    import rasterio

    from msff.inference.cli import main

    path, _ = scene
    outs = {}
    for eng in ("nchw", "onnx"):
        rc = main([str(tiny_ckpt), str(path), "--out", str(tmp_path / eng / "s"), "--engine", eng, "--quiet",
                   "--tile", "64", "--overlap", "16"])
        assert rc == 0
        with rasterio.open(tmp_path / eng / "s_prob.tif") as ds:
            outs[eng] = ds.read(1)
    a, b = outs["nchw"], outs["onnx"]
    assert np.array_equal(np.isnan(a), np.isnan(b))
    np.testing.assert_allclose(b[~np.isnan(b)], a[~np.isnan(a)], rtol=1e-4, atol=1e-5)
    assert list(cache.glob("*.onnx"))


def test_predict_cli_onnx_unavailable_is_one_line(tmp_path, scene, tiny_ckpt, monkeypatch, capsys):
    from msff.inference.cli import main

    monkeypatch.setattr(E, "onnx_available", lambda: "onnxruntime is not installed (pip install 'msff[onnx]')")
    rc = main([str(tiny_ckpt), str(scene[0]), "--out", str(tmp_path / "x"), "--engine", "onnx", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "msff[onnx]" in err[0]
    assert not list(tmp_path.glob("x_*"))
