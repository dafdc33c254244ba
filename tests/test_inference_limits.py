"""downsampling_factor / check_tile read the stride every msff network declares (input_multiple)."""
import pytest
from torch import nn

from msff.inference.limits import DEFAULT_FACTOR, check_tile, downsampling_factor
from msff.inference.sources import InferenceError
from msff.models import SegmentationModel, SegNet, UNet


class _Tiny(SegmentationModel):
    input_multiple = 4

    def __init__(self, in_channels: int = 1):
        super().__init__(in_channels)
        self.conv = nn.Conv2d(in_channels, 1, 1)

    def forward_logits(self, x):
        return self.conv(x)


def test_every_segmentation_model_uses_its_input_multiple():
    assert downsampling_factor(_Tiny()) == 4
    assert downsampling_factor(UNet(in_channels=3, width_multiplier=0.0625)) == UNet.input_multiple == 16
    assert downsampling_factor(SegNet(in_channels=3, width_multiplier=0.0625)) == SegNet.input_multiple == 32


def test_wrapped_and_foreign_modules():
    wrapper = nn.Module()
    wrapper.module = _Tiny()
    assert downsampling_factor(wrapper) == 4  # DataParallel / DDP style .module
    assert downsampling_factor(nn.Conv2d(1, 1, 1)) == DEFAULT_FACTOR


def test_check_tile_follows_the_model():
    assert check_tile(_Tiny(), 32) is None  # 8 cells of 4 px
    with pytest.raises(InferenceError, match=r"downsampling factor \(16 px\)"):
        check_tile(UNet(in_channels=3, width_multiplier=0.0625), 8)
