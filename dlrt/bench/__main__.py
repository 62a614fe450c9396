"""python -m dlrt.bench: the same as dlrt-bench."""

import sys

from .cli import main

sys.exit(main())
