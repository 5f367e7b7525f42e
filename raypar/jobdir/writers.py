"""How a worker process stores its done records and rows in the job dir, and how a reader finds
what one worker stored: appended segment files where the store appends (local disk), segment
objects where it does not (object stores). See raypar/jobdir/ledger.py."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import replace
from typing import Optional

from raypar.jobdir.layout import segment_name
from raypar.jobdir.records import DoneRecord, _sealed, encode_segment, part_checksum, segment_records_span
from raypar.jobdir.store import Store

SEGMENT_TAIL = 64 * 1024  # bytes read from a segment's end to find its records


class DoneWriter:
    """Records finished batches for one worker process: rows first, then the sealed record.

    ``written`` counts the records written, ``durable`` those of them stored (the first
    ``durable`` in the order written); ``position`` is where a reader finds the records written after that point
    (see :meth:`raypar.jobdir.ledger.Ledger.recent_done`).
    """

    written = 0
    durable = 0
    position = 0

    def progress(self) -> tuple[int, int]:
        """(``durable``, ``position``), read together."""
        return self.durable, self.position

    def write(self, record: DoneRecord, rows: Optional[bytes]) -> DoneRecord:
        raise NotImplementedError

    def flush(self) -> None:
        """Store every buffered record."""

    @staticmethod
    def records_after(store: Store, writer: str, position: int) -> list[bytes]:
        """The record lines ``writer`` stored after ``position`` (torn ones included: the caller checks)."""
        raise NotImplementedError


class SegmentWriter(DoneWriter):
    """Local disk: appends rows and records to this worker's own two segment files."""

    def __init__(self, store: Store, writer: str, limits: Optional[dict] = None):
        self.store, self.name = store, writer  # limits: each record is stored as it is written
        self.rows = self.records = None
        self.offset = 0

    def _open(self) -> None:
        for folder in ("parts", "done"):
            os.makedirs(self.store.local_path(folder), exist_ok=True)
        # "xb": the name is this process's alone; an existing file means a bug, never a merge.
        self.rows = open(self.store.local_path("parts", f"{self.name}.data"), "xb")
        self.records = open(self.store.local_path("done", f"{self.name}.jsonl"), "xb")

    @staticmethod
    def records_after(store: Store, writer: str, position: int) -> list[bytes]:
        try:
            return store.read_range(store.path("done", f"{writer}.jsonl"), position).split(b"\n")
        except FileNotFoundError:
            return []

    def write(self, record: DoneRecord, rows: Optional[bytes]) -> DoneRecord:
        if self.records is None:
            self._open()
        if rows is not None:
            self.rows.write(rows)
            self.rows.flush()  # in the OS before the record that points at it
            record = replace(record, part=f"{self.name}.data", part_offset=self.offset, part_bytes=len(rows),
                             part_crc32=part_checksum(rows))
            self.offset += len(rows)
        self.records.write(_sealed(record.__dict__) + b"\n")
        self.records.flush()
        self.written += 1
        self.durable += 1
        self.position = self.records.tell()
        return record


class ObjectSegmentWriter(DoneWriter):
    """Object stores: buffers finished batches and stores them as one segment object per flush.

    A PUT is atomic and an object cannot be appended to, so per-batch objects would cost two
    requests per batch (and a listing entry each, forever). A flush happens when ``flush_batches``
    records or ``flush_bytes`` of rows are buffered, when the oldest buffered record is
    ``flush_seconds`` old (a thread watches the clock, so a long-running batch does not hold
    the records of the ones before it), and whenever the driver asks (an idle worker, a stop).

    The clock's thread cuts the buffer and stores it while the worker goes on writing into a fresh
    one: a PUT of megabytes of rows never holds up run(). A buffer that fills is handed to that
    thread too (woken at once); the worker waits only when it fills another while the one before
    is still being stored, so memory stays near twice ``flush_bytes``. (Without a clock,
    ``flush_seconds`` 0, every batch is stored as it is written, by the worker.) Segments are
    stored one at a time, in the order cut (``storing``); a cut whose PUT failed is kept and stored
    first next time, under the same name, so the records that name it stay right.
    """

    def __init__(self, store: Store, writer: str, limits: dict):
        self.store, self.writer, self.limits = store, writer, limits
        self.rows: list[bytes] = []
        self.records: list[bytes] = []
        self.size = 0
        self.oldest: Optional[float] = None
        self.next = 0  # the number of the segment the buffered records go to
        self.cut: Optional[tuple[int, bytes, int]] = None  # (number, bytes, records) cut, not yet stored
        self.lock = threading.Lock()  # the buffer and the counts
        self.stored = threading.Condition(self.lock)  # notified when a cut is stored, or its PUT failed
        self.wake = threading.Event()  # a full buffer for the clock's thread to store now
        self.storing = threading.Lock()  # taken before ``lock``, never after: one PUT at a time, in order
        self.failure: Optional[BaseException] = None  # of a flush by the clock thread: raised to the caller
        self.clock: Optional[threading.Thread] = None

    @property
    def position(self) -> int:
        """Where the records after the durable ones start: the segment being stored, if one is."""
        return self.cut[0] if self.cut is not None else self.next

    def progress(self) -> tuple[int, int]:
        with self.lock:
            return self.durable, self.position

    def write(self, record: DoneRecord, rows: Optional[bytes]) -> DoneRecord:
        with self.lock:
            if rows is not None:
                record = replace(record, part=segment_name(self.writer, self.next), part_offset=self.size,
                                 part_bytes=len(rows), part_crc32=part_checksum(rows))
                self.rows.append(rows)
                self.size += len(rows)
            self.records.append(_sealed(record.__dict__))
            self.written += 1
            if self.oldest is None:
                self.oldest = time.monotonic()
            # Full: handed to the clock's thread. Old: the clock's to store. Without a clock
            # (flush_seconds 0: every batch at once) this thread stores it.
            full = self._full()
            due = full or self._old()
        if due and not self._clocked():
            self._store_buffered()
        self._start_clock()
        if full and self._clocked():
            self._hand_over()
        return record

    def _hand_over(self) -> None:
        """A full buffer: the clock's thread stores it while run() goes on. This thread waits only
        while the segment cut before it is still being stored (one in flight, one filling), and
        raises that one's failure."""
        with self.lock:
            while self.cut is not None and self.failure is None:
                self.stored.wait()
            if self.failure is None:
                if self.records:  # cut here, so a segment holds at most flush_batches (a flush may have taken them)
                    self._cut()
                self.wake.set()
                return
        self._store_buffered()  # raises the failure: the caller reports its batch not stored

    def _full(self) -> bool:
        return bool(self.records) and (len(self.records) >= self.limits["flush_batches"]
                                       or self.size >= self.limits["flush_bytes"])

    def _old(self) -> bool:
        return self.oldest is not None and time.monotonic() - self.oldest >= self.limits["flush_seconds"]

    def _clocked(self) -> bool:
        return 0 < self.limits["flush_seconds"] < float("inf")

    def flush(self) -> None:
        self._store_buffered()

    def _store_buffered(self, drain: bool = True) -> None:
        """Store the segment cut before and not stored yet, then cut and store what is buffered,
        until nothing is (``drain=False``: one segment, what the clock stores); raises the clock
        thread's failure first, if it had one."""
        with self.storing:
            with self.lock:
                failure, self.failure = self.failure, None
            if failure is not None:
                raise failure
            while True:
                with self.lock:
                    if self.cut is None and self.records:
                        self._cut()
                    cut = self.cut
                if cut is None:
                    return
                number, data, count = cut
                self.store.write_once(data, "parts", segment_name(self.writer, number))  # not under ``lock``
                with self.lock:
                    self.durable += count
                    self.cut = None
                    self.stored.notify_all()
                if not drain:
                    return

    def _cut(self) -> None:
        """Under ``lock``: what is buffered becomes the next segment, to be stored."""
        self.cut = (self.next, encode_segment(b"".join(self.rows), self.records), len(self.records))
        self.next += 1
        self.rows, self.records, self.size, self.oldest = [], [], 0, None

    @staticmethod
    def records_after(store: Store, writer: str, position: int) -> list[bytes]:
        lines: list[bytes] = []
        seq = position
        while True:  # a writer's segments are stored one after the other, numbered from 0
            path = store.path("parts", segment_name(writer, seq))
            try:
                size = store.size(path)
            except FileNotFoundError:
                return lines
            lines.extend(segment_records(store, {path: size}).get(path, []))
            seq += 1

    def _start_clock(self) -> None:
        if self.clock is None and self._clocked():
            self.clock = threading.Thread(target=self._tick, name="raypar-segment-flush", daemon=True)
            self.clock.start()

    def _tick(self) -> None:
        period = self.limits["flush_seconds"] / 2
        while True:
            self.wake.wait(period)  # a full buffer wakes it at once
            self.wake.clear()
            with self.lock:  # a cut handed over (or one whose PUT failed, stored again) comes first
                due = self.failure is None and (self.cut is not None or self._old() or self._full())
            if due:
                try:
                    self._store_buffered(drain=False)
                except BaseException as exc:  # noqa: BLE001 - the next write or flush raises it
                    with self.lock:
                        self.failure = exc
                        self.stored.notify_all()


class FailedLog:
    """A driver session's failed records, stored a batch of them at a time as segment files of
    sealed lines (``failed/<run>~fNNNNN/<run>~NNNNNN.jsonl``, one after the other, so a compaction
    can close a folder: see raypar/jobdir/segment_folders.py), not one file each: on an object store a flood
    of failures (a bad tenth of a million inputs, each tried three times) cost a PUT each in the
    scheduler's loop and a GET each in every later view.

    Stored when ``limit`` records are gathered, when the oldest is ``seconds`` old (the driver's
    upkeep calls :meth:`flush` with ``due_only`` after every scheduler step), and before the
    session reads the ledger. A driver that dies loses at most those records: their batches have
    no done record, so a resume runs them again, as it runs every failed batch; only their
    history (status, reports) is short of them.
    """

    def __init__(self, store: Store, run: str, seconds: float, limit: int, first: int = 0):
        self.store, self.run, self.seconds, self.limit = store, run, seconds, limit
        self.lines: list[bytes] = []
        self.oldest: Optional[float] = None
        self.next = first  # the number of the next segment
        self.stored = 0  # records stored so far
        self.lock = threading.Lock()

    def add(self, body: dict) -> None:
        with self.lock:
            self.lines.append(_sealed(body))
            if self.oldest is None:
                self.oldest = time.monotonic()
            full = len(self.lines) >= self.limit
        if full:
            self.flush()

    def flush(self, due_only: bool = False) -> None:
        with self.lock:
            if not self.lines or (due_only and time.monotonic() - self.oldest < self.seconds):
                return
            data = b"".join(line + b"\n" for line in self.lines)
            self.store.write_once(data, "failed", *segment_name(self.run, self.next, ".jsonl").split("/"))
            self.next += 1
            self.stored += len(self.lines)
            self.lines, self.oldest = [], None


def writer_for(store: Store) -> type[DoneWriter]:
    """How a worker stores its records on ``store``: appended where the store appends."""
    return SegmentWriter if store.appends else ObjectSegmentWriter


def segment_records(store: Store, sizes: dict[str, int]) -> dict[str, list[bytes]]:
    """{path: its sealed record lines} for whole segment objects among ``sizes`` ({path: size}).

    One ranged read of each segment's last 64 KiB, concurrently (the records of about 180
    batches fit), and a second one of exactly the records where they are longer.
    """
    paths = [p for p, size in sizes.items() if size]
    starts = [max(sizes[p] - SEGMENT_TAIL, 0) for p in paths]
    tails = store.read_ranges(paths, starts, [sizes[p] for p in paths])
    out, longer = {}, []
    for path, start, tail in zip(paths, starts, tails, strict=True):
        if isinstance(tail, FileNotFoundError):
            continue
        if isinstance(tail, BaseException):
            raise tail
        span = segment_records_span(sizes[path], tail)
        if span is None:
            continue  # torn, or not a segment: never counted
        if span[0] >= start:
            out[path] = tail[span[0] - start:span[1] - start].split(b"\n")[:-1]
        else:
            longer.append((path, span))
    blocks = store.read_ranges([p for p, _ in longer], [s for _, (s, _e) in longer], [e for _, (_s, e) in longer])
    for (path, _), block in zip(longer, blocks, strict=True):
        if isinstance(block, BaseException):
            raise block
        out[path] = block.split(b"\n")[:-1]
    return out
