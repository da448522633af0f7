"""Many runs on one device: the runs sharing a GPU train in one process, its trainer, as one pack (docs/packing.md).

- `pack.py`: a pack, members stepped in lockstep, each on a CUDA stream of its own;
- `layout.py`: K runs of one shape as one fused model (grouped convolutions, batch norm over K*C channels);
- `fused.py`: a fused group, a run in each of its slots, each keeping its own optimizer, schedule and recipe;
- `ends.py`: how a member ends (`MemberEnd`): its status, its wire form, and its run's record or exception;
- `groups.py`: where a trainer puts a run in `fused` mode (a group, or streams, and why);
- `wire.py`: the messages between a trainer and a run's process;
- `trainer.py`: the trainer (`cifar-resnet trainer`), serving the runs of one GPU;
- `client.py`: a run's side, handing its training to its trainer and relaying its life;
- `pool.py`: the trainers of a supervisor (`TrainerPool`), one per GPU, and the `--pack` modes.
"""
