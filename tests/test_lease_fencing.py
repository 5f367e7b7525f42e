"""The fenced lease with real driver processes: a driver that cannot renew its lease stops
itself; a driver frozen past its TTL is taken over by a driver on another host, and when it
thaws it writes nothing as the holder. Every case ends with every row exactly once."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys

import pytest
import yaml
from conftest import make_spec, wait_for

from raypar.engine.session_lease import Heartbeat, StopSignal
from raypar.jobdir.ledger import Ledger, new_run_id

pytestmark = pytest.mark.timeout(240)

FILES = {f"f{i:02d}.txt": f"v{i}" for i in range(8)}
EXPECTED = [f"{n} {t.upper()}" for n, t in sorted(FILES.items())]


def env():
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def cli(*args, prefix=(), cluster=None):
    """The command line of ``raypar ARGS``; with ``cluster``, on that Ray (``--address``), not an embedded one."""
    address = ["--address", cluster.address] if cluster is not None else []
    return [*prefix, sys.executable, "-m", "raypar.cli", *args, *address]


def held_job(tmp_path):
    """A 4-batch job (lease TTL 3 s) whose run() of f04.txt and later holds until gate/release."""
    gate = tmp_path / "gate"
    gate.mkdir()
    spec = make_spec(tmp_path, FILES, mini_batch_size="2", **{
        "resources.instance_count": 1, "max_concurrency_per_instance": 1, "raypar.lease_ttl": 3,
        "task.program_arguments": f"--hold-from f04.txt {gate}",
    })
    path = tmp_path / "job.yml"
    path.write_text(yaml.safe_dump(spec))
    return path, gate, str(tmp_path / "job")


def holding(gate):
    return any(p.name.startswith("holding-") for p in gate.iterdir())


def output(tmp_path):
    return (tmp_path / "out" / "parallel_run_step.txt").read_text().splitlines()


def state(job):
    return json.loads((open(os.path.join(job, "state.json")).read()))


def indexes(job):
    """The compaction indexes of the job dir (done and failed records)."""
    return sorted(name for folder in ("compact", "failed-compact") if os.path.isdir(os.path.join(job, folder))
                  for name in os.listdir(os.path.join(job, folder)) if name.endswith(".idx"))


def test_a_driver_that_cannot_renew_its_lease_stops_and_the_job_resumes(ray_cluster, tmp_path):
    spec, gate, job = held_job(tmp_path)
    driver = subprocess.Popen(cli("run", str(spec), "--job-dir", job, cluster=ray_cluster), env=env(), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: holding(gate), "a batch to be held")
        lease = os.path.join(job, "lease")
        os.rename(lease, lease + ".aside")
        open(lease, "w").close()  # every lease write now fails (a file where the folder was)

        _, err = driver.communicate(timeout=120)
    finally:
        driver.kill()
    assert driver.returncode == 1, err
    failed = [line for line in err.splitlines() if line.startswith("raypar: job failed:")]
    assert len(failed) == 1 and "the lease could not be renewed" in failed[0], err
    assert "NotADirectoryError" in failed[0] and "stopped so that no two drivers run the job" in failed[0]
    assert state(job)["state"] == "running"  # a driver without the lease writes no state

    os.unlink(lease)
    os.rename(lease + ".aside", lease)
    (gate / "release").touch()
    resumed = subprocess.run(cli("resume", job, cluster=ray_cluster), env=env(), capture_output=True, text=True,
                             timeout=180)
    assert resumed.returncode == 0, resumed.stderr
    assert output(tmp_path) == EXPECTED


def test_a_frozen_driver_is_taken_over_from_another_host_and_fenced_when_it_thaws(ray_cluster, tmp_path):
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "--uts", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs unshare --uts (a second host name) on this machine")
    spec, gate, job = held_job(tmp_path)
    frozen = subprocess.Popen(cli("run", str(spec), "--job-dir", job, cluster=ray_cluster), env=env(), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: holding(gate), "a batch to be held")
        os.kill(frozen.pid, signal.SIGSTOP)  # its workers go on; the driver stops beating
        (gate / "release").touch()  # the frozen driver's worker finishes its batch and stores it
        other_host = ["unshare", "--uts", "sh", "-c", 'hostname other-host && exec "$@"', "sh"]
        live = subprocess.run(cli("resume", job, prefix=other_host, cluster=ray_cluster), env=env(), capture_output=True,
                              text=True, timeout=180)
        assert live.returncode == 0, live.stderr
        assert "is leased by pid" in live.stdout + live.stderr  # it waited out the silent lease
        taken, compacted = state(job), indexes(job)
        assert taken["state"] == "succeeded" and compacted
        assert output(tmp_path) == EXPECTED

        os.kill(frozen.pid, signal.SIGCONT)
        _, err = frozen.communicate(timeout=120)
    finally:
        frozen.kill()
    assert frozen.returncode == 1
    failed = [line for line in err.splitlines() if line.startswith("raypar: job failed:")]
    assert len(failed) == 1 and "lease" in failed[0], err
    assert state(job) == taken  # the thawed driver wrote no state over the live one's
    assert indexes(job) == compacted  # nor a compaction (it would close the live one's segment folders)
    assert output(tmp_path) == EXPECTED
    status = json.loads(subprocess.run(cli("status", job, "--json"), env=env(), capture_output=True,
                                       text=True, timeout=60).stdout)
    assert (status["state"], status["completed"], status["total"]) == ("succeeded", 4, 4)


def test_a_cancel_request_is_seen_past_a_failing_look_and_counts_once_the_loop_reads_it(tmp_path, caplog):
    # The driver looks for `raypar cancel`'s marker on a thread of its own (each look is a request
    # on object stores). A look that fails is retried; a marker seen only counts as a cancel once
    # the scheduler loop asks, so a request after its last step never turns a finished job canceled.
    ledger, run = Ledger(str(tmp_path / "job")), new_run_id()
    ledger.lease.acquire(run)
    beat = Heartbeat(ledger, run)  # not started: it holds the lease for a TTL from now
    marker = tmp_path / "job" / "cancel" / f"{run}.json"
    marker.mkdir(parents=True)  # a folder where the marker goes: every look fails
    caplog.set_level(logging.DEBUG, logger="raypar")
    stop = StopSignal(ledger, run, beat, every=0.05)
    try:
        wait_for(lambda: "looking for a cancel request failed" in caplog.text, "a failed look")
        assert stop() is None
        marker.rmdir()
        ledger.request_cancel(run)
        wait_for(lambda: stop.requested, "the marker to be seen")
        assert not stop.canceled  # seen, but the loop has not asked yet
        assert stop() == "canceled by `raypar cancel`" and stop.canceled
    finally:
        beat.stopped.set()
