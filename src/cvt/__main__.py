"""`python -m cvt ...` is the `cvt` command, so that `torchrun -m cvt train ...` reads as the command does."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
