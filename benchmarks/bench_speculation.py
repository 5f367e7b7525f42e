"""Speculative second attempts against stragglers: the same job with `raypar.speculation` off and on.

The workload: --batches one-file mini-batches whose run() sleeps --seconds; the first attempt
of 5% of them (chosen by --seed) is 10x slower, as a batch is on a noisy neighbour or a node
that stalls (a second attempt elsewhere is fast). 4 worker slots on one instance. Each round
runs the job twice, speculation off then on, on one Ray started here; the slow batches differ
per round (seed + round). It prints each round's wall times and the mean ratio off/on.

    python benchmarks/bench_speculation.py [--batches 60] [--seconds 0.5] [--rounds 3] [--seed 1]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import textwrap
import time

import ray

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import print_load, run_raypar, tear_down, wait_for_free_cpus  # noqa: E402

ENTRY = textwrap.dedent("""
    import argparse, os, time

    args = None

    def init():
        global args
        parser = argparse.ArgumentParser()
        parser.add_argument("--slow")  # a file naming the slow inputs, one per line
        parser.add_argument("--seconds", type=float)
        parser.add_argument("--first", help="folder marking first attempts")
        args, _ = parser.parse_known_args()
        args.slow = set(open(args.slow).read().split())

    def run(mini_batch):
        rows = []
        for path in mini_batch:
            name = os.path.basename(path)
            seconds = args.seconds
            if name in args.slow:
                try:  # only the first attempt of a slow input straggles
                    os.close(os.open(os.path.join(args.first, name), os.O_CREAT | os.O_EXCL))
                    seconds *= 10
                except FileExistsError:
                    pass
            time.sleep(seconds)
            rows.append(name)
        return rows
""")


def job(root: str, batches: int, seconds: float, slow: set, enabled: bool, tag: str) -> dict:
    data, code, first = (os.path.join(root, tag, p) for p in ("data", "code", "first"))
    for folder in (data, code, first):
        os.makedirs(folder, exist_ok=True)
    for i in range(batches):
        with open(os.path.join(data, f"f{i:05d}.txt"), "w") as f:
            f.write("x")
    with open(os.path.join(code, "entry.py"), "w") as f:
        f.write(ENTRY)
    with open(os.path.join(code, "slow.txt"), "w") as f:
        f.write("\n".join(sorted(slow)))
    return {
        "type": "parallel", "name": f"speculation-{tag}",
        "inputs": {"data": {"type": "uri_folder", "path": data}},
        "outputs": {"out": {"type": "uri_folder", "path": os.path.join(root, tag, "out")}},
        "input_data": "${{inputs.data}}", "mini_batch_size": "1",
        "resources": {"instance_count": 1}, "max_concurrency_per_instance": 4,
        "retry_settings": {"max_retries": 1, "timeout": 600},
        "task": {"type": "run_function", "code": code, "entry_script": "entry.py",
                 "program_arguments": f"--slow {os.path.join(code, 'slow.txt')} --seconds {seconds} --first {first}",
                 "append_row_to": "${{outputs.out}}"},
        "raypar": {"worker": {"num_cpus": 0.25},
                   "speculation": {"enabled": enabled, "multiple": 4, "min_seconds": 0}},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--seconds", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="raypar-speculation-")
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    ratios = []
    try:
        names = [f"f{i:05d}.txt" for i in range(args.batches)]
        for r in range(args.rounds):
            slow = set(random.Random(args.seed + r).sample(names, max(1, args.batches // 20)))
            times = {}
            for enabled in (False, True):
                tag = f"r{r}-{'on' if enabled else 'off'}"
                spec = job(root, args.batches, args.seconds, slow, enabled, tag)
                wait_for_free_cpus(2)
                started = time.perf_counter()
                outcome = run_raypar(spec, os.path.join(root, tag, "job"), verbose=False)
                times[enabled] = time.perf_counter() - started
                rows = open(os.path.join(root, tag, "out", "parallel_run_step.txt")).read().split()
                assert outcome.state.value == "succeeded" and sorted(rows) == names, (outcome, len(rows))
            ratios.append(times[False] / times[True])
            last = max(names.index(n) for n in slow)
            print(f"round {r + 1}: slow inputs at {sorted(names.index(n) for n in slow)} (the last at "
                  f"{last + 1} of {args.batches}): off {times[False]:.2f}s, on {times[True]:.2f}s, "
                  f"off/on {ratios[-1]:.2f}x", flush=True)
        print(f"mean off/on: {sum(ratios) / len(ratios):.2f}x over {len(ratios)} rounds "
              f"({args.batches} batches of {args.seconds}s, 5% of first attempts 10x slower, 4 slots)")
        print_load()
    finally:
        tear_down(root, args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
