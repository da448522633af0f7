"""`python -m cifar_resnet` is the `cifar-resnet` command."""

import sys

from .cli import main

sys.exit(main())
