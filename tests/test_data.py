import torch

from cifar_resnet.data.images import ImageSet
from cifar_resnet.data.loader import CIFAR10_MEAN, CIFAR10_STD, DeviceLoader, random_crop_flip
from cifar_resnet.data.sources import load_splits


def test_crops_are_windows_of_the_zero_padded_image_and_flips_mirror_them():
    torch.manual_seed(0)
    images = torch.randint(1, 256, (64, 3, 32, 32), dtype=torch.uint8)  # no zeros: padding is recognisable
    out = random_crop_flip(images, padding=4, generator=torch.Generator().manual_seed(1))
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    offsets, flips = set(), 0
    for i in range(len(images)):
        windows = {(top, left): padded[i, :, top : top + 32, left : left + 32] for top in range(9) for left in range(9)}
        matches = [
            (top, left, flipped)
            for (top, left), window in windows.items()
            for flipped in (False, True)
            if torch.equal(out[i], window.flip(2) if flipped else window)
        ]
        assert matches, f"image {i} is not a crop of its padded original"
        offsets.add(matches[0][:2])
        flips += matches[0][2]
    # Random, not constant: many offsets, and about half flipped.
    assert len(offsets) > 10
    assert 16 <= flips <= 48


def test_crop_and_flip_are_seeded():
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    a = random_crop_flip(images, 4, torch.Generator().manual_seed(3))
    b = random_crop_flip(images, 4, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_loader_normalises_with_the_cifar_statistics_and_covers_the_split():
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    data = ImageSet(images, torch.arange(10))
    loader = DeviceLoader(data, batch_size=4, device=torch.device("cpu"))
    batches = list(loader)
    assert len(batches) == len(loader) == 3  # evaluation keeps the last partial batch
    x = torch.cat([b[0] for b in batches])
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(x, (images.float() / 255 - mean) / std)
    assert torch.equal(torch.cat([b[1] for b in batches]), torch.arange(10))


def test_training_loader_shuffles_drops_the_partial_batch_and_augments():
    data = ImageSet(torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8), torch.arange(10))
    loader = DeviceLoader(data, 4, torch.device("cpu"), generator=torch.Generator().manual_seed(0), augment=True)
    labels = [b[1] for b in loader]
    assert len(labels) == len(loader) == 2 and all(len(y) == 4 for y in labels)
    assert len(set(torch.cat(labels).tolist())) == 8  # a permutation: no repeats


def test_validation_split_is_held_out_and_chosen_by_seed(tiny_config):
    a = load_splits(tiny_config)
    b = load_splits(tiny_config)
    c = load_splits(tiny_config.replace(seed=1))
    assert (len(a.train), len(a.val), len(a.test)) == (1000, 200, 200)
    assert torch.equal(a.val.images, b.val.images)
    assert not torch.equal(a.val.images, c.val.images)
    # No validation image is also a training image.
    train_rows = {bytes(img.numpy()) for img in a.train.images}
    assert not any(bytes(img.numpy()) in train_rows for img in a.val.images)
