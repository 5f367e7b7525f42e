"""Job states and the transitions the driver may make between them."""

from __future__ import annotations

from enum import Enum


class JobState(str, Enum):
    CREATED = "created"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"
    # Never written by a driver: status reports it when the state says
    # "running" but no live driver holds the lease (the driver was killed).
    INTERRUPTED = "interrupted"
    # Before the job dir exists, so never in one: the states a handle reports until then.
    PLANNING = "planning"  # a driver in this process is checking the input (raypar.run)
    STARTING = "starting"  # a submitted driver has not created the job dir yet (raypar.submit)

    def is_terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELED)

    def check_transition(self, new: "JobState") -> None:
        """Raise ValueError for a transition no driver may make."""
        if new not in _ALLOWED[self]:
            raise ValueError(f"illegal job state transition {self.value} -> {new.value}")


# A terminal job may start running again: that is what resume does.
_ALLOWED = {
    JobState.CREATED: {JobState.RUNNING, JobState.FAILED, JobState.CANCELED},
    JobState.RUNNING: {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELED, JobState.RUNNING},
    JobState.SUCCEEDED: {JobState.RUNNING},
    JobState.FAILED: {JobState.RUNNING},
    JobState.CANCELED: {JobState.RUNNING},
    JobState.INTERRUPTED: {JobState.RUNNING, JobState.CANCELED},
    JobState.PLANNING: set(),
    JobState.STARTING: set(),
}
