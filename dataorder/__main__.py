"""``python -m dataorder``: the same as the ``dataorder`` console script."""

import sys

from dataorder.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
