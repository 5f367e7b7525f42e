"""Shared fixtures: a real 3-node Ray cluster on 127.0.0.1 and job builders."""

import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Each test process (each pytest-xdist worker) keeps its Ray sessions in a temp dir of its own:
# Ray's job supervisor points a submitted driver at the cluster that last started under that dir
# (RAY_ADDRESS=auto), so two clusters sharing /tmp/ray would take each other's jobs.
os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="rpt-", dir="/tmp")  # short: Ray's socket paths
# Every Ray process started by the tests binds to loopback; must be set before Ray starts.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
# Token auth on, as Ray 2.60 clusters run it, with a token of this session (not ~/.ray/auth_token).
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
# Ray's runtime-env agent tries an environment that fails 3 times, each a fresh virtualenv and pip
# run (about 10 s on a clean machine); the tests of a failing environment assert the same with one.
os.environ["RUNTIME_ENV_RETRY_TIMES"] = "1"
# Credentials a cluster's processes never inherit: a job must bring them to its workers.
STORAGE_VARIABLES = ("AZURE_STORAGE_", "AWS_", "STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS")

import pytest  # noqa: E402 - after the environment above, which Ray reads when it starts

pytest_plugins = ["azurite", "object_stores"]  # the Azure Blob, S3 and GCS emulator fixtures
ENTRY_DIR = Path(__file__).parent / "entry"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# The session cluster's Jobs API: a free port, not Ray's 8265, so the suite's parallel
# workers (pytest-xdist) each serve their own.
JOBS_PORT = free_port()
JOBS_API = f"http://127.0.0.1:{JOBS_PORT}"


def start_cluster(workers: int = 2, **head_args):
    """Head + ``workers`` worker nodes, 1 CPU each, as processes of this one; Ray metrics reported every second.

    Its processes never see the session's storage credentials: a submitted job must bring them.
    """
    from ray.cluster_utils import Cluster

    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith(STORAGE_VARIABLES)}
    try:
        cluster = Cluster(initialize_head=True, head_node_args={
            # The head's agent would take Ray's fixed default port: a second cluster's head (or an
            # embedded Ray) could then not start its agent, and the Jobs API answers "No available agent".
            "num_cpus": 1, "dashboard_agent_listen_port": free_port(),
            "_system_config": {"metrics_report_interval_ms": 1000}, **head_args})
        for _ in range(workers):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
    finally:
        os.environ.update(saved)
    return cluster


@pytest.fixture(scope="session")
def ray_cluster():
    """The 3-node cluster of the whole session: the test process drives jobs on it, CLI tests
    connect to it with --address, and its head serves the Jobs API at JOBS_API
    for the submit tests."""
    import ray

    # The workers' output is read from the job dirs' logs, never as Ray forwards it: its forwarding
    # printed into whichever test ran when the log monitor got to it (a "[repeated 11x across
    # cluster]" line of an earlier job once landed in a later test's one-line error), and the
    # monitor rescans every log file of the session, hundreds by the end (about 3% of the suite's CPU).
    cluster = start_cluster(include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=JOBS_PORT,
                            include_log_monitor=False)
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def write_files(folder: Path, files: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return folder


def make_spec(tmp_path: Path, files: dict, **overrides) -> dict:
    """A parallel job over ``files`` (name -> text) using tests/entry/score.py."""
    data = write_files(tmp_path / "data", files)
    code = tmp_path / "code"
    if not code.exists():
        shutil.copytree(ENTRY_DIR, code)
    spec = {
        "type": "parallel",
        "name": "test",
        "inputs": {"data": {"type": "uri_folder", "path": str(data)}},
        "outputs": {"out": {"type": "uri_folder", "path": str(tmp_path / "out")}},
        "input_data": "${{inputs.data}}",
        "mini_batch_size": "2",
        "resources": {"instance_count": 3},
        # One worker per instance: each worker is a Ray process start (about a second of CPU on
        # these 2 cores). Tests about several workers of an instance say 2 themselves.
        "max_concurrency_per_instance": 1,
        "retry_settings": {"max_retries": 1, "timeout": 60},
        "task": {
            "type": "run_function",
            "code": str(code),
            "entry_script": "score.py",
            "program_arguments": "",
            "append_row_to": "${{outputs.out}}",
        },
        "raypar": {"worker": {"num_cpus": 0.5}, "placement_timeout": 30},
    }
    for key, value in overrides.items():
        target = spec
        *path, last = key.split(".")
        for part in path:
            target = target.setdefault(part, {})
        target[last] = value
    return spec


def quiet(line: str) -> None:
    pass


def record_listings(store, folder: str = "parts") -> list[str]:
    """Has ``store`` record which folders of ``folder`` (parts/, failed/) it lists (by name there,
    "" for the folder itself); returns the list they are added to."""
    seen, entries, root = [], store.entries, store.path(folder)

    def recording(folder):
        if folder == root or folder.startswith(root + "/"):
            seen.append(folder[len(root):].lstrip("/"))
        return entries(folder)

    store.entries = recording
    return seen


def worker_logs(job: str) -> set:
    """(instance, slot, id) of each worker that started in the job, from its log file in the job dir."""
    names = [re.search(r"~i(\d+)s(\d+)-(\w+)\.log$", p.name) for p in (Path(job) / "logs").iterdir()]
    return {(int(m[1]), int(m[2]), m[3]) for m in names if m}


def wait_for(predicate, what: str, timeout: float = 120) -> None:
    """Poll ``predicate`` until true (synchronisation on an observable condition, not a sleep)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def cli_in_process(capsys, *args):
    """``raypar ARGS`` as the CLI gives it, run in this process: for errors found before Ray
    starts, where a fresh interpreter per case is most of the time. What ``main`` sets process-wide
    (logging, the SIGTERM handler) is put back; test_cli.py's usage-error test keeps the real process."""
    root = logging.getLogger()
    handlers, level, sigterm = root.handlers[:], root.level, signal.getsignal(signal.SIGTERM)
    from raypar.cli import main  # here: the environment above is set before raypar (and Ray) load

    try:
        code = main(list(args))
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        signal.signal(signal.SIGTERM, sigterm)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, out, err)


# The files that take longest (a minute or more of the suite's 13 test-minutes) go to the two
# processes first, so that neither is left running one alone at the end (`--no-loadscope-reorder`
# in pyproject.toml keeps this order).
SLOWEST_FILES = ("test_cli.py", "test_submit.py", "test_faults.py", "test_kube_retry.py")


def pytest_collection_modifyitems(items):
    first = {name: rank for rank, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: first.get(item.path.name, len(first)))  # stable: the rest keep their order


def imports_ray(*args) -> bool:
    """Whether ``raypar ARGS``, in a fresh process, imports Ray (`status` only reads the dir: it must not)."""
    code = "import sys; from raypar.cli import main; main(sys.argv[1:]); print('ray' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()[-1] == "True"


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter):
    """The versions the run used, at the end where CI's excerpt shows them: a clean machine may
    hold older releases that the pins allow."""
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    def of(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "absent"

    names = ("ray", "pyarrow", "pandas", "numpy", "fsspec", "adlfs", "s3fs", "gcsfs", "moto")
    terminalreporter.write_line("versions: " + ", ".join(f"{n} {of(n)}" for n in names))


def pytest_sessionfinish(session, exitstatus):
    """A passing run removes its Ray sessions (the software-environment test's virtualenv alone is
    0.9 GB); a failing one keeps them, logs and all, under RAY_TMPDIR."""
    if exitstatus == 0:
        shutil.rmtree(os.environ["RAY_TMPDIR"], ignore_errors=True)
