"""Effective receptive field: analytic cases (a single convolution's ERF is its kernel), the
mass radii against a direct computation, the zoo networks' stages, and the command."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from msff.analysis.erf import effective_receptive_field, encoder_stages, mass_radius


def _conv_model(kh, kw, weight=None, c_in=1, c_out=1, stride=1):
    m = nn.Sequential(nn.Conv2d(c_in, c_out, (kh, kw), stride=stride, padding=(kh // 2, kw // 2), bias=False))
    if weight is not None:
        with torch.no_grad():
            m[0].weight.copy_(weight)
    return m


@pytest.mark.parametrize("k", [3, 7])
def test_single_conv_erf_is_the_kernel(k):
    torch.manual_seed(0)
    m = _conv_model(k, k, c_in=2, c_out=3)
    r = effective_receptive_field(m, size=33, n_inputs=3, stages=[("conv", m[0])])
    (st,) = r["stages"]
    e = r["maps"][0]
    assert st["support"] == [k, k] and st["stride"] == 1 and st["centre"] == [16.0, 16.0]
    # The gradient of Σ_c y_c[centre] w.r.t. x is Σ_c w_c placed at the centre: the ERF is Σ_bands |Σ_c w|.
    want = m[0].weight.detach().sum(0).abs().sum(0).double().numpy()
    np.testing.assert_allclose(e[16 - k // 2 : 16 + k // 2 + 1, 16 - k // 2 : 16 + k // 2 + 1], want, rtol=1e-6)
    assert e.sum() == pytest.approx(want.sum())


def test_horizontal_1x15_conv_has_extent_15_and_exact_radii():
    m = _conv_model(1, 15, weight=torch.ones(1, 1, 1, 15))
    r = effective_receptive_field(m, size=31, n_inputs=2, stages=[("conv", m[0])])
    (st,) = r["stages"]
    assert st["support"] == [1, 15]
    # Uniform mass on 15 pixels in a row: 9 pixels (radius 4) hold ≥ 50 %, all 15 (radius 7) ≥ 90 %.
    assert (st["r50"], st["r90"]) == (4.0, 7.0)
    v = _conv_model(15, 1, weight=torch.ones(1, 1, 15, 1))
    assert effective_receptive_field(v, size=31, n_inputs=1, stages=[("c", v[0])])["stages"][0]["support"] == [15, 1]


def test_stacked_convs_and_stride():
    m = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.Conv2d(1, 1, 3, padding=1, stride=2), nn.Conv2d(1, 1, 3, padding=1))
    r = effective_receptive_field(m, size=32, n_inputs=1, stages=["0", "1", "2"])
    sup = [s["support"] for s in r["stages"]]
    # 3 → 3 + 2 = 5 → then a 3×3 conv at stride 2 adds 2·2 = 4: 9 (all odd-centred here).
    assert sup == [[3, 3], [5, 5], [9, 9]]
    assert [s["stride"] for s in r["stages"]] == [1, 2, 2]
    assert r["stages"][1]["centre"] == [16.5, 16.5]


def test_mass_radius_matches_direct_sum():
    rng = np.random.default_rng(0)
    e = rng.random((21, 25)) ** 4
    c = (9.5, 12.0)
    r50, r90 = mass_radius(e, c)
    yy, xx = np.indices(e.shape)
    d = np.hypot(yy - c[0], xx - c[1])
    for f, r in ((0.5, r50), (0.9, r90)):
        assert e[d <= r].sum() >= f * e.sum()
        smaller = d[d < r].max()
        assert e[d <= smaller].sum() < f * e.sum()
    assert np.isnan(mass_radius(np.zeros((3, 3)), (1, 1))[0])


@pytest.mark.parametrize("name,first_support,n", [
    ("msffnet-baseline", [5, 5], 5),   # E1 = two 3×3 convs
    ("unet", [5, 5], 5),
    ("deeplabv3plus-resnet50", [7, 7], 6),  # stem: one 7×7 conv at stride 2
])
def test_zoo_networks_stages(name, first_support, n):
    from msff.models.zoo import create_model

    torch.manual_seed(0)
    m = create_model(name, in_channels=3, width_multiplier=0.0625)
    r = effective_receptive_field(m, size=64, n_inputs=2)
    assert len(r["stages"]) == n and r["stages"][0]["support"] == first_support
    assert all(s["r90"] >= s["r50"] > 0 for s in r["stages"])
    assert m.training is True or m.training is False  # restored, whatever it was


def test_lkam_stage_sees_the_whole_input_through_channel_attention():
    from msff.models.zoo import create_model

    torch.manual_seed(0)
    m = create_model("msffnet-lkam", in_channels=3, width_multiplier=0.0625, lkam_blocks=1)
    m.train()
    r = effective_receptive_field(m, size=48, n_inputs=2)
    assert r["stages"][0]["support"] == [48, 48]  # global pooling in the attention: formally global
    assert m.training  # restored


def test_unknown_model_and_missing_stage():
    with pytest.raises(ValueError, match="no known encoder stages"):
        encoder_stages(nn.Conv2d(1, 1, 3))
    m = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.Conv2d(1, 1, 3, padding=1))
    with pytest.raises(ValueError, match="did not run"):
        effective_receptive_field(m, size=8, n_inputs=1, stages=[("x", nn.Conv2d(1, 1, 1))])


def test_erf_command_random_init_and_checkpoint(tmp_path, capsys):
    from msff.cli import main
    from msff.models.zoo import create_model, save_model

    assert main(["erf", "msffnet-baseline", "--out", str(tmp_path), "--size", "48", "--inputs", "2",
                 "--width-multiplier", "0.0625"]) == 0
    res = json.loads((tmp_path / "erf_msffnet-baseline.json").read_text())
    assert [s["name"] for s in res["stages"]] == ["E1", "E2", "E3", "E4", "E5"]
    assert (tmp_path / "erf_msffnet-baseline.png").stat().st_size > 1000
    assert "r50 px" in capsys.readouterr().out
    ck = tmp_path / "ck"
    torch.manual_seed(1)
    save_model(create_model("unet", in_channels=3, width_multiplier=0.0625), ck, {})
    assert main(["erf", str(ck), "--out", str(tmp_path), "--size", "32", "--inputs", "1"]) == 0
    assert json.loads((tmp_path / "erf_ck.json").read_text())["stages"][0]["support"] == [5, 5]
    assert main(["erf", "no-such-model", "--out", str(tmp_path)]) == 2
    assert "neither a checkpoint" in capsys.readouterr().err
