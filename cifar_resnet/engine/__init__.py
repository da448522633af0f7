"""The training engine. It knows nothing of W&B or files: `loop.fit` reports through one `TrainHooks` object, and
the run record, the checkpoint writer, the W&B layer and progress displays subscribe to it. Host synchronisation
happens once per epoch, never per step.

- `device.py`: the device and what a run builds on it (the model, optimizer, schedule, memory format, autocast,
  whether its step is captured or compiled);
- `streams.py`: the CUDA streams of a process's runs, each with one owner at a time, and the one wait of a host read;
- `capture.py`: CUDA graph capture, what the captured training step and evaluation batch share;
- `step.py`: the training step (`train_step`), eager or captured as one CUDA graph, and its builder `build_step`;
- `averaging.py`: the weight average (EMA) and Lookahead, updated after every step;
- `evaluation.py`: evaluation with test-time views, eager or captured, `evaluate` and the test pass;
- `loop.py`: the epoch (`train_one_epoch`), a run's state (`TrainState`) and the whole run (`fit_steps`, `fit`), with
  a step of its own or as a member of a fused group (`packing/`).
"""
