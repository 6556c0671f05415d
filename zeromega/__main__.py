"""``python -m zeromega ...``: the same command line as the ``zeromega`` console script."""

import sys

from zeromega.launch.cli import main

if __name__ == "__main__":
    sys.exit(main())
