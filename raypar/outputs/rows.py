"""What one batch's output part holds: run()'s result counted and, for append_row, serialized.

Runs in the workers. ``text`` (the default) is Azure's append_row format: the
part is the batch's lines. ``parquet`` stores the part as an Arrow IPC stream;
``csv`` and ``jsonl`` as the rows' final text after their schema (formats.py);
assembly (assembly.py, on the driver) writes one file of them at the end.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

from raypar.errors import ResultError
from raypar.outputs import formats as output_formats

FORMATS = ("text", "csv", "jsonl", "parquet")


def count_and_serialize(result: Any, with_rows: bool, fmt: str = "text") -> tuple[int, Optional[bytes]]:
    """The number of succeeded items in ``result`` and, for append_row, its rows as bytes.

    ``text``: a list or tuple element is one line via ``str()``; a DataFrame
    row is one line, space-separated, no header, no index (Azure's format);
    a pyarrow Table (``raypar.batch_format: pyarrow``) as its DataFrame.
    Table formats: the rows as an Arrow IPC stream; a DataFrame's columns
    (without the index), dict keys, ``c0, c1...`` for list/tuple elements, or
    one ``value`` column. An empty result is a part with no rows.
    """
    pd = sys.modules.get("pandas")  # a DataFrame means pandas is loaded; never import it here
    pa = sys.modules.get("pyarrow")  # likewise for a pyarrow Table
    if pa is not None and isinstance(result, pa.Table):
        if not with_rows:
            return result.num_rows, None
        if fmt == "text":
            result = result.to_pandas()
    is_frame = pd is not None and isinstance(result, pd.DataFrame)
    is_table = pa is not None and isinstance(result, pa.Table)
    if not is_frame and not is_table and not isinstance(result, (list, tuple)):
        raise ResultError(
            f"run() returned {type(result).__name__}; it must return a list, a tuple, a pandas DataFrame "
            f"or a pyarrow Table"
        )
    if not with_rows:
        return len(result), None
    if fmt != "text":

        if fmt not in output_formats.SINKS:
            raise ValueError(f"unknown append_row_format {fmt!r}; expected one of {FORMATS}")
        table = output_formats.to_table(result, pd)
        if fmt in output_formats.TEXT_MARKS:  # encoded here, copied by assembly (formats.py)
            return len(result), output_formats.encode_text_part(table, fmt)
        return len(result), output_formats.encode_part(table)
    if is_frame:
        text = result.to_csv(sep=" ", header=False, index=False) if len(result) else ""
        return len(result), text.encode()
    return len(result), "".join(f"{row}\n" for row in result).encode()
