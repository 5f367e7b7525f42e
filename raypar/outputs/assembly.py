"""The final append-row file: every done batch's part, verified, in batch order, published atomically.

Runs on the driver. ``text`` parts are concatenated; ``csv``, ``jsonl`` and
``parquet`` parts (Arrow IPC streams, rows.py) are unified into one schema and
written as one table file (formats.py).
"""

from __future__ import annotations

import collections
import threading
from contextlib import closing
from typing import Iterable, Iterator, NamedTuple, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raypar.errors import CorruptPartsError, OutputSchemaError
from raypar.inputs.base import batch_id, ordinal_of
from raypar.jobdir.ledger import Ledger, LedgerView
from raypar.jobdir.records import DoneRecord, part_intact
from raypar.jobdir.tables import DoneIndex
from raypar.outputs import formats
from raypar.outputs.rows import FORMATS
from raypar.storage import atomic_output

READ_AHEAD = 64 * 1024 * 1024  # bytes of parts read ahead of the writer (and fetched at once from object stores)
# Batches read at once, at most. Tiny parts on an object store cost a round trip a window (100,000
# 16-byte parts took 2.5 s from Azurite in windows of 1,024, 0.35 s in windows of 16,384); on local
# disk larger windows only delay the writer (a million parts: 4.6-5.2 s in windows of 1,024, 6.2-6.5 s
# in windows of 16,384).
WINDOW, REMOTE_WINDOW = 1024, 16_384


def assemble(ledger: Ledger, view: LedgerView, target: str, fmt: str = "text",
             storage_options: Optional[dict] = None) -> int:
    """Write the rows of every done batch, in mini-batch order, to ``target`` atomically.

    Only parts named by done records are read, one per batch, so the file
    holds each batch's rows exactly once. Every part is checked against the
    checksum in its record first; if any fails, nothing is published and
    CorruptPartsError names all of them. Table formats first read each part's
    schema and unify them; columns that cannot be unified raise
    OutputSchemaError, and nothing is published either. Parts are streamed:
    a thread reads and verifies at most READ_AHEAD bytes of them ahead of the
    writer. Returns the bytes written.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown append_row_format {fmt!r}; expected one of {FORMATS}")
    schema = None if fmt == "text" else _unified_schema(ledger, view, fmt)
    corrupt = []
    with atomic_output(target, storage_options) as out:
        with TextSink(out) if fmt == "text" else formats.SINKS[fmt](out, schema) as sink:
            try:
                for record, data in ReadAhead(_parts(ledger, view)):
                    if data is None:
                        corrupt.append(record)
                    elif not corrupt:  # after the first bad part only verify: the rest is never published
                        sink.write(data, record.batch)
            except OutputSchemaError:
                _raise_if_corrupt(ledger, view)
                raise
            if corrupt:
                raise CorruptPartsError(_done_records(view, corrupt))  # aborts the output: nothing is published
        return out.tell()


class TextSink:
    """Azure's text format: the parts, back to back."""

    def __init__(self, out):
        self.out = out

    def __enter__(self) -> TextSink:
        return self

    def __exit__(self, *_) -> None:
        pass

    def write(self, data: bytes, batch: str) -> None:
        self.out.write(data)


def _raise_if_corrupt(ledger: Ledger, view: LedgerView) -> None:
    """CorruptPartsError if any part fails its checksum: a corrupted part can look like a schema error."""
    corrupt = [part for part, data in ReadAhead(_parts(ledger, view)) if data is None]
    if corrupt:
        raise CorruptPartsError(_done_records(view, corrupt)) from None


class ReadAhead:
    """(record, its part's bytes, or None if they fail their checksum), read and checked by a thread.

    Reading and hashing release the GIL, so they overlap the writer's
    encoding; at most ``limit`` bytes of parts wait in memory.
    """

    def __init__(self, parts: Iterator[tuple[Part, bytes]], limit: Optional[int] = None):
        self.limit = limit if limit is not None else READ_AHEAD
        self.ready: collections.deque = collections.deque()
        self.waiting, self.finished, self.stopped, self.error = 0, False, False, None
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, args=(parts,), daemon=True, name="raypar-assembly-read")
        self.thread.start()

    def _run(self, parts) -> None:
        try:
            with closing(parts):
                for record, data in parts:
                    checked = data if intact(record, data) else None
                    with self.cond:
                        while self.waiting and self.waiting + len(data) > self.limit and not self.stopped:
                            self.cond.wait()
                        if self.stopped:
                            return
                        self.ready.append((record, checked, len(data)))
                        self.waiting += len(data)
                        self.cond.notify_all()
        except BaseException as exc:  # noqa: BLE001 - raised again in the consumer
            self.error = exc
        finally:
            with self.cond:
                self.finished = True
                self.cond.notify_all()

    def __iter__(self):
        try:
            while True:
                with self.cond:
                    while not self.ready and not self.finished:
                        self.cond.wait()
                    if not self.ready:
                        if self.error is not None:
                            raise self.error
                        return
                    record, data, size = self.ready.popleft()
                    self.waiting -= size
                    self.cond.notify_all()
                yield record, data
        finally:
            with self.cond:
                self.stopped = True
                self.cond.notify_all()
            self.thread.join()


def _unified_schema(ledger: Ledger, view: LedgerView, fmt: str):
    """The schema of the output file: every part's schema (read from its head), unified.

    A part whose head does not parse, or whose columns conflict, may be a
    corrupted one: then every part is verified, and CorruptPartsError wins
    over the schema error (the driver re-runs those batches).
    """

    union = formats.SchemaUnion(fmt)
    try:
        for record, head in _parts(ledger, view, head=formats.SCHEMA_HEAD):
            need = formats.head_size(head)
            if need > len(head) and need <= record.part_bytes:
                head = _read_range(ledger, record, need)
            union.add(head[:need], record.batch)
        return union.check()
    except OutputSchemaError:
        _raise_if_corrupt(ledger, view)
        raise


def intact(record: Part, data: bytes) -> bool:
    return part_intact(data, record.part_crc32, record.part_sha256)


class Part(NamedTuple):
    """What assembly needs of a done record: its batch and where its part is."""

    batch: str
    part: str
    part_offset: int
    part_bytes: int
    part_sha256: Optional[str]  # records written before part_crc32
    part_crc32: Optional[str] = None


PART_SCHEMA = pa.schema([("ordinal", pa.int64()), ("part", pa.string()), ("part_offset", pa.int64()),
                         ("part_bytes", pa.int64()), ("part_sha256", pa.string()), ("part_crc32", pa.string())])
PART_COLUMNS = PART_SCHEMA.names


def done_in_order(view: LedgerView) -> Iterator[Part]:
    """The parts of the done records, in mini-batch order.

    Read straight from the DoneIndex's columns: building a DoneRecord per
    batch would cost ten times as much, twice per assembly.
    """
    return parts_of(done_parts(view))


def done_parts(view: LedgerView, rowless: bool = False) -> pa.Table:
    """The done records that have a part (``rowless``: and those that have none), in output order:
    PART_COLUMNS."""
    if not isinstance(view.done, DoneIndex):  # a plain mapping of DoneRecords
        rows = [{"ordinal": ordinal_of(r.batch), **{c: getattr(r, c) for c in PART_COLUMNS[1:]}}
                for r in view.done.values() if r.part is not None or rowless]
        table = pa.Table.from_pylist(rows, schema=PART_SCHEMA)
        return table.take(pc.sort_indices(table, [("ordinal", "ascending")]))
    table = view.done.table.select(PART_COLUMNS)
    order = view.manifest.output_order() if hasattr(view.manifest, "output_order") else None
    if order is not None and table.num_rows:  # re-planned batches take the place of those they replace
        position = np.full(len(view.manifest), len(order), dtype=np.int64)
        position[order] = np.arange(len(order))
        table = table.take(pa.array(np.argsort(position[view.done.ordinals], kind="stable")))
    return table if rowless else table.filter(pc.is_valid(table.column("part")))


def parts_of(table: pa.Table) -> Iterator[Part]:
    """A Part for each row of done_parts()'s table."""
    for chunk in table.to_batches(max_chunksize=50_000):
        values = chunk.to_pydict()
        for ordinal, *where in zip(*(values[c] for c in PART_COLUMNS), strict=True):
            yield Part(batch_id(ordinal), *where)


def _done_records(view: LedgerView, parts: list) -> list[DoneRecord]:
    return [view.done[p.batch] for p in parts]


def _parts(ledger: Ledger, view: LedgerView, head: Optional[int] = None) -> Iterator[tuple[Part, bytes]]:
    """(record, its part's bytes, or only the first ``head`` of them) in mini-batch order."""
    size = (lambda r: min(r.part_bytes, head)) if head else (lambda r: r.part_bytes)
    return fetch_windows(ledger, done_in_order(view), size)


def fetch_windows(ledger: Ledger, records: Iterable[Part], size=lambda r: r.part_bytes
                  ) -> Iterator[tuple[Part, bytes]]:
    """(record, its part's bytes) for each of ``records``, read a window at a time: at most READ_AHEAD
    bytes or WINDOW batches (REMOTE_WINDOW on object stores, read concurrently), one span per segment
    the window touches."""
    window, window_bytes = [], 0
    most = WINDOW if ledger.store.local_path() is not None else REMOTE_WINDOW
    for record in records:
        window.append(record)
        window_bytes += size(record)
        if window_bytes >= READ_AHEAD or len(window) >= most:
            yield from fetch(ledger, window, size)
            window, window_bytes = [], 0
    yield from fetch(ledger, window, size)


def fetch(ledger: Ledger, records: list, size) -> Iterator[tuple[Part, bytes]]:
    """The window's parts, read concurrently, one ranged GET per segment object it touches.

    A segment holds up to ``raypar.ledger.flush_batches`` batches, mostly near each other in
    output order: one span per segment replaces a GET per batch (a span that would read more
    than twice what the window needs of it falls back to one range per part).
    """
    if not records:
        return
    wanted: dict[str, list] = collections.defaultdict(list)
    for r in records:
        wanted[r.part].append((r.part_offset, r.part_offset + size(r)))
    spans = []  # (part, start, end): what is read
    for part, ranges in wanted.items():
        lo, hi = min(a for a, _ in ranges), max(b for _, b in ranges)
        if hi - lo <= 2 * sum(b - a for a, b in ranges) + 65536:
            spans.append((part, lo, hi))
        else:
            spans.extend((part, a, b) for a, b in ranges)
    paths = [ledger.store.path("parts", part) for part, _, _ in spans]
    got = ledger.store.read_ranges(paths, [a for _, a, _ in spans], [b for _, _, b in spans])
    data_of: dict[str, list] = collections.defaultdict(list)
    for (part, lo, hi), data in zip(spans, got, strict=True):
        if isinstance(data, BaseException):
            raise data
        data_of[part].append((lo, hi, data))
    for r in records:
        start, end = r.part_offset, r.part_offset + size(r)
        lo, _, data = next(x for x in data_of[r.part] if x[0] <= start and end <= x[1])
        yield r, data[start - lo:end - lo]


def _read_range(ledger: Ledger, record: Part, length: int) -> bytes:
    return ledger.store.read_range(ledger.store.path("parts", record.part), record.part_offset,
                                   record.part_offset + length)
