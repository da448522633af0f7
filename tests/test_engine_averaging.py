"""The weight average and Lookahead (engine/averaging.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cifar_resnet.engine.averaging import Lookahead, WeightAverage

pytestmark = pytest.mark.quick  # seconds in all: part of `pytest -m quick`


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
