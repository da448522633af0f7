#!/usr/bin/env bash
# Every GPU measurement of BENCHMARKS.md in one call, on the JPEG copy of CIFAR-10, with nothing but python, torch
# and torchvision by default (no W&B; the package needs no installing; the grid and recipe steps run their cells
# through an offline sweep, which needs wandb installed, and say so in one line where it is not; the GPU tests need
# pytest). The default steps are sized for 6 minutes on one H100 or H200: an estimate, about 5 minutes, from the
# H200 figures of commit b142e91 (BENCHMARKS.md, "The GPU check"):
#   0. gpu-tests: the GPU tests (resume, bf16, channels_last, fused optimizer, the captured training and
#      evaluation steps against eager ones);
#   1. full10-cold: one full 10-epoch run of the real model with a cold decode cache (deleted first), timed from
#      process start: the first decode of the 60,000 JPEGs included;
#   2. bench: the benchmark in GPU mode, its JSON rewritten after each section: our step and its variants (the
#      graph against the eager step, bf16 and channels_last under the graph, torch.compile's own graphs),
#      evaluation (graph and eager), runs per hour with 1, 2 and 6 concurrent full runs (what would check the
#      runs-per-GPU table of cifar_resnet/gpus.py), then the write-up's pipeline against ours;
#   3. full10: one full 10-epoch run, timed from process start, the decode cache warm;
#   4. (grid, not by default; 72 s at b142e91, six at once) the write-up's six cells with our default recipe
#      through an offline sweep, as many at a time as step 2 found best;
#   5. (grid-writeup, not by default; measured at b555040) the same six cells with recipe=writeup;
#   6. image, with IMAGE=<the worker image> and docker or podman (and the NVIDIA container toolkit): torch inside the
#      image's own Python sees the GPU and computes on it (skipped, with a message, without a GPU or an engine);
#   7. (recipe-candidates, not by default) the recipe candidates of issues 10 and 22, 2 seeds each, at Adam 0.001
#      (SGD's own at SGD 0.001), on top of RECIPE_SETTINGS; pick them with RECIPE_ONLY to fit a call;
#   8. (recipe-grid, not by default; an estimated 5 minutes on an H200) the six cells x 2 seeds under the recipe in
#      RECIPE_SETTINGS (e.g. "--norm_lr_scale=8 --label_smoothing=0.2 --ema_decay=0.99") and under recipe=writeup;
#   9. (recipe, not by default) steps 7 and 8 in one: the grid with the candidates that won in 7;
#  10. (pack, not by default; an estimated 7 minutes on an H100 or H200, unmeasured) many runs on one GPU
#      (docs/packing.md), under CUDA_DEVICE_MAX_CONNECTIONS=32, 3-epoch runs (so that the median epoch excludes the
#      capture), each figure's JSON as soon as it exists: the pack's GPU tests first (packed and fused against alone,
#      a member ending first and another joining after it, every graph on a capture stream of its own); one run alone
#      and K = 2, 6 and 12 on streams (pack-streams.json), K = 2, 6 and 12 fused (pack-fused.json), 6 as processes
#      (pack-processes.json) and, where the MPS daemon starts, 6 processes under MPS (pack-mps.json); then the six
#      cells of sweep.yaml through `cifar-resnet sweep --gpus 0 --runs-per-gpu 6`, with --pack off, streams and
#      fused, each timed from outside (sweep6-<mode>.json). The sweeps need wandb and W&B's `sweeps` package: where
#      they are missing and .whl/ holds their wheels (and those of their dependencies this Python lacks:
#      `pip download 'wandb[sweeps]' -d .whl --python-version X.Y --only-binary=:all:` on a machine with internet),
#      they are installed from there into $WORK/extra; else the sweep figures are skipped, in one line.
# STEPS (comma-separated) picks the steps: default gpu-tests,full10-cold,bench,full10,image. Each of steps 7 and 8
# fills a call alone (estimated): STEPS=recipe-grid RECIPE_SETTINGS="...", then STEPS=recipe-candidates.
# Every step writes its JSON into $OUT (or ./gpu-check) as soon as it has it (the benchmark and the recipe steps after
# each section), so a call cut short keeps what was measured; one log, gpu_check.log, goes there too, each step's
# wall time in it. Run folders and checkpoints stay in $WORK.
#
#   GIT_COMMIT=$(git rev-parse --short HEAD) benchmarks/gpu_check.sh   # on a GPU machine
#   SMALL=1 PYTHON=.venv/bin/python benchmarks/gpu_check.sh             # the same steps, tiny, on a CPU (a dry run)
#
# Settings (environment): ARCHIVE (default data/cifar10-jpeg.tar.gz, the copy carried into the checkout),
# PYTHON (default python3), WORK (default $TMPDIR/cifar_resnet_gpu_check), WORKERS (steps 4 and 5; default: the best
# of step 2; 6 for steps 7 and 8), SEEDS (steps 7 and 8; default 2), VARIANTS (step 2's tuning variants,
# comma-separated; default the five above), RECIPE_ONLY (the candidates of steps 7 and 9, comma-separated labels;
# default all), RECIPE_SETTINGS (steps 7 to 9: --name=value settings on top of tuned for every run but
# recipe=writeup's), IMAGE (step 6: an image to run, e.g. REGISTRY/cifar-resnet-agent:0.1, pulled or built here).
# CIFAR10_JPEG_DIR is exported (the extracted folder) for the GPU tests (tests/test_gpu_graph.py).
set -euo pipefail
CHECK_STARTED=$(date +%s%N)
cd "$(dirname "$0")/.."

OUT_DIR=${OUT:-$PWD/gpu-check}
WORK=${WORK:-${TMPDIR:-/tmp}/cifar_resnet_gpu_check}
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT_DIR" "$WORK"
LOG="$OUT_DIR/gpu_check.log"

if [ -z "${ARCHIVE:-}" ]; then
    for candidate in data/cifar10-jpeg.tar.gz ../shared/data/cifar10-jpeg.tar.gz; do
        if [ -f "$candidate" ]; then ARCHIVE=$candidate; break; fi
    done
fi
if [ ! -f "${ARCHIVE:-}" ]; then
    echo "gpu_check: no CIFAR-10 JPEG archive; set ARCHIVE or put it in data/cifar10-jpeg.tar.gz" >&2
    exit 2
fi
DATA_DIR="$WORK/cifar10-jpeg"
[ -d "$DATA_DIR/test" ] || tar -xzf "$ARCHIVE" -C "$WORK"
DATA=(--dataset=imagefolder "--data_dir=$DATA_DIR")
export CIFAR10_JPEG_DIR="$DATA_DIR"

if [ -n "${SMALL:-}" ]; then  # every step, on a CPU, in a few minutes; its accuracies mean nothing
    MODE=cpu
    RUN=(--device=cpu --width=8 --epochs=1 --train_size=1000 --val_size=500 --test_size=1000)
    BENCH=(--concurrency=1,2 "--variants=ours,eager (no CUDA graph),sgd")
    RECIPE_RUNS=(--workers=2 --seeds=1)
    PACK=(--epochs=2)
    PACK_STREAMS=--members=1,2; PACK_FUSED=--members=2; PACK_PROCESSES=--members=2; PACK_MPS=--members=2
    SWEEP6=(--workers=2 --set device=cpu --set width=8 --set epochs=1 --set train_size=1000 --set val_size=500
            --set test_size=1000)
else
    MODE=gpu
    RUN=(--device=cuda)
    BENCH=(${VARIANTS:+"--variants=$VARIANTS"})
    RECIPE_RUNS=("--workers=${WORKERS:-6}" "--seeds=${SEEDS:-2}")
    PACK=(--epochs=3)
    PACK_STREAMS=--members=1,2,6,12; PACK_FUSED=--members=2,6,12; PACK_PROCESSES=--members=6; PACK_MPS=--members=6
    SWEEP6=(--gpus=0 --runs-per-gpu=6)
fi

STEPS=${STEPS:-gpu-tests,full10-cold,bench,full10,image}
FAILED=()
step() {  # step NAME COMMAND...: run it, log it with its wall time; go on if it fails
    local name=$1 started status=0; shift
    [[ ",$STEPS," == *",$name,"* ]] || return 0  # not asked for
    started=$(date +%s%N)
    echo "=== $name: $*" | tee -a "$LOG"
    "$@" 2>&1 | tee -a "$LOG" || status=$?
    echo "=== $name: exit $status after $(( ($(date +%s%N) - started) / 1000000 )) ms" | tee -a "$LOG"
    if [ "$status" != 0 ]; then FAILED+=("$name"); fi
}

: > "$LOG"
{ date -u; uname -a; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || true
  grep -m1 "model name" /proc/cpuinfo || true; nproc; "$PYTHON" -c "import torch; print('torch', torch.__version__)"
} | tee -a "$LOG"

# 0. The GPU tests first, only their files: the others need wandb.
if "$PYTHON" -c "import pytest" 2>/dev/null || [[ ",$STEPS," != *",gpu-tests,"* ]]; then
    step gpu-tests "$PYTHON" -m pytest -m gpu -p no:cacheprovider -q -rs tests/test_gpu.py tests/test_gpu_graph.py
else
    echo "gpu_check: pytest is not installed: the GPU tests did not run" | tee -a "$LOG"; FAILED+=(gpu-tests)
fi

if [[ ",$STEPS," == *",full10-cold,"* ]]; then rm -rf "$DATA_DIR/.cifar_resnet_cache"; fi  # decode from the JPEGs
step full10-cold "$PYTHON" -m benchmarks.run --run_id=full10-cold "--result=$OUT_DIR/full10-cold.json" \
    "${DATA[@]}" "${RUN[@]}" "--output_dir=$WORK/full10-runs"

step bench "$PYTHON" -m benchmarks.bench "--mode=$MODE" "${DATA[@]}" "${RUN[@]}" "${BENCH[@]}" \
    "--out=$OUT_DIR/bench.json" "--runs_dir=$WORK/bench-runs"

step full10 "$PYTHON" -m benchmarks.run --run_id=full10 "--result=$OUT_DIR/full10.json" "${DATA[@]}" \
    "${RUN[@]}" "--output_dir=$WORK/full10-runs"

GRID_WORKERS=${WORKERS:-}
if [ -z "$GRID_WORKERS" ]; then  # the concurrency with the most runs per hour in step 2
    GRID_WORKERS=$("$PYTHON" -c "import json, sys; c = json.load(open(sys.argv[1])).get('concurrency') or {}
print(max(c, key=lambda k: c[k]['runs_per_hour']) if c else 1)" "$OUT_DIR/bench.json" 2>/dev/null || echo 1)
fi
HAS_WANDB=$("$PYTHON" -c "import wandb" 2>/dev/null && echo 1 || true)
sweep_step() {  # sweep_step NAME COMMAND...: a step whose cells run through an offline sweep, which needs wandb
    if [[ ",$STEPS," != *",$1,"* ]] || [ -n "$HAS_WANDB" ]; then step "$@"; return; fi
    echo "=== $1: wandb is not installed: its cells run through an offline sweep, which needs it" | tee -a "$LOG"
    FAILED+=("$1")
}
sweep_step grid "$PYTHON" -m benchmarks.grid "--workers=$GRID_WORKERS" "${DATA[@]}" "${RUN[@]}" \
    "--out=$OUT_DIR/grid.json" "--runs_dir=$WORK/grid-runs"
sweep_step grid-writeup "$PYTHON" -m benchmarks.grid "--workers=$GRID_WORKERS" --recipe=writeup "${DATA[@]}" \
    "${RUN[@]}" "--out=$OUT_DIR/grid-writeup.json" "--runs_dir=$WORK/grid-writeup-runs"
# shellcheck disable=SC2206  # RECIPE_SETTINGS is a list of --name=value words
RECIPE=("$PYTHON" -m benchmarks.recipe_experiments "${RECIPE_RUNS[@]}" "--runs_dir=$WORK/recipe-runs" "${DATA[@]}"
        "${RUN[@]}" ${RECIPE_ONLY:+"--only=$RECIPE_ONLY"} ${RECIPE_SETTINGS:-})
sweep_step recipe-candidates "${RECIPE[@]}" candidates "--out=$OUT_DIR/recipe-candidates.json"
sweep_step recipe-grid "${RECIPE[@]}" grid "--out=$OUT_DIR/recipe-grid.json"
sweep_step recipe "${RECIPE[@]}" both "--out=$OUT_DIR/recipe.json"
if [[ ",$STEPS," == *",pack,"* ]]; then
    # A trainer's streams map to CUDA's hardware queues (8 by default); its supervisor sets this for it, and the
    # benchmark's packs need it too. Before CUDA starts: the whole step runs under it.
    export CUDA_DEVICE_MAX_CONNECTIONS=32
fi
step pack "$PYTHON" -m pytest -m gpu -p no:cacheprovider -q -rs tests/test_gpu_pack.py tests/test_packing_fused.py
step pack "$PYTHON" -m benchmarks.sharing --sharing=streams "$PACK_STREAMS" "${DATA[@]}" "${RUN[@]}" \
    "${PACK[@]}" "--out=$OUT_DIR/pack-streams.json" "--runs_dir=$WORK/sharing-runs"
step pack "$PYTHON" -m benchmarks.sharing --sharing=fused "$PACK_FUSED" "${DATA[@]}" "${RUN[@]}" "${PACK[@]}" \
    "--out=$OUT_DIR/pack-fused.json" "--runs_dir=$WORK/sharing-runs"
step pack "$PYTHON" -m benchmarks.sharing --sharing=processes "$PACK_PROCESSES" "${DATA[@]}" "${RUN[@]}" \
    "${PACK[@]}" "--out=$OUT_DIR/pack-processes.json" "--runs_dir=$WORK/sharing-runs"
if [[ ",$STEPS," == *",pack,"* ]] && command -v nvidia-cuda-mps-control >/dev/null; then
    export CUDA_MPS_PIPE_DIRECTORY="$WORK/mps-pipe" CUDA_MPS_LOG_DIRECTORY="$WORK/mps-log"
    mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
    if nvidia-cuda-mps-control -d; then
        step pack "$PYTHON" -m benchmarks.sharing --sharing=processes "$PACK_MPS" "${DATA[@]}" "${RUN[@]}" \
            "${PACK[@]}" "--out=$OUT_DIR/pack-mps.json" "--runs_dir=$WORK/sharing-runs"
        echo quit | nvidia-cuda-mps-control
    else
        echo "=== pack: the MPS daemon did not start; no MPS figures" | tee -a "$LOG"
    fi
    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
fi
if [[ ",$STEPS," == *",pack,"* ]] && ! "$PYTHON" -c "import wandb, sweeps" 2>/dev/null && [ -d .whl ]; then
    # Only what this Python lacks lands in $WORK/extra: the packages it has (torch, numpy...) stay its own.
    EXTRA="$WORK/extra"
    if "$PYTHON" -m pip install -q --no-index --find-links .whl --prefix "$EXTRA" 'wandb[sweeps]' 2>&1 | tee -a "$LOG"
    then
        # lib/pythonX.Y/site-packages, or Debian's local/lib/pythonX.Y/dist-packages
        SITE=$(find "$EXTRA" -type d \( -name site-packages -o -name dist-packages \) | head -n 1)
        export PYTHONPATH="$PYTHONPATH:$SITE"
    fi
fi
if "$PYTHON" -c "import wandb, sweeps" 2>/dev/null; then
    for mode in off streams fused; do
        step pack env WANDB_MODE=offline "$PYTHON" -m benchmarks.sweep_wall "--out=$OUT_DIR/sweep6-$mode.json" \
            "--output-dir=$WORK/sweep6-$mode" -- sweep.yaml "${SWEEP6[@]}" "--pack=$mode" --set dataset=imagefolder \
            "--set=data_dir=$DATA_DIR"
    done
else
    [[ ",$STEPS," != *",pack,"* ]] || echo "=== pack: wandb[sweeps] is not installed (nor in .whl/): no sweep6 figures" \
        | tee -a "$LOG"
fi
IMAGE_CHECK="import torch; assert torch.cuda.is_available(), 'CUDA is not available to torch in the image'
print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0))
print('sum on the GPU:', torch.ones(1000, device='cuda').sum().item())"
if [[ ",$STEPS," != *",image,"* ]]; then
    :
elif [ -z "${IMAGE:-}" ] || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "=== image: skipped (needs IMAGE=<image> and a GPU)" | tee -a "$LOG"
elif command -v docker >/dev/null; then
    step image docker run --rm --gpus all --entrypoint python "$IMAGE" -c "$IMAGE_CHECK"
elif command -v podman >/dev/null; then  # the NVIDIA container toolkit's CDI spec names the GPUs
    step image podman run --rm --device nvidia.com/gpu=all --entrypoint python "$IMAGE" -c "$IMAGE_CHECK"
else
    echo "=== image: skipped (no docker or podman to run $IMAGE with the GPU)" | tee -a "$LOG"
fi
echo "gpu_check: done in $(( ($(date +%s%N) - CHECK_STARTED) / 1000000000 )) s; results in $OUT_DIR; failed steps:" \
    "${FAILED[*]:-none}" | tee -a "$LOG"
[ ${#FAILED[@]} = 0 ]
