"""Resume after fixing an input file: the changed file is planned again from its new content.

The user's story (issue 12): one bad row fails its mini-batch; the user fixes the row (the line
gets longer or shorter, so every byte range planned from the old file is wrong) and resumes.
Every test runs real jobs on the loopback cluster and checks the exact output rows, which
mini-batches ran again, and what the user is told.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import quiet

import raypar
from raypar.engine.status import job_status
from raypar.jobdir.state import JobState

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]

ENTRY = '''
import argparse, os
import pandas as pd

def init():
    global args
    parser = argparse.ArgumentParser()
    parser.add_argument("--exec-log")
    args, _ = parser.parse_known_args()

def run(mini_batch, mini_batch_context):
    with open(os.path.join(args.exec_log, mini_batch_context.mini_batch_id), "a") as f:
        f.write(" ".join(str(i) for i in mini_batch["id"]) + "\\n")
    x = pd.to_numeric(mini_batch["x"])          # a bad value raises here
    return [f"{i} {v:.4f}" for i, v in zip(mini_batch["id"], x * 2)]
'''

FILES = 3
ROWS = 200  # per file: cut into several mini-batches of 1kb


def rows(start: int, n: int, values: dict | None = None) -> pd.DataFrame:
    x = [str(round(i * 0.5 + 0.25, 2)) for i in range(start, start + n)]
    for i, v in (values or {}).items():
        x[i - start] = v
    return pd.DataFrame({"id": list(range(start, start + n)), "x": x})


def write(path: Path, df: pd.DataFrame, kind: str) -> None:
    if kind == "csv":
        df.to_csv(path, index=False)
    elif kind == "jsonl":
        path.write_text("".join(json.dumps({"id": int(i), "x": x}) + "\n" for i, x in zip(df["id"], df["x"], strict=True)))
    else:
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path, row_group_size=20)


def job(tmp_path: Path, kind: str, mltable: bool = False, **extra) -> dict:
    data = tmp_path / "data"
    data.mkdir()
    ext = {"csv": "csv", "jsonl": "jsonl", "parquet": "parquet"}[kind]
    for f in range(FILES):
        bad = {f * ROWS + 137: "oops"} if f == 1 else {}
        write(data / f"part-{f}.{ext}", rows(f * ROWS, ROWS, bad), kind)
    code = tmp_path / "code"
    code.mkdir()
    (code / "score.py").write_text(ENTRY)
    log = tmp_path / "log"
    log.mkdir()
    if mltable:
        read = {"csv": {"read_delimited": {"delimiter": ",", "header": "all_files_same_headers"}},
                "jsonl": {"read_json_lines": {}}, "parquet": {"read_parquet": {}}}[kind]
        (data / "MLTable").write_text(yaml.safe_dump(
            {"paths": [{"pattern": f"./*.{ext}"}], "transformations": [read]}))
        inputs = {"data": {"type": "mltable", "path": str(data)}}
    else:
        inputs = {"data": {"type": "uri_folder", "path": str(data)}}
    spec = {
        "type": "parallel", "name": "fix", "inputs": inputs,
        "outputs": {"out": {"type": "uri_file", "path": str(tmp_path / "out.txt")}},
        "input_data": "${{inputs.data}}", "mini_batch_size": "1kb",
        "resources": {"instance_count": 1}, "max_concurrency_per_instance": 2,
        "mini_batch_error_threshold": -1, "error_threshold": -1,
        "retry_settings": {"max_retries": 0, "timeout": 60},
        "task": {"type": "run_function", "code": str(code), "entry_script": "score.py",
                 "program_arguments": f"--exec-log {log}", "append_row_to": "${{outputs.out}}"},
        "raypar": {"worker": {"num_cpus": 0.5}},
    }
    for key, value in extra.items():
        spec[key] = value
    return spec


def ran(tmp_path: Path) -> dict[str, list[int]]:
    """Mini-batch ID -> the row ids run() got, for every call so far; the log is then cleared."""
    out = {}
    for p in sorted((tmp_path / "log").iterdir()):
        out[p.name] = [int(i) for line in p.read_text().splitlines() for i in line.split()]
        p.unlink()
    return out


def expected(values: dict) -> list[str]:
    lines = []
    for i in range(FILES * ROWS):
        x = float(values.get(i, round(i * 0.5 + 0.25, 2)))
        lines.append(f"{i} {x * 2:.4f}")
    return lines


@pytest.mark.parametrize("kind,mltable,fix", [
    ("csv", False, "-9.5612345"),   # the line gets longer: every later byte range moves
    ("csv", True, "7"),             # shorter, through an MLTable
    ("jsonl", False, "-9.5612345"),
    ("parquet", True, "7"),
])
def test_resume_after_fixing_a_row_runs_the_new_content_exactly_once(ray_cluster, tmp_path, kind, mltable, fix):
    spec = job(tmp_path, kind, mltable)
    job_dir = str(tmp_path / "job")
    first = raypar.run(spec, job_dir=job_dir, echo=quiet).wait()
    assert first.state is JobState.SUCCEEDED and first.failed == 1  # thresholds allow it: skipped
    first_ran = ran(tmp_path)
    assert len(first_ran) == first.total
    assert sum(1 for ids in first_ran.values() if ids[0] // ROWS == 1) >= 3  # the file is cut in several

    # The fix: row 337 gets a number, and row 205 (in a batch that already succeeded) a new value too.
    ext = {"csv": "csv", "jsonl": "jsonl", "parquet": "parquet"}[kind]
    write(tmp_path / "data" / f"part-1.{ext}", rows(ROWS, ROWS, {337: fix, 205: "1000"}), kind)
    lines = []
    second = raypar.resume(job_dir, echo=lines.append).wait()

    assert second.state is JobState.SUCCEEDED and second.failed == 0
    out = (tmp_path / "out.txt").read_text().splitlines()
    assert out == expected({337: fix, 205: "1000"})  # every row once, in order, with the new values
    again = ran(tmp_path)
    assert sorted(i for ids in again.values() for i in ids) == list(range(ROWS, 2 * ROWS))  # that file only
    notice = [line for line in lines if "changed since they were planned" in line]
    assert len(notice) == 1 and f"part-1.{ext}" in notice[0]
    assert job_status(job_dir)["total"] == second.total and second.completed == second.total


def test_changed_file_in_a_finished_job_runs_again_and_unchanged_job_does_not(ray_cluster, tmp_path):
    spec = job(tmp_path, "csv")
    write(tmp_path / "data" / "part-1.csv", rows(ROWS, ROWS), "csv")  # no bad row: all succeed
    job_dir = str(tmp_path / "job")
    assert raypar.run(spec, job_dir=job_dir, echo=quiet).wait().state is JobState.SUCCEEDED
    ran(tmp_path)
    assert raypar.run(spec, job_dir=job_dir, echo=quiet).wait().state is JobState.SUCCEEDED  # a re-run
    assert ran(tmp_path) == {}  # nothing changed: nothing runs

    write(tmp_path / "data" / "part-2.csv", rows(2 * ROWS, ROWS, {450: "12345.5"}), "csv")
    assert job_status(job_dir)["input_changes"] == {"changed": ["part-2.csv"], "gone": [], "added": []}
    outcome = raypar.run(spec, job_dir=job_dir, echo=quiet).wait()
    assert outcome.state is JobState.SUCCEEDED
    assert sorted(i for ids in ran(tmp_path).values() for i in ids) == list(range(2 * ROWS, 3 * ROWS))
    assert (tmp_path / "out.txt").read_text().splitlines() == expected({450: "12345.5"})


def test_files_job_reruns_the_changed_file_only(ray_cluster, tmp_path, monkeypatch):
    """A list-of-files job: run() opens the files itself; a changed file's batch runs again, in the
    place of the batch it replaces; the resume's output is written while it runs."""
    from raypar.outputs import live as live_assembly

    made = []
    init = live_assembly.LiveAssembly.__init__
    monkeypatch.setattr(live_assembly.LiveAssembly, "__init__",
                        lambda self, *a, **k: made.append(self) or init(self, *a, **k))
    data = tmp_path / "data"
    data.mkdir()
    for i in range(6):
        (data / f"f{i}.txt").write_text(f"v{i}")
    code = tmp_path / "code"
    code.mkdir()
    (code / "read.py").write_text(
        "import os\n"
        "def run(mini_batch):\n"
        "    with open(os.environ['RAN'], 'a') as log:\n"
        "        log.write(' '.join(os.path.basename(p) for p in mini_batch) + '\\n')\n"
        "    return [f'{os.path.basename(p)} {open(p).read()}' for p in mini_batch]\n")
    log = tmp_path / "ran.txt"
    spec = {
        "type": "parallel", "name": "files", "inputs": {"data": {"type": "uri_folder", "path": str(data)}},
        "outputs": {"out": {"type": "uri_file", "path": str(tmp_path / "out.txt")}},
        "input_data": "${{inputs.data}}", "mini_batch_size": "2",
        "resources": {"instance_count": 1}, "max_concurrency_per_instance": 1,
        "environment_variables": {"RAN": str(log)},
        "task": {"type": "run_function", "code": str(code), "entry_script": "read.py",
                 "append_row_to": "${{outputs.out}}"},
        "raypar": {"worker": {"num_cpus": 0.5}},
    }
    job_dir = str(tmp_path / "job")
    assert raypar.run(spec, job_dir=job_dir, echo=quiet).wait().state is JobState.SUCCEEDED
    log.unlink()
    (data / "f3.txt").write_text("fixed, and longer")
    assert raypar.resume(job_dir, echo=quiet).wait().state is JobState.SUCCEEDED
    assert log.read_text().splitlines() == ["f2.txt f3.txt"]
    assert (tmp_path / "out.txt").read_text().splitlines() == [
        "f0.txt v0", "f1.txt v1", "f2.txt v2", "f3.txt fixed, and longer", "f4.txt v4", "f5.txt v5"]
    resumed = made[-1]  # batch 1's replacement (ordinal 3) written in batch 1's place, the others before and after
    assert resumed.place_of is not None and resumed.gave_up is None
    assert resumed.written_while_running == resumed.written == 3


def test_deleted_input_file_is_one_clear_line_and_nothing_runs(ray_cluster, tmp_path):
    spec = job(tmp_path, "csv")
    job_dir = str(tmp_path / "job")
    raypar.run(spec, job_dir=job_dir, echo=quiet).wait()
    ran(tmp_path)
    before = (tmp_path / "out.txt").read_text()
    (tmp_path / "data" / "part-2.csv").unlink()
    status = subprocess.run([sys.executable, "-m", "raypar", "status", job_dir], capture_output=True, text=True,
                            timeout=120)
    assert "inputs:    1 gone (part-2.csv)" in status.stdout, status.stdout + status.stderr
    proc = subprocess.run([sys.executable, "-m", "raypar", "resume", job_dir], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    error = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(error) == 1 and "part-2.csv" in error[0] and "gone" in error[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert ran(tmp_path) == {}
    assert (tmp_path / "out.txt").read_text() == before  # the output is untouched


def test_unreadable_batch_counts_its_rows_against_error_threshold(ray_cluster, tmp_path):
    """A CSV range that cannot be parsed fails with its rows counted, so error_threshold stops the job."""
    spec = job(tmp_path, "csv", error_threshold=5)
    path = tmp_path / "data" / "part-1.csv"
    text = rows(ROWS, ROWS).to_csv(index=False).replace("\n350,", "\n350,1,2,3,")  # a row of too many fields
    path.write_text(text)
    outcome = raypar.run(spec, job_dir=str(tmp_path / "job"), echo=quiet).wait()
    assert outcome.state is JobState.FAILED
    assert "more than error_threshold=5" in outcome.reason


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_fixed_file_on_azure_blob_with_job_dir_on_blob(ray_cluster, azurite, monkeypatch, tmp_path, kind):
    """Input and job dir on Azure Blob (Azurite): the file's etag tells it changed."""
    import fsspec

    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite.connection_string)
    container = azurite.new_container()
    fs = fsspec.filesystem("az", connection_string=azurite.connection_string, use_listings_cache=False)
    spec = job(tmp_path, kind)
    for p in sorted((tmp_path / "data").iterdir()):
        fs.put_file(str(p), f"{container}/input/{p.name}")
    spec["inputs"]["data"]["path"] = f"az://{container}/input"
    job_dir = f"az://{container}/jobs/j1"
    first = raypar.run(spec, job_dir=job_dir, echo=quiet).wait()
    assert first.state is JobState.SUCCEEDED and first.failed == 1
    ran(tmp_path)

    fixed = tmp_path / f"fixed.{kind}"
    write(fixed, rows(ROWS, ROWS, {337: "-9.5612345", 205: "1000"}), kind)
    fs.put_file(str(fixed), f"{container}/input/part-1.{kind}")
    lines = []
    second = raypar.resume(job_dir, echo=lines.append).wait()
    assert second.state is JobState.SUCCEEDED and second.failed == 0
    assert (tmp_path / "out.txt").read_text().splitlines() == expected({337: "-9.5612345", 205: "1000"})
    assert sorted(i for ids in ran(tmp_path).values() for i in ids) == list(range(ROWS, 2 * ROWS))
    assert any(f"part-1.{kind}" in line and "changed since they were planned" in line for line in lines)
    status = job_status(job_dir)
    assert status["completed"] == status["total"] == second.total


def test_partition_by_column_after_a_fix_holds_each_row_once(ray_cluster, tmp_path):
    """partition_keys from a column: a fixed file is read again in each key's mini-batch."""
    spec = job(tmp_path, "csv")
    for f in range(FILES):
        df = rows(f * ROWS, ROWS, {f * ROWS + 137: "oops"} if f == 1 else {})
        df["shop"] = [f"s{i % 3}" for i in df["id"]]
        df.to_csv(tmp_path / "data" / f"part-{f}.csv", index=False)
    spec["partition_keys"] = ["shop"]
    spec["mini_batch_size"] = None
    spec["inputs"]["data"] = {"type": "mltable", "path": str(tmp_path / "data")}
    (tmp_path / "data" / "MLTable").write_text(yaml.safe_dump(
        {"paths": [{"pattern": "./*.csv"}], "transformations": [{"read_delimited": {"delimiter": ",", "infer_column_types": False}}]}))
    job_dir = str(tmp_path / "job")
    first = raypar.run(spec, job_dir=job_dir, echo=quiet).wait()
    assert first.failed == 1 and first.total == 3

    df = rows(ROWS, ROWS, {337: "7", 205: "1000"})
    df["shop"] = [f"s{i % 3}" for i in df["id"]]
    df.to_csv(tmp_path / "data" / "part-1.csv", index=False)
    second = raypar.resume(job_dir, echo=quiet).wait()
    assert second.state is JobState.SUCCEEDED and second.failed == 0 and second.total == 3
    out = (tmp_path / "out.txt").read_text().splitlines()
    want = expected({337: "7", 205: "1000"})
    by_shop = [line for s in range(3) for line in want if int(line.split()[0]) % 3 == s]  # key order, then files
    assert out == by_shop


def _versions(spec):
    from raypar.inputs import check_input
    from raypar.inputs.source import open_source

    source = open_source(check_input(spec, {}), {})
    names = list(source.files())
    return source.take_versions(names)


@pytest.mark.parametrize("inside", [True, False])
def test_an_input_inside_task_code_is_known_by_content_as_it_travels_as_a_copy(tmp_path, inside):
    """A submitted job's Ray working_dir is a fresh copy with new mtimes: a file inside task.code
    that was only copied is unchanged, one whose bytes changed (same length) is changed. Outside
    task.code, size and mtime decide, as make and rsync do."""
    import os

    from raypar.spec.loading import spec_from_dict

    code = tmp_path / "code"
    data = (code if inside else tmp_path) / "data"
    data.mkdir(parents=True)
    code.mkdir(exist_ok=True)
    (code / "score.py").write_text("def run(b):\n    return b\n")
    (data / "a.txt").write_text("1.25\n")
    (data / "b.txt").write_text("2.50\n")
    spec = spec_from_dict({"type": "parallel", "inputs": {"data": {"type": "uri_folder", "path": str(data)}},
                           "input_data": "${{inputs.data}}", "task": {"code": str(code), "entry_script": "score.py"}})
    before = _versions(spec)
    later = os.stat(data / "a.txt").st_mtime_ns + 5_000_000_000
    os.utime(data / "a.txt", ns=(later, later))          # copied: same bytes, new mtime
    (data / "b.txt").write_text("2.75\n")                 # fixed: same length, new bytes
    os.utime(data / "b.txt", ns=(later, later))
    after = _versions(spec)
    changed = sorted(n for n in before if before[n] != after[n])
    assert changed == (["b.txt"] if inside else ["a.txt", "b.txt"])
