"""Failed items out and back in: run() reports items that failed (raypar.item_failed), raypar
records them with their batch, `raypar failed` writes them (and the items of failed batches)
as a new job's input, and that job runs exactly them. On the 3-node loopback cluster."""

import io
import json
import subprocess
import sys

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_spec, quiet

import raypar
from raypar.jobdir.state import JobState
from raypar.worker import items

pytestmark = pytest.mark.timeout(240)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "raypar", *args], capture_output=True, text=True, timeout=120)


def texts(count, flaky=(), bad=()):
    return {f"f{i:02d}.txt": ("flaky " if i in flaky else "bad " if i in bad else "") + f"value {i}"
            for i in range(count)}


def flaky_table_job(tmp_path, rows: int) -> dict:
    """A parquet table of ``rows`` rows (id, x) whose rows with id % 50 == 7 run() reports failed."""
    (tmp_path / "tables").mkdir()
    pq.write_table(pa.table({"id": range(rows), "x": [i * 0.5 for i in range(rows)]}),
                   tmp_path / "tables" / "t.parquet", row_group_size=50)
    return make_spec(tmp_path, {}, **{
        "inputs.data": {"type": "uri_folder", "path": str(tmp_path / "tables")},
        "mini_batch_size": "2kb", "task.entry_script": "table_score.py",
        "task.program_arguments": "--report-every 50", "error_threshold": -1,
        "raypar.append_row_format": "parquet",
    })


@pytest.mark.ray
def test_reported_files_and_a_failed_batch_come_out_and_run_again_as_a_new_job(ray_cluster, tmp_path):
    files = texts(12, flaky={3, 8}, bad={10})  # f10 fails its whole batch (f10, f11)
    spec = make_spec(tmp_path, files, **{
        "task.program_arguments": "--report-flaky", "retry_settings.max_retries": 0,
        "mini_batch_error_threshold": -1, "error_threshold": -1,
    })
    job = str(tmp_path / "job")

    outcome = raypar.run(spec, job_dir=job, echo=quiet).wait()

    assert outcome.state is JobState.SUCCEEDED and outcome.failed == 1
    rows = (tmp_path / "out" / "parallel_run_step.txt").read_text().splitlines()
    assert [r.split()[0] for r in rows] == [f"f{i:02d}.txt" for i in range(10) if i not in (3, 8)]
    status = json.loads(cli("status", job, "--json").stdout)
    assert status["failed_items"] == 4  # 2 reported + the 2 files of the failed batch

    listed = cli("failed", job)
    assert listed.returncode == 0, listed.stderr
    data = tmp_path / "data"
    assert listed.stdout.splitlines() == [str(data / n) for n in ("f03.txt", "f08.txt", "f10.txt", "f11.txt")]
    assert "4 failed file(s) written to stdout (txt)" in listed.stderr

    table = cli("failed", job, "--format", "csv")
    frame = pd.read_csv(io.StringIO(table.stdout))
    assert frame["raypar_error"].tolist() == ["ValueError: cannot score f03.txt: flaky record",
                                              "ValueError: cannot score f08.txt: flaky record",
                                              "ValueError: cannot score f10.txt: bad record",
                                              "ValueError: cannot score f10.txt: bad record"]
    assert frame["raypar_batch"].tolist() == ["mb-0000001", "mb-0000004", "mb-0000005", "mb-0000005"]

    # The MLTable folder is directly the input of a job that runs exactly those files.
    retry = tmp_path / "retry"
    exported = cli("failed", job, "--format", "mltable", "-o", str(retry))
    assert exported.returncode == 0, exported.stderr
    (tmp_path / "fixed").touch()
    log = tmp_path / "exec"
    log.mkdir()
    again = make_spec(tmp_path, {}, **{
        "inputs.data": {"type": "mltable", "path": str(retry)},
        "outputs.out": {"type": "uri_folder", "path": str(tmp_path / "out2")},
        "task.program_arguments": f"--report-flaky --fixed-flag {tmp_path / 'fixed'} --exec-log {log}",
    })
    second = raypar.run(again, job_dir=str(tmp_path / "job2"), echo=quiet).wait()
    assert second.state is JobState.SUCCEEDED, second.reason
    ran = sorted(n for p in log.iterdir() for n in p.read_text().split())
    assert ran == ["f03.txt", "f08.txt", "f10.txt", "f11.txt"]
    assert (tmp_path / "out2" / "parallel_run_step.txt").read_text().splitlines() == [
        f"{n} {files[n].upper()}" for n in ran]
    assert cli("failed", str(tmp_path / "job2")).stdout == ""  # nothing failed this time


@pytest.mark.ray
def test_reported_rows_of_a_table_come_out_with_their_columns_and_run_again(ray_cluster, tmp_path):
    spec = flaky_table_job(tmp_path, 400)
    job = str(tmp_path / "job")

    outcome = raypar.run(spec, job_dir=job, echo=quiet).wait()

    assert outcome.state is JobState.SUCCEEDED
    flaky = [i for i in range(400) if i % 50 == 7]
    scored = pq.read_table(tmp_path / "out" / "parallel_run_step.parquet")
    assert scored.column("id").to_pylist() == [i for i in range(400) if i % 50 != 7]

    retry = tmp_path / "retry"
    exported = cli("failed", job, "--format", "mltable", "-o", str(retry))
    assert exported.returncode == 0, exported.stderr
    assert f"{len(flaky)} failed row(s)" in exported.stderr
    rows = pq.read_table(retry / "failed_items.parquet")
    assert rows.column("id").to_pylist() == flaky and rows.column("x").to_pylist() == [i * 0.5 for i in flaky]
    assert set(rows.column("raypar_error").to_pylist()) == {"ValueError: flaky row"}

    again = make_spec(tmp_path, {}, **{
        "inputs.data": {"type": "mltable", "path": str(retry)},
        "outputs.out": {"type": "uri_folder", "path": str(tmp_path / "out2")},
        "mini_batch_size": "2kb", "task.entry_script": "table_score.py",
        "raypar.append_row_format": "parquet",
    })
    second = raypar.run(again, job_dir=str(tmp_path / "job2"), echo=quiet).wait()
    assert second.state is JobState.SUCCEEDED, second.reason
    rescored = pq.read_table(tmp_path / "out2" / "parallel_run_step.parquet")
    assert rescored.column("id").to_pylist() == flaky
    assert rescored.column("double").to_pylist() == [i * 1.0 for i in flaky]


@pytest.mark.ray
def test_resume_retries_just_the_reported_items_and_the_output_holds_every_row_once(ray_cluster, tmp_path,
                                                                                    monkeypatch):
    from raypar.outputs import live as live_assembly

    made = []
    init = live_assembly.LiveAssembly.__init__
    monkeypatch.setattr(live_assembly.LiveAssembly, "__init__",
                        lambda self, *a, **k: made.append(self) or init(self, *a, **k))
    files = texts(12, flaky={3, 8})
    log, fixed = tmp_path / "exec", tmp_path / "fixed"
    log.mkdir()
    spec = make_spec(tmp_path, files, **{
        "task.program_arguments": f"--report-flaky --fixed-flag {fixed} --exec-log {log}", "error_threshold": -1,
    })
    job = str(tmp_path / "job")
    assert raypar.run(spec, job_dir=job, echo=quiet).wait().state is JobState.SUCCEEDED
    for p in log.iterdir():
        p.unlink()
    fixed.touch()  # the cause is fixed: the flaky files score now
    said = []

    resumed = raypar.resume(job, echo=said.append, retry_failed_items=True).wait()

    assert resumed.state is JobState.SUCCEEDED, resumed.reason
    assert "raypar: 2 item(s) reported failed in 2 done mini-batch(es) run again" in "\n".join(said)
    assert sorted(n for p in log.iterdir() for n in p.read_text().split()) == ["f03.txt", "f08.txt"]  # just them
    rows = (tmp_path / "out" / "parallel_run_step.txt").read_text().splitlines()
    # Each retried item's row follows the rows of the batch it was in.
    order = ["f00", "f01", "f02", "f03", "f04", "f05", "f06", "f07", "f09", "f08", "f10", "f11"]
    assert [r.split()[0] for r in rows] == [f"{n}.txt" for n in order]
    assert rows == [f"{n}.txt {files[n + '.txt'].upper()}" for n in order]
    retried = made[-1]  # written while the two retry batches ran, in the output order of the revision
    assert retried.place_of is not None and retried.gave_up is None
    assert retried.written_while_running == retried.written == 8
    status = json.loads(cli("status", job, "--json").stdout)
    # 6 batches of 2 files; each of the 2 with a reported item became a carry and a retry batch.
    assert (status["completed"], status["total"], status["failed_items"]) == (6 - 2 + 4, 6 - 2 + 4, 0)
    assert cli("failed", job).stdout == ""

    nothing = []
    again = raypar.resume(job, echo=nothing.append, retry_failed_items=True).wait()
    assert again.state is JobState.SUCCEEDED
    assert any("nothing to retry item by item" in line for line in nothing)
    assert (tmp_path / "out" / "parallel_run_step.txt").read_text().splitlines() == rows


@pytest.mark.ray
def test_retried_table_rows_that_fail_again_are_reported_again(ray_cluster, tmp_path):
    spec = flaky_table_job(tmp_path, 200)
    job = str(tmp_path / "job")
    assert raypar.run(spec, job_dir=job, echo=quiet).wait().state is JobState.SUCCEEDED

    resumed = raypar.resume(job, echo=quiet, retry_failed_items=True).wait()  # not fixed: they fail again

    assert resumed.state is JobState.SUCCEEDED
    scored = pq.read_table(tmp_path / "out" / "parallel_run_step.parquet")
    assert scored.column("id").to_pylist() == [i for i in range(200) if i % 50 != 7]
    exported = cli("failed", job, "--format", "csv")
    frame = pd.read_csv(io.StringIO(exported.stdout))
    assert frame["id"].tolist() == [7, 57, 107, 157]  # reported again, by the retry batches


def test_txt_is_refused_for_rows_and_parquet_needs_a_target():
    from raypar.engine.failed_export import FailedItems, write
    from raypar.errors import UsageError

    rows = FailedItems(kind="table")
    with pytest.raises(UsageError, match="--format txt lists files; this job's failed items are table rows"):
        write(rows, "txt", None)
    with pytest.raises(UsageError, match="--format parquet writes a file: give it with -o"):
        write(rows, "parquet", None)


def test_item_failed_names_items_by_path_place_or_slice_and_refuses_others():
    paths = ["/in/a.txt", "/in/b.txt"]
    collected = items.collect("files", paths)
    try:
        raypar.item_failed("/in/b.txt", KeyError("no field"))
        raypar.item_failed(0, "plain text")
        with pytest.raises(ValueError, match="'/in/c.txt' is not one of this mini-batch's files"):
            raypar.item_failed("/in/c.txt", "x")
    finally:
        items.stop()
    assert collected.record_fields() == {
        "reported": 2, "failed": json.dumps({"KeyError: 'no field'": [1], "plain text": [0]}, sort_keys=True)}

    import numpy as np

    frame = pd.DataFrame({"id": range(5)})
    collected = items.collect("table", frame)
    try:
        raypar.item_failed(frame[frame["id"] >= 3], "late")
        raypar.item_failed(np.int64(0), "first")
        with pytest.raises(ValueError, match="names no item of this mini-batch .5 rows: a place 0 to 4"):
            raypar.item_failed(5, "x")
    finally:
        items.stop()
    assert collected.record_fields()["reported"] == 3
    with pytest.raises(RuntimeError, match="call it from run.. in a raypar worker"):
        raypar.item_failed(0, "outside run()")
