"""Reports derived from the ledger at the end of every driver session.

Written to ``JOB_DIR/reports/`` (regenerated each session; the ledger stays the truth):

    processed_mini_batches.csv  one row per attempt: batch, run, attempt, status
                                (done / exception / timeout / worker-lost), node, worker,
                                start time, seconds, items in, succeeded, error (one line)
    errors.txt                  every failed attempt with its full traceback, batch by batch
    job_result.txt              the outcome in a few lines, and where to look next
    report.html                 one self-contained page: timeline, throughput, slowest, failures
                                (raypar/engine/report_html.py; also `raypar report JOB_DIR -o FILE`)
"""

from __future__ import annotations

import collections
import csv
import io
from typing import Optional

import pyarrow as pa
import pyarrow.compute as pc

from raypar.engine.status import failed_items_text
from raypar.inputs.base import batch_id, ordinal_of
from raypar.jobdir.ledger import Ledger, LedgerView

STATUS_OF_KIND = {"user": "exception", "timeout": "timeout", "system": "worker-lost", "storage": "job-dir-error",
                  "raypar": "raypar-error"}
COLUMNS = ["batch", "run", "attempt", "status", "node", "worker", "started", "seconds",
           "items", "succeeded", "error"]
# The attempts as Arrow columns (the batch as its ordinal, to sort on).
ATTEMPTS = pa.schema([("ordinal", pa.int64()), ("run", pa.string()), ("attempt", pa.int64()),
                      ("status", pa.string()), ("node", pa.string()), ("worker", pa.string()),
                      ("started", pa.float64()), ("seconds", pa.float64()), ("items", pa.int64()),
                      ("succeeded", pa.int64()), ("error", pa.string())])
CSV_ROWS = 65_536  # attempts turned into Python values at a time: memory stays bounded
ERRORS = "reports/errors.txt"
COMMON_ERRORS = 3  # the most frequent error lines job_result.txt names
REMEMBERED_TRACEBACKS = 10_000  # distinct tracebacks errors.txt refers back to (the rest are written in full)


def last_line(error: str) -> str:
    """A recorded error's last non-empty line: a traceback's exception line."""
    lines = [line for line in error.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def attempts_table(view: LedgerView) -> pa.Table:
    """Every recorded attempt, done or failed, as Arrow columns (COLUMNS, ``ordinal`` for ``batch``)
    ordered by batch, run and attempt: built from the done records' columns, never a Python
    object per done batch (a million of them made this 14.7 s and a 1.3 GiB peak at a session's end)."""
    done = view.done.table
    count = done.num_rows
    tables = [pa.table({
        "ordinal": done["ordinal"], "run": done["run"].cast(pa.string()), "attempt": done["attempt"],
        "status": pa.repeat("done", count), "node": done["node"].cast(pa.string()),
        "worker": done["worker"].cast(pa.string()), "started": done["started"], "seconds": done["seconds"],
        "items": done["items"], "succeeded": done["returned"], "error": pa.repeat("", count),
    }, schema=ATTEMPTS)]
    failed = [r for records in view.failed.values() for r in records]
    if failed:
        def planned(r):
            return view.manifest[ordinal_of(r.batch)].item_count if view.manifest is not None else None

        tables.append(pa.table({
            "ordinal": [ordinal_of(r.batch) for r in failed], "run": [r.run for r in failed],
            "attempt": [r.attempt for r in failed], "status": [STATUS_OF_KIND.get(r.kind, r.kind) for r in failed],
            "node": [r.node for r in failed], "worker": [r.worker for r in failed],
            "started": [r.started for r in failed], "seconds": [None] * len(failed),
            "items": [r.items if r.items is not None else planned(r) for r in failed],
            "succeeded": [0] * len(failed), "error": [last_line(r.error) for r in failed],
        }, schema=ATTEMPTS))
    if len(tables) == 1:
        return tables[0]  # the done records alone: one per batch, already in batch order
    table = pa.concat_tables(tables)
    return table.take(pc.sort_indices(table, [("ordinal", "ascending"), ("run", "ascending"),
                                              ("attempt", "ascending")]))


def attempts_csv(view: LedgerView) -> bytes:
    """processed_mini_batches.csv: one row per attempt, ``started`` in UTC to the second."""
    table = attempts_table(view)
    out = io.BytesIO()
    text = io.TextIOWrapper(out, encoding="utf-8", newline="")  # encoded as written: one copy of the file
    writer = csv.writer(text)
    writer.writerow(COLUMNS)
    for chunk in table.to_batches(max_chunksize=CSV_ROWS):
        started = pc.strftime(pc.cast(pc.cast(pc.floor(chunk["started"]), pa.int64()), pa.timestamp("s", "UTC")),
                              format="%Y-%m-%dT%H:%M:%SZ")
        columns = [[batch_id(o) for o in chunk["ordinal"].to_pylist()],
                   *(chunk[name].to_pylist() for name in COLUMNS[1:6]), started.to_pylist(),
                   *(chunk[name].to_pylist() for name in COLUMNS[7:])]
        writer.writerows(zip(*columns, strict=True))
    text.flush()
    return out.getvalue()


def errors_text(view: LedgerView) -> bytes:
    """errors.txt: every failed attempt with its traceback, in batch order. One file however many
    batches failed: a file per failed batch cost a request each on object storage, at every
    session's end (10,000 failed batches: 25 s on Azurite, 3.6 s on local disk). A traceback
    written before is named, not written again: a bug that every batch hits made the file a
    gigabyte per million attempts of the same kilobyte."""
    out = io.BytesIO()
    text = io.TextIOWrapper(out, encoding="utf-8")  # encoded as written: one copy of the file
    first_of: dict[str, str] = {}  # traceback -> the attempt it was written under
    for batch in sorted(view.failed, key=ordinal_of):
        for r in view.failed[batch]:
            attempt = f"{r.batch} run {r.run} attempt {r.attempt}"
            error = r.error.rstrip()
            seen = first_of.get(error)
            if seen is None and len(first_of) < REMEMBERED_TRACEBACKS:
                first_of[error] = attempt
            text.write(f"=== {attempt}: {STATUS_OF_KIND.get(r.kind, r.kind)} on {r.worker or '?'} "
                       f"(node {r.node or '?'})\n{error if seen is None else f'(the same traceback as {seen})'}\n\n")
    text.flush()
    return out.getvalue()


def _ranked(counts: collections.Counter) -> list[tuple[str, int]]:
    """Most frequent first; ties in text order, so the same ledger gives the same report."""
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def error_summary(view: LedgerView) -> list[str]:
    """job_result.txt's lines on failed attempts: how many, and the most frequent error lines."""
    counts = collections.Counter(last_line(r.error) for records in view.failed.values() for r in records)
    if not counts:
        return []
    total = sum(counts.values())
    lines = [f"failed attempts: {total} in {len(view.failed)} mini-batch(es), tracebacks in {ERRORS} "
             f"(one mini-batch's: `raypar logs JOB_DIR --batch ID`); the most frequent errors:"]
    lines += [f"  {n}x {error or '(no message)'}" for error, n in _ranked(counts)[:COMMON_ERRORS]]
    if len(counts) > COMMON_ERRORS:  # messages that name their item differ: their exception types do not
        types = collections.Counter()
        for error, n in counts.items():
            types[error.split(":", 1)[0].strip() or "(no message)"] += n
        by_type = ", ".join(f"{n}x {name}" for name, n in _ranked(types)[:5])
        lines.append(f"  ... and {len(counts) - COMMON_ERRORS} other error line(s); by exception: {by_type}")
    return lines


def report_files(ledger: Ledger, view: LedgerView, state: str, reason: str,
                 output: Optional[str]) -> dict[str, bytes]:
    """{path under the job dir: bytes} of the session's text reports."""
    files = {"reports/processed_mini_batches.csv": attempts_csv(view)}
    files[ERRORS] = errors_text(view)  # empty when nothing failed: never a stale one from an earlier session
    counts = view.counts()
    lines = [
        f"state: {state}",
        *( [f"reason: {reason.splitlines()[0]}"] if reason else [] ),
        f"mini-batches: {counts['completed']} done, {counts['failed']} failed, "
        + (f"{counts['pending']} pending, {counts['total']} total" if counts["total"] is not None
           else "planning did not finish"),
        f"failed items: {failed_items_text(view.failed_items(), view.unreturned_items())}",
        f"output: {output or '(summary only)'}",
        *error_summary(view),
        "attempts: reports/processed_mini_batches.csv; worker logs: logs/ (or `raypar logs JOB_DIR`)",
    ]
    if state != "succeeded" or counts["failed"]:
        lines.append(f"continue: raypar resume {ledger.url}")
    files["reports/job_result.txt"] = ("\n".join(lines) + "\n").encode()
    return files


def batch_log_sections(ledger: Ledger, batch: str) -> list[tuple[str, str]]:
    """(log file, text) for every attempt of ``batch`` found in the worker logs.

    A section runs from the worker's ``begin`` marker to its ``end`` marker,
    or to the end of the file when the worker died mid-batch.
    """
    sections = []
    for path, text in ledger.worker_logs():
        current: Optional[list[str]] = None
        for line in text.splitlines():
            if line.startswith(f"[raypar] begin {batch} "):
                current = [line]
            elif current is not None:
                current.append(line)
                if line.startswith(f"[raypar] end {batch} "):
                    sections.append((path, "\n".join(current)))
                    current = None
        if current is not None:
            sections.append((path, "\n".join(current + ["[raypar] (log ends here: the worker was lost or killed)"])))
    return sections
