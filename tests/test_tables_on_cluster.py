"""Table inputs end to end on the 3-node loopback cluster: every input row reaches run()
exactly once, the output holds exactly the rows run() returned, partition keys reach run()."""

import os
import signal
import threading

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_spec, quiet, wait_for

import raypar
from raypar.engine.status import job_status
from raypar.jobdir.ledger import Ledger
from raypar.jobdir.state import JobState
from raypar.outputs.live import LiveAssembly

pytestmark = [pytest.mark.ray, pytest.mark.timeout(180)]


def table(start, n):
    ids = np.arange(start, start + n)
    return pd.DataFrame({"id": ids, "x": ids * 0.5, "name": [f"row-{i}" for i in ids]})


def table_spec(tmp_path, **overrides):
    spec = make_spec(tmp_path, {}, **{
        "task.entry_script": "table_score.py",
        "task.program_arguments": f"--exec-log {tmp_path / 'exec'}",
        "resources.instance_count": 2, "max_concurrency_per_instance": 1, **overrides})
    if "partition_keys" in spec:
        del spec["mini_batch_size"]  # one batch per key combination: no size
    (tmp_path / "exec").mkdir()
    return spec


def executions(tmp_path):
    return {p.name.rsplit("-", 1)[0]: int(p.read_text()) for p in (tmp_path / "exec").iterdir()}


def test_one_large_parquet_file_is_split_and_every_row_comes_back_once(ray_cluster, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    source = table(0, 30_000)
    pq.write_table(pa.Table.from_pandas(source, preserve_index=False), data / "big.parquet", row_group_size=4000)
    spec = table_spec(tmp_path, mini_batch_size="40kb")

    outcome = raypar.run(spec, job_dir=str(tmp_path / "job"), echo=quiet).wait()

    assert outcome.state is JobState.SUCCEEDED, outcome.reason
    runs = executions(tmp_path)
    assert len(runs) == outcome.total > 5  # Azure would give one mini-batch for one file
    assert sum(runs.values()) == len(source)  # each row in exactly one batch, each batch once
    out = pd.read_csv(tmp_path / "out" / "parallel_run_step.txt", sep=" ", header=None, names=["id", "double"])
    assert out["id"].tolist() == source["id"].tolist()  # mini-batch order = file order
    assert out["double"].tolist() == (source["x"] * 2).tolist()


@pytest.mark.parametrize("prefetch", [0, 1])
def test_a_row_group_cut_into_many_slices_gives_every_row_once_in_order(ray_cluster, tmp_path, prefetch):
    # One row group cut into slices: each worker keeps it decoded for the next slice it takes
    # (read by its read-ahead thread with prefetch 1), and every slice is its own rows.
    data = tmp_path / "data"
    data.mkdir()
    source = table(0, 40_000)
    pq.write_table(pa.Table.from_pandas(source, preserve_index=False), data / "one.parquet")
    assert pq.read_metadata(data / "one.parquet").num_row_groups == 1
    spec = table_spec(tmp_path, mini_batch_size="16kb", **{"raypar.prefetch": prefetch})

    outcome = raypar.run(spec, job_dir=str(tmp_path / "job"), echo=quiet).wait()

    assert outcome.state is JobState.SUCCEEDED, outcome.reason
    runs = executions(tmp_path)
    assert len(runs) == outcome.total > 10
    assert sum(runs.values()) == len(source)
    out = pd.read_csv(tmp_path / "out" / "parallel_run_step.txt", sep=" ", header=None, names=["id", "double"])
    assert out["id"].tolist() == source["id"].tolist()
    assert out["double"].tolist() == (source["x"] * 2).tolist()


def test_the_slices_of_a_row_group_run_on_the_worker_that_took_the_first(ray_cluster, tmp_path):
    # Six row groups, each cut into about 20 slices, two workers on two nodes: the worker that takes
    # a row group's first slice runs the rest of it (and decodes the row group once). Dealt out in
    # turn, every row group would run on both workers; only the first (the planner released its
    # first slice alone) and the last (split at the tail, so that no worker idles) may here.
    data = tmp_path / "data"
    data.mkdir()
    source = table(0, 60_000)
    pq.write_table(pa.Table.from_pandas(source, preserve_index=False), data / "six.parquet", row_group_size=10_000)
    (tmp_path / "barrier").mkdir()
    spec = table_spec(tmp_path, mini_batch_size="16kb")
    spec["task"]["program_arguments"] += f" --barrier {tmp_path / 'barrier'} 2"  # both hold a slice first

    outcome = raypar.run(spec, job_dir=str(tmp_path / "job"), echo=quiet).wait()

    assert outcome.state is JobState.SUCCEEDED, outcome.reason
    out = pd.read_csv(tmp_path / "out" / "parallel_run_step.txt", sep=" ", header=None, names=["id", "double"])
    assert out["id"].tolist() == source["id"].tolist()
    ledger = Ledger(str(tmp_path / "job"))
    row_group = {b.id: b.payload["pieces"][0]["row_group"] for b in ledger.read_manifest()}
    assert len(row_group) > 6 * 10  # every row group cut
    workers = {}
    for record in ledger.view().done.values():
        workers.setdefault(row_group[record.batch], set()).add((record.node, record.worker))
    assert sorted(workers) == list(range(6))
    assert sum(len(w) for w in workers.values()) <= 6 + 2, workers
    assert len(set().union(*workers.values())) == 2  # both workers ran row groups


def test_a_worker_killed_in_a_slice_hands_back_the_slices_kept_for_it(ray_cluster, tmp_path, caplog):
    # The worker running row group 0 is killed (SIGKILL) in one of its slices while the rest of
    # that row group waits for it: the slice runs again without spending a try, the slices kept
    # for the dead worker run elsewhere, once each, and the output is every row once, in order.
    data = tmp_path / "data"
    data.mkdir()
    (tmp_path / "fault").mkdir()
    source = table(0, 40_000)
    pq.write_table(pa.Table.from_pandas(source, preserve_index=False), data / "two.parquet", row_group_size=20_000)
    spec = table_spec(tmp_path, mini_batch_size="16kb", **{"retry_settings.max_retries": 0})
    spec["task"]["program_arguments"] += f" --hold-id 5000 {tmp_path / 'fault'}"

    def kill_the_worker():
        wait_for(lambda: (tmp_path / "fault" / "fault").exists(), "the slice to be held")
        os.kill(int((tmp_path / "fault" / "fault").read_text().split()[0]), signal.SIGKILL)

    killer = threading.Thread(target=kill_the_worker, daemon=True)
    killer.start()
    with caplog.at_level("WARNING", logger="raypar"):
        outcome = raypar.run(spec, job_dir=str(tmp_path / "job"), echo=quiet).wait()
    killer.join(timeout=5)

    assert outcome.state is JobState.SUCCEEDED and outcome.failed == 0, outcome.reason
    out = pd.read_csv(tmp_path / "out" / "parallel_run_step.txt", sep=" ", header=None, names=["id", "double"])
    assert out["id"].tolist() == source["id"].tolist()
    runs = executions(tmp_path)  # run() calls that got past the hold, by batch
    assert len(runs) == outcome.total and sum(runs.values()) == len(source)
    ledger = Ledger(str(tmp_path / "job"))
    manifest = list(ledger.read_manifest())
    held = next(b.id for b in manifest if b.payload["pieces"][0]["rows"][0] <= 5000 < b.payload["pieces"][0]["rows"][1])
    # No try spent: the killed slice ran alone (a lost worker, not counted), or in a group of
    # slices lost with it (nothing recorded); no other batch has a failed record.
    failed = {b: [(r.kind, r.final) for r in records] for b, records in ledger.view().failed.items()}
    assert failed in ({}, {held: [("system", False)]}), failed
    after = [b.id for b in manifest if b.payload["pieces"][0]["row_group"] == 0 and b.id > held]
    assert after  # slices of the row group were still to run when its worker died
    handed = [r.getMessage() for r in caplog.records if "queued batch(es) handed back" in r.getMessage()]
    assert len(handed) == 1 and "worker process lost" in handed[0], handed


def test_csv_and_json_lines_cut_at_lines_cover_every_row(ray_cluster, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    first, second = table(0, 3000), table(3000, 2500)
    first.to_csv(data / "a.csv", index=False)
    second.to_json(data / "b.jsonl", orient="records", lines=True)
    spec = table_spec(tmp_path, mini_batch_size="16kb")

    outcome = raypar.run(spec, job_dir=str(tmp_path / "job"), echo=quiet).wait()

    assert outcome.state is JobState.SUCCEEDED, outcome.reason
    assert len(executions(tmp_path)) > 4
    out = pd.read_csv(tmp_path / "out" / "parallel_run_step.txt", sep=" ", header=None, names=["id", "double"])
    assert out["id"].tolist() == list(range(5500))


def test_partition_keys_from_hive_folders_reach_run_with_their_rows(ray_cluster, tmp_path):
    data = tmp_path / "data"
    parts = {("1", "x"): table(0, 40), ("1", "y"): table(40, 25), ("2", "x"): table(65, 10)}
    for (store, brand), frame in parts.items():
        folder = data / f"store={store}" / f"brand={brand}"
        folder.mkdir(parents=True)
        half = len(frame) // 2  # two files per combination: both belong to its one batch
        frame.iloc[:half].to_csv(folder / "p1.csv", index=False)
        frame.iloc[half:].to_csv(folder / "p2.csv", index=False)
    spec = table_spec(tmp_path, partition_keys=["store", "brand"], **{"raypar.input_format": "csv"})

    outcome = raypar.run(spec, job_dir=str(tmp_path / "job"), echo=quiet).wait()

    assert outcome.state is JobState.SUCCEEDED, outcome.reason
    assert sorted(executions(tmp_path).values()) == sorted(len(f) for f in parts.values())
    out = pd.read_csv(tmp_path / "out" / "parallel_run_step.txt", sep=" ", header=None,
                      names=["id", "double", "store", "brand"])
    for (store, brand), frame in parts.items():
        rows = out[(out["store"] == int(store)) & (out["brand"] == brand)]
        assert rows["id"].tolist() == frame["id"].tolist()


def test_partition_keys_inside_the_data(ray_cluster, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    frames = [table(0, 30), table(30, 30)]
    for i, frame in enumerate(frames):
        frame["region"] = np.where(frame["id"] % 3 == 0, "north", "south")
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), data / f"part{i}.parquet")
    spec = table_spec(tmp_path, partition_keys=["region"], **{"raypar.input_format": "parquet"})

    outcome = raypar.run(spec, job_dir=str(tmp_path / "job"), echo=quiet).wait()

    assert outcome.state is JobState.SUCCEEDED, outcome.reason
    everything = pd.concat(frames)
    out = pd.read_csv(tmp_path / "out" / "parallel_run_step.txt", sep=" ", header=None,
                      names=["id", "double", "region"])
    assert outcome.total == 2
    for region in ("north", "south"):
        expected = everything[everything["region"] == region]["id"].tolist()
        assert out[out["region"] == region]["id"].tolist() == expected


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_append_row_formats_hold_exactly_the_returned_rows_with_their_columns(ray_cluster, tmp_path, fmt):
    data = tmp_path / "data"
    data.mkdir()
    source = table(0, 6000)
    pq.write_table(pa.Table.from_pandas(source, preserve_index=False), data / "t.parquet", row_group_size=1000)
    spec = table_spec(tmp_path, mini_batch_size="16kb", **{"raypar.append_row_format": fmt})

    outcome = raypar.run(spec, job_dir=str(tmp_path / "job"), echo=quiet).wait()

    assert outcome.state is JobState.SUCCEEDED, outcome.reason
    assert outcome.total > 3
    path = tmp_path / "out" / f"parallel_run_step.{fmt}"
    out = {"csv": pd.read_csv, "parquet": pd.read_parquet,
           "jsonl": lambda p: pd.read_json(p, lines=True)}[fmt](path)
    assert list(out.columns) == ["id", "double"]  # a header / schema, unlike Azure's text
    assert out["id"].tolist() == source["id"].tolist()
    assert out["double"].tolist() == (source["x"] * 2).tolist()


def test_the_output_written_while_batches_run_is_the_file_written_after_the_last(ray_cluster, tmp_path,
                                                                                  monkeypatch):
    finished = []
    finish = LiveAssembly.finish
    monkeypatch.setattr(LiveAssembly, "finish", lambda self, view: finished.append(self) or finish(self, view))
    outputs = {}
    for live in (True, False):
        root = tmp_path / str(live)
        (root / "data").mkdir(parents=True)
        pq.write_table(pa.Table.from_pandas(table(0, 6000), preserve_index=False), root / "data" / "t.parquet",
                       row_group_size=1000)
        spec = table_spec(root, mini_batch_size="16kb", **{
            "raypar.append_row_format": "parquet", "raypar.assemble_while_running": live})

        outcome = raypar.run(spec, job_dir=str(root / "job"), echo=quiet).wait()

        assert outcome.state is JobState.SUCCEEDED, outcome.reason
        outputs[live] = (root / "out" / "parallel_run_step.parquet").read_bytes()
    assert outputs[True] == outputs[False]
    assert pq.read_table(pa.py_buffer(outputs[True])).column("id").to_pylist() == list(range(6000))
    [assembly] = finished  # only the job that writes while running made one, and it published the file
    assert assembly.published == len(outputs[True])
    assert assembly.written_while_running == assembly.written == outcome.completed  # every batch, before the end


@pytest.mark.parametrize("fmt", ["text", "parquet"])
def test_run_gets_and_returns_pyarrow_tables_with_batch_format_pyarrow(ray_cluster, tmp_path, fmt):
    data = tmp_path / "data"
    data.mkdir()
    source = table(0, 6000)
    pq.write_table(pa.Table.from_pandas(source, preserve_index=False), data / "t.parquet", row_group_size=1000)
    spec = table_spec(tmp_path, mini_batch_size="16kb", **{
        "raypar.batch_format": "pyarrow", "raypar.append_row_format": fmt,
        "task.program_arguments": f"--exec-log {tmp_path / 'exec'} --arrow"})

    outcome = raypar.run(spec, job_dir=str(tmp_path / "job"), echo=quiet).wait()

    assert outcome.state is JobState.SUCCEEDED, outcome.reason  # run() asserts it got a pyarrow Table
    assert outcome.total > 3
    path = tmp_path / "out" / f"parallel_run_step.{'txt' if fmt == 'text' else fmt}"
    out = pd.read_parquet(path) if fmt == "parquet" else \
        pd.read_csv(path, sep=" ", header=None, names=["id", "double"])
    assert out["id"].tolist() == source["id"].tolist()
    assert out["double"].tolist() == (source["x"] * 2).tolist()


def test_a_failed_csv_batch_counts_its_rows_as_failed_items(ray_cluster, tmp_path):
    # CSV batches are cut by bytes: their row count is known only once read, never from the plan.
    data = tmp_path / "data"
    data.mkdir()
    table(0, 3000).to_csv(data / "a.csv", index=False)
    spec = table_spec(tmp_path, mini_batch_size="16kb", **{
        "task.program_arguments": f"--exec-log {tmp_path / 'exec'} --fail-id 1500",
        "retry_settings.max_retries": 0})

    outcome = raypar.run(spec, job_dir=str(tmp_path / "job"), echo=quiet).wait()

    assert outcome.state is JobState.SUCCEEDED and outcome.failed == 1  # thresholds are -1: skipped
    status = job_status(str(tmp_path / "job"))
    runs = executions(tmp_path)
    out = pd.read_csv(tmp_path / "out" / "parallel_run_step.txt", sep=" ", header=None, names=["id", "double"])
    failed_rows = 3000 - len(out)
    assert 0 < failed_rows == status["failed_items"] == sum(runs.values()) - len(out)

    spec["error_threshold"] = failed_rows - 1  # the same job with a budget one row short fails
    strict = raypar.run(spec, job_dir=str(tmp_path / "job2"), echo=quiet).wait()
    assert strict.state is JobState.FAILED and f"{failed_rows} item(s) failed" in strict.reason
