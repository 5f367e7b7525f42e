"""What a driver session does besides scheduling: compacting the ledger as batches finish and
at the end, the progress shown, and the reports written at the end (none of it may fail a job)."""

from __future__ import annotations

import logging
import time
from typing import Callable

import pyarrow as pa

from raypar.engine.report_html import html_report
from raypar.engine.reports import write_reports
from raypar.jobdir.layout import REPORT_HTML as REPORT
from raypar.jobdir.ledger import Ledger
from raypar.jobdir.state import JobState
from raypar.spec.binding import bind
from raypar.spec.models import JobSpec

log = logging.getLogger("raypar")

COMPACT_EVERY = 50_000


def compact(ledger: Ledger, run: str) -> None:
    """The next resume reads one file instead of every record; never fail a job over it."""
    try:
        ledger.compact(run)
    except Exception as exc:  # noqa: BLE001 - compaction is an optimisation: never fail a job over it
        log.warning("could not compact the ledger: %s", exc)
    finally:
        give_memory_back()


def give_memory_back() -> None:
    """Return to the OS what Arrow's allocator keeps of the buffers just freed. It keeps them for
    Arrow's next allocations, but the driver's next ones are mostly Python's: after reading a
    million records the kept buffers stayed resident (484 MiB, 285 MiB once given back)."""
    pa.default_memory_pool().release_unused()


def final_view(ledger: Ledger):
    return ledger.view(ledger.read_manifest() or ledger.read_manifest_prefix())


def write_session_reports(ledger: Ledger, spec: JobSpec, state: JobState, reason: str, view) -> None:
    """Reports are a convenience derived from the ledger: never let them fail a job."""
    try:
        page = html_report(ledger, view, state.value, reason).encode()
        write_reports(ledger, view, state.value, reason, bind(spec).append_row_path, {f"reports/{REPORT}": page})
    except Exception as exc:  # noqa: BLE001 - reports are derived: never fail a job over them
        log.warning("could not write reports: %s", exc)
    finally:
        give_memory_back()


class Compactor:
    """Folds done records into a compact file every COMPACT_EVERY batches, so a resume after a
    crash reads at most that many records one by one (see Ledger.compact); stores the failed
    records the session gathered once they are a second old (see FailedLog)."""

    def __init__(self, ledger: Ledger, run: str, then: Callable):
        self.ledger, self.run_id, self.then, self.at = ledger, run, then, None

    def __call__(self, p, final: bool = False) -> None:
        self.ledger.flush_failures(due_only=not final)  # failed records gathered for a second or more
        if self.at is None:
            self.at = p.done
        if p.done - self.at >= COMPACT_EVERY:
            compact(self.ledger, self.run_id)
            self.at = p.done
        self.then(p, final=final)


class Reporter:
    """Turns the scheduler's counters into snapshots for the display."""

    def __init__(self, show: Callable):
        self.show = show

    def __call__(self, p, final: bool = False) -> None:
        self.show(p.snapshot(time.monotonic()), final=final)
