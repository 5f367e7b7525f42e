"""One exception root for everything raypar reports to a user.

Every subclass carries a one-line ``headline`` that names the problem and the
place; the CLI prints that line (never a traceback) and exits with ``exit_code``.
"""

from __future__ import annotations


class RayparError(Exception):
    """Root of all errors raypar raises on purpose."""

    exit_code = 1

    def __init__(self, headline: str):
        super().__init__(headline)
        self.headline = headline


class SpecError(RayparError):
    """The job spec is wrong: unknown key, bad value, missing file."""

    exit_code = 2


class UsageError(RayparError):
    """The command line is wrong (bad arguments, a job dir that is not one)."""

    exit_code = 2


class LedgerError(RayparError):
    """The job directory cannot be read or written as a ledger."""


class StorageError(RayparError):
    """Storage could not be reached or refused access (network, authentication): not a wrong
    spec, and worth trying again once the storage or its credentials are fixed."""


class LeaseHeldError(RayparError):
    """Another live driver owns the job directory."""

    exit_code = 2


class PlacementError(RayparError):
    """The cluster cannot host the requested instances."""


class Stopped(KeyboardInterrupt):
    """SIGTERM reached the driver (`ray job stop`, `raypar cancel --address`, a deleted pod).

    A KeyboardInterrupt, so the driver stops the way Ctrl-C stops it: the job
    ends ``canceled`` and stays resumable.
    """


class ModelNotFoundError(RayparError):
    """``Model.get_model_path`` was given a model name the model mapping does not hold."""

    exit_code = 2


class ResultError(RayparError, TypeError):
    """run() returned something raypar cannot count or write (a TypeError, as before it was a RayparError)."""


class CorruptPartsError(RayparError):
    """Parts whose content does not match the checksum their done record holds."""

    def __init__(self, records):
        super().__init__(f"{len(records)} output part(s) failed verification")
        self.records = records


class OutputSchemaError(RayparError):
    """The parts' columns cannot share one file (e.g. a column is int in one batch, string in another)."""
