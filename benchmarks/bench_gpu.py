"""A real GPU entry script under raypar: per-worker GPUs, and GPU busy time against wall time.

On a machine with an NVIDIA GPU and PyTorch, it runs a job whose entry script builds a torch
model in init() (an MLP with seeded random weights: nothing is downloaded) and, in run(), moves
the mini-batch's rows to the GPU, runs the model in bfloat16 and returns one row per batch:
its rows, the GPU time of the forward pass (CUDA events), CUDA_VISIBLE_DEVICES, the GPU ids Ray
gave the worker, and its pid. The input: --batches parquet files of --rows rows x 64 float
features, one file per mini-batch. The model's depth is chosen so that its forward pass takes
about as long as raypar's reader takes to read a batch (both timed here first), the case where
overlapping them matters most.

Five runs on one Ray started here with every GPU of the machine:
  1. one worker (`raypar.worker.num_gpus: 1`), `raypar.prefetch: 0`
  2. the same with `raypar.prefetch: 1` (the default)
  3. two workers sharing each GPU (`num_gpus: 0.5`), prefetch 1
  4. and 5. runs 2 and 3 with `raypar.batch_format: pyarrow` (run() gets Arrow columns, no DataFrame)
For each: the batch phase (done records: first start to last end), the sum of the batches'
GPU time, and GPU busy = that sum / (batch phase x GPUs used). It checks that every worker saw
CUDA_VISIBLE_DEVICES set to exactly the GPU ids Ray gave it, and that every row is there.

Without torch or without a GPU it prints why and exits 0 (skipped). `--dry-run` runs the same
harness on the CPU with numpy in place of the GPU model (no GPU figures): to check the script
on a machine without one.

    python benchmarks/bench_gpu.py [--batches 24] [--rows 131072] [--dry-run]
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import batch_phase, file_per_batch_job, print_load, run_raypar, tear_down  # noqa: E402

FEATURES = 64

ENTRY = textwrap.dedent("""
    import argparse, os
    import numpy as np

    def init():
        global args, model, torch
        parser = argparse.ArgumentParser()
        parser.add_argument("--layers", type=int)
        parser.add_argument("--width", type=int)
        parser.add_argument("--dry-run", action="store_true")
        args, _ = parser.parse_known_args()
        if args.dry_run:
            rng = np.random.default_rng(0)
            model = [rng.standard_normal((64 if i == 0 else args.width, args.width), dtype=np.float32)
                     for i in range(args.layers)]
            return
        import torch
        torch.manual_seed(0)
        layers = [torch.nn.Linear(64, args.width), torch.nn.ReLU()]
        for _ in range(args.layers - 1):
            layers += [torch.nn.Linear(args.width, args.width), torch.nn.ReLU()]
        layers.append(torch.nn.Linear(args.width, 16))
        model = torch.nn.Sequential(*layers).cuda().to(torch.bfloat16).eval()

    def gpu_ids():
        import ray
        return ",".join(str(i) for i in ray.get_gpu_ids()) or "-"

    def run(mini_batch):
        names = [f"f{i}" for i in range(64)]
        if hasattr(mini_batch, "to_pandas"):  # raypar.batch_format: pyarrow: Arrow columns, no DataFrame
            x = np.column_stack([mini_batch.column(n).to_numpy() for n in names])
        else:
            x = mini_batch[names].to_numpy(np.float32)
        visible = os.environ.get("CUDA_VISIBLE_DEVICES") or "-"
        if args.dry_run:
            for w in model:
                x = np.maximum(x @ w, 0)
            return [f"{len(mini_batch)} 0.0 {visible} {gpu_ids()} {os.getpid()}"]
        with torch.inference_mode():
            inputs = torch.from_numpy(x).cuda().to(torch.bfloat16)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            labels = model(inputs).argmax(1)
            end.record()
            labels = labels.cpu()  # waits for the GPU
        return [f"{len(mini_batch)} {start.elapsed_time(end):.3f} {visible} {gpu_ids()} {os.getpid()}"]
""")


def gpu_available() -> str:
    """Why this machine cannot run the GPU benchmark, or '' when it can."""
    try:
        import torch  # noqa: PLC0415 - optional: only a GPU machine needs it
    except ImportError:
        return "PyTorch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to PyTorch"
    return ""


def write_data(folder: str, batches: int, rows: int) -> None:
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(batches):
        table = pa.table({f"f{j}": rng.standard_normal(rows, dtype=np.float32) for j in range(FEATURES)})
        pq.write_table(table, os.path.join(folder, f"part-{i:04d}.parquet"), row_group_size=rows)


def job(root: str, data: str, tag: str, *, workers: int, num_gpus: float, prefetch: int, layers: int,
        width: int, dry_run: bool, batch_format: str = "pandas") -> dict:
    arguments = f"--layers {layers} --width {width}" + (" --dry-run" if dry_run else "")
    return file_per_batch_job(root, data, f"gpu-{tag}", ENTRY, arguments, workers, {
        "worker": {"num_cpus": 1, "num_gpus": 0 if dry_run else num_gpus},
        "prefetch": prefetch, "placement_timeout": 60, "batch_format": batch_format})


def read_seconds(spec: dict) -> float:
    """Median seconds raypar's reader takes for one batch, read in this process."""
    from raypar.inputs import BatchReader, check_input, plan_batches  # noqa: PLC0415 - after the skip check
    from raypar.spec.loading import spec_from_dict  # noqa: PLC0415 - after the skip check

    parsed = spec_from_dict(spec)
    desc = check_input(parsed)
    reader = BatchReader(desc)
    times = []
    for batch in list(plan_batches(parsed, desc))[:4]:
        started = time.perf_counter()
        reader.read(batch)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def forward_seconds(rows: int, layers: int, width: int) -> float:
    """Seconds one forward pass of the entry script's model takes on this GPU (timed after a warm-up)."""
    import torch  # noqa: PLC0415 - optional: only a GPU machine needs it

    layer_list = [torch.nn.Linear(FEATURES, width), torch.nn.ReLU()]
    for _ in range(layers - 1):
        layer_list += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layer_list, torch.nn.Linear(width, 16)).cuda().to(torch.bfloat16).eval()
    x = torch.randn(rows, FEATURES, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        model(x)
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(3):
            model(x)
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / 3
    del model, x
    torch.cuda.empty_cache()
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=24)
    parser.add_argument("--rows", type=int, default=131072, help="rows per mini-batch")
    parser.add_argument("--width", type=int, default=4096, help="the model's hidden width")
    parser.add_argument("--dry-run", action="store_true", help="numpy on the CPU instead of the GPU")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    why = "" if args.dry_run else gpu_available()
    if why:
        print(f"bench_gpu: skipped: {why} (run it on a machine with an NVIDIA GPU, or with --dry-run)")
        return 0
    import ray  # noqa: PLC0415 - after the skip check: a machine without a GPU needs nothing more

    root = tempfile.mkdtemp(prefix="raypar-gpu-")
    data = os.path.join(root, "data")
    write_data(data, args.batches, args.rows)
    t_read = read_seconds(job(root, data, "probe", workers=1, num_gpus=1, prefetch=0, layers=1, width=8,
                              dry_run=True))
    if args.dry_run:
        layers, width, t_gpu, gpus = 2, 256, 0.0, 0
    else:
        import torch  # noqa: PLC0415 - optional: only a GPU machine needs it

        width, gpus = args.width, torch.cuda.device_count()
        per_layer = forward_seconds(args.rows, 4, width) / 4
        layers = max(1, min(64, round(t_read / per_layer)))
        t_gpu = forward_seconds(args.rows, layers, width)
        print(f"GPU: {torch.cuda.get_device_name(0)} x {gpus}; torch {torch.__version__}")
    print(f"workload: {args.batches} mini-batches of {args.rows} rows x {FEATURES} float32 "
          f"({args.rows * FEATURES * 4 / 2**20:.0f} MiB); reading one takes {t_read:.3f}s here; "
          f"model: {layers} hidden layers of {width}, bf16, forward {t_gpu:.3f}s")
    ray.init(num_cpus=min(os.cpu_count() or 2, 8), include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    runs = [("1 worker, prefetch 0", 1, 1.0, 0, "pandas"), ("1 worker, prefetch 1", 1, 1.0, 1, "pandas"),
            ("2 workers per GPU, prefetch 1", 2, 0.5, 1, "pandas"),
            ("1 worker, prefetch 1, batch_format pyarrow", 1, 1.0, 1, "pyarrow"),
            ("2 workers per GPU, prefetch 1, batch_format pyarrow", 2, 0.5, 1, "pyarrow")]
    problems = []
    try:
        for tag_index, (label, workers, num_gpus, prefetch, batch_format) in enumerate(runs):
            tag = f"run{tag_index}"
            spec = job(root, data, tag, workers=workers, num_gpus=num_gpus, prefetch=prefetch, layers=layers,
                       width=width, dry_run=args.dry_run, batch_format=batch_format)
            outcome = run_raypar(spec, os.path.join(root, tag, "job"), verbose=False)
            if outcome.state.value != "succeeded":
                problems.append(f"{label}: {outcome.state.value}: {outcome.reason}")
                continue
            rows = [line.split() for line in open(os.path.join(spec["outputs"]["out"]["path"], "parallel_run_step.txt"))]
            if [r[0] for r in rows] != [str(args.rows)] * args.batches:
                problems.append(f"{label}: {len(rows)} rows, not one per batch with its row count")
            workers_seen = {(r[4], r[2], r[3]) for r in rows}  # (pid, CUDA_VISIBLE_DEVICES, Ray's GPU ids)
            for pid, visible, ids in sorted(workers_seen):
                if not args.dry_run and (visible == "-" or visible != ids):
                    problems.append(f"{label}: worker {pid}: CUDA_VISIBLE_DEVICES={visible}, Ray's GPU ids {ids}")
            phase = batch_phase(os.path.join(root, tag, "job"))
            gpu_seconds = sum(float(r[1]) for r in rows) / 1000
            used = min(gpus, workers) if gpus else 0
            busy = f"GPU busy {gpu_seconds / (phase * max(used, 1)):.0%}" if used else "no GPU (dry run)"
            print(f"{label}: batch phase {phase:.2f}s, GPU time {gpu_seconds:.2f}s, {busy}; workers "
                  f"(pid CUDA_VISIBLE_DEVICES ray_gpu_ids): "
                  f"{', '.join(' '.join(w) for w in sorted(workers_seen))}", flush=True)
        print_load()
    finally:
        tear_down(root, args.keep)
    for problem in problems:
        print(f"PROBLEM: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
