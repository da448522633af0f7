#!/bin/sh
# $1: the checkout to run; a fresh output folder each time
set -e
d=${TMPDIR:-/tmp}/pack-of-one-$(basename $1)
rm -rf $d && mkdir -p $d && cd $d
exec env WANDB_MODE=offline PYTHONPATH=$1 OMP_NUM_THREADS=2 ${PYTHON:-python3} -m cifar_resnet train --output_dir=$d/runs --dataset=synthetic --width=8 --epochs=2 --train_size=1024 --val_size=256 --test_size=256
