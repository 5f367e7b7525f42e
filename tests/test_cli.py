"""The `raypar` command as a user runs it: exit codes, one-line errors, embedded Ray."""

import ipaddress
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import cli_in_process, imports_ray, make_spec, wait_for

from raypar.engine.status import job_status

CLI = [sys.executable, "-m", "raypar.cli"]
# The CLI as a terminal starts it, Ctrl-C raising KeyboardInterrupt: a process started with SIGINT
# ignored (this test run launched in the background, as `cmd &` does) passes that on to its
# children, and Python then leaves SIGINT ignored.
AS_FROM_A_TERMINAL = [sys.executable, "-c", "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                      "from raypar.cli import main; sys.exit(main(sys.argv[1:]))"]


def cli(*args, cwd=None, timeout=120, cluster=None):
    """``raypar ARGS`` in a fresh process; with ``cluster``, on that Ray (``--address``), not an embedded one."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    if cluster is not None:
        args = (*args, "--address", cluster.address)
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def write_spec(tmp_path, spec) -> Path:
    path = tmp_path / "job.yml"
    path.write_text(yaml.safe_dump(spec))
    return path


def assert_one_line_error(result, code, *fragments):
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize("mutate, fragments", [
    (lambda s: s.update(bogus=1), ["job.yml", "unknown key 'bogus'"]),
    (lambda s: s["task"].update(entry_script="missing.py"), ["task.entry_script", "missing.py not found"]),
    (lambda s: s["inputs"]["data"].update(path="/nonexistent/data"), ["/nonexistent/data not found"]),
    (lambda s: s.update(mini_batch_size="ten"), ["mini_batch_size", "'ten'"]),
    (lambda s: s.update(mini_batch_size="10kb"), ["mini_batch_size", "byte size"]),
    (lambda s: s["inputs"]["data"].update(type="uri_file"), ["inputs.data.path", "must be a single file"]),
    (lambda s: s["inputs"]["data"].update(type="mltable"), ["inputs.data", "MLTable: not found"]),
    (lambda s: s["task"].update(program_arguments='--x "open'), ["task.program_arguments"]),
    (lambda s: s["raypar"].update(ledger={"flush_bytes": "lots"}), ["raypar.ledger.flush_bytes", "'lots'"]),
    (lambda s: s["raypar"].update(speculation={"enabled": True, "multiple": 1}), ["raypar.speculation.multiple"]),
    (lambda s: s["raypar"].update(lease_ttl=1), ["raypar.lease_ttl"]),
])
def test_bad_spec_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, mutate, fragments):
    spec = make_spec(tmp_path, {"a.txt": "x"})
    mutate(spec)
    result = cli_in_process(capsys, "run", str(write_spec(tmp_path, spec)), "--job-dir", str(tmp_path / "job"))
    assert_one_line_error(result, 2, *fragments)
    assert not (tmp_path / "job").exists()


def test_usage_errors_exit_2(tmp_path):
    assert_one_line_error(cli("resume", str(tmp_path)), 2, "not a raypar job dir")
    assert_one_line_error(cli("status", str(tmp_path / "nope")), 2, "not a raypar job dir")
    assert_one_line_error(cli("run", str(tmp_path / "missing.yml")), 2, "spec file not found")
    assert cli("frobnicate").returncode == 2


def _listening_addresses(root_pid):
    """Every TCP listen address of ``root_pid`` and its descendants (Ray's processes)."""
    found = set()
    try:
        procs = [psutil.Process(root_pid), *psutil.Process(root_pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return found
    for proc in procs:
        try:
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found.add((proc.name(), conn.laddr.ip, conn.laddr.port))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1 is IPv4 loopback
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


@pytest.mark.timeout(240)
def test_embedded_ray_listens_on_loopback_only_and_status_json(tmp_path):
    gate = tmp_path / "gate"
    gate.mkdir()
    files = {f"f{i}.txt": f"v{i}" for i in range(6)}
    spec = make_spec(tmp_path, files, **{"max_concurrency_per_instance": 2, 
        "resources.instance_count": 1, "task.program_arguments": f"--gate {gate}",
        "raypar.worker": {"num_cpus": 0.5},
    })
    job = tmp_path / "job"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    proc = subprocess.Popen([*CLI, "run", str(write_spec(tmp_path, spec)), "--job-dir", str(job)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        # Workers block in init() until released: the whole Ray instance is up now.
        wait_for(lambda: len(list(gate.glob("started-*"))) == 2, "both workers in init()")
        running = json.loads(cli("status", str(job), "--json").stdout)
        assert running["state"] == "running" and running["total"] == 3 and running["pending"] == 3
        listeners = _listening_addresses(proc.pid)
        assert len(listeners) >= 3, listeners  # gcs, raylet, object manager... were seen
        exposed = {sock for sock in listeners if not _is_loopback(sock[1])}
        assert not exposed, f"Ray listens beyond loopback: {exposed}"
        second = cli("resume", str(job))
        assert_one_line_error(second, 2, "another raypar driver is running this job", f"pid {proc.pid}")
        (gate / "release").touch()
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "succeeded: 3/3" in out
    status = json.loads(cli("status", str(job), "--json").stdout)
    assert {k: status[k] for k in ("state", "total", "completed", "failed", "pending")} == \
        {"state": "succeeded", "total": 3, "completed": 3, "failed": 0, "pending": 0}
    assert (tmp_path / "out" / "parallel_run_step.txt").read_text().splitlines() == \
        [f"f{i}.txt V{i}" for i in range(6)]
    assert not imports_ray("status", job)  # it reads the job dir: no Ray to start in every poll


def _instances_and_nodes(rows):
    """{instance: {node IDs}} from rows written with --with-node ("name TEXT instance node")."""
    found = {}
    for row in rows:
        *_, instance, node = row.split(" ")
        found.setdefault(instance, set()).add(node)
    return found


PACKED = "raypar: instance_count 2 on a one-node Ray: running the 2 instances on this machine"


@pytest.mark.timeout(120)
def test_embedded_ray_refuses_at_once_what_its_one_node_cannot_hold(tmp_path):
    # A resource this machine lacks: the embedded Ray knows it cannot appear, whatever the timeout.
    # (One mini-batch: each instance reserves one of its 2 worker slots, a spare's on the second.)
    spec = make_spec(tmp_path, {"a.txt": "x"}, **{"max_concurrency_per_instance": 2,
        "resources.instance_count": 2, "raypar.placement_timeout": 600,
        "raypar.worker": {"num_cpus": 0.5, "resources": {"fpga": 1}}})
    result = cli("run", str(write_spec(tmp_path, spec)), "--job-dir", str(tmp_path / "job"))
    assert result.returncode == 1
    assert ("the job needs {CPU 1, fpga 2} on this machine for its 2 instances (instance_count=2 x 1 of "
            "max_concurrency_per_instance=2, {CPU 0.5, fpga 1} each)") in result.stderr
    assert "the embedded one-node Ray has {CPU " in result.stderr and ", fpga 0}" in result.stderr
    assert "waited" not in result.stderr and "Traceback" not in result.stderr
    status = json.loads(cli("status", "job", "--json", cwd=tmp_path).stdout)  # a relative job dir
    assert status["state"] == "failed" and "fpga 2" in status["reason"]
    assert status["job_dir"] == str(tmp_path / "job")  # echoed absolute: usable from anywhere


@pytest.mark.timeout(120)
def test_python_api_warnings_carry_the_raypar_prefix(ray_cluster, tmp_path):
    # A program of its own (its logging as a user's script leaves it), on the session cluster.
    spec = make_spec(tmp_path, {"a.txt": "x"}, **{
        "resources.instance_count": 1, "task.program_arguments": "--task_overhead_timeout 10"})
    script = ("import raypar, sys; sys.exit(raypar.run(sys.argv[1], job_dir=sys.argv[2], address=sys.argv[3])"
              ".wait().exit_code)")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run([sys.executable, "-c", script, str(write_spec(tmp_path, spec)), str(tmp_path / "job"),
                             ray_cluster.address], capture_output=True, text=True, env=env, timeout=110)
    assert result.returncode == 0, result.stderr
    warned = [line for line in result.stderr.splitlines() if "accepted but not used on Ray" in line]
    assert warned and all(line.startswith("raypar: WARNING task.program_arguments: ") for line in warned), \
        result.stderr


# The Azure CLI samples' pipeline step: 2 instances and a 10-minute first-task timeout. (A job.yml
# with instance_count 2 packs the same way: the driver packs whatever the spec came from.)
PACKED_PIPELINE = """\
type: pipeline
display_name: Packed pipeline
jobs:
  score:
    type: parallel
    inputs: {data: {type: uri_folder, path: ./data}}
    outputs: {out: {type: uri_folder, path: ./out}}
    input_data: ${{inputs.data}}
    mini_batch_size: "2"
    resources: {instance_count: 2}
    max_concurrency_per_instance: 2
    task:
      type: run_function
      code: ./code
      entry_script: score.py
      program_arguments: --with-node --barrier BARRIER 4 --first_task_creation_timeout 600
      append_row_to: ${{outputs.out}}
    raypar: {worker: {num_cpus: 0.5}}
"""


@pytest.mark.timeout(180)
def test_a_pipeline_step_with_instance_count_2_packs_on_the_embedded_ray(tmp_path):
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    # 8 mini-batches for 4 workers that take up to 2 each: every worker gets a first one to hold
    make_spec(tmp_path, {f"f{i:02d}.txt": f"v{i}" for i in range(16)})  # writes data/ and code/
    pipeline = tmp_path / "pipeline.yml"
    pipeline.write_text(PACKED_PIPELINE.replace("BARRIER", str(barrier)))

    result = cli("run", str(pipeline), "--job-dir", str(tmp_path / "pdir"), timeout=170)

    assert result.returncode == 0, result.stderr
    assert result.stdout.count(PACKED) == 1
    rows = (tmp_path / "out" / "parallel_run_step.txt").read_text().splitlines()
    assert [" ".join(r.split(" ")[:2]) for r in rows] == [f"f{i:02d}.txt V{i}" for i in range(16)]
    nodes = _instances_and_nodes(rows)
    assert sorted(nodes) == ["0", "1"] and len(set.union(*nodes.values())) == 1  # both on this machine
    assert len(list(barrier.iterdir())) == 4  # all 4 workers held a batch at once


@pytest.mark.timeout(180)
def test_failed_job_exit_1_then_cli_resume_exit_0(ray_cluster, tmp_path):
    flag = tmp_path / "fixed"
    files = {"a.txt": "bad", "b.txt": "good"}
    spec = make_spec(tmp_path, files, mini_batch_error_threshold=0, mini_batch_size="1", **{
        "resources.instance_count": 1, "max_concurrency_per_instance": 1,
        "retry_settings.max_retries": 0, "task.program_arguments": f"--fixed-flag {flag}",
    })
    job = str(tmp_path / "job")
    first = cli("run", str(write_spec(tmp_path, spec)), "--job-dir", job, cluster=ray_cluster)
    assert first.returncode == 1
    assert "mini_batch_error_threshold=0" in first.stderr
    text = cli("status", job).stdout
    assert "state:     failed" in text and "bad record" in text

    flag.touch()
    second = cli("resume", job, cluster=ray_cluster)
    assert second.returncode == 0, second.stderr
    assert (tmp_path / "out" / "parallel_run_step.txt").read_text() == "a.txt BAD\nb.txt GOOD\n"


def _kill_tree(proc_list):
    for p in proc_list:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(proc_list, timeout=30)


def start_held_run(tmp_path, count: int, hold_after: int, cluster=None, job=None, env=None, **overrides):
    """`raypar run` (embedded Ray, or ``cluster``) over ``count`` one-file batches, one worker; the batch
    after ``hold_after`` done ones blocks until gate/release. ``job``: the job dir (tmp_path/job), ``env``:
    more variables for the driver, ``overrides``: of the spec. Returns files, exec log, gate, job, process."""
    log, gate = tmp_path / "exec", tmp_path / "gate"
    log.mkdir()
    gate.mkdir()
    files = {f"f{i:02d}.txt": f"v{i}" for i in range(count)}
    spec = make_spec(tmp_path, files, mini_batch_size="1", **{
        "resources.instance_count": 1, "max_concurrency_per_instance": 1,
        "task.program_arguments": f"--exec-log {log} --hold-after {hold_after} {gate}", **overrides,
    })
    job = job or tmp_path / "job"
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **(env or {})}
    address = ["--address", cluster.address] if cluster is not None else []
    proc = subprocess.Popen([*AS_FROM_A_TERMINAL, "run", str(write_spec(tmp_path, spec)), "--job-dir", str(job), *address],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return files, log, gate, job, proc


@pytest.mark.timeout(240)
def test_driver_killed_mid_job_resumes_without_rerunning_done_batches(ray_cluster, tmp_path):
    files, log, gate, job, proc = start_held_run(tmp_path, count=10, hold_after=5)
    spawned = []
    try:
        wait_for(lambda: (gate / "holding").exists(), "the 6th batch to be caught mid-run")
        # A heartbeat of the lease carries the worker time so far, the held batch as running.
        wait_for(lambda: (job_status(str(job)).get("worker_time") or {}).get("running"),
                 "a heartbeat counting the held batch")
        spawned = psutil.Process(proc.pid).children(recursive=True)
        proc.kill()  # SIGKILL: no cleanup of any kind in the driver
        proc.wait(timeout=30)
    finally:
        _kill_tree(spawned)  # stop the embedded Ray we started, as a dead host would
        proc.kill()
    before = json.loads(cli("status", str(job), "--json").stdout)
    assert before["state"] == "interrupted"
    assert (before["completed"], before["pending"]) == (5, 5)
    ran_before = {entry for entry in (p.read_text() for p in log.iterdir())}
    assert ran_before == {f"f{i:02d}.txt" for i in range(6)}

    for p in log.iterdir():
        p.unlink()
    (gate / "release").touch()
    resumed = cli("resume", str(job), "--address", ray_cluster.address)  # the host is gone: another cluster

    assert resumed.returncode == 0, resumed.stderr
    rerun = sorted(p.read_text() for p in log.iterdir())
    assert rerun == [f"f{i:02d}.txt" for i in range(5, 10)]  # the caught batch + the 4 never started
    assert (tmp_path / "out" / "parallel_run_step.txt").read_text().splitlines() == \
        [f"{name} {text.upper()}" for name, text in sorted(files.items())]
    # The job's worker time counts the killed session too, from its last heartbeat: its held batch
    # cut short. Two sessions of one worker each.
    total = json.loads(cli("status", str(job), "--json").stdout)["job_worker_time"]
    assert (total["sessions"], total["lost"], total["workers"]) == (2, 1, 2), total
    assert total["cut short"] > 0 and total["running"] == 0 and total["run()"] > 0, total
    result = (job / "reports" / "job_result.txt").read_text()
    assert "worker time (its 2 session(s) (1 lost with its driver)): " in result, result
    shown = cli("status", str(job)).stdout
    assert "workers:   worker time of its 2 session(s) (1 lost with its driver): " in shown, shown


@pytest.mark.timeout(240)
def test_cancel_stops_the_job_and_it_resumes_exactly(ray_cluster, tmp_path):
    """`raypar cancel` from another terminal; Ctrl-C (SIGINT) is the interrupted-driver test below."""
    files, log, gate, job, proc = start_held_run(tmp_path, count=8, hold_after=3, cluster=ray_cluster)
    try:
        wait_for(lambda: (gate / "holding").exists(), "the 4th batch to be running")
        result = cli("cancel", str(job))
        assert result.returncode == 0, result.stderr
        assert "job canceled" in result.stdout
        out, err = proc.communicate(timeout=60)  # the driver stops; no waiting for the held batch
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert f"raypar resume {job}" in err
    status = json.loads(cli("status", str(job), "--json").stdout)
    assert (status["state"], status["completed"]) == ("canceled", 3)

    for p in log.iterdir():
        p.unlink()
    (gate / "release").touch()
    resumed = cli("resume", str(job), cluster=ray_cluster)
    assert resumed.returncode == 0, resumed.stderr
    assert sorted(p.read_text() for p in log.iterdir()) == [f"f{i:02d}.txt" for i in range(3, 8)]
    assert (tmp_path / "out" / "parallel_run_step.txt").read_text().splitlines() == \
        [f"{name} {text.upper()}" for name, text in sorted(files.items())]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_an_interrupted_driver_has_its_workers_store_what_they_finished(ray_cluster, s3_server, tmp_path, sig):
    """An object-store job dir: a worker buffers its finished batches (here it would for an hour) and
    stores them as one segment. Interrupted (SIGTERM: `ray job stop`, a deleted pod; SIGINT: Ctrl-C), the
    driver has each worker store them, beside the batch it runs, before it kills it: none runs again."""
    job = f"s3://{s3_server.new_bucket()}/jobs/j1"
    files, log, gate, job, proc = start_held_run(
        tmp_path, count=6, hold_after=3, cluster=ray_cluster, job=job, env=s3_server.env,
        **{"raypar.ledger.flush_seconds": 3600})
    try:
        wait_for(lambda: (gate / "holding").exists(), "the 4th batch to be running")
        from raypar.jobdir.ledger import Ledger

        assert len(Ledger(job, s3_server.options).view().done) == 0  # 3 finished, buffered in the worker
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert f"raypar resume {job}" in err

    env = {**os.environ, **s3_server.env}
    status = json.loads(subprocess.run([sys.executable, "-m", "raypar", "status", job, "--json"], env=env,
                                       capture_output=True, text=True, timeout=120).stdout)
    assert (status["state"], status["completed"]) == ("canceled", 3)
    for p in log.iterdir():
        p.unlink()
    (gate / "release").touch()
    resumed = subprocess.run([sys.executable, "-m", "raypar", "resume", job, "--address", ray_cluster.address],
                             env={k: v for k, v in env.items() if k != "RAY_ADDRESS"}, capture_output=True,
                             text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr
    assert sorted(p.read_text() for p in log.iterdir()) == [f"f{i:02d}.txt" for i in range(3, 6)]


def test_cancel_of_a_job_without_a_driver_marks_it_canceled(tmp_path):
    spec = make_spec(tmp_path, {"a.txt": "x"}, **{"resources.instance_count": 1})
    from raypar.jobdir.ledger import Ledger
    from raypar.spec.loading import spec_from_dict

    job = str(tmp_path / "job")
    parsed = spec_from_dict(spec)
    Ledger(job).create(parsed.to_dict(), parsed.to_yaml())  # created, never run
    result = cli("cancel", job)
    assert result.returncode == 0 and "no driver was running" in result.stdout
    assert json.loads(cli("status", job, "--json").stdout)["state"] == "canceled"
    assert "nothing to cancel" in cli("cancel", job).stdout
