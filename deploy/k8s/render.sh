#!/usr/bin/env bash
# Print deploy/k8s/sweep-agents.yaml with every ${...} filled in, for `kubectl apply -f -`:
#
#   deploy/k8s/render.sh --sweep ENTITY/PROJECT/SWEEP_ID --image REGISTRY/cifar-resnet-agent:0.1 --gpus 4 \
#       [--runs-per-gpu 6] | kubectl apply -f -
#
# --gpus: pods at once, one GPU each (the Job's parallelism). --runs-per-gpu K: the runs sharing each GPU
# (`cifar-resnet agent --agents-per-gpu K`; 6 fits an 80 GB card, see docs/workers.md, "Runs per GPU"). Each pod's
# resources follow K: K + 1 CPU cores, 4 GiB of memory per run and 2 GiB for the agents, and 512 MiB of /dev/shm
# per run (counted in the memory). A missing or malformed value is refused in one line (exit 2) and nothing is
# printed, so nothing is applied with a placeholder.
set -euo pipefail

TEMPLATE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/sweep-agents.yaml"
SWEEP_ID="" IMAGE="" GPUS="" RUNS_PER_GPU=6
die() { echo "render: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
    case $1 in
        --sweep|--image|--gpus|--runs-per-gpu)
            [ $# -ge 2 ] || die "$1 needs a value"
            case $1 in
                --sweep) SWEEP_ID=$2 ;; --image) IMAGE=$2 ;; --gpus) GPUS=$2 ;; --runs-per-gpu) RUNS_PER_GPU=$2 ;;
            esac
            shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
done
[[ $SWEEP_ID =~ ^[A-Za-z0-9._-]+/[A-Za-z0-9._-]+/[A-Za-z0-9_-]+$ ]] || die "--sweep: expected ENTITY/PROJECT/SWEEP_ID as \`wandb sweep\` prints it, got '$SWEEP_ID'"
[[ $IMAGE =~ ^[A-Za-z0-9._/:@-]+$ ]] || die "--image: expected the pushed image, e.g. registry.example.com/cifar-resnet-agent:0.1, got '$IMAGE'"
[[ $GPUS =~ ^[1-9][0-9]*$ ]] || die "--gpus: expected a number of GPUs >= 1, got '$GPUS'"
[[ $RUNS_PER_GPU =~ ^[1-9][0-9]*$ ]] || die "--runs-per-gpu: expected a number >= 1, got '$RUNS_PER_GPU'"

CPU=$(( RUNS_PER_GPU + 1 ))
SHM_MIB=$(( RUNS_PER_GPU * 512 ))
MEMORY_MIB=$(( RUNS_PER_GPU * 4096 + 2048 + SHM_MIB ))
manifest=$(sed -e "s|\${SWEEP_ID}|$SWEEP_ID|g" -e "s|\${IMAGE}|$IMAGE|g" -e "s|\${GPUS}|$GPUS|g" \
    -e "s|\${RUNS_PER_GPU}|$RUNS_PER_GPU|g" -e "s|\${CPU}|$CPU|g" -e "s|\${MEMORY}|${MEMORY_MIB}Mi|g" \
    -e "s|\${SHM}|${SHM_MIB}Mi|g" "$TEMPLATE" | grep -v '^#')
left=$(grep -o '\${[A-Z_]*}' <<< "$manifest" | sort -u | tr '\n' ' ' || true)
[ -z "$left" ] || die "the template still holds $left after rendering: this script does not know them"
echo "$manifest"
