"""A pack: several runs stepped in turn in one process give each run exactly what it gets alone (on a CPU; on a GPU,
within a tolerance: tests/test_gpu_pack.py)."""

from __future__ import annotations

import pytest
import torch

from cifar_resnet.data.sources import load_splits
from cifar_resnet.engine.device import build_model
from cifar_resnet.engine.loop import Interrupted, TrainHooks, fit, fit_steps
from cifar_resnet.packing.pack import Pack
from cifar_resnet.records import EPOCH_SECONDS, TRAIN_IMAGES_PER_SECOND

CPU = torch.device("cpu")
TIMINGS = (EPOCH_SECONDS, TRAIN_IMAGES_PER_SECOND)  # wall-clock figures: the only ones a pack may change


def three_cells(tiny_config):
    """Three runs that share nothing but the data source: other optimizers, learning rates and seeds."""
    return {
        "adam": tiny_config.replace(optimizer="adam", learning_rate=0.002, seed=1),
        "sgd": tiny_config.replace(optimizer="sgd", learning_rate=0.05, seed=2),
        "adam-ema": tiny_config.replace(optimizer="adam", learning_rate=0.001, seed=3, ema_decay=0.9),
    }


def steps_of(config, hooks=None):
    data = load_splits(config, CPU)
    return fit_steps(config, build_model(config, len(data.classes), CPU), data, CPU, hooks)


def without_timings(history):
    return [{k: v for k, v in epoch.items() if k not in TIMINGS} for epoch in history]


def assert_same_run(packed, alone):
    assert without_timings(packed.history) == without_timings(alone.history)
    assert (packed.best_epoch, packed.test.loss, packed.test.acc) == (alone.best_epoch, alone.test.loss,
                                                                       alone.test.acc)
    assert torch.equal(packed.test.confusion, alone.test.confusion)
    for name, tensor in alone.model.state_dict().items():
        assert torch.equal(packed.model.state_dict()[name], tensor), name


def test_three_runs_packed_give_each_run_its_own_results_bit_for_bit(tiny_config):
    configs = three_cells(tiny_config)
    ended = Pack(CPU).drive({name: steps_of(config) for name, config in configs.items()})
    assert {name: end.error for name, end in ended.items()} == dict.fromkeys(configs)
    for name, config in configs.items():
        data = load_splits(config, CPU)
        alone = fit(config, build_model(config, len(data.classes), CPU), data, CPU)
        assert_same_run(ended[name].result, alone)


def test_a_member_stopped_mid_run_leaves_the_others_bit_identical(tiny_config):
    configs = three_cells(tiny_config)
    undisturbed = Pack(CPU).drive({name: steps_of(config) for name, config in configs.items()})
    steps_taken = {"sgd": 0}

    def count_and_stop() -> bool:
        steps_taken["sgd"] += 1
        return steps_taken["sgd"] > 20  # in its second epoch (15 steps an epoch)

    members = {name: steps_of(config, TrainHooks(should_stop=count_and_stop) if name == "sgd" else None)
               for name, config in configs.items()}
    ended = Pack(CPU).drive(members)
    assert isinstance(ended["sgd"].error, Interrupted)
    for name in ("adam", "adam-ema"):
        assert_same_run(ended[name].result, undisturbed[name].result)


def test_a_member_that_fails_leaves_and_the_pack_goes_on(tiny_config):
    configs = three_cells(tiny_config)
    bad = configs["sgd"].replace(batch_size=5000)  # more than its training images: fails in its first step
    pack = Pack(CPU)
    for name, config in {**configs, "sgd": bad}.items():
        pack.add(name, steps_of(config))
    first_round = pack.step()
    assert {name: type(end.error).__name__ for name, end in first_round.items()} == {"sgd": "ConfigError"}
    assert pack.names() == ["adam", "adam-ema"]
    while pack:
        pack.step()


@pytest.mark.skipif(not hasattr(torch, "AcceleratorError"), reason="torch.AcceleratorError: not in this torch")
def test_a_cuda_error_ends_the_pack_not_one_member_after_another():
    """A CUDA error breaks the device for every member: it must end the pack (its trainer dies, its runs are
    preempted), not fail the member that met it, then the next, each recorded as failed. Injected as the error a
    broken device raises."""

    def broken_device():
        yield
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

    def steady():
        while True:
            yield

    pack = Pack(CPU)
    pack.add("broken", broken_device())
    pack.add("steady", steady())
    assert pack.step() == {}
    with pytest.raises(torch.AcceleratorError):
        pack.step()
    assert pack.names() == ["broken", "steady"]  # each is stopped by its trainer's way out, as preempted
