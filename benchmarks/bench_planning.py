"""Planning a million one-file mini-batches, and running them while they are planned.

Part 1, no Ray: ``--files`` tiny files in one folder are planned one file per
mini-batch through raypar's real planner and manifest writer (listing, input
versions, manifest chunks), side by side with the baseline every tool that
names the files pays: the listing alone (``os.scandir`` with a ``stat`` of
each file, sorted). Prints the seconds, the cost per batch and the ratio.

Part 2 (``--run``), on a local Ray with 2 CPUs: the same input as a job
(``mini_batch_size: "1"``, two 1-CPU workers), which starts running batches
while the planner still lists and writes the manifest. From the done records
(each batch's end time) and the moment planning ended, it prints how many
batches per second ran while planning and after. Side by side, the same job
with Python's default switch interval while planning (5 ms, raypar's setting
before 2026-12-05): the scheduler's thread then waits for Python's lock
whenever the planner holds it. The sides alternate; every run's output is
checked row for row.

    python benchmarks/bench_planning.py --files 1000000 --run
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time

# Read by every Ray process this script starts: bind to 127.0.0.1 only.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import ray  # noqa: E402
from bench_vs_actor_pool import make_workload, raypar_spec  # noqa: E402
from common import print_load, run_raypar, tear_down, wait_for_free_cpus  # noqa: E402

import raypar.engine.planning as planning  # noqa: E402
from raypar.engine.driver import _primed  # noqa: E402
from raypar.engine.scheduler import SIZING_WAIT  # noqa: E402
from raypar.inputs import check_input, plan_batches  # noqa: E402
from raypar.jobdir.ledger import Ledger  # noqa: E402
from raypar.spec.loading import as_spec  # noqa: E402

DEFAULT_SWITCH_INTERVAL = 0.005  # Python's own


def memory_mib(field: str = "VmHWM") -> float:
    """This process's memory from /proc/self/status: VmHWM its peak, VmRSS its resident size now."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return float("nan")


def list_only(folder: str) -> int:
    """The baseline: every file's name and stat, sorted."""
    entries = []
    with os.scandir(folder) as it:
        for entry in it:
            st = entry.stat()
            entries.append((entry.name, st.st_size, st.st_mtime_ns))
    entries.sort()
    return len(entries)


def plan_only(spec: dict, job_dir: str) -> int:
    """raypar's planning of the job, as a fresh run does it (listing included), without Ray."""
    job = as_spec(spec)
    ledger = Ledger(job_dir)
    ledger.create(job.to_dict(), job.to_yaml())
    feed = planning.PlanFeed(ledger, plan_batches(job, check_input(job)))
    feed.run()  # in this thread: the planner alone
    if feed.error:
        raise RuntimeError(feed.error)
    return feed.planned


def sizing_wait(spec: dict, job_dir: str, slots: int) -> tuple[float, float, bool]:
    """What a fresh job's driver does before its session reserves and starts workers: it computes
    the input's first batch in its own thread (driver._primed: a folder is listed whole then),
    starts the planner, and the session waits for a batch for each of ``slots`` slots or the
    plan's end, at most SIZING_WAIT after the planner started (Scheduler.run). Returns (seconds
    to the first batch, seconds waited after the planner started, whether the count was known)."""
    job = as_spec(spec)
    started = time.perf_counter()
    batches = _primed(plan_batches(job, check_input(job)))
    primed = time.perf_counter() - started
    ledger = Ledger(job_dir)
    ledger.create(job.to_dict(), job.to_yaml())
    feed = planning.PlanFeed(ledger, batches, first_release=slots)
    feed.start()
    feed.wait_for(slots, SIZING_WAIT)
    waited, known = time.monotonic() - feed.started_at, feed.finished.is_set() or feed.to_run >= slots
    feed.stop()
    return primed, waited, known


def part_one(root: str, inputs: str, code: str, files: int, slots: int) -> None:
    best_list, best_plan = float("inf"), float("inf")
    for rnd in range(2):
        t = time.perf_counter()
        assert list_only(inputs) == files
        best_list = min(best_list, time.perf_counter() - t)
        job_dir = os.path.join(root, f"plan-only-{rnd}")
        t = time.perf_counter()
        planned = plan_only(raypar_spec(inputs, code, os.path.join(root, "unused.txt"), 1), job_dir)
        best_plan = min(best_plan, time.perf_counter() - t)
        assert planned == files, f"planned {planned} batches, expected {files}"
        shutil.rmtree(job_dir)
    print(f"listing alone:     {best_list:6.2f} s ({best_list / files * 1e6:.1f} us per file)")
    print(f"raypar's planning: {best_plan:6.2f} s ({best_plan / files * 1e6:.1f} us per batch), "
          f"{best_plan / best_list:.1f}x the listing; peak memory so far {memory_mib():.0f} MiB", flush=True)
    spec = raypar_spec(inputs, code, os.path.join(root, "unused.txt"), 1)
    waits = [sizing_wait(spec, os.path.join(root, f"sizing-{r}"), slots) for r in range(3)]
    primed, waited = (statistics.median(w[i] for w in waits) for i in (0, 1))
    known = "known" if all(w[2] for w in waits) else "not known: every slot starts" if not any(
        w[2] for w in waits) else "known in some rounds"
    print(f"a fresh job of {slots:,} slots: its first batch {primed * 1000:.0f} ms (the driver, before its job dir), "
          f"then its session waits {waited * 1000:.0f} ms for the planner to know whether to size itself "
          f"(medians of 3; {known}; at most SIZING_WAIT = {SIZING_WAIT:.0f} s)", flush=True)


def rates(job_dir: str, planned_at: float) -> tuple[float, float, int]:
    """(batches/s while planning, batches/s after, batches done while planning), from the done records."""
    records = list(Ledger(job_dir).view().done.values())
    ends = sorted(r.started + r.seconds for r in records)
    first = min(r.started for r in records)
    during = sum(1 for e in ends if e <= planned_at)
    after = len(ends) - during
    while_planning = during / max(planned_at - first, 1e-9)
    after_planning = after / max(ends[-1] - planned_at, 1e-9) if after else float("nan")
    return while_planning, after_planning, during


class RssSampler(threading.Thread):
    """The driver's (this process's) resident memory, sampled twice a second while a job runs."""

    def __init__(self):
        super().__init__(daemon=True)
        self.samples: list[float] = []
        self.stopped = threading.Event()

    def run(self):
        while not self.stopped.wait(0.5):
            self.samples.append(memory_mib("VmRSS"))

    def summary(self) -> str:
        self.stopped.set()
        self.join()
        if not self.samples:
            return "driver RSS: no sample"
        return f"driver RSS median {statistics.median(self.samples) / 1024:.2f} GiB, peak {max(self.samples) / 1024:.2f} GiB"


def run_job(root: str, inputs: str, code: str, label: str, rnd: int, interval: float, files: int) -> tuple:
    planning.PLANNING_SWITCH_INTERVAL = interval
    ended = []
    original = planning.PlanFeed.run

    def timed_run(feed):  # the moment planning ended, for the rates
        original(feed)
        ended.append(time.time())

    planning.PlanFeed.run = timed_run
    try:
        wait_for_free_cpus(2)
        job_dir = os.path.join(root, "jobs", f"{label}-{rnd}")
        output = os.path.join(root, "outputs", f"{label}-{rnd}.txt")
        sampler = RssSampler()
        sampler.start()
        t = time.perf_counter()
        outcome = run_raypar(raypar_spec(inputs, code, output, 1), job_dir, verbose=False)
        seconds = time.perf_counter() - t
        memory = sampler.summary()
    finally:
        planning.PlanFeed.run = original
    if outcome.exit_code != 0 or outcome.completed != files:
        raise RuntimeError(f"{label}: ended {outcome.state.value}, {outcome.completed}/{files} done: {outcome.reason}")
    during, after, done_during = rates(job_dir, ended[0])
    check_output(inputs, output, files)
    shutil.rmtree(job_dir)
    os.remove(output)
    print(f"  round {rnd} {label:>22}: {seconds:6.1f} s; while planning {during:7.0f} batches/s "
          f"({done_during} done); after {after:7.0f} batches/s; {memory}", flush=True)
    return seconds, during, after


def check_output(inputs: str, output: str, files: int) -> None:
    """Every file's row, in the input's order (the entry script's "<name> <characters>")."""
    with open(output) as f:
        rows = f.read().splitlines()
    names = sorted(os.listdir(inputs))
    if len(rows) != files or [r.split(" ")[0] for r in rows] != names:
        raise RuntimeError(f"{output}: {len(rows)} rows, not one per input file in order")
    step = max(1, files // 1000)
    for row, name in zip(rows[::step], names[::step], strict=True):
        with open(os.path.join(inputs, name)) as f:
            if row != f"{name} {len(f.read())}":
                raise RuntimeError(f"{output}: row {row!r} is wrong for {name}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=1_000_000, help="input files = mini-batches (default 1,000,000)")
    parser.add_argument("--slots", type=int, default=1_000, help="worker slots whose first batches are timed "
                                                                  "(default 1,000)")
    parser.add_argument("--run", action="store_true", help="also run the job on Ray, both switch intervals")
    parser.add_argument("--rounds", type=int, default=1, help="--run: alternating rounds per side (default 1)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = parser.parse_args(argv)
    root = tempfile.mkdtemp(prefix="raypar-bench-planning-")
    try:
        t = time.perf_counter()
        inputs, code = make_workload(root, args.files, 1)
        print(f"workload: {args.files} one-line files in one folder (generated in {time.perf_counter() - t:.0f}s)",
              flush=True)
        part_one(root, inputs, code, args.files, args.slots)
        if args.run:
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
            sides = {"raypar (0.5 ms)": [], "default interval (5 ms)": []}
            for rnd in range(1, args.rounds + 1):
                sides["raypar (0.5 ms)"].append(run_job(root, inputs, code, "raypar-0.5ms", rnd,
                                                        0.0005, args.files))
                sides["default interval (5 ms)"].append(run_job(root, inputs, code, "default-5ms", rnd,
                                                                DEFAULT_SWITCH_INTERVAL, args.files))
            best = {name: max(runs, key=lambda r: r[1]) for name, runs in sides.items()}
            ours, old = best["raypar (0.5 ms)"], best["default interval (5 ms)"]
            ratio = f"{ours[1] / old[1]:.2f}x" if old[1] else "n/a: planning ended before the first batch"
            whole = {name: min(r[0] for r in runs) for name, runs in sides.items()}
            print(f"while planning: {ours[1]:.0f} against {old[1]:.0f} batches/s ({ratio}); whole job "
                  f"{whole['raypar (0.5 ms)']:.1f} s against {whole['default interval (5 ms)']:.1f} s")
        print_load()
    finally:
        tear_down(root, args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
