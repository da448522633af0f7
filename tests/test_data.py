import io
import os
import shutil
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import encode_png

from cifar_resnet.config import Config
from cifar_resnet.data import (
    CACHE_FOLDER,
    CIFAR10_MEAN,
    CIFAR10_STD,
    DeviceLoader,
    ImageSet,
    load_image_folder,
    load_splits,
    random_crop_flip,
)
from cifar_resnet.errors import DataError


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


def _write_folder(root: Path, classes=("cat", "dog"), per_class=3, size=32) -> Path:
    for split in ("train", "test"):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                image = torch.full((3, size, size), 40 * label + i, dtype=torch.uint8)
                (folder / f"{i}.png").write_bytes(encode_png(image).numpy().tobytes())
    return root


def test_image_folder_is_decoded_exactly_and_cached_until_it_changes(tmp_path):
    root = _write_folder(tmp_path / "imgs")
    train, test, classes = load_image_folder(root)
    assert classes == ["cat", "dog"]
    assert train.images.shape == (6, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert int(train.images[4, 0, 0, 0]) == 41  # PNG is lossless: the pixel values come back as written
    cache_files = sorted((root / CACHE_FOLDER).glob("*.pt"))
    assert [f.name.split("-")[0] for f in cache_files] == ["test", "train"]

    # A new image changes the fingerprint: the train cache is rebuilt (and the stale one removed).
    image = torch.full((3, 32, 32), 99, dtype=torch.uint8)
    (root / "train" / "dog" / "new.png").write_bytes(encode_png(image).numpy().tobytes())
    train2, _, _ = load_image_folder(root)
    assert len(train2) == 7
    assert len(list((root / CACHE_FOLDER).glob("train-*.pt"))) == 1


def test_cached_image_folder_loads_without_decoding(tmp_path, monkeypatch):
    root = _write_folder(tmp_path / "imgs")
    first = load_image_folder(root)[0]
    monkeypatch.setattr("cifar_resnet.data._decode_images", lambda paths: pytest.fail("decoded again"))
    assert torch.equal(load_image_folder(root)[0].images, first.images)


def _png(value: int) -> bytes:
    return encode_png(torch.full((3, 32, 32), value, dtype=torch.uint8)).numpy().tobytes()


def _aged_folder(root: Path) -> Path:
    """`_write_folder`, with its folders' modification times an hour back: a change made in the test then moves
    them for sure, however coarse the file system's clock."""
    _write_folder(root)
    hour_ago = time.time_ns() - 3600 * 10**9
    for folder in [root, *root.rglob("*")]:
        if folder.is_dir():
            os.utime(folder, ns=(hour_ago, hour_ago))
    return root


def _decoded_afresh(root: Path, scratch: Path):
    """The folder as a first load sees it: a copy without its cache, loaded."""
    shutil.copytree(root, scratch, ignore=shutil.ignore_patterns(CACHE_FOLDER))
    return load_image_folder(scratch)


def test_a_warm_cache_is_found_by_its_folders_stamps_without_listing_or_stat_ing_an_image(tmp_path, monkeypatch):
    root = _aged_folder(tmp_path / "imgs")
    first = load_image_folder(root)
    stat_paths = []
    real_stat = os.stat

    def recording_stat(path, *args, **kwargs):
        stat_paths.append(Path(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", recording_stat)
    monkeypatch.setattr("cifar_resnet.data._scan", lambda folder: pytest.fail(f"listed {folder}"))
    monkeypatch.setattr("cifar_resnet.data._decode_images", lambda paths: pytest.fail("decoded again"))
    again = load_image_folder(root)
    monkeypatch.undo()

    for loaded, expected in zip(again[:2], first[:2], strict=True):
        assert torch.equal(loaded.images, expected.images) and torch.equal(loaded.labels, expected.labels)
    assert again[2] == first[2] == ["cat", "dog"]
    assert not [path for path in stat_paths if path.suffix == ".png"]
    stamped = {path for path in stat_paths if CACHE_FOLDER not in path.parts and path.is_relative_to(root)}
    assert stamped == {root / split / name for split in ("train", "test") for name in (".", "cat", "dog")}


def _replace_by_a_move(root: Path) -> None:
    (root / "elsewhere.png").write_bytes(_png(200))
    os.replace(root / "elsewhere.png", root / "train" / "cat" / "0.png")


@pytest.mark.parametrize("change", [
    lambda root: (root / "train" / "dog" / "new.png").write_bytes(_png(99)),
    lambda root: (root / "train" / "dog" / "0.png").unlink(),
    lambda root: (root / "train" / "dog" / "0.png").rename(root / "train" / "dog" / "9.png"),
    lambda root: (root / "train" / "cat" / "1.png").rename(root / "train" / "dog" / "1b.png"),
    _replace_by_a_move,
    lambda root: [(root / split / "bird").mkdir() or (root / split / "bird" / "0.png").write_bytes(_png(150))
                  for split in ("train", "test")],
    lambda root: (root / "test" / "cat" / "more").mkdir() or (root / "test" / "cat" / "more" / "x.png").write_bytes(
        _png(7)),
], ids=["image added", "image removed", "image renamed", "image moved to another class", "image replaced by a move",
        "class added", "subfolder added"])
def test_a_changed_folder_is_noticed_and_loads_as_a_first_load_would(tmp_path, change):
    root = _aged_folder(tmp_path / "imgs")
    load_image_folder(root)
    change(root)
    train, test, classes = load_image_folder(root)
    fresh_train, fresh_test, fresh_classes = _decoded_afresh(root, tmp_path / "fresh")
    assert classes == fresh_classes
    for loaded, expected in ((train, fresh_train), (test, fresh_test)):
        assert torch.equal(loaded.images, expected.images) and torch.equal(loaded.labels, expected.labels)
    assert [len(list((root / CACHE_FOLDER).glob(f"{split}-*.pt"))) for split in ("train", "test")] == [1, 1]


def test_an_image_rewritten_in_place_is_not_noticed_until_its_folder_is_touched(tmp_path):
    """The documented limit of finding the cache by folder stamps (README's Data section), and its remedy."""
    root = _aged_folder(tmp_path / "imgs")
    load_image_folder(root)
    (root / "train" / "cat" / "0.png").write_bytes(_png(123))  # same name, new content, its folder untouched
    assert int(load_image_folder(root)[0].images[0, 0, 0, 0]) == 0  # the cached pixels
    os.utime(root / "train" / "cat")  # touch the folder
    assert int(load_image_folder(root)[0].images[0, 0, 0, 0]) == 123


@pytest.mark.parametrize(
    "break_it, message",
    [
        (lambda root: None, "is not a folder"),
        (lambda root: (root / "train").mkdir(parents=True), "has no class folders"),
    ],
)
def test_missing_or_empty_folder_is_named(tmp_path, break_it, message):
    root = tmp_path / "nothing"
    break_it(root)
    with pytest.raises(DataError, match=message) as error:
        load_image_folder(root)
    assert "data_dir" in str(error.value)


def test_unreadable_image_is_named(tmp_path):
    root = _write_folder(tmp_path / "imgs")
    bad = root / "train" / "cat" / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="broken.jpg"):
        load_image_folder(root)


def test_wrong_size_image_is_named(tmp_path):
    root = _write_folder(tmp_path / "imgs", size=28)
    with pytest.raises(DataError, match=r"28x28; only 32x32"):
        load_image_folder(root)


def test_train_and_test_classes_must_match(tmp_path):
    root = _write_folder(tmp_path / "imgs")
    (root / "test" / "dog").rename(root / "test" / "horse")
    with pytest.raises(DataError, match="do not match"):
        load_image_folder(root)


def test_real_jpeg_folder_loads(cifar_jpeg_dir):
    splits = load_splits(Config(dataset="imagefolder", data_dir=str(cifar_jpeg_dir), val_size=500))
    assert splits.classes[:3] == ["airplane", "automobile", "bird"] and len(splits.classes) == 10
    assert len(splits.train) + len(splits.val) == 3000 and len(splits.test) == 1000
    assert splits.train.images.float().mean() > 50  # real pictures, not blank decodes


def test_test_subset_spans_the_classes_and_ignores_the_run_seed(tmp_path):
    root = _write_folder(tmp_path / "imgs", classes=("a", "b", "c", "d"), per_class=5)
    config = Config(dataset="imagefolder", data_dir=str(root), val_size=2, test_size=8)
    subset = load_splits(config).test
    assert len(subset) == 8 and len(set(subset.labels.tolist())) > 1  # not the first 8 files of class a
    assert torch.equal(subset.labels, load_splits(config.replace(seed=5)).test.labels)


PNG_GREY, PNG_RGB, PNG_RGBA = 0, 2, 6  # PNG colour types


def png_16bit(pixels: np.ndarray, colour_type: int) -> bytes:
    """A real 16-bit PNG (PIL cannot write 16-bit colour): signature, IHDR, one IDAT of unfiltered rows, IEND.
    pixels: (H, W) or (H, W, C) uint16."""
    height, width = pixels.shape[:2]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = pixels.astype(">u2").reshape(height, -1)
    raw = b"".join(b"\0" + row.tobytes() for row in rows)  # filter type 0 (none) before each row
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def pil_file(image: Image.Image, format: str = "PNG", **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format, **options)
    return out.getvalue()


def test_images_of_any_bit_depth_mode_or_palette_load_as_pil_converts_them(tmp_path):
    """Real files of every kind an image folder may hold, each against PIL's `convert("RGB")` (what torchvision's
    ImageFolder gives). 16-bit images are scaled to 8 bits by their high byte, as PIL reads 16-bit colour; issue 23:
    their values wrapped modulo 256, (40000, 1000, 65535) becoming (64, 232, 255). PIL clips 16-bit grey to 255
    instead of scaling it: there the high byte is expected too."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    rgb16 = rng.integers(0, 65536, (32, 32, 3), dtype=np.uint16)
    rgb16[0, 0] = (40000, 1000, 65535)
    grey16 = rng.integers(0, 65536, (32, 32), dtype=np.uint16)
    palette_image = Image.fromarray(rgb).quantize(50)
    files = {  # sorted by name: the order the folder lists them
        "0-rgb16.png": (png_16bit(rgb16, PNG_RGB), (rgb16 >> 8).astype(np.uint8)),
        "1-rgba16.png": (png_16bit(np.dstack([rgb16, grey16]), PNG_RGBA), (rgb16 >> 8).astype(np.uint8)),
        "2-grey16.png": (png_16bit(grey16, PNG_GREY), np.repeat((grey16 >> 8).astype(np.uint8)[..., None], 3, 2)),
        "3-grey.png": (pil_file(Image.fromarray(rgb[..., 0])), None),
        "4-grey-alpha.png": (pil_file(Image.fromarray(rgb[..., :2].copy(), "LA")), None),
        "5-palette.png": (pil_file(palette_image), None),
        "6-palette-transparency.png": (pil_file(palette_image, transparency=3), None),
        "7-rgba.png": (pil_file(Image.fromarray(np.dstack([rgb, rgb[..., 0]]), "RGBA")), None),
        "8-one-bit.png": (pil_file(Image.fromarray(rgb[..., 0] > 127)), None),
        "9-cmyk.jpg": (pil_file(Image.fromarray(rgb).convert("CMYK"), "JPEG"), None),
    }
    root = tmp_path / "imgs"
    for split in ("train", "test"):
        for name in ("a", "b"):
            (root / split / name).mkdir(parents=True)
    for filename, (data, _) in files.items():
        (root / "train" / "a" / filename).write_bytes(data)
    for folder in ("train/b", "test/a", "test/b"):
        (root / folder / "x.png").write_bytes(pil_file(Image.fromarray(rgb)))

    train, _, _ = load_image_folder(root)

    for index, (filename, (_, high_bytes)) in enumerate(files.items()):
        expected = high_bytes
        if expected is None:
            expected = np.asarray(Image.open(root / "train" / "a" / filename).convert("RGB"))
        assert np.array_equal(train.images[index].permute(1, 2, 0).numpy(), expected), filename
    assert train.images[0, :, 0, 0].tolist() == [156, 3, 255]  # (40000, 1000, 65535) >> 8


def test_an_image_torchvision_cannot_decode_is_read_with_pil(tmp_path):
    """A BMP named .png, which torchvision's ImageFolder (PIL) loads: so does this one."""
    rgb = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    root = tmp_path / "imgs"
    for folder in ("train/a", "train/b", "test/a", "test/b"):
        (root / folder).mkdir(parents=True)
        (root / folder / "x.png").write_bytes(pil_file(Image.fromarray(rgb), "BMP"))
    train, test, _ = load_image_folder(root)
    assert all(np.array_equal(image.permute(1, 2, 0).numpy(), rgb) for image in [*train.images, *test.images])
