"""``python -m kla_tl.cli ARGS`` is ``kla-tl ARGS`` (works from a source checkout on PYTHONPATH, without installing)."""

import sys

from kla_tl.cli import main

if __name__ == "__main__":
    sys.exit(main())
