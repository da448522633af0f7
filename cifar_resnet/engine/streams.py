"""The CUDA streams of one process's runs (`CudaStreams`), each held by one owner at a time, and the one wait with
which the host reads a stream's results (`host_copies`).

Why an owner of streams. `torch.cuda.Stream()` draws from torch's pool of 32 streams per device and priority, round
robin: the 33rd stream drawn in a process is the first again. Two owners must never share a stream:
  - graphs captured on one stream share its cuBLAS workspace, which is freed when either graph is destroyed; the
    other's replays then read freed memory (`cudaErrorIllegalAddress`, which ends the process: pytorch/pytorch#193402).
    So every graph is captured on a stream of its own, which nothing else uses while the graph lives;
  - two pack members on one stream run one after the other, never side by side.
A trainer holds many runs over its life (a sweep's runs come and go), each with a stream for its work and one per
graph. So every stream of a process is drawn through one `CudaStreams`, which hands a stream to one owner at a time,
and out again only after its owner gave it back and its queued work is done (`give_back` synchronises it): a leaving
member's last kernels cannot read memory that the next owner's allocations reuse.

Why torch's pool, and not streams of our own (`torch.cuda.ExternalStream` over a stream created through
cuda-python): the pool is there in every torch from 2.4 to 2.14 with no other dependency, and 32 streams cover a
GPU's runs (a run alone holds 2 or 3; a pack member 1 to 4; `CUDA_DEVICE_MAX_CONNECTIONS`, the hardware queues
they map to, is at most 32 as well). When all 32 are held, `take` returns None and the caller goes on without a
stream of its own (a graph is not captured; a member works on the default stream), after a warning: slower, still
correct. A fused group is not made then (`packing.fused.NoGroupStream`): its runs train on streams.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

log = logging.getLogger(__name__)

TORCH_POOL_STREAMS = 32  # streams per device and priority in torch's pool (c10's kStreamsPerPool)


class CudaStreams:
    """The streams of `device` that this process's runs hold, each by one owner at a time (see the module's
    docstring). On a CPU there are none: `take` returns None."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.held: set[int] = set()  # the raw handles (`cuda_stream`) of the streams handed out
        self.free: list[Any] = []  # streams given back, synchronised: handed out again first

    def take(self, owner: str) -> Any:
        """A stream that no one else holds, for `owner` (named in the warning when there is none): a
        torch.cuda.Stream, or None on a CPU or when all of torch's pool is held."""
        if self.device.type != "cuda":
            return None
        if self.free:
            stream = self.free.pop()
        else:
            stream = self.draw()
            if stream is None:
                log.warning("%s: all %d CUDA streams of torch's pool are in use; it goes on without a stream of its "
                            "own (slower, still correct)", owner, TORCH_POOL_STREAMS)
                return None
        self.held.add(stream.cuda_stream)
        return stream

    def draw(self) -> Any:
        """A stream of torch's pool that is neither held nor free here (other code may draw from the pool too, so
        its turn is not ours to count), or None when none is left."""
        known = self.held | {stream.cuda_stream for stream in self.free}
        for _ in range(TORCH_POOL_STREAMS):
            stream = torch.cuda.Stream(self.device)
            if stream.cuda_stream not in known:
                return stream
        return None

    def give_back(self, stream: Any) -> None:
        """`stream`'s owner is done with it: once its queued work has finished (a sync, once per owner's life),
        another owner may take it. None (no stream was taken) is ignored."""
        if stream is None or stream.cuda_stream not in self.held:
            return
        stream.synchronize()
        self.held.discard(stream.cuda_stream)
        self.free.append(stream)


def host_copies(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of `tensors` in host memory that training cannot change, read with one wait. A CUDA tensor is copied
    into pinned memory without blocking, and one event on the current stream marks the copies done: the host waits
    once, for this stream's work up to them, never for another stream's (a pack's other members go on queueing
    work meanwhile). A CPU tensor is cloned."""
    copies, on_cuda = [], None
    for tensor in tensors:
        tensor = tensor.detach()
        if tensor.device.type == "cuda":
            copy = torch.empty_like(tensor, device="cpu", pin_memory=True)
            copies.append(copy.copy_(tensor, non_blocking=True))
            on_cuda = tensor.device
        else:
            copies.append(tensor.clone())
    if on_cuda is not None:
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(on_cuda))
        done.synchronize()  # sync point: the one wait
    return copies
