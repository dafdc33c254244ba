"""The model zoo: names, ablation switches, library wrappers, save/load."""
import json

import pytest
import torch

from msff.models import MSFFNet
from msff.models.blocks import ASPP, LKAMBlock
from msff.models.msffnet import CheckpointError
from msff.models.zoo import (
    available_models,
    count_parameters,
    create_model,
    load_model,
    model_info,
    save_model,
)

TINY_MSFF = dict(width_multiplier=0.0625, kernel_size=5, lkam_blocks=1, backend="reference")
OWN = [n for n in available_models(include_uninstalled=True) if model_info(n).implementation == "msff"]


def _tiny(name):
    return TINY_MSFF if name.startswith("msffnet") else dict(width_multiplier=0.0625)


def test_names_cover_the_papers_comparisons():
    names = set(available_models(include_uninstalled=True))
    assert {"msffnet", "msffnet-baseline", "msffnet-lkam", "msffnet-aspp", "fcn", "segnet", "unet",
            "deeplabv3plus", "deeplabv3plus-vgg16", "deeplabv3plus-resnet101", "resnet50-skip",
            "resnet101-skip"} <= names
    assert set(OWN) <= set(available_models())  # msff's own networks never need an extra
    with pytest.raises(ValueError, match="unknown model"):
        create_model("no-such-net", 3)


@pytest.mark.parametrize("name", [n for n in OWN if n.startswith("msffnet")])
@pytest.mark.parametrize("bands", [3, 14])
def test_msffnet_variants_forward_backward(name, bands):
    model = create_model(name, bands, **TINY_MSFF)
    x = torch.randn(2, bands, 37, 53)
    y = model(x)
    assert y.shape == (2, 1, 37, 53)
    y.mean().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", [n for n in OWN if not n.startswith("msffnet")])
def test_own_networks_build_with_any_bands(name):
    model = create_model(name, 14, classes=1, **_tiny(name)).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 14, 37, 53)).shape == (1, 1, 37, 53)
    assert model.zoo_name == name and model.zoo_kwargs["in_channels"] == 14


@pytest.mark.parametrize(
    "name,lkam,aspp",
    [("msffnet", True, True), ("msffnet-baseline", False, False), ("msffnet-lkam", True, False),
     ("msffnet-aspp", False, True)],
)
def test_ablation_variants_are_msffnet_switches(name, lkam, aspp):
    model = create_model(name, 3, **TINY_MSFF)
    assert type(model) is MSFFNet
    assert (model.config["use_lkam"], model.config["use_aspp"]) == (lkam, aspp)
    assert any(isinstance(m, LKAMBlock) for m in model.modules()) == lkam
    assert any(isinstance(m, ASPP) for m in model.modules()) == aspp
    # Caller kwargs override the name's defaults.
    assert create_model("msffnet-baseline", 3, use_aspp=True, **TINY_MSFF).config["use_aspp"] is True


def test_width_multiplier_shrinks_networks():
    for name in ("unet", "segnet", "deeplabv3plus-vgg16"):
        small = count_parameters(create_model(name, 3, width_multiplier=0.125))
        half = count_parameters(create_model(name, 3, width_multiplier=0.25))
        assert 3.0 < half / small < 4.5, name


@pytest.mark.parametrize("name", ["tv-fcn-resnet50", "smp-unet",
                                  pytest.param("tv-deeplabv3-resnet50", marks=pytest.mark.slow),
                                  pytest.param("smp-deeplabv3plus", marks=pytest.mark.slow)])
def test_library_wrappers(name):
    info = model_info(name)
    if not info.installed:
        pytest.skip(f"{info.requires} not installed (optional extra msff[zoo])")
    kwargs = {"encoder_name": "resnet18"} if name.startswith("smp") else {}
    model = create_model(name, 14, **kwargs)
    x = torch.randn(2, 14, 37, 53)
    y = model(x)
    assert y.shape == (2, 1, 37, 53)
    y.mean().backward()
    assert model.net is not None and info.implementation in ("torchvision", "segmentation_models_pytorch")
    with pytest.raises(ValueError, match="fixed widths"):
        create_model(name, 3, width_multiplier=0.5)


def test_uninstalled_library_gives_a_clear_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: None if n == "segmentation_models_pytorch" else real(n, *a))
    assert "smp-unet" not in available_models()
    with pytest.raises(ImportError, match=r"msff\[zoo\]"):
        create_model("smp-unet", 3)


@pytest.mark.parametrize("name", ["segnet", "deeplabv3plus-resnet50", "msffnet-lkam"])
def test_save_load_round_trip(tmp_path, name):
    model = create_model(name, 4, **_tiny(name))
    x = torch.randn(1, 4, 37, 53)
    model.train()
    model(torch.randn(2, 4, 32, 32))  # move BN running stats away from their initial values
    model.eval()
    meta = {"normalization": {"mean": [1.0] * 4, "std": [2.0] * 4}, "threshold": 0.4, "train": {"epochs": 3}}
    path = save_model(model, tmp_path / "ckpt", meta)
    loaded, got = load_model(path)
    assert got["model_name"] == name and got["threshold"] == 0.4 and got["normalization"] == meta["normalization"]
    assert type(loaded) is type(model) and not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    if name.startswith("msffnet"):  # MSFFNet checkpoints stay readable by MSFFNet itself
        assert MSFFNet.from_pretrained(path).config["use_aspp"] is False
    save_model(model, path, meta)  # overwriting an existing checkpoint works


def test_load_errors(tmp_path):
    model = create_model("unet", 3, width_multiplier=0.0625)
    path = save_model(model, tmp_path / "u")
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing")
    (path / "model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(path)
    path = save_model(model, tmp_path / "u2")
    cfg = json.loads((path / "config.json").read_text())
    cfg["init_args"]["width_multiplier"] = 0.125  # config no longer matches the weights
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_model(path)
    (path / "config.json").write_text("{broken")
    with pytest.raises(CheckpointError):
        load_model(path)
    with pytest.raises(ValueError, match="needs an msff network"):
        save_model(torch.nn.Conv2d(3, 1, 1), tmp_path / "plain")


def test_engine_builds_zoo_models():
    from msff.engine.train import TrainConfig, build_model

    m = build_model(TrainConfig(model="segnet", width_multiplier=0.0625), in_channels=5)
    assert m.zoo_name == "segnet" and m(torch.randn(1, 5, 33, 33)).shape == (1, 1, 33, 33)
    m = build_model(TrainConfig(model="msffnet-aspp", preset="tiny"), in_channels=3)
    assert m.config["use_aspp"] and not m.config["use_lkam"]
