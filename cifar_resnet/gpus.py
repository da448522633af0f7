"""How many runs share one GPU: one small table keyed by the GPU's memory, read by `cifar-resnet agent
--agents-per-gpu auto` and `cifar-resnet sweep --gpus ... --runs-per-gpu auto`.

What the table rests on (BENCHMARKS.md, "Runs per GPU"): two measurements of six runs at once, both on one H200
(141 GB), both of the write-up's six cells, and no other count.
- Commit b555040 (2026-11-27, before the training step was a CUDA graph): six at once took 82 s against about 45 s
  for one run alone, about 3.3x the throughput of one run at a time. A run then left the GPU mostly idle between
  its launches, and six runs filled those gaps.
- Commit b142e91 (2026-11-29, the graph step): six at once took 72 s against 18.6 s for one run alone from process
  start (6 x 18.6 = 112 s one after another): 1.55x. Each of the six trained at 8,150 images/s, together 49k
  images/s, the same as one run alone (50k): processes time-slice the GPU, so six at once overlap only what is not
  training (start-up, data, evaluation, checkpoints); the gain is that overlap, and it shrinks as a run's start and
  end get faster. Packing several runs into one process (one trainer per GPU) is what can raise it.
Six stays the default on the large GPUs until several runs can be trained in one process: it is the one count
measured, and it beats one run at a time (1.55x at b142e91); 1 and 2 at once have not been measured with the graph
step (`benchmarks/gpu_check.sh` measures 1, 2 and 6). The smaller rows scale the six down by memory, unmeasured.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Sequence

from .errors import UserError

log = logging.getLogger(__name__)

AUTO = "auto"
MIB_PER_GIB = 1024
NVIDIA_SMI_TIMEOUT_S = 30
NVIDIA_SMI_ERRORS = (OSError, subprocess.SubprocessError, ValueError)

# (at least this much memory per GPU in GiB, runs per GPU), largest first. Only the first row's count is measured,
# on an H200 of 141 GB (see above: 1.55x one after another at b142e91, from overlapping start-up; 3.3x at b555040
# before the graph step); the others are scaled down, unmeasured.
RUNS_PER_GPU_BY_MEMORY_GIB: tuple[tuple[float, int], ...] = (
    (70.0, 6),  # H100 80 GB, H200 141 GB, A100 80 GB: six, measured on an H200 only
    (40.0, 4),  # A100 40 GB, L40S 48 GB, A6000 48 GB
    (20.0, 2),  # A10 24 GB, L4 24 GB, RTX 4090 24 GB
    (0.0, 1),  # smaller GPUs, and whenever the memory cannot be read
)


def runs_for_memory(memory_gib: float | None) -> int:
    """The table's runs per GPU for a GPU with `memory_gib` of memory (None: unknown, so one)."""
    if memory_gib is None:
        return 1
    return next(runs for least_gib, runs in RUNS_PER_GPU_BY_MEMORY_GIB if memory_gib >= least_gib)


def parse_runs_per_gpu(text: str | int | None, option: str) -> int | None:
    """`auto` (or None) -> None; a whole number >= 1 -> itself; anything else is a one-line UserError."""
    if text is None or str(text).strip().lower() == AUTO:
        return None
    try:
        value = int(str(text).strip())
    except ValueError:
        raise UserError(f"{option}: {text!r} is not {AUTO} or a whole number") from None
    if value < 1:
        raise UserError(f"{option}: must be >= 1 or {AUTO}, got {value}")
    return value


def nvidia_smi_rows() -> list[tuple[str, str, float]]:
    """(index, UUID, memory in MiB) of every GPU of this machine, as `nvidia-smi` lists them (whatever
    CUDA_VISIBLE_DEVICES hides). nvidia-smi, not torch: querying memory through CUDA would give this long-lived
    parent process a CUDA context, and its memory, on every GPU. Raises OSError, SubprocessError or ValueError."""
    output = subprocess.run(
        ["nvidia-smi", "--query-gpu=index,uuid,memory.total", "--format=csv,noheader,nounits"],
        capture_output=True, text=True, check=True, timeout=NVIDIA_SMI_TIMEOUT_S,
    ).stdout
    rows = [[field.strip() for field in line.split(",")] for line in output.splitlines() if line.strip()]
    return [(index, uuid, float(total)) for index, uuid, total in rows]


def gpu_memory_gib(gpus: Sequence[str]) -> float | None:
    """The smallest memory, in GiB, of `gpus` (indices or UUIDs as CUDA_VISIBLE_DEVICES lists them; empty: every
    GPU), as `nvidia-smi` reports it; None when it cannot say."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        rows = nvidia_smi_rows()
    except NVIDIA_SMI_ERRORS as error:
        log.warning("could not read GPU memory from nvidia-smi (%s): one run per GPU", error)
        return None
    chosen = [mib for index, uuid, mib in rows if not gpus or index in gpus or uuid in gpus]
    return min(chosen) / MIB_PER_GIB if chosen else None


def machine_gpus() -> list[tuple[str, str]] | None:
    """This machine's GPUs as (index, UUID): every one `nvidia-smi` lists; without nvidia-smi, those CUDA finds
    (torch counts them without a CUDA context), named as CUDA_VISIBLE_DEVICES names them when it is set (CUDA stops
    at its first entry that is no GPU) and without a UUID. None when nvidia-smi fails: unknown."""
    if shutil.which("nvidia-smi") is not None:
        try:
            return [(index, uuid) for index, uuid, _ in nvidia_smi_rows()]
        except NVIDIA_SMI_ERRORS as error:
            log.warning("could not list the GPUs with nvidia-smi (%s): the GPUs asked for are not checked", error)
            return None
    import torch  # deferred: the tools that never train need not import it

    count = torch.cuda.device_count()
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = [str(index) for index in range(count)] if listed is None else [
        entry.strip() for entry in listed.split(",") if entry.strip()]
    return [(name, "") for name in names[:count]]


def check_gpus_exist(gpus: Sequence[str], option: str, remedy: str) -> None:
    """A UserError naming `option`, what it asked for, what this machine has and `remedy`, when one of `gpus`
    (indices or UUIDs) is no GPU of this machine: a run pinned to it would train on the CPU. MIG devices (`MIG-...`),
    which neither list names, pass."""
    found = machine_gpus()
    if found is None:
        return
    missing = [gpu for gpu in gpus if not gpu.startswith("MIG-") and not any(gpu in names for names in found)]
    if missing:
        has = f"GPU {', '.join(index for index, _ in found)}" if found else "no GPU"
        raise UserError(f"{option}: GPU {', '.join(missing)} asked for, but this machine has {has}; {remedy}")


def auto_runs_per_gpu(gpus: Sequence[str]) -> int:
    """Runs per GPU for `gpus` from the table, by the smallest GPU's memory; logged with where it came from."""
    memory_gib = gpu_memory_gib(gpus)
    runs = runs_for_memory(memory_gib)
    where = f"{memory_gib:.0f} GiB per GPU" if memory_gib is not None else "GPU memory unknown"
    log.info("%d runs per GPU (%s; table in cifar_resnet/gpus.py)", runs, where)
    return runs


def resolve_runs_per_gpu(choice: int | None, gpus: Sequence[str]) -> int:
    """`choice` when given, else the table's value for `gpus`."""
    return choice if choice is not None else auto_runs_per_gpu(gpus)

