"""K runs of one shape trained as one fused model (HFTA's horizontal fusion: Wang et al., MLSys 2021,
UofT-EcoSystem/hfta), each run keeping its own model, torch.optim optimizer, schedule and recipe. The fused model's
layout is `layout.py`'s.

Slots with static addresses. A `FusedGroup` owns the fused tensors; slot k is the k-th of K equal blocks along the
first dimension of each (`slot_view`). Everything a member's step touches lives in its slot, at addresses that never
change, so that one CUDA graph of the group's step (forward, backward, every slot's optimizer step) serves every
member that will ever hold the slot:
  - its model: a `CIFAR10CNN` whose parameters and buffers are views of the slot (`slot_model`). The run's EMA,
    Lookahead, validation, test and checkpoints use it as they use a model alone;
  - its optimizer: the slot's optimizer of its type. Each slot keeps one optimizer per type the group admits
    (Adam, AdamW, SGD; one sweep mixes them), each built by the project's `build_optimizer` over the slot's
    permanent parameters, whose gradients are bound once to views of the fused gradients (zeroed each step, never
    set to None). A joining run's settings are loaded into it (learning rates, `norm_lr_scale`, weight decay...),
    and its state tensors (moments, momentum buffers, step counters) are the slot's static ones, zeroed at a join;
    a `load_state_dict` (a resume) is copied back into them before the next step (`Slot.keep_static_state`);
  - its label-smoothing weights, its batch (a channel group of the static input), its epoch's loss and correct
    counts, its batch-norm batch counters.
A run joins a free slot by copying its state in place (`join`), and leaves by being frozen (`leave`): its loss
weight and batch-norm count 0, its slot's learning rates 0, its model copied out of the slot. Nothing is captured
again.

Which optimizers step. Eagerly (a CPU) each active member's optimizer of its own type steps. A captured step (CUDA)
steps every optimizer of every slot: the unused ones have learning rate 0, which leaves their parameters unchanged,
at the cost of their memory traffic (a group admits only the types it is made for).

The step meets a run's training loop through `FusedMember.run`, a generator the loop drives with `yield from`: it
puts the member's batch into its slot and yields until its group has stepped. The group steps once every active
member has put its batch in: the first member resumed after that runs the step for all (`step_if_ready`), so a
pack (`pack.Pack`) that steps its members in turn drives a group with no change, and the schedule, EMA and
Lookahead that follow a step see its weights.

On CUDA the group works on a stream of its own, taken from the process's owner of streams, where its warm-up steps,
its capture and its replays run (never torch's default capture stream, shared by every capture of the process); a
member's batch and settings reach it through stream waits, and the member reads its step's results after one.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import OPTIMIZERS, Config
from ..engine.capture import CAPTURE_WARMUP_STEPS, MIN_GRAPH_CAPABILITY
from ..engine.device import autocast_context, build_optimizer, memory_format_for, uses_cuda_graph
from ..engine.step import StepTotals, TrainingSteps
from ..engine.streams import TORCH_POOL_STREAMS, CudaStreams
from ..model import CIFAR10CNN
from .layout import FusedBatchNorm2d, fuse, member_losses, slot_view

log = logging.getLogger(__name__)

IMAGE_CHANNELS = 3
# The settings runs must share to be fused: the model's and the batch's shapes, precision and memory layout, how the
# step runs, and the optimizer settings that a captured step bakes into its kernels (all but the learning rate, a
# tensor the schedule fills). Everything else may differ: the optimizer type, learning rate, schedule,
# norm_lr_scale, seed, label smoothing, EMA, Lookahead, TTA, epochs, and the data (each member has its own loader,
# and ends its epochs on its own).
FUSION_SETTINGS = ("width", "batch_size", "bf16", "channels_last", "cuda_graph", "weight_decay", "momentum",
                   "nesterov", "adam_beta1", "adam_beta2", "adam_eps")


def unfusable(config: Config) -> str | None:
    """Why a run of `config` cannot train in any fused group; None if it can."""
    if config.compile:
        return "compile: a fused group runs without torch.compile"
    return None


def set_learning_rates(optimizer: torch.optim.Optimizer, value: float) -> None:
    """Every group's learning rate: in place where it is a tensor (a captured step reads it there)."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(value)
        else:
            group["lr"] = value


def load_settings(optimizer: torch.optim.Optimizer, built: torch.optim.Optimizer) -> None:
    """The settings of `built` (a fresh optimizer of the same type over parameters of the same shapes) into
    `optimizer`'s parameter groups: its learning rates (the schedule's base, `initial_lr`, and the current one,
    filled in place where it is a tensor), weight decay and the rest. The state is not touched."""
    for group, new in zip(optimizer.param_groups, built.param_groups, strict=True):
        for key, value in new.items():
            if key == "params":
                continue
            if key == "lr" and isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(new["initial_lr"])  # a fresh optimizer's rate is its base rate: no device read
            else:
                group[key] = value


# --- the group ------------------------------------------------------------------------------------------------


class Slot:
    """Slot `index`'s permanent parts: a model over its views whose parameters' gradients are views of the fused
    gradients, and one optimizer per type over those parameters, with its state tensors (`states`) made once."""

    def __init__(self, group: FusedGroup, index: int, optimizer_types: Sequence[str]) -> None:
        self.index = index
        self.model = group.slot_model(index, gradients=True)
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.states: dict[str, Any] = {}  # the optimizers' own `state` objects, holding the static tensors
        self.rates: dict[str, list[torch.Tensor | None]] = {}  # their learning-rate tensors (a captured step's)
        self.member: FusedMember | None = None
        self.holder: str | None = None  # the run that holds the slot (reserved for it, or joined), by name
        for kind in optimizer_types:
            optimizer = build_optimizer(group.config.replace(optimizer=kind), self.model, group.device,
                                        graph=group.capture)
            set_learning_rates(optimizer, 0.0)
            optimizer.step()  # makes the state tensors (zero gradients, rate 0: the weights stay as they are)
            self.optimizers[kind], self.states[kind] = optimizer, optimizer.state
            self.rates[kind] = [g["lr"] if isinstance(g["lr"], torch.Tensor) else None
                                for g in optimizer.param_groups]
            self.zero_state(kind)

    def zero_state(self, kind: str) -> None:
        """The optimizer's state as a fresh optimizer's (step counters, moments and momentum buffers 0): its first
        step then computes what a lazily made state gives (momentum * 0 + gradient is the gradient, exactly)."""
        for state in self.states[kind].values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    value.zero_()

    def keep_static_state(self, kind: str) -> None:
        """After a `load_state_dict` (a resume) replaced the optimizer's state and groups, copy the loaded values
        into the static tensors and put those back: a captured step reads and writes them, not the loaded ones."""
        optimizer, static = self.optimizers[kind], self.states[kind]
        if optimizer.state is static:  # one identity check a step: a load makes a new state object
            return
        for parameter, tensors in static.items():
            loaded = optimizer.state.get(parameter, {})
            for key, tensor in tensors.items():
                if isinstance(tensor, torch.Tensor) and key in loaded:
                    tensor.copy_(loaded[key])
                elif isinstance(tensor, torch.Tensor):  # saved before its first step
                    tensor.zero_()
        optimizer.state = static
        for group, rate in zip(optimizer.param_groups, self.rates[kind], strict=True):
            if rate is not None and group["lr"] is not rate:
                rate.fill_(float(group["lr"]))
                group["lr"] = rate


class NoGroupStream(RuntimeError):
    """A fused group cannot be made on CUDA: no stream of its own is left (its runs train on streams instead)."""


class FusedGroup:
    """Up to `slots` runs of `config`'s shape (`FUSION_SETTINGS`) on `device`, trained as one fused model.

    `optimizer_types`: the optimizer types its members may use (each slot keeps one optimizer of each). `dtype`: the
    weights' (float32 for runs; the exactness tests use float64). On CUDA with `cuda_graph` the step is captured as
    one CUDA graph after `CAPTURE_WARMUP_STEPS` eager steps, on the group's own stream, taken from `streams` (the
    process's owner of streams) and held until `close` (never torch's shared default capture stream; with none
    left, NoGroupStream); a capture that fails leaves the group training eagerly, after one warning.
    """

    def __init__(self, config: Config, num_classes: int, device: torch.device, slots: int,
                 optimizer_types: Sequence[str] = OPTIMIZERS, dtype: torch.dtype = torch.float32,
                 streams: CudaStreams | None = None) -> None:
        unknown = sorted(set(optimizer_types) - set(OPTIMIZERS))
        if slots < 1 or unknown:
            raise ValueError(f"a fused group needs slots >= 1 (got {slots}) and optimizer types among "
                             f"{', '.join(OPTIMIZERS)} (got {', '.join(unknown)})")
        self.config, self.num_classes, self.device, self.slots = config, num_classes, device, slots
        self.optimizer_types = tuple(optimizer_types)
        self.streams = streams or CudaStreams(device)
        self.stream = self.streams.take("a fused group")  # None on a CPU
        if self.stream is None and device.type == "cuda":
            # Its step must run on a stream of its own, which members wait for: on a member's stream, the others'
            # reads of the step's results would race it.
            raise NoGroupStream(f"all {TORCH_POOL_STREAMS} CUDA streams of torch's pool are in use, and a fused "
                                "group needs one of its own")
        self.capture = uses_cuda_graph(config, device) and self.stream is not None and self.can_capture()
        self.autocast = autocast_context(config, device, cache_enabled=not self.capture)
        self.memory_format = memory_format_for(config, device)
        with torch.device("meta"):  # the structure alone: no memory, no initialisation
            self.model = fuse(CIFAR10CNN(num_classes, config.width), slots, device, dtype)
        self.model.to(memory_format=self.memory_format).train()
        self.gradients = []  # static, bound once: zeroed each step, never set to None
        for parameter in self.model.parameters():
            parameter.grad = torch.zeros_like(parameter)
            self.gradients.append(parameter.grad)
        self.batch_counters = [module.num_batches_tracked for module in self.model.modules()
                               if isinstance(module, FusedBatchNorm2d)]

        def per_slot(dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(slots, dtype=dtype, device=device)

        self.active, self.active_counts = per_slot(dtype), per_slot(torch.long)  # 1 in a member's slot, else 0
        self.nll_weights, self.smooth_weights = per_slot(dtype), per_slot(dtype)  # 1 - eps and eps / classes
        self.loss_sums, self.corrects = per_slot(torch.float32), per_slot(torch.long)  # each member's epoch so far
        self.images: torch.Tensor | None = None  # (B, 3K, H, W), made by the first batch put in
        self.labels = torch.zeros(slots, config.batch_size, dtype=torch.long, device=device)  # (K, B)
        self.slot_list = [Slot(self, index, self.optimizer_types) for index in range(slots)]
        self.deposited: set[int] = set()  # slots whose batch for the next step is in
        self.steps_done = 0
        self.graph: Any = None  # torch.cuda.CUDAGraph once captured
        self.warmed_up = 0
        self.wait_for_caller()  # the tensors made above, before the group's stream uses them

    def can_capture(self) -> bool:
        capability = torch.cuda.get_device_capability(self.device)
        if capability < MIN_GRAPH_CAPABILITY:
            log.warning("training the fused group eagerly, without a CUDA graph: GPU compute capability %s is "
                        "below %s", capability, MIN_GRAPH_CAPABILITY)
            return False
        return True

    # --- members ----------------------------------------------------------------------------------------------

    def slot_model(self, slot: int, gradients: bool = False) -> CIFAR10CNN:
        """A `CIFAR10CNN` whose parameters and buffers are views of slot `slot` (with `gradients`, its parameters'
        gradients are views of the fused ones too)."""
        with torch.device("meta"):
            model = CIFAR10CNN(self.num_classes, self.config.width)
        fused_tensors = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            owner, _, leaf = name.rpartition(".")
            module, fused = model.get_submodule(owner), fused_tensors[name]
            view = slot_view(fused.detach(), self.slots, slot, tensor.shape)
            if isinstance(tensor, nn.Parameter):
                module._parameters[leaf] = parameter = nn.Parameter(view)
                if gradients:
                    parameter.grad = slot_view(fused.grad, self.slots, slot, tensor.shape)
            else:
                module._buffers[leaf] = view
        return model

    def refusal(self, config: Config, num_classes: int, slot: int | None = None) -> str | None:
        """Why a run of `config` on data of `num_classes` classes cannot join this group now, in slot `slot` (one
        reserved for it) or any free one; None if it can."""
        if (reason := unfusable(config)) is not None:
            return reason
        if config.optimizer not in self.optimizer_types:
            return f"optimizer: {config.optimizer}, this group holds {', '.join(self.optimizer_types)}"
        if num_classes != self.num_classes:
            return f"{num_classes} classes, this group's model has {self.num_classes}"
        for name in FUSION_SETTINGS:
            if getattr(config, name) != getattr(self.config, name):
                return f"{name}: {getattr(config, name)}, this group's is {getattr(self.config, name)}"
        if slot is None and self.free_slot() is None:
            return f"all {self.slots} slots are taken"
        if slot is not None and self.slot_list[slot].member is not None:
            return f"slot {slot} is taken"
        return None

    def free_slot(self) -> Slot | None:
        return next((slot for slot in self.slot_list if slot.member is None and slot.holder is None), None)

    def reserve(self, name: str) -> int:
        """Hold the first free slot for the run `name`, which joins it later (`join(..., slot=)`): a trainer places a
        run when it admits it, before the run's first step builds its model. Its index."""
        slot = self.free_slot()
        if slot is None:
            raise ValueError(f"all {self.slots} slots of the fused group are taken")
        slot.holder = name
        return slot.index

    def release(self, name: str) -> None:
        """Free a slot reserved for `name` that its run never joined (it failed before its first step)."""
        for slot in self.slot_list:
            if slot.holder == name and slot.member is None:
                slot.holder = None

    def holders(self) -> dict[int, str]:
        """The runs holding slots, by slot: reserved for a run (named), or joined without a reservation (named by
        its slot), so that a group with a member is never taken for idle."""
        return {slot.index: slot.holder or f"in slot {slot.index + 1}" for slot in self.slot_list
                if slot.holder is not None or slot.member is not None}

    def join(self, config: Config, model: nn.Module, slot: int | None = None) -> FusedMember:
        """A run of `config` whose model `model` (from `build_model`, as the run built it) takes slot `slot`
        (reserved for it), or the first free one: its weights and buffers are copied in, the slot's optimizer of its
        type gets its settings and a fresh state. Train the returned member's `model` and `optimizer` from then
        on."""
        reason = self.refusal(config, model.fc.out_features, slot)
        if reason is not None:
            raise ValueError(f"this run cannot join the fused group: {reason}")
        index = self.free_slot().index if slot is None else slot
        slot = self.slot_list[index]
        self.wait_for_step()  # a replay in flight may still read the free slot
        member_model = self.slot_model(index)
        member_model.load_state_dict(model.state_dict())  # copied into the slot, in place
        optimizer = slot.optimizers[config.optimizer]
        for optimizer_of_slot in slot.optimizers.values():
            set_learning_rates(optimizer_of_slot, 0.0)
        load_settings(optimizer, build_optimizer(config, member_model, self.device, graph=self.capture))
        # Its steps run inside the group's (a graph's replay on CUDA), where the check of torch's schedulers that
        # optimizer.step() came first cannot see them: say so, as the step's own wrapper would.
        optimizer._opt_called = True  # type: ignore[attr-defined]
        slot.keep_static_state(config.optimizer)
        slot.zero_state(config.optimizer)
        self.nll_weights[index] = 1.0 - config.label_smoothing  # Python floats, as the loss alone gets them
        self.smooth_weights[index] = config.label_smoothing / self.num_classes
        self.active[index], self.active_counts[index] = 1, 1
        totals = StepTotals(self.device)
        totals.loss_sum, totals.correct = self.loss_sums[index], self.corrects[index]
        slot.member = FusedMember(self, index, config, member_model, optimizer, totals)
        self.wait_for_caller()
        return slot.member

    def leave(self, member: FusedMember) -> None:
        """Free `member`'s slot: frozen (no loss, no batch counted, learning rates 0), its batch withdrawn, and its
        model's tensors copied out of the slot, so that the run keeps them as they are."""
        slot = self.slot_list[member.slot]
        if slot.member is not member:
            return
        self.wait_for_step()
        slot.member = slot.holder = None
        self.deposited.discard(member.slot)
        self.active[member.slot], self.active_counts[member.slot] = 0, 0
        for optimizer in slot.optimizers.values():
            set_learning_rates(optimizer, 0.0)
        for module in member.model.modules():
            for parameter in module.parameters(recurse=False):
                parameter.data = parameter.data.clone()
            for name, buffer in module.named_buffers(recurse=False):
                module._buffers[name] = buffer.clone()
        member.totals.loss_sum, member.totals.correct = member.totals.loss_sum.clone(), member.totals.correct.clone()
        self.wait_for_caller()

    @contextlib.contextmanager
    def joined(self, config: Config, model: nn.Module, slot: int | None = None) -> Iterator[FusedMember]:
        """`join`, and `leave` however the block ends (finished, failed, stopped, its generator closed)."""
        member = self.join(config, model, slot)
        try:
            yield member
        finally:
            self.leave(member)

    def members(self) -> list[FusedMember]:
        return [slot.member for slot in self.slot_list if slot.member is not None]

    def close(self) -> None:
        """The group is done with (no member holds a slot): its graph destroyed and its stream given back, once
        its work is done."""
        self.streams.give_back(self.stream)  # synchronised first: its last replay is done before the graph goes
        if self.graph is not None:
            self.graph.reset()
            self.graph = None
        self.stream, self.capture = None, False

    # --- the step ---------------------------------------------------------------------------------------------

    def channels(self, slot: int) -> slice:
        """Slot `slot`'s channels of the fused batch: its member's images."""
        return slice(IMAGE_CHANNELS * slot, IMAGE_CHANNELS * (slot + 1))

    def deposit(self, slot: int, images: torch.Tensor, labels: torch.Tensor) -> int:
        """Put slot `slot`'s batch (images (B, 3, H, W), labels (B,)) in for the next step; that step's number."""
        batch_size = self.config.batch_size
        if images.shape[:2] != (batch_size, IMAGE_CHANNELS) or labels.shape != (batch_size,):
            raise ValueError(f"a fused member's batch must be ({batch_size}, {IMAGE_CHANNELS}, H, W) images and "
                             f"({batch_size},) labels, got {tuple(images.shape)} and {tuple(labels.shape)}")
        if self.images is None:
            self.images = torch.zeros(batch_size, IMAGE_CHANNELS * self.slots, *images.shape[2:],
                                      dtype=self.active.dtype, device=self.device,
                                      ).contiguous(memory_format=self.memory_format)
        elif images.shape[2:] != self.images.shape[2:]:
            raise ValueError(f"a fused member's images must be {tuple(self.images.shape[2:])} pixels, got "
                             f"{tuple(images.shape[2:])}")
        self.images[:, self.channels(slot)].copy_(images)  # converts the dtype and the memory format
        self.labels[slot].copy_(labels)
        self.wait_for_caller()
        self.deposited.add(slot)
        return self.steps_done

    def step_if_ready(self) -> bool:
        """Step once every active member has put its batch in; whether it stepped."""
        active = {slot.index for slot in self.slot_list if slot.member is not None}
        if not active or self.deposited != active:
            return False
        self.step()
        return True

    def step(self) -> None:
        """One optimizer step of every active member on the batch it put in: eagerly, or as a graph's replay."""
        with self.on_stream():  # after every member's work so far: each waited for its batch and its state
            for slot in self.slot_list:
                if slot.member is not None:
                    slot.keep_static_state(slot.member.config.optimizer)
            if self.capture:
                self.step_captured()
            else:
                self.train_step(self.active_optimizers())
        self.deposited.clear()
        self.steps_done += 1

    def train_step(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        """Forward, backward and `optimizers`' steps on the static batch, with each member's loss and correct count
        added into its totals: the one step, run eagerly or recorded by a capture (what every replay runs)."""
        with self.autocast():
            logits = self.model(self.images)  # (K, B, classes)
            losses = member_losses(logits, self.labels, self.nll_weights, self.smooth_weights)  # (K,)
        torch._foreach_zero_(self.gradients)  # zeroed, not None: the slots' optimizers hold views of them
        # d(sum)/d(loss k) is exactly 1 for an active slot: each member gets its own gradient, a free slot none.
        (losses * self.active).sum().backward()
        torch._foreach_add_(self.batch_counters, [self.active_counts] * len(self.batch_counters))
        for optimizer in optimizers:
            optimizer.step()
        self.loss_sums.add_(losses.detach().float() * self.labels.shape[1])  # as StepTotals.add_ does alone
        self.corrects.add_((logits.argmax(-1) == self.labels).sum(-1))

    def active_optimizers(self) -> list[torch.optim.Optimizer]:
        return [member.optimizer for member in self.members()]

    def all_optimizers(self) -> list[torch.optim.Optimizer]:
        return [optimizer for slot in self.slot_list for optimizer in slot.optimizers.values()]

    def step_captured(self) -> None:
        """Warm-up steps (real ones, which also make cuDNN's and cuBLAS's workspaces), then the capture, then
        replays. Every slot's every optimizer is in the graph, so that joins and leaves need no new capture."""
        if self.graph is not None:
            self.graph.replay()
            return
        if self.warmed_up < CAPTURE_WARMUP_STEPS:
            self.train_step(self.all_optimizers())
            self.warmed_up += 1
            return
        graph = torch.cuda.CUDAGraph()
        try:
            # On the group's own stream: torch's default capture stream is shared by every capture in the process
            # (cuBLAS workspaces are kept per stream), and a graph destroyed there can free another's workspace.
            with torch.cuda.graph(graph, stream=self.stream):
                self.train_step(self.all_optimizers())
        except Exception as error:  # nothing ran: a capture records kernels without running them
            log.warning("training the fused group eagerly, without a CUDA graph: the capture failed: %s: %s",
                        type(error).__name__, error)
            self.capture = False
            self.train_step(self.active_optimizers())
            return
        self.graph = graph
        graph.replay()  # this step's own batch
        log.info("captured the fused step of %d slots as one CUDA graph", self.slots)

    def on_stream(self) -> contextlib.AbstractContextManager:
        """The group's CUDA stream, after the work queued so far on the caller's; nothing on a CPU."""
        if self.stream is None:
            return contextlib.nullcontext()
        self.wait_for_caller()
        return torch.cuda.stream(self.stream)

    def wait_for_caller(self) -> None:
        """Make the group's stream wait for the work queued so far on the caller's (a batch put in, a slot's
        settings written at a join or a leave), so that the next step sees it."""
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def wait_for_step(self) -> None:
        """Make the caller's stream wait for the group's last step (its weights, before the schedule and EMA)."""
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)


@dataclass
class FusedMember:
    """A run in slot `slot` of `group`: what a training loop uses in place of `EagerStep` (`model`, `optimizer`,
    `totals`), with `run` for the step itself."""

    group: FusedGroup
    slot: int
    config: Config
    model: CIFAR10CNN  # views of the slot
    optimizer: torch.optim.Optimizer  # the slot's optimizer of the run's type, with the run's settings
    totals: StepTotals  # views of the group's per-slot totals

    def run(self, images: torch.Tensor, labels: torch.Tensor) -> TrainingSteps[None]:
        """One optimizer step on this batch, for the loop's `yield from`: the batch goes into the slot, then it
        yields until the group has stepped (the first member resumed once all are in runs the step for all)."""
        ticket = self.group.deposit(self.slot, images, labels)
        while self.group.steps_done <= ticket:
            yield
            self.group.step_if_ready()
        self.group.wait_for_step()
