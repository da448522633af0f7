"""What a run may keep beside the weights it trains, updated after every optimizer step (outside a captured
step): an exponential moving average of the weights (`WeightAverage`), and Lookahead's slow weights."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class WeightAverage:
    """An exponential moving average of a model's weights and batch-norm statistics, kept in a copy of the model
    that validation, test and the checkpoints use in place of the trained one.

    `update` runs after each optimizer step, outside a captured step, as a few fused kernels on the device (no host
    sync). The decay ramps up as (1 + n) / (10 + n) over the first updates (TensorFlow's ExponentialMovingAverage
    with num_updates), so the early average is not dominated by the random initial weights.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.model = copy.deepcopy(model)
        self.decay = decay
        self.updates = 0
        averaged, live = self.model.state_dict(), model.state_dict()  # tensors sharing the modules' storage
        self.averaged = [t for t in averaged.values() if t.is_floating_point()]
        self.live = [t for t in live.values() if t.is_floating_point()]
        self.counters = [averaged[k] for k, t in live.items() if not t.is_floating_point()]
        self.live_counters = [t for t in live.values() if not t.is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.averaged, self.live, 1.0 - decay)  # what torch.optim.swa_utils' EMA runs
        if self.counters:
            torch._foreach_copy_(self.counters, self.live_counters)  # batch norm's num_batches_tracked

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = state["updates"]


class Lookahead:
    """Lookahead (Zhang et al. 2019, "k steps forward, 1 step back") around the run's own optimizer: every `steps`
    optimizer steps the slow weights move `alpha` of the way to the fast weights (the model's parameters, which the
    optimizer trains), and the fast weights start again from there. The optimizer's own state (momentum, Adam's
    moments) carries on across a sync, neither reset nor pulled.

    Parameters only: batch-norm running statistics are buffers of the forward pass and stay those of the fast
    weights (neither pulled nor reset at a sync), as in the published implementations, which see only an
    optimizer's parameters. Validation and test see the model as it stands (fast weights, synced or not).
    `update` runs after each optimizer step, outside a captured step: the steps are counted on the host, and a
    sync is two fused kernels in place on the parameters (the captured graph keeps their storage), no host sync.
    """

    def __init__(self, model: nn.Module, steps: int, alpha: float) -> None:
        self.steps, self.alpha = steps, alpha
        self.names = [name for name, _ in model.named_parameters()]
        self.fast = [p.detach() for p in model.parameters()]  # the parameters' own storage
        self.slow = [p.clone() for p in self.fast]
        self.steps_taken = 0  # optimizer steps of the run so far: the syncs fall on its multiples of `steps`

    @torch.no_grad()
    def update(self) -> None:
        self.steps_taken += 1
        if self.steps_taken % self.steps:
            return
        torch._foreach_lerp_(self.slow, self.fast, self.alpha)  # slow += alpha * (fast - slow)
        torch._foreach_copy_(self.fast, self.slow)

    def restart(self) -> None:
        """Slow weights from the parameters as they are now, counting steps from zero (a resume without state)."""
        torch._foreach_copy_(self.slow, self.fast)
        self.steps_taken = 0

    def state_dict(self) -> dict[str, Any]:
        return {"slow": dict(zip(self.names, self.slow, strict=True)), "steps_taken": self.steps_taken}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, slow in zip(self.names, self.slow, strict=True):
            slow.copy_(state["slow"][name])  # onto this run's device, whichever the checkpoint was loaded onto
        self.steps_taken = state["steps_taken"]
