"""``raypar report``: one self-contained HTML page of a job (no network at view time).

What it shows, from the ledger alone: a timeline of every worker's attempts (done, retried,
failed by kind, spare results of a second attempt), throughput over time, the slowest
mini-batches, failures grouped by error, and the job's settings. Inline SVG and CSS, no
script: it opens anywhere, offline, and can be mailed.

Cost grows with the attempts: up to MAX_BARS attempts each get a bar with a tooltip; past
that, each worker's row is drawn as TIME_BINS slices coloured by what ran in them, so a
million-batch job gives a page of the same size as a ten-thousand-batch one.
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow as pa

from raypar.engine.reports import STATUS_OF_KIND, last_lines, status_of_kinds
from raypar.engine.worker_time import TimeSplit
from raypar.inputs.base import batch_id, ordinal_of
from raypar.jobdir.ledger import Ledger, LedgerView

MAX_BARS = 5000  # attempts drawn one by one; more are binned per worker
TIME_BINS = 600  # slices of a worker's row, and bars of the throughput chart, when binned
WIDTH = 1100  # px of the time axis
ROW = 14  # px per worker row
SLOWEST = 20
FAILURE_GROUPS = 50  # rows of the failures-by-error table; the rest summed in one row
COLORS = {"done": "#2e7d32", "retried": "#1565c0", "spare": "#9e9e9e", "exception": "#c62828",
          "timeout": "#ef6c00", "worker-lost": "#6a1b9a", "job-dir-error": "#ad1457", "raypar-error": "#4e342e"}
LEGEND = {"done": "done (first try)", "retried": "done after a failed try", "spare": "spare result (another "
          "attempt won)", "exception": "run() raised", "timeout": "timed out", "worker-lost": "worker lost",
          "job-dir-error": "job dir refused the result", "raypar-error": "raypar error"}


STATUSES = list(COLORS)  # status codes: an attempt's status is an index into this list


@dataclass
class Attempts:
    """Every recorded attempt with a start time, as columns (a million attempts stay arrays)."""

    workers: list  # row labels, "instance<i>-slot<s> @ <node>"
    worker: np.ndarray  # per attempt: index into workers
    start: np.ndarray
    end: np.ndarray
    status: np.ndarray  # index into STATUSES
    batch: list  # per attempt: the mini-batch ID
    error: dict  # attempt index -> the error line (failed attempts)

    def __len__(self) -> int:
        return len(self.start)


def attempts(view, spares=()) -> Attempts:
    """The chosen done records, ``spares`` (done records another attempt beat), and the failed
    attempts (which end when the next attempt on their worker starts, or at once if none does)."""
    retried = view.failed.batches  # sorted ordinals of batches with a failed attempt
    table = getattr(view.done, "table", None)
    if table is not None and table.num_rows:  # a DoneIndex: columns, not a record each
        started = table.column("started").to_numpy(zero_copy_only=False).astype(float)
        keep = ~np.isnan(started)
        ordinals = table.column("ordinal").to_numpy()[keep]
        starts = started[keep]
        ends = starts + np.nan_to_num(table.column("seconds").to_numpy(zero_copy_only=False)[keep].astype(float))
        labels = _labels(table.filter(pa.array(keep)))
    else:
        records = [r for r in view.done.values() if r.started is not None]
        ordinals = np.array([ordinal_of(r.batch) for r in records], dtype=np.int64)
        starts = np.array([r.started for r in records], dtype=float)
        ends = starts + np.array([r.seconds or 0 for r in records], dtype=float)
        labels = _LabelCodes.of([_label(r.worker, r.node) for r in records])
    status = np.where(np.isin(ordinals, retried), STATUSES.index("retried"), STATUSES.index("done"))
    spares = [r for r in spares if r.started is not None]
    ordinals = np.concatenate([ordinals, [ordinal_of(r.batch) for r in spares]]).astype(np.int64)
    starts = np.concatenate([starts, [r.started for r in spares]])
    ends = np.concatenate([ends, [r.started + (r.seconds or 0) for r in spares]])
    labels = labels.plus([_label(r.worker, r.node) for r in spares])
    status = np.concatenate([status, np.full(len(spares), STATUSES.index("spare"))]).astype(np.int64)
    failed = view.failed.table
    failed = failed.filter(failed.column("started").is_valid())
    failed_labels = _labels(failed) if failed.num_rows else _LabelCodes([], np.zeros(0, np.int64))
    workers = sorted({*labels.names, *failed_labels.names})
    worker, failed_worker = (np.array([workers.index(n) for n in codes.names], dtype=np.int64)[codes.codes]
                             if len(codes.codes) else np.zeros(0, dtype=np.int64) for codes in (labels, failed_labels))
    failed_starts = failed.column("started").to_numpy(zero_copy_only=False).astype(float)
    failed_ends = failed_starts.copy()
    for i in np.unique(failed_worker):  # a failed attempt ends when the next one on its worker starts
        later = np.sort(starts[worker == i])
        mine = np.flatnonzero(failed_worker == i)
        at = np.searchsorted(later, failed_starts[mine], side="right")
        has = at < len(later)
        failed_ends[mine[has]] = later[at[has]]
    kinds = failed.column("kind").combine_chunks()
    codes = np.array([STATUSES.index(STATUS_OF_KIND.get(k, "raypar-error")) for k in kinds.dictionary.to_pylist()],
                     dtype=np.int64)
    error = {}
    if len(starts) + failed.num_rows <= MAX_BARS:  # the error lines are bars' tooltips
        lines = last_lines(failed.column("error")).to_pylist()
        error = {len(starts) + j: line for j, line in enumerate(lines)}
    return Attempts(workers, np.concatenate([worker, failed_worker]).astype(np.int64),
                    np.concatenate([starts, failed_starts]), np.concatenate([ends, failed_ends]),
                    np.concatenate([status, codes[kinds.indices.to_numpy(zero_copy_only=False)]
                                    if failed.num_rows else np.zeros(0, np.int64)]).astype(np.int64),
                    _BatchIds(np.concatenate([ordinals, failed.column("ordinal").to_numpy()]).astype(np.int64)),
                    error)


def _label(worker, node) -> str:
    return f"{worker or '?'} @ {(node or '?')[:8]}"


@dataclass
class _LabelCodes:
    """Row labels of many attempts as a few names and a code per attempt."""

    names: list
    codes: np.ndarray

    @classmethod
    def of(cls, labels: list) -> "_LabelCodes":
        names = sorted(set(labels))
        at = {n: i for i, n in enumerate(names)}
        return cls(names, np.array([at[label] for label in labels], dtype=np.int64))

    def plus(self, labels: list) -> "_LabelCodes":
        return _LabelCodes.of([*(self.names[c] for c in self.codes), *labels]) if labels else self


def _labels(table) -> _LabelCodes:
    """The worker and node columns (dictionary-encoded) as label codes, one label per pair."""
    worker, node = (table.column(c).combine_chunks() for c in ("worker", "node"))
    w = worker.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64) + 1
    n = node.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64) + 1
    pairs, codes = np.unique(w * (len(node.dictionary) + 1) + n, return_inverse=True)
    workers, nodes = [None, *worker.dictionary.to_pylist()], [None, *node.dictionary.to_pylist()]
    names = [_label(workers[p // (len(nodes))], nodes[p % len(nodes)]) for p in pairs.tolist()]
    return _LabelCodes(names, codes.astype(np.int64))


class _BatchIds:
    """Mini-batch IDs by attempt, made from their ordinals when asked for."""

    def __init__(self, ordinals: np.ndarray):
        self.ordinals = ordinals

    def __len__(self) -> int:
        return len(self.ordinals)

    def __getitem__(self, i):
        return batch_id(int(self.ordinals[int(i)]))


def html_report(ledger: Ledger, view: LedgerView, state: str, reason: str,
                worker_time: Optional[TimeSplit] = None) -> str:
    """The job's report page from a full view of its ledger (records, not the lean counts), and the
    session's worker time when a session writes it (`raypar report` has none)."""
    try:
        spec_yaml = ledger.store.read_bytes("spec.yml").decode()
    except FileNotFoundError:
        spec_yaml = "(spec.yml not found in the job dir)"
    spares = view.done.spare_records() if hasattr(view.done, "spare_records") else []
    return render(view, spares, spec_yaml, state, reason, ledger.url, worker_time=worker_time)


def render(view, spares, spec_yaml: str, state: str, reason: str, job_url: str,
           now: Optional[float] = None, worker_time: Optional[TimeSplit] = None) -> str:
    """The report page as one HTML string."""
    runs = attempts(view, spares)
    counts = view.counts()
    title = f"raypar report: {job_url}"
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{_e(title)}</title>",
             f"<style>{_CSS}</style></head><body>",
             f"<h1>{_e(title)}</h1>",
             f"<p class=summary><b>{_e(state)}</b>{(': ' + _e(reason.splitlines()[0])) if reason else ''} · "
             f"{counts['completed']} done, {counts['failed']} failed, {counts['pending']} pending of "
             f"{counts['total']} mini-batches · generated {_e(_when(now or time.time()))}</p>"]
    if len(runs):
        t0, t1 = float(runs.start.min()), float(runs.end.max())
        span = max(t1 - t0, 1e-6)
        parts += ["<h2>Timeline</h2>", _legend(), _timeline(runs, t0, span),
                  "<h2>Throughput</h2>", _throughput(runs, t0, span)]
    else:
        parts.append("<p>No attempt with a start time is recorded yet.</p>")
    if worker_time is not None and worker_time.workers:
        parts += ["<h2>Worker time (this session)</h2>", _worker_time(worker_time)]
    parts += ["<h2>Slowest mini-batches</h2>", _slowest(runs), "<h2>Failures by error</h2>", _failures(view),
              "<h2>Settings</h2>", f"<pre>{_e(spec_yaml)}</pre>", "</body></html>"]
    return "\n".join(parts)


def _timeline(runs: Attempts, t0: float, span: float) -> str:
    label = 230
    height = ROW * len(runs.workers) + 30
    out = [f'<svg id=timeline width="{label + WIDTH + 10}" height="{height}" role=img '
           f'aria-label="attempts per worker over time">']
    for i, w in enumerate(runs.workers):
        out.append(f'<text x="0" y="{i * ROW + 11}" class=lab>{_e(w)}</text>')
    if len(runs) <= MAX_BARS:
        for i in np.argsort(runs.start, kind="stable"):
            start, end, status = float(runs.start[i]), float(runs.end[i]), STATUSES[runs.status[i]]
            x = label + (start - t0) / span * WIDTH
            w = max((end - start) / span * WIDTH, 1.5)
            tip = f"{runs.batch[i]} {status} {end - start:.2f}s" + (f": {runs.error[i]}" if i in runs.error else "")
            out.append(f'<rect class=bar x="{x:.1f}" y="{runs.worker[i] * ROW + 2}" width="{w:.1f}" '
                       f'height="{ROW - 3}" fill="{COLORS[status]}"><title>{_e(tip)}</title></rect>')
    else:  # a slice per TIME_BINS of each row, coloured by the worst status that ran in it
        first = ((runs.start - t0) / span * (TIME_BINS - 1)).astype(np.int64)
        last = ((runs.end - t0) / span * (TIME_BINS - 1)).astype(np.int64)
        worst = np.full((len(runs.workers), TIME_BINS), -1, dtype=np.int64)
        np.maximum.at(worst, (runs.worker, first), runs.status)
        for i in np.flatnonzero(last > first):  # the few attempts longer than a slice
            row = worst[runs.worker[i], first[i]:last[i] + 1]
            np.maximum(row, runs.status[i], out=row)
        step = WIDTH / TIME_BINS
        for row in range(len(runs.workers)):
            b = 0
            while b < TIME_BINS:  # runs of equal slices: one rect each
                status, e = worst[row, b], b
                while e + 1 < TIME_BINS and worst[row, e + 1] == status:
                    e += 1
                if status >= 0:
                    out.append(f'<rect class=bar x="{label + b * step:.1f}" y="{row * ROW + 2}" '
                               f'width="{(e - b + 1) * step:.2f}" height="{ROW - 3}" fill="{COLORS[STATUSES[status]]}"/>')
                b = e + 1
    out.append(f'<text x="{label}" y="{height - 6}" class=lab>0 s</text>'
               f'<text x="{label + WIDTH - 60}" y="{height - 6}" class=lab>{span:.1f} s</text></svg>')
    return "".join(out)


def _throughput(runs: Attempts, t0: float, span: float) -> str:
    bins = min(TIME_BINS, max(10, len(runs) // 5))
    finished = runs.end[np.isin(runs.status, [STATUSES.index("done"), STATUSES.index("retried")])]
    done = np.histogram(finished, bins=bins, range=(t0, t0 + span))[0]
    top = int(done.max()) if len(done) and done.max() else 1
    height, step = 120, WIDTH / bins
    bars = "".join(f'<rect x="{i * step:.1f}" y="{height - n / top * height:.1f}" width="{max(step - 0.5, 0.5):.2f}" '
                   f'height="{n / top * height:.1f}" fill="#2e7d32"/>' for i, n in enumerate(done.tolist()) if n)
    rate = len(finished) / span
    return (f'<svg id=throughput width="{WIDTH + 10}" height="{height + 20}" role=img '
            f'aria-label="mini-batches finished over time">{bars}'
            f'<text x="0" y="{height + 15}" class=lab>peak {top} per {span / bins:.2f} s; '
            f'{rate:.2f} mini-batches/s overall</text></svg>')


def _slowest(runs: Attempts) -> str:
    ran = np.flatnonzero(np.isin(runs.status, [STATUSES.index(s) for s in ("done", "retried", "spare")]))
    seconds = runs.end[ran] - runs.start[ran]
    top = ran[np.argsort(-seconds, kind="stable")[:SLOWEST]]
    rows = "".join(f"<tr><td>{_e(runs.batch[i])}</td><td>{runs.end[i] - runs.start[i]:.2f}</td>"
                   f"<td>{_e(runs.workers[runs.worker[i]])}</td><td>{_e(STATUSES[runs.status[i]])}</td></tr>"
                   for i in top)
    return f"<table id=slowest><tr><th>mini-batch</th><th>seconds</th><th>worker</th><th>result</th></tr>{rows}</table>"


def _worker_time(split: TimeSplit) -> str:
    """What the workers' time went to, a row per part in the order of a worker's life."""
    total = max(split.total, 1e-9)
    rows = "".join(f"<tr><td>{_e(part)}</td><td>{seconds:.1f}</td><td>{seconds / total:.0%}</td></tr>"
                   for part, seconds in split.seconds.items())
    return (f"<p>{split.workers} worker process(es), {split.total:.1f} worker-seconds</p>"
            f"<table id=worker-time><tr><th>part</th><th>seconds</th><th>share</th></tr>{rows}</table>")


def _failures(view) -> str:
    failed = view.failed.table
    if not failed.num_rows:
        return "<p id=failures>No failed attempt.</p>"
    attempts = pa.table({"status": status_of_kinds(failed["kind"]), "error": last_lines(failed["error"]).fill_null(""),
                         "ordinal": failed["ordinal"]})
    groups = attempts.group_by(["status", "error"]).aggregate([("ordinal", "count"), ("ordinal", "distinct")])
    ranked = sorted(zip(groups["ordinal_count"].to_pylist(), groups["status"].to_pylist(),
                        groups["error"].to_pylist(), range(groups.num_rows), strict=True),
                    key=lambda g: (-g[0], g[1], g[2]))
    rows = ""
    for count, kind, error, k in ranked[:FAILURE_GROUPS]:
        batches = np.sort(groups["ordinal_distinct"][k].values.to_numpy())
        rows += (f"<tr><td>{count}</td><td>{_e(kind)}</td><td><code>{_e(error)}</code></td>"
                 f"<td>{_e(', '.join(batch_id(int(o)) for o in batches[:5]))}{' …' if len(batches) > 5 else ''}"
                 f"</td></tr>")
    if len(ranked) > FAILURE_GROUPS:  # errors naming their item differ by batch: the page stays a page
        rest = ranked[FAILURE_GROUPS:]
        rows += (f"<tr><td>{sum(g[0] for g in rest)}</td><td></td><td>{len(rest)} other errors, less frequent "
                 f"(every one in reports/errors.txt)</td><td></td></tr>")
    return (f"<table id=failures><tr><th>attempts</th><th>kind</th><th>error</th><th>mini-batches</th></tr>"
            f"{rows}</table>")


def _legend() -> str:
    return "<p class=legend>" + " ".join(
        f'<span><i style="background:{COLORS[k]}"></i>{_e(v)}</span>' for k, v in LEGEND.items()) + "</p>"


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def _e(text) -> str:
    return html.escape(str(text), quote=True)


_CSS = """
body{font:14px system-ui,sans-serif;margin:24px;color:#222}
h1{font-size:20px}h2{font-size:16px;margin-top:28px}
.lab{font:11px monospace;fill:#333}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;font-size:13px}
pre{background:#f6f6f6;padding:10px;overflow:auto}
.legend span{margin-right:14px;white-space:nowrap}.legend i{display:inline-block;width:12px;height:12px;
margin-right:4px;vertical-align:middle}
"""
