"""The scheduler at a thousand workers: the real policy and the real ledger view, simulated workers.

For each worker count (--workers, default 10, 100, 1000) a fresh interpreter builds a job dir
with --batches planned one-file mini-batches (default 1,000,000), reads the pending set as a
resume does (Ledger.view(lean=True).pending()), and runs raypar's Scheduler to the end on
raypar.engine.simulated.SimulatedCluster: workers that exist only as times on a simulated
clock. Durations are log-normal around --seconds (default 30 s of simulated time); 1% of
attempts fail in run() (a user error, retried: max_retries 2); 0.5% straggle (10x); a few
workers die mid-batch (--lost, default 5). Failed attempts are written to the job dir by the
real ledger, as a driver writes them. With --churn N the job is elastic (issue 17): N instances'
nodes leave at random instants (their workers die mid-batch) and N new instances join, spread
over the job's expected length. An elastic job (--elastic, or --churn) runs twice, its idle
instances given back at the tail and kept to the end, and prints the instance-hours each reserved.

It prints, per worker count: scheduling decisions (dispatches + answers handled) per CPU
second of the scheduler, CPU per mini-batch, and the process's peak memory; and checks
that every batch ended done or failed. Targets (issue 14): >= 20,000 decisions/s on one core
of this machine, <= 1 GiB, at 1,000 workers.

    python benchmarks/bench_engine_simulation.py [--batches N] [--workers 10 100 1000] [--seed 1] [--churn N]
    python benchmarks/bench_engine_simulation.py --workers 1000 --batches 100000 --elastic   # the tail's give-back
    python benchmarks/bench_engine_simulation.py --workers 100 1000 --batches 100000 --broken   # a script failing all
    python benchmarks/bench_engine_simulation.py --workers 2 100 1000 --batches 124000 --slices 124   # row groups' slices
    python benchmarks/bench_engine_simulation.py --workers 10 100 1000 --batches 20000 --take-back   # the tail

With --take-back each job runs twice, calls queued behind a long batch taken back for idle
workers (raypar.engine.scheduler.WITHDRAW_AFTER) and not, the job's simulated length side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import print_load  # noqa: E402

ONE = r"""
import json, random, sys, time
from raypar.engine.scheduler import Progress, Scheduler
from raypar.engine.simulated import Outcome, SimulatedCluster
from raypar.inputs.base import MiniBatch
from raypar.jobdir.ledger import Ledger
from raypar.spec.loading import spec_from_dict

root, batches, workers, seconds, lost, seed = sys.argv[1], *map(int, sys.argv[2:4]), float(sys.argv[4]), \
    int(sys.argv[5]), int(sys.argv[6])
churn, elastic, give_back = int(sys.argv[7]), sys.argv[8] == "1", sys.argv[9] == "1"
broken, before_success = sys.argv[10] == "1", int(sys.argv[11])
slices, reserve = int(sys.argv[12]), sys.argv[13] == "1"
sigma = float(sys.argv[15])
if sys.argv[14] == "0":  # calls queued behind a long batch wait for it, as before they were taken back
    import raypar.engine.scheduler
    raypar.engine.scheduler.WITHDRAW_AFTER = float("inf")
if not reserve:  # the dispatch before row groups' slices were kept for one worker
    import raypar.engine.scheduler
    raypar.engine.scheduler.RESERVE_MAX = 0


def planned(i):
    if not slices:
        return MiniBatch(ordinal=i, kind="files", payload={"files": [f"f{i:08d}.txt"]}, item_count=1)
    group, k = divmod(i, slices)  # slice k of a row group cut into `slices`, as the planner writes it
    return MiniBatch(ordinal=i, kind="table", item_count=100, payload={
        "pieces": [{"file": f"t{group:07d}.parquet", "row_group": 0, "rows": [100 * k, 100 * k + 100]}]})


ledger = Ledger(f"{root}/job")
started = time.perf_counter()
ledger.write_manifest(planned(i) for i in range(batches))
built = time.perf_counter() - started
pending = ledger.view(ledger.read_manifest(), lean=True).pending()
per_instance = 10 if workers % 10 == 0 else 1
spec = spec_from_dict({
    "type": "parallel", "name": "simulation",
    "inputs": {"data": {"type": "uri_folder", "path": f"{root}/data"}}, "input_data": "${{inputs.data}}",
    "resources": {"instance_count": workers // per_instance,
                  **({"max_instance_count": workers // per_instance + churn} if elastic else {})},
    "raypar": {"give_back_idle_instances": give_back, "failures_before_first_success": before_success},
    "max_concurrency_per_instance": per_instance,
    "retry_settings": {"max_retries": 2, "timeout": int(100 * seconds)},
    "mini_batch_error_threshold": -1, "mini_batch_size": "1",
    "task": {"code": root, "entry_script": "score.py"},
})
rng = random.Random(seed)
lost_at = set(rng.sample(range(batches), lost))
ORDINAL = '"ordinal":'
decoded = set()  # (row group, worker): each pair decodes that row group once

def behaviour(batch_json, attempt, worker):
    duration = rng.lognormvariate(0, sigma) * seconds
    draw = rng.random()
    at = batch_json.index(ORDINAL) + len(ORDINAL)
    ordinal = int(batch_json[at:batch_json.index(",", at)])
    if slices:
        decoded.add((ordinal // slices, worker))
    if broken:  # the script loads its model, then raises on every mini-batch
        return Outcome(duration / 2, "user")
    if attempt == 1 and ordinal in lost_at:
        return Outcome(duration / 2, "lost")
    if draw < 0.01:
        return Outcome(duration, "user")
    if draw < 0.015:
        return Outcome(duration * 10)
    return Outcome(duration)

cluster = SimulatedCluster(behaviour, start_seconds=5.0)
instances = workers // per_instance
held_from = {i: 0.0 for i in range(instances)}  # elastic: when each instance was placed
if elastic:  # with churn, nodes leave and join at random instants over the job's expected length
    length = batches * seconds / workers
    leaving = rng.sample(range(instances), min(churn, instances - 1))
    joining = [(rng.uniform(0, length), "join", instances + k) for k in range(churn)]
    held_from.update({i: when for when, _, i in joining})
    cluster.with_nodes(list(range(instances)), [(rng.uniform(0, length), "leave", i) for i in leaving] + joining)
scheduler = Scheduler(ledger, spec, "r1", pending, cluster, Progress(total=len(pending)))
cpu = time.process_time()
reason = scheduler.run()
cpu = time.process_time() - cpu
progress = scheduler.progress
if not broken or before_success < 0:
    assert reason is None, reason
    assert progress.done + progress.failed == batches, (progress.done, progress.failed)
else:
    assert reason.startswith(f"{before_success + 1} mini-batch(es) failed and none has succeeded"), reason
rss = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
# Instance-hours reserved: from placement to the instance's give-back (at the tail, or as its node
# left: the scheduler drops it then) or to the job's end.
held_until = {}
for when, instance in cluster.given_back:
    held_until.setdefault(instance, when)
placed = {s.instance for s in scheduler.slots}
instance_hours = sum(held_until.get(i, cluster.now) - held_from[i] for i in placed) / 3600
calls = cluster.stats["run_batch"]
print(json.dumps({"workers": len(scheduler.slots), "left": sum(s.left for s in scheduler.slots), "batches": batches, "cpu": cpu, "calls": calls,
                  "decisions": 2 * calls, "done": progress.done, "failed": progress.failed,
                  "simulated_hours": cluster.now / 3600, "rss_mib": rss, "manifest_seconds": built,
                  "instance_hours": instance_hours, "given_back": len(cluster.given_back), "decoded": len(decoded),
                  "taken_back": len(cluster.withdrawn),
                  # The session's worker time line (raypar before it had none: a worktree of older code).
                  "worker_time": scheduler.worker_time.split(cluster.now).describe()
                  if hasattr(scheduler, "worker_time") else None,
                  "worker_hours": sum(cluster.now - held_from[i] for i in placed) * per_instance / 3600}))
"""


def simulate(args, workers: int, elastic: bool, give_back: bool, before_success: int = 10,
             reserve: bool = True, take_back: bool = True) -> dict | None:
    """One simulated job in a fresh interpreter: its figures, or None (its error printed)."""
    with tempfile.TemporaryDirectory(prefix="raypar-sim-") as root:
        out = subprocess.run([sys.executable, "-c", ONE, root, str(args.batches), str(workers), str(args.seconds),
                              str(args.lost), str(args.seed), str(args.churn), str(int(elastic)), str(int(give_back)),
                              str(int(args.broken)), str(before_success), str(args.slices), str(int(reserve)),
                              str(int(take_back)), str(args.sigma)],
                             capture_output=True, text=True)
    if out.returncode:
        print(out.stderr, file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--sigma", type=float, default=0.5,
                        help="the spread of batch durations: log-normal around --seconds with this sigma")
    parser.add_argument("--lost", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--churn", type=int, default=0, help="elastic: instances that leave, and as many that join")
    parser.add_argument("--elastic", action="store_true",
                        help="an elastic job (implied by --churn), run twice: instances given back at the tail "
                             "and kept (raypar.give_back_idle_instances), their instance-hours side by side")
    parser.add_argument("--broken", action="store_true",
                        help="every attempt fails in run() (after half its time): run with "
                             "raypar.failures_before_first_success at 10 and at -1, their worker-hours side by side")
    parser.add_argument("--slices", type=int, default=0,
                        help="the batches are slices of parquet row groups cut into this many: run with the slices "
                             "of a row group kept for one worker and dealt out in turn, row groups decoded side by side")
    parser.add_argument("--take-back", action="store_true",
                        help="run each job with calls queued behind a long batch taken back for idle workers and "
                             "without, the jobs' simulated lengths side by side")
    args = parser.parse_args()
    if args.take_back:
        return taken_back(args)
    if args.broken:
        return broken_script(args)
    if args.slices:
        return sliced_row_groups(args)
    elastic = args.elastic or args.churn > 0
    ok = None
    for workers in args.workers:
        held = {}
        for give_back in (True, False) if elastic else (True,):
            r = simulate(args, workers, elastic, give_back)
            if r is None:
                return 1
            rate = r["decisions"] / r["cpu"]
            churn = (f" ({r['left']} slots left with their nodes, {r['workers'] - workers} joined)"
                     if args.churn else "")
            side = (f", instances {'given back at the tail' if give_back else 'kept to the end'}: "
                    f"{r['instance_hours']:.1f} instance-hours reserved" if elastic else "")
            print(f"{r['workers']:>5} workers{churn}, {r['batches']:,} batches ({r['done']:,} done, "
                  f"{r['failed']:,} failed, {r['calls']:,} attempts, {r['simulated_hours']:.2f} simulated hours"
                  f"{side}): scheduler CPU {r['cpu']:.1f}s = {1e6 * r['cpu'] / r['batches']:.0f} us per batch, "
                  f"{rate:,.0f} decisions/s; peak memory {r['rss_mib']:.0f} MiB", flush=True)
            if r.get("worker_time"):
                print(f"      worker time {r['worker_time']}", flush=True)
            held[give_back] = r
            if workers >= 1000 and give_back:
                ok = (ok is not False) and rate >= 20_000 and r["rss_mib"] <= 1024
        if elastic:
            on, off = held[True], held[False]
            print(f"      giving idle instances back at the tail: {off['instance_hours'] - on['instance_hours']:.1f} "
                  f"instance-hours less ({1 - on['instance_hours'] / off['instance_hours']:.1%}), the job "
                  f"{on['simulated_hours']:.2f} h against {off['simulated_hours']:.2f} h", flush=True)
    if ok is not None:
        print("targets at 1,000 workers (>= 20,000 decisions/s, <= 1 GiB): " + ("met" if ok else "MISSED"))
    print_load()
    return 0


def sliced_row_groups(args) -> int:
    """Row groups cut into slices: how often each is decoded (once per worker that runs a slice of
    it), with its slices kept for one worker and dealt out in turn as before."""
    groups = -(-args.batches // args.slices)
    for workers in args.workers:
        for reserve in (True, False):
            r = simulate(args, workers, False, True, reserve=reserve)
            if r is None:
                return 1
            print(f"{workers:>5} workers, {args.batches:,} slices of {groups:,} row groups, slices "
                  f"{'kept for one worker' if reserve else 'dealt out in turn'}: row groups decoded "
                  f"{r['decoded']:,} times ({r['decoded'] / groups:.2f} each), the job {r['simulated_hours']:.2f} "
                  f"simulated hours; scheduler CPU {1e6 * r['cpu'] / r['batches']:.0f} us per batch, "
                  f"{r['decisions'] / r['cpu']:,.0f} decisions/s; peak memory {r['rss_mib']:.0f} MiB", flush=True)
    print_load()
    return 0


def taken_back(args) -> int:
    """The tail: calls queued behind a long batch taken back for workers that ran out of work, or
    left to wait for it; the job's simulated length each way."""
    for workers in args.workers:
        length = {}
        for take_back in (False, True):
            r = simulate(args, workers, False, True, take_back=take_back)
            if r is None:
                return 1
            length[take_back] = r["simulated_hours"] * 3600
            print(f"{workers:>5} workers, {args.batches:,} batches ({args.batches / workers:,.0f} a worker), calls "
                  f"{'taken back' if take_back else 'left to wait'}: the job {length[take_back]:,.0f} simulated s, "
                  f"{r['taken_back']:,} batches taken back; scheduler CPU {1e6 * r['cpu'] / r['batches']:.0f} us per "
                  f"batch", flush=True)
        print(f"      taken back: the job {length[False] - length[True]:,.0f} s shorter "
              f"({1 - length[True] / length[False]:.1%})", flush=True)
    print_load()
    return 0


def broken_script(args) -> int:
    """A script that fails every mini-batch: what the job spends before it ends, stopped early or not."""
    for workers in args.workers:
        for before_success in (10, -1):
            r = simulate(args, workers, False, True, before_success)
            if r is None:
                return 1
            print(f"{workers:>5} workers, {args.batches:,} batches, every attempt fails, "
                  f"failures_before_first_success={before_success}: {r['failed']:,} failed, {r['calls']:,} attempts, "
                  f"the job {r['simulated_hours'] * 3600:,.0f} simulated s, {r['worker_hours']:,.1f} worker-hours "
                  f"reserved; peak memory {r['rss_mib']:.0f} MiB", flush=True)
    print_load()
    return 0


if __name__ == "__main__":
    sys.exit(main())
