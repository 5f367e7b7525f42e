"""Jobs whose input, output and job dir are all on S3 (moto's server) or GCS
(gcp-storage-emulator), run on the 3-node loopback cluster: exact output, a resume re-runs
only what did not finish, tables are read by ranges. The driver finds the credentials in the
standard variables (AWS_*, STORAGE_EMULATOR_HOST); the cluster's processes never had them."""

import pytest
from conftest import make_spec, quiet

import raypar
from raypar.inputs import flat_listing
from raypar.inputs.base import ordinal_of
from raypar.jobdir.ledger import Ledger
from raypar.jobdir.state import JobState

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]


@pytest.fixture(params=["s3", "gcs"])
def bucket(request, monkeypatch):
    """(URL of a fresh bucket, a filesystem on it); the server's variables set for the driver."""
    server = request.getfixturevalue({"s3": "s3_server", "gcs": "gcs_server"}[request.param])
    for name, value in server.env.items():
        monkeypatch.setenv(name, value)
    name = server.new_bucket()
    return f"{server.protocol}://{name}", name, server.filesystem()


def executions(log_dir):
    return sorted(tuple(p.read_text().split()) for p in log_dir.iterdir())


def test_file_job_resumes_after_a_failure_with_exact_output(ray_cluster, bucket, tmp_path, monkeypatch):
    url, name, fs = bucket
    monkeypatch.setattr(flat_listing, "PAGE_SIZE", 5)  # the input is listed in three pages
    # The last batch is the bad one: it is handed out only after a worker answered (the tail stays
    # in the queue), so at least one batch is done when its failure stops the job.
    files = {f"f{i:02d}.txt": ("bad " if i == 11 else "") + f"value {i}" for i in range(12)}
    for file, text in files.items():
        fs.pipe_file(f"{name}/input/{file}", text.encode())
    log, fixed = tmp_path / "exec", tmp_path / "fixed"
    log.mkdir()
    spec = make_spec(tmp_path, {}, **{
        "inputs.data": {"type": "uri_folder", "path": f"{url}/input"},  # ro_mount: the node's cache
        "outputs.out": {"type": "uri_folder", "path": f"{url}/out"},
        "task.program_arguments": f"--exec-log {log} --fixed-flag {fixed}",
        "mini_batch_error_threshold": 0, "retry_settings.max_retries": 0,
        "environment_variables": {"RAYPAR_CACHE_DIR": str(tmp_path / "cache")},
    })
    job = f"{url}/jobs/j1"

    first = raypar.run(spec, job_dir=job, echo=quiet).wait()

    assert first.state is JobState.FAILED
    assert not fs.exists(f"{name}/out/parallel_run_step.txt")  # no partial output
    batches = [tuple(sorted(files))[i:i + 2] for i in range(0, 12, 2)]
    assert ("f10.txt", "f11.txt") in executions(log)  # the bad batch ran and failed
    done_first = {batches[ordinal_of(b)] for b in Ledger(job).view().done}
    assert done_first and done_first <= set(executions(log))
    for p in log.iterdir():
        p.unlink()
    fixed.write_text("")

    second = raypar.resume(job, echo=quiet).wait()

    assert second.state is JobState.SUCCEEDED, second.reason
    assert sorted(executions(log)) == sorted(set(batches) - done_first)  # only what had not finished
    rows = fs.cat_file(f"{name}/out/parallel_run_step.txt").decode().splitlines()
    assert rows == [f"{file} {text.upper()}" for file, text in sorted(files.items())]
    stored = [fs.cat_file(p) for p in fs.find(f"{name}/jobs/j1")]
    assert stored and not any(b"testing-secret" in data for data in stored)  # no secret in the job dir


def test_table_job_reads_ranges_and_writes_one_parquet_output(ray_cluster, bucket, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    url, name, fs = bucket
    table = pa.table({"id": range(20_000), "x": [i * 0.25 for i in range(20_000)]})
    local = tmp_path / "t.parquet"
    pq.write_table(table, local, row_group_size=2500)
    fs.put_file(str(local), f"{name}/tables/t.parquet")
    (tmp_path / "exec").mkdir()
    spec = make_spec(tmp_path, {}, **{
        "inputs.data": {"type": "uri_folder", "path": f"{url}/tables"},
        "outputs.out": {"type": "uri_folder", "path": f"{url}/scores"},
        "mini_batch_size": "20kb", "task.entry_script": "table_score.py",
        "task.program_arguments": f"--exec-log {tmp_path / 'exec'}",
        "raypar.append_row_format": "parquet",
    })

    outcome = raypar.run(spec, job_dir=f"{url}/jobs/t", echo=quiet).wait()

    assert outcome.state is JobState.SUCCEEDED, outcome.reason
    assert outcome.total > 4  # several range reads of one object
    with fs.open(f"{name}/scores/parallel_run_step.parquet", "rb") as f:
        scored = pq.read_table(f)
    assert scored.column("id").to_pylist() == list(range(20_000))
