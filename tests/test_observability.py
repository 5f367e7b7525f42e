"""What a user sees of a running job: named worker actors in the dashboard, Ray metrics, and the
Python handle of a job driven from this process (status, cancel, wait)."""

import re

import pytest
import ray
import requests
from conftest import make_spec, quiet, wait_for

import raypar
from raypar.jobdir.ledger import Ledger
from raypar.jobdir.state import JobState

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]


def scrape(metric: str, job: str) -> float:
    """The sum of ``metric`` for ``job`` over every node's metrics agent."""
    total = 0.0
    pattern = re.compile(rf'^{metric}\{{[^}}]*raypar_job="{job}"[^}}]*\}} ([0-9.e+]+)$')
    for node in ray.nodes():
        if not node["Alive"]:
            continue
        try:
            text = requests.get(f"http://127.0.0.1:{node['MetricsExportPort']}/metrics", timeout=5).text
        except requests.RequestException:
            continue
        total += sum(float(m.group(1)) for m in map(pattern.match, text.splitlines()) if m)
    return total


def test_workers_are_named_by_job_node_and_slot_and_batches_are_ray_metrics(ray_cluster, tmp_path):
    files = {f"f{i}.txt": ("bad " if i == 3 else "") + f"v{i}" for i in range(8)}
    spec = make_spec(tmp_path, files, name="observed", mini_batch_size="1",
                     **{"resources.instance_count": 2, "max_concurrency_per_instance": 2,
                        "retry_settings.max_retries": 0})
    outcome = raypar.run(spec, job_dir=str(tmp_path / "job"), echo=quiet).wait()
    assert (outcome.state, outcome.completed, outcome.failed) == (JobState.SUCCEEDED, 7, 1)

    # Ray's actor table (what the dashboard lists), dead actors included; the state API needs the dashboard.
    from ray._private.state import actors

    run = next(iter(Ledger(str(tmp_path / "job")).view().done.values())).run
    ours = [a for a in actors().values() if a["Name"].endswith(run)]
    slots = set()
    for actor in ours:
        match = re.fullmatch(rf"raypar:observed:node-([0-9a-f]{{8}}):instance(\d)-slot(\d):{run}", actor["Name"])
        assert match, actor["Name"]
        assert actor["Address"]["NodeID"].startswith(match.group(1))  # the name tells the node it ran on
        slots.add((int(match.group(2)), int(match.group(3))))
    assert slots == {(0, 0), (0, 1), (1, 0), (1, 1)}

    # Exported by this process (the driver) through Ray's metrics agent, within seconds.
    wait_for(lambda: scrape("ray_raypar_batches_done_total", "observed") == 7, "7 done batches in the metrics", 60)
    wait_for(lambda: scrape("ray_raypar_batches_failed_total", "observed") == 1, "1 failed batch", 60)
    wait_for(lambda: scrape("ray_raypar_batch_seconds_count", "observed") == 7, "7 batch latencies", 60)


def test_done_batches_are_in_the_metrics_while_a_long_batch_still_runs(ray_cluster, tmp_path):
    """The done counter is recorded once a second, not per batch: two quick batches followed by one
    that does not end are counted while it runs, not only when the session ends."""
    files = {f"f{i:02d}.txt": f"v{i}" for i in range(3)}
    hold = tmp_path / "hold"
    hold.mkdir()
    spec = make_spec(tmp_path, files, name="counted", mini_batch_size="1",
                     **{"resources.instance_count": 1, "max_concurrency_per_instance": 1,
                        "task.program_arguments": f"--hold-from f02.txt {hold}"})
    job = raypar.run(spec, job_dir=str(tmp_path / "job"), echo=quiet, wait=False)
    try:
        wait_for(lambda: list(hold.glob("holding-*")), "the worker to hold f02")
        wait_for(lambda: scrape("ray_raypar_batches_done_total", "counted") == 2, "2 done batches in the metrics", 60)
    finally:
        (hold / "release").touch()
    assert job.wait().completed == 3
    wait_for(lambda: scrape("ray_raypar_batches_done_total", "counted") == 3, "3 done batches in the metrics", 60)


def test_local_handle_runs_in_the_background_cancels_and_resumes(ray_cluster, tmp_path):
    files = {f"f{i:02d}.txt": f"v{i}" for i in range(6)}
    hold = tmp_path / "hold"
    hold.mkdir()
    spec = make_spec(tmp_path, files, mini_batch_size="1",
                     **{"resources.instance_count": 1, "max_concurrency_per_instance": 1,
                        "task.program_arguments": f"--hold-from f02.txt {hold}"})
    job = raypar.run(spec, job_dir=str(tmp_path / "job"), echo=quiet, wait=False)
    wait_for(lambda: list(hold.glob("holding-*")), "the worker to hold f02")
    status = job.status()
    assert (status["state"], status["completed"]) == ("running", 2)
    assert job.cancel() is JobState.CANCELED
    assert job.wait().exit_code == 130

    (hold / "release").touch()
    resumed = raypar.resume(str(tmp_path / "job"), echo=quiet)
    outcome = resumed.wait()
    assert (outcome.exit_code, outcome.completed) == (0, 6)
    assert (tmp_path / "out" / "parallel_run_step.txt").read_text().splitlines() == \
        [f"{name} {text.upper()}" for name, text in sorted(files.items())]
