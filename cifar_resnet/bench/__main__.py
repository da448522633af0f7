"""`python -m cifar_resnet.bench`: the benchmark without the installed `cifar-resnet` command (a GPU machine that
got a copy of the checkout)."""

import sys

from ..process import setup_logging
from .measure import main

setup_logging()
sys.exit(main())
