"""The training entry point that `wandb agent` starts: `python -m cifar_resnet.train --name=value ...`.

argv -> Config -> W&B run (the sweep's values win) -> run_in_trainer (packing.client) or run_training -> summary
and artifact -> exit status.
Exit status: 0 finished (or finished earlier with the same settings: a finished run is never trained again);
2 a user mistake (one line names it); 1 diverged, a file not written (a full disk; one line) or crashed;
128 + signal number when stopped by SIGTERM or SIGUSR1, after marking the run preempting so that the sweep requeues
it. Those signals are held until W&B has shut down, and ignored while the process exits: a run that has ended
ends as it is recorded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from .config import Config, argument_parser
from .engine.loop import Interrupted
from .errors import RunFailed, StorageError, TrainingDiverged, UserError
from .files import check_folder_path
from .logs import PACKAGE_LOGGER, logs_to_current_stderr, setup_logging
from .names import requested_run_id
from .packing.client import run_in_trainer
from .records import AlreadyFinished, RunFolder, RunRecord
from .run_contract import EXIT_CRASH, EXIT_OK, EXIT_USAGE, SIGNAL_EXIT_BASE, TRAINER_VARIABLE
from .runner import RunHooks, check_inputs, run_training
from .signals import exit_ignoring_stop_signals, stop_on_signals
from .threads import set_cpu_threads

log = logging.getLogger(PACKAGE_LOGGER)

MODULE_COMMAND = "python -m cifar_resnet.train"  # how `wandb agent` starts a run; `cifar-resnet train` is the other


@contextlib.contextmanager
def progress_hooks(hooks: RunHooks) -> Iterator[RunHooks]:
    """A bar per epoch when stderr is a terminal; otherwise the engine's one log line per epoch is the progress."""
    if not sys.stderr.isatty():
        yield hooks
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TimeRemainingColumn,
    )

    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), transient=True) as bar, logs_to_current_stderr():
        task = bar.add_task("", total=None)

        def on_epoch_start(epoch: int, batches: int) -> None:
            bar.reset(task, total=batches, description=f"epoch {epoch}")

        # A copy with the bar's hooks: the caller's stay as they were.
        yield dataclasses.replace(hooks, on_epoch_start=on_epoch_start, on_batch=lambda: bar.advance(task))


def train(config: Config, folder: RunFolder, hooks: RunHooks, received: Sequence[int]) -> RunRecord:
    """The run's training: in the trainer that TRAINER_VARIABLE names, when there is one and it takes the run;
    else in this process, with a progress bar on a terminal."""
    trainer_socket = os.environ.get(TRAINER_VARIABLE)
    if trainer_socket:
        record = run_in_trainer(Path(trainer_socket), config, folder, hooks, received)
        if record is not None:
            return record
    with progress_hooks(hooks) as shown:
        return run_training(config, folder, shown).record


def main(argv: Sequence[str] | None = None, prog: str = MODULE_COMMAND) -> int:
    """Run one training run from `--name=value` arguments; `prog` is the command typed, for `--help`."""
    setup_logging()
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        argument_parser(prog, __doc__.splitlines()[0]).print_help()
        return EXIT_OK
    try:
        config = Config.from_argv(argv)
        check_folder_path(Path(config.output_dir), "output_dir")
        run_id = requested_run_id()  # checked before W&B sees it
        if run_id is not None:  # a finished run is not trained again, nor its W&B run touched
            RunFolder.of(config.output_dir, run_id).check_not_finished(config)
        check_inputs(config)  # a missing device or data source: one line, and no W&B run left behind
    except AlreadyFinished as done:
        log.info("%s", done)
        return EXIT_OK
    except UserError as error:
        log.error("%s", error)
        return EXIT_USAGE
    set_cpu_threads()  # a run alone takes every core; one started by a tool has its share in OMP_NUM_THREADS

    from .tracking import Tracker  # wandb is imported only once a run really starts

    # Stop signals are held from before wandb.init (a signal while it starts still stops cleanly) until W&B has
    # shut down (the tracker's exit): a signal while a finished run's W&B shuts down leaves it finished.
    with stop_on_signals() as received, Tracker(config) as tracker:
        try:
            config = Config.from_mapping(tracker.settings())  # under a sweep, W&B's values are the truth
            tracker.record_config(config)
            folder = RunFolder.of(config.output_dir, tracker.run_id)  # the run's files, from here on
            hooks = RunHooks(on_start=lambda facts: tracker.record_run_info(**facts),
                             on_epoch_recorded=tracker.on_epoch, should_stop=lambda: bool(received),
                             fetch_resume=tracker.fetch_resume_checkpoint)
            record = train(config, folder, hooks, received)
            tracker.finish_run(record, folder.best)
            return EXIT_OK
        except AlreadyFinished as done:  # in another process, since the check above
            log.info("%s", done)
            return EXIT_OK
        except UserError as error:
            log.error("%s", error)
            tracker.fail(str(error))
            return EXIT_USAGE
        except (TrainingDiverged, StorageError, RunFailed) as error:  # not the user's settings: exit 1, in one line
            log.error("%s", error)
            tracker.fail(str(error))
            return EXIT_CRASH
        except Interrupted as stop:  # the resume checkpoint of the last completed epoch is already on disk
            # By a signal to this process, or (in a trainer) with the trainer, which its supervisor stopped.
            signum = received[0] if received else signal.SIGTERM
            log.warning("stopped (%s); the run resumes from its last completed epoch",
                        f"signal {signum}" if received else stop)
            tracker.preempt(exit_code=SIGNAL_EXIT_BASE + signum, resume_checkpoint=folder.last)
            return SIGNAL_EXIT_BASE + signum
        except Exception as error:
            log.exception("run crashed")
            tracker.fail(f"{type(error).__name__}: {error}")
            return EXIT_CRASH


if __name__ == "__main__":
    exit_ignoring_stop_signals(main())
