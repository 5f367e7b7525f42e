"""Tables (parquet, CSV, JSON lines): mini-batches of about ``mini_batch_size`` bytes.

Large files are cut inside: parquet by row groups, and by rows inside a row
group larger than the batch; CSV and JSON lines at line boundaries. A batch
never crosses a file boundary, except that small parquet files with the
same schema are put together (their schemas prove the rows concatenate).
A payload names byte or row ranges only, so a batch is read the same way on
every try, and every row of every file is in exactly one batch.

CSV cuts at newlines, which is wrong only inside a quoted value spanning
lines: with MLTable's ``support_multi_line: true`` (or a UTF-16/32 encoding,
where a newline is not one byte) files are never cut.
"""

from __future__ import annotations

import io
import json
import logging
import math
import threading
from typing import Any, Iterator, Optional

import pyarrow as pa

from raypar.credentials import describe_error
from raypar.errors import SpecError, StorageError
from raypar.inputs.source import Source, table_format_of

log = logging.getLogger("raypar")

KIND = "table"
_SCAN = 64 * 1024
_CODECS = {"utf8": "utf-8", "iso88591": "iso8859-1", "latin1": "latin-1", "ascii": "ascii",
           "utf16": "utf-16", "utf32": "utf-32", "utf8bom": "utf-8-sig", "windows1252": "cp1252"}
_UNCUTTABLE = {"utf16", "utf32"}


def file_format(source: Source, name: str) -> str:
    """The table format of one input file (the spec's, or from its extension)."""
    fmt = source.desc["format"]
    if fmt != "auto":
        return fmt
    found = table_format_of(name)
    if found is None:
        raise SpecError(f"{source.url(name)}: not a table file (.parquet, .csv, .tsv, .jsonl, .ndjson): a byte size "
                        f"for mini_batch_size reads the input as tables; give a file count such as '10' for lists "
                        f"of files, or set raypar.input_format")
    return found


def plan(source: Source, size: int) -> Iterator[tuple[list[dict], int]]:
    """Batches as (pieces, row count or 0 when unknown until read), in file order."""
    group: list[dict] = []
    group_rows, group_bytes, group_schema = 0, 0, None
    warned = False
    for name in source.files():
        fmt = file_format(source, name)
        if fmt == "parquet":
            meta = _parquet_meta(source, name)
            whole = meta.num_rows and _parquet_bytes(meta) <= size
            if whole and group and group_schema == meta.schema.to_arrow_schema() \
                    and group_bytes + _parquet_bytes(meta) <= size:
                group.append({"file": name, "rows": [0, meta.num_rows]})
                group_rows += meta.num_rows
                group_bytes += _parquet_bytes(meta)
                continue
            if group:
                yield group, group_rows
                group = []
            if whole:
                group, group_rows = [{"file": name, "rows": [0, meta.num_rows]}], meta.num_rows
                group_bytes, group_schema = _parquet_bytes(meta), meta.schema.to_arrow_schema()
                continue
            warned = warned or _warn_if_cut(source, name, meta, size)
            for start, end, row_group in _parquet_ranges(meta, size):
                piece = {"file": name, "rows": [start, end]}
                if row_group is not None:  # a slice: the driver sends a row group's slices to one worker
                    piece["row_group"] = row_group
                yield [piece], end - start
        else:
            if group:
                yield group, group_rows
                group = []
            for piece in _text_pieces(source, name, fmt, size):
                yield [piece], 0
    if group:
        yield group, group_rows


def pieces_of_whole_file(source: Source, name: str) -> dict:
    """One piece covering a whole file (partitioned inputs read files whole)."""
    fmt = file_format(source, name)
    if fmt == "parquet":
        return {"file": name, "rows": [0, _parquet_meta(source, name).num_rows]}
    return next(iter(_text_pieces(source, name, fmt, None)), {"file": name, "bytes": [0, 0], "format": fmt})


# -- parquet ---------------------------------------------------------------


def _parquet_meta(source: Source, name: str):
    import pyarrow.parquet as pq  # noqa: PLC0415 - lazy: only jobs of that format load it

    try:
        return pq.read_metadata(_open(source, name))
    except FileNotFoundError:
        raise SpecError(f"{source.url(name)}: input file not found") from None
    except (ValueError, pa.ArrowException) as exc:  # ArrowInvalid: not parquet, truncated footer
        if isinstance(exc, OSError):
            raise StorageError(f"{source.url(name)}: cannot read ({describe_error(exc)})") from None
        raise SpecError(f"{source.url(name)}: cannot read as parquet ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - auth, network: the storage, not the file
        raise StorageError(f"{source.url(name)}: cannot read ({describe_error(exc)})") from None


def _parquet_bytes(meta) -> int:
    return sum(_rg_bytes(meta.row_group(i)) for i in range(meta.num_row_groups))


def _rg_bytes(rg) -> int:
    # Compressed bytes on storage: what "a 64mb batch" of a parquet file means to its owner.
    return sum(rg.column(c).total_compressed_size for c in range(rg.num_columns))


def _warn_if_cut(source: Source, name: str, meta, size: int) -> bool:
    """Say, once per plan, that row groups are cut into slices (parquet decodes a row group whole)."""
    largest = max((_rg_bytes(meta.row_group(i)) for i in range(meta.num_row_groups)), default=0)
    if largest <= 2 * size:
        return False
    log.warning("parquet row groups of up to %.0f MiB (%s) are more than twice mini_batch_size (%s): each is cut "
                "into slices by rows, and the worker that runs them holds the whole row group decoded in memory "
                "(a row group split between workers is decoded by each). A mini_batch_size of at least %.0f MiB, "
                "or smaller row groups, avoids that",
                largest / 2**20, source.url(name), f"{size / 2**20:g} MiB", math.ceil(largest / 2 / 2**20))
    return True


def _parquet_ranges(meta, size: int) -> Iterator[tuple[int, int, Optional[int]]]:
    """Row ranges of about ``size`` bytes: whole row groups (row group None), or rows of a large
    one (its index).

    A row group up to twice the size stays whole: every slice of a row group decodes all of
    it (parquet reads a row group as one piece), so cutting one of 1.9x the size in two would
    decode it twice to save one batch's memory. Only larger row groups are cut.
    """
    start = row = acc = 0
    for i in range(meta.num_row_groups):
        rg = meta.row_group(i)
        rows, nbytes = rg.num_rows, _rg_bytes(rg)
        if nbytes > 2 * size:  # cut inside this row group, in equal row slices
            if row > start:
                yield start, row, None
            parts = math.ceil(nbytes / size)
            step = math.ceil(rows / parts)
            for lo in range(row, row + rows, step):
                yield lo, min(lo + step, row + rows), i
            row += rows
            start, acc = row, 0
            continue
        if acc and acc + nbytes > size:
            yield start, row, None
            start, acc = row, 0
        row += rows
        acc += nbytes
    if row > start:
        yield start, row, None


# -- CSV and JSON lines ------------------------------------------------------


def _text_pieces(source: Source, name: str, fmt: str, size: Optional[int]) -> Iterator[dict]:
    read = source.desc["read"]
    path = source.fs_path(name)
    try:
        total = source.fs.size(path)
    except FileNotFoundError:
        raise SpecError(f"{source.url(name)}: input file not found") from None
    if read.get("encoding") in _UNCUTTABLE:  # a newline is not one byte: the file is one piece, header inside
        if fmt == "csv" and read.get("header") == "from_first_file":
            raise SpecError(f"{source.url(name)}: header from_first_file is not supported with encoding "
                            f"{read['encoding']}; use all_files_same_headers or no_header")
        if total:
            yield {"file": name, "bytes": [0, total], "format": fmt,
                   "embedded_header": read.get("header", "all_files_same_headers") != "no_header"}
        return
    with source.fs.open(path, "rb") as f:
        start, header = 0, {}
        if fmt == "csv":
            start, header = _csv_header(read, source, name, f, total)
        cuttable = size is not None and not read.get("support_multi_line") \
            and read.get("encoding", "utf8") not in _UNCUTTABLE
        last = _data_end(f, start, total) if cuttable else total
        while start < last:  # blank lines at the end never make a batch of their own
            end = total if not cuttable or start + size >= last else _next_line_end(f, start + size, total)
            yield {"file": name, "bytes": [start, end], "format": fmt, **header}
            start = end


def _data_end(f, start: int, total: int) -> int:
    """The offset after the file's last non-blank byte (``start`` if there is none)."""
    end = total
    while end > start:
        lo = max(start, end - _SCAN)
        f.seek(lo)
        block = f.read(end - lo)
        kept = block.rstrip(b" \t\r\n")
        if kept:
            return lo + len(kept)
        end = lo
    return start


def _csv_header(read: dict, source: Source, name: str, f, total: int) -> tuple[int, dict]:
    """Where the file's data starts, and where its pieces find their header line."""
    mode = read.get("header", "all_files_same_headers")
    if mode == "no_header":
        return 0, {}
    if mode == "from_first_file" and source.first_header is not None \
            and source.first_header[0] != name:  # later files: all lines are data
        first, end = source.first_header
        return 0, {"header": end, "header_file": first}
    end = _next_line_end(f, 0, total)
    if source.first_header is None:
        source.first_header = (name, end)
    return end, {"header": end}


def first_file_header(source: Source, name: str) -> tuple[str, int]:
    """(name, end of its header line): what a "from_first_file" CSV's later files read their header from."""
    path = source.fs_path(name)
    with source.fs.open(path, "rb") as f:
        return name, _next_line_end(f, 0, source.fs.size(path))


def _next_line_end(f, pos: int, total: int) -> int:
    """The offset just after the first newline at or after ``pos`` (or the end)."""
    f.seek(pos)
    while pos < total:
        block = f.read(_SCAN)
        if not block:
            break
        at = block.find(b"\n")
        if at >= 0:
            return pos + at + 1
        pos += len(block)
    return total


# -- reading (workers) ---------------------------------------------------------


def _open(source: Source, name: str):
    path = source.fs_path(name)
    return path if source.is_local else source.fs.open(path, "rb")


def read_piece(source: Source, piece: dict, columns: Optional[list[str]] = None,
               text_columns: tuple = (), cache: Optional[RowGroupCache] = None):
    """One piece as a pyarrow Table; CSV ``text_columns`` are read as strings, not inferred.
    ``cache`` keeps a cut row group decoded for the next slice of it (a worker passes its own)."""
    if "rows" in piece:
        return _read_parquet_rows(source, piece["file"], *piece["rows"], columns, cache)
    if cache is not None:
        cache.keep(None, None)
    data = source.fs.cat_file(source.fs_path(piece["file"]), start=piece["bytes"][0], end=piece["bytes"][1])
    if piece["format"] == "json_lines":
        return _parse_json_lines(data, source.desc["read"], source.url(piece["file"]))
    header = b""
    if piece.get("header"):
        header_file = source.fs_path(piece.get("header_file", piece["file"]))
        header = source.fs.cat_file(header_file, start=0, end=piece["header"])
    return _parse_csv(header, data, source.desc["read"], source.url(piece["file"]), columns, text_columns,
                      embedded_header=piece.get("embedded_header", False))


class RowGroupCache:
    """The row groups a worker decoded last when its batch was a slice of them.

    A row group larger than twice ``mini_batch_size`` is cut into slices by
    rows, and parquet decodes a row group whole, so every slice would decode
    all of it again. The driver sends a row group's slices to the worker that
    took the first (Scheduler._reserve): each next slice is cut from the
    decoded row group instead. One entry, holding nothing more than the worker
    holds anyway while run() works on a slice (a slice shares its row group's
    buffers), let go before any other piece is read.
    """

    def __init__(self):
        self.lock = threading.Lock()  # the read-ahead thread and the batch's call both read
        self.key: Optional[tuple] = None  # (file, columns, first row, rows)
        self.table: Optional[pa.Table] = None

    def slice(self, name: str, columns, start: int, end: int) -> Optional[pa.Table]:
        with self.lock:
            if self.key is None or self.key[:2] != (name, columns):
                return None
            first, rows = self.key[2:]
            if first <= start and end <= first + rows:
                return self.table.slice(start - first, end - start)
            return None

    def keep(self, key: Optional[tuple], table: Optional[pa.Table]) -> None:
        with self.lock:
            self.key, self.table = key, table


def _read_parquet_rows(source: Source, name: str, start: int, end: int, columns,
                       cache: Optional[RowGroupCache] = None):
    import pyarrow.parquet as pq  # noqa: PLC0415 - lazy: only jobs of that format load it

    columns_key = tuple(columns) if columns is not None else None
    if cache is not None:
        if (cut := cache.slice(name, columns_key, start, end)) is not None:
            return cut
        cache.keep(None, None)  # let the last row group go before decoding another: not two at once
    pf = pq.ParquetFile(_open(source, name))
    groups, first, offset = [], None, 0
    for i in range(pf.metadata.num_row_groups):
        rows = pf.metadata.row_group(i).num_rows
        if offset < end and offset + rows > start:
            groups.append(i)
            first = offset if first is None else first
        offset += rows
    table = pf.read_row_groups(groups, columns=columns)
    first = first or 0
    if cache is not None:
        whole = start == first and end == first + table.num_rows
        cache.keep(None if whole else (name, columns_key, first, table.num_rows), None if whole else table)
    return table.slice(start - first, end - start)


def _parse_csv(header: bytes, data: bytes, read: dict, where: str, columns, text_columns=(),
               embedded_header: bool = False):
    import pyarrow.csv as pcsv  # noqa: PLC0415 - lazy: only jobs of that format load it

    encoding = _CODECS.get(read.get("encoding", "utf8"), "utf-8")
    delimiter = read.get("delimiter") or ("\t" if where.endswith(".tsv") else ",")
    if header.startswith(b"\xef\xbb\xbf"):
        header = header[3:]
    if data.startswith(b"\xef\xbb\xbf"):  # a headerless file's first piece (utf8bom, Excel exports)
        data = data[3:]
    no_header = not header and not embedded_header
    reading = pcsv.ReadOptions(encoding=encoding, autogenerate_column_names=no_header)
    parsing = pcsv.ParseOptions(delimiter=delimiter, newlines_in_values=bool(read.get("support_multi_line")))
    empty_is_null = not read.get("empty_as_string", False)
    try:
        as_text = _text_types(header + data, reading, parsing, read, text_columns, no_header)
        table = pcsv.read_csv(
            io.BytesIO(header + data), read_options=reading, parse_options=parsing,
            convert_options=pcsv.ConvertOptions(strings_can_be_null=empty_is_null, column_types=as_text,
                                                quoted_strings_can_be_null=empty_is_null),
        )
    except pa.ArrowInvalid as exc:
        if not data.strip():
            return pa.table({})
        raise ValueError(f"{where}: cannot parse as CSV ({exc})") from None
    if no_header:  # Azure names headerless columns Column1, Column2, ...
        table = table.rename_columns([f"Column{i + 1}" for i in range(table.num_columns)])
    if columns is not None:
        table = table.select([c for c in columns if c in table.column_names])
    return table


def _text_types(data: bytes, reading, parsing, read: dict, text_columns, no_header: bool) -> dict:
    """Columns to read as strings: all of them when types are not inferred, else ``text_columns``."""
    import pyarrow.csv as pcsv  # noqa: PLC0415 - lazy: only jobs of that format load it

    if read.get("infer_column_types") is not False and not text_columns:
        return {}
    names = pcsv.open_csv(io.BytesIO(data), read_options=reading, parse_options=parsing).schema.names  # 1st block
    if read.get("infer_column_types") is False:
        return {name: pa.string() for name in names}
    wanted = {f"Column{i + 1}": n for i, n in enumerate(names)} if no_header else {n: n for n in names}
    return {wanted[c]: pa.string() for c in text_columns if c in wanted}


def _parse_json_lines(data: bytes, read: dict, where: str):

    import pyarrow.json as pjson  # noqa: PLC0415 - lazy: only jobs of that format load it

    encoding = _CODECS.get(read.get("encoding", "utf8"), "utf-8")
    if encoding not in ("utf-8",):
        data = data.decode(encoding).encode()
    if not data.strip():
        return pa.table({})
    try:
        return pjson.read_json(io.BytesIO(data))
    except pa.ArrowInvalid as exc:
        if read.get("invalid_lines", "error") != "drop":
            raise ValueError(f"{where}: invalid JSON line ({exc})") from None
    rows: list[Any] = []
    for line in data.splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            rows.append(value)
    return pa.Table.from_pylist(rows)
