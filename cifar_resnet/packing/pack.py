"""Several runs trained together on one device, in lockstep: the unit of GPU work when one run cannot fill a GPU.

A member is a whole run's training as a generator that yields after every optimizer step (`engine.loop.fit_steps`,
or the runner's `run_steps`, which adds the run's files). A round steps every member once, in turn. On CUDA each
member works on a CUDA stream of its own (its captured step replays there), so the small kernels of different
members run side by side on the GPU's many SMs, where separate processes only time-slice it. On a CPU members
simply take turns, which is correct, not fast.

Members share nothing but the device, the stored data, which no step writes, and the pack's owner of CUDA streams
(`streams`, which the members' captured graphs take their capture streams from too): each has its own model,
optimizer, generator, data order and files, so a member gives the same numbers packed as alone, and a member that
ends (finished, failed, stopped) leaves the pack without disturbing the others. Members of a fused group
(`packing.fused`) are members of the pack too: their steps wait for their group's.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import torch

from ..engine.step import TrainingSteps
from ..engine.streams import CudaStreams
from .ends import MemberEnd

log = logging.getLogger(__name__)

# A CUDA error (an illegal memory access...) is sticky: the process's device is broken for every member, so it ends
# the pack, not one member (its trainer dies, and its runs resume in the next one): torch.AcceleratorError. Older
# torch (2.4) raises a plain RuntimeError there, which ends only the member that met it.
DEVICE_ERRORS: tuple[type[BaseException], ...] = tuple(filter(None, [getattr(torch, "AcceleratorError", None)]))


@dataclass
class Member:
    name: str
    steps: TrainingSteps[Any]
    stream: Any = None  # torch.cuda.Stream on CUDA, when members get streams of their own


class Pack:
    """Members stepped in turn on `device`; `step()` runs one round and returns how each member that ended in it
    ended, by name (a CUDA error, `DEVICE_ERRORS`, is raised: it ends the pack); `drive(members)` steps them all to
    their end.

    `separate_streams`: on CUDA, each member works on a stream of its own from `streams`, the pack's owner of streams
    (made here unless given); else all on the caller's stream, taking turns. A member's stream goes back to `streams`
    when it leaves, once its queued work is done, so that no later member shares it or the memory it freed.
    """

    def __init__(self, device: torch.device, separate_streams: bool = True, streams: CudaStreams | None = None) -> None:
        self.device = device
        self.separate_streams = separate_streams and device.type == "cuda"  # on a CPU nothing runs side by side
        self.streams = streams or CudaStreams(device)
        self.members: list[Member] = []

    def __len__(self) -> int:
        return len(self.members)

    def names(self) -> list[str]:
        return [member.name for member in self.members]

    def add(self, name: str, steps: TrainingSteps[Any]) -> None:
        """Add a member; it builds its model and state in its first step, on its own stream."""
        stream = self.streams.take(f"pack member {name}") if self.separate_streams else None
        if stream is not None:
            # Its work may read what the current stream made (the stored data): wait for that first.
            stream.wait_stream(torch.cuda.current_stream(self.device))
        self.members.append(Member(name, steps, stream))

    def step(self) -> dict[str, MemberEnd]:
        """One optimizer step of every member, in turn; the members that ended in this round leave the pack."""
        ended = {}
        for member in list(self.members):
            try:
                with self.on_stream(member):
                    next(member.steps)
            except StopIteration as end:
                ended[member.name] = MemberEnd(result=end.value)
            except DEVICE_ERRORS:
                raise
            except Exception as error:  # this member's end (diverged, stopped, a bad setting): not the pack's
                ended[member.name] = MemberEnd(error=error)
            else:
                continue
            self.leave(member)
        return ended

    def stop(self, name: str) -> None:
        """End a member now, between its steps: its generator is closed, so its `finally` blocks and context
        managers run (its run folder's lock is released, it leaves its fused group); its files stay as its last
        completed epoch left them."""
        member = next(member for member in self.members if member.name == name)
        try:
            with self.on_stream(member):
                member.steps.close()
        finally:
            self.leave(member)

    def leave(self, member: Member) -> None:
        self.members.remove(member)
        self.streams.give_back(member.stream)  # synchronised first: its last kernels may read what it freed

    def close(self) -> None:
        for name in self.names():
            self.stop(name)

    def on_stream(self, member: Member) -> contextlib.AbstractContextManager:
        return torch.cuda.stream(member.stream) if member.stream is not None else contextlib.nullcontext()

    def drive(self, members: dict[str, TrainingSteps[Any]]) -> dict[str, MemberEnd]:
        """Add `members`, then step the pack until every member (these and any already in it) has ended; how each
        ended, by name."""
        for name, steps in members.items():
            self.add(name, steps)
        ended: dict[str, MemberEnd] = {}
        try:
            while self:
                ended |= self.step()
        finally:
            self.close()
        return ended
