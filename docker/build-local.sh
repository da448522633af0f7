#!/usr/bin/env bash
# Build docker/Dockerfile for real and smoke-test the image, without a Docker daemon or a GPU, from Debian's and
# PyPI's packages alone (see docs/workers.md, "The Docker image"). As root, from anywhere:
#
#   docker/build-local.sh [--work DIR] [--tag NAME] [--rebuild-base] [--remove-image]
#
#   1. installs buildah and debootstrap with apt-get if they are missing;
#   2. makes a local base (once; --rebuild-base makes it anew): a `debootstrap --variant=minbase bookworm` root
#      filesystem with python3, in which a virtual environment at /opt/venv puts `python` and `pip` on PATH;
#   3. downloads, inside that base, the wheels the build installs (docker/requirements-torch.lock: PyPI's torch with
#      its CUDA libraries; docker/requirements.lock), into DIR/wheels (kept: a second run downloads nothing);
#   4. builds the image from the real docker/Dockerfile with `buildah bud --build-arg BASE_IMAGE=<the local base>`,
#      its pip pointed at those wheels, with no index (so no network): the wheels are bind-mounted on /mnt and a
#      pip.conf in a folder bind-mounted on /root, both folders every Debian base has, so that nothing of this
#      leaves a trace in a layer (a mount point that buildah must create stays in the image, empty);
#   5. inside the image, as the image's own user: `cifar-resnet --help`; the entry point without W&B credentials,
#      which must refuse in one line; one tiny offline training run on a small image folder in the data volume,
#      with the data, runs and W&B volumes bind-mounted from DIR/volumes, which must leave its decode cache in the
#      data volume and best.pt and record.json in the runs volume; `cifar-resnet evaluate` of that best.pt; and
#      `cifar-resnet sweep` and `report`, which must say in one line which extra they need (a worker's install);
#   6. exports the image's layers and fails if one holds a .netrc or another credentials file, or anything under
#      /mnt or /root/.config/pip (the build's local pip settings), or if the image's config holds a secret-like
#      variable or a 40-hex (W&B API key like) string;
#   7. prints the image's size, and last `build-local: OK (image NAME, N MB)`, exiting 0 only when all of this held.
#
# DIR defaults to $TMPDIR/cifar-resnet-build-local (/tmp/...); NAME to localhost/cifar-resnet-agent:local. The image
# and the base stay in buildah's storage (--remove-image removes the image at the end); containers it makes are
# removed on exit. Settings (environment): DEBIAN_MIRROR (default http://deb.debian.org/debian), PIP_INDEX_URL
# (default PyPI), BUILDAH_ISOLATION (default chroot, which works inside containers). The host's CA bundle is
# given to pip for the download, so that a TLS-intercepting proxy trusted by the host is trusted there too.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${TMPDIR:-/tmp}/cifar-resnet-build-local
TAG=localhost/cifar-resnet-agent:local
BASE=localhost/cifar-resnet-base:bookworm
REBUILD_BASE=0
REMOVE_IMAGE=0
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
INDEX_URL=${PIP_INDEX_URL:-https://pypi.org/simple}
export BUILDAH_ISOLATION=${BUILDAH_ISOLATION:-chroot}
PREFIX=cifar-resnet-build-local  # the names of the containers this script makes

die() { echo "build-local: $*" >&2; exit 2; }
fail() { echo "build-local: FAILED: $*" >&2; exit 1; }
STARTED=$(date +%s)
step() { echo "=== build-local [$(( $(date +%s) - STARTED )) s]: $*"; }

while [ $# -gt 0 ]; do
    case $1 in
        --work) [ $# -ge 2 ] || die "--work needs a folder"; WORK=$2; shift 2 ;;
        --work=*) WORK=${1#*=}; shift ;;
        --tag) [ $# -ge 2 ] || die "--tag needs an image name"; TAG=$2; shift 2 ;;
        --tag=*) TAG=${1#*=}; shift ;;
        --rebuild-base) REBUILD_BASE=1; shift ;;
        --remove-image) REMOVE_IMAGE=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
done
[ -n "$WORK" ] && [ -n "$TAG" ] || die "--work and --tag must not be empty"
[ "$(id -u)" = 0 ] || die "must run as root (buildah and debootstrap need it here): sudo $0"
[ "$(uname -m)" = x86_64 ] || die "the locks are for Linux x86_64; this machine is $(uname -m)"
WORK=$(mkdir -p "$WORK" && cd "$WORK" && pwd)

cleanup() {  # idempotent: every container this script may have made, whether or not it exists
    local name
    for name in "$PREFIX-base" "$PREFIX-download" "$PREFIX-smoke"; do
        buildah rm "$name" >/dev/null 2>&1 || true
    done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- 1. tools ------------------------------------------------------------------------------------------------
missing=()
command -v buildah >/dev/null || missing+=(buildah)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
    step "installing ${missing[*]} with apt-get"
    command -v apt-get >/dev/null || die "${missing[*]} missing and no apt-get to install them: install them"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
cleanup  # containers left by an earlier run that was killed
step "buildah $(buildah --version | awk '{print $3}'), isolation $BUILDAH_ISOLATION, work folder $WORK"

# --- 2. the local base -----------------------------------------------------------------------------------------
if [ "$REBUILD_BASE" = 1 ] || ! buildah inspect --type image "$BASE" >/dev/null 2>&1; then
    step "making the base $BASE: debootstrap --variant=minbase bookworm with python3 (a few minutes)"
    rm -rf "$WORK/rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$WORK/rootfs" \
        "$MIRROR" > "$WORK/debootstrap.log" 2>&1 || fail "debootstrap (log: $WORK/debootstrap.log)"
    # Nothing of this host in the base: apt's downloads and lists, and the resolver settings and host name
    # debootstrap copied (left empty: container engines mount their own there).
    rm -rf "$WORK/rootfs/var/cache/apt/archives/"*.deb "$WORK/rootfs/var/lib/apt/lists/"*
    : > "$WORK/rootfs/etc/resolv.conf"
    : > "$WORK/rootfs/etc/hostname"
    buildah from --name "$PREFIX-base" scratch >/dev/null
    mnt=$(buildah mount "$PREFIX-base")
    tar -C "$WORK/rootfs" --numeric-owner -cf - . | tar -C "$mnt" --numeric-owner -xpf -
    buildah umount "$PREFIX-base" >/dev/null
    rm -rf "$WORK/rootfs"
    buildah run "$PREFIX-base" -- python3 -m venv /opt/venv
    buildah config --env PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --env LANG=C.UTF-8 --cmd '["python"]' \
        --label org.opencontainers.image.description="Debian bookworm minbase, python3, a venv at /opt/venv" \
        "$PREFIX-base"
    buildah commit --quiet --rm "$PREFIX-base" "$BASE" >/dev/null
fi
buildah from --name "$PREFIX-download" "$BASE" >/dev/null
step "base $BASE: $(buildah run "$PREFIX-download" -- python --version)"

# --- 3. the wheels the build installs, downloaded inside the base (its Python, its platform) -------------------
mkdir -p "$WORK/wheels"
have_all_wheels() {  # a wheel of every locked name and version, and of setuptools >= 77 (to build the package)
    local pin name listing
    listing=$(ls "$WORK/wheels")
    grep -qiE '^setuptools-(7[7-9]|[89][0-9]|[1-9][0-9]{2,})\.' <<< "$listing" || return 1
    while read -r pin _; do  # `name==version ; marker \`: the first word
        name=${pin%%==*}
        grep -qiE "^${name//[-_.]/[-_.]}-${pin#*==}(-|\.whl)" <<< "$listing" || return 1
    done < <(grep -hE '^[A-Za-z0-9].*==' "$REPO/docker/requirements-torch.lock" "$REPO/docker/requirements.lock")
}
if have_all_wheels; then
    step "wheels: every locked one is in $WORK/wheels already"
else
    step "downloading the locked wheels into $WORK/wheels (PyPI's torch: several GB the first time)"
    buildah run -v "$WORK/wheels:/wheels" -v "$REPO/docker:/locks:ro" \
        -v /etc/ssl/certs/ca-certificates.crt:/tmp/host-ca.crt:ro \
        --env PIP_CERT=/tmp/host-ca.crt --env PIP_INDEX_URL="$INDEX_URL" --env PIP_DISABLE_PIP_VERSION_CHECK=1 \
        "$PREFIX-download" -- sh -c 'pip download --quiet --only-binary=:all: --dest /wheels --require-hashes \
        -r /locks/requirements-torch.lock -r /locks/requirements.lock \
        && pip download --quiet --only-binary=:all: --dest /wheels "setuptools>=77"' \
        || fail "pip download of the locked wheels (their hashes checked)"
fi
buildah rm "$PREFIX-download" >/dev/null
step "wheels: $(find "$WORK/wheels" -name '*.whl' | wc -l) files, $(du -sm "$WORK/wheels" | cut -f1) MB"

# --- 4. the image, from the real Dockerfile ----------------------------------------------------------------------
rm -rf "$WORK/pip-home"
mkdir -p "$WORK/pip-home/.config/pip"
printf '[global]\nno-index = true\nfind-links = /mnt\n' > "$WORK/pip-home/.config/pip/pip.conf"
step "building $TAG from docker/Dockerfile on $BASE"
build_started=$(date +%s)
buildah bud --layers --force-rm -f "$REPO/docker/Dockerfile" --build-arg "BASE_IMAGE=$BASE" -t "$TAG" \
    -v "$WORK/wheels:/mnt:ro" -v "$WORK/pip-home:/root" "$REPO" > "$WORK/build.log" 2>&1 \
    || { tail -n 30 "$WORK/build.log" >&2; fail "buildah bud (log: $WORK/build.log)"; }
step "built in $(( $(date +%s) - build_started )) s (log: $WORK/build.log)"

# --- 5. smoke test, inside the image as its own user -----------------------------------------------------------
inspect() { buildah inspect --type image --format "$1" "$TAG"; }
user=$(inspect '{{.OCIv1.Config.User}}')
uid=${user%%:*}
case $uid in ''|0|root) fail "the image runs as root (USER '$user')" ;; esac
# The entry point, from the image's config, printed by buildah as [word word ...] (plain words, like cifar-resnet).
read -r -a entrypoint <<< "$(inspect '{{.OCIv1.Config.Entrypoint}}' | tr -d '[]')"
[ ${#entrypoint[@]} -gt 0 ] || fail "the image has no entry point"

# The image's volumes, each bind-mounted from a host folder of the same name, owned by the image's user. buildah
# 1.28 mounts the first -v of a declared volume at most, and its own folders on the others: the smoke container
# (never committed) forgets the declarations, so that the -v mounts, as `docker run -v` gives them, hold.
mapfile -t volumes < <(inspect '{{.OCIv1.Config.Volumes}}' | grep -o '/[^: ]*')
for volume in /workspace/data /workspace/runs /workspace/wandb /workspace/wandb-data; do
    [[ " ${volumes[*]} " == *" $volume "* ]] || fail "the image declares no volume $volume"
done
VOLUMES="$WORK/volumes"
rm -rf "$VOLUMES"
buildah from --name "$PREFIX-smoke" "$TAG" >/dev/null
mounts=()
for volume in "${volumes[@]}"; do
    mkdir -p "$VOLUMES/${volume##*/}"
    mounts+=(-v "$VOLUMES/${volume##*/}:$volume")
    buildah config --volume "$volume-" "$PREFIX-smoke"
done
chown -R "$user" "$VOLUMES"
run() {  # run COMMAND...: in the smoke container, as the image's user, the volumes mounted, no W&B credentials
    buildah run "${mounts[@]}" --env WANDB_MODE=offline --env WANDB_SILENT=true "$PREFIX-smoke" -- "$@"
}

step "smoke: the image's user"
got=$(run id -u) || fail "id -u in the image"
[ "$got" = "$uid" ] && [ "$got" != 0 ] || fail "commands run as uid $got, not the image's user $user"
echo "uid $got (USER $user)"

step "smoke: cifar-resnet --help"
help=$(run cifar-resnet --help) || fail "cifar-resnet --help exited non-zero"
grep -q "usage: cifar-resnet" <<< "$help" || fail "cifar-resnet --help printed no usage"
echo "$help" | head -n 3

step "smoke: the entry point (${entrypoint[*]}) with a sweep but no W&B credentials must refuse in one line"
# Its output and exit status from a shell inside, apart from buildah's own messages about the exit status.
out=$(run sh -c 'SWEEP_ID=smoke/test/abc123 "$@" 2>&1; echo "exit status $?"' sh "${entrypoint[@]}") \
    || fail "running the entry point"
status=${out##*exit status }
refusal=${out%$'\n'exit status *}
echo "$refusal"
[ "$status" != 0 ] || fail "the agent started without credentials"
[ "$(wc -l <<< "$refusal")" = 1 ] || fail "the refusal is $(wc -l <<< "$refusal") lines, not one"
grep -q WANDB_API_KEY <<< "$refusal" || fail "the refusal does not name WANDB_API_KEY"

step "smoke: one tiny offline training run on an image folder in the data volume"
run python -c "
import numpy as np
from pathlib import Path
from PIL import Image
rng = np.random.default_rng(0)
for split, count in (('train', 24), ('test', 8)):
    for label in range(2):
        folder = Path('/workspace/data', split, f'class{label}')
        folder.mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 128, (32, 32, 3), dtype=np.uint8) + 100 * label
            Image.fromarray(pixels.astype(np.uint8)).save(folder / f'{i}.png')
" || fail "writing a tiny image folder into the data volume"
run cifar-resnet train --dataset=imagefolder --data_dir=/workspace/data --device=cpu --width=8 --epochs=1 \
    --val_size=8 --batch_size=8 --eval_batch_size=16 > "$WORK/train.log" 2>&1 \
    || { tail -n 20 "$WORK/train.log" >&2; fail "the training run (log: $WORK/train.log)"; }
tail -n 3 "$WORK/train.log"
for file in best.pt record.json; do
    ls "$VOLUMES/runs/"*/"$file" >/dev/null 2>&1 || fail "the training run left no $file in the runs volume"
done
ls "$VOLUMES/data/.cifar_resnet_cache/"train-*.pt >/dev/null 2>&1 \
    || fail "the training run left no decode cache in the data volume"
ls -d "$VOLUMES/wandb/wandb/offline-run-"* >/dev/null 2>&1 || fail "no offline W&B run in the wandb volume"
echo "runs volume: $(cd "$VOLUMES/runs" && find . -type f | sort | tr '\n' ' ')"
echo "data volume: $(cd "$VOLUMES/data" && find .cifar_resnet_cache -type f | sort | tr '\n' ' ')"

step "smoke: evaluate the run's best.pt; sweep and report, whose extras a worker's install lacks, say so in one line"
best=$(cd "$VOLUMES/runs" && ls -- */best.pt | head -n 1)
run cifar-resnet evaluate "/workspace/runs/$best" --data_dir=/workspace/data --device=cpu > "$WORK/evaluate.log" 2>&1 \
    || { tail -n 20 "$WORK/evaluate.log" >&2; fail "evaluate (log: $WORK/evaluate.log)"; }
tail -n 1 "$WORK/evaluate.log"
for command in sweep report; do
    out=$(run sh -c '"$@" 2>&1; echo "exit status $?"' sh cifar-resnet "$command" /workspace/runs) \
        || fail "running cifar-resnet $command"
    refusal=${out%$'\n'exit status *}
    echo "$refusal"
    [ "${out##*exit status }" = 2 ] && [ "$(wc -l <<< "$refusal")" = 1 ] && grep -qF "[$command] extra" <<< "$refusal" \
        || fail "cifar-resnet $command in a worker's install: not one line naming the [$command] extra"
done
buildah rm "$PREFIX-smoke" >/dev/null

# --- 6. no secret in any layer ---------------------------------------------------------------------------------
step "secrets: exporting the layers, uncompressed, to $WORK/layers"
rm -rf "$WORK/layers"
buildah push --quiet --disable-compression "$TAG" "dir:$WORK/layers" >/dev/null
config=$(sed -n 's/.*"config":{[^}]*"digest":"sha256:\([0-9a-f]*\)".*/\1/p' "$WORK/layers/manifest.json")
[ -n "$config" ] && [ -f "$WORK/layers/$config" ] || fail "no image config in the export"
mapfile -t layers < <(sed -n 's/.*"layers":\[\([^]]*\)\].*/\1/p' "$WORK/layers/manifest.json" \
    | grep -o 'sha256:[0-9a-f]*' | sed 's/sha256://')
[ ${#layers[@]} -gt 0 ] || fail "no layers in the export"
secret_names='(^|/)(\.netrc|_netrc|\.git-credentials|\.pypirc|\.npmrc|\.env|\.dockercfg|credentials|credentials\.json'
secret_names+='|id_rsa|id_ecdsa|id_ed25519)$'
for layer in "${layers[@]}"; do
    names=$(tar -tf "$WORK/layers/$layer" | sed 's|^\./||; s|/$||')
    found=$(grep -E "$secret_names" <<< "$names" || true)
    [ -z "$found" ] || fail "layer ${layer:0:12} holds $(tr '\n' ' ' <<< "$found")"
    found=$(grep -E '^(mnt/.|root/\.config/pip)' <<< "$names" || true)
    [ -z "$found" ] || fail "layer ${layer:0:12} holds the build's local pip settings: $(tr '\n' ' ' <<< "$found")"
done
# The config: environment, labels and the history of build commands (ARG values included).
if grep -oE '"[A-Za-z_]*(KEY|TOKEN|SECRET|PASSWORD)[A-Za-z_]*=' "$WORK/layers/$config" | grep -v '^"PATH='; then
    fail "the image's config sets a secret-like variable"
fi
if grep -qE '(^|[^0-9a-f])[0-9a-f]{40}([^0-9a-f]|$)' "$WORK/layers/$config"; then
    fail "the image's config holds a 40-hex string, like a W&B API key"
fi
if [ -n "${WANDB_API_KEY:-}" ] && grep -rqF "$WANDB_API_KEY" "$WORK/layers"; then
    fail "a layer holds this host's WANDB_API_KEY"
fi
echo "${#layers[@]} layers: no .netrc or credentials file; config: no secret-like variable or key"

# --- 7. size ---------------------------------------------------------------------------------------------------
size_mb=$(( $(du -cb "${layers[@]/#/$WORK/layers/}" | tail -n 1 | cut -f1) / 1000000 ))
rm -rf "$WORK/layers"
step "image $TAG: $size_mb MB, its layers uncompressed ($(buildah images --format '{{.Size}}' "$TAG" | head -n 1)" \
    "as buildah counts)"
if [ "$REMOVE_IMAGE" = 1 ]; then buildah rmi "$TAG" >/dev/null; fi
echo "build-local: OK (image $TAG, $size_mb MB, in $(( $(date +%s) - STARTED )) s)"
