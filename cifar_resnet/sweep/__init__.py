"""`cifar-resnet sweep`: a whole sweep on the machine at hand, online through W&B's agents or offline with W&B's
proposer here. Each module imports only those below it:

- `command.py`: the command line, the online path and the final table;
- `local.py`: `LocalSweep`, the offline sweep: runs proposed, started, watched and recorded;
- `view.py`: the progress views (a live table on a terminal, log lines elsewhere);
- `plan.py`: the sweep file, read and checked, and the glue to W&B's proposer;
- `state.py`: the sweep's state (`sweep.json`), shared by every process that works on the sweep.
"""
