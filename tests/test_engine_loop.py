"""The epoch loop and a run's state (engine/loop.py): a run with every recipe candidate trains, keeps its
averaged weights, and resumes from its saved state bit for bit. (Whole runs resumed: test_e2e_resume.py.)"""

from __future__ import annotations

import copy
import io

import pytest
import torch

from cifar_resnet.data.loader import DeviceLoader
from cifar_resnet.data.sources import load_splits
from cifar_resnet.engine.device import build_model
from cifar_resnet.engine.evaluation import build_eval_step, evaluate_test
from cifar_resnet.engine.loop import WHITENING_IMAGES, Interrupted, TrainHooks, fit
from cifar_resnet.model import init_stem_whitening
from cifar_resnet.records import EPOCH_SECONDS, TRAIN_IMAGES_PER_SECOND

CPU = torch.device("cpu")
ALL_CANDIDATES = {"zero_init_residual": True, "whiten_stem": True, "ema_decay": 0.9, "norm_lr_scale": 4.0,
                  "alternating_flip": True, "tta_translate_px": 1, "adam_beta1": 0.85, "adam_beta2": 0.99,
                  "adam_eps": 1e-6, "lookahead_steps": 4, "lookahead_alpha": 0.8}
# Lookahead syncs every 4 of the tiny run's 15 steps an epoch, so an epoch ends mid-cycle; alpha 0.8, as 0.5 halves
# the progress of its 45 steps, and the run must learn something.


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


def test_an_averaged_run_is_tested_through_its_validation_step_on_its_best_weights(tiny_config, monkeypatch):
    """With ema_decay the average is validated and kept: the test pass reuses the validation step (and so, on a GPU,
    its graph) instead of building, and capturing, one more for a single pass; its numbers are the best weights'."""
    config = tiny_config.replace(epochs=2, ema_decay=0.9)
    data = load_splits(config)
    built = []

    def counted(*args, **kwargs):
        built.append(build_eval_step(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr("cifar_resnet.engine.loop.build_eval_step", counted)
    result = fit(config, build_model(config, len(data.classes), CPU), data, CPU)
    assert len(built) == 1
    alone = evaluate_test(config, result.model, data, CPU)
    assert (result.test.loss, result.test.acc) == (alone.loss, alone.acc)
    assert torch.equal(result.test.confusion, alone.confusion)
