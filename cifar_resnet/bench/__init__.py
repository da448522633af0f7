"""`cifar-resnet bench`: the benchmark of our pipeline against the write-up's, and whole runs without W&B.

- `measure.py`: the measurements of `cifar-resnet bench` and the command line of all three;
- `writeup.py`: the write-up's pipeline, rebuilt as the baseline, and its published table;
- `runs.py`: whole runs in child processes (`bench run`, `bench grid`, the concurrent runs);
- `machine.py`: the machine and commit a result was measured on.

    cifar-resnet bench --mode=cpu --dataset=imagefolder --data_dir=DIR --out=bench.json
    cifar-resnet bench run --run_id=ID --result=FILE --name=value ...   # one run without W&B
    cifar-resnet bench grid --workers=3 --name=value ...                # the write-up's six cells without W&B
"""

