"""Parquet input on Azure Blob (Azurite on 127.0.0.1) whose row groups are larger than the mini-batch.

Azure's default ``mini_batch_size`` for tables is 1 MB, and parquet files are usually written
with row groups of 64 to 128 MiB, so a table job cuts each row group into slices. A slice is
read by fetching and decoding its whole row group: from object storage, every slice that
decodes the row group also downloads it. This script writes --files parquet files (default 2)
of --row-groups row groups (default 2) of about --row-group-mb MiB each (default 32), once on
local disk and once on Azurite, and runs the same job on both: ``mini_batch_size``
--mini-batch-size (default 1mb), two workers (one instance, two processes), ``run()`` given the
slice as a pyarrow Table and returning its row count. It prints each side's wall time (best of
--repeat, default 2, alternating) and checks that every row was counted once.

Run it with the code to compare on PYTHONPATH (a worktree of an older commit) to see what a
change does; benchmarks/README.md has the figures.

    python benchmarks/bench_table_input_object_store.py [--files 2] [--row-groups 2] [--row-group-mb 32]
        [--mini-batch-size 1mb] [--repeat 2] [--keep]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import azurite_and_ray, print_load, run_raypar  # noqa: E402

ENTRY = """
def run(mini_batch):
    return [str(mini_batch.num_rows)]
"""


def write_input(folder: str, files: int, row_groups: int, row_group_mb: int) -> tuple[int, int]:
    """Parquet files of incompressible text rows; returns (rows, bytes of the largest row group)."""
    os.makedirs(folder, exist_ok=True)
    rows_per_group = row_group_mb * 2**20 // 128
    rng = np.random.default_rng(1)
    total, largest = 0, 0
    for f in range(files):
        n = rows_per_group * row_groups
        text = pa.array(rng.integers(0, 256, size=(n, 120), dtype=np.uint8).view("S120").ravel()).cast(pa.binary())
        table = pa.table({"id": np.arange(total, total + n), "payload": text})
        path = os.path.join(folder, f"part-{f:03d}.parquet")
        pq.write_table(table, path, row_group_size=rows_per_group, compression="none")
        meta = pq.read_metadata(path)
        largest = max(largest, max(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)))
        total += n
    return total, largest


def spec_for(root: str, data_url: str, side: str, size: str) -> dict:
    code = os.path.join(root, "code")
    os.makedirs(code, exist_ok=True)
    with open(os.path.join(code, "entry.py"), "w") as f:
        f.write(ENTRY)
    return {
        "type": "parallel", "name": f"table-input-{side}",
        "inputs": {"data": {"type": "uri_folder", "path": data_url}},
        "outputs": {"out": {"type": "uri_file", "path": os.path.join(root, side, f"{uuid.uuid4().hex}.txt")}},
        "input_data": "${{inputs.data}}", "mini_batch_size": size,
        "resources": {"instance_count": 1}, "max_concurrency_per_instance": 2,
        "retry_settings": {"max_retries": 0, "timeout": 600},
        "task": {"type": "run_function", "code": code, "entry_script": "entry.py",
                 "append_row_to": "${{outputs.out}}"},
        "raypar": {"input_format": "parquet", "batch_format": "pyarrow"},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=2)
    parser.add_argument("--row-groups", type=int, default=2)
    parser.add_argument("--row-group-mb", type=int, default=32)
    parser.add_argument("--mini-batch-size", default="1mb")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()

    with azurite_and_ray("raypar-table-input-", args.keep) as (root, fs):
        local = os.path.join(root, "data")
        rows, largest = write_input(local, args.files, args.row_groups, args.row_group_mb)
        container = f"bench{uuid.uuid4().hex[:12]}"
        fs.mkdir(container)
        for name in sorted(os.listdir(local)):
            fs.put_file(os.path.join(local, name), f"{container}/data/{name}")
        print(f"input: {args.files} files x {args.row_groups} row groups of {largest / 2**20:.0f} MiB "
              f"({rows:,} rows), local and on Azurite; mini_batch_size {args.mini_batch_size}", flush=True)
        import raypar  # noqa: PLC0415 - the raypar on PYTHONPATH

        print(f"raypar from {os.path.dirname(raypar.__file__)}; ray {ray.__version__}", flush=True)
        best = {}
        for round_ in range(1, args.repeat + 1):
            for side, url in (("local", local), ("azurite", f"az://{container}/data")):
                spec = spec_for(root, url, side, args.mini_batch_size)
                started = time.perf_counter()
                outcome = run_raypar(spec, os.path.join(root, side, f"job-{round_}"), False)
                seconds = time.perf_counter() - started
                if outcome.state.value != "succeeded":
                    print(f"{side}: {outcome.state.value}: {outcome.reason}")
                    return 1
                counted = sum(int(line) for line in open(spec["outputs"]["out"]["path"]))
                if counted != rows:
                    print(f"{side}: {counted:,} rows counted, {rows:,} expected")
                    return 1
                print(f"  round {round_}: input {side}: {outcome.total} mini-batches in {seconds:.2f}s", flush=True)
                best[side] = min(best.get(side, seconds), seconds)
        print(f"best of {args.repeat}: local {best['local']:.2f}s, Azurite {best['azurite']:.2f}s "
              f"({best['azurite'] / best['local']:.2f}x); rows: OK ({rows:,}, each once)")
        print_load()
        return 0


if __name__ == "__main__":
    sys.exit(main())
