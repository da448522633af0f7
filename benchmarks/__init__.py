"""The benchmarks of cifar-resnet: scripts run from a checkout's root as `python -m benchmarks.NAME` (each has
`--help`), outside the installed package, which a worker (the Docker image) installs without them. BENCHMARKS.md
holds what they measured.

- `bench`: the write-up's pipeline against ours, in one process, on the device at hand (and runs per hour with
  several runs at once);
- `run`: one run without W&B, its best weights tested without TTA, with flip TTA and with flip plus 1 px shifts;
- `grid`: the write-up's six cells through an offline sweep, beside its published table;
- `pack`: K runs sharing one device, each way of sharing it;
- `recipe_experiments`: recipe candidates over seeds, and the six cells under a recipe, through an offline sweep;
- `sweep_wall`: a whole `cifar-resnet sweep`, timed from outside;
- `startup_parts`, `decode_threads`, `warm_loads`: parts of a run's start, against an older tree or alone;
- `markdown`: the Markdown tables of stored results, for BENCHMARKS.md;
- `gpu_check.sh`: every GPU measurement in one call.

Their shared parts: `writeup.py` (the write-up's pipeline and its published table), `launch.py` (runs in child
processes: several at once, or through an offline sweep), `machine.py` (what a figure was measured on).
"""
