"""Incremental runs: the same spec run again on the same job dir over an input that grew plans
only the files not yet planned, after all the others; the output holds old and new rows exactly
once. On the 3-node loopback cluster; a files folder and an MLTable on local disk, a table folder
on Azure Blob (Azurite)."""

import json
import subprocess
import sys

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import make_spec, quiet

import raypar
from raypar.jobdir.state import JobState

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]


def ran(log):
    names = sorted(tuple(p.read_text().split()) for p in log.iterdir())
    for p in log.iterdir():
        p.unlink()
    return names


def status_of(job):
    out = subprocess.run([sys.executable, "-m", "raypar", "status", job, "--json"], capture_output=True, text=True,
                         timeout=120)
    return json.loads(out.stdout)


def test_a_grown_files_folder_runs_only_the_new_files_and_the_changed_one(ray_cluster, tmp_path):
    files = {f"f{i:02d}.txt": f"value {i}" for i in range(12)}
    log = tmp_path / "exec"
    log.mkdir()
    spec = make_spec(tmp_path, files, **{"task.program_arguments": f"--exec-log {log}"})
    job = str(tmp_path / "job")
    assert raypar.run(spec, job_dir=job, echo=quiet).wait().state is JobState.SUCCEEDED
    assert len(ran(log)) == 6

    data = tmp_path / "data"
    for i in (12, 13, 14):
        (data / f"f{i:02d}.txt").write_text(f"new {i}")
    (data / "f05.txt").write_text("value 5, fixed")  # changed: its batch runs again, in its place
    said = []
    resumed = raypar.resume(job, echo=said.append).wait()  # a resume does not grow the job
    assert resumed.state is JobState.SUCCEEDED
    assert ran(log) == [("f04.txt", "f05.txt")]
    assert any("3 input file(s) added after this job was planned are not part of it" in s for s in said)

    said = []
    grown = raypar.run(spec, job_dir=job, echo=said.append).wait()

    assert grown.state is JobState.SUCCEEDED, grown.reason
    assert ran(log) == [("f12.txt", "f13.txt"), ("f14.txt",)]  # only the new files
    assert any("3 input file(s) added since the job was planned (" in s and "2 new mini-batch(es)" in s
               for s in said)
    rows = (tmp_path / "out" / "parallel_run_step.txt").read_text().splitlines()
    texts = {**files, "f05.txt": "value 5, fixed", **{f"f{i:02d}.txt": f"new {i}" for i in (12, 13, 14)}}
    assert rows == [f"{name} {texts[name].upper()}" for name in sorted(texts)]  # new rows after the others
    status = status_of(job)
    assert (status["completed"], status["total"]) == (8, 8)
    assert status["last_added"]["files"] == ["f12.txt", "f13.txt", "f14.txt"]
    assert status["last_added"]["batches"] == 2

    again = raypar.run(spec, job_dir=job, echo=quiet).wait()  # nothing new: nothing runs, output kept
    assert again.state is JobState.SUCCEEDED and ran(log) == []
    assert (tmp_path / "out" / "parallel_run_step.txt").read_text().splitlines() == rows


def test_a_grown_table_folder_on_azure_blob_appends_the_new_files_rows(ray_cluster, azurite, tmp_path, monkeypatch):
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite.connection_string)
    container = azurite.new_container()
    fs = fsspec.filesystem("az", connection_string=azurite.connection_string, use_listings_cache=False)

    def put(name, ids):
        local = tmp_path / name
        pq.write_table(pa.table({"id": ids, "x": [i * 0.5 for i in ids]}), local, row_group_size=100)
        fs.put_file(str(local), f"{container}/tables/{name}")

    put("part-0.parquet", list(range(0, 300)))
    (tmp_path / "exec").mkdir()
    spec = make_spec(tmp_path, {}, **{
        "inputs.data": {"type": "uri_folder", "path": f"az://{container}/tables"},
        "outputs.out": {"type": "uri_folder", "path": f"az://{container}/scores"},
        "mini_batch_size": "2kb", "task.entry_script": "table_score.py",
        "task.program_arguments": f"--exec-log {tmp_path / 'exec'}", "raypar.append_row_format": "parquet",
    })
    job = f"az://{container}/jobs/grow"
    first = raypar.run(spec, job_dir=job, echo=quiet).wait()
    assert first.state is JobState.SUCCEEDED
    put("part-1.parquet", list(range(300, 500)))
    for p in (tmp_path / "exec").iterdir():
        p.unlink()

    grown = raypar.run(spec, job_dir=job, echo=quiet).wait()

    assert grown.state is JobState.SUCCEEDED, grown.reason
    assert sum(int(p.read_text()) for p in (tmp_path / "exec").iterdir()) == 200  # only the new file's rows ran
    with fs.open(f"{container}/scores/parallel_run_step.parquet", "rb") as f:
        assert pq.read_table(f).column("id").to_pylist() == list(range(500))
    assert grown.total > first.total and grown.completed == grown.total  # the new batches counted, all done


def test_an_mltable_whose_folder_grew_appends_the_new_files_rows(ray_cluster, tmp_path):
    folder = tmp_path / "table"
    (folder / "rows").mkdir(parents=True)
    (folder / "rows" / "a.csv").write_text("id,x\n" + "".join(f"{i},{i * 0.5}\n" for i in range(50)))
    (folder / "MLTable").write_text(yaml.safe_dump({
        "paths": [{"folder": "./rows"}], "transformations": [{"read_delimited": {"delimiter": ","}}]}))
    spec = make_spec(tmp_path, {}, **{
        "inputs.data": {"type": "mltable", "path": str(folder)},
        "mini_batch_size": "1kb", "task.entry_script": "table_score.py", "raypar.append_row_format": "csv",
    })
    job = str(tmp_path / "job")
    assert raypar.run(spec, job_dir=job, echo=quiet).wait().state is JobState.SUCCEEDED
    (folder / "rows" / "b.csv").write_text("id,x\n" + "".join(f"{i},{i * 0.5}\n" for i in range(50, 80)))

    said = []
    grown = raypar.run(spec, job_dir=job, echo=said.append).wait()

    assert grown.state is JobState.SUCCEEDED, grown.reason
    assert any("1 input file(s) added since the job was planned" in s for s in said), said
    lines = (tmp_path / "out" / "parallel_run_step.csv").read_text().splitlines()
    assert [int(line.split(",")[0]) for line in lines[1:]] == list(range(80))
