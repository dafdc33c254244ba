"""Model contract tests for the reference MSFFNet (smp-style), on CPU with small widths.

Shapes and semantics follow Yi & Tan (2025): Table 1 stage shapes, the LKAM layer's 1×15/15×1
kernels, ablation switches, and any input size / band count.
"""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from msff import CheckpointError, MSFFNet, build_model
from msff.models import ASPP, LKAMBlock, LKAMLayer, SeparableLargeKernelConv, VGGLayer

TINY = dict(width_multiplier=0.0625, lkam_blocks=1, kernel_size=7)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_table1_stage_shapes_paper_width():
    """512×512×3 → 256²×64 → 128²×128 → 64²×256 → 32²×512 → ASPP 32²×1024 (paper Table 1)."""
    model = MSFFNet().eval()
    seen = {}
    hooks = [p.register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(f"pool{k}", o.shape))
             for k, p in enumerate(model.encoder.pools)]
    aspp = model.encoder.e5[1]
    assert isinstance(aspp, ASPP)
    hooks.append(aspp.register_forward_hook(lambda m, i, o: seen.__setitem__("aspp", o.shape)))
    with torch.no_grad():
        y = model(torch.randn(1, 3, 512, 512))
    for h in hooks:
        h.remove()
    assert y.shape == (1, 1, 512, 512)
    assert seen["pool0"] == (1, 64, 256, 256)
    assert seen["pool1"] == (1, 128, 128, 128)
    assert seen["pool2"] == (1, 256, 64, 64)
    assert seen["pool3"] == (1, 512, 32, 32)
    assert seen["aspp"] == (1, 1024, 32, 32)


def _assert_pad_and_crop(model, x):
    """The model's internal pad-and-crop equals running it on the input explicitly zero-padded
    (bottom/right) to a multiple of 16 and cropping the logits back (eval mode, so BN is a fixed
    map). Returns the model's output."""
    model = model.eval()
    h, w = x.shape[-2:]
    padded = torch.nn.functional.pad(x, (0, (-w) % 16, 0, (-h) % 16))
    with torch.no_grad():
        y = model(x)
        want = model(padded)[..., :h, :w]
    assert y.shape == want.shape
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)
    return y


@pytest.mark.parametrize("h,w", [(97, 123), (37, 53), (16, 16), (5, 9), (1, 1), (64, 200)])
def test_any_resolution(h, w):
    model = MSFFNet(**TINY)
    x = torch.randn(2, 3, h, w)
    y = model(x)
    assert y.shape == (2, 1, h, w)
    assert torch.isfinite(y).all()
    y = _assert_pad_and_crop(model, x)
    assert y.shape == (2, 1, h, w)


@pytest.mark.parametrize("in_channels,classes", [(1, 1), (3, 2), (14, 1), (4, 2)])
def test_bands_and_classes(in_channels, classes):
    model = MSFFNet(in_channels=in_channels, classes=classes, **TINY)
    y = model(torch.randn(2, in_channels, 40, 24))
    assert y.shape == (2, classes, 40, 24)
    y = _assert_pad_and_crop(model, torch.randn(2, in_channels, 37, 21))
    assert y.shape == (2, classes, 37, 21)


def test_forward_backward_all_params_get_gradients():
    model = MSFFNet(**TINY).train()
    x = torch.randn(2, 3, 48, 48, requires_grad=True)
    model(x).square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert no_grad == []
    # At tiny width an SE hidden layer has a single ReLU unit, which may be dead for a given
    # input; every other parameter must receive a non-zero gradient.
    zero = [n for n, p in model.named_parameters() if p.grad.abs().sum() == 0 and ".attention." not in n]
    assert zero == [], f"parameters with identically zero gradient: {zero}"


def test_batch_one_training_works():
    model = MSFFNet(**TINY).train()
    model(torch.randn(1, 3, 32, 32)).mean().backward()


def test_activation_options():
    x = torch.randn(1, 3, 32, 32)
    m = MSFFNet(**TINY).eval()
    logits = m(x)
    m2 = MSFFNet(**TINY, activation="sigmoid").eval()
    m2.load_state_dict(m.state_dict())
    torch.testing.assert_close(m2(x), torch.sigmoid(logits))
    with pytest.raises(ValueError, match="activation"):
        MSFFNet(activation="tanhh")


def test_wrong_band_count_and_rank_errors():
    m = MSFFNet(in_channels=4, **TINY)
    with pytest.raises(ValueError, match="4 input bands, got 3"):
        m(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="4-D"):
        m(torch.randn(4, 32, 32))


def test_lkam_layer_kernels_are_1xk_and_kx1():
    layer = MSFFNet().encoder.e1
    assert isinstance(layer, LKAMLayer) and len(layer) == 3
    for block in layer:
        assert isinstance(block, LKAMBlock)
        a1, a2 = block.conv.branch_a
        b1, b2 = block.conv.branch_b
        assert a1.conv.kernel_size == (1, 15) and a2.conv.kernel_size == (15, 1)
        assert b1.conv.kernel_size == (15, 1) and b2.conv.kernel_size == (1, 15)
        # full channel mixing, not depthwise
        assert a1.conv.groups == 1 and a2.conv.groups == 1
        assert isinstance(a1.bn, nn.BatchNorm2d)
        assert block.attention.fc1.out_channels == block.out_channels // 8


def test_receptive_field_after_e1_spans_kernel():
    """The gradient of one E1 output pixel w.r.t. the input reaches ≥ 15 px in both directions."""
    torch.manual_seed(0)
    enc = MSFFNet(width_multiplier=0.125).encoder.e1.eval()
    x = torch.randn(1, 3, 61, 61, requires_grad=True)
    y = enc(x)
    y[0, :, 30, 30].sum().backward()
    g = x.grad[0].abs().sum(0)
    rows = torch.nonzero(g.sum(1) > 0).flatten()
    cols = torch.nonzero(g.sum(0) > 0).flatten()
    assert rows.max() - rows.min() + 1 >= 15
    assert cols.max() - cols.min() + 1 >= 15
    # the separable large-kernel conv alone (no SE global pooling) sees exactly k×k = 15×15 px:
    # each branch has one 1×k and one k×1 tap
    sep = SeparableLargeKernelConv(3, 8, kernel_size=15).eval()
    x2 = torch.randn(1, 3, 61, 61, requires_grad=True)
    sep(x2)[0, :, 30, 30].sum().backward()
    g2 = x2.grad[0].abs().sum(0)
    r2 = torch.nonzero(g2.sum(1) > 0).flatten()
    c2 = torch.nonzero(g2.sum(0) > 0).flatten()
    assert (r2.min().item(), r2.max().item(), c2.min().item(), c2.max().item()) == (23, 37, 23, 37)


def test_separable_conv_matches_manual_composition():
    m = SeparableLargeKernelConv(3, 5, kernel_size=7).eval()
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.2, 0.2)
    x = torch.randn(2, 3, 11, 13)

    def cbr(cbr_mod, t):
        conv, bn = cbr_mod.conv, cbr_mod.bn
        t = torch.nn.functional.conv2d(t, conv.weight, padding=conv.padding)
        t = (t - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
        return torch.relu(t * bn.weight[:, None, None] + bn.bias[:, None, None])

    a = cbr(m.branch_a[1], cbr(m.branch_a[0], x))
    b = cbr(m.branch_b[1], cbr(m.branch_b[0], x))
    torch.testing.assert_close(m(x), a + b)


def test_lkam_block_equation5_and_projection():
    blk = LKAMBlock(4, 8, kernel_size=3).eval()
    assert isinstance(blk.shortcut, nn.Sequential)  # 1×1 conv + BN projection
    x = torch.randn(2, 4, 9, 9)
    f = blk.conv(x)
    s = torch.sigmoid(blk.attention.fc2(torch.relu(blk.attention.fc1(f.mean((2, 3), keepdim=True)))))
    torch.testing.assert_close(blk(x), blk.shortcut(x) + f * s)
    same = LKAMBlock(8, 8, kernel_size=3)
    assert isinstance(same.shortcut, nn.Identity)


def test_ablation_switches_change_architecture():
    def has(model, cls):
        return any(isinstance(m, cls) for m in model.modules())

    base = build_model("baseline", width_multiplier=0.125)
    lkam = build_model("lkam", width_multiplier=0.125)
    aspp = build_model("aspp", width_multiplier=0.125)
    full = build_model("full", width_multiplier=0.125)
    assert not has(base, LKAMBlock) and not has(base, ASPP)
    assert has(lkam, LKAMBlock) and not has(lkam, ASPP)
    assert not has(aspp, LKAMBlock) and has(aspp, ASPP)
    assert has(full, LKAMBlock) and has(full, ASPP)
    assert isinstance(base.encoder.e1, VGGLayer)
    x = torch.randn(1, 3, 40, 40)
    for m in (base, lkam, aspp, full):
        assert m(x).shape == (1, 1, 40, 40)
    counts = [_count(m) for m in (base, lkam, aspp, full)]
    assert len(set(counts)) == 4


def test_aspp_rates_and_output_width():
    a = ASPP(16, 32, rates=(6, 12, 18))
    dil = [b.conv.dilation for b in a.branches]
    assert dil == [(1, 1), (6, 6), (12, 12), (18, 18)]
    assert a(torch.randn(2, 16, 5, 7)).shape == (2, 32, 5, 7)


def test_save_load_round_trip_identical(tmp_path):
    m = MSFFNet(in_channels=4, **TINY)
    m.train()
    m(torch.randn(2, 4, 32, 32))  # move BN running stats away from defaults
    m.eval()
    x = torch.randn(1, 4, 45, 31)
    y = m(x)
    out = m.save_pretrained(tmp_path / "ckpt", metadata={"normalization": {"mean": [1.0] * 4, "std": [2.0] * 4}})
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.pt"]
    m2 = MSFFNet.from_pretrained(out)
    assert m2.metadata["normalization"]["std"] == [2.0] * 4
    assert not m2.training
    torch.testing.assert_close(m2(x), y, rtol=0, atol=0)
    # saving again over an existing checkpoint replaces it atomically, leaving no temp folders
    m.save_pretrained(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        MSFFNet.from_pretrained(tmp_path / "nope")
    m = MSFFNet(**TINY)
    ck = m.save_pretrained(tmp_path / "ck")
    # corrupt weights
    (ck / "model.pt").write_bytes(b"not a torch file at all")
    with pytest.raises(CheckpointError, match="corrupt or unreadable"):
        MSFFNet.from_pretrained(ck)
    # corrupt config
    ck2 = m.save_pretrained(tmp_path / "ck2")
    (ck2 / "config.json").write_text("{ broken")
    with pytest.raises(CheckpointError, match="corrupt"):
        MSFFNet.from_pretrained(ck2)
    # mismatched weights: config says 3 bands, weights are from a 5-band model
    ck3 = m.save_pretrained(tmp_path / "ck3")
    MSFFNet(in_channels=5, **TINY).save_pretrained(tmp_path / "other")
    (ck3 / "model.pt").write_bytes((tmp_path / "other" / "model.pt").read_bytes())
    with pytest.raises(CheckpointError, match="shape mismatches"):
        MSFFNet.from_pretrained(ck3)
    # not an msff checkpoint
    ck4 = tmp_path / "ck4"
    ck4.mkdir()
    (ck4 / "config.json").write_text(json.dumps({"architectures": ["Bert"]}))
    with pytest.raises(CheckpointError, match="not an msff"):
        MSFFNet.from_pretrained(ck4)
    # missing weights
    ck5 = m.save_pretrained(tmp_path / "ck5")
    (ck5 / "model.pt").unlink()
    with pytest.raises(FileNotFoundError, match="model.pt"):
        MSFFNet.from_pretrained(ck5)


def test_loading_never_unpickles_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (exec, ("raise SystemExit('pwned')",))

    m = MSFFNet(**TINY)
    ck = m.save_pretrained(tmp_path / "ck")
    torch.save({"x": Evil()}, ck / "model.pt")
    with pytest.raises(CheckpointError):
        MSFFNet.from_pretrained(ck)


def test_backend_selection_and_errors(monkeypatch):
    import msff
    from msff.backend import BackendUnavailableError, resolve_backend

    x = torch.randn(1, 3, 8, 8)
    monkeypatch.delenv("MSFF_BACKEND", raising=False)
    assert resolve_backend("auto", x) == "reference"
    with msff.use_backend("reference"):
        assert resolve_backend(None, x) == "reference"
    monkeypatch.setenv("MSFF_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match="cuda"):
        resolve_backend(None, x)
    monkeypatch.setenv("MSFF_BACKEND", "bogus")
    with pytest.raises(ValueError, match="MSFF_BACKEND"):
        resolve_backend(None, x)
    monkeypatch.delenv("MSFF_BACKEND")
    with pytest.raises(ValueError, match="unknown backend"):
        MSFFNet(backend="fast")
    m = MSFFNet(backend="cuda", **TINY).eval()
    with pytest.raises(BackendUnavailableError, match="cuda"):
        m(x)
    # deterministic mode forces the reference path even when another backend is asked for
    torch.use_deterministic_algorithms(True)
    try:
        assert resolve_backend("cuda", x) == "reference"
    finally:
        torch.use_deterministic_algorithms(False)
    assert m.set_backend("reference").backend == "reference"
    assert m(x).shape == (1, 1, 8, 8)


def test_torch_export_reference_path():
    m = MSFFNet(**TINY).eval()
    x = torch.randn(1, 3, 32, 48)
    ep = torch.export.export(m, (x,))
    torch.testing.assert_close(ep.module()(x), m(x))


def test_torch_compile_reference_path():
    m = MSFFNet(**TINY).eval()
    x = torch.randn(1, 3, 32, 32)
    cm = torch.compile(m, fullgraph=True)
    torch.testing.assert_close(cm(x), m(x), rtol=1e-4, atol=1e-5)


def test_presets_and_widths():
    assert build_model("cpu").widths == (16, 32, 64, 128, 256)
    with pytest.raises(ValueError, match="unknown preset"):
        build_model("nope")
    with pytest.raises(ValueError, match="width_multiplier"):
        MSFFNet(width_multiplier=0)


def test_channels_last_input_same_result():
    m = MSFFNet(**TINY).eval()
    x = torch.randn(2, 3, 33, 29)
    torch.testing.assert_close(m(x.contiguous(memory_format=torch.channels_last)), m(x), rtol=1e-4, atol=1e-5)
