"""What a long job's compactions write, and how many segments a view reads one by one meanwhile.

A session compacts every COMPACT_SEGMENTS (2,000) segments stored, besides every COMPACT_EVERY
(50,000) batches: on an object store each segment not compacted is a GET in every view, and a job
whose segments hold a batch each stored 50,000 of them between compactions. At that rate a
million batches are 500 compactions. Each writes the records new since the last as a delta file;
until this change, once an index named 8 files a compaction merged everything into one (every
8th compaction rewrote every record). Now it merges only the newest files no larger than its new
records (raypar/jobdir/compact_tiers.py, a binary counter).

Part 1, the merges: --records done records (default 1,000,000) written by --writers workers
through the real writers (on local disk appended segment files; --merges-on s3 or azurite: a
segment per writer per step on the emulator), a compaction after every --every records (default
2,000: COMPACT_SEGMENTS at a batch a segment), side by side with the rule before
(``every 8th``) and now (``binary``). Prints the compactions' seconds, the bytes they wrote to
compact/, how many times each record was written, the most files an index named, and a fresh
view's seconds and records at the end (``raypar resume`` reads it).

Part 2, the views (--store s3 or azurite, --segments, default 10,000; 0 skips it): one-batch
segments stored by 8 writers on the emulator; the view ``raypar status`` takes (fresh client,
best of 3) with every segment not compacted (a job that reached neither COMPACT_EVERY nor
COMPACT_SECONDS: before this change, any job faster than 10 minutes) against one compacted every
--every segments and read just before its next compaction (--every - 1 not compacted: the most a
view reads one by one now).

    python benchmarks/bench_compaction_tiers.py [--records N] [--every K] [--writers W]
        [--merges-on local|s3|azurite] [--store s3|azurite] [--segments N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import object_store_root, print_load  # noqa: E402

import raypar.jobdir.ledger as ledger_module  # noqa: E402
from raypar.inputs.base import MiniBatch, batch_id  # noqa: E402
from raypar.jobdir.compact_tiers import newest_to_merge  # noqa: E402
from raypar.jobdir.ledger import Ledger  # noqa: E402
from raypar.jobdir.records import DoneRecord  # noqa: E402


def every_8th(files: list[dict], rows: int) -> int:
    """The rule before: once an index would name more than 8 files, everything is merged."""
    return len(files) if len(files) + 1 > 8 else 0


RULES = {"every 8th": every_8th, "binary": newest_to_merge}


def new_job(url: str, options: dict, records: int) -> Ledger:
    ledger = Ledger(url, options)
    ledger.write_manifest(MiniBatch(ordinal=i, kind="files", payload={"files": [f"f{i:07d}.txt"]}, item_count=1)
                          for i in range(records))
    return ledger


def write_records(ledger: Ledger, out: list, start: int, end: int) -> None:
    """Records ``start``..``end`` (a batch each), written by the workers at once, as on a cluster."""
    def write(w: int) -> None:
        for i in range(start + w, end, len(out)):
            out[w].write(DoneRecord(batch=batch_id(i), run="r1", attempt=1, items=1, returned=1, part=None,
                                    node="0" * 56, worker=f"instance0-slot{w}", seconds=0.01, started=1.7e9 + i),
                         f"f{i:07d}.txt 42\n".encode())
        out[w].flush()

    with ThreadPoolExecutor(len(out)) as pool:
        list(pool.map(write, range(len(out))))


def merges(records: int, every: int, writers: int, rule: str, store: str) -> dict:
    """Part 1 for one rule: the job's records written and compacted every ``every``, as a session
    does, on local disk or an emulator (``store``)."""
    saved = ledger_module.newest_to_merge
    ledger_module.newest_to_merge = RULES[rule]
    try:
        with job_root(store) as (url, options):
            ledger = new_job(url, options, records)
            limits = {"flush_batches": 1 << 30, "flush_bytes": 1 << 40, "flush_seconds": float("inf")}  # at each step
            out = [ledger.done_writer(f"r1~i0s{w}-bench", limits) for w in range(writers)]
            written, most, compacting = [0], 0, 0.0
            write_atomic = ledger.store.write_atomic

            def counting(data, *path):
                if path[0] == "compact":
                    written[0] += len(data)
                return write_atomic(data, *path)

            ledger.store.write_atomic = counting
            for start in range(0, records, every):
                write_records(ledger, out, start, min(start + every, records))
                began = time.perf_counter()
                ledger.compact("r1")
                compacting += time.perf_counter() - began
                most = max(most, sum(p.endswith(".arrow") for p in ledger.store.file_sizes("compact")))
            final = sum(size for p, size in ledger.store.file_sizes("compact").items() if p.endswith(".arrow"))
            began = time.perf_counter()
            done = len(Ledger(url, options).view(lean=True).done)
            return {"seconds": compacting, "written": written[0], "final": final, "most": most,
                    "view": time.perf_counter() - began, "done": done}
    finally:
        ledger_module.newest_to_merge = saved


@contextmanager
def job_root(store: str):
    """(a job dir's URL, its fsspec options): in a temp folder, or on an emulator started for it."""
    if store == "local":
        root = tempfile.mkdtemp(prefix="raypar-tiers-")
        try:
            yield os.path.join(root, "job"), {}
        finally:
            shutil.rmtree(root, ignore_errors=True)
    else:
        with object_store_root(store, "raypar-tiers-") as (base, options):
            yield f"{base}/job", options


def views(store: str, segments: int, every: int) -> None:
    """Part 2: a status view with ``segments`` one-batch segments not compacted; then, compacted,
    with ``every`` - 1 more stored since (the most a view reads one by one before the next)."""
    with object_store_root(store, "raypar-tiers-") as (base, options):
        url = f"{base}/job"
        ledger = new_job(url, options, segments + every)
        limits = {"flush_batches": 1, "flush_bytes": 1 << 30, "flush_seconds": 0}  # a segment per batch
        out = [ledger.done_writer(f"r1~i0s{w}-bench", limits) for w in range(8)]
        began = time.perf_counter()
        write_records(ledger, out, 0, segments)
        print(f"  (stored {segments:,} one-batch segments in {time.perf_counter() - began:.0f} s)", flush=True)
        before, found = status_view(url, options, segments)
        print(f"  status view, {segments:,} segments not compacted: {before:7.2f} s ({found:,} records)")
        ledger.compact("r1")
        write_records(ledger, out, segments, segments + every - 1)
        now, found = status_view(url, options, segments + every - 1)
        print(f"  status view, {every - 1:,} segments not compacted: {now:7.2f} s ({found:,} records)")
        print(f"  {before / now:.1f}x")


def status_view(url: str, options: dict, segments_now: int) -> tuple[float, int]:
    """The view ``raypar status`` takes, best of 3 with a fresh client each; checks it found them all."""
    runs = []
    for _ in range(3):
        began = time.perf_counter()
        found = len(Ledger(url, options).view(lean=True, errors_of=3).done)
        runs.append((time.perf_counter() - began, found))
    assert all(found == segments_now for _, found in runs), runs
    return min(runs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--every", type=int, default=2_000)
    parser.add_argument("--writers", type=int, default=16)
    parser.add_argument("--store", choices=["s3", "azurite"], default="s3", help="part 2's emulator")
    parser.add_argument("--merges-on", choices=["local", "s3", "azurite"], default="local", help="part 1's store")
    parser.add_argument("--segments", type=int, default=10_000)
    args = parser.parse_args()
    if args.records:
        print(f"Part 1: {args.records:,} records, a compaction every {args.every:,}, {args.writers} writers, "
              f"{args.merges_on}")
        print(f"{'rule':<10} {'compacting':>11} {'written':>10} {'per record':>11} {'most files':>11} "
              f"{'view':>8} {'records':>10}")
        got = {}
        for rule in RULES:
            got[rule] = r = merges(args.records, args.every, args.writers, rule, args.merges_on)
            assert r["done"] == args.records, r
            print(f"{rule:<10} {r['seconds']:9.1f} s {r['written'] / 1e6:7.0f} MB {r['written'] / r['final']:10.1f}x "
                  f"{r['most']:>11} {r['view']:6.2f} s {r['done']:>10,}", flush=True)
        before, now = got["every 8th"], got["binary"]
        print(f"binary against every 8th: {before['seconds'] / now['seconds']:.1f}x less time compacting, "
              f"{before['written'] / now['written']:.1f}x fewer bytes written")
    if args.segments:
        print(f"Part 2: {args.segments:,} one-batch segments on {args.store}, a compaction every {args.every:,}")
        views(args.store, args.segments, args.every)
    print_load()
    return 0


if __name__ == "__main__":
    sys.exit(main())
