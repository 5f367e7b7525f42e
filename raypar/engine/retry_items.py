"""``raypar resume --retry-failed-items``: run again just the items run() reported failed.

A done batch with reported items is retired and replaced, in its place in the output, by two
batches (one sealed revision of the manifest, as for changed inputs: raypar/engine/replan.py):

- a **carry** batch of its other items, whose done record is the retired batch's own (its rows
  stay in the output as they are, and it never runs): ``Manifest.carried``;
- a **retry** batch of just the reported items (a batch of files: those files; a table batch:
  those rows, by place), which runs as any pending batch does.

The output then holds the batch's rows, then the rows of its retried items. Items that fail
again are reported by the retry batch, and can be retried again. Batches that failed whole
need no revision: a resume runs them again anyway.
"""

from __future__ import annotations

import json

from raypar.inputs import files as input_files
from raypar.inputs.base import MiniBatch
from raypar.jobdir.ledger import Ledger
from raypar.jobdir.tables import Manifest


def plan_item_retries(ledger: Ledger, manifest: Manifest) -> tuple[int, int]:
    """Write the revision; returns (retired batches, items planned again)."""
    # Not every record (see ReportedRecords), and no failed ones: their tracebacks are a gigabyte per million.
    reported = ledger.view(manifest, lean=True, reported=True, failed=False).reported
    runs, carried, items, ordinal = [], {}, 0, len(manifest)
    for old, text, count in zip(reported.column("ordinal").to_pylist(), reported.column("failed").to_pylist(),
                                reported.column("items").to_pylist(), strict=True):
        batch = manifest[old]
        places = sorted(p for group in json.loads(text).values() for p in group)
        failed = set(places)
        kept = [p for p in range(count) if p not in failed]
        carry = MiniBatch(ordinal=ordinal, kind=batch.kind, payload=_some(batch, kept),
                          item_count=len(kept))
        retry = MiniBatch(ordinal=ordinal + 1, kind=batch.kind, payload=_some(batch, places),
                          item_count=len(places))
        runs.append(([old], [carry, retry]))
        carried[ordinal] = old
        ordinal += 2
        items += len(places)
    if runs:
        ledger.write_revision(runs, {}, [], carried=carried)
    return len(runs), items


def _some(batch: MiniBatch, places: list[int]) -> dict:
    """The batch's payload for just the items at ``places`` (files by name, table rows by place)."""
    if batch.kind == input_files.KIND:
        return {**batch.payload, "files": [batch.payload["files"][p] for p in places]}
    before = batch.payload.get("take")
    return {**batch.payload, "take": [before[p] for p in places] if before is not None else places}
