"""The recipe candidates of issues 10 and 22 (zero-init residuals, a whitened stem, a weight average, a batch-norm
learning rate and SGD's own, Adam's betas and eps, alternating flips, shifted TTA views, Lookahead): each setting
checked, each doing what its help says, and a run with all of them resuming exactly."""

import copy
import io

import sweeps

import pytest
import torch
from torch import nn

from cifar_resnet.config import Config
from cifar_resnet.data.images import ImageSet
from cifar_resnet.data.loader import DeviceLoader
from cifar_resnet.data.sources import load_splits, make_synthetic
from cifar_resnet.engine.averaging import Lookahead, WeightAverage
from cifar_resnet.engine.device import build_model, build_optimizer, build_scheduler
from cifar_resnet.engine.evaluation import evaluate, tta_logits, tta_views
from cifar_resnet.engine.loop import WHITENING_IMAGES, Interrupted, TrainHooks, fit
from cifar_resnet.errors import ConfigError
from cifar_resnet.model import CIFAR10CNN, ResidualBlock, init_stem_whitening
from cifar_resnet.records import EPOCH_SECONDS, TRAIN_IMAGES_PER_SECOND
from cifar_resnet.sweep.plan import load_sweep

from conftest import REPO

CPU = torch.device("cpu")
ALL_CANDIDATES = {"zero_init_residual": True, "whiten_stem": True, "ema_decay": 0.9, "norm_lr_scale": 4.0,
                  "alternating_flip": True, "tta_translate_px": 1, "adam_beta1": 0.85, "adam_beta2": 0.99,
                  "adam_eps": 1e-6, "lookahead_steps": 4, "lookahead_alpha": 0.8}
# Lookahead syncs every 4 of the tiny run's 15 steps an epoch, so an epoch ends mid-cycle; alpha 0.8, as 0.5 halves
# the progress of its 45 steps, and the run must learn something.


@pytest.mark.quick
@pytest.mark.parametrize(("argument", "message"), [
    ("--ema_decay=1", r"ema_decay: must be in \[0, 1\), got 1.0"),
    ("--ema_decay=-0.1", r"ema_decay: must be in \[0, 1\)"),
    ("--adam_beta1=1.5", r"adam_beta1: must be in \[0, 1\)"),
    ("--adam_beta2=1", r"adam_beta2: must be in \[0, 1\)"),
    ("--adam_eps=0", r"adam_eps: must be > 0"),
    ("--norm_lr_scale=0", r"norm_lr_scale: must be > 0"),
    ("--tta_translate_px=5", r"tta_translate_px: must be in 0..4 pixels, got 5"),
    ("--whiten_stem=maybe", r"whiten_stem: 'maybe' is not a valid bool"),
    ("--sgd_norm_lr_scale=-1", r"sgd_norm_lr_scale: must be >= 0, got -1.0"),
    ("--lookahead_steps=-5", r"lookahead_steps: must be >= 0, got -5"),
    ("--lookahead_steps=2.5", r"lookahead_steps: '2.5' is not a valid int"),
    ("--lookahead_alpha=0", r"lookahead_alpha: must be in \(0, 1\], got 0.0"),
    ("--lookahead_alpha=1.5", r"lookahead_alpha: must be in \(0, 1\]"),
])
def test_each_candidate_setting_is_checked_in_one_line(argument, message):
    with pytest.raises(ConfigError, match=message):
        Config.from_argv([argument])


@pytest.mark.quick
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


@pytest.mark.quick
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


@pytest.mark.quick
def test_the_weight_average_is_an_exponential_moving_average_with_a_ramp():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    average = WeightAverage(model, decay=0.5)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    for update in range(1, 6):
        with torch.no_grad():
            for tensor in model.state_dict().values():
                tensor.add_(1)  # parameters and batch-norm buffers, counter included
        average.update()
        decay = min(0.5, (1 + update) / (10 + update))
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                expected[name] = decay * expected[name] + (1 - decay) * tensor
            else:
                expected[name] = tensor.clone()
    for name, tensor in average.model.state_dict().items():
        assert torch.allclose(tensor.float(), expected[name].float()), name


@pytest.mark.quick
@pytest.mark.parametrize("graph", [False, True])
def test_norm_lr_scale_and_adams_betas_reach_the_optimizer_and_follow_the_schedule(graph):
    config = Config(width=8, learning_rate=0.01, norm_lr_scale=8, adam_beta1=0.8, adam_beta2=0.95, adam_eps=1e-6,
                    epochs=2, warmup_epochs=1, lr_schedule="onecycle")
    model = build_model(config, 10, CPU)
    optimizer = build_optimizer(config, model, CPU, graph=graph)
    scheduler = build_scheduler(config, optimizer, steps_per_epoch=4)
    weights, norms = optimizer.param_groups
    assert weights["betas"] == (0.8, 0.95) and weights["eps"] == 1e-6
    assert all(p.ndim == 1 for p in norms["params"])
    if graph:  # a tensor of its own per group: the scheduler fills each with its own rate
        assert weights["lr"] is not norms["lr"]
    for _ in range(5):
        optimizer.step()
        scheduler.step()
        assert float(norms["lr"]) == pytest.approx(8 * float(weights["lr"]), rel=1e-6) and float(weights["lr"]) > 0


def sweep_cells(*fixed: str) -> list[dict]:
    """The runs W&B's own grid proposes for the repository's sweep.yaml with `fixed` (`name=value`) added to it."""
    sweep = load_sweep(REPO / "sweep.yaml", fixed).config
    runs: list[sweeps.SweepRun] = []
    while (proposal := sweeps.next_run(sweep, runs)) is not None:
        runs.append(sweeps.SweepRun(name=f"r{len(runs)}", state=sweeps.RunState.finished, config=proposal.config))
    return [{name: item["value"] for name, item in run.config.items()} for run in runs]


@pytest.mark.quick
@pytest.mark.parametrize(("sgd_norm_lr_scale", "sgd_factor"), [(32.0, 32.0), (0.0, 8.0)])
def test_one_sweep_over_adam_and_sgd_gives_sgd_its_own_batch_norm_factor_and_momentum(sgd_norm_lr_scale, sgd_factor):
    """The SGD-only settings are plain fixed parameters of the one sweep file: Adam's cells ignore them."""
    cells = sweep_cells("norm_lr_scale=8", f"sgd_norm_lr_scale={sgd_norm_lr_scale}", "momentum=0.9")
    assert sorted(cell["optimizer"] for cell in cells) == ["adam"] * 3 + ["sgd"] * 3
    for cell in cells:
        config = Config.from_mapping({**cell, "width": 8})
        weights, norms = build_optimizer(config, build_model(config, 10, CPU), CPU).param_groups
        factor = sgd_factor if config.optimizer == "sgd" else 8.0
        assert norms["lr"] == pytest.approx(factor * weights["lr"]) and weights["lr"] == config.learning_rate
        if config.optimizer == "sgd":
            assert (weights["momentum"], weights["nesterov"]) == (0.9, True)  # tuned's Nesterov, momentum 0.9
        else:
            assert "momentum" not in weights and weights["betas"] == (0.9, 0.999)


@pytest.mark.quick
def test_lookahead_pulls_the_slow_weights_every_k_steps_in_place_and_leaves_batch_norm_statistics():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    model(torch.randn(8, 3))  # batch-norm statistics of their own
    lookahead = Lookahead(model, steps=3, alpha=0.25)
    storage = [p.data_ptr() for p in model.parameters()]  # what a captured graph reads and writes
    buffers = {name: tensor.clone() for name, tensor in model.named_buffers()}
    slow = [p.detach().clone() for p in model.parameters()]
    for step in range(1, 10):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))  # the optimizer's step
        fast = [p.detach().clone() for p in model.parameters()]
        lookahead.update()
        if step % 3 == 0:  # k steps forward, one step back: slow += alpha (fast - slow), and fast = slow
            slow = [s + 0.25 * (f - s) for s, f in zip(slow, fast, strict=True)]
            fast = slow
        for p, expected in zip(model.parameters(), fast, strict=True):
            assert torch.allclose(p, expected, atol=1e-6), step
    assert [p.data_ptr() for p in model.parameters()] == storage
    assert all(torch.equal(tensor, buffers[name]) for name, tensor in model.named_buffers())
    saved = lookahead.state_dict()
    assert saved["steps_taken"] == 9 and list(saved["slow"]) == [name for name, _ in model.named_parameters()]


def flips_seen(loader: DeviceLoader, epoch: int) -> dict[int, bool]:
    """Which images (by label) the loader mirrors in `epoch`. Each image is a left-to-right ramp: mirrored, it
    falls; a 4 px crop shift cannot turn that around in the middle columns."""
    loader.set_epoch(epoch)
    seen = {}
    for images, labels in loader:
        falls = images[:, 0, 16, 18] < images[:, 0, 16, 13]
        seen.update(zip(labels.tolist(), falls.tolist(), strict=True))
    return seen


@pytest.mark.quick
def test_alternating_flip_mirrors_each_image_in_every_other_epoch():
    n = 256
    ramp = torch.arange(32, dtype=torch.uint8).mul(8).expand(n, 3, 32, 32).contiguous()
    data = ImageSet(ramp, torch.arange(n))
    generator = torch.Generator().manual_seed(0)
    loader = DeviceLoader(data, 32, CPU, generator=generator, augment=True, alternating_flip=True)
    epochs = [flips_seen(loader, epoch) for epoch in range(1, 5)]
    assert 0.35 < sum(epochs[0].values()) / n < 0.65  # a random half first
    for image in range(n):
        assert [epoch[image] for epoch in epochs] == [epochs[0][image], not epochs[0][image]] * 2
    coin = DeviceLoader(data, 32, CPU, generator=torch.Generator().manual_seed(0), augment=True)
    tosses = [flips_seen(coin, epoch) for epoch in range(1, 5)]
    assert any(tosses[0][i] == tosses[1][i] for i in range(n))  # the default is a coin toss each epoch


def reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Reflect-pad index arithmetic: -1 -> 1, size -> size - 2."""
    return torch.where(index < 0, -index, torch.where(index >= size, 2 * (size - 1) - index, index))


@pytest.mark.quick
def test_translated_tta_averages_the_mirrored_pairs_of_three_views():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5))  # sees every pixel where it is
    images = torch.randn(4, 3, 8, 8)
    rows = torch.arange(8)

    def shifted(by: int) -> torch.Tensor:  # the view whose pixel (i, j) is the image's (i + by, j + by), reflected
        index = reflect(rows + by, 8)
        return images[:, :, index][:, :, :, index]

    def pair(views: torch.Tensor) -> torch.Tensor:
        return (model(views) + model(views.flip(3))) / 2

    expected = pair(images) / 2 + (pair(shifted(-1)) + pair(shifted(1))) / 4
    with torch.no_grad():
        assert torch.allclose(tta_logits(model, images, tta=True, translate_px=1), expected, atol=1e-6)
        assert torch.allclose(tta_logits(model, images, tta=True, translate_px=0), pair(images))
        assert torch.allclose(tta_logits(model, images, tta=False, translate_px=1), model(images))


@pytest.mark.quick
@pytest.mark.parametrize(("tta", "translate_px", "views"), [(False, 0, 1), (True, 0, 2), (True, 1, 6)])
def test_evaluate_runs_one_forward_pass_per_view(tta, translate_px, views):
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    calls = []
    model.register_forward_hook(lambda module, inputs, output: calls.append(len(inputs[0])))
    data = ImageSet(torch.zeros(10, 3, 32, 32, dtype=torch.uint8), torch.zeros(10, dtype=torch.int64))
    evaluate(model, DeviceLoader(data, 10, CPU), 10, tta=tta, translate_px=translate_px)
    assert len(calls) == views == tta_views(tta, translate_px)


def without_timing(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in epoch.items() if k not in (EPOCH_SECONDS, TRAIN_IMAGES_PER_SECOND)} for epoch in history]


def snapshot(state: dict) -> dict:
    """A deep copy of a `TrainState.state_dict()`, through torch.save as a checkpoint is."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.slow
def test_a_run_with_every_candidate_trains_keeps_averaged_weights_and_resumes_exactly(tiny_config):
    config = tiny_config.replace(epochs=3, **ALL_CANDIDATES)
    data = load_splits(config)
    def keep(result, state):
        assert state.average is not None
        if result.is_best:  # the averaged weights are the ones kept, not the trained ones
            assert all(torch.equal(state.best_model_state[k], v)
                       for k, v in state.average.model.state_dict().items())
            assert not torch.equal(state.best_model_state["fc.weight"], state.model.fc.weight)

    model = build_model(config, len(data.classes), CPU)
    stems = []
    straight = fit(config, model, data, CPU, TrainHooks(
        on_epoch_start=lambda epoch, batches: stems.append(model.stem[0].weight.detach().clone()), on_epoch=keep))
    whitened = build_model(config, 10, CPU)  # the stem fit trains from: whitened on the first training images
    init_stem_whitening(whitened, DeviceLoader(data.train, 1, CPU).normalize(data.train.images[:WHITENING_IMAGES]))
    assert torch.equal(stems[0], whitened.stem[0].weight)
    assert straight.test.acc > 0.2 and len(straight.history) == 3  # ten classes: it learned something

    # Stopped in epoch 2, then resumed from the state saved after epoch 1: the same run, bit for bit.
    polls = {"count": 0}

    def stop_in_epoch_two() -> bool:
        polls["count"] += 1
        return polls["count"] > 1.5 * (config.train_size // config.batch_size)

    first_epoch_only: list[dict] = []
    with pytest.raises(Interrupted):
        fit(config, build_model(config, 10, CPU), data, CPU,
            TrainHooks(on_epoch=lambda r, s: first_epoch_only.append(snapshot(s.state_dict())),
                       should_stop=stop_in_epoch_two))
    assert len(first_epoch_only) == 1
    assert first_epoch_only[0]["lookahead"]["steps_taken"] == config.train_size // config.batch_size  # mid-cycle
    resumed = fit(config, build_model(config, 10, CPU), data, CPU, resume=copy.deepcopy(first_epoch_only[0]))
    assert without_timing(resumed.history) == without_timing(straight.history)
    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], tensor), name
    assert resumed.test.acc == straight.test.acc
