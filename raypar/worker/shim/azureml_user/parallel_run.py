"""``EntryScript``, as Azure ML's parallel runtime offers it to entry scripts.

Azure ships this module only on its compute. raypar's worker puts this
stand-in on its ``sys.path`` and sets the variables read below before it
imports the entry script (raypar/worker/azure_env.py), so scripts
written for Azure run unchanged.
"""

from __future__ import annotations

import logging
import os

LOGGER_NAME = "EntryScript"


def _setting(name: str) -> str:
    try:
        return os.environ[name]
    except KeyError:
        raise RuntimeError(f"{name} is not set: EntryScript works inside a raypar worker only") from None


class EntryScript:
    """The per-process helper: ``EntryScript() is EntryScript()``.

    Attributes:
        logger: a ``logging.Logger`` whose records go to the worker's log in
            the job dir (``logs/<run>~<worker>.log``), at the job's ``logging_level``.
        log_dir: this worker process's folder for the script's own log files.
        output_dir: this worker process's folder for files the script keeps
            (also ``AZUREML_BI_OUTPUT_PATH``).
        working_dir: this worker process's scratch folder, removed when the worker ends.
        agent_name: the worker's name, ``instance<i>-slot<s>``, as raypar's records
            and reports name it.
    """

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    @property
    def logger(self) -> logging.Logger:
        # No handler of its own: records propagate to the worker's root handler, which
        # writes into the job dir's log once (a handler here would print them twice).
        return logging.getLogger(LOGGER_NAME)

    # Set by the worker in its environment, before the entry script is imported.
    log_dir = property(lambda self: _setting("RAYPAR_LOG_DIR"))
    output_dir = property(lambda self: _setting("AZUREML_BI_OUTPUT_PATH"))
    working_dir = property(lambda self: _setting("RAYPAR_WORKING_DIR"))
    agent_name = property(lambda self: _setting("RAYPAR_AGENT_NAME"))
