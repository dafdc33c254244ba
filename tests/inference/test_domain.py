"""Input domain check and input scaling: a uint16 scene into a uint8-trained model warns (and
--strict refuses) with the numbers; the right --input-scale silences it; the scale round-trips
through save/load and is applied identically by training, evaluation and prediction."""
import json
import os
import warnings

import numpy as np
import pytest
import torch
from conftest import ConstantModel, PixelModel, smooth_bands, write_tif

from msff.data import SegmentationDataset, compute_normalization, find_pairs
from msff.data.domain import DomainError, DomainWarning, compare_domain
from msff.data.scaling import InputScale, ScaleError
from msff.inference import load_predictor, predict_scene
from msff.inference.cli import main as predict_main


def _png_dataset(root, n=6, size=48, seed=0):
    """8-bit RGB PNG chips with 0/255 masks (a small landslide blob in each)."""
    import rasterio

    rng = torch.Generator().manual_seed(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        img = smooth_bands(3, size, size, lo=10, hi=245, rng=rng).astype(np.uint8)
        m = np.zeros((size, size), np.uint8)
        m[10:18, 5 + i : 15 + i] = 255
        for name, arr in (("images", img), ("masks", m[None])):
            with rasterio.open(root / name / f"c{i}.png", "w", driver="PNG", width=size, height=size,
                               count=arr.shape[0], dtype="uint8") as ds:
                ds.write(arr)
    return root


@pytest.fixture
def card8(tmp_path):
    """Model card of 8-bit training data (normalisation + input scale + domain statistics)."""
    ds = SegmentationDataset(find_pairs(_png_dataset(tmp_path / "png")))
    norm = compute_normalization(ds)
    return {"normalization": norm, "model_name": "png8", **ds.model_card()}


def _predictor(card, model=None):
    from msff.inference.predictor import Predictor

    return Predictor(model or PixelModel(3), mean=card["normalization"]["mean"], std=card["normalization"]["std"],
                     metadata=card, input_scale=card.get("input_scale"), name=card["model_name"])


def test_card_holds_training_ranges_and_fractions(card8):
    d = card8["domain"]
    assert [b["dtype"] for b in d["bands"]] == ["uint8"] * 3
    assert all(0 <= b["raw_min"] < b["raw_max"] <= 255 for b in d["bands"])
    lf = d["landslide_fraction"]
    assert lf["pixels"] == pytest.approx(80 / 48**2) and lf["images"] == 6
    assert card8["input_scale"]["kind"] == "none"


def test_uint16_scene_into_uint8_model_warns_with_numbers(card8, tmp_path):
    x = smooth_bands(3, 120, 140, lo=300, hi=4000)
    scene = write_tif(tmp_path / "s2.tif", x)
    with pytest.warns(DomainWarning) as rec:
        r = predict_scene(_predictor(card8), scene, tmp_path / "p.tif", progress=False)
    msg = str(rec[0].message)
    assert "band 1" in msg and "band 3" in msg and "training std" in msg and "uint16" in msg and "uint8" in msg
    assert "--input-scale" in msg and "--strict" in msg
    b1 = r.extra["domain"]["bands"][0]
    assert b1["scene_mean"] == pytest.approx(x[0].mean(), rel=0.05)
    assert b1["train_mean"] == pytest.approx(card8["normalization"]["mean"][0])
    assert b1["z"] > 3 and f"{b1['scene_mean']:.0f}" in msg
    assert not r.extra["domain"]["ok"]


def test_strict_refuses_before_writing(card8, tmp_path):
    scene = write_tif(tmp_path / "s2.tif", smooth_bands(3, 60, 70, lo=300, hi=4000))
    with pytest.raises(DomainError, match=r"band 2 .*training std.*--strict"):
        predict_scene(_predictor(card8), scene, tmp_path / "p.tif", tmp_path / "m.tif", progress=False,
                      domain_check="strict")
    assert sorted(f for f in os.listdir(tmp_path) if f != "png") == ["s2.tif"]


def test_right_input_scale_passes(card8, tmp_path):
    scene = write_tif(tmp_path / "s2.tif", smooth_bands(3, 120, 140, lo=300, hi=4000))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DomainWarning)
        r = predict_scene(_predictor(card8, ConstantModel(3, -5.0)), scene, tmp_path / "p.tif", progress=False,
                          input_scale="percentile:2,98:255")
    assert r.extra["domain"]["ok"]
    s = r.extra["input_scale"]
    assert s["kind"] == "percentile" and s["fitted_on"] == "scene" and len(s["low"]) == 3
    # the same uint8-like scene needs nothing
    scene8 = write_tif(tmp_path / "s8.tif", smooth_bands(3, 80, 90, lo=10, hi=245).astype(np.uint8))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DomainWarning)
        r8 = predict_scene(_predictor(card8, ConstantModel(3, -5.0)), scene8, tmp_path / "p8.tif", progress=False)
    assert r8.extra["domain"]["ok"]


def test_landslide_fraction_far_above_training_warns(card8, tmp_path):
    scene = write_tif(tmp_path / "s8.tif", smooth_bands(3, 50, 60, lo=10, hi=245).astype(np.uint8))
    with pytest.warns(DomainWarning, match=r"landslide fraction 100\.0 % .* far above the training"):
        r = predict_scene(_predictor(card8, ConstantModel(3, logit=5.0)), scene, tmp_path / "p.tif", progress=False)
    assert r.extra["landslide_fraction"] == 1.0 and "fraction_warning" in r.extra
    with warnings.catch_warnings():
        warnings.simplefilter("error", DomainWarning)
        predict_scene(_predictor(card8, ConstantModel(3, logit=-5.0)), scene, tmp_path / "q.tif", progress=False)


def _ckpt(tmp_path, card):
    from msff import MSFFNet

    m = MSFFNet(in_channels=3, width_multiplier=0.0625, lkam_blocks=1, kernel_size=3)
    return m.save_pretrained(tmp_path / "ckpt", metadata=card)


def test_cli_warns_strict_fails_and_sidecar_has_numbers(card8, tmp_path, capsys):
    ck = _ckpt(tmp_path, card8)
    scene = write_tif(tmp_path / "s2.tif", smooth_bands(3, 70, 80, lo=300, hi=4000))
    assert predict_main([str(ck), str(scene), "--out", str(tmp_path / "a"), "--tile", "64", "--overlap", "16", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "msff predict: warning:" in err and "does not look like the training data of model 'png8'" in err
    doc = json.loads((tmp_path / "a_run.json").read_text())
    assert doc["domain"]["ok"] is False and doc["domain"]["bands"][0]["z"] > 3
    assert doc["input_scale"]["kind"] == "none" and 0 <= doc["landslide_fraction"] <= 1
    rc = predict_main([str(ck), str(scene), "--out", str(tmp_path / "b"), "--strict", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "error:" in err and "refused under --strict" in err and "Traceback" not in err
    assert not any(f.startswith("b_") for f in os.listdir(tmp_path))
    assert predict_main([str(ck), str(scene), "--out", str(tmp_path / "c"), "--strict", "--quiet",
                         "--input-scale", "percentile:2,98:255"]) == 0
    cap = capsys.readouterr()
    assert "does not look like" not in cap.err
    assert "input scale: per-band percentile stretch p2..p98 -> 0..255" in cap.out and "input domain check: ok" in cap.out
    assert predict_main([str(ck), str(scene), "--out", str(tmp_path / "d"), "--input-scale", "divide:0"]) == 2
    assert "divide needs a finite constant > 0" in capsys.readouterr().err


# ---- input scale ---------------------------------------------------------------------------------


def test_scale_parse_and_errors():
    assert InputScale.parse("none").kind == "none"
    assert InputScale.parse("divide:10000").divisor == 10000
    p = InputScale.parse("percentile:1,99:1")
    assert (p.percentiles, p.out_max, p.needs_fit) == ((1.0, 99.0), 1.0, True)
    assert InputScale.parse("percentile").percentiles == (2.0, 98.0)
    for bad in ("divide", "divide:-3", "percentile:98,2", "stretch", "percentile:a,b"):
        with pytest.raises(ScaleError, match="input scale"):
            InputScale.parse(bad)


def test_scale_apply_matches_definition():
    rng = np.random.default_rng(0)
    raw = rng.uniform(100, 5000, (2, 30, 40)).astype(np.float32)
    s = InputScale.parse("percentile:2,98:255").fit(raw.reshape(2, -1))
    lo = np.percentile(raw.reshape(2, -1), 2, axis=1)
    hi = np.percentile(raw.reshape(2, -1), 98, axis=1)
    want = np.clip((raw - lo[:, None, None]) / (hi - lo)[:, None, None] * 255, 0, 255)
    np.testing.assert_allclose(s.apply(raw.copy()), want, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(InputScale.parse("divide:10000").apply(raw.copy()), raw / 10000, rtol=1e-6)
    with pytest.raises(ScaleError, match="fitted on 2 band"):
        s.apply(raw[:1].copy())


def test_scale_round_trips_through_save_load(tmp_path, norm3):
    s = InputScale.parse("percentile:2,98:255").fit(np.random.default_rng(1).uniform(0, 9, (3, 500)), "training split")
    ck = _ckpt(tmp_path, {"normalization": norm3, "input_scale": s.to_dict(), "model_name": "x"})
    p = load_predictor(ck)
    assert p.input_scale == s
    assert InputScale.from_dict(json.loads(json.dumps(s.to_dict()))) == s


def test_training_fits_scale_on_train_split_and_predict_applies_the_same(tmp_path):
    """One implementation: dataset items == Predictor.normalize of the same raw pixels."""
    from msff.inference.predictor import Predictor

    root = _png_dataset(tmp_path / "png", n=4)
    ds = SegmentationDataset(find_pairs(root), input_scale="percentile:2,98:1")
    norm = compute_normalization(ds)
    assert ds.input_scale.fitted_on == "training split" and not ds.input_scale.needs_fit
    assert all(abs(m - 0.5) < 0.25 for m in norm["mean"])  # in stretched 0..1 units
    ds.normalization = norm
    item = ds[0]["image"].numpy()
    p = Predictor(PixelModel(3), mean=norm["mean"], std=norm["std"], input_scale=ds.input_scale)
    raw = ds.raw(0)[0].astype(np.float32)
    np.testing.assert_allclose(p.normalize(raw.copy()), item, rtol=1e-5, atol=1e-5)


def test_fit_stores_scale_and_domain_in_the_card(tmp_path):
    from msff.engine import TrainConfig, fit

    root = _png_dataset(tmp_path / "png", n=4, size=32)
    pairs = find_pairs(root)
    train = SegmentationDataset(pairs[:3], input_scale="divide:255")
    val = SegmentationDataset(pairs[3:])
    cfg = TrainConfig(preset="tiny", epochs=1, batch_size=2, device="cpu", overlays=0, eval_batch_size=2)
    fit(cfg, train, val, tmp_path / "run", progress=False)
    assert val.input_scale.kind == "none"  # fit changes no dataset it is given (its data module evaluates with train's scale)
    p = load_predictor(tmp_path / "run")
    assert p.input_scale == InputScale.parse("divide:255")
    assert p.metadata["domain"]["bands"][0]["dtype"] == "uint8"
    assert p.metadata["normalization"]["mean"][0] < 1.0  # statistics in scaled units


def test_compare_domain_without_ranges_uses_mean_std():
    r = compare_domain({"normalization": {"mean": [0.5], "std": [0.1]}}, np.random.default_rng(0).normal(0.52, 0.1, (1, 500)), ["float32"])
    assert r.ok and r.notes and "no training value ranges" in r.notes[0]


def test_evaluate_checks_the_domain_too(card8, tmp_path, capsys):
    from msff.cli import main as msff_main

    ck = _ckpt(tmp_path, card8)
    root = tmp_path / "s2"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(2):
        write_tif(root / "images" / f"t{i}.tif", smooth_bands(3, 40, 40, lo=300, hi=4000))
        m = np.zeros((40, 40), np.uint8)
        m[5:10, 5:10] = 1
        write_tif(root / "masks" / f"t{i}.tif", m)
    out = tmp_path / "ev.json"
    assert msff_main(["evaluate", str(ck), str(root), "--out", str(out), "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "msff evaluate: warning:" in err and "training std" in err and "uint16" in err
    doc = json.loads(out.read_text())
    assert doc["domain"]["ok"] is False and doc["domain"]["bands"][0]["z"] > 3
    rc = msff_main(["evaluate", str(ck), str(root), "--out", str(tmp_path / "ev2.json"), "--strict", "--device", "cpu"])
    assert rc == 2 and "refused under --strict" in capsys.readouterr().err
    assert not (tmp_path / "ev2.json").exists()
    assert msff_main(["evaluate", str(ck), str(root), "--out", str(tmp_path / "ev3.json"), "--strict", "--device", "cpu",
                      "--input-scale", "percentile:2,98:255"]) == 0
    assert json.loads((tmp_path / "ev3.json").read_text())["input_scale"]["fitted_on"] == "evaluation data"
