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

import collections
import html
import time
from dataclasses import dataclass
from typing import Optional

from raypar.engine.reports import STATUS_OF_KIND, last_line
from raypar.jobdir.ledger import Ledger, LedgerView

MAX_BARS = 5000  # attempts drawn one by one; more are binned per worker
TIME_BINS = 600  # slices of a worker's row, and bars of the throughput chart, when binned
WIDTH = 1100  # px of the time axis
ROW = 14  # px per worker row
SLOWEST = 20
COLORS = {"done": "#2e7d32", "retried": "#1565c0", "spare": "#9e9e9e", "exception": "#c62828",
          "timeout": "#ef6c00", "worker-lost": "#6a1b9a", "job-dir-error": "#ad1457", "raypar-error": "#4e342e"}
LEGEND = {"done": "done (first try)", "retried": "done after a failed try", "spare": "spare result (another "
          "attempt won)", "exception": "run() raised", "timeout": "timed out", "worker-lost": "worker lost",
          "job-dir-error": "job dir refused the result", "raypar-error": "raypar error"}


@dataclass
class Attempt:
    batch: str
    worker: str
    start: float
    end: float
    status: str  # a COLORS key
    error: str = ""


def attempts(view, spares=()) -> list[Attempt]:
    """Every recorded attempt with a start time: the chosen done records, ``spares`` (done
    records another attempt beat), and the failed attempts (their end: the next attempt's start
    on that worker, or their start when none is known)."""
    failed_batches = set(view.failed)
    out = []
    for r in view.done.values():
        if r.started is None:
            continue
        status = "retried" if r.batch in failed_batches else "done"
        out.append(Attempt(r.batch, _worker(r), r.started, r.started + (r.seconds or 0), status))
    for r in spares:
        if r.started is not None:
            out.append(Attempt(r.batch, _worker(r), r.started, r.started + (r.seconds or 0), "spare"))
    by_worker = collections.defaultdict(list)
    for a in out:
        by_worker[a.worker].append(a.start)
    for records in view.failed.values():
        for r in records:
            if r.started is None:
                continue
            later = [s for s in by_worker.get(_worker(r), ()) if s > r.started]
            end = min(later) if later else r.started
            out.append(Attempt(r.batch, _worker(r), r.started, end, STATUS_OF_KIND.get(r.kind, r.kind),
                               last_line(r.error)))
    out.sort(key=lambda a: (a.worker, a.start))
    return out


def _worker(record) -> str:
    node = (record.node or "?")[:8]
    return f"{record.worker or '?'} @ {node}"


def html_report(ledger: Ledger, view: LedgerView, state: str, reason: str) -> str:
    """The job's report page from a full view of its ledger (records, not the lean counts)."""
    try:
        spec_yaml = ledger.store.read_bytes("spec.yml").decode()
    except FileNotFoundError:
        spec_yaml = "(spec.yml not found in the job dir)"
    return render(view, ledger.spare_done_records(view.done), spec_yaml, state, reason, ledger.url)


def render(view, spares, spec_yaml: str, state: str, reason: str, job_url: str,
           now: Optional[float] = None) -> str:
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
    if runs:
        t0, t1 = min(a.start for a in runs), max(a.end for a in runs)
        span = max(t1 - t0, 1e-6)
        parts += ["<h2>Timeline</h2>", _legend(), _timeline(runs, t0, span),
                  "<h2>Throughput</h2>", _throughput(runs, t0, span)]
    else:
        parts.append("<p>No attempt with a start time is recorded yet.</p>")
    parts += ["<h2>Slowest mini-batches</h2>", _slowest(runs), "<h2>Failures by error</h2>", _failures(view),
              "<h2>Settings</h2>", f"<pre>{_e(spec_yaml)}</pre>", "</body></html>"]
    return "\n".join(parts)


def _timeline(runs: list[Attempt], t0: float, span: float) -> str:
    workers = sorted({a.worker for a in runs})
    row_of = {w: i for i, w in enumerate(workers)}
    label = 230
    height = ROW * len(workers) + 30
    out = [f'<svg id=timeline width="{label + WIDTH + 10}" height="{height}" role=img '
           f'aria-label="attempts per worker over time">']
    for w, i in row_of.items():
        out.append(f'<text x="0" y="{i * ROW + 11}" class=lab>{_e(w)}</text>')
    if len(runs) <= MAX_BARS:
        for a in runs:
            x = label + (a.start - t0) / span * WIDTH
            w = max((a.end - a.start) / span * WIDTH, 1.5)
            tip = f"{a.batch} {a.status} {a.end - a.start:.2f}s" + (f": {a.error}" if a.error else "")
            out.append(f'<rect class=bar x="{x:.1f}" y="{row_of[a.worker] * ROW + 2}" width="{w:.1f}" '
                       f'height="{ROW - 3}" fill="{COLORS.get(a.status, "#000")}"><title>{_e(tip)}</title></rect>')
    else:  # one slice per TIME_BINS of each row, coloured by the worst status that ran in it
        worst = {}
        rank = {s: i for i, s in enumerate(COLORS)}
        for a in runs:
            first = int((a.start - t0) / span * (TIME_BINS - 1))
            last = int((a.end - t0) / span * (TIME_BINS - 1))
            for b in range(first, last + 1):
                key = (a.worker, b)
                if rank.get(a.status, 0) >= rank.get(worst.get(key, "done"), 0):
                    worst[key] = a.status
        step = WIDTH / TIME_BINS
        runs_of = collections.defaultdict(list)  # per worker: [first bin, last bin, status], merged
        for (w, b), status in sorted(worst.items(), key=lambda kv: (kv[0][0], kv[0][1])):
            merged = runs_of[w]
            if merged and merged[-1][1] == b - 1 and merged[-1][2] == status:
                merged[-1][1] = b
            else:
                merged.append([b, b, status])
        for w, merged in runs_of.items():
            for first, last, status in merged:
                out.append(f'<rect class=bar x="{label + first * step:.1f}" y="{row_of[w] * ROW + 2}" '
                           f'width="{(last - first + 1) * step:.2f}" height="{ROW - 3}" '
                           f'fill="{COLORS.get(status, "#000")}"/>')
    out.append(f'<text x="{label}" y="{height - 6}" class=lab>0 s</text>'
               f'<text x="{label + WIDTH - 60}" y="{height - 6}" class=lab>{span:.1f} s</text></svg>')
    return "".join(out)


def _throughput(runs: list[Attempt], t0: float, span: float) -> str:
    bins = min(TIME_BINS, max(10, len(runs) // 5))
    done = [0] * bins
    for a in runs:
        if a.status in ("done", "retried"):
            done[min(int((a.end - t0) / span * bins), bins - 1)] += 1
    top = max(done) or 1
    height, step = 120, WIDTH / bins
    bars = "".join(f'<rect x="{i * step:.1f}" y="{height - n / top * height:.1f}" width="{max(step - 0.5, 0.5):.2f}" '
                   f'height="{n / top * height:.1f}" fill="#2e7d32"/>' for i, n in enumerate(done) if n)
    rate = sum(done) / span
    return (f'<svg id=throughput width="{WIDTH + 10}" height="{height + 20}" role=img '
            f'aria-label="mini-batches finished over time">{bars}'
            f'<text x="0" y="{height + 15}" class=lab>peak {top} per {span / bins:.2f} s; '
            f'{rate:.2f} mini-batches/s overall</text></svg>')


def _slowest(runs: list[Attempt]) -> str:
    done = sorted((a for a in runs if a.status in ("done", "retried", "spare")), key=lambda a: a.start - a.end)
    rows = "".join(f"<tr><td>{_e(a.batch)}</td><td>{a.end - a.start:.2f}</td><td>{_e(a.worker)}</td>"
                   f"<td>{_e(a.status)}</td></tr>" for a in done[:SLOWEST])
    return f"<table id=slowest><tr><th>mini-batch</th><th>seconds</th><th>worker</th><th>result</th></tr>{rows}</table>"


def _failures(view) -> str:
    groups = collections.defaultdict(list)
    for records in view.failed.values():
        for r in records:
            groups[(STATUS_OF_KIND.get(r.kind, r.kind), last_line(r.error))].append(r.batch)
    if not groups:
        return "<p id=failures>No failed attempt.</p>"
    rows = "".join(
        f"<tr><td>{len(batches)}</td><td>{_e(kind)}</td><td><code>{_e(error)}</code></td>"
        f"<td>{_e(', '.join(sorted(set(batches))[:5]))}{' …' if len(set(batches)) > 5 else ''}</td></tr>"
        for (kind, error), batches in sorted(groups.items(), key=lambda kv: -len(kv[1])))
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
