"""A job dir on Azure Blob (Azurite on 127.0.0.1) against the same job with a local job dir.

The workload is the one Azure's own file samples use: ``mini_batch_size: "1"``, each run()
reads its one small file and returns one row; 2 workers (one instance, two processes).
For each --sizes N (default 2,000 and 20,000 files) it runs the job twice on one Ray
started here, job dir on local disk then on Azurite, and prints side by side:

- the job's wall time, run through ``raypar.run`` on the Ray started here (the input is local
  in both: only the job dir differs), and ``raypar run SPEC --job-dir JOB`` as a fresh process
  that starts its own embedded Ray, the way issue 13 measured it (Ray's start and the
  interpreter's imports included, as a user waits for them; --no-cli leaves it out);
- objects (files) written under the job dir, and objects per mini-batch;
- ``raypar status --json`` and ``raypar resume`` of the finished job (nothing to do), each as
  a fresh CLI process, the way a user runs them.

--fail-every K makes run() raise for every K-th file, on each of its 3 tries (error_threshold -1: the job
succeeds without them): a job whose driver records many failed tries.

--row-kib K pads every row to about K KiB and --run-ms M makes each run() sleep M ms first (the
GIL released, as inference releases it): a job whose workers store megabytes per second, where a
segment's PUT takes long enough to matter.

Each figure is the best of --repeat runs (default 3), local and Azurite alternating, so a
burst of load on this 2-core machine does not decide a ratio.

Targets (issue 13, on `raypar run` as the issue measured it): object store <= 1.3x local at
both sizes; <= 1 object per 20 batches. The in-process ratio is printed beside it: on a Ray
already running it shows the fixed cost per session (the Azure SDK's import in each worker,
the driver's few dozen requests), which a small job on 2 cores feels most.

    python benchmarks/bench_jobdir_object_store.py [--sizes 2000 20000] [--repeat 3] [--no-cli]
        [--row-kib K] [--run-ms M] [--fail-every K] [--keep] [--verbose]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import uuid

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import azurite_and_ray, print_load, run_raypar  # noqa: E402

ENTRY = """
import os
import time

RUN_SECONDS, PAD, FAIL_EVERY = {run_seconds!r}, {pad!r}, {fail_every!r}


def run(mini_batch):
    if RUN_SECONDS:
        time.sleep(RUN_SECONDS)  # the GIL released, as model inference releases it
    if FAIL_EVERY and any(int(os.path.basename(p)[1:7]) % FAIL_EVERY == 0 for p in mini_batch):
        raise ValueError(f"bad input: {{mini_batch}}")
    return [f"{{os.path.basename(p)}} {{open(p).read().strip()}}{{PAD}}" for p in mini_batch]
"""


def spec_for(root: str, count: int, row_kib: int = 0, run_ms: float = 0, fail_every: int = 0) -> dict:
    data = os.path.join(root, f"data-{count}")
    if not os.path.isdir(data):
        for i in range(count):
            folder = os.path.join(data, f"d{i // 1000:03d}")
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, f"f{i:06d}.txt"), "w") as f:
                f.write(f"value {i}\n")
    code = os.path.join(root, f"code-{row_kib}-{run_ms}-{fail_every}")
    os.makedirs(code, exist_ok=True)
    with open(os.path.join(code, "entry.py"), "w") as f:
        f.write(ENTRY.format(run_seconds=run_ms / 1000, pad=" " + "x" * (row_kib * 1024) if row_kib else "",
                             fail_every=fail_every))
    return {
        "type": "parallel", "name": "bench-jobdir",
        "inputs": {"data": {"type": "uri_folder", "path": data}},
        "outputs": {"out": {"type": "uri_folder", "path": os.path.join(root, f"out-{uuid.uuid4().hex[:6]}")}},
        "input_data": "${{inputs.data}}", "mini_batch_size": "1",
        "resources": {"instance_count": 1}, "max_concurrency_per_instance": 2,
        "retry_settings": {"max_retries": 2 if fail_every else 0, "timeout": 600},
        "error_threshold": -1,
        "task": {"type": "run_function", "code": code, "entry_script": "entry.py",
                 "append_row_to": "${{outputs.out}}"},
        "raypar": {"worker": {"num_cpus": 1}},
    }


def objects_under(job: str, fs) -> int:
    if job.startswith("az://"):
        return len(fs.find(job[len("az://"):]))
    return sum(len(files) for _, _, files in os.walk(job))


def cli_seconds(*args) -> float:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "raypar.cli", *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"raypar {' '.join(args)} failed: {out.stderr}")
    return time.perf_counter() - started


def measure(root: str, count: int, job: str, fs, args) -> dict:
    spec = spec_for(root, count, args.row_kib, args.run_ms, args.fail_every)
    started = time.perf_counter()
    outcome = run_raypar(spec, job, args.verbose)
    seconds = time.perf_counter() - started
    failing = len(range(0, count, args.fail_every)) if args.fail_every else 0
    if outcome.state.value != "succeeded" or outcome.completed != count - failing or outcome.failed != failing:
        raise RuntimeError(f"{job}: {outcome.state.value} ({outcome.reason})")
    figures = {"run": seconds, "objects": objects_under(job, fs),
               "status": cli_seconds("status", job, "--json"), "resume": cli_seconds("resume", job)}
    if args.cli:  # the same job again, as a fresh `raypar run` process with its embedded Ray
        path = os.path.join(root, f"spec-{uuid.uuid4().hex[:6]}.yml")
        with open(path, "w") as f:
            yaml.safe_dump(spec_for(root, count, args.row_kib, args.run_ms, args.fail_every), f)
        figures["cli run"] = cli_seconds("run", path, "--job-dir", f"{job}-cli")
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-cli", dest="cli", action="store_false",
                        help="leave out `raypar run` as a fresh process (the issue's measure)")
    parser.add_argument("--row-kib", type=int, default=0, help="pad each row to about this many KiB")
    parser.add_argument("--run-ms", type=float, default=0, help="each run() sleeps this long first")
    parser.add_argument("--fail-every", type=int, default=0, metavar="K",
                        help="every K-th file's run() raises, three tries each (error_threshold -1)")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()

    with azurite_and_ray("raypar-bench-jobdir-", args.keep) as (root, fs):
        fs.mkdir("bench")
        print(f"{'batches':>8} {'job dir':>8} {'run s':>8} {'per batch':>10} {'objects':>8} {'obj/batch':>9} "
              f"{'status s':>9} {'resume s':>9}" + (f" {'cli run s':>10}" if args.cli else ""))
        for count in args.sizes:
            runs: dict[str, list] = {"local": [], "azurite": []}
            for attempt in range(args.repeat):
                for where, job in (("local", os.path.join(root, f"job-{count}-{attempt}")),
                                   ("azurite", f"az://bench/job-{count}-{attempt}")):
                    runs[where].append(measure(root, count, job, fs, args))
            figures = {where: {k: min(m[k] for m in ms) for k in ms[0]} for where, ms in runs.items()}
            for where, m in figures.items():
                print(f"{count:>8,} {where:>8} {m['run']:>8.1f} {1000 * m['run'] / count:>8.1f}ms "
                      f"{m['objects']:>8,} {m['objects'] / count:>9.3f} {m['status']:>9.2f} {m['resume']:>9.2f}"
                      + (f" {m['cli run']:>10.1f}" if args.cli else ""), flush=True)
            local, blob = figures["local"], figures["azurite"]
            ratio = blob["cli run"] / local["cli run"] if args.cli else None
            met = ratio is not None and ratio <= 1.3 and blob["objects"] / count <= 0.05
            print(f"{count:>8,} {'ratio':>8} {blob['run'] / local['run']:>8.2f}x{'':>10} {'':>8} "
                  f"{'':>9} {blob['status'] / local['status']:>8.2f}x {blob['resume'] / local['resume']:>8.2f}x"
                  + (f" {ratio:>9.2f}x" if args.cli else "")
                  + (f"  targets (`raypar run` <= 1.3x, <= 0.05 objects per batch): {'met' if met else 'NOT met'}"
                     if args.cli else "  (the targets are on `raypar run`: run without --no-cli)"))
        print_load()
        return 0


if __name__ == "__main__":
    sys.exit(main())
