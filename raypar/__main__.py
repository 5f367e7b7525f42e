"""``python -m raypar``: the same command as ``raypar`` (the entrypoint of submitted jobs)."""

import sys

from raypar.cli import main

sys.exit(main())
