"""`python -m cifar_resnet` is the `cifar-resnet` command."""

from .cli import main
from .signals import exit_ignoring_stop_signals

exit_ignoring_stop_signals(main())
