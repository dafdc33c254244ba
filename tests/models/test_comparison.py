"""Contract tests of the comparison networks (FCN-8s, SegNet, U-Net, DeepLabV3+, ResNet-skip)."""
import pytest
import torch
from torch import nn

from msff.models.backbones import ResNetEncoder, SegmentationModel, scale_widths
from msff.models.deeplabv3plus import DeepLabV3Plus
from msff.models.fcn import FCN8s
from msff.models.resnet_skip import ResNetSkipNet
from msff.models.segnet import SegNet
from msff.models.unet import UNet

TINY = 0.0625  # every width ≥ 4: the tests check wiring, not capacity

BUILDERS = {
    "fcn": lambda c: FCN8s(c, 1, width_multiplier=TINY),
    "segnet": lambda c: SegNet(c, 1, width_multiplier=TINY),
    "unet": lambda c: UNet(c, 1, width_multiplier=TINY),
    "deeplabv3plus-resnet101": lambda c: DeepLabV3Plus(c, 1, backbone="resnet101", width_multiplier=TINY),
    "deeplabv3plus-resnet50": lambda c: DeepLabV3Plus(c, 1, backbone="resnet50", width_multiplier=TINY),
    "deeplabv3plus-vgg16": lambda c: DeepLabV3Plus(c, 1, backbone="vgg16", width_multiplier=TINY),
    "resnet50-skip": lambda c: ResNetSkipNet(c, 1, backbone="resnet50", width_multiplier=TINY),
    "resnet101-skip": lambda c: ResNetSkipNet(c, 1, backbone="resnet101", width_multiplier=TINY),
}


def _cases():
    # ResNet-101 bodies are slow on CPU: one case in the default run, the rest under -m slow.
    for name in sorted(BUILDERS):
        for k, (size, bands) in enumerate([((37, 53), 14), ((37, 53), 3), ((7, 5), 14)]):
            marks = [pytest.mark.slow] if ("resnet101" in name and k > 0) else []
            yield pytest.param(name, bands, size, marks=marks, id=f"{name}-{size[0]}x{size[1]}-{bands}")


@pytest.mark.parametrize("name,bands,size", list(_cases()))
def test_forward_backward_any_size_and_bands(name, bands, size):
    model = BUILDERS[name](bands)
    x = torch.randn(2, bands, *size, requires_grad=True)
    y = model(x)
    assert y.shape == (2, 1, *size)
    assert torch.isfinite(y).all()
    y.square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads), f"{name}: some parameters got no gradient"
    assert sum(bool(g.abs().sum() > 0) for g in grads) >= 0.8 * len(grads)


@pytest.mark.parametrize("name", ["fcn", "segnet", "unet", "deeplabv3plus-vgg16", "resnet50-skip"])
def test_eval_batch_one_and_rejects_bad_input(name):
    model = BUILDERS[name](4).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 4, 33, 31)).shape == (1, 1, 33, 31)
    with pytest.raises(ValueError, match="input bands"):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="4-D"):
        model(torch.randn(4, 32, 32))


def test_crop_back_equals_padded_forward():
    # Padding happens inside: the logits of an odd-sized input are the top-left crop of the
    # logits of the explicitly zero-padded input.
    model = UNet(3, 1, width_multiplier=TINY).eval()
    x = torch.randn(1, 3, 37, 53)
    padded = torch.nn.functional.pad(x, (0, 11, 0, 11))
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(padded)[..., :37, :53])


def test_classes_and_activation():
    model = SegNet(3, classes=3, activation="softmax", width_multiplier=TINY).eval()
    with torch.no_grad():
        y = model(torch.randn(2, 3, 40, 40))
    assert y.shape == (2, 3, 40, 40)
    torch.testing.assert_close(y.sum(1), torch.ones(2, 40, 40))
    with pytest.raises(ValueError, match="activation"):
        UNet(3, 1, activation="tanh")


def test_segnet_unpools_with_the_encoders_indices():
    model = SegNet(3, 1, width_multiplier=TINY).eval()
    pooled, unpool_calls = [], []
    for i, pool in enumerate(model.pools):
        pool.register_forward_hook(lambda m, args, out, i=i: pooled.append((i, out[1].clone(), args[0].clone())))
    for i, unpool in enumerate(model.unpools):
        unpool.register_forward_pre_hook(
            lambda m, args, kwargs, i=i: unpool_calls.append((i, args[1].clone())), with_kwargs=True
        )
    unpool_outputs = {}
    for i, unpool in enumerate(model.unpools):
        unpool.register_forward_hook(lambda m, args, out, i=i: unpool_outputs.__setitem__(i, (args[0], out)))
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 96))
    assert [i for i, _, _ in pooled] == [0, 1, 2, 3, 4]
    assert [i for i, _ in unpool_calls] == [4, 3, 2, 1, 0]
    enc_idx = {i: idx for i, idx, _ in pooled}
    for i, idx in unpool_calls:
        assert torch.equal(idx, enc_idx[i]), f"unpool {i} did not use pool {i}'s indices"
    # Semantics: each unpooled map is zero except at the encoder's argmax positions, which
    # hold the decoder input values.
    for i, (inp, out) in unpool_outputs.items():
        flat = out.flatten(2)
        gathered = flat.gather(2, enc_idx[i].flatten(2))
        torch.testing.assert_close(gathered, inp.flatten(2))
        mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(2, enc_idx[i].flatten(2), True)
        assert (flat[~mask] == 0).all()


def test_segnet_has_no_learned_upsampling():
    model = SegNet(3, 1, width_multiplier=TINY)
    assert not any(isinstance(m, nn.ConvTranspose2d) for m in model.modules())
    assert sum(isinstance(m, nn.MaxUnpool2d) for m in model.modules()) == 5


def test_fcn_upsamplers_start_bilinear():
    model = FCN8s(3, 1, width_multiplier=TINY)
    w = model.decoder.upscore2.weight[0, 0]
    torch.testing.assert_close(w, w.T)
    torch.testing.assert_close(w[1:3, 1:3], torch.full((2, 2), 0.5625))


def test_deeplab_output_stride_16():
    for backbone in ("resnet50", "vgg16"):
        model = DeepLabV3Plus(3, 1, backbone=backbone, width_multiplier=TINY)
        low, high = model._features(torch.randn(1, 3, 64, 64))
        assert low.shape[-1] == 16 and high.shape[-1] == 4, backbone
    with pytest.raises(ValueError, match="backbone"):
        DeepLabV3Plus(3, 1, backbone="resnet18")


def test_width_multiplier_scales_widths():
    assert scale_widths((64, 128, 256), 0.25) == (16, 32, 64)
    assert UNet(3, 1, width_multiplier=0.5).widths == (32, 64, 128, 256, 512)
    small = sum(p.numel() for p in ResNetEncoder(3, "resnet50", 0.25).parameters())
    big = sum(p.numel() for p in ResNetEncoder(3, "resnet50", 0.5).parameters())
    assert 3.5 < big / small < 4.5  # conv weights scale with width², as they should
    with pytest.raises(ValueError):
        scale_widths((64,), 0)


@pytest.mark.parametrize("depth", ["resnet50", "resnet101"])
def test_resnet_encoder_matches_torchvision(depth):
    tvm = pytest.importorskip("torchvision.models")
    ref = getattr(tvm, depth)(weights=None).eval()
    ours = ResNetEncoder(3, depth).eval()
    state = {k: v for k, v in ref.state_dict().items() if not k.startswith("fc.")}
    ours.load_state_dict(state, strict=True)  # same names and shapes, layer for layer
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feats = ours(x)
        r = ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))
        r = ref.layer4(ref.layer3(ref.layer2(ref.layer1(r))))
    torch.testing.assert_close(feats[-1], r)


def test_resnet_encoder_dilation_matches_torchvision():
    tvm = pytest.importorskip("torchvision.models")
    ref = tvm.resnet50(weights=None, replace_stride_with_dilation=[False, False, True]).eval()
    ours = ResNetEncoder(3, "resnet50", replace_stride_with_dilation=(False, False, True)).eval()
    ours.load_state_dict({k: v for k, v in ref.state_dict().items() if not k.startswith("fc.")})
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        r = ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))
        r = ref.layer4(ref.layer3(ref.layer2(ref.layer1(r))))
        torch.testing.assert_close(ours(x)[-1], r)
    assert r.shape[-1] == 4  # output stride 16


def test_all_are_segmentation_models():
    for build in BUILDERS.values():
        assert isinstance(build(3), SegmentationModel)
