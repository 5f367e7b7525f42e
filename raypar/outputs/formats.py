"""The table formats of append_row_to (csv, jsonl, parquet): parts as Arrow, one file at the end.

A worker turns what run() returned into an Arrow table and stores it as an
Arrow IPC stream (the part). The driver reads every part's schema, unifies
them, then streams the parts, in mini-batch order, through one writer. All
row work happens in Arrow's C++ kernels: no Python loop runs per row.

For ``csv`` and ``jsonl`` the worker also encodes the rows as the final text
(a *text part*: its schema, an empty Arrow stream's end, a marker, the text).
Assembly copies the text of every part whose schema is the output's, so on a
cluster the encoding is spread over the workers instead of left to the
driver at the end; a part whose schema differs (a column missing, a type
promoted) is read back from its text and encoded again. Only columns whose
text reads back exactly are sent as text (numbers, booleans, strings, nulls);
other parts stay Arrow streams.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from itertools import zip_longest
from typing import Any, Callable, Optional

import pyarrow as pa
import pyarrow.compute as pc

from raypar.errors import OutputSchemaError, ResultError
from raypar.outputs.jsonl import json_lines, string_offsets

IPC_OPTIONS = pa.ipc.IpcWriteOptions(compression=None)  # see encode_part
SCHEMA_HEAD = 4096  # bytes of a part read to find its schema (more only when the schema is larger)
FLUSH_ROWS = 1024 * 1024  # rows buffered before one write: one parquet row group
FLUSH_BYTES = 128 * 1024 * 1024  # ... or this many bytes of Arrow data
GROUP_BYTES = 8 * 1024 * 1024  # parts smaller than this are decoded in groups of up to this size
_EOS = b"\xff\xff\xff\xff\x00\x00\x00\x00"  # the end of an IPC stream
TEXT_MARKS = {"csv": b"RAYPAR:CSV\n", "jsonl": b"RAYPAR:JSONL\n"}  # after a text part's schema and _EOS
_CONVERSION_ERRORS = (pa.ArrowException, ValueError, TypeError, OverflowError)


# -- worker: run()'s result as a part --------------------------------------------------------------


def to_table(result: Any, pd: Any) -> pa.Table:
    """``result`` (a DataFrame or a list/tuple, checked by the caller) as an Arrow table."""
    try:
        if isinstance(result, pa.Table):
            table = result
        elif pd is not None and isinstance(result, pd.DataFrame):
            table = pa.Table.from_pandas(result, preserve_index=False)
        else:
            table = _rows_table(result)
    except ResultError:
        raise
    except _CONVERSION_ERRORS as exc:
        raise ResultError(f"run()'s rows cannot be written as a table: {conversion_error(exc)}") from None
    if len(set(table.column_names)) != table.num_columns:
        raise ResultError(f"run()'s rows have duplicate column names: {table.column_names}")
    # Plain columns: categoricals as their values, no pandas metadata; parts of all batches then unify.
    for i, field in enumerate(table.schema):
        if pa.types.is_dictionary(field.type):
            table = table.set_column(i, field.name, pc.cast(table.column(i), field.type.value_type))
    return table.replace_schema_metadata(None)


def _rows_table(rows) -> pa.Table:
    if not rows:
        return pa.table({})  # no columns: an empty batch adds none to the output
    types = set(map(type, rows))  # map/set: C loops, not Python ones
    kinds = {_shape(t) for t in types}
    if len(kinds) > 1:
        raise ResultError(f"run() returned a mix of {' and '.join(sorted(kinds))}; "
                          "every element must have the same shape: all dicts, all lists/tuples, or all values")
    kind = kinds.pop()
    if kind == "dicts":
        try:
            return pa.Table.from_struct_array(pa.array(rows))  # keys: their union; missing -> null
        except _CONVERSION_ERRORS as exc:
            keys = dict.fromkeys(k for row in rows for k in row)  # error path only: name the key
            bad = next((k for k in keys if not _converts([row.get(k) for row in rows])), None)
            raise ResultError(f"key {bad!r}: {conversion_error(exc)}" if bad is not None else conversion_error(exc)) from None
    if kind == "lists/tuples":
        names = getattr(rows[0], "_fields", None)  # namedtuples name their columns
        columns = list(zip_longest(*rows))  # short rows: null
        if not (names and len(types) == 1):
            names = [f"c{i}" for i in range(len(columns))]
        arrays = []
        for name, column in zip(names, columns, strict=True):
            try:
                arrays.append(pa.array(column))
            except _CONVERSION_ERRORS as exc:
                raise ResultError(f"column {name!r}: {conversion_error(exc)}") from None
        return pa.Table.from_arrays(arrays, names=list(names))
    return pa.table({"value": pa.array(rows)})


def _shape(kind: type) -> str:
    if issubclass(kind, dict):
        return "dicts"
    return "lists/tuples" if issubclass(kind, (list, tuple)) else "values"


def _converts(values) -> bool:
    try:
        pa.array(values)
        return True
    except _CONVERSION_ERRORS:
        return False


def conversion_error(exc: BaseException) -> str:
    """The error in one line (pandas conversion errors carry the column as a second argument)."""
    parts = [(str(arg).splitlines() or [""])[0] for arg in exc.args] if exc.args else [str(exc)]
    return "; ".join(p for p in parts if p) or type(exc).__name__


def encode_part(table: pa.Table) -> bytes:
    """An Arrow IPC stream: schema first, so assembly reads a part's schema from its head.

    Uncompressed: measured on local disk, lz4 cost workers ~10-15% more CPU
    (encode + checksum + write) for 3x smaller parts, and assembly took the same
    time either way (it is bound by writing the output file).
    """
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=IPC_OPTIONS) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def encode_text_part(table: pa.Table, fmt: str) -> bytes:
    """A text part (``csv`` or ``jsonl`` rows, encoded here), or an Arrow part when a column's text
    would not read back exactly."""
    if not table.num_columns or not all(map(_reads_back, table.schema.types)):
        return encode_part(table)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=IPC_OPTIONS):
        pass  # the schema, then the stream's end: no record batch
    pieces = [sink.getvalue(), TEXT_MARKS[fmt]]
    pieces += [_csv_bytes(table)] if fmt == "csv" else list(_jsonl_bytes(table))
    return b"".join(pieces)


def _reads_back(kind: pa.DataType) -> bool:
    """A column of this type read from its csv or jsonl text is the column written."""
    return (pa.types.is_null(kind) or pa.types.is_boolean(kind) or pa.types.is_integer(kind)
            or pa.types.is_float32(kind) or pa.types.is_float64(kind)
            or pa.types.is_string(kind) or pa.types.is_large_string(kind))


def text_of(part: bytes, need: int) -> Optional[tuple[str, memoryview]]:
    """(format, encoded rows) of a text part whose schema message is ``need`` bytes; None for an Arrow part."""
    if part[need:need + 8] != _EOS or len(part) == need + 8:
        return None
    rest = memoryview(part)[need + 8:]
    for fmt, mark in TEXT_MARKS.items():
        if rest[:len(mark)] == mark:
            return fmt, rest[len(mark):]
    return None


def read_text(fmt: str, text: memoryview, schema: pa.Schema) -> pa.Table:
    """The rows of a text part, as the table its worker encoded."""
    if not len(text):
        return schema.empty_table()
    if fmt == "csv":
        import pyarrow.csv as pa_csv  # noqa: PLC0415 - lazy: only jobs of that format load it

        return pa_csv.read_csv(
            pa.py_buffer(text), read_options=pa_csv.ReadOptions(column_names=schema.names),
            parse_options=pa_csv.ParseOptions(newlines_in_values=True),
            # Only an unquoted empty field is null (as written): "nan", "NA", "null" are values.
            convert_options=pa_csv.ConvertOptions(column_types=schema, null_values=[""], strings_can_be_null=True,
                                                  quoted_strings_can_be_null=False))
    import pyarrow.json as pa_json  # noqa: PLC0415 - lazy: only jobs of that format load it

    table = pa_json.read_json(pa.py_buffer(text), parse_options=pa_json.ParseOptions(explicit_schema=schema))
    return table.select(schema.names)


# -- driver: schemas ---------------------------------------------------------------------------------------


def head_size(head: bytes) -> int:
    """Bytes of a part needed to read its schema (the first IPC message), from its first 8 bytes."""
    if len(head) < 8 or head[:4] != b"\xff\xff\xff\xff":
        return 8
    return 8 + int.from_bytes(head[4:8], "little")


def schema_of(head: bytes) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(head))


def decode_part(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()


class SchemaUnion:
    """The schema every part is cast to, grown part by part; names the batches behind a conflict."""

    def __init__(self, fmt: str):
        self.fmt, self.schema, self.seen = fmt, pa.schema([]), set()
        self.origin: dict[str, str] = {}  # column -> the batch that gave it its current type

    def add(self, head: bytes, batch: str) -> None:
        """Add the schema of a part, from its first IPC message (``head``)."""
        if head in self.seen:  # most parts share a schema: one look-up of its bytes each
            return
        try:
            schema = schema_of(head)
        except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            raise OutputSchemaError(f"batch {batch}: its output part is not an Arrow stream ({conversion_error(exc)})") \
                from None
        try:
            merged = pa.unify_schemas([self.schema, schema], promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
            raise self._conflict(schema, batch, exc) from None
        for field in merged:
            old = self.schema.field(field.name) if field.name in self.schema.names else None
            if old is None or (old.type != field.type and not pa.types.is_null(field.type)):
                self.origin[field.name] = batch
        self.schema = merged
        self.seen.add(head)

    def _conflict(self, schema: pa.Schema, batch: str, exc: Exception) -> OutputSchemaError:
        for field in schema:
            if field.name in self.schema.names:
                mine = self.schema.field(field.name)
                try:
                    pa.unify_schemas([pa.schema([mine]), pa.schema([field])], promote_options="permissive")
                except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
                    return OutputSchemaError(
                        f"column {field.name!r} is {mine.type} in batch {self.origin.get(field.name)} "
                        f"but {field.type} in batch {batch}: their rows cannot share one {self.fmt} file")
        return OutputSchemaError(f"batch {batch}'s columns do not fit the others': {conversion_error(exc)}")

    def check(self) -> pa.Schema:
        """The final schema, if the format can hold every column."""
        if self.fmt == "csv":
            for field in self.schema:
                if pa.types.is_nested(field.type):
                    raise OutputSchemaError(
                        f"column {field.name!r} is {field.type} (from batch {self.origin.get(field.name)}): "
                        "csv cannot hold nested values; use append_row_format jsonl or parquet")
        return self.schema


def conform(table: pa.Table, schema: pa.Schema, batch: str) -> pa.Table:
    """``table`` with exactly ``schema``'s columns and types (missing columns: null)."""
    if table.schema.equals(schema):
        return table
    names, columns = set(table.column_names), []
    for field in schema:
        if field.name not in names:
            columns.append(pa.nulls(table.num_rows, field.type))
            continue
        column = table.column(field.name)
        if column.type != field.type:
            try:  # int64 -> double may round large ints: that is what the promotion means
                column = pc.cast(column, options=pc.CastOptions(field.type, allow_float_truncate=True))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise OutputSchemaError(f"column {field.name!r} of batch {batch} cannot be written as "
                                        f"{field.type}: {conversion_error(exc)}") from None
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=schema)


# -- driver: writers ------------------------------------------------------------------------------------------


class TableSink:
    """Writes parts (Arrow IPC streams) to ``out`` in ``schema``, in a few large writes.

    Consecutive small parts with the same schema are decoded as one stream
    (their record batches spliced after one schema message): per part, the
    cost is a memory copy, not an IPC reader, a cast and a table.
    """

    def __init__(self, out, schema: pa.Schema):
        self.shield = _Shield(out)
        self.stream = pa.BufferedOutputStream(pa.PythonFile(self.shield, mode="w"), buffer_size=8 << 20)
        self.schema, self.pending, self.rows, self.bytes = schema, [], 0, 0
        self.head, self.group, self.group_bytes, self.group_batches = None, [], 0, []
        self.output_heads: dict[bytes, bool] = {}  # a part's schema message -> it is the output's schema

    text_format: Optional[str] = None  # the text parts this file is made of, copied as they are

    def _is_output_schema(self, head: bytes) -> bool:
        if head not in self.output_heads:
            self.output_heads[head] = schema_of(head).equals(self.schema)
        return self.output_heads[head]

    def __enter__(self) -> TableSink:
        return self

    def __exit__(self, kind, *_) -> None:
        if kind is None:
            self.close()
        else:
            self.shield.out = None  # failed: nothing more reaches the file, which is discarded

    def write(self, part: bytes, batch: str) -> None:
        """Add the rows of one part (``batch``'s)."""
        need = head_size(part)
        text = text_of(part, need)
        if text is not None:
            self._decode_group()
            if text[0] == self.text_format and self._is_output_schema(part[:need]):
                self.flush()
                self.stream.write(text[1])  # encoded by its worker as this file wants it: copied
            else:
                self._add(conform(read_text(*text, schema_of(part[:need])), self.schema, batch))
            return
        if len(part) >= GROUP_BYTES or part[-8:] != _EOS:
            self._decode_group()
            self._add(conform(decode_part(part), self.schema, batch))
            return
        if part[:need] != self.head or self.group_bytes + len(part) > GROUP_BYTES:
            self._decode_group()
            self.head = part[:need]
        self.group.append(memoryview(part)[need:-8])  # its record batches, without schema and end marker
        self.group_bytes += len(part)
        self.group_batches.append(batch)

    def _decode_group(self) -> None:
        if not self.group:
            return
        table = decode_part(b"".join([self.head, *self.group, _EOS]))
        first, last = self.group_batches[0], self.group_batches[-1]
        self.head, self.group, self.group_bytes, self.group_batches = None, [], 0, []
        self._add(conform(table, self.schema, first if first == last else f"{first}..{last}"))

    def _add(self, table: pa.Table) -> None:
        size = table.get_total_buffer_size()  # not nbytes: that one is slow on small tables
        if self.pending and (self.rows + table.num_rows > FLUSH_ROWS or self.bytes + size > FLUSH_BYTES):
            self.flush()  # before this table: each write (parquet row group) stays within the limits
        self.pending.append(table)
        self.rows += table.num_rows
        self.bytes += size

    def flush(self) -> None:
        if not self.rows:
            self.pending.clear()
            return
        table = pa.concat_tables(self.pending)
        chunks = table.column(0).num_chunks if table.num_columns else 0
        if chunks > 1 and self.bytes < chunks * (1 << 20):
            table = table.combine_chunks()  # many small parts: one array per column, fewer kernel calls
        self.pending, self.rows, self.bytes = [], 0, 0
        self._write(table)

    def close(self) -> None:
        self._decode_group()
        self.flush()
        self._close()
        self.stream.close()  # the caller's file stays open (_Shield): atomic_output publishes it

    def _write(self, table: pa.Table) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        pass


class _Shield:
    """``out`` for pyarrow, minus close(): only atomic_output may close (publish) the file."""

    closed = False

    def __init__(self, out):
        self.out = out

    def write(self, data) -> int:
        return self.out.write(data) if self.out is not None else len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def writable(self) -> bool:
        return True


class CsvSink(TableSink):
    """CSV with one header line. The workers' text parts are copied; Arrow parts are encoded here,
    in slices on all cores (pyarrow releases the GIL)."""

    text_format = "csv"

    def __init__(self, out, schema):
        super().__init__(out, schema)

        self.threads = os.cpu_count() or 1
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="raypar-csv")
        # No columns (every batch returned nothing): an empty file, not an empty header line.
        if len(schema):
            self.stream.write(_csv_bytes(schema.empty_table(), header=True))

    def _write(self, table):
        if not table.num_columns:
            return
        step = max(1, -(-table.num_rows // (4 * self.threads)))
        slices = [table.slice(i, step) for i in range(0, table.num_rows, step)]
        for data in self.pool.map(_csv_bytes, slices):  # in order
            self.stream.write(data)

    def __exit__(self, kind, *rest) -> None:
        try:
            super().__exit__(kind, *rest)
        finally:
            self.pool.shutdown()


def _csv_bytes(table: pa.Table, header: bool = False) -> pa.Buffer:
    import pyarrow.csv as pa_csv  # noqa: PLC0415 - lazy: only jobs of that format load it

    sink = pa.BufferOutputStream()
    pa_csv.write_csv(table, sink, pa_csv.WriteOptions(include_header=header))
    return sink.getvalue()


class ParquetSink(TableSink):
    """One parquet file; its writer is made at the first write, which picks the dictionary columns."""

    def __init__(self, out, schema):
        super().__init__(out, schema)
        self.writer = None

    def _write(self, table):
        if self.writer is None:
            self._open(_dictionary_columns(table))
        self.writer.write_table(table, row_group_size=FLUSH_ROWS)

    def _close(self):
        if self.writer is None:
            self._open(True)
        self.writer.close()

    def _open(self, dictionary) -> None:
        import pyarrow.parquet as pq  # noqa: PLC0415 - lazy: only jobs of that format load it

        self.writer = pq.ParquetWriter(self.stream, self.schema, use_dictionary=dictionary)


def _dictionary_columns(table: pa.Table):
    """The columns whose first rows repeat values: dictionary encoding pays off only for those.

    On unique values (ids, float scores) it costs most of the write time and
    makes the file larger, until parquet gives up on it page by page.
    """
    if any(pa.types.is_nested(field.type) for field in table.schema):
        return True  # use_dictionary names leaf paths; keep parquet's default for nested columns
    sample, names = table.slice(0, 65536), []
    for name, column in zip(sample.column_names, sample.columns, strict=True):
        if pa.types.is_null(column.type) or pa.types.is_boolean(column.type):
            continue  # parquet never dictionary-encodes these
        try:
            repeats = pc.count_distinct(column).as_py() <= len(column) // 2
        except pa.ArrowNotImplementedError:
            repeats = True
        if repeats:
            names.append(name)
    return names


class JsonlSink(TableSink):
    """JSON lines (see jsonl.py). The workers' text parts are copied."""

    text_format = "jsonl"

    def _write(self, table):
        if not table.num_columns:
            return
        for data in _jsonl_bytes(table):
            self.stream.write(data)


def _jsonl_bytes(table: pa.Table):
    """The rows as JSON lines, in slices of ~64 MiB of Arrow data (their text stays well within
    one array's limits)."""
    per_slice = max(1, int(table.num_rows * (64 << 20) / max(table.get_total_buffer_size(), 1)))
    for batch in table.to_batches(max_chunksize=per_slice):
        lines = json_lines(batch)
        ends = string_offsets(lines)
        yield lines.buffers()[2][ends[0]:ends[-1]]  # the lines, back to back

SINKS: dict[str, Callable[[Any, pa.Schema], TableSink]] = {
    "csv": CsvSink, "jsonl": JsonlSink, "parquet": ParquetSink,
}
