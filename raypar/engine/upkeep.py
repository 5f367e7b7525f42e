"""What a driver session does besides scheduling: compacting the ledger as batches finish and
at the end, the progress shown, and the reports written at the end (none of it may fail a job)."""

from __future__ import annotations

import functools
import logging
import threading
import time
from typing import Callable, Optional

import pyarrow as pa

from raypar.engine.report_html import html_report
from raypar.engine.reports import write_reports
from raypar.engine.worker_time import TimeSplit, from_lost_heartbeat
from raypar.jobdir.layout import REPORT_HTML as REPORT
from raypar.jobdir.ledger import Ledger
from raypar.jobdir.state import JobState
from raypar.spec.binding import bind
from raypar.spec.models import JobSpec

log = logging.getLogger("raypar")

COMPACT_EVERY = 50_000
# ... or, once COMPACT_SOONER batches are done since the last, every COMPACT_SECONDS: a slow job on an
# object store (a segment per batch) would otherwise leave hours of segments for every view to read.
COMPACT_SECONDS = 600.0
COMPACT_SOONER = 1_000
# ... or once the workers stored COMPACT_SEGMENTS segments of done records on an object store since
# the last: a view reads each one not compacted yet, a GET each, so this bounds what a status or a
# resume reads one by one (where every segment holds a batch, 50,000 batches were 50,000 GETs:
# minutes). A compaction costs a delta file; merges are a binary counter (compact_tiers): at one
# per 2,000 segments, each record is written about 5 times over a million (bench_compaction_tiers).
# (The driver stores at most a segment of failed records a second, or one per 1,000 records.)
COMPACT_SEGMENTS = 2_000
# ... or, with many workers, COMPACT_SEGMENTS_PER_WORKER each: a compaction lists every worker's open
# folder (a LIST each, 12.5 GETs' price on S3), and at 1,000 workers storing a segment a second a
# compaction per 2,000 segments listed 500 folders a second. A view lists them all anyway.
COMPACT_SEGMENTS_PER_WORKER = 20


def compact(ledger: Ledger, run: str, may_write: Callable[[], bool], done: bool = True, failed: bool = True,
            session_over: bool = False, gone: frozenset = frozenset()) -> None:
    """The next resume reads one file instead of every done record, the next status a few columns
    instead of every failed one; never fail a job over it. ``may_write``: whether the session still
    holds the lease (an index is written only while it does). ``session_over``: the session's workers
    are gone (its last compaction closes every segment folder it read, of parts/ and failed/);
    ``gone``: the writers of the session's workers that are gone (their folders of parts/ are closed)."""
    # One at a time: two indexes written at once could each remove the other's files as superseded.
    # (A driver stopped by a second Ctrl-C while it waited for its compaction's thread waits here.)
    with ledger.compacting:
        for wanted, compaction, what in ((done, functools.partial(ledger.compact, gone=gone), "done"),
                                         (failed, ledger.compact_failures, "failed")):
            if not wanted:
                continue
            try:
                compaction(run, session_over=session_over, may_write=may_write)
            except Exception as exc:  # noqa: BLE001 - compaction is an optimisation: never fail a job over it
                log.warning("could not compact the ledger's %s records: %s", what, exc)
            finally:
                give_memory_back()


def give_memory_back() -> None:
    """Return to the OS what Arrow's allocator keeps of the buffers just freed. It keeps them for
    Arrow's next allocations, but the driver's next ones are mostly Python's: after reading a
    million records the kept buffers stayed resident (484 MiB, 285 MiB once given back)."""
    pa.default_memory_pool().release_unused()


def final_view(ledger: Ledger):
    return ledger.view(ledger.read_manifest() or ledger.read_manifest_prefix())


def record_session_time(ledger: Ledger, run: str, state: JobState, split: TimeSplit) -> None:
    """The session's worker time, kept for the job's total (never fails a job)."""
    if not split.workers:
        return
    try:
        ledger.record_worker_time(run, state.value, split.fields())
    except Exception as exc:  # noqa: BLE001 - a convenience, as the reports are
        log.warning("could not record the session's worker time: %s", exc)


def record_lost_session(ledger: Ledger) -> None:
    """The worker time of a session whose driver was killed, from the last heartbeat of the lease
    this session took over (up to a third of its lease_ttl old): the job's total counts it."""
    lost = ledger.lease.taken_over or {}
    split = (lost.get("progress") or {}).get("worker_time")
    if not split or not split.get("workers") or not lost.get("run"):
        return
    try:
        ledger.record_worker_time(lost["run"], "lost", from_lost_heartbeat(split))
    except Exception as exc:  # noqa: BLE001 - a convenience, as the reports are
        log.warning("could not record the worker time of run %s: %s", lost["run"], exc)


def write_session_reports(ledger: Ledger, spec: JobSpec, state: JobState, reason: str, view,
                          worker_time: Optional[TimeSplit] = None) -> None:
    """Reports are a convenience derived from the ledger: never let them fail a job."""
    try:
        page = html_report(ledger, view, state.value, reason, worker_time).encode()
        write_reports(ledger, view, state.value, reason, bind(spec).append_row_path, {f"reports/{REPORT}": page},
                      worker_time)
    except Exception as exc:  # noqa: BLE001 - reports are derived: never fail a job over them
        log.warning("could not write reports: %s", exc)
    finally:
        give_memory_back()


class Compactor:
    """Folds done records into a compact file every COMPACT_EVERY batches or COMPACT_SEGMENTS
    segments (COMPACT_SEGMENTS_PER_WORKER a worker past 100 workers), or every COMPACT_SECONDS
    once COMPACT_SOONER are done since the last, so a resume after a crash or a status reads at
    most that many records one by one (see Ledger.compact); and failed records every
    COMPACT_EVERY failed attempts, or every COMPACT_SECONDS if any were stored
    (Ledger.compact_failures). Stores the failed records the session gathered once they are a
    second old (see FailedLog).

    A compaction runs on a thread of its own, one at a time, while the scheduler goes on: on an
    object store it reads every segment stored since the last one (a ranged GET each: 50,000
    one-batch segments are minutes on an emulator), and in the scheduler's loop the workers ran
    out of work meanwhile. :meth:`join` waits for it (before the session's last compaction)."""

    def __init__(self, ledger: Ledger, run: str, then: Callable, may_write: Callable[[], bool],
                 clock: Callable[[], float] = time.monotonic):
        self.ledger, self.run_id, self.then, self.at, self.failed_at = ledger, run, then, None, 0
        self.segments_at = 0  # p.segments when the last compaction of done records started (or at the first call)
        self.may_write = may_write  # False once the lease is lost: no index is written then
        self.clock = clock
        self.since = self.failed_since = clock()  # when the last compactions started (or the session)
        self.thread: Optional[threading.Thread] = None

    def __call__(self, p, final: bool = False) -> None:
        self.ledger.flush_failures(due_only=not final)  # failed records gathered for a second or more
        if self.at is None:
            self.at, self.segments_at = p.done, p.segments
        stored = self.ledger.failed_log.stored if self.ledger.failed_log is not None else 0
        new = p.done - self.at
        segments = max(COMPACT_SEGMENTS, COMPACT_SEGMENTS_PER_WORKER * p.workers)
        done = new >= COMPACT_EVERY or p.segments - self.segments_at >= segments or (
            new >= COMPACT_SOONER and self.clock() - self.since >= COMPACT_SECONDS)
        # Failed records are stored a file a second at most: a slow, flaky job leaves a file for
        # each failure, and every status reads those not compacted. So any new ones, every COMPACT_SECONDS.
        failed = stored - self.failed_at >= COMPACT_EVERY or (
            stored > self.failed_at and self.clock() - self.failed_since >= COMPACT_SECONDS)
        if (done or failed) and not final and not (self.thread is not None and self.thread.is_alive()):
            self.at, self.failed_at = (p.done if done else self.at), (stored if failed else self.failed_at)
            self.segments_at = p.segments if done else self.segments_at
            self.since = self.clock() if done else self.since
            self.failed_since = self.clock() if failed else self.failed_since
            self.thread = threading.Thread(target=compact, args=(self.ledger, self.run_id, self.may_write),
                                           # (the writers gone so far, taken on the scheduler's thread)
                                           kwargs={"done": done, "failed": failed, "gone": frozenset(p.gone)},
                                           name="raypar-compact",
                                           daemon=True)
            self.thread.start()
        self.then(p, final=final)

    def join(self) -> None:
        if self.thread is not None:
            self.thread.join()


class Reporter:
    """Turns the scheduler's counters into snapshots for the display."""

    def __init__(self, show: Callable):
        self.show = show

    def __call__(self, p, final: bool = False) -> None:
        self.show(p.snapshot(time.monotonic()), final=final)
