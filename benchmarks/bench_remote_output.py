"""An append_row_to file on Azure Blob (Azurite on 127.0.0.1) against the same job writing it to local disk.

The workload is bench_vs_ray_data.py's: score every row of a parquet input (--size-gb, default 2;
cached under the same --cache), 64 MB mini-batches, 2 workers, parquet output, written while the
batches run. Each round runs the job three ways, in a turning order, on one Ray started here:

- ``local``: the output on this machine's disk (the baseline);
- ``streamed``: the output on Azurite, uploaded while the batches run, its blocks committed at the end
  (raypar.held_upload);
- ``staged``: the output on Azurite as raypar wrote it before: into a local temp file while the
  batches run, then one upload after the last batch (storage.open_held answering None, in this driver).

For each it prints the job's seconds and the tail, LiveAssembly.finish (from the last batch
stored to the output published), best of --rounds (default 3), with the ratio to ``local``.
Every output is read back once and checked row for row against the input.

    python benchmarks/bench_remote_output.py [--size-gb 2] [--rounds 3] [--keep]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import bench_vs_ray_data as workload
from common import azurite_and_ray, print_load, run_raypar, wait_for_free_cpus

from raypar import storage
from raypar.outputs import live

WAYS = ("local", "streamed", "staged")


class Tail:
    """Seconds of each LiveAssembly.finish in this driver (the output's tail after the last batch)."""

    def __init__(self):
        self.seconds: list[float] = []
        self.inner = live.LiveAssembly.finish
        tail = self

        def finish(assembly, view):
            t = time.perf_counter()
            try:
                return tail.inner(assembly, view)
            finally:
                tail.seconds.append(time.perf_counter() - t)

        live.LiveAssembly.finish = finish


def cannot_hold(fs, path):
    """open_held for ``staged``: as if the backend could not hold an upload back (raypar before)."""
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=2.0, help="parquet input size in GiB (default 2)")
    parser.add_argument("--files", type=int, default=8, help="parquet files (default 8)")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "raypar-bench-data"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)

    inputs, _ = workload.make_data(args.cache, args.size_gb, args.files, 128)
    expected = workload.Expected(inputs)
    print_load()
    tail = Tail()
    best: dict[str, tuple[float, float]] = {}
    ok = True
    with azurite_and_ray("raypar-bench-remote-output-", args.keep) as (root, fs):
        fs.mkdir("bench")
        code = workload.write_code(root, "pyarrow")
        for round_no in range(args.rounds):
            order = WAYS[round_no % 3:] + WAYS[:round_no % 3]
            for way in order:
                label = f"{way}-{round_no}"
                output = os.path.join(root, f"{label}.parquet") if way == "local" else f"az://bench/{label}.parquet"
                spec = workload.raypar_spec(inputs, code, output, "parquet", "64mb", prefetch=0, batch_format="pyarrow")
                held_open = storage.open_held
                if way == "staged":
                    storage.open_held = cannot_hold
                wait_for_free_cpus(2)
                try:
                    t = time.perf_counter()
                    ran = run_raypar(spec, os.path.join(root, "jobs", label), verbose=False)
                    seconds = time.perf_counter() - t
                finally:
                    storage.open_held = held_open
                finish = tail.seconds[-1] if tail.seconds else float("nan")
                print(f"  {label}: {seconds:.2f} s, tail {finish:.2f} s, {ran.state.value}", flush=True)
                problems = [] if ran.exit_code == 0 else [f"{label}: raypar ended {ran.state.value}: {ran.reason}"]
                if not problems and round_no == 0:
                    local_copy = output
                    if way != "local":
                        local_copy = os.path.join(root, "check.parquet")
                        fs.get(output.removeprefix("az://"), local_copy)
                    problems += workload.check_output(label, local_copy, "parquet", expected, ordered=True)
                    if way != "local":
                        os.remove(local_copy)
                for p in problems:
                    print(f"  ERROR: {p}")
                ok = ok and not problems
                if way == "local" and os.path.exists(output):
                    os.remove(output)
                elif way != "local":
                    fs.rm(output.removeprefix("az://"))
                was = best.get(way)
                best[way] = (min(seconds, was[0]), min(finish, was[1])) if was else (seconds, finish)
    print_load()
    base = best["local"][0]
    print(f"best of {args.rounds}, {args.size_gb:g} GiB parquet in, parquet out:")
    for way in WAYS:
        seconds, finish = best[way]
        print(f"  {way:9s} {seconds:6.2f} s  ({seconds / base:.2f}x local)  tail {finish:.2f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
