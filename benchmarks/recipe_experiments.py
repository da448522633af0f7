"""Side-by-side recipe experiments on a narrow model and a subset of the JPEG copy of CIFAR-10 (CPU-sized).

Every variant starts from the write-up's settings (`recipe=writeup`) and changes one or two things, so each row
of the table says what that change is worth. Each run's best checkpoint is tested twice: without and with flip
TTA (TTA changes evaluation only, so one training run gives both numbers).

    mkdir -p /tmp/cifar10-sub && tar -xzf ../shared/data/cifar10-jpeg.tar.gz -C /tmp/cifar10-sub \\
        --wildcards 'cifar10-jpeg/train/*/0[0-4]??.jpg' 'cifar10-jpeg/test/*/0[0-2]??.jpg'
    python benchmarks/recipe_experiments.py --data_dir=/tmp/cifar10-sub/cifar10-jpeg --out=recipe.json

(500 training and 300 test images per class; 1,000 of the training images are held out for validation.)
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

from cifar_resnet.config import Config
from cifar_resnet.data import DeviceLoader, load_splits
from cifar_resnet.engine import build_model, evaluate, fit, select_device
from cifar_resnet.files import atomic_write_json

log = logging.getLogger("recipe_experiments")

# (label, settings on top of the write-up's recipe). learning_rate and optimizer are the sweep's own cells.
ADAM = {"optimizer": "adam", "learning_rate": 0.001}
SGD = {"optimizer": "sgd", "learning_rate": 0.001}
VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("adam writeup", ADAM),
    ("adam cosine", {**ADAM, "lr_schedule": "cosine"}),
    ("adam cosine warmup1", {**ADAM, "lr_schedule": "cosine", "warmup_epochs": 1}),
    ("adam onecycle warmup1", {**ADAM, "lr_schedule": "onecycle", "warmup_epochs": 1}),
    ("adam onecycle warmup1 ls0.1", {**ADAM, "lr_schedule": "onecycle", "warmup_epochs": 1, "label_smoothing": 0.1}),
    ("adam onecycle warmup1 L2 5e-4", {**ADAM, "lr_schedule": "onecycle", "warmup_epochs": 1, "weight_decay": 5e-4}),
    ("adamw onecycle warmup1 wd 0.05", {**ADAM, "optimizer": "adamw", "lr_schedule": "onecycle", "warmup_epochs": 1,
                                        "weight_decay": 0.05}),
    ("adam recipe=tuned", {**ADAM, "recipe": "tuned"}),
    ("sgd writeup", SGD),
    ("sgd nesterov", {**SGD, "nesterov": True}),
    # The sweep fixes SGD's learning rate at 0.001 and below, far under SGD's usual 0.1; its momentum is not fixed.
    ("sgd recipe=tuned momentum 0.9", {**SGD, "recipe": "tuned", "momentum": 0.9}),
    ("sgd recipe=tuned momentum 0.9 constant lr", {**SGD, "recipe": "tuned", "momentum": 0.9,
                                                   "lr_schedule": "constant", "warmup_epochs": 0}),
    ("sgd recipe=tuned momentum 0.95", {**SGD, "recipe": "tuned", "momentum": 0.95}),
    ("sgd recipe=tuned", {**SGD, "recipe": "tuned"}),  # momentum 0.99
    ("sgd 0.0001 writeup", {**SGD, "learning_rate": 0.0001}),
    ("sgd 0.0001 recipe=tuned", {**SGD, "learning_rate": 0.0001, "recipe": "tuned"}),
]


def run_variant(base: Config, overrides: dict[str, Any], data, device: torch.device) -> dict[str, Any]:
    config = Config.from_mapping(overrides, base=base)
    started = time.perf_counter()
    model = build_model(config, len(data.classes), device)
    result = fit(config, model, data, device)
    test_loader = DeviceLoader(data.test, config.eval_batch_size, device)
    plain, flipped = (evaluate(result.model, test_loader, len(data.classes), tta=tta) for tta in (False, True))
    return {
        "settings": overrides,
        "config": config.to_dict(),
        "best_epoch": result.best_epoch,
        "best_val_acc": result.best_val_acc,
        "final_train_loss": result.history[-1]["train/loss"],
        "test_acc": plain.acc,
        "test_acc_tta": flipped.acc,
        "seconds": time.perf_counter() - started,
    }


def markdown_table(rows: dict[str, dict[str, Any]]) -> str:
    lines = ["| variant | best val acc | test acc | test acc, flip TTA | best epoch | train loss (last) | s |",
             "|---|---|---|---|---|---|---|"]
    for label, row in rows.items():
        lines.append(f"| {label} | {row['best_val_acc']:.2%} | {row['test_acc']:.2%} | {row['test_acc_tta']:.2%} | "
                     f"{row['best_epoch']} | {row['final_train_loss']:.3f} | {row['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", required=True, help="image folder with train/ and test/")
    parser.add_argument("--out", default="recipe_experiments.json", help="JSON results, rewritten after each run")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--val_size", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default="", help="comma-separated variant labels (default: all)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")

    base = Config(recipe="writeup", dataset="imagefolder", data_dir=args.data_dir, width=args.width,
                  epochs=args.epochs, val_size=args.val_size, seed=args.seed, device="cpu")
    device = select_device(base.device)
    data = load_splits(base)
    wanted = {label.strip() for label in args.only.split(",") if label.strip()}
    rows: dict[str, dict[str, Any]] = {}
    for label, overrides in VARIANTS:
        if wanted and label not in wanted:
            continue
        log.info("variant %s: %s", label, overrides)
        rows[label] = run_variant(base, overrides, data, device)
        atomic_write_json(Path(args.out), {
            "machine": {"torch": torch.__version__, "threads": torch.get_num_threads()},
            "base": base.to_dict(), "train_images": len(data.train), "test_images": len(data.test), "runs": rows,
        })
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
