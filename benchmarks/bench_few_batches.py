"""A resume that redoes a few mini-batches (or, with --fresh, a fresh job of a few) on many worker
slots: one worker per batch, or every slot.

The workload: --files one-file mini-batches on --slots worker slots of one instance, an entry
script whose init() spends --init-cpu seconds of CPU (a stand-in for loading a model) and whose
run() fails for the first --redo files until a flag file exists (max_retries 0: they end failed,
the job succeeds with them failed, Azure's default thresholds). The flag is then set and the
job resumed: that resume is what is measured, side by side in each round, on one Ray started here:

- one per batch: raypar as it is (a session with fewer batches than slots starts one worker per
  batch, raypar.engine.scheduler.Scheduler._first_slots);
- every slot: the same resume with every slot reserved and its worker started, as raypar did
  before (the script turns Scheduler._sized_to_batches off in its own driver).

With --fresh the measured run is a new job over --redo files (a smoke test under the spec of a
large job): its planner lists while the driver connects to Ray, and the session waits for it
(Scheduler.run, SIZING_WAIT) to size itself; every slot started is how raypar ran fresh jobs before.

It prints, per side: the resume's wall time, the machine's CPU seconds during it (from
/proc/stat: measure on an idle machine), and the workers it started (their log files in the job
dir); then the medians and the ratios every slot / one per batch. Each resume's output is
checked: every file's row once.

    python benchmarks/bench_few_batches.py [--files 32] [--slots 16] [--redo 2] [--init-cpu 1.0] [--rounds 3] [--fresh]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import textwrap
import time

import ray

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cpu_jiffies, print_load, run_raypar, tear_down, wait_for_free_cpus  # noqa: E402

import raypar  # noqa: E402
from raypar.engine.scheduler import Scheduler  # noqa: E402

ENTRY = textwrap.dedent("""
    import argparse, os, time

    args = None

    def init():
        global args
        parser = argparse.ArgumentParser()
        parser.add_argument("--init-cpu", type=float)
        parser.add_argument("--redo", type=int)
        parser.add_argument("--flag")
        args, _ = parser.parse_known_args()
        end = time.process_time() + args.init_cpu  # loading a model: CPU, as a deserialisation is
        while time.process_time() < end:
            pass

    def run(mini_batch):
        rows = []
        for path in mini_batch:
            name = os.path.basename(path)
            if int(name[1:6]) < args.redo and not os.path.exists(args.flag):
                raise RuntimeError(f"{name}: not yet")
            rows.append(name)
        return rows
""")


def job(root: str, tag: str, files: int, slots: int, redo: int, init_cpu: float) -> dict:
    data, code = os.path.join(root, tag, "data"), os.path.join(root, tag, "code")
    for folder in (data, code):
        os.makedirs(folder, exist_ok=True)
    for i in range(files):
        with open(os.path.join(data, f"f{i:05d}.txt"), "w") as f:
            f.write("x")
    with open(os.path.join(code, "entry.py"), "w") as f:
        f.write(ENTRY)
    flag = os.path.join(root, tag, "flag")
    return {
        "type": "parallel", "name": f"few-{tag}",
        "inputs": {"data": {"type": "uri_folder", "path": data}},
        "outputs": {"out": {"type": "uri_folder", "path": os.path.join(root, tag, "out")}},
        "input_data": "${{inputs.data}}", "mini_batch_size": "1",
        "resources": {"instance_count": 1}, "max_concurrency_per_instance": slots,
        "retry_settings": {"max_retries": 0, "timeout": 600},
        "task": {"type": "run_function", "code": code, "entry_script": "entry.py",
                 "program_arguments": f"--init-cpu {init_cpu} --redo {redo} --flag {flag}",
                 "append_row_to": "${{outputs.out}}"},
        "raypar": {"worker": {"num_cpus": round(2 / slots, 4)}},
    }


def worker_logs(job_dir: str) -> set:
    return {n for n in os.listdir(os.path.join(job_dir, "logs")) if re.search(r"~i\d+s\d+-\w+\.log$", n)}


def measure(root: str, tag: str, args, every_slot: bool) -> dict:
    """The resume of --redo failed batches of --files (or with --fresh a new job of --redo files)."""
    files = args.redo if args.fresh else args.files
    spec = job(root, tag, files, args.slots, args.redo, args.init_cpu)
    job_dir = os.path.join(root, tag, "job")
    before = set()
    if not args.fresh:
        first = run_raypar(spec, job_dir, verbose=False)
        assert (first.completed, first.failed) == (args.files - args.redo, args.redo), first
        before = worker_logs(job_dir)
    open(os.path.join(root, tag, "flag"), "w").close()
    sized = Scheduler._sized_to_batches
    if every_slot:  # as raypar ran every session before: every instance, every slot reserved and started
        Scheduler._sized_to_batches = lambda self: False
    try:
        wait_for_free_cpus(2)
        busy = cpu_jiffies()[0]
        started = time.perf_counter()
        if args.fresh:
            outcome = raypar.run(spec, job_dir=job_dir, echo=lambda line: None).wait()
        else:
            outcome = raypar.resume(job_dir, echo=lambda line: None).wait()
        wall = time.perf_counter() - started
        cpu = (cpu_jiffies()[0] - busy) / os.sysconf("SC_CLK_TCK")
    finally:
        Scheduler._sized_to_batches = sized
    rows = open(os.path.join(root, tag, "out", "parallel_run_step.txt")).read().split()
    assert outcome.state.value == "succeeded" and sorted(rows) == [f"f{i:05d}.txt" for i in range(files)]
    return {"wall": wall, "cpu": cpu, "workers": len(worker_logs(job_dir) - before)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=32)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--redo", type=int, default=2)
    parser.add_argument("--init-cpu", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fresh", action="store_true", help="measure a new job of --redo files, not a resume")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="raypar-few-")
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    results = {False: [], True: []}
    try:
        for r in range(args.rounds):
            for every_slot in ((False, True) if r % 2 == 0 else (True, False)):  # the order turns each round
                side = "every slot" if every_slot else "one per batch"
                result = measure(root, f"r{r}-{'all' if every_slot else 'few'}", args, every_slot)
                results[every_slot].append(result)
                print(f"round {r + 1}, {side}: {result['wall']:.2f}s, {result['cpu']:.1f} CPU-s, "
                      f"{result['workers']} workers started", flush=True)
        few, every = ({k: statistics.median(x[k] for x in results[side]) for k in ("wall", "cpu", "workers")}
                      for side in (False, True))
        what = f"fresh job of {args.redo} batches" if args.fresh else f"resume of {args.redo} of {args.files} batches"
        print(f"{what} on {args.slots} slots, init() {args.init_cpu} CPU-s, "
              f"medians of {args.rounds}: one per batch {few['wall']:.2f}s {few['cpu']:.1f} CPU-s "
              f"{few['workers']:.0f} workers; every slot {every['wall']:.2f}s {every['cpu']:.1f} CPU-s "
              f"{every['workers']:.0f} workers; every slot / one per batch: wall {every['wall'] / few['wall']:.2f}x, "
              f"CPU {every['cpu'] / few['cpu']:.2f}x")
        print_load()
    finally:
        tear_down(root, args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
