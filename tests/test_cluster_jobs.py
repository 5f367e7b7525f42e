"""End-to-end jobs on a real 3-node Ray cluster (in-process, 127.0.0.1)."""

import collections
import json
import os
import re
import sys
from pathlib import Path

import pytest
from conftest import cli_in_process, make_spec, quiet, wait_for, worker_logs

import raypar
from raypar.engine.status import job_status
from raypar.errors import PlacementError, UsageError
from raypar.jobdir.ledger import Ledger
from raypar.jobdir.state import JobState

pytestmark = [pytest.mark.ray, pytest.mark.timeout(180)]


def texts(n, bad=()):
    """``n`` files named f000.txt...; those in ``bad`` hold a record run() rejects."""
    return {f"f{i:03d}.txt": ("bad " if i in bad else "") + f"value {i}" for i in range(n)}


def expected_rows(files):
    return [f"{name} {text.upper()}" for name, text in sorted(files.items())]


def output_lines(tmp_path):
    return (tmp_path / "out" / "parallel_run_step.txt").read_text().splitlines()


def executions(log_dir: Path):
    """Batches run so far: one entry per run() call, as the tuple of its file names."""
    return sorted(tuple(p.read_text().split()) for p in log_dir.iterdir())


def test_rows_exact_and_instances_pinned_to_distinct_nodes(ray_cluster, tmp_path):
    files = texts(60)
    barrier, shutdowns = tmp_path / "barrier", tmp_path / "shutdowns"
    barrier.mkdir()  # every worker holds a batch before any finishes, so every instance gets work
    shutdowns.mkdir()
    args = f"--with-node --barrier {barrier} 6 --shutdown-log {shutdowns}"
    spec = make_spec(tmp_path, files, **{"task.program_arguments": args, "max_concurrency_per_instance": 2})

    outcome = raypar.run(spec, job_dir=str(tmp_path / "job"), echo=quiet).wait()

    assert outcome.state is JobState.SUCCEEDED and outcome.exit_code == 0
    assert (outcome.total, outcome.completed, outcome.failed, outcome.pending) == (30, 30, 0, 0)
    rows = [line.split(" ") for line in output_lines(tmp_path)]
    assert [" ".join(r[:3]) for r in rows] == expected_rows(files)  # every file once, in order
    node_of_instance = {}
    for *_, instance, node in rows:
        node_of_instance.setdefault(instance, set()).add(node)
    assert all(len(nodes) == 1 for nodes in node_of_instance.values()), node_of_instance
    assert sorted(node_of_instance) == ["0", "1", "2"]
    nodes = [next(iter(n)) for n in node_of_instance.values()]
    assert len(set(nodes)) == 3
    alive = {n["NodeID"] for n in __import__("ray").nodes() if n["Alive"]}
    assert set(nodes) <= alive
    assert sorted(p.name for p in shutdowns.iterdir()) == sorted(p.name for p in barrier.iterdir())  # all 6


def test_slow_worker_does_not_hold_back_the_others(ray_cluster, tmp_path):
    files = texts(24)  # 12 batches on 2 workers
    log = tmp_path / "exec"
    log.mkdir()
    # Slot 0 blocks in its first run() until 10 batches ran: only pulled work lets that finish.
    args = f"--exec-log {log} --slow-slot 0 10"
    spec = make_spec(tmp_path, files, **{"task.program_arguments": args, "resources.instance_count": 1,
                                         "max_concurrency_per_instance": 2, "raypar.worker": {"num_cpus": 0.5}})

    outcome = raypar.run(spec, job_dir=str(tmp_path / "job"), echo=quiet).wait()

    assert outcome.state is JobState.SUCCEEDED
    assert output_lines(tmp_path) == expected_rows(files)
    assert len(executions(log)) == 12
    by_worker = collections.Counter(r.worker for r in Ledger(str(tmp_path / "job")).view().done.values())
    assert by_worker["instance0-slot1"] >= 10 and by_worker["instance0-slot0"] <= 2, by_worker


def test_dataframe_rows_are_space_separated_without_header_or_index(ray_cluster, tmp_path):
    files = {"a.txt": "x", "b.txt": "two words"}
    spec = make_spec(tmp_path, files, **{"task.program_arguments": "--dataframe", "resources.instance_count": 1})
    outcome = raypar.run(spec, job_dir=str(tmp_path / "job"), echo=quiet).wait()
    assert outcome.state is JobState.SUCCEEDED
    assert output_lines(tmp_path) == ['a.txt X', 'b.txt "TWO WORDS"']


def test_resume_reruns_only_failed_batches_and_matches_clean_run(ray_cluster, tmp_path, monkeypatch):
    from raypar.outputs import live as live_assembly

    made = []
    init = live_assembly.LiveAssembly.__init__
    monkeypatch.setattr(live_assembly.LiveAssembly, "__init__",
                        lambda self, *a, **k: made.append(self) or init(self, *a, **k))
    files = texts(20, bad={3, 12, 13})
    log, flag = tmp_path / "exec", tmp_path / "fixed"
    log.mkdir()
    args = f"--exec-log {log} --fixed-flag {flag}"
    spec = make_spec(tmp_path, files, **{"task.program_arguments": args})
    job = str(tmp_path / "job")

    first = raypar.run(spec, job_dir=job, echo=quiet).wait()

    # Thresholds are -1 (Azure's default): failures are skipped, the job completes.
    bad_batches = [("f002.txt", "f003.txt"), ("f012.txt", "f013.txt")]
    assert first.state is JobState.SUCCEEDED
    assert (first.completed, first.failed, first.pending) == (8, 2, 0)
    runs = executions(log)
    assert all(runs.count(b) == 2 for b in bad_batches)  # max_retries 1 = 2 tries
    assert len(runs) == 8 + 2 * 2
    index = [p for p in Ledger(job).store.list_files("failed-compact") if p.endswith(".idx")]
    assert len(index) == 1 and json.loads(Path(index[0]).read_text())["rows"] == 4  # compacted at the end
    status = job_status(job)  # from those columns and pieces
    assert {e["batch"] for e in status["errors"]} == {"mb-0000001", "mb-0000006"}
    assert "bad record" in status["errors"][0]["error"]
    assert "f003.txt" not in (tmp_path / "out" / "parallel_run_step.txt").read_text()
    assert_reports(Path(job), bad_batches={"mb-0000001": "f002.txt f003.txt", "mb-0000006": "f012.txt f013.txt"})

    first_workers = worker_logs(job)
    assert len(first_workers) == 3  # 10 batches: every slot's worker started

    flag.touch()  # the cause is removed
    for p in log.iterdir():
        p.unlink()
    second = raypar.resume(job, echo=quiet).wait()

    assert second.state is JobState.SUCCEEDED
    assert (second.completed, second.failed, second.pending) == (10, 0, 0)
    assert executions(log) == bad_batches  # only the failed batches ran again
    # Two batches: two workers started (init() ran twice, not three times), on two instances.
    assert sorted((i, s) for i, s, _ in worker_logs(job) - first_workers) == [(0, 0), (1, 0)]
    assert output_lines(tmp_path) == expected_rows(files)
    resumed = made[-1]  # the resume's output was written while its two batches ran, the 8 done before too
    assert resumed.resumed is not None and resumed.gave_up is None
    assert resumed.written_while_running == resumed.written == 10

    clean_dir = tmp_path / "clean"
    clean_dir.mkdir()
    clean = make_spec(clean_dir, files, **{"task.program_arguments": f"--fixed-flag {flag}"})
    raypar.run(clean, job_dir=str(clean_dir / "job"), echo=quiet).wait()
    assert (clean_dir / "out" / "parallel_run_step.txt").read_bytes() == \
        (tmp_path / "out" / "parallel_run_step.txt").read_bytes()


def test_a_resume_of_fewer_batches_than_instances_runs_on_a_cluster_that_lost_a_node(ray_cluster, tmp_path):
    # The first run has 4 nodes for its 4 instances; the resume of its 2 failed batches finds 3
    # (with placement_timeout 0 it cannot wait): it reserves 3 instances (one for each batch, one
    # for a retry elsewhere) and its 2 workers run on 2 distinct nodes.
    files = texts(8, bad={1, 5})
    flag, barrier = tmp_path / "fixed", tmp_path / "barrier"
    barrier.mkdir()  # each worker's first batch waits until two workers hold one
    spec = make_spec(tmp_path, files, **{"task.program_arguments": f"--with-node --fixed-flag {flag} "
                                                                   f"--barrier {barrier} 2",
                                         "resources.instance_count": 4, "raypar.placement_timeout": 0})
    job = str(tmp_path / "job")
    extra = ray_cluster.add_node(num_cpus=1)
    try:
        ray_cluster.wait_for_nodes()
        first = raypar.run(spec, job_dir=job, echo=quiet).wait()
    finally:
        ray_cluster.remove_node(extra)
    assert (first.state, first.completed, first.failed) == (JobState.SUCCEEDED, 2, 2)
    first_workers = worker_logs(job)

    flag.touch()
    for mark in barrier.iterdir():
        mark.unlink()
    lines = []
    second = raypar.resume(job, echo=lines.append).wait()

    assert (second.state, second.completed, second.failed) == (JobState.SUCCEEDED, 4, 0), lines
    assert "raypar: 3 of the 4 instances reserved: fewer mini-batches to run than instances" in lines
    assert sorted((i, s) for i, s, _ in worker_logs(job) - first_workers) == [(0, 0), (1, 0)]
    rows = [line.rsplit(" ", 2) for line in output_lines(tmp_path)]  # the row, its instance, its node
    assert [r[0] for r in rows] == expected_rows(files)  # every file once, in order
    resumed = {r[2] for r in rows if r[0].startswith(("f000.txt", "f001.txt", "f004.txt", "f005.txt"))}
    assert len(resumed) == 2  # the resumed batches ran on two nodes


def assert_reports(job: Path, bad_batches: dict):
    """Reports and `raypar logs` after a run where ``bad_batches`` failed twice (10 batches)."""
    import csv
    import subprocess
    import sys

    with open(job / "reports" / "processed_mini_batches.csv") as f:
        rows = list(csv.DictReader(f))
    statuses = collections.defaultdict(list)
    for row in rows:
        statuses[row["batch"]].append(row["status"])
    assert len(statuses) == 10
    assert all(statuses[b] == ["exception", "exception"] for b in bad_batches)
    assert all(s == ["done"] for b, s in statuses.items() if b not in bad_batches)
    assert all(row["node"] and row["worker"] and row["started"] for row in rows)
    errors = (job / "reports" / "errors.txt").read_text()
    headers = [line.split()[1] for line in errors.splitlines() if line.startswith("=== ")]
    assert headers == [b for b in sorted(bad_batches) for _ in range(2)]  # each failed attempt, in batch order
    # each batch's traceback once: its second attempt raised the same, and names the first
    assert errors.count("ValueError: cannot score") == len(bad_batches)
    seconds = {b: section for b in bad_batches for section in errors.split("\n\n")
               if section.startswith(f"=== {b} ") and " attempt 2: " in section}
    assert sorted(seconds) == sorted(bad_batches)
    assert all(section.endswith(" attempt 1)") and f"\n(the same traceback as {b} run " in section
               for b, section in seconds.items())
    result = (job / "reports" / "job_result.txt").read_text()
    assert "state: succeeded" in result
    most_frequent = [line.strip() for line in result.splitlines() if line.startswith("  ")]
    assert len(most_frequent) == len(bad_batches)  # one error line per bad batch, each raised by both attempts
    assert all(line.startswith("2x ValueError: cannot score ") and line.endswith(": bad record")
               for line in most_frequent), result

    batch, names = next(iter(bad_batches.items()))
    shown = subprocess.run([sys.executable, "-m", "raypar.cli", "logs", str(job), "--batch", batch],
                           capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.count("exception on instance") == 2
    assert shown.stdout.count(f"scoring {names}") == 2  # print() of both attempts, from the worker logs
    assert "INFO score: batch of 2 files" in shown.stdout  # and the entry script's logging
    everything = subprocess.run([sys.executable, "-m", "raypar.cli", "logs", str(job)],
                                capture_output=True, text=True).stdout
    assert everything.count("scoring ") == 12  # 8 good batches + 2 x 2 failed attempts


def test_resume_of_a_finished_job_runs_nothing_and_keeps_its_output(ray_cluster, tmp_path):
    log = tmp_path / "exec"
    log.mkdir()
    spec = make_spec(tmp_path, texts(6), **{"task.program_arguments": f"--exec-log {log}"})
    job = tmp_path / "job"
    raypar.run(spec, job_dir=str(job), echo=quiet).wait()
    before = executions(log)
    output = tmp_path / "out" / "parallel_run_step.txt"
    rows, written = output.read_text(), output.stat()
    frozen = json.loads((job / "job.json").read_text())
    del frozen["spec"]["raypar"]["mount_cache"]  # as an older raypar wrote it, before the key existed
    (job / "job.json").write_text(json.dumps(frozen))
    said = []

    again = raypar.run(spec, job_dir=str(job), echo=said.append).wait()  # same spec, same job dir: a resume
    resumed = raypar.resume(str(job), echo=quiet).wait()

    assert again.state is resumed.state is JobState.SUCCEEDED  # even after an upgrade added a key
    assert executions(log) == before
    assert len(before) == 3
    assert (output.stat().st_ino, output.stat().st_mtime_ns) == (written.st_ino, written.st_mtime_ns)  # kept
    assert any("kept as it is" in line for line in said)
    output.unlink()  # the user removed it: the next resume writes it again, from the parts
    raypar.resume(str(job), echo=quiet).wait()
    assert output.read_text() == rows


def test_run_refuses_a_job_dir_holding_another_job(ray_cluster, tmp_path):
    spec = make_spec(tmp_path, texts(4), **{"resources.instance_count": 1})
    job = str(tmp_path / "job")
    raypar.run(spec, job_dir=job, echo=quiet).wait()
    other = dict(spec, mini_batch_size="1")
    with pytest.raises(UsageError, match=r"holds a different job \(changed: mini_batch_size\)"):
        raypar.run(other, job_dir=job, echo=quiet).wait()


def test_mini_batch_error_threshold_fails_the_job_and_it_stays_resumable(ray_cluster, tmp_path):
    files = texts(8, bad={0})
    flag = tmp_path / "fixed"
    spec = make_spec(tmp_path, files, mini_batch_error_threshold=0,
                     **{"task.program_arguments": f"--fixed-flag {flag}", "resources.instance_count": 1,
                        "max_concurrency_per_instance": 1, "retry_settings.max_retries": 0})
    job = str(tmp_path / "job")

    failed = raypar.run(spec, job_dir=job, echo=quiet).wait()

    assert failed.state is JobState.FAILED and failed.exit_code == 1
    assert "mini_batch_error_threshold=0" in failed.reason
    assert not (tmp_path / "out" / "parallel_run_step.txt").exists()  # no partial output
    assert job_status(job)["state"] == "failed"

    flag.touch()
    resumed = raypar.resume(job, echo=quiet).wait()
    assert resumed.state is JobState.SUCCEEDED
    assert output_lines(tmp_path) == expected_rows(files)


def test_instance_count_2_on_a_multi_node_cluster_spreads_over_two_nodes(ray_cluster, tmp_path):
    barrier = tmp_path / "barrier"
    barrier.mkdir()  # all 4 workers hold a batch at once: both instances' nodes are in the rows
    files = texts(12)
    spec = make_spec(tmp_path, files, **{"resources.instance_count": 2, "max_concurrency_per_instance": 2,
                                         "task.program_arguments": f"--with-node --barrier {barrier} 4"})
    lines = []

    outcome = raypar.run(spec, job_dir=str(tmp_path / "job"), echo=lines.append).wait()

    assert outcome.state is JobState.SUCCEEDED
    rows = [line.split(" ") for line in output_lines(tmp_path)]
    assert [" ".join(r[:3]) for r in rows] == expected_rows(files)
    nodes = {}
    for *_, instance, node in rows:
        nodes.setdefault(instance, set()).add(node)
    assert sorted(nodes) == ["0", "1"] and all(len(n) == 1 for n in nodes.values())
    assert nodes["0"] != nodes["1"]  # STRICT_SPREAD: a real cluster never packs
    assert not [line for line in lines if "one-node Ray" in line]


def test_more_instances_than_nodes_fails_with_a_clear_message(ray_cluster, tmp_path):
    spec = make_spec(tmp_path, texts(8), **{"resources.instance_count": 4, "raypar.placement_timeout": 0})
    with pytest.raises(PlacementError, match=r"needs 4 node\(s\).*has 3 such node\(s\)"):
        raypar.run(spec, job_dir=str(tmp_path / "job"), echo=quiet).wait()
    assert job_status(str(tmp_path / "job"))["state"] == "failed"


def test_a_fresh_job_of_a_few_batches_reserves_and_starts_only_what_they_need(ray_cluster, tmp_path):
    # A smoke test of 2 mini-batches under the spec of a 4-node job of 4 half-CPU workers a node,
    # on this cluster of 3 one-CPU nodes: every slot would need 4 nodes of 2 CPUs. It reserves 3
    # instances (one per batch, one for a retry elsewhere) of one slot each, starts 2 workers.
    files = texts(4)
    spec = make_spec(tmp_path, files, **{"resources.instance_count": 4, "max_concurrency_per_instance": 4,
                                         "raypar.worker.num_cpus": 0.5, "raypar.placement_timeout": 0})
    job, lines = str(tmp_path / "job"), []
    result = raypar.run(spec, job_dir=job, echo=lines.append).wait()

    assert (result.state, result.completed) == (JobState.SUCCEEDED, 2), lines
    assert ("raypar: 3 of the 4 instances reserved with 1 of their 4 worker slots each: fewer mini-batches to run "
            "than worker slots") in lines
    assert sorted((i, s) for i, s, _ in worker_logs(job)) == [(0, 0), (1, 0)]
    assert output_lines(tmp_path) == expected_rows(files)


TIMED_ENTRY = """\
import os
import time


def init():
    time.sleep(0.5)


def run(mini_batch):
    time.sleep(0.2)
    marker = os.path.join(os.environ["HANG_MARKERS"], os.path.basename(mini_batch[0]))
    if mini_batch[0].endswith("f001.txt") and not os.path.exists(marker):  # its first try hangs
        open(marker, "w").close()
        time.sleep(600)
    return [os.path.basename(p) for p in mini_batch]
"""


def test_the_session_says_what_its_workers_time_went_to(ray_cluster, tmp_path):
    # One slot: init() takes 0.5 s, each batch 0.2 s in run(); the second batch's first try hangs
    # past the 2 s timeout, so its worker is killed and a second one starts and runs the rest.
    files = texts(4)
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "timed.py").write_text(TIMED_ENTRY)
    markers = tmp_path / "markers"
    markers.mkdir()
    spec = make_spec(tmp_path, files, **{"resources.instance_count": 1, "mini_batch_size": "1",
                                         "task.entry_script": "timed.py", "retry_settings.timeout": 2,
                                         "environment_variables": {"HANG_MARKERS": str(markers)}})
    job, lines = str(tmp_path / "job"), []
    result = raypar.run(spec, job_dir=job, echo=lines.append).wait()

    assert (result.state, result.completed) == (JobState.SUCCEEDED, 4), lines
    spent = result.worker_time
    assert spent["workers"] == 2  # the one killed at the timeout, its replacement
    assert spent["init()"] >= 2 * 0.5
    assert spent["run()"] >= 4 * 0.2  # each batch's try that answered: not the hung one
    assert spent["cut short"] >= 2.0  # the hung try, from its start to its worker's kill
    line = next(line for line in lines if line.startswith("raypar: worker time "))
    assert re.fullmatch(r"raypar: worker time \d+\.\d s over 2 worker\(s\): .*", line), line
    assert {"init()", "run()", "cut short"} <= {part.rsplit(" ", 1)[0] for part in line.split(": ", 2)[2].split(", ")}
    result_text = (tmp_path / "job" / "reports" / "job_result.txt").read_text()
    assert f"worker time (this session): {line.removeprefix('raypar: worker time ')}" in result_text


def test_placement_timeout_0_on_nodes_that_are_there_but_busy_gives_ray_a_moment_then_one_line(
        ray_cluster, tmp_path, monkeypatch):
    # The 3 nodes exist (so not "at once"), but another reservation holds their CPUs.
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from raypar.engine import ray_transport

    monkeypatch.setattr(ray_transport, "GROUP_CREATION_SECONDS", 1.0)
    other = placement_group([{"CPU": 1}] * 3, strategy="STRICT_SPREAD")
    ray.get(other.ready(), timeout=60)
    try:
        spec = make_spec(tmp_path, texts(6), **{"raypar.placement_timeout": 0})
        with pytest.raises(PlacementError, match=r"needs 3 node\(s\).*has 3 such node\(s\) of 3 alive free; waited 1s "
                                                 r"\(for Ray to reserve them: raypar.placement_timeout is 0\)$"):
            raypar.run(spec, job_dir=str(tmp_path / "job"), echo=quiet).wait()
    finally:
        remove_placement_group(other)
    assert job_status(str(tmp_path / "job"))["state"] == "failed"


def test_init_failure_on_every_worker_fails_fast_with_the_traceback(ray_cluster, tmp_path):
    spec = make_spec(tmp_path, texts(4), **{"resources.instance_count": 1, "max_concurrency_per_instance": 1})
    marker = tmp_path / "shutdown-ran"
    (tmp_path / "code" / "score.py").write_text("def init():\n    raise RuntimeError('model file missing')\n"
                                                "def run(mb):\n    return mb\n"
                                                f"def shutdown():\n    open({str(marker)!r}, 'w').close()\n")
    outcome = raypar.run(spec, job_dir=str(tmp_path / "job"), echo=quiet).wait()
    assert outcome.state is JobState.FAILED
    assert outcome.reason.startswith("no worker could start: init() failed")
    assert "RuntimeError: model file missing" in job_status(str(tmp_path / "job"))["reason"]
    assert not marker.exists()  # shutdown() never runs on a worker whose init() failed


def test_entry_script_that_does_not_import_fails_with_its_error(ray_cluster, tmp_path):
    spec = make_spec(tmp_path, texts(2), **{"resources.instance_count": 1, "max_concurrency_per_instance": 1})
    (tmp_path / "code" / "score.py").write_text("def run(mb)\n    return mb\n")
    outcome = raypar.run(spec, job_dir=str(tmp_path / "job"), echo=quiet).wait()
    assert outcome.state is JobState.FAILED
    assert outcome.reason == "no worker could start: loading the entry script failed on every worker"
    assert "SyntaxError" in job_status(str(tmp_path / "job"))["reason"]


def test_an_environment_that_cannot_install_stops_the_job_at_once_with_one_line(ray_cluster, tmp_path, monkeypatch):
    # An Azure conda file made for Python 3.7, with a requirement that cannot exist (so the test
    # does not depend on the network: found or not, pip fails on it).
    (tmp_path / "conda.yml").write_text(
        "name: old-sample\ndependencies:\n- python=3.7\n- pip\n- pip:\n  - raypar-no-such-package==0.0.1\n")
    spec = make_spec(tmp_path, texts(4), **{"resources.instance_count": 1, "max_concurrency_per_instance": 2,
                                            "task.environment": {"conda_file": str(tmp_path / "conda.yml")}})
    from raypar.engine.ray_transport import Placement

    created = []
    new_actor = Placement.new_actor
    monkeypatch.setattr(Placement, "new_actor", lambda self, slot: created.append(slot.label) or new_actor(self, slot))
    lines = []

    outcome = raypar.run(spec, job_dir=str(tmp_path / "job"), echo=lines.append).wait()

    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    pinned = [line for line in lines if "conda_file pins python=3.7" in line]
    assert len(pinned) == 1 and f"but the cluster runs Python {python}" in pinned[0]
    assert outcome.state is JobState.FAILED
    [log] = (tmp_path / "job" / "logs").glob("*~runtime-env.log")
    assert outcome.reason == (f"environment: pip could not install 'raypar-no-such-package==0.0.1' on Python "
                              f"{python} (the cluster's); relax the pin or set raypar.runtime_env.pip "
                              f"(pip's output: {log})")
    assert job_status(str(tmp_path / "job"))["reason"] == outcome.reason  # one line, no traceback
    assert "raypar-no-such-package" in log.read_text() and "pip" in log.read_text()
    assert sorted(created) == ["instance 0 slot 0", "instance 0 slot 1"]  # each slot started once, never again
    assert outcome.completed == 0 and outcome.pending == 2


def test_environment_variables_argv_and_summary_only(ray_cluster, tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    (code / "env_script.py").write_text(
        "import os, sys\n"
        "def run(mini_batch):\n"
        "    return [f\"{os.path.basename(p)} {os.environ['GREETING']} {sys.argv[1:]}\" for p in mini_batch]\n"
    )
    spec = make_spec(tmp_path, texts(3), environment_variables={"GREETING": 42},
                     **{"task.entry_script": "env_script.py", "task.program_arguments": "--name 'a b'",
                        "resources.instance_count": 1})
    outcome = raypar.run(spec, job_dir=str(tmp_path / "job"), echo=quiet).wait()
    assert outcome.state is JobState.SUCCEEDED
    assert output_lines(tmp_path) == [f"f00{i}.txt 42 ['--name', 'a b']" for i in range(3)]

    summary = dict(make_spec(tmp_path / "s", texts(3), **{"resources.instance_count": 1}))
    summary["task"] = {k: v for k, v in summary["task"].items() if k != "append_row_to"}
    outcome = raypar.run(summary, job_dir=str(tmp_path / "s" / "job"), echo=quiet).wait()
    assert outcome.state is JobState.SUCCEEDED and outcome.output is None
    assert list((tmp_path / "s" / "out").iterdir()) == []  # the folder exists (as Azure mounts it), empty


def test_gpu_worker_sees_only_its_gpu(ray_cluster, tmp_path):
    gpu_node = ray_cluster.add_node(num_cpus=1, num_gpus=2)
    ray_cluster.wait_for_nodes()
    try:
        code = tmp_path / "code"
        code.mkdir()
        barrier = tmp_path / "barrier"
        barrier.mkdir()
        (code / "gpu.py").write_text(
            "import os, time\n"
            f"BARRIER = {str(barrier)!r}\n"
            "def run(mini_batch):\n"  # both workers hold a batch before either finishes one
            "    mark = os.path.join(BARRIER, str(os.getpid()))\n"
            "    if not os.path.exists(mark):\n"
            "        open(mark, 'w').close()\n"
            "        deadline = time.time() + 60\n"
            "        while len(os.listdir(BARRIER)) < 2 and time.time() < deadline:\n"
            "            time.sleep(0.05)\n"
            "    return [f\"{os.getpid()} {os.environ.get('CUDA_VISIBLE_DEVICES')}\" for _ in mini_batch]\n"
        )
        spec = make_spec(tmp_path, texts(8), **{"max_concurrency_per_instance": 2, 
            "task.entry_script": "gpu.py", "resources.instance_count": 1, "mini_batch_size": "1",
            "raypar.worker": {"num_cpus": 0.1, "num_gpus": 1},
        })
        outcome = raypar.run(spec, job_dir=str(tmp_path / "job"), echo=quiet).wait()
        assert outcome.state is JobState.SUCCEEDED
        devices_by_pid = {}
        for line in output_lines(tmp_path):
            pid, devices = line.split()
            devices_by_pid.setdefault(pid, set()).add(devices)
        assert len(devices_by_pid) == 2  # two workers, each saw one fixed GPU
        seen = [next(iter(d)) for d in devices_by_pid.values()]
        assert all(len(d) == 1 for d in devices_by_pid.values())
        assert sorted(seen) == ["0", "1"]
    finally:
        ray_cluster.remove_node(gpu_node)


@pytest.mark.parametrize("ahead", ["waits", "stops"])
def test_batches_stored_behind_a_straggler_wait_for_it_or_past_max_ahead_the_rest_is_written_at_the_end(
        ray_cluster, tmp_path, monkeypatch, ahead):
    """Batch 1 holds while the batches after it finish. They wait for it (in a few bytes each), and
    all six are written while running; or, stored more than MAX_AHEAD ahead of it, the live assembly
    stops writing, keeps batch 0's rows, and the session's end writes the rest. Every row once."""
    from conftest import wait_for

    from raypar.outputs import live as live_assembly

    if ahead == "stops":
        monkeypatch.setattr(live_assembly, "MAX_AHEAD", 2)
    made = []
    init = live_assembly.LiveAssembly.__init__
    monkeypatch.setattr(live_assembly.LiveAssembly, "__init__",
                        lambda self, *a, **k: made.append(self) or init(self, *a, **k))
    files, step = texts(12), tmp_path / "step"  # 6 batches of 2 files
    step.mkdir()
    spec = make_spec(tmp_path, files, **{"task.program_arguments": f"--step {step}"})

    def release(name):
        wait_for(lambda: (step / f"ran-{name}-1").exists(), f"{name}'s batch to start")
        (step / f"go-{name}").write_text("")

    job = raypar.run(spec, job_dir=str(tmp_path / "job"), echo=quiet, wait=False)  # the driver in a thread
    release("f000.txt")
    wait_for(lambda: made and made[0].written == 1, "batch 0 written while running")
    for name in ("f004.txt", "f006.txt", "f008.txt", "f010.txt"):  # free; f002.txt's batch 1 holds
        (step / f"go-{name}").write_text("")
    if ahead == "stops":
        wait_for(lambda: made[0].paused is not None, "the writing to stop")
    else:
        # Those of batches 2-5 that started: one the scheduler queued behind batch 1 (before batch 1
        # ran long) starts only once batch 1 ends, and must not be waited for here.
        started = lambda: sum((step / f"ran-{n}-1").exists() for n in ("f004.txt", "f006.txt", "f008.txt", "f010.txt"))  # noqa: E731
        wait_for(lambda: started() >= 3 and len(made[0].waiting) == started(), "batches 2-5 to wait for batch 1")
    release("f002.txt")
    outcome = job.wait()

    assert outcome.state is JobState.SUCCEEDED, outcome.reason
    assert output_lines(tmp_path) == expected_rows(files)
    [assembly] = made
    assert assembly.gave_up is None
    if ahead == "stops":
        assert assembly.paused.endswith("waited for mb-0000001")
        assert (assembly.written_while_running, assembly.written) == (1, 6)
    else:
        assert assembly.paused is None and (assembly.written_while_running, assembly.written) == (6, 6)
    assert assembly.published == (tmp_path / "out" / "parallel_run_step.txt").stat().st_size


def test_a_batch_queued_behind_a_straggler_is_taken_back_and_runs_once_on_an_idle_worker(ray_cluster, tmp_path):
    """Batch 1 holds until released. The calls queued behind it before it ran long are taken back
    for the workers that ran out of work: every other batch is done while it still holds, each ran
    once (one taken back under its next attempt number), and no try was spent."""
    from conftest import wait_for

    files, step = texts(24), tmp_path / "step"  # 12 batches of 2 files, on 3 workers
    step.mkdir()
    others = [f"f{i:03d}.txt" for i in range(0, 24, 2) if i != 2]
    for name in others:
        (step / f"go-{name}").write_text("")
    spec = make_spec(tmp_path, files, **{"task.program_arguments": f"--step {step}"})
    job = raypar.run(spec, job_dir=str(tmp_path / "job"), echo=quiet, wait=False)  # the driver in a thread
    ledger = Ledger(str(tmp_path / "job"))
    wait_for(lambda: len(ledger.view().done) == 11, "every batch but batch 1 done while batch 1 holds")
    assert (step / "ran-f002.txt-1").exists() and "mb-0000001" not in ledger.view().done
    (step / "go-f002.txt").write_text("")
    outcome = job.wait()

    assert outcome.state is JobState.SUCCEEDED, outcome.reason
    assert output_lines(tmp_path) == expected_rows(files)
    assert sorted(p.name for p in step.glob("ran-*")) == sorted(f"ran-{n}-1" for n in [*others, "f002.txt"])  # once each
    done = ledger.view().done
    taken = [batch for batch, record in done.items() if record.attempt == 2]  # its attempt 1 never began
    assert taken and all(done[b].worker != done["mb-0000001"].worker for b in taken)
    assert ledger.view().failed == {}


def test_a_part_that_fails_verification_at_assembly_runs_its_batch_again_and_the_output_is_exact(
        ray_cluster, tmp_path, monkeypatch):
    """Storage that changed a stored part's bytes: assembly names it, the driver voids its record and
    runs that batch alone again, under the next attempt number (the same one named the voided record,
    so the rerun's rows were voided too and left out of an output called succeeded), and the output
    holds every row once. A batch that failed for good is not tried again in that round."""
    files = texts(10, bad={6})
    log, spec, job, calls = job_with_batch_2_corrupted_at_assembly(tmp_path, monkeypatch, files, rounds=1)

    outcome = raypar.run(spec, job_dir=job, echo=quiet).wait()

    assert (outcome.state, outcome.completed, outcome.failed, outcome.pending) == (JobState.SUCCEEDED, 4, 1, 0)
    done = [f"mb-{i:07d}" for i in (0, 1, 2, 4)]
    assert calls == [done, done]  # assembled twice, the second time with the rerun's record
    runs = executions(log)
    assert runs.count(("f004.txt", "f005.txt")) == 2  # batch 2 ran again, once
    assert runs.count(("f006.txt", "f007.txt")) == 2  # batch 3's two tries, not tried again
    assert len(runs) == 7
    assert output_lines(tmp_path) == [row for row in expected_rows(files) if not row.startswith(("f006", "f007"))]
    view = Ledger(job).view()
    run = Ledger(job).read_state()["run"]
    assert os.listdir(Path(job) / "void") == [f"mb-0000002~{run}~1.json"]
    assert (view.done["mb-0000002"].run, view.done["mb-0000002"].attempt) == (run, 2)
    assert [r.attempt for r in view.failed["mb-0000003"]] == [1, 2]  # no second record under either key


def job_with_batch_2_corrupted_at_assembly(tmp_path, monkeypatch, files, rounds: int) -> tuple:
    """A job over ``files`` whose output is written after the last batch; for its first ``rounds``
    assemblies, the bytes of batch 2's rows change on disk after they were stored. Returns the exec
    log, the spec, the job dir, and the done batches each assembly is given (as it runs)."""
    from raypar.engine import driver

    log = tmp_path / "exec"
    log.mkdir()
    spec = make_spec(tmp_path, files, **{"task.program_arguments": f"--exec-log {log}",
                                         "raypar.assemble_while_running": False})

    calls = []
    assemble = driver.assemble

    def corrupting_assemble(ledger, view, *args, **kwargs):
        calls.append(sorted(view.done))
        if len(calls) <= rounds:
            record = view.done["mb-0000002"]
            path = Path(ledger.store.path("parts", record.part))
            data = bytearray(path.read_bytes())
            data[record.part_offset] ^= 0x20
            path.write_bytes(bytes(data))
        return assemble(ledger, view, *args, **kwargs)

    monkeypatch.setattr(driver, "assemble", corrupting_assemble)
    return log, spec, str(tmp_path / "job"), calls


def test_rows_that_keep_failing_verification_fail_the_job_which_resumes_to_the_exact_output(
        ray_cluster, tmp_path, monkeypatch):
    files = texts(10)
    log, spec, job, calls = job_with_batch_2_corrupted_at_assembly(tmp_path, monkeypatch, files, rounds=99)

    outcome = raypar.run(spec, job_dir=job, echo=quiet).wait()

    assert outcome.state is JobState.FAILED
    assert outcome.reason == "output parts keep failing verification (storage corrupting data?)"
    assert len(calls) == 3 and not (tmp_path / "out" / "parallel_run_step.txt").exists()
    assert executions(log).count(("f004.txt", "f005.txt")) == 3 and len(executions(log)) == 7  # 2 reruns
    assert len(os.listdir(Path(job) / "void")) == 3  # each round's try of batch 2, voided
    for p in log.iterdir():
        p.unlink()
    monkeypatch.undo()  # the storage is sound again

    resumed = raypar.resume(job, echo=quiet).wait()

    assert (resumed.state, resumed.completed) == (JobState.SUCCEEDED, 5)
    assert executions(log) == [("f004.txt", "f005.txt")]  # the one batch whose rows were voided
    assert output_lines(tmp_path) == expected_rows(files)


def test_a_session_compacts_its_failed_records_while_it_runs(ray_cluster, tmp_path, monkeypatch):
    """Every COMPACT_EVERY failed records stored, not only at the end: a driver killed later leaves
    at most that many for `raypar status` to read one by one."""
    import raypar.jobdir.ledger as ledger_module
    from raypar.engine import upkeep

    monkeypatch.setattr(upkeep, "COMPACT_EVERY", 2)
    monkeypatch.setattr(ledger_module, "FAILED_FLUSH_RECORDS", 1)  # each failed try stored at once
    states, hold = [], tmp_path / "hold"
    hold.mkdir()
    compact_failures = Ledger.compact_failures

    def compacting(self, run, **kw):
        states.append(self.read_state()["state"])
        compacted = compact_failures(self, run, **kw)
        if states[-1] == "running":
            (hold / "release").touch()  # the last batch waits for a compaction while the job runs
        return compacted

    monkeypatch.setattr(Ledger, "compact_failures", compacting)
    files = texts(12, bad={3, 8})
    spec = make_spec(tmp_path, files, **{"task.program_arguments": f"--hold-from f010.txt {hold}"})
    job = str(tmp_path / "job")

    outcome = raypar.run(spec, job_dir=job, echo=quiet).wait()

    assert (outcome.state, outcome.completed, outcome.failed) == (JobState.SUCCEEDED, 4, 2)
    assert "running" in states and states[-1] == "succeeded"  # during the session, and at its end
    index = [p for p in Ledger(job).store.list_files("failed-compact") if p.endswith(".idx")]
    assert json.loads(Path(index[0]).read_text())["rows"] == 4  # both tries of both bad batches
    assert [e["batch"] for e in job_status(job)["errors"]] == ["mb-0000001", "mb-0000004"]


def test_status_of_a_running_job_is_its_driver_s_count_and_after_it_the_ledger_s(ray_cluster, tmp_path, capsys):
    """While a driver runs the job, `raypar status` reads the counts its lease's heartbeat carries
    (one small object, however large the job): done, failed for good with their errors, pending."""
    hold = tmp_path / "hold"
    hold.mkdir()
    files = texts(8, bad={2})
    spec = make_spec(tmp_path, files, **{"task.program_arguments": f"--hold-from f006.txt {hold}",
                                         "raypar.lease_ttl": 3})  # a heartbeat a second
    job = str(tmp_path / "job")
    handle = raypar.run(spec, job_dir=job, echo=quiet, wait=False)
    try:
        def counted() -> dict:
            status = handle.status()
            return status if status.get("counted_by") == "driver" and status["completed"] == 2 \
                and status["failed"] == 1 else {}

        wait_for(lambda: counted() and list(hold.glob("holding-*")), "the driver's count of 2 done, 1 failed")
        status = counted()
        assert (status["state"], status["total"], status["pending"], status["failed_items"]) == ("running", 4, 1, 2)
        assert [(e["batch"], e["kind"]) for e in status["errors"]] == [("mb-0000001", "user")]
        assert status["errors"][0]["error"].strip().endswith("ValueError: cannot score f002.txt: bad record")
        shown = cli_in_process(capsys, "status", job).stdout
        assert re.search(r"batches:   2 done, 1 failed, 1 pending, 4 total \(the driver's count \d+s ago; "
                         r"--exact for what is stored\)", shown), shown
        assert "error:     mb-0000001 (user): ValueError: cannot score f002.txt: bad record" in shown
        # The workers' time so far: 3 instances of 1 slot, each started; one holds its batch now.
        assert status["worker_time"]["workers"] == 3 and status["worker_time"]["run()"] > 0, status
        assert re.search(r"^workers:   worker time so far \d+\.\d s over 3 worker\(s\): .*run\(\) ", shown, re.M), shown
        exact = json.loads(cli_in_process(capsys, "status", job, "--exact", "--json").stdout)
        # What is stored: records reach the ledger within a second or so of the driver counting them.
        assert (exact["counted_by"], exact["total"]) == ("ledger", 4) and exact["completed"] <= 2
    finally:
        (hold / "release").touch()
    outcome = handle.wait()

    assert (outcome.state, outcome.completed, outcome.failed) == (JobState.SUCCEEDED, 3, 1)
    after = job_status(job)
    assert (after["counted_by"], after["completed"], after["failed"], after["pending"]) == ("ledger", 3, 1, 0)
    assert after["errors"] == status["errors"]  # the driver kept the error the ledger holds
