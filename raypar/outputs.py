"""Output rows: what one batch's part holds, and the final append-row file."""

from __future__ import annotations

import hashlib
import sys
from typing import Any, Optional

from .inputs.base import ordinal_of
from .ledger import Ledger, LedgerView
from .tables import DoneIndex
from .storage import atomic_output


class ResultError(TypeError):
    """run() returned something raypar cannot count or write."""


def count_and_serialize(result: Any, with_rows: bool, fmt: str = "text") -> tuple[int, Optional[bytes]]:
    """The number of succeeded items in ``result`` and, for append_row, its rows as bytes.

    A list or tuple element is one line via ``str()``; a DataFrame row is one
    line, space-separated, no header, no index (Azure's append_row format).
    """
    pd = sys.modules.get("pandas")  # a DataFrame means pandas is loaded; never import it here
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


class CorruptPartsError(Exception):
    """Parts whose content does not match the sha256 their done record holds."""

    def __init__(self, records):
        super().__init__(f"{len(records)} output part(s) failed verification")
        self.records = records


def assemble(ledger: Ledger, view: LedgerView, target: str, fmt: str = "text") -> int:
    """Write the rows of every done batch, in mini-batch order, to ``target`` atomically.

    Only parts named by done records are read, one per batch, so the file
    holds each batch's rows exactly once. Every part is checked against the
    sha256 in its record first; if any fails, nothing is published and
    CorruptPartsError names their records. Returns the number of bytes written.
    """
    written, corrupt = 0, []
    with atomic_output(target) as out:
        for record in sorted(view.done.values(), key=lambda r: ordinal_of(r.batch)) \
                if not isinstance(view.done, DoneIndex) else view.done.values():  # mini-batch order
            if record.part is None:
                continue
            data = ledger.read_rows(record)
            if record.part_sha256 is not None and hashlib.sha256(data).hexdigest() != record.part_sha256:
                corrupt.append(record)
                continue
            if not corrupt:
                out.write(data)
                written += len(data)
        if corrupt:
            raise CorruptPartsError(corrupt)  # aborts the atomic output: nothing is published
    return written
