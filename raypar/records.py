"""Ledger records: their types, how they are sealed, and how workers store them.

A record is canonical JSON with the sha256 of that JSON appended as its last
key, so a torn, truncated or edited record is detected from its raw bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from .ledger import Ledger


def _sealed(body: dict) -> bytes:
    """JSON with a checksum of its own content, so torn or edited records are detected."""
    body = {k: v for k, v in body.items() if k != "sha256"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode()).hexdigest()
    # The checksum goes last; _unseal re-serializes the body without it, so its place does not matter.
    return (canonical[:-1] + ("," if body else "") + f'"sha256":"{digest}"}}').encode()


_SEAL_TAIL = len(b',"sha256":""}') + 64


def _verified(data: bytes) -> Optional[bytes]:
    """The canonical body bytes of a sealed record if it is whole and unmodified, else None.

    _sealed writes the canonical body with the checksum appended as the last
    key, so the check hashes the raw bytes: no parsing, no second serialization.
    """
    if len(data) < _SEAL_TAIL + 2 or data[-_SEAL_TAIL:-66] != b',"sha256":"' or not data.endswith(b'"}'):
        return None
    canonical = data[:-_SEAL_TAIL] + b"}"
    return canonical if hashlib.sha256(canonical).hexdigest().encode() == data[-66:-2] else None


def _unseal(data: bytes) -> Optional[dict]:
    """The record's body if it is whole and unmodified, else None."""
    canonical = _verified(data)
    if canonical is None:
        return _unseal_slow(data) if data[:1] == b"{" and b'"sha256":"' in data else None
    try:
        body = json.loads(canonical.decode())
    except (ValueError, UnicodeDecodeError):
        return None
    return body if isinstance(body, dict) else None


def _unseal_slow(data: bytes) -> Optional[dict]:
    """A sealed record whose checksum is not where _sealed puts it (edited by hand, reformatted)."""
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(body, dict):
        return None
    claimed = body.pop("sha256", None)
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return body if claimed == hashlib.sha256(canonical.encode()).hexdigest() else None


def attempt_name(batch: str, run: str, attempt: int) -> str:
    return f"{batch}~{run}~{attempt}"


@dataclass(frozen=True)
class DoneRecord:
    batch: str
    run: str
    attempt: int
    items: int
    returned: int
    part: Optional[str]  # file name under parts/, None in summary-only jobs
    part_offset: int = 0
    part_bytes: int = 0
    part_sha256: Optional[str] = None
    node: Optional[str] = None
    worker: Optional[str] = None
    seconds: float = 0.0
    started: Optional[float] = None

    @property
    def failed_items(self) -> int:
        return max(self.items - self.returned, 0)


@dataclass(frozen=True)
class FailedRecord:
    batch: str
    run: str
    attempt: int
    error: str
    kind: str  # "user" (run() raised), "system" (worker lost), "timeout"
    final: bool  # True when the batch's tries are spent
    node: Optional[str] = None
    worker: Optional[str] = None
    started: Optional[float] = None
    items: Optional[int] = None  # rows of a table batch, once read (the manifest may not know them)


class DoneWriter:
    """Records finished batches for one worker process: rows first, then the sealed record.

    ``written`` counts the records written, ``durable`` those of them stored (the first
    ``durable`` in the order written); ``position`` is where a reader finds the records written after that point
    (see :meth:`raypar.ledger.Ledger.recent_done`).
    """

    written = 0
    durable = 0
    position = 0

    def write(self, record: DoneRecord, rows: Optional[bytes]) -> DoneRecord:
        raise NotImplementedError

    def due(self) -> bool:
        """Whether buffered records should be stored now."""
        return False

    def flush(self) -> None:
        """Store every buffered record."""


class SegmentWriter(DoneWriter):
    """Local disk: appends rows and records to this worker's own two segment files."""

    def __init__(self, ledger: Ledger, writer: str):
        self.store, self.name = ledger.store, writer
        self.rows = self.records = None
        self.offset = 0

    def _open(self) -> None:
        for folder in ("parts", "done"):
            os.makedirs(self.store.path(folder), exist_ok=True)
        # "xb": the name is this process's alone; an existing file means a bug, never a merge.
        self.rows = open(self.store.path("parts", f"{self.name}.data"), "xb")
        self.records = open(self.store.path("done", f"{self.name}.jsonl"), "xb")

    def write(self, record: DoneRecord, rows: Optional[bytes]) -> DoneRecord:
        if self.records is None:
            self._open()
        if rows is not None:
            self.rows.write(rows)
            self.rows.flush()  # in the OS before the record that points at it
            record = replace(record, part=f"{self.name}.data", part_offset=self.offset, part_bytes=len(rows),
                             part_sha256=hashlib.sha256(rows).hexdigest())
            self.offset += len(rows)
        self.records.write(_sealed(record.__dict__) + b"\n")
        self.records.flush()
        self.written += 1
        self.durable += 1
        self.position = self.records.tell()
        return record


# A segment object: the batches' rows back to back, their sealed records (one per line), then
# a trailer giving where the records start and how long they are, and a magic word.
_TRAILER = struct.Struct(">QQ8s")
SEGMENT_MAGIC = b"rpseg001"
SEGMENT_SUFFIX = ".seg"


def encode_segment(rows: bytes, records: list[bytes]) -> bytes:
    block = b"".join(r + b"\n" for r in records)
    return rows + block + _TRAILER.pack(len(rows), len(block), SEGMENT_MAGIC)


def segment_records_span(size: int, tail: bytes) -> Optional[tuple[int, int]]:
    """(start, end) of a segment's records block, from the segment's ``size`` and its last bytes;
    None when the segment is not whole (a torn or foreign object counts as never written)."""
    if len(tail) < _TRAILER.size:
        return None
    start, length, magic = _TRAILER.unpack(tail[-_TRAILER.size:])
    if magic != SEGMENT_MAGIC or start + length + _TRAILER.size != size:
        return None
    return start, start + length


def segment_name(writer: str, seq: int) -> str:
    return f"{writer}~{seq:06d}{SEGMENT_SUFFIX}"


class ObjectSegmentWriter(DoneWriter):
    """Object stores: buffers finished batches and stores them as one segment object per flush.

    A PUT is atomic and an object cannot be appended to, so per-batch objects would cost two
    requests per batch (and a listing entry each, forever). A flush happens when ``flush_batches``
    records or ``flush_bytes`` of rows are buffered, when the oldest buffered record is
    ``flush_seconds`` old (a thread watches the clock, so a long-running batch does not hold
    the records of the ones before it), and whenever the driver asks (an idle worker, a stop).
    """

    def __init__(self, ledger: Ledger, writer: str, limits: dict):
        self.store, self.writer, self.limits = ledger.store, writer, limits
        self.rows: list[bytes] = []
        self.records: list[bytes] = []
        self.size = 0
        self.oldest: Optional[float] = None
        self.lock = threading.Lock()
        self.failure: Optional[BaseException] = None  # of a flush by the clock thread: raised to the caller
        self.clock: Optional[threading.Thread] = None

    def write(self, record: DoneRecord, rows: Optional[bytes]) -> DoneRecord:
        with self.lock:
            if rows is not None:
                record = replace(record, part=segment_name(self.writer, self.position), part_offset=self.size,
                                 part_bytes=len(rows), part_sha256=hashlib.sha256(rows).hexdigest())
                self.rows.append(rows)
                self.size += len(rows)
            self.records.append(_sealed(record.__dict__))
            self.written += 1
            if self.oldest is None:
                self.oldest = time.monotonic()
            if self._due():
                self._flush()
        self._start_clock()
        return record

    def due(self) -> bool:
        with self.lock:
            return self._due()

    def _due(self) -> bool:
        if not self.records:
            return False
        return len(self.records) >= self.limits["flush_batches"] or self.size >= self.limits["flush_bytes"] \
            or time.monotonic() - self.oldest >= self.limits["flush_seconds"]

    def flush(self) -> None:
        with self.lock:
            self._flush()

    def _flush(self) -> None:
        if self.failure is not None:
            failure, self.failure = self.failure, None
            raise failure
        if not self.records:
            return
        data = encode_segment(b"".join(self.rows), self.records)
        self.store.write_once(data, "parts", segment_name(self.writer, self.position))
        self.durable += len(self.records)
        self.position += 1
        self.rows, self.records, self.size, self.oldest = [], [], 0, None

    def _start_clock(self) -> None:
        if self.clock is None and 0 < self.limits["flush_seconds"] < float("inf"):
            self.clock = threading.Thread(target=self._tick, name="raypar-segment-flush", daemon=True)
            self.clock.start()

    def _tick(self) -> None:
        period = self.limits["flush_seconds"] / 2
        while True:
            time.sleep(period)
            with self.lock:
                if self.failure is None and self._due():
                    try:
                        self._flush()
                    except BaseException as exc:  # noqa: BLE001 - the next write or flush raises it
                        self.failure = exc
