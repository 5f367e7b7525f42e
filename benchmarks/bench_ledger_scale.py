"""How fast `raypar resume` finds the pending set of a very large job, and in how much memory.

Builds a job dir with --batches planned mini-batches (default 1,000,000) of which
--done (default 990,000) are done, written through the real ledger API: per-worker
segments on local disk, compacted as a driver compacts them. The last
--uncompacted (default: the driver's compaction interval, COMPACT_EVERY) done records
are written after the last compaction, which is the worst case a driver killed
just before its next compaction leaves behind.

Then, in a fresh interpreter, it times what `raypar resume` does before it
schedules anything: read the manifest, read the ledger, compute pending; and
what `raypar status` reads (state, lease, manifest, ledger, counts). It prints
seconds and peak resident memory against the targets.

--store azurite builds the same job dir on Azure Blob (Azurite on 127.0.0.1,
started here), written as workers write it there: segment objects of
1,000 batches (``raypar.ledger.flush_batches`` was 1,000 when these figures were taken; it is
10,000 now, and larger segments only mean fewer objects to list), written by 16 writers at once.
Targets there (issue 13): status <= 3 s, resume planning <= 5 s, peak < 1 GiB.

--live times `raypar status` itself (raypar.engine.status.job_status, in a fresh interpreter) while a
driver holds the job dir: this process takes the lease and renews it with the counts a running
driver's heartbeat carries (Progress.for_status), so the status reads them and not the ledger; and
`raypar status --exact`, which counts what the ledger holds. --writers N: the workers whose segment
folders are open (each lists its own in every exact status).

--report times what the end of a session adds (report.html, the text reports, and storing them);
--failed-batches N gives N of the batches not done two failed attempts first; --same-error gives
them all one traceback (a bug in run() that every batch hits), not one naming its file. They are
then compacted as a session's end compacts them (timed, in a fresh interpreter); with
--failed-uncompacted they are left as a driver killed before that leaves them.

    python benchmarks/bench_ledger_scale.py [--batches N] [--done N] [--uncompacted N] [--store local|azurite]
        [--live] [--writers N] [--report] [--failed-batches N] [--same-error] [--failed-uncompacted] [--failed-every K] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import print_load, store_root  # noqa: E402

from raypar.engine.upkeep import COMPACT_EVERY  # noqa: E402

MEASURE = r"""
import json, sys, time
from raypar.jobdir.ledger import Ledger
started = time.perf_counter()
ledger = Ledger(sys.argv[1])
manifest = ledger.read_manifest()
pending = ledger.view(manifest, lean=True, failed=False).pending()  # as `raypar resume` plans
seconds = time.perf_counter() - started
# VmHWM, not ru_maxrss: on Linux ru_maxrss keeps the parent's peak across fork+exec.
rss = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
print(json.dumps({"seconds": seconds, "rss_mib": rss, "pending": len(pending), "total": len(manifest)}))
"""

# With --failed-every: what `raypar failed` reads (the lean view and the reporting records, their batches),
# then what `raypar resume --retry-failed-items` adds before it schedules (the revision, a view with
# the carried records). Run once, last: the revision changes the job dir.
FAILED = r"""
import json, sys, time
from raypar.engine.retry_items import plan_item_retries
from raypar.jobdir.ledger import Ledger
ledger = Ledger(sys.argv[1])
started = time.perf_counter()
manifest = ledger.read_manifest()
reported = ledger.view(manifest, lean=True, reported=True).reported  # as `raypar failed` reads
items = [manifest[o].payload["files"][0] for o in reported.column("ordinal").to_pylist()]
export = time.perf_counter() - started
started = time.perf_counter()
batches, _ = plan_item_retries(ledger, manifest)
pending = ledger.view(ledger.read_manifest(), lean=True).pending()
retry = time.perf_counter() - started
rss = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
print(json.dumps({"export": export, "items": len(items), "retry": retry, "retried": batches,
                  "pending": len(pending), "rss_mib": rss}))
"""

# With --report: what the end of a session adds for its reports (the full view, as assembly
# reads it, then reports/report.html, then the text reports: processed_mini_batches.csv...).
REPORT = r"""
import json, sys, time
from raypar.engine.report_html import html_report
from raypar.engine.reports import write_reports
from raypar.jobdir.ledger import Ledger
ledger = Ledger(sys.argv[1])
started = time.perf_counter()
view = ledger.view(ledger.read_manifest())
read = time.perf_counter() - started
page = html_report(ledger, view, "succeeded", "")
seconds = time.perf_counter() - started
started = time.perf_counter()
write_reports(ledger, view, "succeeded", "", None, {"reports/report.html": page.encode()})  # as a session's end
text = time.perf_counter() - started
sizes = ledger.store.file_sizes("reports")
rss = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
print(json.dumps({"read": read, "seconds": seconds, "bytes": len(page), "text": text, "files": len(sizes),
                  "text_bytes": sum(sizes.values()) - len(page), "rss_mib": rss}))
"""

# With --failed-batches: what a session's end adds to fold its failed records into failed-compact/.
COMPACT_FAILED = r"""
import json, sys, time
from raypar.jobdir.ledger import Ledger
started = time.perf_counter()
assert Ledger(sys.argv[1]).compact_failures("r2")
seconds = time.perf_counter() - started
rss = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
print(json.dumps({"seconds": seconds, "rss_mib": rss}))
"""

STATUS = r"""
import json, sys, time
from raypar.jobdir.ledger import Ledger
started = time.perf_counter()
ledger = Ledger(sys.argv[1])
ledger.read_state(), ledger.lease.read()
view = ledger.view(ledger.read_manifest(), lean=True, errors_of=3)  # as `raypar status` reads:
counts, shown = view.counts(), view.failed.last_rows(view.failed_ordinals()[:3])  # counts, 3 last errors
seconds = time.perf_counter() - started
rss = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
print(json.dumps({"seconds": seconds, "rss_mib": rss, "pending": counts["pending"], "total": counts["total"]}))
"""

# With --live: `raypar status` (argv[2] "exact": --exact), as the CLI calls it.
LIVE_STATUS = r"""
import json, sys, time
from raypar.engine.status import job_status
started = time.perf_counter()
status = job_status(sys.argv[1], exact=sys.argv[2] == "exact")
seconds = time.perf_counter() - started
rss = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
print(json.dumps({"seconds": seconds, "rss_mib": rss, "pending": status["pending"], "total": status["total"],
                  "counted_by": status["counted_by"]}))
"""


TRACEBACK = "Traceback (most recent call last):\n" + '  File "/app/score.py", line 42, in run\n    x = parse(f)\n' * 12

def build(job: str, batches: int, done: int, uncompacted: int, writers: int = 16, failed_every: int = 0,
          failed_batches: int = 0, same_error: bool = False, traceback_bytes: int = 0) -> None:
    from raypar.inputs.base import MiniBatch
    from raypar.jobdir.ledger import Ledger
    from raypar.jobdir.records import DoneRecord, FailedRecord
    from raypar.spec.loading import spec_from_dict

    ledger = Ledger(job)
    spec = spec_from_dict({  # job.json, for `raypar status` (--live)
        "type": "parallel", "name": "ledger-scale", "input_data": "${{inputs.data}}",
        "inputs": {"data": {"type": "uri_folder", "path": "/data"}},
        "outputs": {"out": {"type": "uri_file", "path": "/out/rows.txt"}},
        "task": {"code": "/src", "entry_script": "score.py", "append_row_to": "${{outputs.out}}"}})
    ledger.create(spec.to_dict(), spec.to_yaml())
    ledger.write_manifest(
        MiniBatch(ordinal=i, kind="files", payload={"files": [f"d{i // 1000:04d}/f{i:07d}.txt"]}, item_count=1)
        for i in range(batches)
    )
    limits = {"flush_batches": 1000, "flush_bytes": 1 << 30, "flush_seconds": float("inf")}
    out = [ledger.done_writer(f"r1~i0s{w}-bench", limits) for w in range(writers)]

    def write(w: int, start: int, end: int) -> None:
        for i in range(start + w, end, writers):
            flaky = failed_every and i % failed_every == 0  # its one item reported failed, no row
            record = DoneRecord(batch=f"mb-{i:07d}", run="r1", attempt=1, items=1, returned=0 if flaky else 1,
                                part=None, node="0" * 56, worker=f"instance0-slot{w}", seconds=0.01,
                                started=1.7e9 + i, reported=1 if flaky else 0,
                                failed='{"ValueError: flaky": [0]}' if flaky else None)
            out[w].write(record, f"f{i:07d}.txt 42\n".encode())
        out[w].flush()

    def write_all(start: int, end: int) -> None:
        with ThreadPoolExecutor(writers) as pool:  # workers write at once, as on a cluster
            list(pool.map(lambda w: write(w, start, end), range(writers)))

    write_all(0, done - uncompacted)
    if done - uncompacted > 0:
        ledger.compact("r1")
    write_all(done - uncompacted, done)
    if uncompacted == 0:
        ledger.compact("r1")
    ledger.gather_failures("r1")  # as a driver's session stores failed attempts
    traceback = TRACEBACK if traceback_bytes <= len(TRACEBACK) else (  # --traceback-bytes
        TRACEBACK + "    " * ((traceback_bytes - len(TRACEBACK)) // 4) + "\n")
    for i in range(done, done + failed_batches):  # two tries each, a traceback of about 1 KB
        for attempt in (1, 2):
            ledger.record_failed(FailedRecord(batch=f"mb-{i:07d}", run="r1", attempt=attempt, kind="user",
                                              error=f"{traceback}NameError: name 'modle' is not defined"
                                              if same_error else f"{traceback}ValueError: cannot parse f{i:07d}.txt",
                                              final=attempt == 2, node="0" * 56, worker="instance0-slot0"))
    ledger.end_gathering_failures()


def measured(script: str, *args: str) -> subprocess.CompletedProcess:
    """``script`` run in a fresh interpreter; its error's last line, and exit 1, if it fails."""
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True)
    if out.returncode:
        print(f"FAILED: {(out.stderr.strip().splitlines() or ['(no output)'])[-1]}")
        sys.exit(1)
    return out


def live_status(job: str, batches: int, done: int) -> bool:
    """`raypar status` while this process holds the lease as a running driver does, with its counts,
    and `raypar status --exact`: best of 3 each, in fresh interpreters."""
    from raypar.engine.scheduler import Progress
    from raypar.jobdir.ledger import Ledger
    from raypar.jobdir.state import JobState

    ledger = Ledger(job)
    ledger.lease.acquire("r2")
    ledger.write_state(JobState.RUNNING, "r2")
    ledger.lease.heartbeat("r2", progress=Progress(total=batches, done=done).for_status())
    try:
        for how in ("driver", "exact"):
            runs = [json.loads(measured(LIVE_STATUS, job, how).stdout) for _ in range(3)]
            best = min(runs, key=lambda r: r["seconds"])
            assert (best["pending"], best["counted_by"]) == (batches - done, "ledger" if how == "exact" else how), best
            command = [sys.executable, "-m", "raypar", "status", "--json", job] + (["--exact"] if how == "exact" else [])
            walls = []
            for _ in range(3):  # the whole command, as a user (or a dashboard polling it) waits for it
                started = time.perf_counter()
                subprocess.run(command, capture_output=True, check=True)
                walls.append(time.perf_counter() - started)
            print(f"`raypar status{' --exact' if how == 'exact' else ''}` of the running job: counted by the "
                  f"{best['counted_by']} in {best['seconds']:.2f}s (best of 3; the whole command "
                  f"{min(walls):.2f}s); peak RSS {max(r['rss_mib'] for r in runs):.0f} MiB")
    finally:
        ledger.write_state(JobState.CANCELED, "r2")
        ledger.lease.release("r2")
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=1_000_000)
    parser.add_argument("--done", type=int, default=990_000)
    parser.add_argument("--uncompacted", type=int, default=COMPACT_EVERY)
    parser.add_argument("--store", choices=["local", "azurite"], default="local")
    parser.add_argument("--keep", action="store_true", help="keep the job dir and print its path")
    parser.add_argument("--live", action="store_true",
                        help="also time `raypar status` with a live driver's counts, and with --exact")
    parser.add_argument("--writers", type=int, default=16, help="workers that wrote the done records")
    parser.add_argument("--report", action="store_true",
                        help="also time reports/report.html: the full view, then the page")
    parser.add_argument("--failed-batches", type=int, default=0, metavar="N",
                        help="N of the batches not done failed twice (a 1 KB traceback each); with --report: "
                             "what their reports cost")
    parser.add_argument("--same-error", action="store_true",
                        help="every failed attempt has the same traceback (a bug in run() every batch hits), "
                             "not one naming its file")
    parser.add_argument("--traceback-bytes", type=int, default=0, metavar="B",
                        help="pad each failed attempt's traceback to about B bytes (default: about 700); "
                             "distinct ones past 2 GiB in all are what a string array cannot hold")
    parser.add_argument("--failed-uncompacted", action="store_true",
                        help="leave the failed records uncompacted (a driver killed before its session's end)")
    parser.add_argument("--failed-every", type=int, default=0, metavar="K",
                        help="every K-th done batch reports its item failed; then time `raypar failed`'s read "
                             "and `resume --retry-failed-items`'s planning")
    args = parser.parse_args()

    with store_root(args.store, "raypar-ledger-scale-", keep=args.keep) as (root, base):
        job = f"{base}/job"
        started = time.time()
        build(job, args.batches, args.done, args.uncompacted, writers=args.writers, failed_every=args.failed_every,
              failed_batches=args.failed_batches, same_error=args.same_error, traceback_bytes=args.traceback_bytes)
        print(f"built {args.batches:,} batches, {args.done:,} done ({args.uncompacted:,} after the last "
              f"compaction) on {args.store} in {time.time() - started:.0f}s")
        if args.failed_batches and not args.failed_uncompacted:
            out = measured(COMPACT_FAILED, job)
            got = json.loads(out.stdout)
            print(f"failed records compacted in {got['seconds']:.2f}s, peak RSS {got['rss_mib']:.0f} MiB")
        targets = {"local": (2, 2), "azurite": (5, 3)}[args.store]  # seconds: resume planning, status
        ok = True
        not_done = args.batches - args.done  # a resume runs the failed batches again; status counts them apart
        for what, script, target, pending in (("resume planning", MEASURE, targets[0], not_done),
                                              ("status", STATUS, targets[1], not_done - args.failed_batches)):
            runs = []
            for _ in range(3):
                out = measured(script, job)
                runs.append(json.loads(out.stdout))
            best = min(runs, key=lambda r: r["seconds"])
            assert best["pending"] == pending, best
            rss = max(r["rss_mib"] for r in runs)
            print(f"{what}: {best['pending']:,} pending of {best['total']:,} in {best['seconds']:.2f}s "
                  f"(best of 3; target <= {target} s); peak RSS {rss:.0f} MiB (target < 1024)")
            ok = ok and best["seconds"] <= target and rss < 1024
        if args.live:
            ok = live_status(job, args.batches, args.done) and ok
        if args.report:
            out = measured(REPORT, job)
            got = json.loads(out.stdout)
            print(f"report.html: {got['bytes'] / 1024:.0f} KiB in {got['seconds']:.2f}s (of which reading the "
                  f"records {got['read']:.2f}s); text reports: {got['text_bytes'] / 2**20:.0f} MiB composed and "
                  f"stored ({got['files']} files with the page) in {got['text']:.2f}s; peak RSS {got['rss_mib']:.0f} MiB")
        if args.failed_every:
            out = measured(FAILED, job)
            got = json.loads(out.stdout)
            flaky = len(range(0, args.done, args.failed_every))
            assert got["items"] == got["retried"] == flaky, got
            assert got["pending"] == args.batches - args.done + flaky, got  # each retry batch is pending
            print(f"failed items: {got['items']:,} read in {got['export']:.2f}s; retry planned and the view "
                  f"with carried records read in {got['retry']:.2f}s ({got['pending']:,} pending); "
                  f"peak RSS {got['rss_mib']:.0f} MiB")
        print("targets: " + ("met" if ok else "MISSED"))
        print_load()
        if args.keep and args.store == "local":
            print(f"job dir kept: {job}")
        return 0


if __name__ == "__main__":
    sys.exit(main())
