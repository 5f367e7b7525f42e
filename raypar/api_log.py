"""raypar's log lines from the Python API read as the CLI's: ``raypar: WARNING ...``.

The CLI configures logging itself. A program calling :func:`raypar.run` often
configures none, and Python's last-resort handler then prints raypar's
warnings bare, without saying whose they are. :func:`install` adds a handler
to the ``raypar`` logger that prints them in the CLI's format, and only while
the program has no logging of its own (whose handlers then print them).
"""

from __future__ import annotations

import logging
import sys

FORMAT = "raypar: %(levelname)s %(message)s"  # as the CLI's logging.basicConfig prints them


class _UnlessConfigured(logging.Handler):
    """Prints to the current ``sys.stderr`` when the root logger has no handlers."""

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers:
            return  # the program configured logging: raypar's records propagate to its handlers
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - logging must never fail a job
            self.handleError(record)


def install() -> None:
    """Once per process: raypar's warnings carry the ``raypar:`` prefix in programs without logging set up."""
    logger = logging.getLogger("raypar")
    if any(isinstance(h, _UnlessConfigured) for h in logger.handlers):
        return
    handler = _UnlessConfigured(level=logging.WARNING)
    handler.setFormatter(logging.Formatter(FORMAT))
    logger.addHandler(handler)
