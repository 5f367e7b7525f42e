"""partition_keys: one mini-batch per distinct combination of key values.

A key's value comes from the file's path when every file has it there
(hive-style ``key=value`` folders, or MLTable's
``extract_columns_from_partition_format``), otherwise from a column in the
data (tables only), in which case each batch lists the files holding that
combination and the worker keeps only its rows. Planning needs the whole
listing (a combination may appear in any file), so it is not streamed.
"""

from __future__ import annotations

import datetime
import json
from typing import Iterator, Optional
from urllib.parse import unquote

import pyarrow as pa

from raypar.errors import SpecError
from raypar.inputs import tabular
from raypar.inputs.mltable import PartitionFormat
from raypar.inputs.source import Source


def path_values(source: Source, name: str, partition_format) -> dict:
    """Key values a file's path gives: MLTable's partition format if set, else hive folders."""
    if partition_format is not None:
        found = partition_format.extract(name)
        return {k: _jsonable(v) for k, v in (found or {}).items()}
    values = {}
    for segment in name.split("/")[:-1]:
        key, eq, value = segment.partition("=")
        if eq and key:
            values[unquote(key)] = unquote(value)
    return values


def plan(source: Source, keys: list[str]) -> Iterator[tuple[dict, list[str], list[str], list]]:
    """(key values, files, keys read from the data, pieces) per combination, in sorted key order."""
    fmt = source.desc.get("partition_format")
    partition_format = None
    if fmt:
        partition_format = PartitionFormat(fmt)
    names = list(source.files())
    if not names:
        return
    if source.desc["tabular"]:  # CSV "from_first_file": the first file in listing order has the header
        tabular.pieces_of_whole_file(source, names[0])
    from_path = {n: path_values(source, n, partition_format) for n in names}
    data_keys = [k for k in keys if not all(k in v for v in from_path.values())]
    if data_keys and not source.desc["tabular"]:
        missing = next(n for n in names if data_keys[0] not in from_path[n])
        raise SpecError(f"partition_keys: '{data_keys[0]}' is not in the path of {source.url(missing)} "
                        f"(expected a '{data_keys[0]}=value' folder); a key inside the data needs a table input "
                        f"(an MLTable with a read_* step, or raypar.input_format)")
    groups: dict[tuple, list[str]] = {}
    for name in names:
        known = {k: from_path[name][k] for k in keys if k not in data_keys}
        combos = _data_combinations(source, name, data_keys) if data_keys else [{}]
        for combo in combos:
            values = {**known, **combo}
            groups.setdefault(tuple(values[k] for k in keys), []).append(name)
    for combo in sorted(groups, key=_sort_key):
        files = groups[combo]
        pieces = [tabular.pieces_of_whole_file(source, n) for n in files] if source.desc["tabular"] else []
        yield dict(zip(keys, combo, strict=True)), files, data_keys, pieces


def key_values_in(source: Source, name: str, keys: list[str], data_keys: list[str]) -> list[tuple]:
    """The key combinations one file holds now (re-planning a file that changed)."""
    fmt = source.desc.get("partition_format")
    partition_format = None
    if fmt:
        partition_format = PartitionFormat(fmt)
    known = path_values(source, name, partition_format)
    return [tuple({**known, **combo}[k] for k in keys) for combo in _data_combinations(source, name, data_keys)]


def _data_combinations(source: Source, name: str, data_keys: list[str]) -> list[dict]:
    # CSV keys as text: "1" in one file and "eu" in another are values of one column, not int vs str.
    table = tabular.read_piece(source, tabular.pieces_of_whole_file(source, name), columns=data_keys,
                               text_columns=tuple(data_keys))
    missing = [k for k in data_keys if k not in table.column_names]
    if missing:
        raise SpecError(f"partition_keys: '{missing[0]}' is neither in the path nor a column of "
                        f"{source.url(name)}")
    if table.num_rows == 0:
        return []
    distinct = table.group_by(data_keys).aggregate([])
    return [{k: _jsonable(v) for k, v in row.items()} for row in distinct.to_pylist()]


def _jsonable(value):
    """Key values travel in the manifest as JSON: dates and times as ISO strings."""
    if isinstance(value, (datetime.date, datetime.datetime, datetime.time)):
        return value.isoformat()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _sort_key(combo: tuple):
    # Total across types (a key may be a number in one file and text in another).
    return tuple((v is None, type(v).__name__, v if isinstance(v, (int, float, str)) else json.dumps(v))
                 for v in combo)


def keep_rows(table, key: dict, data_keys: list[str], where: str):
    """Only the rows of ``table`` whose data keys equal the batch's values."""
    import pyarrow.compute as pc  # noqa: PLC0415 - lazy: only jobs of that format load it

    mask: Optional[object] = None
    for k in data_keys:
        column, value = table[k], key[k]
        if value is None:
            match = pc.is_null(column)
        else:
            try:
                scalar = pa.scalar(value).cast(column.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise ValueError(f"{where}: column '{k}' is {column.type}, cannot compare with {value!r}") from None
            match = pc.fill_null(pc.equal(column, scalar), False)
        mask = match if mask is None else pc.and_(mask, match)
    return table if mask is None else table.filter(mask)
