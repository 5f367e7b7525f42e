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
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

from raypar.engine.status import failed_items_text
from raypar.engine.worker_time import TimeSplit, job_total, sessions_text
from raypar.inputs.base import batch_ids
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


# The last line holding more than whitespace, and only whitespace after it: what last_line() finds, by
# Arrow (RE2, linear time) in place. Line breaks as str.splitlines() breaks lines.
_BREAKS = r"\n\r\x0b\x0c\x1c\x1d\x1e\x{85}\x{2028}\x{2029}"
_SPACES = _BREAKS + r"\t \x{a0}\x{1680}\x{2000}-\x{200a}\x{202f}\x{205f}\x{3000}"  # str.isspace()'s
_LAST_LINE = rf"(?P<line>[^{_BREAKS}]*[^{_SPACES}][^{_BREAKS}]*)[{_SPACES}]*$"


def last_lines(errors) -> pa.Array:
    """last_line of each error of a dictionary-encoded column (a view's failed records), worked out
    once per distinct error: a million attempts of one bug split one traceback, not a million. In
    Arrow: the distinct tracebacks were copied into Python strings (gigabytes where each names its item)."""
    encoded = _dictionary(errors)
    if not pa.types.is_dictionary(encoded.type):
        encoded = encoded.dictionary_encode()
    found = pc.extract_regex(encoded.dictionary, _LAST_LINE).field("line")
    lines = pc.utf8_trim_whitespace(found).fill_null("").cast(pa.string())  # (no line: blank, or nothing)
    return lines.take(encoded.indices)


def status_of_kinds(kinds) -> pa.Array:
    """STATUS_OF_KIND of a dictionary-encoded column of failure kinds."""
    encoded = _dictionary(kinds)
    return pa.array([STATUS_OF_KIND.get(k, k) for k in encoded.dictionary.to_pylist()], pa.string()).take(
        encoded.indices)


def attempt_slices(view: LedgerView) -> Iterator[pa.Table]:
    """Every recorded attempt, done or failed, as tables of at most CSV_ROWS rows in ATTEMPTS (the
    batch as its ordinal), ordered by batch, run and attempt. Only the sort keys are ordered as a
    whole; each slice's rows are taken from the records' columns when it is written (a million
    failed attempts: the whole table sorted at once was half a gigabyte more at a session's end)."""
    done, failed = view.done.table, view.failed.table
    runs = sorted({*_dictionary(done["run"]).dictionary.to_pylist(), *_dictionary(failed["run"]).dictionary.to_pylist()})
    keys = [np.concatenate([table[name].to_numpy() if name != "run" else _ranks(table["run"], runs)
                            for table in (done, failed)]) for name in ("attempt", "run", "ordinal")]
    order = np.lexsort(keys)  # the last key first: ordinal, then run, then attempt
    # worked out for all failed attempts at once: a slice shares the whole column's dictionary
    items, errors = (_failed_items(view), last_lines(failed["error"])) if failed.num_rows else (None, None)
    for at in range(0, len(order), CSV_ROWS):
        rows = order[at:at + CSV_ROWS]
        is_done = rows < done.num_rows
        mine = pa.array(rows[~is_done] - done.num_rows)
        part = pa.concat_tables([_done_attempts(done.take(pa.array(rows[is_done]))),
                                 _failed_attempts(failed.take(mine), items.take(mine) if items is not None else None,
                                                  errors.take(mine) if errors is not None else None)])
        place = np.where(is_done, np.cumsum(is_done) - 1, np.count_nonzero(is_done) + np.cumsum(~is_done) - 1)
        yield part.take(pa.array(place))


def _dictionary(column) -> pa.DictionaryArray:
    """A column (chunked or not) as one array: a view's columns are dictionary-encoded."""
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def _ranks(column, names: list[str]) -> np.ndarray:
    """Per row of a dictionary-encoded column: its value's place in ``names`` (sorted)."""
    encoded = _dictionary(column)
    at = np.searchsorted(np.array(names, dtype=object), np.array(encoded.dictionary.to_pylist(), dtype=object))
    return at.astype(np.int64)[encoded.indices.to_numpy(zero_copy_only=False)] if len(encoded) else \
        np.zeros(0, np.int64)


def _done_attempts(done: pa.Table) -> pa.Table:
    count = done.num_rows
    return pa.table({
        "ordinal": done["ordinal"], "run": done["run"].cast(pa.string()), "attempt": done["attempt"],
        "status": pa.repeat("done", count), "node": done["node"].cast(pa.string()),
        "worker": done["worker"].cast(pa.string()), "started": done["started"], "seconds": done["seconds"],
        "items": done["items"], "succeeded": done["returned"], "error": pa.repeat("", count),
    }, schema=ATTEMPTS)


def _failed_attempts(failed: pa.Table, items: Optional[pa.Array], errors: Optional[pa.Array]) -> pa.Table:
    count = failed.num_rows
    if not count:
        return ATTEMPTS.empty_table()
    return pa.table({
        "ordinal": failed["ordinal"], "run": failed["run"].cast(pa.string()), "attempt": failed["attempt"],
        "status": status_of_kinds(failed["kind"]), "node": failed["node"].cast(pa.string()),
        "worker": failed["worker"].cast(pa.string()), "started": failed["started"],
        "seconds": pa.nulls(count, pa.float64()), "items": items, "succeeded": pa.repeat(0, count),
        "error": errors.fill_null(""),
    }, schema=ATTEMPTS)


def _failed_items(view: LedgerView) -> pa.Array:
    """Per failed attempt: the items it read, or its batch's planned count (looked up once a batch)."""
    failed = view.failed
    items = failed.table.column("items").combine_chunks()
    if view.manifest is None or not items.null_count:
        return items
    unknown = np.unique(failed.ordinals[items.is_null().to_numpy(zero_copy_only=False)])
    planned = view.planned_items(unknown)
    at = np.searchsorted(unknown, failed.ordinals).clip(0, max(len(unknown) - 1, 0))
    return pc.coalesce(items, pa.array(planned[at] if len(unknown) else np.zeros(len(at), np.int64)))


def write_attempts_csv(view: LedgerView, out) -> None:
    """processed_mini_batches.csv to the binary file ``out``: one row per attempt, ``started`` in UTC
    to the second. Arrow's CSV writer, CSV_ROWS attempts at a time: a million attempts were 2.9 s
    of Python's csv module and a Python value each, and the whole file in memory twice."""
    schema = pa.schema([pa.field(name, pa.string() if name in ("batch", "started") else ATTEMPTS.field(name).type)
                        for name in COLUMNS])
    with pa_csv.CSVWriter(out, schema) as writer:
        for part in attempt_slices(view):
            started = pc.strftime(pc.cast(pc.cast(pc.floor(part["started"]), pa.int64()), pa.timestamp("s", "UTC")),
                                  format="%Y-%m-%dT%H:%M:%SZ")
            writer.write_table(pa.table([batch_ids(part["ordinal"]), *(part[n] for n in COLUMNS[1:6]), started,
                                         *(part[n] for n in COLUMNS[7:])], schema=schema))


def write_errors_text(view: LedgerView, out) -> None:
    """errors.txt to the binary file ``out``: every failed attempt with its traceback, in batch order.
    One file however many batches failed: a file per failed batch cost a request each on object
    storage, at every session's end (10,000 failed batches: 25 s on Azurite, 3.6 s on local disk).
    A traceback written before is named, not written again: a bug that every batch hits made the
    file a gigabyte per million attempts of the same kilobyte. Composed by Arrow, CSV_ROWS
    attempts at a time (a Python loop over a million attempts took 3.7 s)."""
    failed = view.failed.table
    if not failed.num_rows:
        return
    errors = failed.column("error").combine_chunks()
    index = errors.indices.to_numpy(zero_copy_only=False)
    distinct, first = np.unique(index, return_index=True)  # each distinct traceback's first attempt
    first_of = np.zeros(len(errors.dictionary), dtype=np.int64)
    first_of[distinct] = first
    remembered = np.zeros(len(errors.dictionary), dtype=bool)  # the first REMEMBERED_TRACEBACKS seen
    remembered[distinct[np.argsort(first)][:REMEMBERED_TRACEBACKS]] = True
    in_full = (first_of[index] == np.arange(len(index))) | ~remembered[index]
    attempt = pc.binary_join_element_wise(batch_ids(failed["ordinal"]), " run ", failed["run"].cast(pa.string()),
                                          " attempt ", failed["attempt"].cast(pa.string()), "")
    for at in range(0, failed.num_rows, CSV_ROWS):
        rows = slice(at, at + CSV_ROWS)
        same = pc.binary_join_element_wise("(the same traceback as ", attempt.take(pa.array(first_of[index[rows]])),
                                           ")", "").cast(pa.large_string())
        tracebacks = pc.utf8_rtrim_whitespace(errors.dictionary.take(pa.array(index[rows]))).cast(pa.large_string())
        body = pc.if_else(pa.array(in_full[rows]), tracebacks, same)  # (trimmed a slice at a time: distinct ones
        # that name their item are a gigabyte per million)
        part = failed.slice(at, CSV_ROWS)
        header = pc.binary_join_element_wise(
            "=== ", attempt[rows], ": ", status_of_kinds(part["kind"]), " on ",
            part["worker"].cast(pa.string()).fill_null("?"), " (node ", part["node"].cast(pa.string()).fill_null("?"),
            ")\n", "").cast(pa.large_string())
        out.write(_values(pc.binary_join_element_wise(header, body, pa.scalar("\n\n", pa.large_string()),
                                                      pa.scalar("", pa.large_string()))))


def _values(strings) -> memoryview:
    """The bytes of an Arrow (large) string array's values back to back (no nulls)."""
    strings = strings.combine_chunks() if isinstance(strings, pa.ChunkedArray) else strings
    offsets = np.frombuffer(strings.buffers()[1], dtype=np.int64, count=len(strings) + 1, offset=8 * strings.offset)
    return memoryview(strings.buffers()[2])[offsets[0]:offsets[-1]]


def _ranked(counts: collections.Counter) -> list[tuple[str, int]]:
    """Most frequent first; ties in text order, so the same ledger gives the same report."""
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def error_summary(view: LedgerView) -> list[str]:
    """job_result.txt's lines on failed attempts: how many, and the most frequent error lines."""
    errors = view.failed.table.column("error")
    if not len(errors):
        return []
    counts = collections.Counter()
    for row in pc.value_counts(last_lines(errors)).to_pylist():
        counts[row["values"]] += row["counts"]
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


def write_reports(ledger: Ledger, view: LedgerView, state: str, reason: str, output: Optional[str],
                  more: Optional[dict[str, bytes]] = None, worker_time: Optional[TimeSplit] = None) -> None:
    """Store the session's text reports, and ``more`` ({path under the job dir: bytes}), in the job
    dir. The two that grow with the attempts are written as they are composed (uploaded while
    composed on object stores), never whole in memory."""
    with ledger.store.writing("reports", "processed_mini_batches.csv") as out:
        write_attempts_csv(view, out)
    with ledger.store.writing(*ERRORS.split("/")) as out:  # empty when nothing failed: never a stale one
        write_errors_text(view, out)
    ledger.store.write_many({"reports/job_result.txt": job_result(ledger, view, state, reason, output, worker_time),
                             **(more or {})})


def job_result(ledger: Ledger, view: LedgerView, state: str, reason: str, output: Optional[str],
               worker_time: Optional[TimeSplit] = None) -> bytes:
    """job_result.txt: the outcome in a few lines, and where to look next."""
    counts = view.counts()
    lines = [
        f"state: {state}",
        *( [f"reason: {reason.splitlines()[0]}"] if reason else [] ),
        f"mini-batches: {counts['completed']} done, {counts['failed']} failed, "
        + (f"{counts['pending']} pending, {counts['total']} total" if counts["total"] is not None
           else "planning did not finish"),
        f"failed items: {failed_items_text(view.failed_items(), view.unreturned_items())}",
        f"output: {output or '(summary only)'}",
        *([f"worker time (this session): {worker_time.describe()}"] if worker_time and worker_time.workers else []),
        *_job_worker_time(ledger),
        *error_summary(view),
        "attempts: reports/processed_mini_batches.csv; worker logs: logs/ (or `raypar logs JOB_DIR`)",
    ]
    if state != "succeeded" or counts["failed"]:
        lines.append(f"continue: raypar resume {ledger.url}")
    return ("\n".join(lines) + "\n").encode()


def _job_worker_time(ledger: Ledger) -> list[str]:
    """The job's worker time over its sessions, when it has had more than one."""
    total = job_total(ledger.worker_times())
    if total is None or total["sessions"] < 2:
        return []
    return [f"worker time ({sessions_text(total)}): {TimeSplit.of(total).describe()}"]


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
