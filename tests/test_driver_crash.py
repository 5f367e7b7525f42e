"""The driver dies (os._exit: no cleanup, like SIGKILL) at exact points of planning and
assembly; `raypar resume` must finish the job with the output of an uninterrupted run,
without re-running batches that were done."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import yaml
from conftest import cli_in_process, make_spec

from raypar.jobdir.ledger import Ledger

pytestmark = pytest.mark.timeout(240)

# Runs `raypar run` in a fresh interpreter whose CRASH_POINT patch kills the process.
LAUNCHER = textwrap.dedent("""
    import os, sys
    import raypar.jobdir.ledger as ledger
    import raypar.outputs.assembly as outputs
    import raypar.engine.driver as driver

    def die():
        os._exit(9)

    point = os.environ["CRASH_POINT"]
    if point == "listing":  # the first batch ran while the input was still being listed
        import time
        import raypar.inputs.source as source
        files = source.Source.files
        done = os.path.join(sys.argv[sys.argv.index("--job-dir") + 1], "done")
        def first_batch_done():
            return os.path.isdir(done) and any(os.path.getsize(os.path.join(done, f)) for f in os.listdir(done))
        def slow_listing(self):
            for i, name in enumerate(files(self)):
                if i == 2:  # batch mb-0000000 (2 files) is planned: wait until it has run, then die
                    deadline = time.time() + 120
                    while not first_batch_done() and time.time() < deadline:
                        time.sleep(0.05)
                    die()
                yield name
        source.Source.files = slow_listing
    elif point in ("assembly", "live-assembly"):  # half of the output written to its temp file
        write = outputs.TextSink.write
        calls = []
        def crashing_write(self, data, batch):
            calls.append(batch)
            if len(calls) == 3:
                self.out.flush()
                die()
            return write(self, data, batch)
        outputs.TextSink.write = crashing_write
    elif point == "output-part-uploaded":  # a remote output's first part is on S3, the rest is not
        import s3fs
        import raypar.held_upload as held
        held.PART_BYTES = 5 << 20
        upload = s3fs.core.S3File._upload_chunk
        def crashing_upload(self, final=False):
            result = upload(self, final)
            if self.parts:
                die()
            return result
        s3fs.core.S3File._upload_chunk = crashing_upload
    elif point == "compaction":  # the compact's .arrow stored, its .idx (which makes it count) not
        import raypar.jobdir.store as store
        write_atomic = store.Store.write_atomic
        def crashing_write_atomic(self, data, *parts):
            if parts[0] == "compact" and parts[-1].endswith(".idx"):
                die()
            return write_atomic(self, data, *parts)
        store.Store.write_atomic = crashing_write_atomic
    elif point == "failed-compaction":  # the failed records' columns and tracebacks stored, their .idx not
        import raypar.jobdir.store as store
        write_atomic = store.Store.write_atomic
        def crashing_write_atomic(self, data, *parts):
            if parts[0] == "failed-compact" and parts[-1].endswith(".idx"):
                die()
            return write_atomic(self, data, *parts)
        store.Store.write_atomic = crashing_write_atomic
    elif point == "failed-gathered":  # a batch's last try failed: its record gathered, not stored
        import raypar.jobdir.writers as writers
        add = writers.FailedLog.add
        def crashing_add(self, body):
            add(self, body)
            if body["final"]:
                die()
        writers.FailedLog.add = crashing_add
    elif point == "after-assembly":  # output published, state not yet written
        set_state = driver._set_state
        def crashing_set_state(ledger_, new, run, reason=""):
            if new.value == "succeeded":
                die()
            return set_state(ledger_, new, run, reason)
        driver._set_state = crashing_set_state

    from raypar.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def run_cli(args, crash_point=None, cluster=None):
    """The CLI in a fresh process; with ``cluster``, on that Ray (``--address``), not an embedded one."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if cluster is not None:
        args = [*args, "--address", cluster.address]
    if crash_point:
        env["CRASH_POINT"] = crash_point
        cmd = [sys.executable, "-c", LAUNCHER, *args]
    else:
        cmd = [sys.executable, "-m", "raypar.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)


def job_files(tmp_path, live=False):
    """``live``: the output is written while batches run; else after the last, so that a crash
    while writing it comes after every batch was done."""
    files = {f"f{i:02d}.txt": f"v{i}" for i in range(10)}
    log = tmp_path / "exec"
    log.mkdir()
    spec = make_spec(tmp_path, files, mini_batch_size="2", **{
        "resources.instance_count": 1, "task.program_arguments": f"--exec-log {log}",
        "raypar.assemble_while_running": live,
    })
    path = tmp_path / "job.yml"
    path.write_text(yaml.safe_dump(spec))
    return files, log, path


def executed(log):
    return sorted(p.read_text() for p in log.iterdir())


def resumes_exactly(job, log, files, output, completed, cluster) -> None:
    """A resume after a killed driver: only the batches not done ran, every row is in the output
    once, in order, and no temp file is left."""
    for p in log.iterdir():
        p.unlink()
    resumed = run_cli(["resume", job], cluster=cluster)
    assert resumed.returncode == 0, resumed.stderr
    assert len(executed(log)) == 5 - completed  # only what was not done ran again
    assert output.read_text().splitlines() == [f"{n} {t.upper()}" for n, t in sorted(files.items())]
    assert os.listdir(output.parent) == [output.name]


@pytest.mark.parametrize("point, reran", [
    ("listing", 4),         # batch 0 ran before listing finished: the other 4 run, after listing again
    ("assembly", 0),        # every batch was done: resume only assembles
    ("after-assembly", 0),
])
def test_driver_killed_at_an_exact_point_resumes_to_the_same_output(ray_cluster, tmp_path, capsys, point, reran):
    files, log, spec_path = job_files(tmp_path)
    job = str(tmp_path / "job")
    output = tmp_path / "out" / "parallel_run_step.txt"

    crashed = run_cli(["run", str(spec_path), "--job-dir", job], crash_point=point, cluster=ray_cluster)

    assert crashed.returncode == 9, crashed.stderr
    if point != "after-assembly":
        assert not output.exists()  # never a partial output file
    status = json.loads(cli_in_process(capsys, "status", job, "--json").stdout)
    assert status["state"] == "interrupted"
    if point == "listing":  # status shows the plan so far
        assert (status["planning_complete"], status["total"], status["completed"]) == (False, 1, 1)
    ran_before = executed(log)
    for p in log.iterdir():
        p.unlink()

    resumed = run_cli(["resume", job], cluster=ray_cluster)

    assert resumed.returncode == 0, resumed.stderr
    assert len(executed(log)) == reran
    if point == "listing":
        assert len(ran_before) == 1 and "f00.txt" in ran_before[0], ran_before
    else:
        assert len(ran_before) == 5  # the crash came after every batch was done once
    assert output.read_text().splitlines() == [f"{n} {t.upper()}" for n, t in sorted(files.items())]
    assert os.listdir(output.parent) == [output.name]  # no temp file left behind


def test_driver_killed_while_writing_the_output_during_the_run_resumes_to_the_same_output(
        ray_cluster, tmp_path, capsys):
    files, log, spec_path = job_files(tmp_path, live=True)
    job = str(tmp_path / "job")
    output = tmp_path / "out" / "parallel_run_step.txt"

    crashed = run_cli(["run", str(spec_path), "--job-dir", job], crash_point="live-assembly", cluster=ray_cluster)

    assert crashed.returncode == 9, crashed.stderr
    assert not output.exists()  # never a partial output file (its temp file goes with the next session)
    status = json.loads(cli_in_process(capsys, "status", job, "--json").stdout)
    assert status["state"] == "interrupted" and status["completed"] >= 3  # the 3rd part was being written
    resumes_exactly(job, log, files, output, status["completed"], ray_cluster)


def test_driver_killed_while_a_resume_writes_the_rows_done_before_it_resumes_to_the_same_output(
        ray_cluster, tmp_path, capsys):
    """A resume writes its output while its batches run, beginning with the rows of the batches done
    before it: killed while writing them, it leaves no output and no temp file, and the next resume
    runs only what is not done and writes every row once."""
    files = {f"f{i:02d}.txt": ("bad v" if i == 8 else "v") + str(i) for i in range(10)}
    log, fixed = tmp_path / "exec", tmp_path / "fixed"
    log.mkdir()
    spec = make_spec(tmp_path, files, mini_batch_size="2", **{
        "resources.instance_count": 1, "task.program_arguments": f"--exec-log {log} --fixed-flag {fixed}",
        "raypar.assemble_while_running": True})
    (tmp_path / "job.yml").write_text(yaml.safe_dump(spec))
    job = str(tmp_path / "job")
    output = tmp_path / "out" / "parallel_run_step.txt"
    first = run_cli(["run", str(tmp_path / "job.yml"), "--job-dir", job], cluster=ray_cluster)
    assert first.returncode == 0, first.stderr  # batch 4 (f08, f09) failed, within the thresholds
    fixed.touch()

    second = run_cli(["resume", job], crash_point="live-assembly", cluster=ray_cluster)  # dies on the 3rd part

    assert second.returncode == 9, second.stderr  # killed writing batch 2's part, done before the resume
    assert "f08.txt" not in output.read_text()  # the first session's output stays until a session replaces it
    status = json.loads(cli_in_process(capsys, "status", job, "--json").stdout)
    assert status["state"] == "interrupted"
    resumes_exactly(job, log, files, output, status["completed"], ray_cluster)


def job_with_a_bad_batch(tmp_path):
    """Batch mb-0000002 (f04.txt) fails every try until the ``fixed`` file exists."""
    files = {f"f{i:02d}.txt": ("bad v" if i == 4 else "v") + str(i) for i in range(10)}
    log, fixed = tmp_path / "exec", tmp_path / "fixed"
    log.mkdir()
    spec = make_spec(tmp_path, files, mini_batch_size="2", **{
        "resources.instance_count": 1, "task.program_arguments": f"--exec-log {log} --fixed-flag {fixed}"})
    (tmp_path / "job.yml").write_text(yaml.safe_dump(spec))
    return files, log, fixed, str(tmp_path / "job"), tmp_path / "out" / "parallel_run_step.txt"


def test_driver_killed_with_failed_tries_not_yet_stored_resumes_to_the_same_output(ray_cluster, tmp_path, capsys):
    files, log, fixed, job, output = job_with_a_bad_batch(tmp_path)

    crashed = run_cli(["run", str(tmp_path / "job.yml"), "--job-dir", job], crash_point="failed-gathered",
                      cluster=ray_cluster)

    assert crashed.returncode == 9, crashed.stderr
    assert not output.exists()
    status = json.loads(cli_in_process(capsys, "status", job, "--json").stdout)
    # The driver died holding the failed tries of batch 2: lost with it, so the batch is pending,
    # not failed; what was done stays done.
    assert status["state"] == "interrupted" and status["failed"] == 0 and status["completed"] < 5
    assert sum("f04.txt" in t for t in executed(log)) == 2  # both tries ran
    for p in log.iterdir():
        p.unlink()
    fixed.touch()

    resumed = run_cli(["resume", job], cluster=ray_cluster)

    assert resumed.returncode == 0, resumed.stderr
    assert len(executed(log)) == 5 - status["completed"] and any("f04.txt" in t for t in executed(log))
    assert output.read_text().splitlines() == [f"{n} {t.upper()}" for n, t in sorted(files.items())]


def test_driver_killed_while_compacting_failed_records_leaves_them_readable_and_resumes_exactly(
        ray_cluster, tmp_path, capsys):
    """Killed after the failed records' columns and tracebacks were stored, before the index that
    makes them count: status still shows every failure from the records, and the resume runs only the
    failed batch, compacts again and removes what the killed driver left."""
    files, log, fixed, job, output = job_with_a_bad_batch(tmp_path)  # (on Azurite: test_storage_contract.py)

    def compacted() -> list[str]:
        return [p.rsplit("/", 1)[-1] for p in Ledger(job).store.list_files("failed-compact")]

    crashed = run_cli(["run", str(tmp_path / "job.yml"), "--job-dir", job], crash_point="failed-compaction",
                      cluster=ray_cluster)

    assert crashed.returncode == 9, crashed.stderr
    left = compacted()
    assert left and not any(n.endswith(".idx") for n in left)  # its columns and tracebacks, not its index
    status = json.loads(cli_in_process(capsys, "status", job, "--json").stdout)
    assert (status["completed"], status["failed"]) == (4, 1)
    assert [e["batch"] for e in status["errors"]] == ["mb-0000002"] and "f04.txt" in status["errors"][0]["error"]
    for p in log.iterdir():
        p.unlink()
    fixed.touch()

    resumed = run_cli(["resume", job], cluster=ray_cluster)

    assert resumed.returncode == 0, resumed.stderr
    assert [t for t in executed(log) if "f04.txt" in t] == executed(log) and len(executed(log)) == 1
    assert output.read_text().splitlines() == [f"{n} {t.upper()}" for n, t in sorted(files.items())]
    now = compacted()
    assert not set(left) & set(now) and any(n.endswith(".idx") for n in now)  # compacted again, leftovers gone
    status = json.loads(cli_in_process(capsys, "status", job, "--json").stdout)
    assert (status["state"], status["completed"], status["failed"]) == ("succeeded", 5, 0)
    errors = Ledger(job).store.read_bytes("reports", "errors.txt").decode()
    assert errors.count("=== mb-0000002 run ") == 2  # the first session's two failed tries, still reported


def test_a_resume_of_an_unfinished_plan_writes_its_output_while_its_batches_run(ray_cluster, tmp_path, monkeypatch):
    """The first session dies while the input is still listed: the resume plans while it runs, and
    writes the output as its batches are stored (it wrote it after the last one before)."""
    from conftest import quiet

    import raypar
    from raypar.outputs import live as live_assembly

    made = []
    init = live_assembly.LiveAssembly.__init__
    monkeypatch.setattr(live_assembly.LiveAssembly, "__init__",
                        lambda self, *a, **k: made.append(self) or init(self, *a, **k))
    files, log, spec_path = job_files(tmp_path, live=True)
    job = str(tmp_path / "job")
    crashed = run_cli(["run", str(spec_path), "--job-dir", job], crash_point="listing", cluster=ray_cluster)
    assert crashed.returncode == 9, crashed.stderr
    before = len(executed(log))
    assert before >= 1
    for p in log.iterdir():
        p.unlink()

    outcome = raypar.resume(job, echo=quiet).wait()

    assert (outcome.state.value, outcome.completed) == ("succeeded", 5)
    assert len(executed(log)) == 5 - before  # the batches done before it did not run again
    [resumed] = made
    assert resumed.resumed is not None and resumed.gave_up is None and resumed.paused is None
    assert resumed.written_while_running == resumed.written == 5
    output = tmp_path / "out" / "parallel_run_step.txt"
    assert output.read_text().splitlines() == [f"{n} {t.upper()}" for n, t in sorted(files.items())]
    assert os.listdir(output.parent) == [output.name]


def test_resume_of_an_unfinished_plan_refuses_an_input_that_changed(ray_cluster, tmp_path, capsys):
    files, log, spec_path = job_files(tmp_path)
    job = str(tmp_path / "job")
    crashed = run_cli(["run", str(spec_path), "--job-dir", job], crash_point="listing", cluster=ray_cluster)
    assert crashed.returncode == 9, crashed.stderr
    (tmp_path / "data" / "f00.txt").unlink()  # the first batch is planned differently now

    resumed = run_cli(["resume", job], cluster=ray_cluster)

    assert resumed.returncode == 1
    status = json.loads(cli_in_process(capsys, "status", job, "--json").stdout)
    assert status["state"] == "failed"
    assert "planning failed: the input changed since this job started planning (mb-0000000 differs)" \
        in status["reason"]


@pytest.mark.parametrize("store, point, state", [  # (local, assembly) is above
    ("azurite", "assembly", "interrupted"), ("local", "compaction", "succeeded"), ("azurite", "compaction", "succeeded")])
def test_driver_killed_while_assembling_or_compacting_leaves_a_job_that_resumes_exactly(
        ray_cluster, tmp_path, request, monkeypatch, capsys, store, point, state):
    files, log, spec_path = job_files(tmp_path)
    if store == "azurite":
        azurite = request.getfixturevalue("azurite")
        monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite.connection_string)
        job = f"az://{azurite.new_container()}/jobs/j1"
    else:
        job = str(tmp_path / "job")
    output = tmp_path / "out" / "parallel_run_step.txt"

    crashed = run_cli(["run", str(spec_path), "--job-dir", job], crash_point=point, cluster=ray_cluster)

    assert crashed.returncode == 9, crashed.stderr
    assert output.exists() == (point == "compaction")  # assembly never leaves a partial output
    status = json.loads(cli_in_process(capsys, "status", job, "--json").stdout)
    assert (status["state"], status["completed"], status["pending"]) == (state, 5, 0)
    for p in log.iterdir():
        p.unlink()

    resumed = run_cli(["resume", job], cluster=ray_cluster)

    assert resumed.returncode == 0, resumed.stderr
    assert executed(log) == []  # every batch was stored before the crash: nothing runs again
    assert output.read_text().splitlines() == [f"{n} {t.upper()}" for n, t in sorted(files.items())]
    assert os.listdir(output.parent) == [output.name]


def test_driver_killed_while_uploading_the_output_leaves_nothing_visible_and_resumes_exactly(
        ray_cluster, tmp_path, s3_server, monkeypatch, capsys):
    """A remote output is uploaded while batches run: the upload a killed driver leaves is never
    visible, and the resumed driver's output replaces it whole (its parts aborted, not billed)."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    bucket = s3_server.new_bucket()
    files = {f"f{i:02d}.txt": f"v{i} " + "x" * (1 << 20) for i in range(10)}  # a row of 1 MiB per file
    log = tmp_path / "exec"
    log.mkdir()
    spec = make_spec(tmp_path, files, **{
        "resources.instance_count": 1, "task.program_arguments": f"--exec-log {log}",
        "outputs.out": {"type": "uri_folder", "path": f"s3://{bucket}/out"},
    })
    spec_path = tmp_path / "job.yml"
    spec_path.write_text(yaml.safe_dump(spec))
    job = str(tmp_path / "job")
    fs = s3_server.filesystem()
    key = "out/parallel_run_step.txt"

    crashed = run_cli(["run", str(spec_path), "--job-dir", job], crash_point="output-part-uploaded",
                      cluster=ray_cluster)

    assert crashed.returncode == 9, crashed.stderr
    assert not fs.exists(f"{bucket}/{key}")  # never a partial output
    uploads = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key).get("Uploads", [])
    assert len(uploads) == 1  # what the killed driver had sent
    status = json.loads(cli_in_process(capsys, "status", job, "--json").stdout)
    assert status["state"] == "interrupted" and status["completed"] >= 3  # 5 MiB of rows were written
    for p in log.iterdir():
        p.unlink()

    resumed = run_cli(["resume", job], cluster=ray_cluster)

    assert resumed.returncode == 0, resumed.stderr
    assert len(executed(log)) == 5 - status["completed"]  # only what was not done ran again
    rows = fs.cat_file(f"{bucket}/{key}").decode().splitlines()
    assert rows == [f"{n} {t.upper()}" for n, t in sorted(files.items())]
    assert fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key).get("Uploads", []) == []
