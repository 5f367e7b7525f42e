"""Whether the workers wait while the driver compacts: a job of one-batch segments on Azurite.

On an object store a compaction reads every segment stored since the last one (a ranged GET of
each one's records). A session compacts every COMPACT_EVERY (50,000) done batches; where batches
outlast ``flush_seconds`` every segment holds one batch, so that is 50,000 GETs. When the
compaction ran in the scheduler's loop, no batch was handed out meanwhile: the workers ran what
was queued on them and then waited.

This runs --batches one-file batches (``run()`` sleeps --run-ms, ``flush_batches: 1``: a segment
per batch) on --workers workers, job dir on Azurite, the driver in this process with
COMPACT_EVERY set to --every. It prints the job's time, the compactions during the session
(count, seconds), and the longest gap between one batch's start and the next's (any worker), from
the done records: the time no batch began.

    python benchmarks/bench_compaction_beside.py [--batches 6000] [--every 1500] [--segments 2000] [--run-ms 20]
        [--workers 2]

With --every 50000 the compactions while the job runs come from COMPACT_SEGMENTS alone (every
2,000 segments stored); --segments 1000000000 as well gives the rule before stop 44 (none).

To compare with the compaction in the scheduler's loop, run it with raypar/engine/upkeep.py and
raypar/engine/driver.py of commit bdee17f (the session before the compaction thread).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import azurite_and_ray, print_load, run_raypar  # noqa: E402

from raypar.engine import upkeep  # noqa: E402
from raypar.jobdir.ledger import Ledger  # noqa: E402

ENTRY = """
import os, sys, time

def init():
    global pause
    pause = float(sys.argv[1]) / 1000

def run(mini_batch):
    time.sleep(pause)
    return [os.path.basename(p) for p in mini_batch]
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=6000)
    parser.add_argument("--every", type=int, default=1500, help="COMPACT_EVERY for this run")
    parser.add_argument("--segments", type=int, default=upkeep.COMPACT_SEGMENTS,
                        help="COMPACT_SEGMENTS for this run (a huge number: the rule before stop 44, none)")
    parser.add_argument("--run-ms", type=float, default=20.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    upkeep.COMPACT_EVERY, upkeep.COMPACT_SEGMENTS = args.every, args.segments
    timed = []
    compact = Ledger.compact

    def timing(self, run, *args, **kwargs):
        started = time.perf_counter()
        try:
            return compact(self, run, *args, **kwargs)
        finally:
            timed.append((kwargs.get("session_over", bool(args and args[0])), time.perf_counter() - started))

    Ledger.compact = timing
    with azurite_and_ray("raypar-bench-compaction-", keep=False) as (root, fs):
        data, code = os.path.join(root, "data"), os.path.join(root, "code")
        os.makedirs(data)
        os.makedirs(code)
        for i in range(args.batches):
            with open(os.path.join(data, f"f{i:06d}.txt"), "w") as f:
                f.write("x")
        with open(os.path.join(code, "entry.py"), "w") as f:
            f.write(ENTRY)
        fs.mkdir("bench")
        spec = {
            "type": "parallel", "name": "compaction-beside",
            "inputs": {"data": {"type": "uri_folder", "path": data}},
            "outputs": {"out": {"type": "uri_folder", "path": os.path.join(root, "out")}},
            "input_data": "${{inputs.data}}", "mini_batch_size": "1",
            "resources": {"instance_count": 1}, "max_concurrency_per_instance": args.workers,
            "retry_settings": {"max_retries": 0, "timeout": 600},
            "task": {"type": "run_function", "code": code, "entry_script": "entry.py",
                     "program_arguments": str(args.run_ms), "append_row_to": "${{outputs.out}}"},
            "raypar": {"ledger": {"flush_batches": 1}, "worker": {"num_cpus": 0.5}},
        }
        job = "az://bench/job"
        started = time.perf_counter()
        outcome = run_raypar(spec, job, args.verbose)
        seconds = time.perf_counter() - started
        assert outcome.completed == args.batches, outcome
        records = Ledger(job).view().done.values()
        starts = sorted(r.started for r in records)
        gaps = list(np.diff(starts))
        during = [s for over, s in timed if not over]
        print(f"{args.batches:,} batches of {args.run_ms:g} ms, {args.workers} workers, a segment each, "
              f"COMPACT_EVERY {args.every:,}, COMPACT_SEGMENTS {args.segments:,}")
        print(f"  job {seconds:.1f} s; compactions while running: {len(during)} "
              f"({', '.join(f'{s:.1f}' for s in during)} s); at the end: "
              f"{sum(s for over, s in timed if over):.1f} s")
        print(f"  longest gap between batch starts {max(gaps):.2f} s; gaps over 1 s: {sum(g > 1 for g in gaps)} "
              f"({sum(g for g in gaps if g > 1):.1f} s)")
    print_load()
    return 0


if __name__ == "__main__":
    sys.exit(main())
