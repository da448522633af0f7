"""Hyperparameter sweeps of a ResNet-style CNN on CIFAR-10 with Weights & Biases.

The model (`model`), data (`data`) and training engine (`engine`) import no wandb and can be used on their
own; `tracking` is the thin W&B layer and `train` the entry point a sweep agent starts.
"""

__version__ = "0.1.0"
