"""The typed model card: round trip, old metadata dicts, portable paths, one-line errors."""
import json

import pytest

from msff.models.card import CheckpointError, MaskEncodingCard, ModelCard, Normalization, portable

# The metadata dict msff.engine.train built by hand before the card (keys and shapes as written).
OLD_METADATA = {
    "normalization": {"mean": [10.0, 20.0, 30.0], "std": [1.0, 2.0, 3.0]},
    "bands": [4, 3, 2],
    "threshold": 0.45,
    "model_name": "msffnet",
    "in_channels": 3,
    "mask_encoding": {"color": [255, 255, 0], "threshold": 0.5, "ignore_values": []},
    "train": {"epochs": 3, "lr": 1e-3, "model": "msffnet"},
    "input_scale": {"kind": "divide", "divisor": 255.0, "percentiles": [2.0, 98.0], "out_max": 255.0,
                    "low": None, "high": None, "fitted_on": None},
    "domain": {"bands": [{"name": "band 1", "min": 0}], "landslide_fraction": {"pixels": 0.1}},
    "stack": {"terrain": [], "dates": None, "extra_rasters": [], "bands_per_date": None},
    "data": {"data": ["/home/someone/iburi/train", "rel/val"], "val_ratio": 0.2},
    "splits": {"train": ["a.tif"], "val": ["b.tif"], "test": []},
    "best_epoch": 2,
    "val_metrics": {"val_iou": 0.5},
    "experiment": "iburi-vs-unet",
}


def test_old_metadata_reads_typed_and_writes_back_the_same_keys():
    card = ModelCard.from_dict(OLD_METADATA, "ckpt/config.json")
    assert card.normalization == Normalization((10, 20, 30), (1, 2, 3))
    assert card.mask_encoding == MaskEncodingCard((255, 255, 0), 0.5, ())
    assert card.threshold == 0.45 and card.in_channels == 3 and card.best_epoch == 2
    assert card.training == {"epochs": 3, "lr": 1e-3, "model": "msffnet"}
    assert card.extra == {"splits": OLD_METADATA["splits"], "experiment": "iburi-vs-unet"}
    assert card.scale.kind == "divide"
    d = card.to_dict()
    assert set(d) == set(OLD_METADATA)
    assert d["data"]["data"] == ["train", "rel/val"]  # no machine-specific absolute path survives
    assert ModelCard.from_dict(json.loads(json.dumps(d))) == card


def test_card_reads_like_the_old_dict():
    card = ModelCard.from_dict(OLD_METADATA)
    assert card["normalization"]["mean"] == [10.0, 20.0, 30.0]
    assert card.get("threshold", 0.5) == 0.45
    assert card.get("nothing") is None and "nothing" not in card
    assert dict(card, model_name="x")["model_name"] == "x"
    assert card.mask_encoding.to_encoding().color == (255, 255, 0)
    with pytest.raises(TypeError):
        card["threshold"] = 0.1  # read-only: change a card with replace()
    assert card.replace(threshold=0.2, train={"epochs": 9}).training == {"epochs": 9}
    assert card.threshold == 0.45


def test_an_empty_card_has_the_defaults():
    card = ModelCard.from_dict(None)
    assert card.to_dict() == {"threshold": 0.5}
    assert card.normalization is None and card.scale.kind == "none"


@pytest.mark.parametrize(
    "key, value, needle",
    [
        ("threshold", "high", "'threshold' must be a number in [0, 1]"),
        ("threshold", 1.5, "'threshold' must be a number in [0, 1]"),
        ("normalization", {"mean": [1.0]}, "'normalization' must be"),
        ("normalization", {"mean": [1.0], "std": [0.0]}, "std must be > 0"),
        ("normalization", {"mean": [1.0, 2.0], "std": [1.0]}, "2 means but 1 stds"),
        ("bands", "4,3,2", "'bands' must be a list"),
        ("in_channels", 0, "'in_channels' must be an integer >= 1"),
        ("mask_encoding", {"color": [1, 2]}, "'mask_encoding' must be"),
        ("input_scale", {"divisor": 3}, "'input_scale' must be a dict with 'kind'"),
        ("train", [1, 2], "'train' must be a dict"),
        ("domain", {"x": object()}, "'domain' is not JSON-serialisable"),
    ],
)
def test_a_wrong_entry_is_one_line_naming_the_file_and_key(key, value, needle):
    with pytest.raises(CheckpointError) as e:
        ModelCard.from_dict({key: value}, "runs/x/best/config.json")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("runs/x/best/config.json") and needle in msg


def test_numpy_values_and_nan_metrics_are_stored():
    np = pytest.importorskip("numpy")
    card = ModelCard(val_metrics={"val_iou": float("nan"), "n": np.int64(3)}, domain={"m": np.float32(0.5), "a": np.arange(2)})
    back = ModelCard.from_dict(json.loads(json.dumps(card.to_dict())))
    assert back.domain == {"m": 0.5, "a": [0, 1]} and back.val_metrics["n"] == 3
    assert back.val_metrics["val_iou"] != back.val_metrics["val_iou"]  # NaN


def test_portable_keeps_relative_paths_and_non_paths():
    assert portable({"a": "/abs/dir/file.tif", "b": "dir/file.tif", "c": 3, "d": ("/x/y",), "e": "a/b c"}) == {
        "a": "file.tif", "b": "dir/file.tif", "c": 3, "d": ["y"], "e": "a/b c"}
    assert portable("C:\\data\\iburi") == "iburi"


@pytest.mark.parametrize("fmt", ["msff.MSFFNet", "msff.zoo"])
def test_card_of_an_old_checkpoint_config(tmp_path, fmt):
    meta = dict(OLD_METADATA)
    if fmt == "msff.MSFFNet":
        cfg = {"format": fmt, "format_version": 1, "config": {"in_channels": 3}, "metadata": meta}
    else:
        meta.pop("model_name")
        cfg = {"format": fmt, "format_version": 1, "model_name": "unet", "in_channels": 3, "classes": 1,
               "kwargs": {}, "metadata": meta}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    card = ModelCard.from_checkpoint(tmp_path)
    assert card.threshold == 0.45 and card.model_name == ("msffnet" if fmt == "msff.MSFFNet" else "unet")


def test_card_of_a_foreign_or_broken_config_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(CheckpointError, match="is not an msff checkpoint config"):
        ModelCard.from_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is corrupt"):
        ModelCard.from_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError):
        ModelCard.from_checkpoint(tmp_path / "absent")
