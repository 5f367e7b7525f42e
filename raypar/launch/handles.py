"""Handles on running jobs for the Python API: ``raypar.run`` / ``raypar.resume`` return a
:class:`LocalJob`, ``raypar.submit`` a :class:`raypar.launch.submission.SubmittedJob`.

Both offer ``status()``, ``wait()`` and ``cancel()``; ``wait()`` returns an
outcome whose ``exit_code`` is the CLI's (0 succeeded, 1 failed, 130 canceled).
"""

from __future__ import annotations

import threading
from typing import Callable, Optional

from raypar.engine.driver import Outcome, cancel_job
from raypar.engine.status import job_status
from raypar.errors import RayparError
from raypar.jobdir.ledger import Ledger
from raypar.jobdir.state import JobState


class LocalJob:
    """A job whose driver runs in this process: in the caller's thread, or a background one."""

    def __init__(self, job_dir: str, drive: Callable[[], Outcome], background: bool):
        self.job_dir = job_dir
        self._drive = drive
        self._outcome: Optional[Outcome] = None
        self._error: Optional[BaseException] = None
        self._thread: Optional[threading.Thread] = None
        if background:
            self._thread = threading.Thread(target=self._run, name="raypar-driver", daemon=True)
            self._thread.start()
        else:
            self._outcome = drive()  # errors reach the caller directly, as from the CLI

    def _run(self) -> None:
        try:
            self._outcome = self._drive()
        except BaseException as exc:  # noqa: BLE001 - handed to wait()
            self._error = exc

    @property
    def finished(self) -> bool:
        return self._thread is None or not self._thread.is_alive()

    def wait(self, timeout: Optional[float] = None) -> Outcome:
        """The outcome once the driver has ended; raises what the driver raised (e.g. a SpecError)."""
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RayparError(f"{self.job_dir}: still running after {timeout:.0f}s")
        if self._error is not None:
            raise self._error
        assert self._outcome is not None
        return self._outcome

    def status(self, exact: bool = False) -> dict:
        """State and mini-batch counts from the job dir (``planning`` before the job dir exists);
        ``exact``: counted from the ledger, not the running driver's last heartbeat (see job_status)."""

        if not self.finished and not Ledger(self.job_dir).exists():
            return {"job_dir": self.job_dir, "state": JobState.PLANNING.value, "completed": 0, "failed": 0, "pending": 0,
                    "total": 0, "planning_complete": False}
        return job_status(self.job_dir, exact=exact)

    def cancel(self, wait: float = 60.0, echo: Callable[[str], None] = lambda line: None) -> JobState:
        """Stop the driver (it marks the job canceled: resumable) and wait until it has."""

        if self.finished:
            return self.wait().state
        while not Ledger(self.job_dir).exists():  # still checking its input: the job dir comes first
            if self.finished:
                return self.wait().state
            self._thread.join(0.1)
        state = cancel_job(self.job_dir, wait=wait, echo=echo)
        if self._thread is not None:
            self._thread.join(wait)
        return state
