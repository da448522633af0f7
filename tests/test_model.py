import pytest
import torch

from cifar_resnet.model import CIFAR10CNN, ResidualBlock, count_parameters

pytestmark = pytest.mark.quick  # seconds in all: part of `pytest -m quick`


def test_full_model_has_the_write_ups_shape_and_parameter_count():
    model = CIFAR10CNN()
    # conv 3->64, stages of 64/128/256 channels, pool, linear 256->10: about 2.78 M parameters.
    assert count_parameters(model) == 2_777_674
    assert model.stem[0].in_channels == 3 and model.stem[0].out_channels == 64
    assert [stage[0].conv1.out_channels for stage in model.stages] == [64, 128, 256]
    assert [stage[0].conv1.stride[0] for stage in model.stages] == [1, 2, 2]
    assert all(len(stage) == 2 for stage in model.stages)
    assert model.fc.in_features == 256 and model.fc.out_features == 10


@pytest.mark.parametrize("width", [8, 16])
def test_narrow_model_maps_images_to_logits(width):
    model = CIFAR10CNN(num_classes=7, width=width)
    logits = model(torch.randn(5, 3, 32, 32))
    assert logits.shape == (5, 7)
    assert model.fc.in_features == 4 * width


def test_residual_block_shortcut_only_when_shape_changes():
    same = ResidualBlock(16, 16, stride=1)
    down = ResidualBlock(16, 32, stride=2)
    assert isinstance(same.shortcut, torch.nn.Identity)
    assert isinstance(down.shortcut[0], torch.nn.Conv2d) and down.shortcut[0].kernel_size == (1, 1)
    assert down(torch.randn(2, 16, 32, 32)).shape == (2, 32, 16, 16)
    assert same(torch.randn(2, 16, 8, 8)).shape == (2, 16, 8, 8)
