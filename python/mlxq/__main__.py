"""`python -m mlxq`: the mlxq command line (see :mod:`mlxq.cli`)."""

import sys

from mlxq.cli import main

if __name__ == "__main__":
    sys.exit(main())
