"""Mini-batches read before their turn (``raypar.prefetch``).

While ``run()`` works on one mini-batch, the driver tells the worker which
batches are queued behind it; the actor's "aside" thread reads them (decodes
table rows, fetches remote files) and the batch's own call takes what was read.
A read ahead is only a head start: a batch whose read failed, or whose hint
came after its call began, is read by its call as if there were no read ahead,
so a read error is reported as the batch's own, with the same tries.

Memory is bounded: the driver hints at most ``raypar.prefetch`` batches per
worker, and this keeps at most ``keep`` reads (a read whose call the driver took
back is freed then, or as it ends if it was still reading).
"""

from __future__ import annotations

import collections
import threading
from typing import Any, Optional

from raypar.inputs.base import BatchReader, MiniBatch
from raypar.inputs.files import cleanup

_TAKEN = None  # a batch whose call took it (read there, or read ahead): a late hint reads nothing


class _Read:
    def __init__(self):
        self.done = threading.Event()
        self.result: Optional[tuple] = None  # what BatchReader.read gives; None: the call reads it
        self.dropped = False  # its call was taken back while it read: it frees what it read itself


class ReadAhead:
    def __init__(self, reader: BatchReader, keep: int):
        self.reader = reader
        self.keep = max(keep, 1) + 1  # room for the reads hinted, and one taken-back read's place
        self.reads: collections.OrderedDict[str, Optional[_Read]] = collections.OrderedDict()
        self.lock = threading.Lock()

    def prefetch(self, batch: MiniBatch) -> None:
        """Read ``batch`` now (on the actor's aside thread): its call will take the result."""
        entry = _Read()
        with self.lock:
            if batch.id in self.reads:
                return  # its call began already, or a hint came twice
            self.reads[batch.id] = entry
            self._bound()
        try:
            entry.result = self.reader.read(batch)
        except BaseException:  # noqa: BLE001 - the call reads it again and reports the error as the batch's
            entry.result = None
        finally:
            with self.lock:  # with drop(): a read ends either before it is dropped or knowing it was
                entry.done.set()
                dropped = entry.dropped
            if dropped and entry.result is not None:
                cleanup(entry.result[2])

    def read(self, batch: MiniBatch) -> tuple[Any, Any, Optional[str]]:
        """What ``BatchReader.read`` gives for ``batch``: read ahead, else read now."""
        with self.lock:
            entry = self.reads.pop(batch.id, _TAKEN)
            self.reads[batch.id] = _TAKEN
            self._bound()
        if entry is not _TAKEN:
            entry.done.wait()
            if entry.result is not None:
                return entry.result
        return self.reader.read(batch)

    def drop(self, batch_id: str) -> None:
        """The driver took ``batch_id``'s call back: free what was read for it (a read still in
        progress frees it when it ends)."""
        with self.lock:
            entry = self.reads.get(batch_id)
            if entry is _TAKEN or entry is None:
                return
            del self.reads[batch_id]
            if not entry.done.is_set():
                entry.dropped = True
                return
        if entry.result is not None:
            cleanup(entry.result[2])

    def close(self) -> None:
        """The worker stops: remove what reads that no call took left on disk."""
        with self.lock:
            entries, self.reads = list(self.reads.values()), collections.OrderedDict()
        for entry in entries:
            if entry is not _TAKEN and entry.done.is_set() and entry.result is not None:
                cleanup(entry.result[2])

    def _bound(self) -> None:
        # The oldest go first: marks of batches taken long ago, then reads whose call the driver
        # took back. (With one aside thread, every read older than the newest one has finished.)
        while len(self.reads) > self.keep:
            _, entry = self.reads.popitem(last=False)
            if entry is not _TAKEN and entry.done.is_set() and entry.result is not None:
                cleanup(entry.result[2])
