"""Streamed planning: batches run while the input is still being listed.

A background thread pulls batches from the planner, writes them to the
manifest chunk by chunk, and only then hands them to the scheduler, so the
first mini-batch starts long before a huge folder is listed, and a batch
that ran is always in the manifest. A session that resumes an unfinished
plan lists again and checks that the input still gives the same batches.
"""

from __future__ import annotations

import collections
import sys
import threading
import time
from typing import Iterator, Optional

from raypar.errors import LedgerError, RayparError
from raypar.inputs.base import MiniBatch, QueuedBatch
from raypar.jobdir.ledger import CHUNK_SIZE, Ledger

FLUSH_EVERY = 0.5  # seconds: how long planned batches may wait for their chunk
# Python's switch interval while planning (default 5 ms). The planner holds Python's lock for
# seconds at a time; the scheduler's thread gives the lock up in every call into Ray and then
# waits a whole interval to get it back: a million-batch job ran at a tenth of its speed (about
# 1,100 batches/s against 10,000 after) until planning ended. Shorter turns cost the planner little.
PLANNING_SWITCH_INTERVAL = 0.0005


class _ShortTurns:
    """The short switch interval while any planner of this process runs; the process's own back
    when the last one ends (two jobs run from threads of one program may plan at once)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.planners = 0
        self.own = sys.getswitchinterval()

    def __enter__(self):
        with self.lock:
            if not self.planners:
                self.own = sys.getswitchinterval()
                sys.setswitchinterval(min(self.own, PLANNING_SWITCH_INTERVAL))
            self.planners += 1

    def __exit__(self, *exc):
        with self.lock:
            self.planners -= 1
            if not self.planners:
                sys.setswitchinterval(self.own)


_short_turns = _ShortTurns()


class PlanFeed(threading.Thread):
    """Plans in the background; ``take()`` returns the batches whose chunk is written."""

    def __init__(self, ledger: Ledger, batches: Iterator[MiniBatch], done=frozenset(), prefix=None,
                 first_release: int = 1):
        """``prefix``: the ledger's manifest prefix, when already read. ``first_release``: the number of
        batches released at once as soon as they are planned (the job's worker slots), rather than at
        the next FLUSH_EVERY: the scheduler waits for that many, or the plan's end, to size its session."""
        super().__init__(daemon=True, name="raypar-planner")
        self.batches, self.done = batches, done
        self.first_release = first_release
        self.prefix = prefix if prefix is not None else ledger.read_manifest_prefix()
        self.writer = ledger.manifest_writer(self.prefix.lines)
        self.prefix_versions = ledger.read_prefix_versions(self.writer.chunks)
        self.ready: collections.deque = collections.deque()
        self.planned = 0
        self.to_run = 0  # of the batches released, those not done before
        self.error: Optional[str] = None
        self.finished = threading.Event()
        self.wake = threading.Condition()
        self.halt = threading.Event()
        self.started_at = time.monotonic()  # (again when the thread starts)

    def start(self) -> None:
        self.started_at = time.monotonic()
        super().start()

    def run(self) -> None:
        try:
            with _short_turns:
                self._plan()
        except RayparError as exc:
            self.error = f"planning failed: {exc.headline}"
        except Exception as exc:  # noqa: BLE001 - any listing/reading error ends the job, named
            self.error = f"planning failed: {type(exc).__name__}: {exc}"
        finally:
            with self.wake:
                self.finished.set()
                self.wake.notify_all()

    def _plan(self) -> None:
        held: list[QueuedBatch] = []
        last = 0.0
        for batch in self.batches:
            if self.halt.is_set():
                return
            if batch.ordinal < len(self.prefix):
                line = self.prefix.lines[batch.ordinal]
                if batch.to_json().encode() != line and _before_row_groups(batch).encode() != line:
                    raise LedgerError(f"the input changed since this job started planning ({batch.id} differs); "
                                      f"start a new job")
                changed = [n for n, v in (batch.inputs or {}).items() if self.prefix_versions.get(n, v) != v]
                if changed:
                    raise LedgerError(f"the input changed since this job started planning ({changed[0]} is not the "
                                      f"file planned in {batch.id}); start a new job")
                self._release([QueuedBatch(batch.ordinal, line.decode())])
                continue
            held.append(QueuedBatch(batch.ordinal, self.writer.add(batch)))
            now = time.monotonic()
            if len(held) >= CHUNK_SIZE or now - last >= FLUSH_EVERY or \
                    self.to_run < self.first_release <= self.to_run + len(held):
                self.writer.flush()
                self._release(held)
                held, last = [], now
        if len(self.prefix) > self.writer.count + len(self.writer.buffer):
            raise LedgerError("the input changed since this job started planning (fewer batches now); "
                              "start a new job")
        self.writer.complete()
        self._release(held)

    def _release(self, batches: list[QueuedBatch]) -> None:
        with self.wake:
            self.planned += len(batches)
            to_run = [b for b in batches if b.id not in self.done]
            self.ready.extend(to_run)
            self.to_run += len(to_run)
            self.wake.notify_all()

    def take(self) -> list[QueuedBatch]:
        """The batches released since the last call (never blocks)."""
        out = []
        while self.ready:
            out.append(self.ready.popleft())
        return out

    @property
    def exhausted(self) -> bool:
        """Planning ended and every released batch was taken."""
        return self.finished.is_set() and not self.ready

    def wait(self, timeout: float) -> None:
        """Block until more batches are released or planning ends (at most ``timeout``)."""
        with self.wake:
            if not self.ready and not self.finished.is_set():
                self.wake.wait(timeout)

    def wait_for(self, count: int, seconds_from_start: float) -> None:
        """Block until ``count`` batches to run are released or planning ends, at most until
        ``seconds_from_start`` after the planner started (the driver connects to Ray meanwhile)."""
        with self.wake:
            self.wake.wait_for(lambda: self.finished.is_set() or self.to_run >= count,
                               max(0.0, self.started_at + seconds_from_start - time.monotonic()))

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=30)


def _before_row_groups(batch: MiniBatch) -> str:
    """The batch's manifest line as raypar wrote it before slices named their row group: a plan
    left unfinished by that version goes on with its lines as written (they run as before)."""
    pieces = batch.payload.get("pieces") if batch.kind == "table" else None
    if not pieces or not any("row_group" in p for p in pieces):
        return ""
    payload = {**batch.payload, "pieces": [{k: v for k, v in p.items() if k != "row_group"} for p in pieces]}
    return MiniBatch(ordinal=batch.ordinal, kind=batch.kind, payload=payload, item_count=batch.item_count).to_json()
