"""Ledger records: their types, how they are sealed and checked, and the segment format.

A leaf module (no raypar imports): the writers that store records are in raypar/jobdir/writers.py.

A record is canonical JSON with the sha256 of that JSON appended as its last
key, so a torn, truncated or edited record is detected from its raw bytes.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from dataclasses import dataclass
from typing import Optional


def _sealed(body: dict) -> bytes:
    """JSON with a checksum of its own content, so torn or edited records are detected."""
    body = {k: v for k, v in body.items() if k != "sha256"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode()).hexdigest()
    # The checksum goes last; _unseal re-serializes the body without it, so its place does not matter.
    return (canonical[:-1] + ("," if body else "") + f'"sha256":"{digest}"}}').encode()


_SEAL_TAIL = len(b',"sha256":""}') + 64


def _verified(data: bytes) -> Optional[bytes]:
    """The canonical body bytes of a sealed record if it is whole and unmodified, else None."""
    return data[:-_SEAL_TAIL] + b"}" if seal_intact(data) else None


def seal_intact(data: bytes) -> bool:
    """A sealed record is whole and unmodified, as _sealed wrote it.

    _sealed writes the canonical body with the checksum appended as the last
    key, so the check hashes the raw bytes: no parsing, no second serialization, no copy.
    """
    if len(data) < _SEAL_TAIL + 2 or data[-_SEAL_TAIL:-66] != b',"sha256":"' or not data.endswith(b'"}'):
        return False
    digest = hashlib.sha256(memoryview(data)[:-_SEAL_TAIL])
    digest.update(b"}")
    return digest.hexdigest().encode() == data[-66:-2]


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


def unseal_all(chunks: list[bytes]) -> list[dict]:
    """The bodies of the whole, unmodified records among ``chunks``, in order (torn or edited ones
    left out). The verified ones are parsed as one JSON array: a segment of 10,000 records is one
    parse instead of 10,000 (json.loads' own cost per call is most of a small record's)."""
    verified = [_verified(c) for c in chunks]
    whole = [v for v in verified if v is not None]
    try:
        parsed = json.loads(b"[" + b",".join(whole) + b"]")
    except ValueError:  # a hash-verified record that is not JSON: only a bug writes one
        parsed = None
    if parsed is None or len(parsed) != len(whole):  # (a record of two values, sealed by hand)
        return [b for b in map(_unseal, chunks) if b is not None]
    bodies = iter(parsed)
    out = []
    for chunk, canonical in zip(chunks, verified, strict=True):
        body = next(bodies) if canonical is not None else _unseal(chunk) if chunk else None
        if isinstance(body, dict):
            out.append(body)
    return out


def verified_lines(chunks: list[bytes]) -> list[bytes]:
    """The canonical body bytes (JSON) of the whole, unmodified records among ``chunks``, in order;
    a record whose checksum is not where _sealed puts it (edited by hand, reformatted) is given
    in canonical form too. Torn or edited records are left out."""
    out = []
    for chunk in chunks:
        body = _verified(chunk)
        if body is None and chunk[:1] == b"{" and b'"sha256":"' in chunk:
            slow = _unseal_slow(chunk)
            body = None if slow is None else json.dumps(slow, sort_keys=True, separators=(",", ":")).encode()
        if body is not None:
            out.append(body)
    return out


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


def part_checksum(rows: bytes) -> str:
    """A part's checksum, as its done record holds it (``part_crc32``): CRC-32, as object stores use to
    check what they store. It detects a torn or corrupted part; nobody who can rewrite a part can be kept
    from rewriting its record too. Computed by the worker and again when the output is assembled: sha256
    (what records before it hold) cost 0.51 CPU-s per GB here, each time; CRC-32 0.15."""
    return format(zlib.crc32(rows), "08x")


def part_intact(data: bytes, crc32: Optional[str], sha256: Optional[str]) -> bool:
    """``data`` is the part its done record describes (by the checksum the record holds)."""
    if crc32 is not None:
        return part_checksum(data) == crc32
    return sha256 is None or hashlib.sha256(data).hexdigest() == sha256


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
    part_sha256: Optional[str] = None  # of parts written before part_crc32 (still checked)
    node: Optional[str] = None
    worker: Optional[str] = None
    seconds: float = 0.0
    started: Optional[float] = None
    # Items run() reported failed (raypar.item_failed): how many, and which, as JSON
    # {error: [position in the batch, ...]} (a file's place in the batch, a table row's).
    reported: int = 0
    failed: Optional[str] = None
    part_crc32: Optional[str] = None  # of the rows (part_checksum), checked when the output is assembled

    @property
    def failed_items(self) -> int:
        return max(self.items - self.returned, self.reported, 0)


@dataclass(frozen=True, slots=True)  # no per-record __dict__: a failing job may hold millions
class FailedRecord:
    batch: str
    run: str
    attempt: int
    error: str
    kind: str  # "user" (run() raised), "system" (worker lost), "timeout", "storage" (the job dir refused
    # the result), "raypar" (raypar's own code raised in the worker)
    final: bool  # True when the batch's tries are spent
    node: Optional[str] = None
    worker: Optional[str] = None
    started: Optional[float] = None
    items: Optional[int] = None  # rows of a table batch, once read (the manifest may not know them)

    def fields(self) -> dict:
        """The record as the plain dict that is stored."""
        return {name: getattr(self, name) for name in self.__slots__}


# A segment object: the batches' rows back to back, their sealed records (one per line), then
# a trailer giving where the records start and how long they are, and a magic word.
_TRAILER = struct.Struct(">QQ8s")
SEGMENT_MAGIC = b"rpseg001"


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
