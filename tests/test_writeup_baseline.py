"""The benchmark's baseline (`benchmarks/writeup.py`) is the write-up's pipeline, checked field by field
against the write-up's own text (`../shared/seed/`): its transforms and normalisation constants, its DataLoader
(batch size, shuffling, no workers), a float32 NCHW model of its widths, plain Adam, and the loss read every step.
And what the baseline serves really is a crop or a flip of the normalised original."""

from __future__ import annotations

import ast
import inspect
import re
import sys

import pytest
import torch
from conftest import WRITEUP, require_shared_input
from torch import nn
from torchvision import transforms

from benchmarks import writeup
from cifar_resnet.config import Config
from cifar_resnet.data.images import ImageSet
from cifar_resnet.engine.device import memory_format_for
from cifar_resnet.model import CIFAR10CNN

IMAGES = 48
STEPS = 3


@pytest.fixture(scope="module")
def writeup_text() -> str:
    require_shared_input(WRITEUP, "the write-up", "CIFAR10_WRITEUP")
    return WRITEUP.read_text()


def code_after(text: str, start: str, end: str) -> str:
    """The write-up's code from `start` to the first `end` after it, without its Markdown fences."""
    begin = text.index(start)
    snippet = text[begin : text.index(end, begin) + len(end)]
    return "\n".join(line for line in snippet.splitlines() if line.strip() != "```")


def calls(expression: str) -> list[ast.Call]:
    return [node for node in ast.walk(ast.parse(expression)) if isinstance(node, ast.Call)]


def call_name(call: ast.Call) -> str:
    return call.func.attr if isinstance(call.func, ast.Attribute) else call.func.id


def test_the_training_transform_is_the_writeups_field_by_field(writeup_text):
    source = code_after(writeup_text, "transform_train = transforms.Compose([", "])")
    (compose,) = [call for call in calls(source) if call_name(call) == "Compose"]
    steps = [(call_name(call), [ast.literal_eval(arg) for arg in call.args],
              {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}) for call in compose.args[0].elts]
    assert [name for name, _, _ in steps] == ["RandomCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]

    ours = writeup.writeup_transform().transforms

    assert [type(step).__name__ for step in ours] == [name for name, _, _ in steps]
    crop_args, crop_kwargs = steps[0][1], steps[0][2]
    assert ours[0].size == (crop_args[0], crop_args[0]) and ours[0].padding == crop_kwargs["padding"] == 4
    assert ours[0].fill == 0 and ours[0].padding_mode == "constant" and not ours[0].pad_if_needed  # the defaults
    assert ours[1].p == 0.5  # RandomHorizontalFlip() with its default
    mean, std = steps[3][1]
    assert tuple(ours[3].mean) == mean == (0.4914, 0.4822, 0.4465)
    assert tuple(ours[3].std) == std == (0.2023, 0.1994, 0.2010)


def test_the_loader_is_the_writeups(writeup_text):
    source = code_after(writeup_text, "def load_data(batch_size=", "return train_loader")
    batch_size = int(re.search(r"def load_data\(batch_size=(\d+)\)", source).group(1))
    (line,) = [line.strip() for line in source.splitlines() if line.strip().startswith("train_loader = ")]
    (train_loader,) = calls(line)
    assert call_name(train_loader) == "DataLoader" and ast.unparse(train_loader.args[0]) == "train_dataset"
    given = {kw.arg: ast.unparse(kw.value) for kw in train_loader.keywords}
    assert given == {"batch_size": "batch_size", "shuffle": "True"}  # so num_workers is DataLoader's default, 0
    config = Config(recipe="writeup")
    dataset = torch.utils.data.TensorDataset(torch.zeros(10, 1))

    loader = writeup.writeup_loader(dataset, config)

    assert loader.batch_size == config.batch_size == batch_size == 128
    assert isinstance(loader.sampler, torch.utils.data.RandomSampler)  # shuffle=True
    assert loader.num_workers == 0 and not loader.drop_last
    assert not loader.pin_memory


def test_the_training_step_is_float32_nchw_plain_adam_reading_the_loss_every_step(monkeypatch):
    config = Config(recipe="writeup", width=8, batch_size=16, learning_rate=0.0005)
    built = []
    real_build_model = writeup.build_model
    monkeypatch.setattr(writeup, "build_model", lambda cfg, *args: built.append(cfg) or real_build_model(cfg, *args))
    images = torch.randn(IMAGES, 3, 32, 32)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.arange(IMAGES) % 10),
                                         batch_size=config.batch_size)
    run = writeup.writeup_step_runner(config, loader, 10, torch.device("cpu"))
    parts = inspect.getclosurevars(run).nonlocals
    model, optimizer, loss_fn = parts["model"], parts["optimizer"], parts["loss_fn"]

    # What it asks for on a GPU: no bf16 autocast, no channels_last.
    (model_config,) = built
    assert not model_config.bf16 and not model_config.channels_last
    assert memory_format_for(model_config, torch.device("cuda")) == torch.contiguous_format
    assert isinstance(model, CIFAR10CNN)
    assert all(p.dtype == torch.float32 and p.is_contiguous() for p in model.parameters())
    # The write-up's stage widths at its width of 64 (64, 128, 256 channels).
    full = CIFAR10CNN(width=64)
    assert [m.out_channels for m in full.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)][::4] \
        == [64, 64, 128, 256]
    # Plain Adam: torch's, with its defaults and the run's learning rate; no weight decay, no schedule.
    assert type(optimizer) is torch.optim.Adam
    (group,) = optimizer.param_groups
    assert group["lr"] == config.learning_rate and group["weight_decay"] == 0 and group["betas"] == (0.9, 0.999)
    assert not group["amsgrad"] and group["fused"] is None and group["foreach"] is None
    assert type(loss_fn) is nn.CrossEntropyLoss and loss_fn.label_smoothing == 0

    # The loss and accuracy are read back (a host sync) at every step, by the loop itself (not only by Adam).
    reads = []
    real_item = torch.Tensor.item

    def item(tensor: torch.Tensor):
        if sys._getframe(1).f_code.co_filename == writeup.__file__:
            reads.append(tensor.dtype)
        return real_item(tensor)

    monkeypatch.setattr(torch.Tensor, "item", item)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    run(STEPS)
    assert len(reads) == 2 * STEPS and reads[0] == torch.float32  # loss (float32: no autocast), then correct
    assert any(not torch.equal(before[name], p) for name, p in model.named_parameters())  # it trained


def test_the_baseline_serves_crops_or_flips_of_the_normalised_originals():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (IMAGES, 3, 32, 32), dtype=torch.uint8, generator=generator)  # no zeros
    dataset = writeup.ArrayDataset(ImageSet(images, torch.arange(IMAGES) % 10), writeup.writeup_transform())
    mean = torch.tensor(writeup.CIFAR10_MEAN).view(3, 1, 1)
    std = torch.tensor(writeup.CIFAR10_STD).view(3, 1, 1)
    torch.manual_seed(1)  # torchvision's random transforms draw from torch's global RNG

    offsets, flips = set(), 0
    for index in range(IMAGES):
        served, label = dataset[index]
        assert label == index % 10 and served.dtype == torch.float32 and served.shape == (3, 32, 32)
        # The zero padding is black: normalised, -mean/std per channel.
        padded = (transforms.functional.pad(images[index], 4).float() / 255 - mean) / std
        windows = {(top, left): padded[:, top : top + 32, left : left + 32] for top in range(9) for left in range(9)}
        matches = [(top, left, flipped) for (top, left), window in windows.items() for flipped in (False, True)
                   if torch.allclose(served, window.flip(2) if flipped else window, atol=1e-5)]
        assert matches, f"image {index} is not a crop or flip of its normalised original"
        offsets.add(matches[0][:2])
        flips += matches[0][2]
    assert len(offsets) > 10 and 8 <= flips <= 40  # random: many offsets, about half flipped
