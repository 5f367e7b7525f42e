"""The batches stored ahead of the one the live assembly writes next, in 25 bytes each.

A straggler (a batch waiting for its retry) can have a million small batches stored behind it.
Holding each one's Part (its batch ID, its part's name, a checksum string: about 400 bytes) made
the live assembly give up past 100,000 of them. Here each ordinal's place is a slot in arrays of
CHUNK ordinals (what it is, its part's name as an index, offset, size, CRC-32), allocated when a
batch of the chunk is stored and freed when the writing passes the chunk: the memory follows how
far ahead of the writing batches are stored, not how many there are.
"""

from __future__ import annotations

from array import array
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raypar.inputs.base import batch_id
from raypar.outputs.assembly import Part

CHUNK = 1 << 16  # ordinals per allocation (1.6 MiB)
SLOT_BYTES = 25  # per ordinal: kind 1 + name 4 + offset 8 + size 8 + crc 4

ABSENT = object()  # take(): not stored (yet)
_EMPTY, _PART, _PART_NO_CRC, _NOTHING = 0, 1, 2, 3  # _NOTHING: no rows, or failed for good


_FIELDS = [("kind", np.uint8), ("name", np.uint32), ("offset", np.int64), ("size", np.int64), ("crc", np.uint32)]


def _crc_values(crc: pa.Array) -> np.ndarray:
    """CRC-32s (8 hex digits each, as part_checksum() writes them) to their values: the column's text
    read as one hex string; any other spelling one by one. (take_next() spells them as
    part_checksum() does: where a record spells one otherwise, finish() finds it differs and the
    output is assembled from the ledger.)"""
    if len(crc) and pc.all(pc.equal(pc.utf8_length(crc), 8)).as_py():
        _, offsets, data = crc.buffers()
        start = int(np.frombuffer(offsets, np.int32)[crc.offset])
        try:
            text = bytes(memoryview(data)[start:start + 8 * len(crc)]).decode("ascii")
            return np.frombuffer(bytes.fromhex(text), ">u4").astype(np.uint32)
        except ValueError:  # (not hex digits, or not ASCII)
            pass
    return np.array([int(x, 16) for x in crc.to_pylist()], np.uint32)


class _Chunk:
    __slots__ = ("kind", "name", "offset", "size", "crc")

    def __init__(self):
        self.kind = bytearray(CHUNK)
        self.name = array("I", bytes(4 * CHUNK))
        self.offset = array("q", bytes(8 * CHUNK))
        self.size = array("q", bytes(8 * CHUNK))
        self.crc = array("I", bytes(4 * CHUNK))


class StoredAhead:
    """The batches stored from ``next`` on: take_next() gives ``next``'s Part (None: settled with no
    rows) and moves on, or ABSENT while it is not stored.

    Slots are places in the output: a batch's ordinal, or with ``ordinal_at`` (a job whose inputs
    were planned again: the ordinals in output order) its index there."""

    def __init__(self, ordinal_at: Optional[np.ndarray] = None):
        self.ordinal_at = ordinal_at
        self.next = 0
        self.chunks: dict[int, _Chunk] = {}
        self.names: list[str] = []  # part names: one per worker flush, many batches each
        self.name_index: dict[str, int] = {}
        self.sha256: dict[int, str] = {}  # records of before CRC-32 (none in a live session)
        self.count = 0  # ordinals stored from next on
        self.highest = -1  # the highest stored (in this session)

    def __len__(self) -> int:
        return self.count

    def ahead(self) -> int:
        """How far ahead of ``next`` a batch is stored (what the memory follows)."""
        return max(self.highest - self.next, 0)

    def put(self, ordinal: int, part: Optional[Sequence]) -> None:
        """``part``: [name, offset, bytes, sha256, crc32] as a worker's answer gives it, or None (no
        rows, or failed for good). A batch before ``next`` was written already: ignored."""
        if ordinal < self.next:
            return
        chunk = self.chunks.get(ordinal // CHUNK)
        if chunk is None:
            chunk = self.chunks[ordinal // CHUNK] = _Chunk()
        i = ordinal % CHUNK
        self.count += chunk.kind[i] == _EMPTY
        self.highest = max(self.highest, ordinal)
        self.sha256.pop(ordinal, None)
        if part is None:
            chunk.kind[i] = _NOTHING
            return
        name, offset, size, sha256, crc32 = part
        index = self._name_id(name)
        chunk.kind[i] = _PART if crc32 is not None else _PART_NO_CRC
        chunk.name[i], chunk.offset[i], chunk.size[i] = index, offset, size
        chunk.crc[i] = int(crc32, 16) if crc32 is not None else 0
        if sha256 is not None:
            self.sha256[ordinal] = sha256

    def put_done(self, done: pa.Table) -> None:
        """The batches done before the session (done_parts(rowless=True)'s columns), put CHUNK rows
        at a time with numpy: a put() per batch held Python's lock 2.6 s at a million, while the
        session's scheduler starts. Not counted by ahead(): a resume holds them all, however far
        ahead of the first batch it runs."""
        for rows in done.to_batches(max_chunksize=CHUNK):
            self._put_rows(rows)

    def _put_rows(self, rows: pa.RecordBatch) -> None:
        ordinals = rows.column("ordinal").to_numpy()
        if not (keep := ordinals >= self.next).all():
            rows, ordinals = rows.filter(pa.array(keep)), ordinals[keep]
        if not len(ordinals):
            return
        part = rows.column("part")
        part = part if pa.types.is_dictionary(part.type) else pc.dictionary_encode(part)
        # Only the names this slice uses: the dictionary is the whole column's (a name per batch
        # where each batch was a flush of its own).
        used, name_at = np.unique(part.indices.fill_null(0).to_numpy(), return_inverse=True)
        ids = np.array([self._name_id(name) for name in part.dictionary.take(pa.array(used)).to_pylist()]
                       if len(part.dictionary) else [0] * len(used), np.uint32)
        has_part = part.is_valid().to_numpy(zero_copy_only=False)
        crc = rows.column("part_crc32").cast(pa.string())
        has_crc = has_part & crc.is_valid().to_numpy(zero_copy_only=False)
        columns = {"kind": np.where(has_crc, _PART, np.where(has_part, _PART_NO_CRC, _NOTHING)).astype(np.uint8),
                   "name": ids[name_at],
                   "offset": rows.column("part_offset").fill_null(0).to_numpy(),
                   "size": rows.column("part_bytes").fill_null(0).to_numpy(),
                   "crc": _crc_values(crc.fill_null("00000000"))}
        sha256 = rows.column("part_sha256")
        for i in np.flatnonzero(sha256.is_valid().to_numpy(zero_copy_only=False) & has_part):
            self.sha256[int(ordinals[i])] = sha256[int(i)].as_py()
        order = np.argsort(ordinals, kind="stable")
        keys = ordinals[order] // CHUNK
        bounds = np.flatnonzero(np.diff(keys)) + 1
        for start, end in zip(np.r_[0, bounds], np.r_[bounds, len(keys)], strict=True):
            chunk = self.chunks.get(int(keys[start]))
            if chunk is None:
                chunk = self.chunks[int(keys[start])] = _Chunk()
            at = order[start:end]
            slots = ordinals[at] % CHUNK
            self.count += int((np.frombuffer(chunk.kind, np.uint8)[slots] == _EMPTY).sum())
            for field, dtype in _FIELDS:
                np.frombuffer(getattr(chunk, field), dtype)[slots] = columns[field][at]

    def _name_id(self, name: str) -> int:
        index = self.name_index.get(name)
        if index is None:
            index = self.name_index[name] = len(self.names)
            self.names.append(name)
        return index

    def take_next(self):
        """``next``'s Part, or None, and move on; ABSENT (and stay) while it is not stored. A chunk
        is freed when the writing passes its end."""
        key, i = divmod(self.next, CHUNK)
        chunk = self.chunks.get(key)
        if chunk is None or chunk.kind[i] == _EMPTY:
            return ABSENT
        ordinal, kind = self.next, chunk.kind[i]
        self.next += 1
        self.count -= 1
        if i == CHUNK - 1:
            del self.chunks[key]
        if kind == _NOTHING:
            return None
        crc = format(chunk.crc[i], "08x") if kind == _PART else None
        return Part(self.batch_at(ordinal), self.names[chunk.name[i]], chunk.offset[i], chunk.size[i],
                              self.sha256.pop(ordinal, None), crc)

    def batch_at(self, place: int) -> str:
        return batch_id(int(self.ordinal_at[place]) if self.ordinal_at is not None else place)

    def clear(self) -> None:
        """Let every stored batch go (``next`` stays)."""
        self.chunks.clear()
        self.sha256.clear()
        self.count, self.highest = 0, self.next - 1

    def nbytes(self) -> int:
        """What the slots hold in memory (the part names aside)."""
        return len(self.chunks) * CHUNK * SLOT_BYTES
