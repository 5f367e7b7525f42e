"""Helpers shared by the benchmark scripts (run them as `python benchmarks/<script>.py`)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

import ray

import raypar
from raypar.engine.worker_time import TimeSplit


def run_raypar(spec: dict, job_dir: str, verbose: bool):
    echo = (lambda line: print(f"    {line}", flush=True)) if verbose else (lambda line: None)
    return raypar.run(spec, job_dir=job_dir, echo=echo).wait()


def worker_time(fields) -> str:
    """A job's ``Outcome.worker_time`` as the session's line says it: what its workers' time went to."""
    return f"worker time {TimeSplit.of(fields).describe()}" if fields else "no worker time (none started)"


def file_per_batch_job(root: str, data: str, name: str, entry: str, program_arguments: str, workers: int,
                       raypar_block: dict) -> dict:
    """A parallel job over the folder ``data``, one file per mini-batch (mini_batch_size: the
    largest file's bytes), running ``entry`` (written to ``root``/code) on ``workers`` workers."""
    code = os.path.join(root, "code")
    os.makedirs(code, exist_ok=True)
    with open(os.path.join(code, "entry.py"), "w") as f:
        f.write(entry)
    biggest = max(os.path.getsize(os.path.join(data, n)) for n in os.listdir(data))
    return {
        "type": "parallel", "name": name,
        "inputs": {"data": {"type": "uri_folder", "path": data}},
        "outputs": {"out": {"type": "uri_folder", "path": os.path.join(root, name, "out")}},
        "input_data": "${{inputs.data}}", "mini_batch_size": str(biggest),
        "resources": {"instance_count": 1}, "max_concurrency_per_instance": workers,
        "retry_settings": {"max_retries": 0, "timeout": 600},
        "task": {"type": "run_function", "code": code, "entry_script": "entry.py",
                 "program_arguments": program_arguments, "append_row_to": "${{outputs.out}}"},
        "raypar": {"input_format": "parquet", **raypar_block},
    }


def batch_phase(job_dir: str) -> float:
    """Seconds from the first mini-batch's start to the last one's end, from the done records
    (Ray's start, the workers' init() and the output's assembly left out)."""
    from raypar.jobdir.ledger import Ledger  # noqa: PLC0415 - only the scripts that time batch phases need it

    records = list(Ledger(job_dir).view().done.values())
    return max(r.started + r.seconds for r in records) - min(r.started for r in records)


def wait_for_free_cpus(want: float, timeout: float = 60.0) -> None:
    """Finished actors and tasks give their CPUs back asynchronously: start each phase on an idle cluster
    (Ray's CPUs free, then the machine's CPUs quiet)."""
    deadline = time.time() + timeout
    while ray.available_resources().get("CPU", 0) < want:
        if time.time() > deadline:
            raise RuntimeError(f"CPUs not released after {timeout:.0f}s: {ray.available_resources()}")
        time.sleep(0.05)
    wait_for_quiet_cpus()


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat (Linux)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def wait_for_quiet_cpus(max_busy: float = 0.15, window: float = 0.2, timeout: float = 15.0) -> None:
    """Wait until the machine's CPUs are at most ``max_busy`` busy over ``window`` seconds.

    A side's teardown goes on after its call returns (Ray ends its worker processes and starts idle
    ones to replace them, each importing Ray): without this wait that work lands in the next side's
    timed round. Gives up after ``timeout`` (someone else's load) and says so; no-op without /proc/stat."""
    if not os.path.exists("/proc/stat"):
        return
    deadline = time.time() + timeout
    busy, total = cpu_jiffies()
    while True:
        time.sleep(window)
        busy2, total2 = cpu_jiffies()
        if busy2 - busy <= max_busy * max(total2 - total, 1):
            return
        if time.time() > deadline:
            print(f"  (the CPUs stayed over {max_busy:.0%} busy for {timeout:.0f}s: timing anyway)", flush=True)
            return
        busy, total = busy2, total2


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def print_load() -> None:
    print(f"load average (1/5/15 min) at the end: {load_average()} on {os.cpu_count()} CPUs "
          f"(anything else running makes these numbers noisy)")


def tear_down(root: str, keep: bool) -> None:
    """Stop Ray and remove the benchmark's folder (unless --keep)."""
    if ray.is_initialized():
        ray.shutdown()
    if keep:
        print(f"kept {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="  # public dev key


def start_azurite(workdir: str) -> tuple[subprocess.Popen, str]:
    """Azurite's blob service on 127.0.0.1 (a free port, in memory); returns it and its connection
    string. Stop it with ``proc.terminate()``."""
    binary = os.path.join(REPO, "node_modules", ".bin", "azurite-blob")
    if not os.path.exists(binary):
        sys.exit(f"{binary} not found: install it with `npm install --no-save --prefix . azurite@3`")
    log = os.path.join(workdir, "azurite.log")
    with open(log, "wb") as out:
        proc = subprocess.Popen([binary, "--blobHost", "127.0.0.1", "--blobPort", "0", "--silent", "--loose",
                                 "--skipApiVersionCheck", "--inMemoryPersistence"],
                                cwd=workdir, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        match = re.search(rb"listens on https?://127\.0\.0\.1:(\d+)", open(log, "rb").read())
        if match:
            endpoint = f"http://127.0.0.1:{int(match.group(1))}/{AZURITE_ACCOUNT}"
            return proc, (f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};"
                          f"AccountKey={AZURITE_KEY};BlobEndpoint={endpoint};")
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    sys.exit(f"Azurite did not start: {open(log).read()}")


@contextmanager
def store_root(store: str, prefix: str, keep: bool = False):
    """Where a benchmark's job dirs go: a temp folder, or with ``store`` "azurite" a container on an
    Azurite started in it (its connection string in AZURE_STORAGE_CONNECTION_STRING). Yields (the
    folder, the root of the job dirs); stops Azurite and removes the folder (unless ``keep``)."""
    root = tempfile.mkdtemp(prefix=prefix)
    azurite = None
    try:
        base = root
        if store == "azurite":
            import fsspec  # noqa: PLC0415 - only the object-store benchmarks need it

            azurite, connection = start_azurite(root)
            os.environ["AZURE_STORAGE_CONNECTION_STRING"] = connection
            fsspec.filesystem("az", connection_string=connection).mkdir("bench")
            base = "az://bench"
        yield root, base
    finally:
        if azurite is not None:
            azurite.terminate()
            azurite.wait(timeout=30)
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


def start_moto(workdir: str) -> tuple[subprocess.Popen, dict]:
    """moto's S3 server on 127.0.0.1 (a free port; tests/s3_emulator.py: its conditional writes
    atomic, as S3's are), with a bucket "bench"; returns it and the fsspec options to reach it."""
    import socket  # noqa: PLC0415

    import fsspec  # noqa: PLC0415 - only the object-store benchmarks need it

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    options = {"key": "testing", "secret": "testing-secret", "endpoint_url": f"http://127.0.0.1:{port}",
               "client_kwargs": {"region_name": "eu-west-1"}}
    with open(os.path.join(workdir, "moto.log"), "wb") as out:
        proc = subprocess.Popen([sys.executable, os.path.join(REPO, "tests", "s3_emulator.py"), "-H", "127.0.0.1",
                                 "-p", str(port)], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    fs = fsspec.filesystem("s3", **options, skip_instance_cache=True, use_listings_cache=False)
    deadline = time.time() + 60
    while True:
        try:
            fs.mkdir("bench")
            return proc, options
        except Exception:  # noqa: BLE001 - not answering yet
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                sys.exit(f"moto did not start: {open(os.path.join(workdir, 'moto.log')).read()}")
            time.sleep(0.2)


@contextmanager
def object_store_root(store: str, prefix: str):
    """An emulator ("azurite" or "s3": moto) on 127.0.0.1 in a temp folder; yields (the URL of a
    container or bucket on it, the fsspec options to reach it); stops it and removes the folder."""
    root = tempfile.mkdtemp(prefix=prefix)
    try:
        if store == "azurite":
            import fsspec  # noqa: PLC0415 - only the object-store benchmarks need it

            proc, connection = start_azurite(root)
            options = {"connection_string": connection}
            fsspec.filesystem("az", **options).mkdir("bench")
            base = "az://bench"
        else:
            proc, options = start_moto(root)
            base = "s3://bench"
        try:
            yield base, options
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def flat_against_folders(store: str, prefix: str, counts: list[int], formats: tuple[str, str], cases: list,
                         build, compact, measure, repeat: int) -> None:
    """The listing benchmarks' side by side: for each count, a job dir built twice on the emulator
    (``build(url, options, count, flat)``: flat names, the layout replaced, and folders), each in a
    bucket of its own (moto scans the whole bucket to list a prefix); then for each (when, how) of
    ``cases``, ``compact(url, options, how)`` on both and the best of ``repeat``
    ``measure(url, options)`` -> (seconds, names listed, records found: ``count`` each) printed."""
    with object_store_root(store, prefix) as (base, options):
        import fsspec  # noqa: PLC0415 - only the object-store benchmarks need it

        protocol = base.split("://")[0]
        fs = fsspec.filesystem(protocol, **options, skip_instance_cache=True)
        urls = {}
        for count in counts:
            for layout in ("flat", "folders"):
                fs.mkdir(f"{layout}{count}")
                urls[layout, count] = f"{protocol}://{layout}{count}/job"
        print(f"{'segments':>9} {'when':<34} {formats[0]:>22} {formats[1]:>22} {'ratio':>6}")
        for count in counts:
            started = time.perf_counter()
            for flat in (True, False):
                build(urls["flat" if flat else "folders", count], options, count, flat)
            print(f"  (built {count:,} segments twice in {time.perf_counter() - started:.1f} s)", flush=True)
            for when, how in cases:
                got = {}
                for layout in ("flat", "folders"):
                    compact(urls[layout, count], options, how)
                    runs = [measure(urls[layout, count], options) for _ in range(repeat)]
                    assert all(found == count for _, _, found in runs), runs
                    got[layout] = min(runs)
                (fs_, fn, _), (gs, gn, _) = got["flat"], got["folders"]
                print(f"{count:>9,} {when:<34} {fs_:>8.2f} s {fn:>7,} names {gs:>8.2f} s {gn:>7,} names "
                      f"{fs_ / gs:>5.1f}x", flush=True)
    print_load()


@contextmanager
def azurite_and_ray(prefix: str, keep: bool):
    """A temp folder, Azurite in it (its connection string in AZURE_STORAGE_CONNECTION_STRING) and a
    2-CPU Ray on 127.0.0.1; yields (the folder, an fsspec filesystem on Azurite). Stops both and
    removes the folder (unless ``keep``) on the way out."""
    import fsspec  # noqa: PLC0415 - only the object-store benchmarks need it

    root = tempfile.mkdtemp(prefix=prefix)
    azurite, connection = start_azurite(root)
    try:
        os.environ["AZURE_STORAGE_CONNECTION_STRING"] = connection
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        fs = fsspec.filesystem("az", connection_string=connection, use_listings_cache=False)
        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
        yield root, fs
    finally:
        azurite.terminate()
        azurite.wait(timeout=30)
        tear_down(root, keep)
