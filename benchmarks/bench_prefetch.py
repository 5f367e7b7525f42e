"""Reading ahead (`raypar.prefetch`): does a worker overlap reading a mini-batch with run()?

The workload: --batches parquet files of one row group each (numbers and text, zstd), one
file per mini-batch, one worker. Reading a batch (raypar's own reader: decode, then pandas)
takes T_read, timed here in-process on the first batches; run() then sleeps T_read, as model
inference on a GPU does (the GIL released, the CPU free). The same job runs with
`raypar.prefetch: 0` and `1` on one Ray started here, --rounds times each, alternating.

The batch phase is timed from the done records (first batch's start to last batch's end),
so Ray's start, the actor's init() and assembling the output do not count. Without a read
ahead each batch costs T_read + T_run; with one, max(T_read, T_run) after the first:

    ideal = T_read + batches x max(T_read, T_run)     efficiency = ideal / measured

    python benchmarks/bench_prefetch.py [--batches 24] [--rows 400000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import textwrap
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import batch_phase, file_per_batch_job, print_load, run_raypar, tear_down, wait_for_free_cpus  # noqa: E402,E501

from raypar.inputs import BatchReader, check_input, plan_batches  # noqa: E402
from raypar.spec.loading import spec_from_dict  # noqa: E402

ENTRY = textwrap.dedent("""
    import argparse, time

    def init():
        global seconds
        parser = argparse.ArgumentParser()
        parser.add_argument("--seconds", type=float)
        seconds = parser.parse_known_args()[0].seconds

    def run(mini_batch):
        time.sleep(seconds)  # inference on an accelerator: the GIL released, the CPU free
        return [str(len(mini_batch))]
""")


def write_data(folder: str, batches: int, rows: int) -> None:
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(batches):
        table = pa.table({
            "id": np.arange(i * rows, (i + 1) * rows),
            "x": rng.random(rows), "y": rng.random(rows), "z": rng.integers(0, 1 << 40, rows),
            "text": pa.array([f"item-{j:09d}-{j % 977}" for j in range(i * rows, (i + 1) * rows)]),
        })
        pq.write_table(table, os.path.join(folder, f"part-{i:04d}.parquet"), row_group_size=rows,
                       compression="zstd")


def job(root: str, data: str, seconds: float, prefetch: int, tag: str) -> dict:
    return file_per_batch_job(root, data, f"prefetch-{tag}", ENTRY, f"--seconds {seconds}", 1,
                              {"worker": {"num_cpus": 1}, "prefetch": prefetch})


def read_seconds(spec: dict) -> tuple[int, float]:
    """(planned batches, median seconds raypar's reader takes for one), read in this process."""
    parsed = spec_from_dict(spec)
    desc = check_input(parsed)
    batches = list(plan_batches(parsed, desc))
    reader = BatchReader(desc)
    times = []
    for batch in batches[:5]:
        started = time.perf_counter()
        frame = reader.read(batch)[0]
        times.append(time.perf_counter() - started)
        del frame
    return len(batches), statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=24)
    parser.add_argument("--rows", type=int, default=400_000, help="rows per mini-batch")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="raypar-prefetch-")
    data = os.path.join(root, "data")
    write_data(data, args.batches, args.rows)
    planned, t_read = read_seconds(job(root, data, 0, 0, "probe"))
    assert planned == args.batches, f"{planned} mini-batches planned, {args.batches} expected"
    t_run = t_read
    ideal = t_read + planned * max(t_read, t_run)
    print(f"workload: {planned} mini-batches of {args.rows} rows ({os.path.getsize(os.path.join(data, 'part-0000.parquet')) / 2**20:.1f} MiB "
          f"parquet each); reading one takes {t_read:.3f}s here, run() sleeps {t_run:.3f}s; 1 worker")
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    phases: dict[int, list[float]] = {0: [], 1: []}
    try:
        for r in range(args.rounds):
            for prefetch in (0, 1):
                tag = f"r{r}-p{prefetch}"
                spec = job(root, data, t_run, prefetch, tag)
                wait_for_free_cpus(2)
                outcome = run_raypar(spec, os.path.join(root, tag, "job"), verbose=False)
                rows = open(os.path.join(spec["outputs"]["out"]["path"], "parallel_run_step.txt")).read().split()
                assert outcome.state.value == "succeeded" and rows == [str(args.rows)] * planned, outcome
                phases[prefetch].append(batch_phase(os.path.join(root, tag, "job")))
                print(f"round {r + 1}: prefetch {prefetch}: batch phase {phases[prefetch][-1]:.2f}s "
                      f"({phases[prefetch][-1] / planned:.3f}s per batch)", flush=True)
        best = {p: min(v) for p, v in phases.items()}
        print(f"best of {args.rounds}: prefetch 0 {best[0]:.2f}s, prefetch 1 {best[1]:.2f}s, "
              f"speed-up {best[0] / best[1]:.2f}x")
        print(f"ideal (T_read + batches x max(T_read, T_run)) {ideal:.2f}s; efficiency with prefetch 1: "
              f"{ideal / best[1]:.2f} (target >= 0.85: {'meets' if ideal / best[1] >= 0.85 else 'misses'}); "
              f"without: {ideal / best[0]:.2f}")
        print_load()
    finally:
        tear_down(root, args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
