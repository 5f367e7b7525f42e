"""Failed records compacted: their columns in Arrow files, their tracebacks in pieces of their own.

A million failed attempts are a gigabyte of record files, nearly all of it tracebacks; ``raypar
status`` needs their columns and the last traceback of three batches. So a compaction keeps::

    failed-compact/<id>.arrow             the failed records read so far, as FAILED_SCHEMA's columns
                                          with the traceback as (piece, row) into the pieces below
    failed-compact/<id>.errors-NNNNN.arrow  the distinct tracebacks of a window of records, ERROR_ROWS
                                          a piece: written once, never merged or rewritten
    failed-compact/<id>.idx               sealed, written last (the compaction counts from then on):
                                          the column files and the pieces with their sha256, and the
                                          files of failed/ it covers ({name: bytes}: a segment up to
                                          its last whole line), and the segment folders of failed/
                                          it closed (raypar/jobdir/segment_folders.py)

The records in failed/ stay, as done records do: the compact files are a copy, for speed. A folder
of its own, so that a raypar that does not know it reads the records as before.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow as pa

from raypar.errors import LedgerError
from raypar.jobdir.records import _unseal
from raypar.jobdir.segment_folders import closed_of
from raypar.jobdir.tables import FAILED_SCHEMA, first_copies, to_ipc

FOLDER = "failed-compact"
ERROR_ROWS = 4096  # tracebacks a piece holds: a status reads the pieces of the few it shows
PIECES_AT_ONCE = 64  # pieces read together (a view of every record reads them all, a group at a time)
_ERROR = FAILED_SCHEMA.get_field_index("error")
# FAILED_SCHEMA with the traceback replaced by where it is: a piece (its place in the index) and a row.
COLUMNS = pa.schema([*(f for f in FAILED_SCHEMA if f.name != "error"),
                     pa.field("error_piece", pa.int32()), pa.field("error_row", pa.int32())])


@dataclass
class Compacted:
    """The newest intact compaction: its columns (COLUMNS), its pieces and what it covers."""

    table: pa.Table
    files: list
    pieces: list
    covers: dict
    url: str
    closed: dict  # the segment folders of failed/ it read whole (see raypar/jobdir/segment_folders.py)

    def whole(self, listed: dict[str, int]) -> bool:
        """Whether every file it names is listed ({path: size}) at the size it was written (a
        cheap check, from the listing: the sha256s are checked where a file is read)."""
        sizes = {os.path.basename(p): size for p, size in listed.items()}
        return all(sizes.get(f["file"]) == f.get("bytes", sizes.get(f["file"], -1))
                   for f in [*self.files, *self.pieces])

    def records(self, store, shown: Optional[np.ndarray] = None) -> pa.Table:
        """The records in FAILED_SCHEMA, with every traceback, or (``shown``) only those of these
        batches: only their pieces are read. A missing or damaged piece raises LedgerError."""
        table = self.table
        has = table.column("error_piece").is_valid().to_numpy(zero_copy_only=False)
        piece = table.column("error_piece").fill_null(0).to_numpy().astype(np.int64)
        wanted = has if shown is None else has & np.isin(table.column("ordinal").to_numpy(), shown)
        needed = np.unique(piece[wanted])
        texts, starts = self._pieces(store, needed)
        first = np.zeros(int(needed.max()) + 1 if len(needed) else 1, dtype=np.int64)
        first[needed] = starts
        rows = table.column("error_row").fill_null(0).to_numpy()
        indices = np.where(wanted, first[np.where(wanted, piece, 0)] + rows, 0)
        # Pieces of different windows may repeat a traceback: each row points at its first copy, as
        # the records' views hold one (the reports name a traceback written before by its index).
        indices = first_copies(texts)[indices] if len(texts) else indices
        error = pa.DictionaryArray.from_arrays(pa.array(indices.astype(np.int32), mask=~wanted), texts)
        table = table.drop_columns(["error_piece", "error_row"])
        return table.add_column(_ERROR, FAILED_SCHEMA.field("error"), error)

    def _pieces(self, store, needed: np.ndarray) -> tuple[pa.Array, np.ndarray]:
        """The tracebacks of the pieces ``needed`` (read PIECES_AT_ONCE at a time, concurrently), one
        after the other, and where each piece starts in them."""
        entries = [self.pieces[int(i)] for i in needed]
        texts, starts, at = [], [], 0
        for group in range(0, len(entries), PIECES_AT_ONCE):  # (not every piece's bytes held at once)
            some = entries[group:group + PIECES_AT_ONCE]
            paths = [store.path(FOLDER, e["file"]) for e in some]
            data = store.read_many(paths)
            for path, entry in zip(paths, some, strict=True):
                if path not in data or hashlib.sha256(data[path]).hexdigest() != entry["file_sha256"]:
                    raise LedgerError(f"{self.url}/{FOLDER}/{entry['file']}: missing or corrupted")
                column = pa.ipc.open_file(pa.BufferReader(data.pop(path))).read_all().column("error")
                texts.extend(chunk.cast(pa.large_string()) for chunk in column.chunks)  # (all of them: past 2 GiB)
                starts.append(at)
                at += len(column)
        joined = pa.concat_arrays(texts) if texts else pa.array([], pa.large_string())
        return joined, np.array(starts, dtype=np.int64)


def latest(store, url: str, sizes: dict[str, int], load: bool = True) -> Optional[Compacted]:
    """The newest compaction whose index is sealed and (``load``) whose column files are intact,
    read; an older one where the newest is damaged; None where there is none. ``load=False``: the
    newest sealed index, its columns not read (what an incremental compaction needs)."""
    for path in sorted((p for p in sizes if p.endswith(".idx")), reverse=True):
        index = _unseal(store.read_bytes(FOLDER, os.path.basename(path)))
        if index is None:
            continue
        files, pieces, covers, closed = index["files"], index["errors"], index["covers"], closed_of(index)
        if not load:
            return Compacted(COLUMNS.empty_table(), files, pieces, covers, url, closed)
        data = store.read_verified(FOLDER, files)
        if data is not None:
            tables = [pa.ipc.open_file(pa.BufferReader(d)).read_all() for d in data]
            table = pa.concat_tables(tables).unify_dictionaries() if tables else COLUMNS.empty_table()
            return Compacted(table, files, pieces, covers, url, closed)
    return None


def columns_of(table: pa.Table, first_piece: int) -> tuple[pa.Table, list[pa.Array]]:
    """A window of failed records (FAILED_SCHEMA) as COLUMNS, and its distinct tracebacks cut into
    pieces of ERROR_ROWS, numbered from ``first_piece``."""
    error = table.column("error").combine_chunks()
    valid = error.is_valid().to_numpy(zero_copy_only=False)
    index = error.indices.fill_null(0).to_numpy().astype(np.int64)
    piece = pa.array((first_piece + index // ERROR_ROWS).astype(np.int32), mask=~valid)
    row = pa.array((index % ERROR_ROWS).astype(np.int32), mask=~valid)
    columns = table.drop_columns(["error"]).append_column(COLUMNS.field("error_piece"), piece)
    columns = columns.append_column(COLUMNS.field("error_row"), row)
    texts = error.dictionary
    return columns, [texts.slice(i, ERROR_ROWS) for i in range(0, len(texts), ERROR_ROWS)]


def piece_bytes(texts: pa.Array) -> bytes:
    """One piece of tracebacks as an Arrow file (zstd): only the slice's texts are written, as a
    string array, as every raypar of format 4 reads them (a piece is far below 2 GiB)."""
    return to_ipc(pa.table({"error": texts.cast(pa.string())}))


def columns_bytes(tables: list[pa.Table]) -> tuple[bytes, int]:
    """Column tables as one Arrow file (zstd), and its row count."""
    table = pa.concat_tables(tables).unify_dictionaries().combine_chunks()
    return to_ipc(table), table.num_rows
