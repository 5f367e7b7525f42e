"""The batches waiting to run, held packed so that ten million fit in a driver's memory."""

from __future__ import annotations

import collections
import zlib
from array import array
from typing import Iterable, Sequence

from raypar.inputs.base import QueuedBatch

# Planned batches are packed this many at a time: one pack is unpacked at the head of the queue.
PACK_SIZE = 4096


class PendingQueue:
    """The pending batches in the order they run: batches put back (retries, batches a lost
    worker held) first, then the planned ones in the order they were planned.

    A ``QueuedBatch`` and its manifest line cost about 240 bytes; a job may hold millions. So the
    planned batches are packed ``PACK_SIZE`` at a time, as their ordinals and their lines
    zlib-compressed together (manifest lines repeat their keys and paths: about 16 bytes a
    batch in all), and only the pack at the head of the queue is unpacked. Packing and
    unpacking cost about half a microsecond a batch.
    """

    def __init__(self, batches: Iterable[QueuedBatch] = ()):
        self.front: collections.deque[QueuedBatch] = collections.deque()  # put back: taken first
        self.head: collections.deque[QueuedBatch] = collections.deque()  # the pack being taken, unpacked
        self.packs: collections.deque[tuple[array, bytes]] = collections.deque()  # (ordinals, lines)
        self.tail: collections.deque[QueuedBatch] = collections.deque()  # planned, fewer than a pack
        self.count = 0
        self.extend(batches)

    def __len__(self) -> int:
        return self.count

    def __bool__(self) -> bool:
        return self.count > 0

    def __iter__(self):
        """Every queued batch in order, without taking any (unpacks each pack on the way)."""
        yield from self.front
        yield from self.head
        for pack in self.packs:
            yield from _unpack(pack)
        yield from self.tail

    def extend(self, batches: Iterable[QueuedBatch]) -> None:
        """Queue ``batches`` after every batch queued, in their order."""
        for batch in batches:
            self.tail.append(batch)
            self.count += 1
            if len(self.tail) >= PACK_SIZE:
                self._pack_tail()

    def extend_lines(self, ordinals: Sequence[int], lines: list[bytes]) -> None:
        """Queue planned batches given as their ordinals and manifest lines, after every batch
        queued: packed as given, with no object made per batch."""
        if self.tail:
            self._pack_tail()  # queued before these
        for k in range(0, len(lines), PACK_SIZE):
            self.packs.append((array("q", ordinals[k:k + PACK_SIZE]), zlib.compress(b"\n".join(lines[k:k + PACK_SIZE]), 1)))
        self.count += len(lines)

    def appendleft(self, batch: QueuedBatch) -> None:
        """Put ``batch`` back in front: it runs next."""
        self.front.appendleft(batch)
        self.count += 1

    def extendleft(self, batches: Iterable[QueuedBatch]) -> None:
        """As ``deque.extendleft``: each batch in front of the one before it."""
        for batch in batches:
            self.appendleft(batch)

    def first(self) -> QueuedBatch:
        """The batch that runs next, left in the queue."""
        return self.front[0] if self.front else self._head()[0]

    def popleft(self) -> QueuedBatch:
        """Take the batch that runs next."""
        batch = self.front.popleft() if self.front else self._head().popleft()
        self.count -= 1
        return batch

    def _head(self) -> collections.deque[QueuedBatch]:
        if not self.head:
            if self.packs:
                self.head.extend(_unpack(self.packs.popleft()))
            else:
                self.head, self.tail = self.tail, self.head  # what is left was never packed
        if not self.head:
            raise IndexError("the queue is empty")
        return self.head

    def _pack_tail(self) -> None:
        ordinals = array("q", (b.ordinal for b in self.tail))
        lines = zlib.compress("\n".join(b.to_json() for b in self.tail).encode(), 1)
        self.packs.append((ordinals, lines))
        self.tail.clear()


def _unpack(pack: tuple[array, bytes]) -> list[QueuedBatch]:
    ordinals, packed = pack
    lines = zlib.decompress(packed).decode().split("\n")  # a manifest line holds no newline (JSON)
    return [QueuedBatch(ordinal, line) for ordinal, line in zip(ordinals, lines, strict=True)]
