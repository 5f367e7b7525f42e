"""What a straggler costs the output written while batches run, at a million mini-batches.

Builds a job dir of --batches done mini-batches (default 1,000,000) through the real ledger API,
as bench_ledger_scale.py does: 16 writers, segments of 1,000 batches, a 16-byte text part each.
Then, in a fresh interpreter, it plays the scheduler of a session: it tells a LiveAssembly
(outputs/live.py) that batches are stored, 1,000 at a time (a worker's flush) at --rate batches a
second, in batch order, except the straggler (--straggler, default batch 1,000: a batch waiting for
its retry), which is stored --late batches later (default 500,000: its retry ends halfway through the
job). Then the session ends: finish() with the ledger's view, as the driver calls it. Three cases
side by side, each its own interpreter:

- ``straggler``: as above;
- ``in order``: the same batches, no straggler;
- ``assemble``: no live assembly: assemble() writes the whole file after the last batch (the baseline).

It prints, for each: parts written while the batches ran, the tail (seconds from the session's end
to the published file), and the peak RSS while the batches were stored less the RSS before (what
holding the stored batches costs). Targets: the straggler's tail close to the in-order tail, far
below assemble()'s; the memory a few bytes a batch.

--resume P plays a resumed session instead: the last P batches were not done before it (the job
dir holds the others), the session stores them (writing their records, 1,000 a flush, at --rate),
and its output, which begins with the rows of the batches done before, is written while they run
(``resumed``: the thread reads where those rows are from the ledger first); against assemble() after
its last batch, which is what a resume did before 2026-12-06.

The rate is what a large cluster of tiny batches stores; a real driver also holds its own state, not
measured here: this measures the output's side of the driver only.

--store azurite puts the job dir and the output on Azure Blob (Azurite on 127.0.0.1, started here).

    python benchmarks/bench_live_straggler.py [--batches N] [--straggler K] [--late L] [--rate R]
        [--store local|azurite] [--resume P]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_ledger_scale import build  # noqa: E402
from common import print_load, store_root  # noqa: E402

SESSION = r"""
import json, sys, time
from raypar.jobdir.ledger import Ledger
from raypar.outputs.assembly import assemble, done_in_order
from raypar.outputs.live import LiveAssembly

job, target, case = sys.argv[1], sys.argv[2], sys.argv[3]
straggler, late, rate = int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])

def rss(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field)) / 1024

ledger = Ledger(job)
manifest = ledger.read_manifest()
if case == "resume":  # the view is read by the thread (measured), and at the end
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = rss("VmRSS")
    from raypar.jobdir.records import DoneRecord
    pending = range(straggler, len(manifest))  # (--resume P: the last P batches)
    live = LiveAssembly(ledger, target, "text", resumed=manifest)
    limits = {"flush_batches": 1000, "flush_bytes": 1 << 30, "flush_seconds": float("inf")}
    writer, flush, started = ledger.done_writer("r2~i0s0-bench", limits), [], time.perf_counter()
    for n, i in enumerate(pending):  # the session's own batches, as a worker stores them
        flush.append(writer.write(DoneRecord(batch=f"mb-{i:07d}", run="r2", attempt=1, items=1, returned=1,
                                             part=None), f"f{i:07d}.txt 42\n".encode()))
        if len(flush) == 1000 or n == len(pending) - 1:
            writer.flush()
            live.stored([(r.batch, [r.part, r.part_offset, r.part_bytes, r.part_sha256, r.part_crc32])
                         for r in flush])
            flush = []
            time.sleep(max(0.0, started + (n + 1) / rate - time.perf_counter()))
    peak = rss("VmHWM") - before
    view = ledger.view(manifest)  # the view the session's end reads (either way: not in the tail)
    ended, behind = time.perf_counter(), live.written
    size = live.finish(view)
    print(json.dumps({"while_running": live.written_while_running, "tail": time.perf_counter() - ended,
                      "held_mib": peak, "bytes": size, "at_end": behind, "gave_up": live.gave_up}))
    sys.exit()
view = ledger.view(manifest)  # the view the session's end reads, read first: not measured
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak RSS starts again from here
before = rss("VmRSS")
if case == "assemble":
    started = time.perf_counter()
    size = assemble(ledger, view, target, "text")
    print(json.dumps({"while_running": 0, "tail": time.perf_counter() - started, "held_mib": 0, "bytes": size}))
    sys.exit()
live = LiveAssembly(ledger, target, "text")
held, flush, started = None, [], time.perf_counter()
for n, part in enumerate(done_in_order(view)):  # as the workers stored them, 1,000 a flush
    event = (part.batch, [part.part, part.part_offset, part.part_bytes, part.part_sha256, part.part_crc32])
    if case == "straggler" and n == straggler:
        held = event
        continue
    flush.append(event)
    if case == "straggler" and n == straggler + late:
        flush.append(held)  # its retry is stored
    if len(flush) >= 1000:
        live.stored(flush)
        flush = []
        time.sleep(max(0.0, started + (n + 1) / rate - time.perf_counter()))  # the workers' pace
live.stored(flush)
peak = rss("VmHWM") - before
ended, behind = time.perf_counter(), live.written  # (read without a lock: a figure, not a check)
size = live.finish(view)
tail = time.perf_counter() - ended
print(json.dumps({"while_running": live.written_while_running, "tail": tail, "held_mib": peak, "bytes": size,
                  "written": live.written, "at_end": behind, "paused": live.paused, "gave_up": live.gave_up}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=1_000_000)
    parser.add_argument("--straggler", type=int, default=1000, help="the ordinal stored late")
    parser.add_argument("--late", type=int, default=500_000, help="batches stored before the straggler")
    parser.add_argument("--rate", type=float, default=100_000, help="batches stored a second")
    parser.add_argument("--store", choices=["local", "azurite"], default="local")
    parser.add_argument("--resume", type=int, default=0, metavar="P",
                        help="a resumed session instead: the last P batches run in it, the others were done before")
    args = parser.parse_args()

    with store_root(args.store, "raypar-live-straggler-") as (_, base):
        job, out = f"{base}/job", f"{base}/out"
        started = time.time()
        build(job, args.batches, args.batches - args.resume, 0)
        print(f"built {args.batches - args.resume:,} done batches of {args.batches:,} on {args.store} in {time.time() - started:.0f}s; "
              f"stored at {args.rate:,.0f} batches/s, " + (f"the last {args.resume:,} in a resumed session" if args.resume
              else f"straggler {args.straggler:,} stored {args.late:,} batches late"))
        got = {}
        cases = ("assemble", "in order", "straggler") if not args.resume else ("resume", "assemble")
        first = args.batches - args.resume if args.resume else args.straggler
        for case in cases:
            target = f"{out}/{case.replace(' ', '-')}.txt"
            run = subprocess.run([sys.executable, "-c", SESSION, job, target, case, str(first),
                                  str(args.late), str(args.rate)], capture_output=True, text=True, check=True)
            got[case] = json.loads(run.stdout)
            r = got[case]
            print(f"{case:>10}: {r.get('at_end', 0):>9,} parts written when the last batch was stored, "
                  f"{r['while_running']:>9,} before finish() wrote the rest; tail {r['tail']:6.2f}s, "
                  f"RSS while storing +{r['held_mib']:.0f} MiB, {r['bytes']:,} bytes"
                  + (f" (paused: {r['paused']})" if r.get("paused") else "")
                  + (f" (gave up: {r['gave_up']})" if r.get("gave_up") else ""))
        assert len({r["bytes"] for r in got.values()}) == 1, "the three files differ in size"
        base = got["assemble"]["tail"]
        print("tail against assemble(): " + ", ".join(f"{case} {got[case]['tail'] / base:.3f}"
                                                       for case in cases if case != "assemble"))
        print_load()
        return 0


if __name__ == "__main__":
    sys.exit(main())
