"""Output rows: what one batch's part holds, and the final append-row file."""

from __future__ import annotations

from typing import Any, Optional

from .ledger import Ledger, LedgerView
from .storage import atomic_output


class ResultError(TypeError):
    """run() returned something raypar cannot count or write."""


def count_and_serialize(result: Any, with_rows: bool) -> tuple[int, Optional[bytes]]:
    """The number of succeeded items in ``result`` and, for append_row, its rows as bytes.

    A list or tuple element is one line via ``str()``; a DataFrame row is one
    line, space-separated, no header, no index (Azure's append_row format).
    """
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover - pandas is a dependency
        pd = None
    if pd is not None and isinstance(result, pd.DataFrame):
        if not with_rows:
            return len(result), None
        text = result.to_csv(sep=" ", header=False, index=False) if len(result) else ""
        return len(result), text.encode()
    if isinstance(result, (list, tuple)):
        if not with_rows:
            return len(result), None
        return len(result), "".join(f"{row}\n" for row in result).encode()
    raise ResultError(
        f"run() returned {type(result).__name__}; it must return a list, a tuple or a pandas DataFrame"
    )


def assemble(ledger: Ledger, view: LedgerView, target: str) -> int:
    """Write the rows of every done batch, in mini-batch order, to ``target`` atomically.

    Only parts named by done records are read, one per batch, so the file
    holds each batch's rows exactly once. Returns the number of bytes written.
    """
    written = 0
    with atomic_output(target) as out:
        for batch in view.manifest or []:
            record = view.done.get(batch.id)
            if record is None or record.part is None:
                continue
            data = ledger.read_part(record.part)
            out.write(data)
            written += len(data)
    return written
