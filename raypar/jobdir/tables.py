"""Columnar views of the ledger, so a job of millions of mini-batches resumes in seconds.

Parsing one JSON record costs microseconds; a million of them cost many
seconds. The driver therefore *compacts* the done records it has read into one
Arrow file (see :meth:`raypar.jobdir.ledger.Ledger.compact`), and every in-memory
view keeps done records as Arrow columns: :class:`DoneIndex` answers "is this
batch done?" by binary search over sorted ordinals, and :class:`Manifest`
parses a planned batch only when it is asked for.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json

from raypar.inputs.base import MiniBatch, QueuedBatch, batch_id, ordinal_of
from raypar.inputs.pending import PendingQueue
from raypar.jobdir.records import DoneRecord, FailedRecord, seal_intact, unseal_all, verified_lines

_DICT = pa.dictionary(pa.int32(), pa.string())
SCHEMA = pa.schema([
    ("ordinal", pa.int64()), ("run", _DICT), ("attempt", pa.int64()), ("items", pa.int64()),
    ("returned", pa.int64()), ("part", _DICT), ("part_offset", pa.int64()), ("part_bytes", pa.int64()),
    ("part_sha256", pa.string()), ("node", _DICT), ("worker", _DICT), ("seconds", pa.float64()),
    ("started", pa.float64()), ("reported", pa.int64()), ("failed", pa.string()), ("part_crc32", pa.string()),
])
_ADDED = {"reported": 0, "failed": None, "part_crc32": None}  # columns newer than some compact files: their value there
# The done record as sealed in the ledger (batch ID instead of ordinal, plain strings).
_RECORD = pa.schema([("batch", pa.string())] + [
    pa.field(f.name, pa.string() if f.type == _DICT else f.type) for f in SCHEMA if f.name != "ordinal"
])


def records_table(lines: list[bytes]) -> pa.Table:
    """Verified done-record bodies (JSON, one per line) as a table in SCHEMA, parsed in C++."""
    raw = pa_json.read_json(
        pa.BufferReader(b"\n".join(lines)),
        parse_options=pa_json.ParseOptions(explicit_schema=_RECORD, unexpected_field_behavior="ignore"),
    )
    ordinal = pc.cast(pc.utf8_slice_codeunits(raw.column("batch"), 3), pa.int64())
    arrays = [ordinal] + [
        raw.column(f.name).dictionary_encode() if f.type == _DICT else raw.column(f.name)
        for f in SCHEMA if f.name != "ordinal"
    ]
    table = pa.Table.from_arrays(arrays, schema=SCHEMA)
    return table.set_column(SCHEMA.get_field_index("reported"), "reported", table.column("reported").fill_null(0))


# A failed record as sealed in the ledger: FailedRecord's fields, in its order.
_FAILED = pa.schema([("batch", pa.string()), ("run", pa.string()), ("attempt", pa.int64()), ("error", pa.string()),
                     ("kind", pa.string()), ("final", pa.bool_()), ("node", pa.string()), ("worker", pa.string()),
                     ("started", pa.float64()), ("items", pa.int64())])
_FAILED_REQUIRED = ("batch", "run", "attempt", "error", "kind", "final")
_SEALED_FAILED = _FAILED.append(pa.field("sha256", pa.string()))  # as stored: the seal's checksum last
# A view's failed records: the batch as its ordinal, texts dictionary-encoded (a bug in run() that
# every batch hits repeats one kilobyte of traceback in millions of records: one copy here). The
# tracebacks' dictionary has 64-bit offsets: distinct ones that name their item pass 2 GiB at a few
# million attempts, where a string array cannot hold them (ArrowCapacityError at the session's end).
ERROR_TYPE = pa.dictionary(pa.int32(), pa.large_string())
FAILED_SCHEMA = pa.schema([pa.field("ordinal", pa.int64()), *(
    pa.field(f.name, ERROR_TYPE if f.name == "error" else _DICT if f.type == pa.string() else f.type)
    for f in _FAILED if f.name != "batch")])


def failed_table(files: list[bytes]) -> pa.Table:
    """The whole, unmodified failed records of ``files`` (sealed JSON, one per line) in FAILED_SCHEMA,
    parsed together in C++: a million records of a kilobyte were 3.5 s of json.loads and 5.5 s of a
    Python loop (benchmarks/README.md). A file whose records are all intact is parsed as it is, no
    copy of a record each; records that are not FailedRecords are left out."""
    pieces, count, longest = [], 0, 0
    for data in files:
        lines = [line for line in data.split(b"\n") if line]
        if all(map(seal_intact, lines)):  # as written: the seal's key is one more column
            pieces.append(data)
        else:  # torn or edited records left out, those sealed by hand in canonical form
            lines = verified_lines(lines)
            pieces.append(b"\n".join(lines))
        count += len(lines)
        longest = max(longest, *map(len, lines)) if lines else longest
    table = None
    if count:
        text = b"\n".join(pieces)  # (blank lines are passed over)
        try:
            table = pa_json.read_json(
                pa.BufferReader(text),
                read_options=pa_json.ReadOptions(block_size=max(1 << 20, 2 * longest)),
                parse_options=pa_json.ParseOptions(explicit_schema=_SEALED_FAILED, unexpected_field_behavior="error"))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            table = None
        if table is None or table.num_rows != count:  # a value of another type, a field no record has...
            table = _failed_one_by_one([line for data in files for line in data.split(b"\n")])
    if table is None or not table.num_rows:
        return FAILED_SCHEMA.empty_table()
    valid = pc.match_substring_regex(table.column("batch"), r"^mb-[0-9]+$").fill_null(False).to_numpy(
        zero_copy_only=False)  # a batch ID (its ordinal is the key)
    for name in _FAILED_REQUIRED:
        valid &= pc.is_valid(table.column(name)).to_numpy(zero_copy_only=False)
    table = table.filter(pa.array(valid)) if not valid.all() else table
    table = table.combine_chunks()  # one dictionary a window, not one copy of it per block Arrow parsed
    ordinal = pc.cast(pc.utf8_slice_codeunits(table.column("batch"), 3), pa.int64())
    return pa.Table.from_arrays([ordinal, *(_encoded(table.column(f.name), f.type) for f in FAILED_SCHEMA
                                            if f.name != "ordinal")], schema=FAILED_SCHEMA)


def _encoded(column: pa.ChunkedArray, as_type: pa.DataType) -> pa.ChunkedArray:
    """A parsed column as FAILED_SCHEMA holds it: texts dictionary-encoded (the error's values widened first)."""
    if not pa.types.is_dictionary(as_type):
        return column
    return column.cast(as_type.value_type).dictionary_encode() if as_type.value_type != column.type \
        else column.dictionary_encode()


def _failed_one_by_one(chunks: list[bytes]) -> Optional[pa.Table]:
    """The records parsed one at a time, those that are not FailedRecords left out (slow: only
    when a record was sealed by hand)."""
    rows = []
    for body in unseal_all(chunks):
        try:
            rows.append(FailedRecord(**body).fields())
        except TypeError:
            continue
    try:
        return pa.Table.from_pylist(rows, schema=_FAILED) if rows else None
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.Table.from_pylist([r for r in rows if _fits(r)], schema=_FAILED)


def _fits(row: dict) -> bool:
    try:
        pa.Table.from_pylist([row], schema=_FAILED)
        return True
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return False


KEY_CHARACTERS = 32  # of each end of a traceback: with its length, the key its repeats are found by
CHECKED_AT_ONCE = 8192  # repeats compared whole at a time (their copies are taken to compare)


def first_copies(texts: pa.Array) -> np.ndarray:
    """For each text, the index of its first copy in ``texts`` (its own where it is the first).
    Found by a short key (the length and the first and last KEY_CHARACTERS) and checked whole, so
    the texts are not copied into a hash table: Arrow's dictionary_encode held them three times
    over (9 GiB at the end of a session with 2.3 GB of distinct tracebacks). Look-alikes (one key,
    different texts: what differs is in the middle) are told apart exactly among themselves."""
    count = len(texts)
    ends = [pc.utf8_slice_codeunits(texts, *span).cast(pa.string()) for span in ((0, KEY_CHARACTERS), (-KEY_CHARACTERS,))]
    key = pc.binary_join_element_wise(pc.binary_length(texts).cast(pa.string()), *ends, "\x00").dictionary_encode()
    copies = _earliest(key.indices.to_numpy(), np.arange(count))
    later = np.flatnonzero(copies != np.arange(count))  # a key met before: the same text, most likely
    apart = []
    for at in range(0, len(later), CHECKED_AT_ONCE):
        rows = later[at:at + CHECKED_AT_ONCE]
        same = pc.equal(texts.take(pa.array(rows)), texts.take(pa.array(copies[rows]))).to_numpy(zero_copy_only=False)
        apart.append(rows[~same])
    apart = np.concatenate(apart) if apart else np.zeros(0, np.int64)
    if len(apart):  # the look-alikes and the first of their keys, encoded whole (only they are copied)
        involved = np.unique(np.concatenate([apart, copies[apart]]))
        copies[involved] = _earliest(texts.take(pa.array(involved)).dictionary_encode().indices.to_numpy(), involved)
    return copies


def _earliest(codes: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """For each of ``rows`` (ascending), the first of them with its code."""
    distinct, first = np.unique(codes, return_index=True)
    first_row = np.empty(int(codes.max()) + 1 if len(codes) else 0, dtype=np.int64)
    first_row[distinct] = rows[first]
    return first_row[codes]


def one_dictionary(column: pa.ChunkedArray) -> pa.Array:
    """A dictionary-encoded column's chunks (windows of records, compacted pieces) as one array over
    one dictionary: theirs one after the other, each value pointing at its first copy (first_copies),
    the copies no value points at let go once they are a quarter of the texts (a bug every window
    hits). unify_dictionaries hashed every text into a table of its own copy: 2-3 times the tracebacks."""
    chunks = column.chunks
    if len(chunks) <= 1:
        return chunks[0] if chunks else pa.array([], column.type)
    dictionary = pa.concat_arrays([chunk.dictionary for chunk in chunks])
    copies = np.append(first_copies(dictionary), 0)  # the last: where a missing value points (masked)
    kept = np.unique(copies)
    sizes = pc.binary_length(dictionary).to_numpy(zero_copy_only=False).astype(np.int64)
    if 4 * (sizes.sum() - sizes[kept].sum()) > sizes.sum():  # the repeats are a quarter of the texts: let go
        dictionary, copies = dictionary.take(pa.array(kept)), np.searchsorted(kept, copies)
    starts = np.cumsum([0] + [len(chunk.dictionary) for chunk in chunks[:-1]])
    missing = [chunk.indices.is_null().to_numpy(zero_copy_only=False) for chunk in chunks]
    indices = np.concatenate([copies[np.where(null, len(copies) - 1, chunk.indices.fill_null(0).to_numpy() + start)]
                              for chunk, start, null in zip(chunks, starts, missing, strict=True)])
    return pa.DictionaryArray.from_arrays(pa.array(indices.astype(np.int32), mask=np.concatenate(missing)), dictionary)


class FailedRecords(Mapping):
    """batch ID -> its failed attempts (FailedRecords, by run and attempt), stored as Arrow columns
    sorted by ordinal, run and attempt (FAILED_SCHEMA). A million attempts stay a few columns and
    one copy of each distinct text; a batch's records are made when asked for. Views that count or
    report over all of them use the columns (``table``), never a record each."""

    def __init__(self, table: Optional[pa.Table] = None):
        if table is None or not table.num_rows:
            table = FAILED_SCHEMA.empty_table()
        else:
            keys = pa.table({"ordinal": table.column("ordinal"), "attempt": table.column("attempt"),
                             "run": table.column("run").cast(pa.string())})  # dictionaries are not sorted on
            order = pc.sort_indices(keys, [("ordinal", "ascending"), ("run", "ascending"), ("attempt", "ascending")])
            error = table.schema.get_field_index("error")
            table = table.set_column(error, "error", one_dictionary(table.column(error)))
            table = table.unify_dictionaries().combine_chunks().take(order)  # (the take moves indices only)
        self.table = table
        self.ordinals = table.column("ordinal").to_numpy() if table.num_rows else np.empty(0, np.int64)
        self.batches, self.starts = np.unique(self.ordinals, return_index=True)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[str]:
        return (batch_id(int(o)) for o in self.batches)

    def __contains__(self, batch) -> bool:
        return self._span(batch) is not None

    def _span(self, batch) -> Optional[tuple[int, int]]:
        try:
            ordinal = ordinal_of(batch)
        except (TypeError, ValueError):
            return None
        i = int(np.searchsorted(self.batches, ordinal))
        if i == len(self.batches) or self.batches[i] != ordinal:
            return None
        return int(self.starts[i]), int(self.starts[i + 1]) if i + 1 < len(self.starts) else len(self.ordinals)

    def __getitem__(self, batch) -> list[FailedRecord]:
        span = self._span(batch)
        if span is None:
            raise KeyError(batch)
        rows = self.table.slice(span[0], span[1] - span[0]).to_pylist()
        return [FailedRecord(batch=batch_id(row.pop("ordinal")), **row) for row in rows]

    def final_ordinals(self) -> np.ndarray:
        """The batches (sorted ordinals) with a record whose tries were spent."""
        final = self.table.column("final").to_numpy(zero_copy_only=False) if len(self) else np.zeros(0, bool)
        return np.unique(self.ordinals[final])

    def last_rows(self, ordinals: np.ndarray) -> pa.Table:
        """The last record (latest run and attempt) of each of ``ordinals`` (batches of this map)."""
        ends = np.append(self.starts[1:], len(self.ordinals))
        return self.table.take(pa.array(ends[np.searchsorted(self.batches, ordinals)] - 1))

    def without(self, ordinals: np.ndarray) -> "FailedRecords":
        """These records less those of ``ordinals``."""
        if not len(self):
            return self
        keep = ~np.isin(self.ordinals, ordinals)
        return self if keep.all() else FailedRecords(self.table.filter(pa.array(keep)))


def _conform(batch, columns: list[str]):
    """A table or record batch of a compact file written before a column existed, with that
    column added (its value in those records) and the columns in ``columns``' order."""
    missing = [c for c in columns if c not in batch.schema.names]
    if not missing:
        return batch
    arrays = {name: batch.column(name) for name in batch.schema.names}
    for name in missing:
        field = SCHEMA.field(name)
        arrays[name] = pa.array([_ADDED[name]] * batch.num_rows, field.type)
    make = pa.Table.from_arrays if isinstance(batch, pa.Table) else pa.RecordBatch.from_arrays
    return make([arrays[c] for c in columns], schema=pa.schema([SCHEMA.field(c) for c in columns]))


def empty_table() -> pa.Table:
    return SCHEMA.empty_table()


CHUNKS_READ_TOGETHER = 16  # manifest chunks a resume reads at once to queue their pending batches
ROWS_PER_BATCH = 1 << 20  # a compact file holds record batches of this many rows: read one at a time
# What a resume plans with and `status` counts: DoneSet reads only these columns of a compact file.
LEAN_COLUMNS = ["ordinal", "run", "attempt", "items", "returned", "part", "part_offset", "part_bytes", "reported"]


def to_ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression="zstd")
    with pa.ipc.new_file(sink, table.schema, options=options) as writer:
        writer.write_table(table, max_chunksize=ROWS_PER_BATCH)
    return sink.getvalue().to_pybytes()


def from_ipc(data: bytes) -> pa.Table:
    return _conform(pa.ipc.open_file(pa.BufferReader(data)).read_all(), SCHEMA.names)


def ipc_batches(source, columns: list[str]) -> Iterator[pa.RecordBatch]:
    """The record batches of a compact file (a path or bytes), with only ``columns`` decoded."""
    source = pa.OSFile(source) if isinstance(source, str) else pa.BufferReader(source)
    with source:
        reader = pa.ipc.open_file(source)
        fields = [reader.schema.get_field_index(c) for c in columns if c in reader.schema.names]
        reader = pa.ipc.open_file(source, options=pa.ipc.IpcReadOptions(included_fields=fields))
        for i in range(reader.num_record_batches):
            yield _conform(reader.get_batch(i), columns)


def _valid(table, part_sizes: dict[str, int], voided: set[str]) -> np.ndarray:
    """Which records of ``table`` (one chunk per column) prove a done batch: their rows exist
    whole (as far as the sizes of the parts tell) and they were not voided."""
    part = table.column("part")
    part = part.chunk(0) if isinstance(part, pa.ChunkedArray) else part
    names = part.dictionary.to_pylist()
    sizes = np.array([part_sizes.get(n, -1) for n in names] + [np.iinfo(np.int64).max], dtype=np.int64)
    index = part.indices.fill_null(len(names)).to_numpy()  # no part (summary only): always whole
    ends = table.column("part_offset").to_numpy() + table.column("part_bytes").to_numpy()
    keep = sizes[index] >= ends  # rows missing or cut short: not done
    if voided:
        keys = pc.binary_join_element_wise(
            pc.cast(table.column("ordinal"), pa.string()), pc.cast(table.column("run"), pa.string()),
            pc.cast(table.column("attempt"), pa.string()), "~")
        wanted = pa.array(sorted(voided), pa.string())
        keep &= ~pc.is_in(keys, value_set=wanted).to_numpy(zero_copy_only=False)
    return keep


def choose(table: pa.Table, part_sizes: dict[str, int], voided: set[str]) -> "DoneIndex":
    """One valid record per batch: its rows exist whole, it is not voided, smallest (run, attempt)."""
    if table.num_rows == 0:
        return DoneIndex(table)
    table = table.unify_dictionaries().combine_chunks()
    valid = _valid(table, part_sizes, voided)
    if not valid.all():  # each filter or take copies every column: a million records, ~150 MB each time
        table = table.filter(pa.array(valid)).combine_chunks()
    if table.num_rows == 0:
        return DoneIndex(table)
    ordinals = table.column("ordinal").to_numpy()
    if (ordinals[1:] > ordinals[:-1]).all():  # a record per batch, in batch order: nothing to choose
        return DoneIndex(table)
    run = table.column("run").chunk(0)
    run_rank = np.argsort(np.argsort(np.array(run.dictionary.to_pylist(), dtype=object)))[run.indices.to_numpy()]
    order = np.lexsort((table.column("attempt").to_numpy(), run_rank, ordinals))
    table = table.take(pa.array(order))
    ordinals = ordinals[order]
    first = np.ones(len(ordinals), dtype=bool)
    first[1:] = ordinals[1:] != ordinals[:-1]
    if first.all():  # a record per batch (the usual case): the sorted table is the choice
        return DoneIndex(table)
    chosen = DoneIndex(table.filter(pa.array(first)))
    chosen.spares = table.filter(pa.array(~first))  # other valid results: a speculative loser, a re-run
    return chosen


class DoneIndex(Mapping):
    """batch ID -> DoneRecord, one per batch, stored as Arrow columns sorted by ordinal."""

    spares: Optional[pa.Table] = None  # valid records choose() did not pick (the report shows them)

    def __init__(self, table: pa.Table):
        self.table = table.unify_dictionaries().combine_chunks() if table.num_rows else table
        self.ordinals = self.table.column("ordinal").to_numpy() if table.num_rows else np.empty(0, np.int64)

    def spare_records(self) -> list[DoneRecord]:
        return list(DoneIndex(self.spares).values()) if self.spares is not None else []

    def _keeping_spares(self, out: "DoneIndex") -> "DoneIndex":
        out.spares = self.spares
        return out

    def __len__(self) -> int:
        return len(self.ordinals)

    def _row(self, batch) -> Optional[int]:
        try:
            ordinal = ordinal_of(batch)
        except (TypeError, ValueError):
            return None
        i = int(np.searchsorted(self.ordinals, ordinal))
        return i if i < len(self.ordinals) and self.ordinals[i] == ordinal else None

    def __contains__(self, batch) -> bool:
        return self._row(batch) is not None

    def without(self, ordinals: np.ndarray) -> "DoneIndex":
        """This index less the records of ``ordinals`` (sorted)."""
        if not len(self):
            return self
        return self._keeping_spares(DoneIndex(self.table.filter(pa.array(~np.isin(self.ordinals, ordinals)))))

    def carry(self, carried: dict[int, int]) -> "DoneIndex":
        """This index plus, for each ``{new: old}``, old's record as new's, less the items run()
        reported failed (a retry batch of their own runs them): see Manifest.carried."""
        if not len(self) or not carried:
            return self
        olds = np.fromiter(carried.values(), dtype=np.int64)
        news = np.fromiter(carried.keys(), dtype=np.int64)
        rows = self.table.filter(pa.array(np.isin(self.ordinals, olds)))
        if not rows.num_rows:
            return self
        new_of = dict(zip(olds.tolist(), news.tolist(), strict=True))
        moved = np.array([new_of[o] for o in rows.column("ordinal").to_pylist()], dtype=np.int64)
        own = np.isin(moved, self.ordinals)  # the new batch ran itself (its old record was not valid)
        rows, moved = rows.filter(pa.array(~own)), moved[~own]
        if not rows.num_rows:
            return self
        reported = rows.column("reported").to_numpy()
        rows = rows.set_column(0, "ordinal", pa.array(moved, pa.int64()))
        rows = rows.set_column(SCHEMA.get_field_index("items"), "items",
                               pa.array(rows.column("items").to_numpy() - reported, pa.int64()))
        rows = rows.set_column(SCHEMA.get_field_index("reported"), "reported", pa.array(np.zeros(len(reported),
                                                                                                  np.int64)))
        rows = rows.set_column(SCHEMA.get_field_index("failed"), "failed", pa.nulls(len(reported), pa.string()))
        table = pa.concat_tables([self.table, rows.cast(self.table.schema)], promote_options="permissive")
        return self._keeping_spares(
            DoneIndex(table.take(pa.array(np.argsort(table.column("ordinal").to_numpy(), kind="stable")))))

    def __getitem__(self, batch) -> DoneRecord:
        i = self._row(batch)
        if i is None:
            raise KeyError(batch)
        return _record(self.table.slice(i, 1).to_pylist()[0])

    def __iter__(self) -> Iterator[str]:
        return (batch_id(int(o)) for o in self.ordinals)

    def values(self) -> Iterator[DoneRecord]:  # in mini-batch order
        for chunk in self.table.to_batches(max_chunksize=50_000):
            yield from (_record(row) for row in chunk.to_pylist())

    def items(self):
        return ((r.batch, r) for r in self.values())

    def failed_items(self) -> int:
        if not len(self):
            return 0
        return int(_failed_items(self.table).sum())

    def mask(self, size: int) -> np.ndarray:
        """A bool per ordinal below ``size``: done or not."""
        out = np.zeros(size, dtype=bool)
        out[self.ordinals[self.ordinals < size]] = True
        return out


class DoneSet:
    """Which batches are done, and how many items of each run() left unreturned: all a resume
    plans with and all ``status`` counts, in a bit and an int32 per batch (a million batches:
    5 MB). The records themselves (where each batch's rows are) stay on storage until the
    output is assembled (DoneIndex).

    Built a record batch at a time (:meth:`add`): a compact file of ten million records is never
    whole in memory. Of several valid records of one batch (a re-run whose first result was
    also stored) the last added counts, which differs from DoneIndex's choice only in which
    equal-input attempt's unreturned count is shown.
    """

    def __init__(self, size: int = 0):
        self.done = np.zeros(size, dtype=bool)
        self.unreturned = np.zeros(size, dtype=np.int32)
        self.reported = np.zeros(size, dtype=np.int32)  # of those, reported by run() (raypar.item_failed)

    def add(self, table, part_sizes: dict[str, int], voided: set[str]) -> np.ndarray:
        """Count the valid records of ``table`` (a record batch or table with LEAN_COLUMNS);
        returns which records were valid."""
        if not table.num_rows:
            return np.zeros(0, dtype=bool)
        if isinstance(table, pa.Table):
            table = table.unify_dictionaries().combine_chunks()
        keep = _valid(table, part_sizes, voided)
        ordinals = table.column("ordinal").to_numpy()[keep]
        unreturned = _failed_items(table)[keep]
        self._grow(int(ordinals.max(initial=-1)) + 1)
        self.done[ordinals] = True
        self.unreturned[ordinals] = unreturned
        self.reported[ordinals] = table.column("reported").to_numpy()[keep]
        return keep

    def _grow(self, top: int) -> None:
        if top > len(self.done):
            more = top - len(self.done)
            self.done = np.concatenate([self.done, np.zeros(more, dtype=bool)])
            self.unreturned = np.concatenate([self.unreturned, np.zeros(more, np.int32)])
            self.reported = np.concatenate([self.reported, np.zeros(more, np.int32)])

    def carry(self, carried: dict[int, int]) -> "DoneSet":
        """As DoneIndex.carry: each new ordinal done when its old one is, less the reported items."""
        for new, old in carried.items():
            if old < len(self.done) and self.done[old]:
                self._grow(new + 1)
                self.done[new] = True
                self.unreturned[new] = max(int(self.unreturned[old]) - int(self.reported[old]), 0)
        return self

    def __len__(self) -> int:
        return int(np.count_nonzero(self.done))

    @property
    def ordinals(self) -> np.ndarray:
        return np.flatnonzero(self.done)

    def __contains__(self, batch) -> bool:
        try:
            ordinal = ordinal_of(batch)
        except (TypeError, ValueError):
            return False
        return 0 <= ordinal < len(self.done) and bool(self.done[ordinal])

    def __iter__(self) -> Iterator[str]:
        return (batch_id(int(o)) for o in self.ordinals)

    def without(self, ordinals: np.ndarray) -> "DoneSet":
        out = DoneSet()
        out.done, out.unreturned, out.reported = self.done.copy(), self.unreturned, self.reported
        out.done[ordinals[ordinals < len(out.done)]] = False
        return out

    def failed_items(self) -> int:
        return int(self.unreturned[self.done].sum())

    def mask(self, size: int) -> np.ndarray:
        out = np.zeros(size, dtype=bool)
        n = min(size, len(self.done))
        out[:n] = self.done[:n]
        return out


class ReportedRecords:
    """The chosen done records whose run() reported items failed (``raypar.item_failed``),
    gathered while a DoneSet is built a record batch at a time: what ``raypar failed`` and
    ``resume --retry-failed-items`` need, without every record in memory (per batch two bits,
    plus the reporting records themselves).

    A reporting record is its batch's chosen one when it is the batch's only valid record. A
    batch with several (rare: a re-run whose first result was also stored, a speculative
    loser) is ``ambiguous``: the ledger reads that batch's records again and choose() decides.
    """

    COLUMNS = [*LEAN_COLUMNS, "failed"]  # read from compact files when these are wanted
    KEPT = ["ordinal", "items", "failed"]

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self.kept: list[pa.Table] = []
        self.seen = np.zeros(0, dtype=bool)  # a valid record of this ordinal was added
        self.twice = np.zeros(0, dtype=bool)  # ... and another one
        self.decided: Optional[pa.Table] = None  # choose()'s records of the ambiguous batches

    def add(self, table, keep: np.ndarray) -> None:
        """Note the valid records (``keep``) of ``table`` (COLUMNS) and keep the reporting ones."""
        ordinals = table.column("ordinal").to_numpy()[keep]
        if not len(ordinals):
            return
        top = int(ordinals.max()) + 1
        if top > len(self.seen):
            self.seen = np.concatenate([self.seen, np.zeros(top - len(self.seen), dtype=bool)])
            self.twice = np.concatenate([self.twice, np.zeros(top - len(self.twice), dtype=bool)])
        unique, counts = np.unique(ordinals, return_counts=True)
        self.twice[unique[(counts > 1) | self.seen[unique]]] = True
        self.seen[unique] = True
        reporting = keep & table.column("failed").is_valid().to_numpy(zero_copy_only=False)
        if reporting.any():
            rows = table.filter(pa.array(reporting)).select(self.KEPT)
            self.kept.append(rows if isinstance(rows, pa.Table) else pa.Table.from_batches([rows]))

    def ambiguous(self) -> np.ndarray:
        """The ordinals of reporting records whose batch has more than one valid record."""
        ordinals = np.concatenate([t.column("ordinal").to_numpy() for t in self.kept]) if self.kept \
            else np.empty(0, np.int64)
        return np.unique(ordinals[self.twice[ordinals]])

    def table(self) -> pa.Table:
        """ordinal, items, failed of each batch's chosen reporting record, by ordinal."""
        schema = pa.schema([SCHEMA.field(c) for c in self.KEPT])
        out = pa.concat_tables(self.kept).cast(schema) if self.kept else schema.empty_table()
        decided = self.decided
        if decided is not None:
            ordinals = out.column("ordinal").to_numpy()
            out = out.filter(pa.array(~np.isin(ordinals, decided.column("ordinal").to_numpy())))
            decided = decided.filter(decided.column("failed").is_valid()).select(self.KEPT).cast(schema)
            out = pa.concat_tables([out, decided])
        return out.take(pc.sort_indices(out, [("ordinal", "ascending")])) if out.num_rows else out


def _failed_items(table) -> np.ndarray:
    """Per record: the items run() did not return a row for, or reported failed, if more."""
    items, returned = table.column("items").to_numpy(), table.column("returned").to_numpy()
    return np.maximum(np.maximum(items - returned, table.column("reported").to_numpy()), 0)


def _record(row: dict) -> DoneRecord:
    row = dict(row)
    row["batch"] = batch_id(row.pop("ordinal"))
    return DoneRecord(**row)


class ChunkedLines(Sequence):
    """The manifest's JSON lines, read a chunk at a time when first asked for.

    ``load(indices)`` returns {chunk index: its lines} (the ledger reads them concurrently and
    checks their sha256). ``status`` of a million-batch job then reads none of the 100 MB of
    lines, and a resume only the chunks that hold pending batches.
    """

    def __init__(self, counts: list[int], load):
        self.load = load
        self.ends = np.cumsum(np.array(counts, dtype=np.int64))
        self.chunks: dict[int, list[bytes]] = {}

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def prefetch(self, indices) -> None:
        """Load, at once, every chunk holding one of the line ``indices`` (sorted or not)."""
        wanted = np.unique(np.searchsorted(self.ends, np.asarray(indices, dtype=np.int64), side="right"))
        missing = [int(k) for k in wanted if int(k) not in self.chunks and k < len(self.ends)]
        if missing:
            self.chunks.update(self.load(missing))

    def take(self, indices: np.ndarray) -> list[bytes]:
        """The lines at ``indices`` (ascending), their chunks read together."""
        self.prefetch(indices)
        chunk_of = np.searchsorted(self.ends, indices, side="right")
        firsts = np.concatenate([[0], self.ends[:-1]])
        out: list[bytes] = []
        for k in np.unique(chunk_of).tolist():
            lines = self.chunks[k]
            out.extend(lines[i] for i in (indices[chunk_of == k] - firsts[k]).tolist())
        return out

    def forget(self) -> None:
        """Drop every chunk read so far; a line asked for later reads its chunk again."""
        self.chunks.clear()

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = int(np.searchsorted(self.ends, i, side="right"))
        if k not in self.chunks:
            self.chunks.update(self.load([k]))
        return self.chunks[k][i - (int(self.ends[k - 1]) if k else 0)]

    def __iter__(self):
        self.prefetch(np.arange(len(self)))
        for k in range(len(self.ends)):
            yield from self.chunks[k]


class Manifest(Sequence):
    """The planned batches; each JSON line is parsed only when that batch is asked for.

    ``revisions`` (oldest first) each hold runs of (retired ordinals, [first, end) of the
    batches that replace them): a revision re-plans the batches of input files that changed
    since they were planned. The replacements take their run's place in the output.
    """

    def __init__(self, lines: Sequence[bytes], revisions: Sequence = (), planned: Optional[int] = None,
                 carried: Optional[dict] = None):
        self.lines = lines  # a list, or ChunkedLines read on demand
        self.revisions = list(revisions)
        # {new ordinal: retired ordinal}: a batch whose done record is the retired one's, less the
        # items run() reported failed (raypar resume --retry-failed-items plans those again).
        self.carried = dict(carried or {})
        self.planned = len(lines) if planned is None else planned  # batches of the original plan
        runs = [run for revision in self.revisions for run in revision]
        self.retired = np.unique(np.array([o for retired, _ in runs for o in retired], dtype=np.int64))

    @property
    def live(self) -> int:
        """Batches that count: planned or added, and not retired."""
        return len(self.lines) - len(self.retired)

    def is_retired(self, ordinal: int) -> bool:
        i = int(np.searchsorted(self.retired, ordinal))
        return i < len(self.retired) and self.retired[i] == ordinal

    def output_order(self) -> Optional[np.ndarray]:
        """The live ordinals in output order, or None when no revision changed it (ordinal order).
        Batches of added input files (a run that retired nothing) come after all the others."""
        if not len(self.retired):
            return None
        # Each run of retired batches is contiguous; its replacements are spliced in where it was.
        runs = {retired[0]: (len(retired), added) for revision in self.revisions for retired, added in revision
                if retired}
        appended = [added for revision in self.revisions for retired, added in revision if not retired]
        starts = np.array(sorted(runs), dtype=np.int64)

        def expand(lo: int, hi: int) -> list:
            pieces, at = [], lo
            for start in starts[(starts >= lo) & (starts < hi)]:
                count, (first, end) = runs[int(start)]
                pieces.append(np.arange(at, start, dtype=np.int64))
                pieces.extend(expand(first, end))
                at = int(start) + count
            pieces.append(np.arange(at, hi, dtype=np.int64))
            return pieces

        return np.concatenate([*expand(0, self.planned), *(p for first, end in appended for p in expand(first, end))])

    def __len__(self) -> int:
        return len(self.lines)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [MiniBatch.from_json(line) for line in self.lines[i]]
        return MiniBatch.from_json(self.lines[i])

    def item_counts(self, ordinals: np.ndarray) -> np.ndarray:
        """The planned item count of each of ``ordinals`` (ascending), their lines parsed together in C++ (the
        failed batches of a flaky million-batch job: 6.6 s one MiniBatch at a time)."""
        if not len(ordinals):
            return np.zeros(0, dtype=np.int64)
        lines = self.lines.take(ordinals) if isinstance(self.lines, ChunkedLines) else \
            [self.lines[int(o)] for o in ordinals]
        try:
            items = pa_json.read_json(pa.BufferReader(b"\n".join(lines)), parse_options=pa_json.ParseOptions(
                explicit_schema=pa.schema([("items", pa.int64())]), unexpected_field_behavior="ignore"))["items"]
        except pa.ArrowInvalid:
            items = None
        if items is None or len(items) != len(lines) or items.null_count:
            return np.array([MiniBatch.from_json(line).item_count for line in lines], dtype=np.int64)
        return items.to_numpy()

    def queued(self, i: int) -> QueuedBatch:
        """Batch ``i`` as the scheduler queues it: its line, unparsed."""
        return QueuedBatch(i, self.lines[i].decode())

    def queue(self, ordinals: np.ndarray) -> PendingQueue:
        """The batches ``ordinals`` (ascending) queued to run. Lines read on demand are read
        ``CHUNKS_READ_TOGETHER`` chunks at a time (concurrently), packed into the queue straight
        from their bytes (no object per batch: ten million queue in seconds) and forgotten: a
        million batches' lines are 150 MB as read."""
        queue = PendingQueue()
        if not len(ordinals):
            return queue
        if not isinstance(self.lines, ChunkedLines):
            queue.extend(self.queued(int(i)) for i in ordinals)
            return queue
        ends = np.searchsorted(ordinals, self.lines.ends)  # per chunk: where its pending ordinals end
        starts = np.concatenate(([0], ends[:-1]))
        holding = np.flatnonzero(ends > starts)  # the chunks that hold pending batches
        for g in range(0, len(holding), CHUNKS_READ_TOGETHER):
            group = holding[g:g + CHUNKS_READ_TOGETHER]
            self.lines.prefetch(ordinals[starts[group[0]]:ends[group[-1]]])
            for k in group.tolist():
                mine = ordinals[starts[k]:ends[k]]
                lines, first = self.lines.chunks[k], int(self.lines.ends[k - 1]) if k else 0
                queue.extend_lines(mine.tolist(), [lines[i] for i in (mine - first).tolist()])
            self.lines.forget()
        return queue

    def __eq__(self, other) -> bool:
        if isinstance(other, (list, Manifest)):
            return list(self) == list(other)
        return NotImplemented
