"""Reports derived from the ledger at the end of every driver session.

Written to ``JOB_DIR/reports/`` (regenerated each session; the ledger stays the truth):

    processed_mini_batches.csv  one row per attempt: batch, run, attempt, status
                                (done / exception / timeout / worker-lost), node, worker,
                                start time, seconds, items in, succeeded, error (one line)
    errors/<batch>.txt          every failed attempt of that batch with its full traceback
    job_result.txt              the outcome in a few lines, and where to look next
    report.html                 one self-contained page: timeline, throughput, slowest, failures
                                (raypar/engine/report_html.py; also `raypar report JOB_DIR -o FILE`)
"""

from __future__ import annotations

import csv
import io
import time
from typing import Optional

from raypar.engine.status import failed_items_text
from raypar.inputs.base import ordinal_of
from raypar.jobdir.ledger import Ledger, LedgerView

STATUS_OF_KIND = {"user": "exception", "timeout": "timeout", "system": "worker-lost", "storage": "job-dir-error",
                  "raypar": "raypar-error"}
COLUMNS = ["batch", "run", "attempt", "status", "node", "worker", "started", "seconds",
           "items", "succeeded", "error"]


def last_line(error: str) -> str:
    """A recorded error's last non-empty line: a traceback's exception line."""
    lines = [line for line in error.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def attempt_rows(view: LedgerView) -> list[dict]:
    """Every recorded attempt, done or failed, ordered by batch, run and attempt."""
    rows = [
        {"batch": r.batch, "run": r.run, "attempt": r.attempt, "status": "done", "node": r.node,
         "worker": r.worker, "started": r.started, "seconds": r.seconds, "items": r.items,
         "succeeded": r.returned, "error": ""}
        for r in view.done.values()
    ]
    for records in view.failed.values():
        items = view.manifest[ordinal_of(records[0].batch)].item_count if view.manifest is not None else ""
        for r in records:
            rows.append({"batch": r.batch, "run": r.run, "attempt": r.attempt,
                         "status": STATUS_OF_KIND.get(r.kind, r.kind), "node": r.node, "worker": r.worker,
                         "started": r.started, "seconds": "", "items": r.items if r.items is not None else items,
                         "succeeded": 0, "error": last_line(r.error)})
    rows.sort(key=lambda row: (row["batch"], row["run"], row["attempt"]))
    for row in rows:
        if row["started"]:
            row["started"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(row["started"]))
    return rows


def report_files(ledger: Ledger, view: LedgerView, state: str, reason: str,
                 output: Optional[str]) -> dict[str, bytes]:
    """{path under the job dir: bytes} of the session's text reports."""
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(attempt_rows(view))
    files = {"reports/processed_mini_batches.csv": table.getvalue().encode()}
    for batch, records in view.failed.items():
        text = "".join(f"=== {r.batch} run {r.run} attempt {r.attempt}: {STATUS_OF_KIND.get(r.kind, r.kind)} "
                       f"on {r.worker or '?'} (node {r.node or '?'})\n{r.error.rstrip()}\n\n" for r in records)
        files[f"reports/errors/{batch}.txt"] = text.encode()
    counts = view.counts()
    lines = [
        f"state: {state}",
        *( [f"reason: {reason.splitlines()[0]}"] if reason else [] ),
        f"mini-batches: {counts['completed']} done, {counts['failed']} failed, "
        + (f"{counts['pending']} pending, {counts['total']} total" if counts["total"] is not None
           else "planning did not finish"),
        f"failed items: {failed_items_text(view.failed_items(), view.unreturned_items())}",
        f"output: {output or '(summary only)'}",
        "attempts: reports/processed_mini_batches.csv; tracebacks: reports/errors/<batch>.txt; "
        "worker logs: logs/ (or `raypar logs JOB_DIR`)",
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
