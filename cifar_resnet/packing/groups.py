"""Where a trainer puts a run in `--pack fused` mode: into a fused group of its shape, or on streams, and why.

A trainer holds one fused group at a time, of K slots, K being the runs its supervisor plans for the GPU (`--runs`):
a sweep's cells share their shape, so one group holds them all. A run goes into the first group that accepts it (the
same fusion settings, a free slot). When no group holds a run, a new group of K slots is opened for it (an idle group
of other settings is closed first; an idle one of its own settings is used again, graph and all). Otherwise (another
width while a group trains, every slot taken, a run asking for torch.compile) it trains on streams in the same
trainer: a second group for one run would cost a whole group's step, every slot's convolutions included.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch

from ..config import Config
from ..engine.loop import Join
from ..engine.streams import CudaStreams
from .fused import FusedGroup, NoGroupStream, unfusable

log = logging.getLogger(__name__)


@dataclass
class Placement:
    """How a run trains in its trainer: `join` (its fused group's, for `fit_steps`) or None (on streams), and what
    its logs say of it."""

    join: Join | None
    how: str  # "on streams", "on streams, not fused: <why>", "fused: slot 1 of 6, with runs a, b"


ON_STREAMS = Placement(None, "on streams")


class FusedGroups:
    """A trainer's fused group on `device` (one at a time, see above), of `slots` slots, its stream from `streams`."""

    def __init__(self, device: torch.device, slots: int, streams: CudaStreams) -> None:
        self.device, self.slots, self.streams = device, slots, streams
        self.group: FusedGroup | None = None

    def place(self, run_id: str, config: Config, num_classes: int) -> Placement:
        """Where the run `run_id` of `config` trains (its slot, when fused, is held for it until it joins or
        `release`)."""
        if (reason := unfusable(config)) is not None:
            return Placement(None, f"on streams, not fused: {reason}")
        if self.group is not None:
            reason = self.group.refusal(config, num_classes)
            if reason is None:
                return self.reserve(self.group, run_id)
            if self.group.holders():
                return Placement(None, f"on streams, not fused: {reason}")
            self.group.close()  # idle, and of other settings
            self.group = None
        try:
            self.group = FusedGroup(config, num_classes, self.device, self.slots, streams=self.streams)
        except NoGroupStream as error:
            return Placement(None, f"on streams, not fused: {error}")
        return self.reserve(self.group, run_id)

    def reserve(self, group: FusedGroup, run_id: str) -> Placement:
        others = [name for _, name in sorted(group.holders().items())]
        slot = group.reserve(run_id)
        beside = f"with runs {', '.join(others)}" if others else "the group's first run"
        return Placement(functools.partial(group.joined, slot=slot),
                         f"fused: slot {slot + 1} of {group.slots}, {beside}")

    def release(self, run_id: str) -> None:
        """The run has ended: a slot held for it that it never joined is free again (one it joined, it left)."""
        if self.group is not None:
            self.group.release(run_id)

    def close(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None
