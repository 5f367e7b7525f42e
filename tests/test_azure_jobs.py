"""Jobs whose input, output and job dir are all on Azure Blob (Azurite on 127.0.0.1),
run on the 3-node loopback cluster: exact output, resume after a failure re-runs only what
did not finish, and wrong credentials fail cleanly with nothing written."""

import os
import subprocess
import sys

import fsspec
import pytest
import yaml
from conftest import make_spec, quiet

import raypar
from raypar.inputs import flat_listing
from raypar.inputs.base import ordinal_of
from raypar.jobdir.ledger import Ledger
from raypar.jobdir.state import JobState

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]


@pytest.fixture
def blob(azurite, monkeypatch):
    """A fresh container; the driver finds the credentials where users put them: the environment."""
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite.connection_string)
    container = azurite.new_container()
    fs = fsspec.filesystem("az", connection_string=azurite.connection_string, use_listings_cache=False)
    return container, fs


def upload(fs, container, files):
    for name, text in files.items():
        fs.pipe_file(f"{container}/input/{name}", text.encode())


def executions(log_dir):
    return sorted(tuple(p.read_text().split()) for p in log_dir.iterdir())


# ro_mount with a cache smaller than a batch: it evicts on every batch, while another worker reads.
@pytest.mark.parametrize("mode, cache_size", [("ro_mount", 16), ("download", "10gb")], ids=["ro_mount", "download"])
def test_job_on_azure_blob_resumes_after_a_failure_with_exact_output(ray_cluster, blob, tmp_path, mode,
                                                                     cache_size, monkeypatch):
    container, fs = blob
    monkeypatch.setattr(flat_listing, "PAGE_SIZE", 5)  # the input is listed in three pages
    # The last batch is the bad one: it is handed out only after a worker answered (the tail stays
    # in the queue), so at least one batch is done when its failure stops the job.
    files = {f"f{i:02d}.txt": ("bad " if i == 11 else "") + f"value {i}" for i in range(12)}
    upload(fs, container, files)
    log, fixed = tmp_path / "exec", tmp_path / "fixed"
    log.mkdir()
    spec = make_spec(tmp_path, {}, **{
        "inputs.data": {"type": "uri_folder", "path": f"az://{container}/input", "mode": mode},
        "outputs.out": {"type": "uri_folder", "path": f"az://{container}/out"},
        "task.program_arguments": f"--exec-log {log} --fixed-flag {fixed}",
        "mini_batch_error_threshold": 0, "retry_settings.max_retries": 0,
        "raypar.mount_cache.max_size": cache_size,
        "environment_variables": {"RAYPAR_CACHE_DIR": str(tmp_path / "cache")},
    })
    job = f"az://{container}/jobs/j1"

    first = raypar.run(spec, job_dir=job, echo=quiet).wait()

    assert first.state is JobState.FAILED
    assert not fs.exists(f"{container}/out/parallel_run_step.txt")  # no partial output
    ran_first = executions(log)
    assert ("f10.txt", "f11.txt") in ran_first  # the bad batch ran and failed
    batches = [tuple(sorted(files))[i:i + 2] for i in range(0, 12, 2)]
    # Done per the ledger: a batch still running when the job stopped was killed, so it runs again.
    done_first = {batches[ordinal_of(b)] for b in Ledger(job).view().done}
    assert done_first and done_first <= set(ran_first)
    for p in log.iterdir():
        p.unlink()
    fixed.write_text("")

    second = raypar.resume(job, echo=quiet).wait()

    assert second.state is JobState.SUCCEEDED, second.reason
    ran_second = executions(log)
    assert sorted(ran_second) == sorted(set(batches) - done_first)  # only what had not finished, once each
    rows = fs.cat_file(f"{container}/out/parallel_run_step.txt").decode().splitlines()
    # the entry script's rows are "<file name> <TEXT>": both modes hand it local copies
    assert rows == [f"{name} {text.upper()}" for name, text in sorted(files.items())]
    if mode == "ro_mount":  # the node's cache: within its limit (plus one batch), no batch folder left
        [cache] = (tmp_path / "cache").iterdir()
        cached = [p for p in cache.iterdir() if p.is_file() and p.name != ".lock"]  # f00.txt ...
        assert sum(p.stat().st_size for p in cached) <= 16 + 2 * 8
        assert not any((cache / ".batches").iterdir())
    assert fs.exists(f"{container}/jobs/j1/job.json")
    assert not any("AccountKey" in fs.cat_file(p).decode(errors="ignore")
                   for p in fs.find(f"{container}/jobs/j1"))  # the secret is nowhere in the job dir


def test_table_job_on_azure_blob_reads_ranges_and_writes_one_output(ray_cluster, blob, tmp_path):
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    container, fs = blob
    frame = pd.DataFrame({"id": range(20_000), "x": [i * 0.25 for i in range(20_000)]})
    local = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), local, row_group_size=2500)
    fs.put_file(str(local), f"{container}/tables/t.parquet")
    (tmp_path / "exec").mkdir()
    spec = make_spec(tmp_path, {}, **{
        "inputs.data": {"type": "uri_folder", "path": f"az://{container}/tables"},
        "outputs.out": {"type": "uri_folder", "path": f"az://{container}/scores"},
        # a folder output the entry script writes files into, as into Azure's mounted outputs
        "outputs.side": {"type": "uri_folder", "path": f"az://{container}/side"},
        "mini_batch_size": "20kb", "task.entry_script": "table_score.py",
        "task.program_arguments": f"--exec-log {tmp_path / 'exec'} --side-dir ${{{{outputs.side}}}}",
    })

    outcome = raypar.run(spec, job_dir=f"az://{container}/jobs/t", echo=quiet).wait()

    assert outcome.state is JobState.SUCCEEDED, outcome.reason
    assert outcome.total > 4
    text = fs.cat_file(f"{container}/scores/parallel_run_step.txt").decode().splitlines()
    assert [int(line.split()[0]) for line in text] == list(range(20_000))
    # each worker's local stand-in for az://.../side was uploaded before its batches counted done
    side = sorted(fs.ls(f"{container}/side"))
    assert [p.rsplit("/", 1)[1] for p in side] == [f"mb-{i:07d}.csv" for i in range(outcome.total)]
    ids = [int(v) for p in side for v in fs.cat_file(p).decode().split()[1:]]
    assert ids == list(range(20_000))


WRONG_KEY = "A" * 86 + "=="


def run_as_user(spec: dict, tmp_path, connection_string: str, *args: str) -> subprocess.CompletedProcess:
    """`raypar run SPEC ARGS` in a fresh process with that Azure connection string, as a user runs it."""
    path = tmp_path / "job.yml"
    path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "AZURE_STORAGE_CONNECTION_STRING": connection_string}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "raypar.cli", "run", str(path), *args],
                          capture_output=True, text=True, env=env, timeout=120)


def test_wrong_credentials_are_one_line_exit_nonzero_and_nothing_written(ray_cluster, azurite, tmp_path):
    container = azurite.new_container()
    good = fsspec.filesystem("az", connection_string=azurite.connection_string, use_listings_cache=False)
    good.pipe_file(f"{container}/input/a.txt", b"x")
    spec = make_spec(tmp_path, {}, **{"inputs.data": {"type": "uri_folder", "path": f"az://{container}/input"}})

    result = run_as_user(spec, tmp_path, azurite.connection_string.replace(azurite.account_key, WRONG_KEY),
                         "--job-dir", f"az://{container}/jobs/x")

    assert result.returncode == 1  # the storage refused the key: not a wrong spec (2)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "inputs.data" in lines[0] and "authentication failed" in lines[0]
    assert WRONG_KEY not in result.stderr
    assert good.find(f"{container}") == [f"{container}/input/a.txt"]  # nothing written


READS_AHEAD = '''\
import argparse, glob, os, time

def init():
    global args
    parser = argparse.ArgumentParser()
    parser.add_argument("--wait-next", type=int, default=-1)  # batches below this wait for the next one's read
    args, _ = parser.parse_known_args()

def run(mini_batch):
    [path] = mini_batch
    k = int(os.path.basename(path)[1:3])
    cache = os.environ["RAYPAR_CACHE_DIR"]
    def next_fetched():  # batch k+1's file, fetched into the node's cache by its read
        return bool(glob.glob(os.path.join(cache, "*", f"f{k + 1:02d}.txt")))
    seen = next_fetched()
    deadline = time.monotonic() + 60
    while k < args.wait_next and not seen and time.monotonic() < deadline:
        time.sleep(0.01)  # until batch k+1 has been read while this run() works, or a minute
        seen = next_fetched()
    return [f"f{k:02d}.txt {open(path).read()} next-read:{seen}"]
'''


@pytest.mark.parametrize("prefetch", [0, 1])
def test_a_worker_reads_the_next_mini_batch_while_run_works(ray_cluster, blob, tmp_path, prefetch):
    container, fs = blob
    files = {f"f{i:02d}.txt": f"v{i}" for i in range(10)}
    upload(fs, container, files)
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "reads_ahead.py").write_text(READS_AHEAD)
    cache = tmp_path / "cache"
    spec = make_spec(tmp_path, {}, mini_batch_size="1", **{
        "inputs.data": {"type": "uri_folder", "path": f"az://{container}/input"},
        "resources.instance_count": 1, "max_concurrency_per_instance": 1,
        "task.entry_script": "reads_ahead.py",
        # with a read ahead, run() of the first five batches waits until the next batch was read meanwhile
        "task.program_arguments": f"--wait-next {5 if prefetch else -1}",
        "environment_variables": {"RAYPAR_CACHE_DIR": str(cache)},
        "raypar.prefetch": prefetch,
    })

    done = raypar.run(spec, job_dir=str(tmp_path / "job"), echo=quiet).wait()

    assert done.state is JobState.SUCCEEDED, done.reason
    rows = (tmp_path / "out" / "parallel_run_step.txt").read_text().splitlines()
    assert [r.rsplit(" ", 1)[0] for r in rows] == [f"{n} {t}" for n, t in sorted(files.items())]
    seen = [r.rsplit(" ", 1)[1] == "next-read:True" for r in rows]
    if prefetch:  # batch k+1 was read (its file fetched) while run() worked on batch k
        assert all(seen[:5])
    else:  # one worker, nothing read ahead: batch k+1 is fetched only once run() of batch k returned
        assert not any(seen)


def test_an_output_container_that_does_not_exist_fails_before_any_batch_runs(ray_cluster, azurite, tmp_path):
    container = azurite.new_container()
    fs = fsspec.filesystem("az", connection_string=azurite.connection_string, use_listings_cache=False)
    fs.pipe_file(f"{container}/input/a.txt", b"x")
    log = tmp_path / "exec"
    log.mkdir()
    spec = make_spec(tmp_path, {}, **{"inputs.data": {"type": "uri_folder", "path": f"az://{container}/input"},
                                      "outputs.out": {"type": "uri_folder", "path": "az://nosuchcontainer/out"},
                                      "task.program_arguments": f"--exec-log {log}"})

    result = run_as_user(spec, tmp_path, azurite.connection_string, "--job-dir", str(tmp_path / "job"),
                         "--address", ray_cluster.address)

    assert result.returncode == 2, result.stderr  # a wrong spec, found before anything runs
    lines = result.stderr.strip().splitlines()
    assert lines == ["raypar: error: task.append_row_to: az://nosuchcontainer/out/parallel_run_step.txt: "
                     "the bucket or container 'nosuchcontainer' does not exist"], result.stderr
    assert list(log.iterdir()) == []  # no batch ran
    assert not (tmp_path / "job").exists()  # nothing written


def test_output_credentials_the_storage_refuses_fail_before_any_batch_runs(ray_cluster, azurite, tmp_path):
    """The input and the job dir are local: only the output's storage can say the key is wrong."""
    container = azurite.new_container()
    fs = fsspec.filesystem("az", connection_string=azurite.connection_string, use_listings_cache=False)
    log = tmp_path / "exec"
    log.mkdir()
    spec = make_spec(tmp_path, {"a.txt": "x"}, **{"outputs.out": {"type": "uri_folder", "path": f"az://{container}/out"},
                                                  "task.program_arguments": f"--exec-log {log}"})

    result = run_as_user(spec, tmp_path, azurite.connection_string.replace(azurite.account_key, WRONG_KEY),
                         "--job-dir", str(tmp_path / "job"), "--address", ray_cluster.address)

    assert result.returncode == 1, result.stderr  # the storage refused the key: not a wrong spec (2)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(f"raypar: error: task.append_row_to: az://{container}/out/parallel_run_step.txt: "
                               "cannot access (") and "authentication failed" in lines[0], lines[0]
    assert WRONG_KEY not in result.stderr
    assert list(log.iterdir()) == []  # no batch ran
    assert not (tmp_path / "job").exists()  # nothing written
    assert fs.find(container) == []
