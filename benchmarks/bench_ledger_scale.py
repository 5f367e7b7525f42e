"""How fast `raypar resume` finds the pending set of a very large job, and in how much memory.

Builds a job dir with --batches planned mini-batches (default 1,000,000) of which
--done (default 990,000) are done, written through the real ledger API: per-worker
segments on local disk, compacted as a driver compacts them. The last
--uncompacted (default: the driver's compaction interval, COMPACT_EVERY) done records
are written after the last compaction, which is the worst case a driver killed
just before its next compaction leaves behind.

Then, in a fresh interpreter, it times what `raypar resume` does before it
schedules anything: read the manifest, read the ledger, compute pending. It
prints seconds and peak resident memory against the targets (<= 2 s, < 1 GiB).

    python benchmarks/bench_ledger_scale.py [--batches N] [--done N] [--uncompacted N] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time

from raypar.driver import COMPACT_EVERY

MEASURE = r"""
import json, sys, time
from raypar.ledger import Ledger
started = time.perf_counter()
ledger = Ledger(sys.argv[1])
manifest = ledger.read_manifest()
pending = ledger.view(manifest).pending()
seconds = time.perf_counter() - started
# VmHWM, not ru_maxrss: on Linux ru_maxrss keeps the parent's peak across fork+exec.
rss = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
print(json.dumps({"seconds": seconds, "rss_mib": rss, "pending": len(pending), "total": len(manifest)}))
"""


def build(job: str, batches: int, done: int, uncompacted: int, writers: int = 16) -> None:
    from raypar.inputs.base import MiniBatch
    from raypar.ledger import DoneRecord, Ledger

    ledger = Ledger(job)
    ledger.write_manifest(
        MiniBatch(ordinal=i, kind="files", payload={"files": [f"d{i // 1000:04d}/f{i:07d}.txt"]}, item_count=1)
        for i in range(batches)
    )
    out = [ledger.done_writer(f"r1~i0s{w}-bench") for w in range(writers)]
    for i in range(done):
        if i == done - uncompacted:
            ledger.compact("r1")
        record = DoneRecord(batch=f"mb-{i:07d}", run="r1", attempt=1, items=1, returned=1, part=None,
                            node="0" * 56, worker=f"instance0-slot{i % writers}", seconds=0.01,
                            started=1.7e9 + i)
        out[i % writers].write(record, f"f{i:07d}.txt 42\n".encode())
    if uncompacted == 0:
        ledger.compact("r1")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=1_000_000)
    parser.add_argument("--done", type=int, default=990_000)
    parser.add_argument("--uncompacted", type=int, default=COMPACT_EVERY)
    parser.add_argument("--keep", action="store_true", help="keep the job dir and print its path")
    args = parser.parse_args()

    root = tempfile.mkdtemp(prefix="raypar-ledger-scale-")
    job = f"{root}/job"
    try:
        started = time.time()
        build(job, args.batches, args.done, args.uncompacted)
        print(f"built {args.batches:,} batches, {args.done:,} done ({args.uncompacted:,} after the last "
              f"compaction) in {time.time() - started:.0f}s")
        runs = []
        for _ in range(3):
            out = subprocess.run([sys.executable, "-c", MEASURE, job], capture_output=True, text=True, check=True)
            runs.append(json.loads(out.stdout))
        best = min(runs, key=lambda r: r["seconds"])
        assert best["pending"] == args.batches - args.done, best
        print(f"pending set: {best['pending']:,} of {best['total']:,} in {best['seconds']:.2f}s "
              f"(best of 3; target <= 2 s); peak RSS {max(r['rss_mib'] for r in runs):.0f} MiB (target < 1024)")
        ok = best["seconds"] <= 2 and max(r["rss_mib"] for r in runs) < 1024
        print("targets: " + ("met" if ok else "MISSED"))
        return 0
    finally:
        if args.keep:
            print(f"job dir kept: {job}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
