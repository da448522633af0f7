"""GPU tests: what only a CUDA device exercises (bf16 autocast, channels_last, the fused optimizer) and resuming
there. Skipped, with the reason "no CUDA device", elsewhere; `benchmarks/gpu_check.sh` runs them first
(`pytest -m gpu tests/test_gpu.py`). The GPU machine has no wandb: nothing here may import it (runs go through
`runner.run_training`, the run without its W&B layer)."""

from __future__ import annotations

import math

import pytest
import torch

from cifar_resnet import runner
from cifar_resnet.config import Config
from cifar_resnet.engine import step as training_step
from cifar_resnet.engine.loop import Interrupted
from cifar_resnet.records import RunFolder, RunRecord
from cifar_resnet.runner import RunHooks, run_training

pytestmark = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

TIMING_KEYS = ("epoch_seconds", "train/images_per_second")  # differ between any two runs
# GPU kernels (atomics in cuDNN's backward, bf16 rounding) are not bit-reproducible between two runs: resumed
# and uninterrupted runs agree to within this, per metric.
RESUME_TOLERANCE = 0.02


def gpu_config(tmp_path, **changes) -> Config:
    """A small model on synthetic data, with the GPU defaults: bf16, channels_last, fused optimizer."""
    return Config(dataset="synthetic", width=16, epochs=2, batch_size=128, eval_batch_size=512, val_size=1000,
                  train_size=8000, test_size=1000, output_dir=str(tmp_path / "runs"), device="cuda").replace(**changes)


@needs_cuda
def test_two_epochs_on_the_gpu_with_bf16_channels_last_and_the_fused_optimizer(tmp_path, monkeypatch):
    config = gpu_config(tmp_path)
    assert config.bf16 and config.channels_last
    models, optimizers, logit_dtypes = [], [], set()
    real_build_model, real_build_optimizer = runner.build_model, training_step.build_optimizer

    def build_model(*args, **kwargs):
        model = real_build_model(*args, **kwargs)
        model.register_forward_hook(lambda module, inputs, output: logit_dtypes.add(output.dtype))
        models.append(model)
        return model

    def build_optimizer(*args, **kwargs):
        optimizer = real_build_optimizer(*args, **kwargs)
        optimizers.append(optimizer)
        return optimizer

    monkeypatch.setattr(runner, "build_model", build_model)
    monkeypatch.setattr(training_step, "build_optimizer", build_optimizer)  # where build_step looks it up

    outcome = run_training(config, RunFolder.of(config.output_dir, "gpu00001"))

    assert outcome.record.status == "finished" and outcome.record.summary["device"].startswith("cuda")
    assert [entry["epoch"] for entry in outcome.record.history] == [1, 2]
    assert all(math.isfinite(entry["train/loss"]) for entry in outcome.record.history)
    assert outcome.fit.test.acc > 0.3  # chance is 0.1: the synthetic classes are learnable
    (model,) = models
    assert next(model.parameters()).is_cuda
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert all(weight.is_contiguous(memory_format=torch.channels_last) for weight in convs)
    assert torch.bfloat16 in logit_dtypes  # the forward passes ran under bf16 autocast
    assert optimizers and all(group["fused"] for opt in optimizers for group in opt.param_groups)
    assert outcome.folder.best.exists() and not outcome.folder.last.exists()


def without_timing(history: list[dict]) -> list[dict]:
    return [{key: value for key, value in epoch.items() if key not in TIMING_KEYS} for epoch in history]


@needs_cuda
@pytest.mark.parametrize("changes", [{}, {"cuda_graph": False, "ema_decay": 0.9}], ids=["graph", "eager-ema"])
def test_a_run_interrupted_after_epoch_1_and_resumed_matches_an_uninterrupted_one_on_the_gpu(tmp_path, changes):
    """Resumed from last.pt on the GPU (b142e91 failed here: the generator's state came back from torch.load on the
    GPU). Both optimizers a GPU run builds: capturable Adam under the captured step, fused Adam in the eager one,
    whose step counters live on the GPU, with a weight average in the eager case."""
    config = gpu_config(tmp_path, epochs=3, **changes)
    whole = run_training(config, RunFolder.of(config.output_dir, "whole001"))

    stop = []
    hooks = RunHooks(on_epoch_recorded=lambda record: stop.append(len(record.history)), should_stop=lambda: bool(stop))
    with pytest.raises(Interrupted):
        run_training(config, RunFolder.of(config.output_dir, "split001"), hooks)
    assert stop == [1] and (tmp_path / "runs" / "split001" / "last.pt").exists()
    (saved_epoch_1,) = RunRecord.load(tmp_path / "runs" / "split001").history
    placed = []

    def where(result, state) -> None:  # every optimizer state tensor of this fused or capturable Adam on the GPU
        placed.extend(t.device.type for s in state.optimizer.state.values() for t in s.values()
                      if isinstance(t, torch.Tensor))

    resumed = run_training(config, RunFolder.of(config.output_dir, "split001"), RunHooks(on_epoch=where))
    assert placed and set(placed) == {"cuda"}

    assert [entry["epoch"] for entry in resumed.record.history] == [1, 2, 3]
    for ours, reference in zip(without_timing(resumed.record.history), without_timing(whole.record.history)):
        assert ours.keys() == reference.keys()
        for key, value in ours.items():
            assert value == pytest.approx(reference[key], abs=RESUME_TOLERANCE), key
    assert resumed.fit.test.acc == pytest.approx(whole.fit.test.acc, abs=RESUME_TOLERANCE)
    assert resumed.record.history[0] == saved_epoch_1  # kept as the interrupted attempt saved it, not re-trained
