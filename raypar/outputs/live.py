"""The append_row_to file, written while the batches run (``raypar.assemble_while_running``).

Runs on the driver, in a thread of its own. The scheduler says which batches are stored (their
part is durable) and which failed for good; the thread writes each stored batch's part as soon as
every batch before it is settled, in batch order, into the same temporary file assemble() would
write. When the session ends, finish() checks that what was written is exactly the first parts of
the ledger's final view, writes the rest from that view and publishes: only the tail is left for
after the last batch. The file is byte for byte what assemble() writes from the ledger.

Anything it cannot vouch for gives up, and the driver assembles from the ledger as before: a part
whose schema would change the output's (assemble() unifies every part's schema first, this writes
the first part's), a part failing its checksum (assemble() names it, and the batch runs again), a
stored batch the view does not hold as written. A resumed session's output begins with rows of
batches done before it: the thread first reads where they are from the ledger, and they wait with
the others. Where a revision changed the output order (inputs planned again: their replacements
take the retired batches' place), batches wait by their place in that order, not their ordinal.

The batches stored behind one that is not (a straggler, a batch waiting for its retry while a
million small ones finish) wait in 25 bytes each (ahead.py) and are written once it is stored. When
one is stored more than MAX_AHEAD batches ahead of the one written next, it stops writing and lets
them go: what it wrote stays (on object storage, uploaded), and finish() writes the rest from the view.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import os
import threading
from typing import Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from fsspec.implementations.local import LocalFileSystem

from raypar.credentials import protocol_of
from raypar.errors import OutputSchemaError
from raypar.inputs.base import MiniBatch, batch_id, batch_ids, ordinal_of
from raypar.jobdir.ledger import Ledger, LedgerView
from raypar.outputs import assembly, formats
from raypar.outputs.ahead import ABSENT, StoredAhead
from raypar.outputs.assembly import PART_COLUMNS, Part, ReadAhead, done_parts, fetch_windows, intact, parts_of
from raypar.storage import atomic_output

log = logging.getLogger("raypar")

MAX_AHEAD = 1 << 21  # how far ahead of the batch written next batches may wait: 2,097,152 (52 MiB)
GATHER_SECONDS = 0.2  # how often the thread looks for settled batches to write
# A local output is pushed to disk each time it grows by this much while batches run, so the fsync
# that publishes it waits only for the tail (904 MiB took 0.24 s to fsync at the end, here).
SYNC_BYTES = 128 << 20


class GaveUp(Exception):
    """Why the file written while running is not the output: assemble() writes it instead."""


class LiveAssembly:
    """The output file of a session, written in batch order as batches are stored."""

    def __init__(self, ledger: Ledger, target: str, fmt: str, storage_options: Optional[dict] = None,
                 resumed: Optional[Sequence[MiniBatch]] = None, order: Optional[np.ndarray] = None):
        """``resumed``: the manifest of a session that starts with batches done (a resume): where their
        parts are is read from the ledger by the thread, and they are written in order with the rest.
        ``order``: the ordinals in output order, when a revision changed it (Manifest.output_order)."""
        self.ledger, self.target, self.fmt, self.options = ledger, target, fmt, storage_options
        self.resumed = resumed
        self.place_of = None  # ordinal -> its place in the output (-1: not in it), with ``order``
        if order is not None:
            self.place_of = np.full(int(order.max(initial=-1)) + 1, -1, np.int64)
            self.place_of[order] = np.arange(len(order))
        # The scheduler only appends here; this thread drains it every GATHER_SECONDS (or at once
        # when woken for finish/abandon). Waking it per event made the two threads trade the GIL
        # thousands of times a second, and the scheduler's loop waited for it each time.
        self.events: collections.deque = collections.deque()
        self.wake = threading.Event()
        self.waiting = StoredAhead(order)  # the batches stored from the one written next on
        self.written = 0  # parts written
        self.chain = hashlib.sha256()  # of the parts written, in order: finish() compares the view's with it
        self.union: Optional[formats.SchemaUnion] = None
        self.schema = None
        self.files: Optional[contextlib.ExitStack] = None  # the temporary file (atomic_output)
        self.out = self.sink = None
        # bytes of an output on this machine's disk, a path or a file:// URL (None: a remote output)
        self.synced = 0 if protocol_of(target) in LocalFileSystem.protocol else None
        self.published: Optional[int] = None  # bytes, once published
        self.written_while_running: Optional[int] = None  # parts written before finish()
        self.gave_up: Optional[str] = None
        self.paused: Optional[str] = None  # why it stopped writing before finish() (the rest is written then)
        self.ending: Optional[tuple] = None  # ("finish", view) or ("abandon", None), once taken from events
        self.stopped = threading.Event()  # abandon(): nothing more is written, nothing published
        self.thread = threading.Thread(target=self._run, name="raypar-live-assembly", daemon=True)
        self.thread.start()

    # -- the scheduler's side (its thread) -----------------------------------------------------

    def stored(self, batches: list[tuple[str, Optional[list]]]) -> None:
        """These batches are done and their records durable (a worker's flush stores many at once):
        (batch, [part name, offset, bytes, sha256, crc32], or None when it has no rows)."""
        if self.gave_up is None and self.paused is None and batches:
            self.events.append(("settled", batches))

    def failed(self, batch: str) -> None:
        """``batch`` failed for good: the output goes on without it."""
        if self.gave_up is None and self.paused is None:
            self.events.append(("failed", batch))

    # -- the driver's side ---------------------------------------------------------------------

    def finish(self, view: LedgerView) -> Optional[int]:
        """Write the rest from ``view`` (the full ledger view after the last batch) and publish;
        the bytes written, or None when this gave up (assemble() then writes the output)."""
        self.events.append(("finish", view))
        self.wake.set()
        self.thread.join()
        return self.published

    def abandon(self) -> None:
        """The session ends without an output: the temporary file is removed."""
        self.stopped.set()  # also while finish() writes the tail (the driver was interrupted)
        if self.thread.is_alive():
            self.events.append(("abandon", None))
            self.wake.set()
            self.thread.join()

    # -- the thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            if self.resumed is not None:
                self._done_before(self.resumed)
            while True:
                self.wake.wait(GATHER_SECONDS)
                self.wake.clear()
                self._gather()
                self._advance()
                if self.waiting.ahead() > MAX_AHEAD:  # their places are the view's to tell, at finish()
                    self.paused = (f"{len(self.waiting)} stored mini-batches, up to "
                                   f"{self.waiting.batch_at(self.waiting.highest)}, waited for "
                                   f"{self.waiting.batch_at(self.waiting.next)}")
                    self.waiting.clear()
                    log.debug("raypar: the output is written on after the last batch: %s", self.paused)
                if self.ending is not None:
                    kind, value = self.ending
                    if kind == "abandon":
                        raise GaveUp("the session ended without an output")
                    self._finish(value)
                    return
        except Exception as exc:  # noqa: BLE001 - any doubt: assemble() writes the output from the ledger
            self.gave_up = str(exc) or type(exc).__name__
            self.waiting.clear()
            log.debug("raypar: the output written while running is dropped: %s", exc)
            self._discard()

    def _done_before(self, manifest: Sequence[MiniBatch]) -> None:
        """The batches done before this session wait with their parts, as if stored first (the
        session's own may be among them: stored twice, the same part). MAX_AHEAD does not count
        them: 25 bytes each, a job's worth (25 MiB at a million batches)."""
        done = done_parts(self.ledger.view(manifest, failed=False), rowless=True)
        if self.place_of is not None:
            places = self._places(done.column("ordinal").to_numpy())
            done = done.set_column(0, "ordinal", pa.array(places)).filter(pa.array(places >= 0))
        self.waiting.put_done(done)

    def _places(self, ordinals: np.ndarray) -> np.ndarray:
        """Where ``ordinals`` are in the output (-1: not in it)."""
        inside = ordinals < len(self.place_of)
        return np.where(inside, self.place_of[np.where(inside, ordinals, 0)], -1)

    def _gather(self) -> None:
        """Take what the scheduler said since the last look into ``waiting``, up to the finish or
        abandon event (``ending``: nothing comes after it)."""
        while self.events and self.ending is None:
            kind, value = self.events.popleft()
            if self.paused is not None and kind in ("settled", "failed"):
                continue  # (told before it paused)
            if kind == "settled":
                for batch, part in value:
                    self._put(ordinal_of(batch), part or None)
            elif kind == "failed":
                self._put(ordinal_of(value), None)
            else:
                self.ending = kind, value

    def _put(self, ordinal: int, part: Optional[list]) -> None:
        place = ordinal
        if self.place_of is not None:
            place = int(self.place_of[ordinal]) if ordinal < len(self.place_of) else -1
            if place < 0:  # (a batch a revision retired: the scheduler never runs one)
                raise GaveUp(f"{batch_id(ordinal)} has no place in the output")
        self.waiting.put(place, part)

    def _discard(self) -> None:
        """Remove the temporary file (whatever state its writing was left in)."""
        dropped = GaveUp(self.gave_up)
        with contextlib.suppress(Exception):
            if self.sink is not None:
                self.sink.__exit__(GaveUp, dropped, None)  # writes nothing more
        with contextlib.suppress(Exception):
            if self.files is not None:
                self.files.__exit__(GaveUp, dropped, None)
        self.sink = self.files = None

    def _advance(self) -> None:
        """Write the parts of the settled batches from the one written next on, a window at a time."""
        for record, data in fetch_windows(self.ledger, self._settled()):
            self._write(record, data if intact(record, data) else None)

    def _settled(self) -> Iterator[Part]:
        """The parts to write next, in order, as long as they are settled. What the scheduler said
        meanwhile is taken in every WINDOW parts and when they run out: catching up with half a
        million batches behind a straggler, its lists (400 bytes a batch) would wait in ``events``."""
        taken, gathered = 0, False
        while True:
            value = self.waiting.take_next()
            if value is ABSENT:
                if gathered or not self.events:
                    return
                self._gather()
                gathered = True
                continue
            taken, gathered = taken + 1, False
            if taken % assembly.WINDOW == 0:
                self._gather()
            if value is not None:
                yield value

    def _write(self, record: Part, data: Optional[bytes]) -> None:
        """Write one verified part (``data`` None: it failed its checksum)."""
        if self.stopped.is_set():
            raise GaveUp("the session ended without an output")
        if data is None:
            raise GaveUp(f"the part of {record.batch} does not match its checksum")
        if self.fmt != "text":
            self._check_schema(record, data)
        if self.sink is None:
            self._open()
        self.sink.write(data, record.batch)
        self.written += 1
        if self.written_while_running is None:  # finish() checks these; the tail needs neither
            self.chain.update(_key(record))
            self._sync_behind()

    def _sync_behind(self) -> None:
        """Push a local output's new bytes to disk (the OS's background writeback may wait longer)."""
        if self.synced is not None and self.out.tell() - self.synced >= SYNC_BYTES:
            self.out.flush()
            os.fdatasync(self.out.fileno())
            self.synced = self.out.tell()

    def _check_schema(self, record: Part, data: bytes) -> None:
        head = data[:formats.head_size(data)]
        if self.union is None:
            self.union = formats.SchemaUnion(self.fmt)
            self.union.add(head, record.batch)
            self.schema = self.union.check()
            return
        try:
            self.union.add(head, record.batch)
        except OutputSchemaError as exc:
            raise GaveUp(str(exc)) from None
        if not self.union.schema.equals(self.schema):
            raise GaveUp(f"{record.batch}'s columns change the output's schema")

    def _open(self) -> None:
        self.files = contextlib.ExitStack()
        self.out = self.files.enter_context(atomic_output(self.target, self.options))
        sink = assembly.TextSink(self.out) if self.fmt == "text" else formats.SINKS[self.fmt](self.out, self.schema)
        self.sink = sink.__enter__()  # left before the file: the file's size is read in between

    def _finish(self, view: LedgerView) -> None:
        self.written_while_running = self.written
        self.waiting.clear()  # (what it holds of the last batches' chunk)
        if self.sink is None:
            raise GaveUp("nothing was written while running")
        parts = done_parts(view)
        if parts.num_rows < self.written:
            raise GaveUp("the ledger holds fewer parts than were written")
        if _chain(parts.slice(0, self.written)) != self.chain.digest():
            raise GaveUp("the parts written are not the ledger's")
        parts = parts_of(parts.slice(self.written))
        for record, data in ReadAhead(fetch_windows(self.ledger, parts)):  # checked by its thread
            self._write(record, data)
        self.sink.__exit__(None, None, None)  # the end of the file (a parquet footer)
        size = self.out.tell()
        if self.stopped.is_set():
            raise GaveUp("the session ended without an output")
        self.files.close()  # atomic_output publishes it
        self.published = size
        log.debug("raypar: %d of %d output parts were written while batches ran", self.written_while_running,
                 self.written)


def _key(record: Part) -> bytes:
    """What the chain hashes of a part written (_chain() builds the same bytes from columns)."""
    return (f"{record.batch}\0{record.part}\0{record.part_offset}\0{record.part_bytes}\0{record.part_sha256}\0"
            f"{record.part_crc32}\n").encode()


def _chain(parts: pa.Table) -> bytes:
    """The chain of done_parts()'s rows: each row's _key(), composed by Arrow a slice at a time (a
    Part per row cost 2.4 s of a million-batch session's end)."""
    chain = hashlib.sha256()
    for rows in parts.to_batches(max_chunksize=1 << 16):
        text = [pc.cast(rows.column(c), pa.string()) for c in PART_COLUMNS[1:]]
        keys = pc.binary_join_element_wise(batch_ids(rows.column("ordinal")), *text[:3],
                                           *(pc.fill_null(c, "None") for c in text[3:]), "\0")
        keys = pc.binary_join_element_wise(keys, "", "\n")  # each key ends in a newline
        _, offsets, data = keys.buffers()
        start, end = np.frombuffer(offsets, np.int32)[[keys.offset, keys.offset + len(keys)]]
        chain.update(memoryview(data)[start:end])
    return chain.digest()
