"""Real faults on the 3-node loopback cluster: hung run(), killed and crashing workers,
a lost node, and the failure thresholds. Every test checks the exact output rows and
which batches ran again."""

import os
import signal
import threading

import psutil
import pytest
from conftest import make_spec, quiet, wait_for, worker_logs

import raypar
from raypar.engine.status import job_status
from raypar.jobdir.ledger import Ledger
from raypar.jobdir.state import JobState

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]


def texts(n, bad=()):
    return {f"f{i:03d}.txt": ("bad " if i in bad else "") + f"value {i}" for i in range(n)}


def expected_rows(files, skip=()):
    return [f"{name} {text.upper()}" for name, text in sorted(files.items()) if name not in skip]


def output_lines(tmp_path):
    return (tmp_path / "out" / "parallel_run_step.txt").read_text().splitlines()


def executions(log_dir):
    return sorted(tuple(p.read_text().split()) for p in log_dir.iterdir())


def folders(tmp_path, *names):
    paths = [tmp_path / n for n in names]
    for p in paths:
        p.mkdir()
    return paths


def fault_info(fault_dir):
    pid, node = (fault_dir / "fault").read_text().split()
    return int(pid), node


def in_background(action):
    """Run ``action`` in a thread (the driver blocks this one); re-raise its error at join."""
    errors = []

    def target():
        try:
            action()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()

    def join():
        thread.join(timeout=120)
        if errors:
            raise errors[0]

    return join


def one_worker(**extra):
    return {"resources.instance_count": 1, "max_concurrency_per_instance": 1, **extra}


def test_hung_run_is_killed_and_its_replacement_runs_init_again(ray_cluster, tmp_path):
    files = texts(6)
    log, inits, fault = folders(tmp_path, "exec", "inits", "fault")
    spec = make_spec(tmp_path, files, **one_worker(**{
        "retry_settings": {"max_retries": 1, "timeout": 3},
        "task.program_arguments": f"--exec-log {log} --init-log {inits} --fault f002.txt hang {fault}",
    }))

    outcome = raypar.run(spec, job_dir=str(tmp_path / "job"), echo=quiet).wait()

    assert outcome.state is JobState.SUCCEEDED
    assert output_lines(tmp_path) == expected_rows(files)
    hung_pid, _ = fault_info(fault)
    wait_for(lambda: not psutil.pid_exists(hung_pid), "the hung worker process to be gone", timeout=30)
    assert len(list(inits.iterdir())) == 2  # the replacement ran init() again
    assert executions(log).count(("f002.txt", "f003.txt")) == 2
    history = Ledger(str(tmp_path / "job")).view().failed["mb-0000001"]
    assert [(r.kind, r.final) for r in history] == [("timeout", False)]


def test_hung_run_with_no_tries_left_ends_the_job_with_that_batch_failed(ray_cluster, tmp_path):
    files = texts(4)
    fault, = folders(tmp_path, "fault")
    spec = make_spec(tmp_path, files, **one_worker(**{
        "retry_settings": {"max_retries": 0, "timeout": 2},
        "task.program_arguments": f"--fault f000.txt hang {fault}",
    }))

    outcome = raypar.run(spec, job_dir=str(tmp_path / "job"), echo=quiet).wait()

    assert outcome.state is JobState.SUCCEEDED  # thresholds are -1: the failure is skipped
    assert (outcome.completed, outcome.failed) == (1, 1)
    assert output_lines(tmp_path) == expected_rows(files, skip={"f000.txt", "f001.txt"})
    errors = job_status(str(tmp_path / "job"))["errors"]
    assert errors[0]["kind"] == "timeout" and "within 2s" in errors[0]["error"]


def test_worker_killed_mid_batch_reruns_it_without_spending_a_try(ray_cluster, tmp_path):
    files = texts(8)
    log, fault = folders(tmp_path, "exec", "fault")
    spec = make_spec(tmp_path, files, **one_worker(**{
        "retry_settings.max_retries": 0,  # a lost worker must not use up the only try
        "task.program_arguments": f"--exec-log {log} --fault f004.txt hold {fault}",
    }))

    def kill_the_worker():
        wait_for(lambda: (fault / "fault").exists(), "the batch to be held")
        os.kill(fault_info(fault)[0], signal.SIGKILL)

    join = in_background(kill_the_worker)
    outcome = raypar.run(spec, job_dir=str(tmp_path / "job"), echo=quiet).wait()
    join()

    assert outcome.state is JobState.SUCCEEDED and outcome.failed == 0
    assert output_lines(tmp_path) == expected_rows(files)
    assert executions(log).count(("f004.txt", "f005.txt")) == 2
    history = Ledger(str(tmp_path / "job")).view().failed["mb-0000002"]
    assert [(r.kind, r.final) for r in history] == [("system", False)]


def test_a_smoke_test_s_worker_killed_mid_batch_runs_its_batch_again_beside_a_spare(ray_cluster, tmp_path):
    # One mini-batch under 3 instances: the session reserves 2 (the batch's and a spare) and starts
    # one worker. Killed while it holds the batch, its slot restarts and the spare instance's worker
    # starts beside it (no other worker was up); the batch runs again on whichever is ready first.
    files = texts(2)
    log, fault = folders(tmp_path, "exec", "fault")
    spec = make_spec(tmp_path, files, **{"resources.instance_count": 3, "retry_settings.max_retries": 1,
                                         "task.program_arguments": f"--exec-log {log} --fault f000.txt hold {fault}"})
    job, lines = str(tmp_path / "job"), []

    def kill_the_worker():
        wait_for(lambda: (fault / "fault").exists(), "the batch to be held")
        os.kill(fault_info(fault)[0], signal.SIGKILL)

    join = in_background(kill_the_worker)
    outcome = raypar.run(spec, job_dir=job, echo=lines.append).wait()
    join()

    assert outcome.state is JobState.SUCCEEDED and outcome.failed == 0
    assert "raypar: 2 of the 3 instances reserved: fewer mini-batches to run than instances" in lines
    assert output_lines(tmp_path) == expected_rows(files)
    assert executions(log).count(("f000.txt", "f001.txt")) == 2
    history = Ledger(job).view().failed["mb-0000000"]
    assert [(r.kind, r.final) for r in history] == [("system", False)]  # the kill spent no try
    assert {(i, s) for i, s, _ in worker_logs(job)} == {(0, 0), (1, 0)}  # the killed slot and the spare
    # Three worker processes (the killed one, its slot's next, the spare); the killed one's batch,
    # held from its start to the kill, is the session's time cut short.
    assert outcome.worker_time["workers"] == 3 and outcome.worker_time["cut short"] > 0, outcome.worker_time


def test_a_batch_that_failed_on_a_broken_worker_is_retried_on_another(ray_cluster, tmp_path):
    # The worker in slot 0 fails every batch it runs (a dead GPU): with one retry each, every
    # batch it failed runs again on the other worker, and the job succeeds. The barrier makes
    # both workers hold a batch before any ends: a slow-starting slot 0 must still get one.
    files = texts(12)
    barrier, = folders(tmp_path, "barrier")
    spec = make_spec(tmp_path, files, **{
        "resources.instance_count": 1, "max_concurrency_per_instance": 2, "retry_settings.max_retries": 1,
        "task.program_arguments": f"--barrier {barrier} 2 --broken-slot 0",
    })

    outcome = raypar.run(spec, job_dir=str(tmp_path / "job"), echo=quiet).wait()

    assert outcome.state is JobState.SUCCEEDED and outcome.failed == 0
    assert output_lines(tmp_path) == expected_rows(files)
    view = Ledger(str(tmp_path / "job")).view()
    assert {record.worker for record in view.done.values()} == {"instance0-slot1"}
    tries = [r for records in view.failed.values() for r in records]
    assert tries and all((r.worker, r.kind, r.final) == ("instance0-slot0", "user", False) for r in tries)
    assert all(len(records) == 1 for records in view.failed.values())  # one failed try per batch, no more


def test_a_job_whose_retries_all_fail_again_ends_with_those_batches_failed(ray_cluster, tmp_path):
    # Half the files are bad on every try. Each retry goes to the worker it did not fail on; a
    # worker that found only retries of its own failures in the queue used to idle unseen while
    # they waited for it, and the driver spun for ever (about one run in two on this machine).
    files = texts(20, bad=set(range(0, 20, 2)))
    spec = make_spec(tmp_path, files, mini_batch_size="1", error_threshold=-1, **{
        "resources.instance_count": 1, "max_concurrency_per_instance": 2, "retry_settings.max_retries": 2,
    })

    outcome = raypar.run(spec, job_dir=str(tmp_path / "job"), echo=quiet).wait()

    assert outcome.state is JobState.SUCCEEDED and (outcome.completed, outcome.failed) == (10, 10)
    assert output_lines(tmp_path) == expected_rows(files, skip={f"f{i:03d}.txt" for i in range(0, 20, 2)})
    view = Ledger(str(tmp_path / "job")).view()
    assert sorted(len(records) for records in view.failed.values()) == [3] * 10  # every try recorded


def test_segfault_in_user_code_reruns_the_batch_on_a_fresh_worker(ray_cluster, tmp_path):
    files = texts(6)
    log, inits, fault = folders(tmp_path, "exec", "inits", "fault")
    spec = make_spec(tmp_path, files, **one_worker(**{
        "retry_settings.max_retries": 0,
        "task.program_arguments": f"--exec-log {log} --init-log {inits} --fault f001.txt segfault {fault}",
    }))

    outcome = raypar.run(spec, job_dir=str(tmp_path / "job"), echo=quiet).wait()

    assert outcome.state is JobState.SUCCEEDED
    assert output_lines(tmp_path) == expected_rows(files)
    assert executions(log).count(("f000.txt", "f001.txt")) == 2
    assert len(list(inits.iterdir())) == 2


def test_a_crash_loop_ends_after_the_system_failure_bound(ray_cluster, tmp_path):
    files = texts(6)
    fault, = folders(tmp_path, "fault")
    spec = make_spec(tmp_path, files, **one_worker(**{
        "retry_settings.max_retries": 0,
        "task.program_arguments": f"--fault f002.txt segfault-always {fault}",
    }))

    outcome = raypar.run(spec, job_dir=str(tmp_path / "job"), echo=quiet).wait()

    # 3 lost workers are free; the 4th loss spends the batch's only try.
    assert outcome.state is JobState.SUCCEEDED and (outcome.completed, outcome.failed) == (2, 1)
    assert output_lines(tmp_path) == expected_rows(files, skip={"f002.txt", "f003.txt"})
    history = Ledger(str(tmp_path / "job")).view().failed["mb-0000001"]
    assert [(r.kind, r.final) for r in history] == [("system", False)] * 3 + [("system", True)]


@pytest.mark.parametrize("fault, kind, error", [
    # run() succeeded; raypar could not store its result
    ("jobdir-once", "storage", "raypar could not store mb-0000000 in the job dir: FileExistsError"),
    # run() returned; raypar's own code in the worker then raised (a bug)
    ("raypar-once", "raypar", "raypar error in the worker: RuntimeError: injected: a bug in raypar's worker code"),
])
def test_raypars_own_failure_in_a_worker_reruns_the_batch_without_spending_a_try(ray_cluster, tmp_path, fault,
                                                                                kind, error):
    # Neither the user's try nor a lost worker: the batch runs again on a replaced worker, recorded as ``kind``.
    files = texts(6)
    log, faults = folders(tmp_path, "exec", "fault")
    spec = make_spec(tmp_path, files, **one_worker(**{
        "retry_settings.max_retries": 0,
        "task.program_arguments": f"--exec-log {log} --fault f000.txt {fault} {faults}",
    }))

    outcome = raypar.run(spec, job_dir=str(tmp_path / "job"), echo=quiet).wait()

    assert outcome.state is JobState.SUCCEEDED and outcome.failed == 0
    assert output_lines(tmp_path) == expected_rows(files)
    assert executions(log).count(("f000.txt", "f001.txt")) == 2
    history = Ledger(str(tmp_path / "job")).view().failed["mb-0000000"]
    assert [(r.kind, r.final) for r in history] == [(kind, False)]
    assert history[0].error.startswith(error)


def test_a_job_dir_that_cannot_be_written_stops_the_job_resumable(ray_cluster, tmp_path):
    files = texts(6)
    fault, = folders(tmp_path, "fault")
    spec = make_spec(tmp_path, files, **one_worker(**{
        "retry_settings.max_retries": 0,
        "task.program_arguments": f"--fault f000.txt jobdir-always {fault}",
    }))
    job = str(tmp_path / "job")

    outcome = raypar.run(spec, job_dir=job, echo=quiet).wait()

    # Every worker in turn failed to store: the job stops naming the job dir, no slot "lost".
    assert outcome.state is JobState.FAILED
    assert outcome.reason.startswith("raypar could not store mb-0000000 in the job dir: FileExistsError")
    assert (outcome.completed, outcome.failed) == (0, 0)
    history = Ledger(job).view().failed["mb-0000000"]
    assert {r.kind for r in history} == {"storage"} and not any(r.final for r in history)

    (fault / "off").touch()  # the storage is fixed
    resumed = raypar.resume(job, echo=quiet).wait()
    assert resumed.state is JobState.SUCCEEDED and resumed.completed == 3
    assert output_lines(tmp_path) == expected_rows(files)


def test_a_straggler_gets_a_second_attempt_and_the_first_to_finish_wins(ray_cluster, tmp_path):
    files = texts(8)
    log, fault = folders(tmp_path, "exec", "fault")
    spec = make_spec(tmp_path, files, **{
        "resources.instance_count": 1, "max_concurrency_per_instance": 2,
        "raypar.speculation": {"enabled": True, "multiple": 2, "min_seconds": 1},
        "task.program_arguments": f"--exec-log {log} --fault f004.txt hang {fault}",  # its first attempt hangs
    })

    outcome = raypar.run(spec, job_dir=str(tmp_path / "job"), echo=quiet).wait()

    assert outcome.state is JobState.SUCCEEDED and outcome.failed == 0
    assert output_lines(tmp_path) == expected_rows(files)
    assert executions(log).count(("f004.txt", "f005.txt")) == 2  # the hung attempt and the second one
    loser = fault_info(fault)[0]  # the losing attempt's worker was stopped (its process ends soon after the kill)
    wait_for(lambda: not psutil.pid_exists(loser), "the losing attempt's worker process to be gone", timeout=30)
    view = Ledger(str(tmp_path / "job")).view()
    assert "mb-0000002" in view.done and not view.failed  # no timeout, no try spent


@pytest.mark.parametrize("lossy_nodes, spare", [(3, True), (2, False)])
def test_lost_node_moves_its_batch_to_a_live_worker(ray_cluster, tmp_path, caplog, lossy_nodes, spare):
    """Two instances on nodes only this job can use. With a spare node the lost instance is
    re-placed; without one the job finishes on the other instance, with a warning."""
    extra = [ray_cluster.add_node(num_cpus=1, resources={"lossy": 1}) for _ in range(lossy_nodes)]
    ray_cluster.wait_for_nodes()
    try:
        files = texts(12)
        log, fault = folders(tmp_path, "exec", "fault")
        spec = make_spec(tmp_path, files, **{
            "resources.instance_count": 2, "max_concurrency_per_instance": 1,
            "retry_settings.max_retries": 0,
            "raypar.worker": {"num_cpus": 0.5, "resources": {"lossy": 1}},
            "task.program_arguments": f"--exec-log {log} --with-node --fault f006.txt hold {fault}",
        })

        def lose_the_node():
            wait_for(lambda: (fault / "fault").exists(), "the batch to be held")
            victim = next(n for n in extra if n.node_id == fault_info(fault)[1])
            ray_cluster.remove_node(victim)
            extra.remove(victim)

        join = in_background(lose_the_node)
        with caplog.at_level("WARNING", logger="raypar"):
            outcome = raypar.run(spec, job_dir=str(tmp_path / "job"), echo=quiet).wait()
        join()

        assert outcome.state is JobState.SUCCEEDED and outcome.failed == 0
        rows = [line.split(" ") for line in output_lines(tmp_path)]
        assert [" ".join(r[:3]) for r in rows] == expected_rows(files)
        assert executions(log).count(("f006.txt", "f007.txt")) == 2
        rerun_on = {r[4] for r in rows if r[0] in ("f006.txt", "f007.txt")}
        assert fault_info(fault)[1] not in rerun_on  # its rows come from a live node
        if not spare:
            assert any("lost its node" in r.getMessage() for r in caplog.records)
    finally:
        for node in extra:
            ray_cluster.remove_node(node)


@pytest.mark.parametrize("limits, reason", [
    ({"mini_batch_error_threshold": 1}, "more than mini_batch_error_threshold=1"),
    ({"error_threshold": 3}, "item(s) failed, more than error_threshold=3"),
    ({"allowed_failed_percent": 10}, "more than allowed_failed_percent=10"),
    ({"task.program_arguments": "--allowed_failed_percent 10"}, "more than allowed_failed_percent=10"),
])
def test_crossing_a_threshold_stops_the_job_failed_and_resumable(ray_cluster, tmp_path, limits, reason):
    files = texts(20, bad={1, 3, 5})  # batches 0, 1 and 2 fail (2 files each)
    flag = tmp_path / "fixed"
    args = f"--fixed-flag {flag} " + limits.pop("task.program_arguments", "")
    spec = make_spec(tmp_path, files, **one_worker(**{
        "retry_settings.max_retries": 0, "task.program_arguments": args, **limits,
    }))
    job = str(tmp_path / "job")

    failed = raypar.run(spec, job_dir=job, echo=quiet).wait()

    assert failed.state is JobState.FAILED and failed.exit_code == 1
    assert reason in failed.reason and reason in job_status(job)["reason"]
    assert failed.completed < 7  # dispatch stopped at the crossing, not after the whole input
    assert not (tmp_path / "out" / "parallel_run_step.txt").exists()

    flag.touch()
    resumed = raypar.resume(job, echo=quiet).wait()
    assert resumed.state is JobState.SUCCEEDED
    assert output_lines(tmp_path) == expected_rows(files)


def test_thresholds_not_crossed_let_the_job_succeed(ray_cluster, tmp_path):
    files = texts(20, bad={1})
    spec = make_spec(tmp_path, files, allowed_failed_percent=10, mini_batch_error_threshold=1,
                     error_threshold=2, **one_worker(**{"retry_settings.max_retries": 0}))
    outcome = raypar.run(spec, job_dir=str(tmp_path / "job"), echo=quiet).wait()
    assert outcome.state is JobState.SUCCEEDED and outcome.failed == 1
    assert output_lines(tmp_path) == expected_rows(files, skip={"f000.txt", "f001.txt"})


def test_a_script_that_fails_every_batch_stops_after_a_few_and_a_fixed_one_resumes_the_rest(ray_cluster, tmp_path):
    # Azure's thresholds are -1 (no limit): without raypar's first-success rule this job would spend
    # both tries of each of its 100 batches, 200 calls of run(), before ending.
    files = texts(200, bad=set(range(0, 200, 2)))  # every batch of 2 files holds a bad one
    log, = folders(tmp_path, "exec")
    flag = tmp_path / "fixed"
    spec = make_spec(tmp_path, files, **{"retry_settings.max_retries": 1, "raypar.failures_before_first_success": 3,
                                         "task.program_arguments": f"--exec-log {log} --fixed-flag {flag}"})
    job = str(tmp_path / "job")

    failed = raypar.run(spec, job_dir=job, echo=quiet).wait()

    assert failed.state is JobState.FAILED and failed.exit_code == 1
    assert failed.reason.startswith("4 mini-batch(es) failed and none has succeeded")
    assert "raypar.failures_before_first_success=3" in failed.reason
    # Each batch fails in milliseconds, so the first worker up may give every batch its first try
    # before a second worker takes the retries (a retry avoids the worker it failed on). The job
    # stops at the 4th batch out of tries; what the workers already held still ends or is killed.
    final = [b for b, records in Ledger(job).view().failed.items() if records[-1].final]
    calls = executions(log)
    second_tries = len(calls) - len(set(calls))
    assert 4 <= len(final) < 30 and second_tries < 30  # not the 100 second tries of Azure's behaviour
    assert not (tmp_path / "out" / "parallel_run_step.txt").exists()
    result = (tmp_path / "job" / "reports" / "job_result.txt").read_text().splitlines()
    assert any(line.startswith("  2x ValueError: cannot score ") for line in result)  # both tries, one error

    flag.touch()
    resumed = raypar.resume(job, echo=quiet).wait()
    assert resumed.state is JobState.SUCCEEDED and resumed.failed == 0
    assert output_lines(tmp_path) == expected_rows(files)


# -- batches of milliseconds, several to a call (groups) ----------------------------------------


@pytest.mark.parametrize("mode", ["segfault", "hang"])
def test_a_fault_inside_a_group_of_tiny_batches_charges_no_try_and_reruns_only_the_unstored(ray_cluster, tmp_path,
                                                                                           mode):
    # One-file batches that take milliseconds go several to a call. The worker crashes (or hangs
    # past the timeout) in f060's first attempt, inside such a group: no batch is charged a try;
    # the group's batches stored before the fault are done, the rest run again alone.
    files = texts(120)
    log, fault = folders(tmp_path, "exec", "fault")
    spec = make_spec(tmp_path, files, mini_batch_size="1", **one_worker(**{
        # 5 s: a group of these batches takes well under a second, even on a loaded machine.
        "retry_settings.max_retries": 0, "retry_settings.timeout": 5,
        "task.program_arguments": f"--exec-log {log} --fault f060.txt {mode} {fault}",
    }))

    outcome = raypar.run(spec, job_dir=str(tmp_path / "job"), echo=quiet).wait()

    assert outcome.state is JobState.SUCCEEDED and outcome.failed == 0
    assert output_lines(tmp_path) == expected_rows(files)
    ran = executions(log)
    assert ran.count(("f060.txt",)) == 2  # the faulty first attempt, then alone
    assert sorted(set(ran)) == [(name,) for name in sorted(files)] and len(ran) == len(files) + 1
    # A single call would leave a failed try on f060 (a lost worker, or a timeout): a group leaves none.
    assert Ledger(str(tmp_path / "job")).view().failed == {}
