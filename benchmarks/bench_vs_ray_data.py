"""raypar vs. Ray Data on the same parquet scoring job: ~2 GB in, one row per input row out.

One process, one Ray instance (2 CPUs, loopback only). The input is a cached
folder of parquet files (``--size-gb``, default 2; ``--files`` files; row
groups of ``--row-group-mb``, default 128, the block size of Spark and
parquet-mr). Each
row is ``id, x, y, cat, text``: two random float64 features, a category and
40 to 120 random letters, so the data does not compress away. Both sides run
the same vectorised scoring (numpy, ``score = sigmoid(0.8 x - 1.7 y + 0.3)``)
and write one row per input row, ``id, score``, as parquet (or ``--output csv``):

* Ray Data: ``read_parquet(folder) -> map_batches(score) -> write_parquet(dir)``,
  in the configuration (batch_format, batch_size, concurrency,
  override_num_blocks) that was fastest in a tuning pass over the candidates
  of ``RAY_DATA_CONFIGS`` (``--ray-data NAME`` skips the tuning).
* in-process pyarrow: the machine's limit for this job, one process and a thread per CPU,
  no Ray: each row group read whole (every column, as run() gets them), scored from its
  Arrow columns and written, in order, to one file; nothing durable, no retries.
* raypar: ``raypar.run(spec, job_dir=...)``, ``mini_batch_size: 64mb``,
  ``instance_count: 1``, ``max_concurrency_per_instance: 2``, worker
  ``num_cpus: 1``, ``raypar.append_row_format: parquet``: planning, the job
  dir, workers that get a pandas DataFrame or an Arrow table (``--batch-format``; the
  entry script answers in the same frame), a part and a done record per
  batch, and the assembly of ONE output file, all timed.

Each round runs the three side by side; the ratios printed are raypar against Ray Data
(target ``TARGET_RATIO``) and raypar against the in-process baseline (target
``TARGET_OF_LIMIT``), parquet or CSV output alike.

Timed: from "start this side" to "its output is written". Not timed: Ray
start-up, data generation, verification. The sides take turns, and their order
turns by one each round (Ray Data, raypar, in-process; then raypar, in-process,
Ray Data; ...): a side runs faster after some sides than after others (raypar
after the in-process run, by about 0.5 s at 8 GB, than after Ray Data), so
with 3 rounds each side has each place once. The best round of each is reported as rows/s,
and their ratio, also against Ray Data's fastest run of any configuration.
Each run's CPU time (all processes of this Ray) is printed too: other users'
load on the machine changes it far less than the wall time. ``--profile``
adds one instrumented raypar run that shows where its time goes (a timeline
of the driver and the workers, and per worker: parquet decode, to_pandas,
run(), part encoding, part write; cProfile of the driver).

``--drivers separate`` runs raypar and Ray Data each as a new program that joins
this Ray (``ray.init(address=...)``), as a user runs a job. By default every round
runs in this one process, so Ray Data's tasks find the pooled worker processes
of its earlier rounds still warm (a Ray worker process takes about 0.6 s to
start here), while raypar's actors start processes of their own every job. Its
seconds are counted from after the new driver connected; its CPU-s include the
new program's start.

Exit status: 0 when every output holds exactly the input's rows (ids and
scores checked); 1 otherwise. The ratio is reported, never enforced.

    /work/venv/bin/python benchmarks/bench_vs_ray_data.py [--size-gb 2] [--rounds 3] [--profile]
    /work/venv/bin/python benchmarks/bench_vs_ray_data.py --size-gb 0.2 --rounds 1   # a quick check
"""

from __future__ import annotations

import argparse
import cProfile
import glob
import inspect
import io
import json
import logging
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

# Read by every Ray process this start spawns: bind to 127.0.0.1 only.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import ray  # noqa: E402
from common import print_load, run_raypar, tear_down, wait_for_free_cpus, worker_time  # noqa: E402

import raypar  # noqa: E402

TARGET_RATIO = 2.0  # raypar's rows/s over Ray Data's best configuration's (issue 16)
TARGET_OF_LIMIT = 0.85  # raypar's rows/s over the in-process, all-cores pyarrow baseline's
MIB = 1024 * 1024


def score(x, y):
    """The scoring both sides run: vectorised numpy over the two numeric columns."""
    z = 0.8 * x - 1.7 * y + 0.3
    return 1.0 / (1.0 + np.exp(-z))


# raypar's entry script; it holds score()'s own source, so both sides run the very same code.
ENTRY_SCRIPT = textwrap.dedent('''\
    """Benchmark entry script: one row (id, score) per input row."""
    import time

    LOADED_AT = time.time()  # for --profile's timeline: when raypar's worker began to load this script

    import numpy as np
    {frame_import}

    IMPORTED_AT = time.time()


''') + inspect.getsource(score) + textwrap.dedent('''\


    def init():
        import argparse

        parser = argparse.ArgumentParser()
        parser.add_argument("--profile")
        args, _ = parser.parse_known_args()
        if args.profile:  # time raypar's own steps inside this worker (see PROFILE_MODULE)
            import bench_profile

            bench_profile.install(args.profile)


    def run(mini_batch):
        return {frame_ctor}({{"id": {id_column},
                             "score": score(mini_batch["x"].to_numpy(), mini_batch["y"].to_numpy())}})


    def shutdown():
        import sys

        if "bench_profile" in sys.modules:
            sys.modules["bench_profile"].dump()
''')

# Loaded by the entry script only with --profile: times raypar's worker steps from inside the worker.
PROFILE_MODULE = textwrap.dedent('''\
    """Wraps raypar's worker-side steps with timers (benchmark profiling only)."""
    import json
    import os
    import time

    TIMES, COUNTS, SPANS = {}, {}, []
    STATE = {}


    def _add(name, seconds, count=1):
        TIMES[name] = TIMES.get(name, 0.0) + seconds
        COUNTS[name] = COUNTS.get(name, 0) + count


    def _timed(owner, attr, name, rows=None, at_start=None, at_end=None):
        inner = getattr(owner, attr)

        def wrapper(*args, **kwargs):
            if at_start:
                at_start()
            t = time.perf_counter()
            result = inner(*args, **kwargs)
            _add(name, time.perf_counter() - t, rows(result) if rows else 1)
            if at_end:
                at_end()
            return result

        setattr(owner, attr, wrapper)


    def _count_batches(owner, attr, name):
        """Rows a generator of record batches yields (its time is spent in the caller's loop)."""
        inner = getattr(owner, attr)

        def wrapper(*args, **kwargs):
            for batch in inner(*args, **kwargs):
                _add(name, 0.0, batch.num_rows)
                yield batch

        setattr(owner, attr, wrapper)


    def _batch_starts():
        STATE["batch_start"] = time.time()


    def _batch_ends():
        start = STATE.pop("batch_start", None)
        if start is not None:  # a store that ends no batch read (a log or a flush of the tail) is no batch
            SPANS.append((start, time.time()))


    def install(out):
        import sys

        import pyarrow.parquet as pq

        from raypar.inputs import base, tabular
        from raypar.jobdir import writers
        from raypar.outputs import formats as output_formats
        from raypar.worker import actor as worker

        try:
            import psutil

            born = psutil.Process().create_time()
        except Exception:  # no psutil: no process start time
            born = None
        entry = sys.modules["entry"]
        STATE.update(out=out, init=time.time(), cpu=time.process_time(), born=born,
                     loaded=entry.LOADED_AT, imported=entry.IMPORTED_AT)
        _timed(base.BatchReader, "read", "batch: read + to_pandas (all)", at_start=_batch_starts)
        _timed(tabular, "read_piece", "  read_piece (rows kept)", rows=lambda t: t.num_rows)
        _timed(pq.ParquetFile, "read_row_groups", "    ParquetFile.read_row_groups (rows decoded)",
               rows=lambda t: t.num_rows)
        _count_batches(pq.ParquetFile, "iter_batches", "    ParquetFile.iter_batches (rows decoded; its time is in "
                                                       "read_piece)")
        _timed(output_formats, "to_table", "  result -> Arrow (from_pandas)")
        _timed(output_formats, "encode_part", "  Arrow -> IPC part bytes")
        _timed(output_formats, "encode_text_part", "  Arrow -> csv/jsonl text part bytes")
        _timed(worker, "count_and_serialize", "batch: serialize result (all)")
        _timed(writers.SegmentWriter, "write", "batch: checksum + append part and record", at_end=_batch_ends)
        inner = entry.run

        def run(mini_batch):
            t = time.perf_counter()
            result = inner(mini_batch)
            _add("batch: run() (user code)", time.perf_counter() - t)
            return result

        entry.run = run


    def dump():
        with open(os.path.join(STATE["out"], f"worker-{os.getpid()}.json"), "w") as f:
            json.dump({"times": TIMES, "counts": COUNTS, "spans": SPANS, "init": STATE["init"],
                       "born": STATE["born"], "loaded": STATE["loaded"], "imported": STATE["imported"],
                       "cpu": time.process_time() - STATE["cpu"]}, f)
''')

# Ray Data configurations tried by the tuning pass. Each maps onto
# read_parquet(override_num_blocks=...) and map_batches(batch_format=..., batch_size=..., concurrency=...).
RAY_DATA_CONFIGS = {
    "pandas-blocks": {"batch_format": "pandas", "batch_size": None},  # the same UDF as raypar's run()
    "pyarrow-blocks": {"batch_format": "pyarrow", "batch_size": None},
    "pyarrow-tasks2": {"batch_format": "pyarrow", "batch_size": None, "concurrency": 2},
    "pyarrow-64k": {"batch_format": "pyarrow", "batch_size": 65536},
    "pyarrow-32blocks": {"batch_format": "pyarrow", "batch_size": None, "override_num_blocks": 32},
    "numpy-blocks": {"batch_format": "numpy", "batch_size": None},
}


# -- data ------------------------------------------------------------------------------------------------------------


def _chunk(rng: np.random.Generator, start: int, n: int) -> pa.Table:
    lengths = rng.integers(40, 121, size=n, dtype=np.int32)
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    letters = rng.integers(ord("a"), ord("z") + 1, size=int(offsets[-1]), dtype=np.uint8)
    text = pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(letters))
    categories = pa.array([f"category-{i:02d}" for i in range(32)])
    cat = pa.DictionaryArray.from_arrays(pa.array(rng.integers(0, 32, size=n, dtype=np.int32)), categories)
    return pa.table({
        "id": np.arange(start, start + n, dtype=np.int64),
        "x": rng.standard_normal(n),
        "y": rng.random(n),
        "cat": cat.cast(pa.string()),
        "text": text,
    })


def make_data(cache: str, size_gb: float, files: int, row_group_mb: int) -> tuple[str, dict]:
    """The input folder (generated once per parameter set, then reused) and its description."""
    folder = os.path.join(cache, f"parquet-{size_gb:g}gb-{files}f-rg{row_group_mb}mb")
    marker = folder + ".complete.json"  # beside the folder: raypar reads every file inside it
    if os.path.exists(marker):
        with open(marker) as f:
            return folder, {**json.load(f), "reused": True}
    shutil.rmtree(folder, ignore_errors=True)  # an interrupted generation: start again
    os.makedirs(folder)
    t = time.perf_counter()
    rng = np.random.default_rng(20261122)
    sample = io.BytesIO()
    pq.write_table(_chunk(rng, 0, 200_000), sample)
    group = pq.read_metadata(io.BytesIO(sample.getvalue())).row_group(0)
    bytes_per_row = sum(group.column(c).total_compressed_size for c in range(group.num_columns)) / group.num_rows
    rows_per_file = max(1, int(size_gb * 1024 * MIB / files / bytes_per_row))
    groups_per_file = max(1, round(rows_per_file * bytes_per_row / (row_group_mb * MIB)))
    rows_per_group = -(-rows_per_file // groups_per_file)  # equal groups, none of a few stray rows
    start = 0
    for i in range(files):
        with pq.ParquetWriter(os.path.join(folder, f"part-{i:05d}.parquet"), _chunk(rng, 0, 1).schema) as writer:
            done = 0
            while done < rows_per_file:
                n = min(rows_per_group, rows_per_file - done)
                writer.write_table(_chunk(rng, start, n), row_group_size=n)
                start += n
                done += n
    info = {"rows": start, "files": files, "bytes": sum(os.path.getsize(p) for p in _parquet_files(folder)),
            "row_groups": sum(pq.read_metadata(p).num_row_groups for p in _parquet_files(folder)),
            "seconds": round(time.perf_counter() - t, 1)}
    with open(marker, "w") as f:
        json.dump(info, f)
    return folder, {**info, "reused": False}


def _parquet_files(folder: str) -> list[str]:
    return sorted(glob.glob(os.path.join(folder, "*.parquet")))


# -- Ray Data --------------------------------------------------------------------------------------------------------


def _score_pandas(df):
    import pandas as pd

    return pd.DataFrame({"id": df["id"].to_numpy(), "score": score(df["x"].to_numpy(), df["y"].to_numpy())})


def _score_pyarrow(table):
    return pa.table({"id": table["id"], "score": score(table["x"].to_numpy(), table["y"].to_numpy())})


def _score_numpy(batch):
    return {"id": batch["id"], "score": score(batch["x"], batch["y"])}


SCORERS = {"pandas": _score_pandas, "pyarrow": _score_pyarrow, "numpy": _score_numpy}


def run_ray_data(inputs: str, output: str, fmt: str, config: dict):
    read_args = {}
    if config.get("override_num_blocks") is not None:
        read_args["override_num_blocks"] = config["override_num_blocks"]
    ds = ray.data.read_parquet(inputs, **read_args)
    map_args = {k: v for k, v in config.items() if k in ("batch_size", "num_cpus")}
    if config.get("concurrency"):  # Ray 2.51+ spells map_batches(concurrency=N) as a TaskPoolStrategy
        map_args["compute"] = ray.data.TaskPoolStrategy(size=config["concurrency"])
    ds = ds.map_batches(SCORERS[config["batch_format"]], batch_format=config["batch_format"], **map_args)
    if fmt == "parquet":
        ds.write_parquet(output)
    else:
        ds.write_csv(output)
    return ds


# -- the machine's limit: one process, every core, no Ray ------------------------------------------------------------


def run_in_process(inputs: str, output: str, fmt: str, threads: int) -> None:
    """Every row group read whole, scored and written in order to one file, by ``threads`` threads
    (pyarrow's reads and numpy's kernels release the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.csv as pcsv

    tasks = [(path, i) for path in _parquet_files(inputs) for i in range(pq.ParquetFile(path).num_row_groups)]

    def work(task):
        path, i = task
        return _score_pyarrow(pq.ParquetFile(path).read_row_group(i))

    writer = None
    with ThreadPoolExecutor(threads) as pool:
        for table in pool.map(work, tasks):  # in order, computed ahead by the pool
            if writer is None:
                writer = pq.ParquetWriter(output, table.schema) if fmt == "parquet" else \
                    pcsv.CSVWriter(output, table.schema)
            writer.write_table(table)
    if writer is not None:
        writer.close()


# -- raypar ----------------------------------------------------------------------------------------------------------


# run() answers in the frame it is given, as Ray Data's scorers do: a pandas script imports pandas, an Arrow
# one does not (importing pandas is 0.2 s of each worker's start here, and from_pandas a copy per batch).
ENTRY_FRAMES = {
    "pandas": {"frame_import": "import pandas as pd", "frame_ctor": "pd.DataFrame",
               "id_column": 'mini_batch["id"].to_numpy()'},
    "pyarrow": {"frame_import": "import pyarrow as pa", "frame_ctor": "pa.table", "id_column": 'mini_batch["id"]'},
}


def write_code(root: str, batch_format: str) -> str:
    code = os.path.join(root, "src")
    os.makedirs(code, exist_ok=True)
    with open(os.path.join(code, "entry.py"), "w") as f:
        f.write(ENTRY_SCRIPT.format(**ENTRY_FRAMES[batch_format]))
    with open(os.path.join(code, "bench_profile.py"), "w") as f:
        f.write(PROFILE_MODULE)
    return code


def raypar_spec(inputs: str, code: str, output: str, fmt: str, batch: str, profile: str = "",
                prefetch: int = 1, batch_format: str = "pandas", assemble: str = "running") -> dict:
    return {
        "type": "parallel",
        "name": "bench-vs-ray-data",
        "inputs": {"data": {"type": "uri_folder", "path": inputs}},
        "outputs": {"scores": {"type": "uri_file", "path": output}},
        "input_data": "${{inputs.data}}",
        "mini_batch_size": batch,
        "resources": {"instance_count": 1},
        "max_concurrency_per_instance": 2,
        "retry_settings": {"max_retries": 0, "timeout": 600},
        "logging_level": "WARNING",
        "task": {
            "type": "run_function",
            "code": code,
            "entry_script": "entry.py",
            "program_arguments": f"--profile {profile}" if profile else None,
            "append_row_to": "${{outputs.scores}}",
        },
        "raypar": {"worker": {"num_cpus": 1}, "append_row_format": fmt, "prefetch": prefetch,
                   "batch_format": batch_format, "assemble_while_running": assemble == "running"},
    }




# -- checks ----------------------------------------------------------------------------------------------------------


class Expected:
    """The input's ids and the scores every output must hold (computed once, in the driver)."""

    def __init__(self, inputs: str):
        table = pq.read_table(_parquet_files(inputs), columns=["id", "x", "y"])
        self.ids = table["id"].to_numpy()
        self.scores = score(table["x"].to_numpy(), table["y"].to_numpy())
        self.rows = len(self.ids)


def _read_output(path: str, fmt: str) -> pa.Table:
    if fmt == "parquet":
        files = [path] if os.path.isfile(path) else sorted(glob.glob(os.path.join(path, "*.parquet")))
        return pa.concat_tables([pq.read_table(p, columns=["id", "score"]) for p in files]) if files else pa.table({})
    import pyarrow.csv as pcsv

    files = [path] if os.path.isfile(path) else sorted(glob.glob(os.path.join(path, "*.csv")))
    return pa.concat_tables([pcsv.read_csv(p).select(["id", "score"]) for p in files]) if files else pa.table({})


def check_output(label: str, path: str, fmt: str, expected: Expected, ordered: bool) -> list[str]:
    """Problems with one output: its row count, its ids (each input id once), its scores."""
    if not os.path.exists(path):
        return [f"{label}: no output at {path}"]
    table = _read_output(path, fmt)
    if table.num_rows != expected.rows:
        return [f"{label}: {table.num_rows} rows, expected {expected.rows}"]
    ids, scores = table["id"].to_numpy(), table["score"].to_numpy()
    if not ordered:  # Ray Data's files come in no particular order: compare by id
        order = np.argsort(ids, kind="stable")
        ids, scores = ids[order], scores[order]
    if not np.array_equal(ids, expected.ids):
        return [f"{label}: ids differ from the input's" + (" (order)" if ordered else "")]
    # CSV prints floats in shortest round-trip form: equal to the bit. Allow an ulp anyway.
    if not np.allclose(scores, expected.scores, rtol=1e-12, atol=0):
        bad = int(np.sum(~np.isclose(scores, expected.scores, rtol=1e-12, atol=0)))
        return [f"{label}: {bad} scores differ from the expected ones"]
    return []


# -- helpers ---------------------------------------------------------------------------------------------------------






class CpuMeter:
    """CPU time used by this process and every process below it while a side runs: the driver,
    and Ray's raylet, GCS and worker processes (ray.init(address="local") starts them as our
    children). Polled every 0.2 s, so a process that exits between two polls loses at most that
    much. Other users' load on the machine barely changes this figure, while it can double a
    wall time."""

    def __init__(self, every: float = 0.2):
        import threading

        self.every, self.seen, self.base = every, {}, {}
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True, name="bench-cpu-meter")

    def _sample(self) -> dict:
        import psutil

        me = psutil.Process()
        found = {}
        for proc in [me, *me.children(recursive=True)]:
            try:
                with proc.oneshot():
                    t = proc.cpu_times()
                    found[(proc.pid, proc.create_time())] = t.user + t.system
            except psutil.Error:  # exited between the listing and the reading
                continue
        return found

    def _poll(self) -> None:
        while not self.stop_event.wait(self.every):
            self.seen.update(self._sample())

    def __enter__(self):
        try:
            self.base = self._sample()
        except ImportError:  # no psutil: no CPU figures
            self.base = None
            return self
        self.seen = dict(self.base)
        self.thread.start()
        return self

    def __exit__(self, *_) -> None:
        if self.base is None:
            return
        self.stop_event.set()
        self.thread.join()
        self.seen.update(self._sample())

    @property
    def seconds(self) -> float:
        if self.base is None:
            return float("nan")
        return sum(cpu - self.base.get(key, 0.0) for key, cpu in self.seen.items())


def rate_line(label: str, rows: int, seconds: float, mb: float, cpu: float = float("nan")) -> str:
    return (f"{label}: {rows:,} rows in {seconds:.2f}s = {rows / seconds / 1e6:.2f} M rows/s "
            f"({mb / seconds:.0f} MB/s of parquet), {cpu:.1f} CPU-s")


def _size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(p) for p in glob.glob(os.path.join(path, "**"), recursive=True) if os.path.isfile(p))


# -- profiling -------------------------------------------------------------------------------------------------------


class DriverTimers:
    """Times raypar's driver phases by wrapping its functions in this process (profile run only)."""

    def __init__(self):
        from raypar.engine import driver, ray_transport, scheduler
        from raypar.outputs import live

        self.spans: dict[str, list[tuple[float, float]]] = {}
        self.undo = []
        self._wrap(scheduler.Scheduler, "run", "Scheduler.run: start workers, run every batch, stop workers")
        self._wrap(ray_transport.Placement, "reserve", "placement group")
        self._wrap(driver, "assemble", "outputs.assemble: the output file")
        self._wrap(live.LiveAssembly, "finish", "LiveAssembly.finish: the output's tail")
        self._wrap(driver, "compact", "ledger compaction")
        self._wrap(driver, "write_session_reports", "reports")

    def _wrap(self, owner, attr, name):
        inner = getattr(owner, attr)

        def wrapper(*args, **kwargs):
            t = time.time()
            try:
                return inner(*args, **kwargs)
            finally:
                self.spans.setdefault(name, []).append((t, time.time()))

        setattr(owner, attr, wrapper)
        self.undo.append((owner, attr, inner))

    def restore(self):
        for owner, attr, inner in reversed(self.undo):
            setattr(owner, attr, inner)


def profile_raypar(inputs, code, root, fmt, batch, expected, verbose, **settings) -> bool:
    """One instrumented raypar run: a timeline of the driver, the workers' steps, cProfile of the driver.
    ``settings``: raypar_spec's prefetch, batch_format and assemble, as the measured rounds had them."""
    print("profile: one more raypar run, instrumented (not part of the figures above)")
    prof_dir = os.path.join(root, "profile")
    os.makedirs(prof_dir, exist_ok=True)
    output = os.path.join(root, "outputs", f"profile.{fmt}")
    spec = raypar_spec(inputs, code, output, fmt, batch, profile=prof_dir, **settings)
    timers = DriverTimers()
    profiler = cProfile.Profile()
    wait_for_free_cpus(2)
    try:
        with CpuMeter() as meter:
            t0 = time.time()
            profiler.enable()
            outcome = run_raypar(spec, os.path.join(root, "jobs", "profile"), verbose)
            profiler.disable()
            t1 = time.time()
    finally:
        timers.restore()
    problems = check_output("raypar (profile run)", output, fmt, expected, ordered=True)
    workers = []
    for path in glob.glob(os.path.join(prof_dir, "worker-*.json")):
        with open(path) as f:
            workers.append(json.load(f))
    wall = t1 - t0
    print(f"  {wall:.2f}s, {meter.seconds:.1f} CPU-s, {outcome.total} mini-batches, "
          f"{expected.rows / wall / 1e6:.2f} M rows/s (instrumented, cProfile on)")
    events = [(0.0, "raypar.run() called")]
    for name, spans in timers.spans.items():
        for start, end in spans:
            events += [(start - t0, f"{name} begins"), (end - t0, f"{name} ends ({end - start:.2f}s)")]
    if workers:
        spans = sorted(sp for w in workers for sp in w["spans"])
        inits = sorted(w["init"] for w in workers)
        busy = sum(end - start for start, end in spans)
        first, last = spans[0][0], max(end for _, end in spans)
        born = sorted(w["born"] for w in workers if w.get("born"))
        loaded = sorted(w["loaded"] for w in workers)
        imported = sorted(w["imported"] for w in workers)
        n = len(workers)

        def first_and_last(times, what):
            events.append((times[0] - t0, f"{what}: the first of {n} workers; the last at {times[-1] - t0:+.2f}s"))

        if born:
            first_and_last(born, "a worker process was started (by Ray, for this actor or earlier as an idle one)")
        first_and_last(loaded, "a worker begins to load the entry script (actor created, Worker.__init__ done)")
        first_and_last(imported, "a worker's entry script has imported numpy and its frame library")
        first_and_last(inits, "a worker's init()")
        busy_share = busy / (n * (last - first))
        events += [(first - t0, "first batch starts"),
                   (last - t0, f"last batch ends; since the first batch start the workers were busy {busy_share:.0%}")]
    events.append((wall, "raypar.run() returns"))
    print("  timeline (seconds after raypar.run() was called):")
    for at, what in sorted(events):
        print(f"    {at:7.2f}  {what}")
    if workers:
        names = sorted({n for w in workers for n in w["times"]},
                       key=lambda n: -sum(w["times"].get(n, 0) for w in workers))
        print(f"  worker steps, wall seconds summed over {len(workers)} workers "
              f"({sum(w['cpu'] for w in workers):.1f} CPU-s in the workers between init() and shutdown()):")
        for n in names:
            seconds = sum(w["times"].get(n, 0) for w in workers)
            count = sum(w["counts"].get(n, 0) for w in workers)
            extra = f", {count:,} rows" if "rows" in n else f", {count} calls"
            print(f"    {seconds:7.2f}s  {n}{extra}")
    stats = io.StringIO()
    pstats.Stats(profiler, stream=stats).sort_stats("tottime").print_stats(12)
    lines = [line for line in stats.getvalue().splitlines() if line.strip()]
    start = next((i for i, line in enumerate(lines) if "ncalls" in line), 0)
    print("  driver cProfile, top 12 by own time (ray.wait = the driver idle, waiting for workers):")
    for line in lines[start:start + 13]:
        print(f"    {line.replace(os.path.dirname(os.path.dirname(raypar.__file__)) + '/', '')}")
    for p in problems:
        print(f"  ERROR: {p}")
    return not problems


# -- main ------------------------------------------------------------------------------------------------------------


def quiet_ray_data() -> None:
    """No progress bars, start banners or notices from Ray Data in this process."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its notices (progress bars off, ...)


def run_as_child(job: dict) -> int:
    """One side's run in a driver of its own (``--drivers separate``): a new program joins the
    benchmark's Ray, as a user's job does, so no worker process of an earlier round serves it.
    Prints the run's seconds, counted from after the connection, as the last line."""
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    ray.init(address=job["address"], logging_level=logging.WARNING)
    if job["side"] == "ray-data":
        quiet_ray_data()
        t = time.perf_counter()
        run_ray_data(job["inputs"], job["output"], job["fmt"], job["config"])
        print(json.dumps({"seconds": time.perf_counter() - t}))
        return 0
    t = time.perf_counter()
    outcome = run_raypar(job["spec"], job["job_dir"], False)
    print(json.dumps({"seconds": time.perf_counter() - t, "exit_code": outcome.exit_code,
                      "state": outcome.state.value, "completed": outcome.completed, "total": outcome.total,
                      "reason": outcome.reason, "worker_time": outcome.worker_time}))
    return 0


def in_own_driver(job: dict) -> dict:
    """Run ``run_as_child`` in a new Python process; its last line, parsed."""
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(job)],
                          capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"the {job['side']} driver failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    if argv is None and sys.argv[1:2] == ["--child"]:
        return run_as_child(json.loads(sys.argv[2]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=2.0, help="input size on disk in GiB (default 2)")
    parser.add_argument("--files", type=int, default=8, help="parquet files (default 8)")
    parser.add_argument("--row-group-mb", type=int, default=128, help="parquet row group size in MiB (default 128)")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "raypar-bench-data"),
                        help="where the input is generated once and reused (default /tmp/raypar-bench-data)")
    parser.add_argument("--mini-batch-size", default="64mb", help="raypar mini_batch_size (default 64mb)")
    parser.add_argument("--output", choices=("parquet", "csv"), default="parquet", help="output format (default parquet)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per side; best is reported (default 3)")
    parser.add_argument("--ray-data", choices=sorted(RAY_DATA_CONFIGS),
                        help="use this Ray Data configuration and skip the tuning pass")
    parser.add_argument("--prefetch", type=int, default=1, help="raypar.prefetch (default 1)")
    parser.add_argument("--batch-format", choices=("pandas", "pyarrow"), default="pandas",
                        help="raypar.batch_format: what run() gets (default pandas, as Azure)")
    parser.add_argument("--assemble", choices=("running", "after"), default="running",
                        help="raypar.assemble_while_running: write the output while batches run (default) "
                             "or after the last")
    parser.add_argument("--drivers", choices=("shared", "separate"), default="shared",
                        help="shared: every round in this process, one Ray job, so Ray Data's pooled worker "
                             "processes stay warm between its rounds (default); separate: raypar and Ray Data "
                             "each run as a new program, as users run jobs")
    parser.add_argument("--profile", action="store_true", help="add one instrumented raypar run and print where its time goes")
    parser.add_argument("--verbose", action="store_true", help="show raypar's progress lines and Ray Data's stats")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (job dirs, outputs) for inspection")
    args = parser.parse_args(argv)
    if args.size_gb <= 0 or args.files < 1 or args.rounds < 1 or args.row_group_mb < 1:
        parser.error("--size-gb, --files, --rounds and --row-group-mb must be positive")

    t = time.perf_counter()
    inputs, info = make_data(args.cache, args.size_gb, args.files, args.row_group_mb)
    in_mb = info["bytes"] / 1e6
    print(f"input: {inputs}: {info['files']} parquet files, {info['bytes'] / MIB:,.0f} MiB, {info['rows']:,} rows, "
          f"{info['row_groups']} row groups of ~{info['bytes'] / info['row_groups'] / MIB:.0f} MiB "
          f"({'reused' if info['reused'] else f'generated in {time.perf_counter() - t:.0f}s'})", flush=True)
    t = time.perf_counter()
    expected = Expected(inputs)
    print(f"expected scores computed in {time.perf_counter() - t:.1f}s", flush=True)

    root = tempfile.mkdtemp(prefix="raypar-bench-rd-")
    ok = True
    fmt = args.output
    try:
        code = write_code(root, args.batch_format)
        t = time.perf_counter()
        # address="local": always a fresh instance of our own, loopback only; raypar.run finds it
        # initialised and uses it, and Ray Data runs on it: both sides get the same 2 CPUs.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING,
                 _node_ip_address="127.0.0.1")
        quiet_ray_data()
        address = ray.get_runtime_context().gcs_address  # where a separate driver joins
        print(f"ray {ray.__version__} started in {time.perf_counter() - t:.1f}s (2 CPUs, 127.0.0.1); "
              f"raypar {raypar.__version__}; pyarrow {pa.__version__}; python {sys.version.split()[0]}", flush=True)

        def ray_data_round(name: str, label: str) -> tuple[float, float]:
            nonlocal ok
            output = os.path.join(root, "outputs", f"ray-data-{label}")
            wait_for_free_cpus(2)
            ds = None
            with CpuMeter() as meter:
                t = time.perf_counter()
                if args.drivers == "separate":
                    seconds = in_own_driver({"side": "ray-data", "address": address, "inputs": inputs,
                                             "output": output, "fmt": fmt, "config": RAY_DATA_CONFIGS[name]})["seconds"]
                else:
                    ds = run_ray_data(inputs, output, fmt, RAY_DATA_CONFIGS[name])
                    seconds = time.perf_counter() - t
            cpu = meter.seconds
            problems = check_output(f"Ray Data ({name})", output, fmt, expected, ordered=False)
            files = len(glob.glob(os.path.join(output, "*")))
            print(f"  {label}: {rate_line(f'Ray Data [{name}]', expected.rows, seconds, in_mb, cpu)}; "
                  f"{files} files, {_size(output) / MIB:.0f} MiB", flush=True)
            if args.verbose and ds is not None:
                print(textwrap.indent(ds.stats(), "      "))
            for p in problems:
                print(f"  ERROR: {p}")
            ok = ok and not problems
            if not args.keep:
                shutil.rmtree(output, ignore_errors=True)
            return seconds, cpu

        def raypar_round(label: str) -> tuple[float, float]:
            nonlocal ok
            output = os.path.join(root, "outputs", f"raypar-{label}.{fmt}")
            job_dir = os.path.join(root, "jobs", label)
            spec = raypar_spec(inputs, code, output, fmt, args.mini_batch_size, prefetch=args.prefetch,
                               batch_format=args.batch_format, assemble=args.assemble)
            wait_for_free_cpus(2)
            with CpuMeter() as meter:
                t = time.perf_counter()
                if args.drivers == "separate":
                    outcome = in_own_driver({"side": "raypar", "address": address, "spec": spec, "job_dir": job_dir})
                    seconds = outcome["seconds"]
                else:
                    ran = run_raypar(spec, job_dir, args.verbose)
                    seconds = time.perf_counter() - t
                    outcome = {"exit_code": ran.exit_code, "state": ran.state.value, "completed": ran.completed,
                               "total": ran.total, "reason": ran.reason, "worker_time": ran.worker_time}
            cpu = meter.seconds
            print(f"  {label}: {rate_line('raypar', expected.rows, seconds, in_mb, cpu)}; {outcome['total']} "
                  f"mini-batches, 1 file, {_size(output) / MIB if os.path.exists(output) else 0:.0f} MiB; "
                  f"{worker_time(outcome.get('worker_time'))}", flush=True)
            problems = [] if outcome["exit_code"] == 0 else [
                f"raypar ended {outcome['state']}, {outcome['completed']}/{outcome['total']} done: {outcome['reason']}"]
            problems += check_output("raypar", output, fmt, expected, ordered=True)
            for p in problems:
                print(f"  ERROR: {p}")
            ok = ok and not problems
            if not args.keep:
                shutil.rmtree(job_dir, ignore_errors=True)
                if os.path.exists(output):
                    os.remove(output)
            return seconds, cpu

        def in_process_round(label: str) -> tuple[float, float]:
            nonlocal ok
            output = os.path.join(root, "outputs", f"in-process-{label}.{fmt}")
            threads = os.cpu_count() or 2
            wait_for_free_cpus(2)
            with CpuMeter() as meter:
                t = time.perf_counter()
                run_in_process(inputs, output, fmt, threads)
                seconds = time.perf_counter() - t
            print(f"  {label}: {rate_line(f'in-process pyarrow [{threads} threads]', expected.rows, seconds, in_mb, meter.seconds)}",
                  flush=True)
            problems = check_output("in-process pyarrow", output, fmt, expected, ordered=True)
            for p in problems:
                print(f"  ERROR: {p}")
            ok = ok and not problems
            if not args.keep and os.path.exists(output):
                os.remove(output)
            return seconds, meter.seconds

        name, tried = args.ray_data, {}
        if name is None:
            print("tuning Ray Data: each configuration once", flush=True)
            tried = {n: ray_data_round(n, f"tune {n}") for n in RAY_DATA_CONFIGS}
            name = min(tried, key=lambda n: tried[n][0])
        config = RAY_DATA_CONFIGS[name]
        print(f"Ray Data configuration: {name} = {config}", flush=True)
        if args.drivers == "separate":
            print("drivers: separate (raypar and Ray Data each run as a new program joining this Ray; "
                  "seconds from after it connected, CPU-s including its start)", flush=True)

        rd_times, rp_times, ip_times = [], [], []
        sides = [lambda label: rd_times.append(ray_data_round(name, label)),
                 lambda label: rp_times.append(raypar_round(label)),
                 lambda label: ip_times.append(in_process_round(label))]
        for rnd in range(1, args.rounds + 1):
            turn = (rnd - 1) % len(sides)  # each side in each place once every 3 rounds
            for side in sides[turn:] + sides[:turn]:
                side(f"round {rnd}")

        (rd, rd_cpu), (rp, rp_cpu) = min(rd_times), min(rp_times)  # the fastest round of each side
        ratio = rd / rp  # rows/s raypar / rows/s Ray Data
        print(f"best of {args.rounds} (CPU-s: that round's CPU time, all processes of this Ray):")
        print(rate_line(f"Ray Data [{name}]", expected.rows, rd, in_mb, rd_cpu))
        print(rate_line("raypar", expected.rows, rp, in_mb, rp_cpu))
        verdict = "meets" if ratio >= TARGET_RATIO else "BELOW"
        print(f"ratio raypar/Ray Data = {ratio:.2f} rows/s (target >= {TARGET_RATIO:.2f}: {verdict}); "
              f"CPU-s raypar/Ray Data = {rp_cpu / rd_cpu:.2f} (min {min(c for _, c in rp_times):.1f} vs "
              f"{min(c for _, c in rd_times):.1f} CPU-s over all rounds)")
        ip, ip_cpu = min(ip_times)
        print(rate_line("in-process pyarrow", expected.rows, ip, in_mb, ip_cpu))
        verdict = "meets" if ip / rp >= TARGET_OF_LIMIT else "BELOW"
        print(f"ratio raypar/in-process pyarrow = {ip / rp:.2f} rows/s (target >= {TARGET_OF_LIMIT:.2f}: {verdict})")
        fastest = min([*tried.items(), *((name, t) for t in rd_times)], key=lambda kv: kv[1][0])
        print(f"ratio raypar/Ray Data against Ray Data's fastest run of any configuration, tuning included: "
              f"{fastest[1][0] / rp:.2f} ({fastest[0]}, {fastest[1][0]:.2f}s)")
        if args.profile:
            ok = profile_raypar(inputs, code, root, fmt, args.mini_batch_size, expected, args.verbose,
                                prefetch=args.prefetch, batch_format=args.batch_format, assemble=args.assemble) and ok
        print(f"rows: {'OK' if ok else 'MISMATCH'} ({expected.rows:,} expected in every output, ids and scores checked)")
        print_load()
    finally:
        tear_down(root, args.keep)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
