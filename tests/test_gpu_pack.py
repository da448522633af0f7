"""Runs packed on streams and fused in a group, on a GPU (marked gpu; skipped without CUDA), against the same runs
alone; and what makes the pack safe on CUDA: every graph captured on a stream of its own, streams held by one owner
at a time, host reads through pinned memory.

What holds on a GPU is not what holds on a CPU: cuDNN's backward kernels use atomics and another stream may take
other algorithms, so a run is not bit-reproducible even alone. The runs here are float32 (bf16 off) at calm learning
rates, where those differences stay at float rounding: per-epoch losses within 1e-3 relative, accuracies within two
images of the validation set (`assert_close`).
"""

from __future__ import annotations

import pytest
import torch

from cifar_resnet.config import Config
from cifar_resnet.data.sources import load_splits
from cifar_resnet.engine.device import build_model
from cifar_resnet.engine.loop import FitResult, fit, fit_steps
from cifar_resnet.engine.streams import TORCH_POOL_STREAMS, CudaStreams, host_copies
from cifar_resnet.packing.fused import FusedGroup
from cifar_resnet.packing.groups import FusedGroups
from cifar_resnet.packing.pack import Pack
from cifar_resnet.records import TRAIN_ACC, TRAIN_LOSS, VAL_ACC, VAL_LOSS

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]

LOSS_RELATIVE = 1e-3
ACC_IMAGES = 2


def cells(tmp_path) -> dict[str, Config]:
    """Adam and SGD at calm rates, one with an average; one run ends after its first epoch."""
    base = Config(dataset="synthetic", width=8, epochs=3, batch_size=64, eval_batch_size=256, val_size=500,
                  train_size=2048, test_size=500, device="cuda", bf16=False, output_dir=str(tmp_path / "runs"))
    return {
        "adam": base.replace(optimizer="adam", learning_rate=0.0005, seed=1),
        "sgd": base.replace(optimizer="sgd", learning_rate=0.002, seed=2),
        "short": base.replace(optimizer="adam", learning_rate=0.0002, seed=3, ema_decay=0.9, epochs=1),
        "joiner": base.replace(optimizer="sgd", learning_rate=0.001, seed=4, epochs=2),
    }


def assert_close(got: FitResult, alone: FitResult, val_images: int) -> None:
    assert len(got.history) == len(alone.history)
    for epoch, expected in zip(got.history, alone.history, strict=True):
        for metric in (TRAIN_LOSS, VAL_LOSS):
            assert epoch[metric] == pytest.approx(expected[metric], rel=LOSS_RELATIVE), metric
        for metric in (TRAIN_ACC, VAL_ACC):
            assert epoch[metric] == pytest.approx(expected[metric], abs=ACC_IMAGES / val_images), metric


@pytest.mark.parametrize("sharing", ["streams", "fused"])
def test_packed_and_fused_runs_match_runs_alone_with_one_ending_first_and_one_joining_after(sharing, tmp_path):
    """Three runs start together; `short` ends after one epoch, and `joiner` joins once it has (on a stream it
    freed, or into its slot of the fused group, whose graph is not captured again)."""
    cuda = torch.device("cuda")
    configs = cells(tmp_path)
    pack = Pack(cuda)
    group = FusedGroup(configs["adam"], 10, cuda, slots=3, streams=pack.streams) if sharing == "fused" else None

    def steps(config: Config):
        data = load_splits(config, cuda)
        return fit_steps(config, build_model(config, len(data.classes), cuda), data, cuda,
                         join=group.joined if group is not None else None, streams=pack.streams)

    for name in ("adam", "sgd", "short"):
        pack.add(name, steps(configs[name]))
    ended, graph = {}, None
    while pack:
        for name, end in pack.step().items():
            ended[name] = end
            if name == "short":
                graph = group.graph if group is not None else None
                pack.add("joiner", steps(configs["joiner"]))
    assert {name: end.error for name, end in ended.items()} == dict.fromkeys(configs)
    if group is not None:
        assert group.graph is not None and group.graph is graph  # captured once, before the joiner came
        group.close()
    assert len(pack.streams.held) == 0  # every member's, graph's and group's stream given back
    for name, config in configs.items():
        data = load_splits(config, cuda)
        alone = fit(config, build_model(config, len(data.classes), cuda), data, cuda)
        assert_close(ended[name].result, alone, len(data.val))


def test_every_graph_is_captured_on_a_stream_of_its_own(tmp_path, monkeypatch):
    """pytorch/pytorch#193402: graphs captured on one stream share its cuBLAS workspace, which destroying either
    frees. Two runs on streams and a fused group of two: every graph (training steps, evaluation batches, the
    group's step) is captured on a stream no other graph was captured on, and none on torch's default capture
    stream."""
    cuda = torch.device("cuda")
    capture_streams = []
    capture_begin = torch.cuda.CUDAGraph.capture_begin

    def recorded(graph, *args, **kwargs):
        capture_streams.append(torch.cuda.current_stream().cuda_stream)
        return capture_begin(graph, *args, **kwargs)

    monkeypatch.setattr(torch.cuda.CUDAGraph, "capture_begin", recorded)
    # Four full evaluation batches a pass: three warm up, the fourth is captured.
    configs = {name: config.replace(epochs=1, val_size=1024) for name, config in cells(tmp_path).items()}
    pack = Pack(cuda)
    group = FusedGroup(configs["adam"], 10, cuda, slots=2, streams=pack.streams)
    for name in ("adam", "sgd", "short", "joiner"):
        config = configs[name]
        data = load_splits(config, cuda)
        join = group.joined if name in ("adam", "sgd") else None
        pack.add(name, fit_steps(config, build_model(config, len(data.classes), cuda), data, cuda, join=join,
                                 streams=pack.streams))
    ended = pack.drive({})
    assert all(end.error is None for end in ended.values())
    # The group's step, two runs' training steps, each run's validation batch (a test pass alone is not captured).
    assert len(capture_streams) == 1 + 2 + 4
    assert len(set(capture_streams)) == len(capture_streams)
    default = torch.cuda.graphs.graph.default_capture_stream
    assert default is None or default.cuda_stream not in capture_streams


def test_streams_are_held_by_one_owner_at_a_time():
    """Past torch's pool of 32, `take` says none is free rather than hand out a stream in use; one given back is
    handed out again."""
    streams = CudaStreams(torch.device("cuda"))
    taken = [streams.take(f"owner {i}") for i in range(TORCH_POOL_STREAMS)]
    assert None not in taken and len({stream.cuda_stream for stream in taken}) == TORCH_POOL_STREAMS
    assert streams.take("one too many") is None
    streams.give_back(taken[5])
    assert streams.take("the next owner").cuda_stream == taken[5].cuda_stream


def test_host_copies_are_pinned_and_read_after_one_wait():
    on_gpu = [torch.arange(1000, device="cuda", dtype=torch.float32), torch.ones(3, 4, device="cuda").t()]
    copies = host_copies(on_gpu)
    assert all(copy.is_pinned() and copy.device.type == "cpu" for copy in copies)
    assert all(torch.equal(copy, tensor.cpu()) for copy, tensor in zip(copies, on_gpu, strict=True))
    on_gpu[0].add_(1)  # training goes on in place: the copy is a snapshot
    torch.cuda.synchronize()
    assert copies[0][0].item() == 0.0


def test_with_every_stream_held_a_run_trains_on_streams_not_in_a_group_without_one(tmp_path):
    """A fused group made with no stream of its own stepped on whichever member's stream came first, and the others
    read its results unsynchronised. It is not made: its run trains on streams, and the placement says why."""
    cuda = torch.device("cuda")
    streams = CudaStreams(cuda)
    held = [streams.take("a test") for _ in range(TORCH_POOL_STREAMS)]
    assert None not in held
    placement = FusedGroups(cuda, 2, streams).place("a", cells(tmp_path)["adam"], 10)
    assert placement.join is None
    assert placement.how == ("on streams, not fused: all 32 CUDA streams of torch's pool are in use, and a fused "
                             "group needs one of its own")
