"""``python -m kla_tl.autotune ARGS`` is ``kla-tl autotune ARGS``."""

import sys

from kla_tl.cli import main

if __name__ == "__main__":
    sys.exit(main(["autotune", *sys.argv[1:]]))
