"""A fused group (cifar_resnet/packing/fused.py): K runs trained as one model give each run what it gets alone.

On the CPU in float64 a member equals the same run alone to 1e-10 in every weight, batch-norm statistic, optimizer
state and averaged weight, over 3 epochs of the real schedule, for Adam, AdamW and SGD at other learning rates, seeds
and label smoothing; in float32, trained by the engine's own `fit_steps`, its per-epoch metrics match the run
alone's (`fit`) within rounding. Faults
(two slots' learning rates swapped, two members' channel groups mixed) make the same check fail, and members that
leave or join mid-run leave the others exact. The capture needs a GPU (marked gpu).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from cifar_resnet.checkpoint import host_copy
from cifar_resnet.config import Config
from cifar_resnet.data.loader import DeviceLoader
from cifar_resnet.data.sources import load_splits
from cifar_resnet.engine.device import build_model
from cifar_resnet.engine.evaluation import evaluate
from cifar_resnet.engine.loop import TrainState, drive, fit, fit_steps
from cifar_resnet.engine.step import build_step
from cifar_resnet.packing.fused import FusedGroup
from cifar_resnet.packing.pack import Pack
from cifar_resnet.records import TRAIN_ACC, TRAIN_LOSS, VAL_ACC, VAL_LOSS

CPU = torch.device("cpu")
EXACT = 1e-10  # float64: the layout is exact up to the order of a few sums (measured: ~1e-13 after 3 epochs)
FAULT = 1e-3  # what a fault does to a weight in 3 epochs, at the least


def small(**changes) -> Config:
    """The tuned recipe (onecycle warm-up, label smoothing, weight decay, Nesterov) on a width-4 model and 64
    synthetic training images: 8 steps an epoch."""
    return Config(dataset="synthetic", width=4, epochs=3, batch_size=8, eval_batch_size=64, val_size=64,
                  train_size=64, test_size=32, device="cpu", output_dir="runs").replace(**changes)


CELLS = {  # other optimizers, learning rates, seeds and label smoothing; an average and Lookahead on two
    "adam": small(optimizer="adam", learning_rate=0.002, seed=1, label_smoothing=0.1),
    "sgd": small(optimizer="sgd", learning_rate=0.05, seed=2, label_smoothing=0.0, lookahead_steps=5),
    "adamw": small(optimizer="adamw", learning_rate=0.001, seed=3, label_smoothing=0.2, ema_decay=0.9),
}


def calm(cells: dict[str, Config]) -> dict[str, Config]:
    """`cells` at a tenth of their learning rates, on batches of 16: as they are, a width-4 model is chaotic enough
    that a 1e-7 change of its initial weights moves its SGD weights by ~1 in 3 epochs (measured), fused or not."""
    return {name: config.replace(learning_rate=config.learning_rate / 10, batch_size=16, train_size=128)
            for name, config in cells.items()}


def training_steps(config: Config, dtype: torch.dtype, group: FusedGroup | None = None,
                   resume: dict | None = None, evaluate_epochs: bool = False, until: int | None = None):
    """A run's training as `engine.loop.fit_steps` runs it (its loader and generator, schedule, EMA, Lookahead), one
    `yield` per optimizer step: alone through the engine's own step, or as a member of `group` through
    `FusedMember.run`, driven with `yield from` as the training loop will drive it. Returns the run's state
    (`TrainState.state_dict`, copied before the member leaves) and its per-epoch metrics. `until`: the epoch after
    which it stops (default: the last)."""
    data = load_splits(config, CPU)
    model = build_model(config, len(data.classes), CPU).to(dtype)
    generator = torch.Generator().manual_seed(config.seed)
    loader = DeviceLoader(data.train, config.batch_size, CPU, generator=generator, augment=True,
                          alternating_flip=config.alternating_flip)
    with contextlib.ExitStack() as stack:
        if group is None:
            step = build_step(config, model, CPU)

            def run(images, labels):
                step(images.to(dtype), labels)
                yield
        else:
            step = stack.enter_context(group.joined(config, model))
            run = step.run
        state = TrainState.start(config, step.model, step.optimizer, generator, len(loader))
        if resume is not None:
            state.resume(resume)
        after_step = state.after_step()
        evaluated = state.average.model if state.average is not None else step.model
        history = []
        for epoch in range(state.epoch + 1, (until or config.epochs) + 1):
            loader.set_epoch(epoch)
            step.model.train()
            step.totals.zero_()
            for images, labels in loader:
                yield from run(images, labels)
                for update in after_step:
                    update()
            seen = len(loader) * config.batch_size
            metrics = {TRAIN_LOSS: step.totals.loss_sum.item() / seen, TRAIN_ACC: step.totals.correct.item() / seen}
            if evaluate_epochs:
                val = evaluate(evaluated, DeviceLoader(data.val, config.eval_batch_size, CPU), len(data.classes),
                               tta=config.tta, translate_px=config.tta_translate_px)
                metrics |= {VAL_LOSS: val.loss, VAL_ACC: val.acc}
            history.append(metrics)
            state.epoch = epoch
        return host_copy(state.state_dict()), history


def alone(config: Config, dtype: torch.dtype = torch.float64, **kwargs):
    return drive(training_steps(config, dtype, **kwargs))


def worst_difference(got, expected) -> float:
    """The largest absolute difference between two `TrainState.state_dict`s' tensors (weights, batch-norm
    statistics and counters, optimizer state, averaged and slow weights, generator); their other entries must be
    equal."""
    got_leaves, got_spec = torch.utils._pytree.tree_flatten(got)
    expected_leaves, expected_spec = torch.utils._pytree.tree_flatten(expected)
    assert got_spec == expected_spec
    worst = 0.0
    for a, b in zip(got_leaves, expected_leaves, strict=True):
        if isinstance(b, torch.Tensor):
            assert a.shape == b.shape and a.dtype == b.dtype
            worst = max(worst, (a.double() - b.double()).abs().max().item() if b.numel() else 0.0)
        else:
            assert a == b
    return worst


def fused_runs(configs: dict[str, Config], dtype=torch.float64, slots=None, **kwargs):
    group = FusedGroup(next(iter(configs.values())), 10, CPU, slots or len(configs), dtype=dtype)
    ended = Pack(CPU).drive({name: training_steps(config, dtype, group, **kwargs)
                         for name, config in configs.items()})
    assert {name: end.error for name, end in ended.items()} == dict.fromkeys(configs)
    return {name: end.result for name, end in ended.items()}


@pytest.fixture(scope="module")
def runs_alone():
    """Each cell trained alone in float64: the reference the fused members are held to."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield {name: alone(config) for name, config in CELLS.items()}
    torch.set_num_threads(threads)


@pytest.mark.parametrize("stepped", ["active", "all"])
def test_fused_members_equal_their_runs_alone_in_float64(stepped, runs_alone, monkeypatch):
    """Three members in a group of four slots. With `all`, every optimizer of every slot steps, the unused ones (and
    the free slot's) at learning rate 0: the work list of the captured step on CUDA."""
    if stepped == "all":
        monkeypatch.setattr(FusedGroup, "active_optimizers", FusedGroup.all_optimizers)
    got = fused_runs(CELLS, slots=4)
    for name in CELLS:
        (state, history), (expected_state, expected_history) = got[name], runs_alone[name]
        assert worst_difference(state, expected_state) <= EXACT, name
        for epoch, expected_epoch in zip(history, expected_history, strict=True):  # float32 totals, as alone
            assert epoch == pytest.approx(expected_epoch, rel=1e-6), name


@pytest.mark.parametrize("fault", ["learning rates swapped", "channel groups mixed"])
def test_the_check_fails_under_a_fault(fault, runs_alone, monkeypatch):
    """The exactness check is not blind: with a fault injected, the members it touches end far from their runs."""
    if fault == "learning rates swapped":  # slot 0's optimizer steps with slot 1's rates, and the other way
        train_step = FusedGroup.train_step

        def swapped(group, optimizers):
            pairs = list(zip(optimizers[0].param_groups, optimizers[1].param_groups))
            for first, second in pairs:
                first["lr"], second["lr"] = second["lr"], first["lr"]
            try:
                train_step(group, optimizers)
            finally:
                for first, second in pairs:
                    first["lr"], second["lr"] = second["lr"], first["lr"]

        monkeypatch.setattr(FusedGroup, "train_step", swapped)
    else:  # member 0's images land in slot 1's channels, and the other way
        channels = FusedGroup.channels
        monkeypatch.setattr(FusedGroup, "channels", lambda group, slot: channels(group, {0: 1, 1: 0}.get(slot, slot)))
    got = fused_runs(CELLS)
    for name in ("adam", "sgd"):  # slots 0 and 1
        assert worst_difference(got[name][0], runs_alone[name][0]) > FAULT, name
    assert worst_difference(got["adamw"][0], runs_alone["adamw"][0]) <= EXACT  # slot 2, untouched


def test_members_leaving_and_joining_mid_run_leave_the_others_exact(runs_alone):
    """Slot 2's member is stopped mid-epoch (its generator closed) and slot 1's finishes after one epoch; a new run
    then joins slot 1, while slot 0's run is in its second epoch. Each finished run equals its run alone."""
    short = CELLS["sgd"].replace(epochs=1)
    joiner = CELLS["sgd"].replace(seed=4, epochs=2)  # the leaver's type: its slot's SGD state must start afresh
    group = FusedGroup(small(), 10, CPU, slots=3, dtype=torch.float64)
    pack = Pack(CPU)
    pack.add("adam", training_steps(CELLS["adam"], torch.float64, group))
    pack.add("short", training_steps(short, torch.float64, group))
    pack.add("stopped", training_steps(CELLS["adamw"], torch.float64, group))
    ended, rounds, joined_in = {}, 0, None
    while pack:
        ended |= pack.step()
        rounds += 1
        assert rounds < 100, "the group stopped stepping"
        if rounds == 5:
            pack.stop("stopped")
            assert [member.config.seed for member in group.members()] == [1, 2]  # slots 0 and 1
        if rounds == joined_in:  # the joiner's first step: it took the first free slot, the finished run's
            assert [member.config.seed for member in group.members()] == [1, 4] and group.steps_done > 8
        if "short" in ended and joined_in is None:
            pack.add("joiner", training_steps(joiner, torch.float64, group))
            joined_in = rounds + 1
    assert {name: end.error for name, end in ended.items()} == dict.fromkeys(["adam", "short", "joiner"])
    expected = {"adam": runs_alone["adam"][0], "short": alone(short)[0], "joiner": alone(joiner)[0]}
    for name, state in expected.items():
        assert worst_difference(ended[name].result[0], state) <= EXACT, name


def test_a_member_resumed_in_its_slot_continues_exactly_at_its_static_addresses(runs_alone):
    """A run resumed from its state after epoch 1 (`TrainState.resume`, which replaces the optimizer's state) ends
    as the uninterrupted run, and its slot's optimizer works on the slot's own tensors again (a captured step's)."""
    config = CELLS["adam"]
    after_one_epoch, _ = alone(config, until=1)
    group = FusedGroup(small(), 10, CPU, slots=2, dtype=torch.float64)
    slot_state = group.slot_list[0].states["adam"]
    addresses = {key: tensor.data_ptr() for state in slot_state.values() for key, tensor in state.items()}
    got = drive(training_steps(config, torch.float64, group, resume=after_one_epoch))
    assert worst_difference(got[0], runs_alone["adam"][0]) <= EXACT
    assert group.slot_list[0].optimizers["adam"].state is slot_state
    assert {key: tensor.data_ptr() for state in slot_state.values() for key, tensor in state.items()} == addresses


def test_fused_members_trained_by_the_engine_equal_their_runs_alone_in_float32():
    """The engine's own `fit_steps`, joined to a group (`join`), against its own `fit` alone. In float32 a grouped
    convolution sums in another order than a convolution alone (~2e-7 apart per layer), so the metrics agree to
    float rounding, not bit for bit (at `calm` learning rates)."""
    cells = calm(CELLS)
    group = FusedGroup(next(iter(cells.values())), 10, CPU, len(cells))
    trainings = {}
    for name, config in cells.items():
        data = load_splits(config, CPU)
        trainings[name] = fit_steps(config, build_model(config, len(data.classes), CPU), data, CPU, join=group.joined)
    ended = Pack(CPU).drive(trainings)
    assert {name: end.error for name, end in ended.items()} == dict.fromkeys(cells)
    assert group.members() == [] and group.steps_done == 3 * 8
    for name, config in cells.items():
        data = load_splits(config, CPU)
        expected = fit(config, build_model(config, len(data.classes), CPU), data, CPU)
        got = ended[name].result
        assert_metrics_close(got.history, expected.history, len(data.val))
        assert got.test.acc == pytest.approx(expected.test.acc, abs=1 / len(data.test))
        for key, tensor in expected.model.state_dict().items():  # the best weights, copied out of the slot
            assert torch.allclose(got.model.state_dict()[key].double(), tensor.double(), rtol=1e-3, atol=1e-4), key


def assert_metrics_close(history, expected, val_images: int) -> None:
    """Per-epoch metrics equal within float32 rounding: losses to 1e-4 relative (measured: within 1e-5 of each
    other), accuracies the same or one image's prediction flipped."""
    assert len(history) == len(expected)
    for got_epoch, expected_epoch in zip(history, expected, strict=True):
        for metric in (TRAIN_LOSS, VAL_LOSS):
            assert got_epoch[metric] == pytest.approx(expected_epoch[metric], rel=1e-4), metric
        for metric in (TRAIN_ACC, VAL_ACC):
            assert got_epoch[metric] == pytest.approx(expected_epoch[metric], abs=1 / val_images), metric


def test_a_run_that_cannot_be_fused_is_refused_with_the_reason():
    group = FusedGroup(small(), 10, CPU, slots=1, optimizer_types=("adam", "sgd"))
    assert group.refusal(small(width=8), 10) == "width: 8, this group's is 4"
    assert group.refusal(small(weight_decay=0.0), 10) == "weight_decay: 0.0, this group's is 0.0005"
    assert group.refusal(small(optimizer="adamw"), 10) == "optimizer: adamw, this group holds adam, sgd"
    assert group.refusal(small(), 100) == "100 classes, this group's model has 10"
    assert group.refusal(small(compile=True), 10).startswith("compile:")
    config = small(learning_rate=0.01, seed=7, label_smoothing=0.0)  # what a member may choose
    assert group.refusal(config, 10) is None
    group.join(config, build_model(config, 10, CPU))
    assert group.refusal(config, 10) == "all 1 slots are taken"
    with pytest.raises(ValueError, match="cannot join the fused group: all 1 slots are taken"):
        group.join(config, build_model(config, 10, CPU))


def test_a_slots_model_and_optimizer_are_views_of_the_fused_tensors():
    """Member k's weights are block k of each fused tensor (its conv filters, its batch-norm channels, its head),
    and its optimizer's parameters' gradients are block k of the fused gradients."""
    group = FusedGroup(small(), 10, CPU, slots=3)
    config = small(seed=5)
    model = build_model(config, 10, CPU)
    member = group.join(config, model)
    group.join(small(seed=6), build_model(small(seed=6), 10, CPU))
    assert member.slot == 0 and [m.slot for m in group.members()] == [0, 1]
    stem = group.model.stem[0].weight  # (3 * 4, 3, 3, 3): slot k's filters are rows 4k to 4k + 3
    assert torch.equal(stem[:4], model.stem[0].weight) and not torch.equal(stem[4:8], model.stem[0].weight)
    assert member.model.stem[0].weight.data_ptr() == stem.data_ptr()
    assert torch.equal(group.model.fc.weight[0], model.fc.weight)
    slot = group.slot_list[1]
    assert slot.model.fc.weight.grad.data_ptr() == group.model.fc.weight.grad[1].data_ptr()
    assert set(slot.optimizers) == {"adam", "adamw", "sgd"}
    member.model.stages[0][0].bn1.running_mean.fill_(3.0)  # a buffer written through the member's model
    assert group.model.stages[0][0].bn1.running_mean[:4].eq(3.0).all()
    assert group.model.stages[0][0].bn1.running_mean[4:].eq(0.0).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_the_captured_fused_step_on_its_own_stream_matches_the_eager_one(monkeypatch):
    """On a GPU: the fused step captured as one CUDA graph (on the group's own stream, never torch's shared default
    capture stream) trains as the same group stepped eagerly, within float rounding (cuDNN's kernels are not
    bit-reproducible)."""
    cuda = torch.device("cuda")
    streams = []
    capture_begin = torch.cuda.CUDAGraph.capture_begin

    def recorded(graph, *args, **kwargs):
        streams.append(torch.cuda.current_stream())
        return capture_begin(graph, *args, **kwargs)

    monkeypatch.setattr(torch.cuda.CUDAGraph, "capture_begin", recorded)
    configs = {name: config.replace(device="cuda", bf16=False) for name, config in calm(CELLS).items()}

    def trained(cuda_graph):
        group = FusedGroup(small(device="cuda", bf16=False, cuda_graph=cuda_graph), 10, cuda, slots=3)
        members = {}
        for name, config in configs.items():
            config = config.replace(cuda_graph=cuda_graph)
            data = load_splits(config, cuda)
            member = group.join(config, build_model(config, len(data.classes), cuda))
            generator = torch.Generator(device=cuda).manual_seed(config.seed)
            loader = DeviceLoader(data.train, config.batch_size, cuda, generator=generator, augment=True)
            members[name] = (member, loader)
        for batches in zip(*(loader for _, loader in members.values())):  # one epoch: 8 steps
            for (member, _), (images, labels) in zip(members.values(), batches):
                group.deposit(member.slot, images, labels)
            group.step()
        return group, {name: host_copy(member.model.state_dict()) for name, (member, _) in members.items()}

    eager_group, eager = trained(False)
    captured_group, captured = trained(True)
    assert eager_group.graph is None and captured_group.graph is not None
    assert streams == [captured_group.stream]
    for name in configs:
        for key, tensor in eager[name].items():
            assert torch.allclose(captured[name][key].double(), tensor.double(), rtol=1e-3, atol=1e-4), (name, key)


def test_a_member_joined_without_a_reservation_holds_its_slot():
    """A group with a member in it is never idle: `holders` (what a trainer's placement reads before it closes an
    idle group) named only reserved slots, so a run joined without one (`join(slot=None)`) left it looking idle."""
    group = FusedGroup(small(), 10, CPU, slots=2)
    config = small(seed=7)
    member = group.join(config, build_model(config, 10, CPU))
    assert group.holders() == {member.slot: f"in slot {member.slot + 1}"}
    group.leave(member)
    assert group.holders() == {}
