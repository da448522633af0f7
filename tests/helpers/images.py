"""Image folders (`root/{train,test}/<class>/<i>.png|jpg`) written with torchvision's encoders, and a digest that
tells two loads of the same pixels apart from others."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torchvision.io import encode_jpeg, encode_png


def png(value: int, size: int = 32) -> bytes:
    """A `size` x `size` PNG, every pixel of every channel `value`."""
    return encode_png(torch.full((3, size, size), value, dtype=torch.uint8)).numpy().tobytes()


def image_folder(root: Path, classes=("cat", "dog"), per_class: int = 3, size: int = 32) -> Path:
    """root/{train,test}/<class>/<i>.png, each image one grey level: 40 x label + i (PNG is lossless: the pixel
    values come back as written)."""
    for split in ("train", "test"):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                (folder / f"{i}.png").write_bytes(png(40 * label + i, size))
    return root


def write_jpeg_folder(root: Path, per_class: dict[str, int]) -> Path:
    """root/<split>/{cat,dog}/<NNNN>.jpg, `per_class[split]` random images each, the same on every call."""
    generator = torch.Generator().manual_seed(0)
    for split, count in per_class.items():
        for name in ("cat", "dog"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=generator)
                (folder / f"{i:04d}.jpg").write_bytes(encode_jpeg(image).numpy().tobytes())
    return root


def digest(*tensors: torch.Tensor) -> str:
    return hashlib.sha256(b"".join(t.numpy().tobytes() for t in tensors)).hexdigest()
