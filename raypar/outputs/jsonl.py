"""JSON lines from Arrow columns: one JSON object per row, built with whole-column kernels.

Used by the ``jsonl`` append_row_format (output_formats.JsonlSink); no Python loop runs per row.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc


def json_lines(batch: pa.RecordBatch) -> pa.Array:
    """One JSON object per row, each ending in a newline, built from whole-column kernels."""
    pieces, close = [], "{"
    for field, column in zip(batch.schema, batch.columns, strict=True):
        text, quoted = json_values(column)
        text = text.cast(_TEXT)
        key = close + json.dumps(field.name, ensure_ascii=False) + ":"
        if quoted and text.null_count == 0:  # the quotes go into the separators: no extra pass
            pieces += [_lit(key + '"'), text]
            close = '",'
        else:
            if quoted:
                text = _quote(text)
            pieces += [_lit(key), pc.fill_null(text, _lit("null")) if text.null_count else text]
            close = ","
    pieces.append(_lit(close[:-1] + "}\n"))
    return pc.binary_join_element_wise(*pieces, _lit(""))


_TEXT = pa.large_string()  # every piece of JSON text: kernels need one string type


def _lit(text: str) -> pa.Scalar:
    return pa.scalar(text, _TEXT)


def _quote(text: pa.Array) -> pa.Array:
    return pc.binary_join_element_wise(_lit('"'), text.cast(_TEXT), _lit('"'), _lit(""))


def json_values(array: pa.Array) -> tuple[pa.Array, bool]:
    """(JSON text of each value, null where null; True if the text still needs its quotes)."""
    kind = array.type
    if pa.types.is_null(kind):
        return pa.nulls(len(array), pa.string()), False
    if pa.types.is_boolean(kind):
        return pc.if_else(array, "true", "false"), False
    if pa.types.is_integer(kind) or pa.types.is_decimal(kind):
        return pc.cast(array, pa.string()), False
    if pa.types.is_floating(kind):
        if pa.types.is_float16(kind):
            array = pc.cast(array, pa.float32())
        finite = pc.is_finite(array)
        text = pc.cast(array, pa.string())
        return (text if pc.all(finite).as_py() is not False else pc.if_else(finite, text, None)), False
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind):
        return _escape(array), True
    if pa.types.is_timestamp(kind):
        if kind.tz is not None:
            array = pc.cast(array, pa.timestamp(kind.unit, "UTC"))  # ends in "Z"
        return pc.replace_substring(pc.cast(array, pa.string()), " ", "T", max_replacements=1), True
    if pa.types.is_date(kind) or pa.types.is_time(kind):
        return pc.cast(array, pa.string()), True
    if pa.types.is_dictionary(kind):
        return json_values(pc.cast(array, kind.value_type))
    if pa.types.is_fixed_size_list(kind):
        return json_values(pc.cast(array, pa.list_(kind.value_field)))
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return _json_list(array), False
    if pa.types.is_struct(kind):
        return _json_struct(array), False
    return _json_python(array), False


def _json_list(array) -> pa.Array:
    values = array.values.slice(array.offsets[0].as_py(), array.offsets[-1].as_py() - array.offsets[0].as_py())
    text, quoted = json_values(values)
    text = pc.fill_null(_quote(text) if quoted else text.cast(_TEXT), _lit("null"))
    offsets = pc.subtract(array.offsets, array.offsets[0])
    cls = pa.LargeListArray if pa.types.is_large_list(array.type) else pa.ListArray
    joined = pc.binary_join(cls.from_arrays(offsets, text, mask=array.is_null()), _lit(","))
    return pc.binary_join_element_wise(_lit("["), joined, _lit("]"), _lit(""))


def _json_struct(array) -> pa.Array:
    if array.type.num_fields == 0:
        return pc.if_else(array.is_valid(), _lit("{}"), pa.scalar(None, _TEXT))
    rows = json_lines(pa.RecordBatch.from_arrays(array.flatten(), names=[f.name for f in array.type]))
    rows = pc.utf8_slice_codeunits(rows, 0, -1)  # without the newline
    return pc.if_else(array.is_valid(), rows, pa.scalar(None, _TEXT)) if array.null_count else rows


def _json_python(array) -> pa.Array:
    """Types without a kernel (binary, durations, maps...): per value, in Python; rare in outputs."""
    return pa.array([None if v is None else json.dumps(v, ensure_ascii=False, default=_json_default)
                     for v in array.to_pylist()], pa.string())


def _json_default(value) -> Any:
    if isinstance(value, bytes):

        return base64.b64encode(value).decode("ascii")
    return str(value)


_ESCAPES = {0x5C: "\\\\", 0x22: '\\"', 0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t", 0x08: "\\b", 0x0C: "\\f"}


def _escape(array: pa.Array) -> pa.Array:
    """Strings with JSON escapes, via whole-column replaces of only the characters present."""
    import numpy as np  # noqa: PLC0415 - lazy: only arrays of numbers need it

    if isinstance(array, pa.ChunkedArray) or pa.types.is_string_view(array.type):
        array = pc.cast(array, pa.large_string())
    offsets = string_offsets(array)
    data = np.frombuffer(array.buffers()[2] or b"", dtype=np.uint8)[offsets[0]:offsets[-1]]
    # UTF-8 continuation bytes are >= 0x80, so these bytes are always the ASCII characters themselves.
    special = np.unique(data[(data < 0x20) | (data == 0x22) | (data == 0x5C)])
    for code in sorted(special.tolist(), key=lambda c: c != 0x5C):  # backslashes first
        array = pc.replace_substring(array, chr(code), _ESCAPES.get(code, f"\\u{code:04x}"))
    return array


def string_offsets(array: pa.Array):
    """The value offsets of a string array (numpy, zero-copy), ``len(array) + 1`` of them."""
    import numpy as np  # noqa: PLC0415 - lazy: only arrays of numbers need it

    kind = np.int64 if pa.types.is_large_string(array.type) else np.int32
    return np.frombuffer(array.buffers()[1], dtype=kind)[array.offset:array.offset + len(array) + 1]
