"""Ledger records: their types, how they are sealed, and how workers append them.

A record is canonical JSON with the sha256 of that JSON appended as its last
key, so a torn, truncated or edited record is detected from its raw bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
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
    """Records finished batches for one worker process: rows first, then the sealed record."""

    def write(self, record: DoneRecord, rows: Optional[bytes]) -> DoneRecord:
        raise NotImplementedError


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
        return record


class ObjectWriter(DoneWriter):
    """Object stores: one object for the rows, then one for the record (each PUT is atomic)."""

    def __init__(self, ledger: Ledger):
        self.ledger = ledger

    def write(self, record: DoneRecord, rows: Optional[bytes]) -> DoneRecord:
        if rows is not None:
            part = self.ledger.write_part(attempt_name(record.batch, record.run, record.attempt), rows)
            record = replace(record, part=part, part_offset=0, part_bytes=len(rows),
                             part_sha256=hashlib.sha256(rows).hexdigest())
        self.ledger.record_done(record)
        return record
