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

from raypar.inputs.base import batch_id
from raypar.outputs.assembly import Part

CHUNK = 1 << 16  # ordinals per allocation (1.6 MiB)
SLOT_BYTES = 25  # per ordinal: kind 1 + name 4 + offset 8 + size 8 + crc 4

ABSENT = object()  # take(): not stored (yet)
_EMPTY, _PART, _PART_NO_CRC, _NOTHING = 0, 1, 2, 3  # _NOTHING: no rows, or failed for good


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
    rows) and moves on, or ABSENT while it is not stored."""

    def __init__(self):
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

    def put(self, ordinal: int, part: Optional[Sequence], ahead: bool = True) -> None:
        """``part``: [name, offset, bytes, sha256, crc32] as a worker's answer gives it, or None (no
        rows, or failed for good). A batch before ``next`` was written already: ignored.
        ``ahead=False``: a batch done before the session, which ahead() does not count (a resume
        holds them all, however far ahead of the first batch it runs)."""
        if ordinal < self.next:
            return
        chunk = self.chunks.get(ordinal // CHUNK)
        if chunk is None:
            chunk = self.chunks[ordinal // CHUNK] = _Chunk()
        i = ordinal % CHUNK
        self.count += chunk.kind[i] == _EMPTY
        if ahead:
            self.highest = max(self.highest, ordinal)
        self.sha256.pop(ordinal, None)
        if part is None:
            chunk.kind[i] = _NOTHING
            return
        name, offset, size, sha256, crc32 = part
        index = self.name_index.get(name)
        if index is None:
            index = self.name_index[name] = len(self.names)
            self.names.append(name)
        chunk.kind[i] = _PART if crc32 is not None else _PART_NO_CRC
        chunk.name[i], chunk.offset[i], chunk.size[i] = index, offset, size
        chunk.crc[i] = int(crc32, 16) if crc32 is not None else 0
        if sha256 is not None:
            self.sha256[ordinal] = sha256

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
        return Part(batch_id(ordinal), self.names[chunk.name[i]], chunk.offset[i], chunk.size[i],
                              self.sha256.pop(ordinal, None), crc)

    def clear(self) -> None:
        """Let every stored batch go (``next`` stays)."""
        self.chunks.clear()
        self.sha256.clear()
        self.count, self.highest = 0, self.next - 1

    def nbytes(self) -> int:
        """What the slots hold in memory (the part names aside)."""
        return len(self.chunks) * CHUNK * SLOT_BYTES
