"""The model (model.py): the write-up's shape and parameter count, narrow models, the residual shortcut, and the
recipe's initialisations (zero-init residuals, a whitened stem)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cifar_resnet.config import Config
from cifar_resnet.data.loader import DeviceLoader
from cifar_resnet.data.sources import make_synthetic
from cifar_resnet.engine.device import build_model
from cifar_resnet.model import CIFAR10CNN, ResidualBlock, count_parameters, init_stem_whitening

pytestmark = pytest.mark.quick  # seconds in all: part of `pytest -m quick`


CPU = torch.device("cpu")


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


def test_zero_init_residual_makes_each_block_its_shortcut_and_keeps_the_writeups_layers():
    config = Config(width=8, zero_init_residual=True)
    model = build_model(config, 10, CPU).eval()
    blocks = [m for m in model.modules() if isinstance(m, ResidualBlock)]
    assert len(blocks) == 6 and all(torch.count_nonzero(block.bn2.weight) == 0 for block in blocks)
    x = torch.randn(4, 8, 16, 16)
    block = blocks[1]  # 8 -> 8 channels, identity shortcut
    assert torch.equal(block(x), torch.relu(x))
    plain = CIFAR10CNN(width=8)
    plain.load_state_dict(model.state_dict())  # the same layers and shapes: loads into the write-up's class
    assert not torch.equal(build_model(config.replace(zero_init_residual=False), 10, CPU).stages[0][0].bn2.weight,
                           block.bn2.weight)


def test_whitened_stem_filters_decorrelate_the_image_patches():
    train, _, _ = make_synthetic(400, 10)
    images = DeviceLoader(train, 100, CPU).normalize(train.images)  # (400, 3, 32, 32)
    model = CIFAR10CNN(width=16)  # 8 filter pairs, largest components first
    before = model.stem[0].weight.detach().clone()
    init_stem_whitening(model, images)
    weight = model.stem[0].weight.detach()
    assert torch.equal(weight[:8], -weight[8:16])
    assert torch.equal(weight[16:], before[16:])  # there are no more filters than that; nothing else changes
    # The + filters' responses over every interior patch: (near) unit variance and uncorrelated.
    responses = nn.functional.conv2d(images, weight[:8]).permute(1, 0, 2, 3).reshape(8, -1).double()
    covariance = responses @ responses.T / responses.shape[1]
    strong = torch.diagonal(covariance)[:4]  # the eps term shrinks only the weak components
    assert torch.allclose(strong, torch.ones(4, dtype=torch.float64), atol=0.05)
    assert (covariance - torch.diag(torch.diagonal(covariance))).abs().max() < 1e-3
