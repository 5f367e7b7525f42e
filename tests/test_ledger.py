"""The job directory (ledger, lease, state), output rows and assembly, status (no Ray)."""

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

import raypar.jobdir.compact_tiers as compact_tiers
import raypar.jobdir.ledger as ledger_module
import raypar.jobdir.tables as tables_module
from raypar.engine.planning import PLANNING_SWITCH_INTERVAL, PlanFeed
from raypar.engine.scheduler import Progress
from raypar.engine.status import job_status
from raypar.errors import CorruptPartsError, LeaseHeldError, LedgerError, ResultError, UsageError
from raypar.inputs.base import MiniBatch
from raypar.jobdir.ledger import Ledger
from raypar.jobdir.records import DoneRecord, FailedRecord, _sealed, unseal_all
from raypar.jobdir.state import JobState
from raypar.outputs.assembly import assemble
from raypar.outputs.rows import count_and_serialize
from raypar.spec.loading import spec_from_dict

# -- helpers ---------------------------------------------------------------------


def make_batches(count: int) -> list[MiniBatch]:
    return [MiniBatch(ordinal=i, kind="files", payload={"files": [f"f{i}.txt", f"g{i}.txt"]}, item_count=2)
            for i in range(count)]


def planned(tmp_path: Path, count: int) -> Ledger:
    """A ledger whose manifest holds ``count`` batches."""
    ledger = Ledger(str(tmp_path / "job"))
    ledger.write_manifest(make_batches(count))
    return ledger


def bid(ordinal: int) -> str:
    return f"mb-{ordinal:07d}"


def finish(ledger: Ledger, ordinal: int, run: str = "r1", attempt: int = 1, rows: bytes = None) -> DoneRecord:
    """Write a part then its done record, as a worker does."""
    batch = bid(ordinal)
    rows = f"rows of {batch} ({run}/{attempt})\n".encode() if rows is None else rows
    part = ledger.write_part(f"{batch}~{run}~{attempt}", rows)
    record = DoneRecord(batch=batch, run=run, attempt=attempt, items=2, returned=2, part=part,
                        part_bytes=len(rows))
    ledger.record_done(record)
    return record


def fail(ledger: Ledger, ordinal: int, final: bool, run: str = "r1", attempt: int = 1) -> FailedRecord:
    record = FailedRecord(batch=bid(ordinal), run=run, attempt=attempt, error=f"boom {attempt}",
                          kind="user", final=final)
    ledger.record_failed(record)
    return record


def record_file(ledger: Ledger, record) -> Path:
    folder = "done" if isinstance(record, DoneRecord) else "failed"
    return Path(ledger.url) / folder / f"{record.batch}~{record.run}~{record.attempt}.json"


def pending_ids(ledger: Ledger) -> list[str]:
    return [b.id for b in ledger.view().pending()]


def job_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# -- identity ----------------------------------------------------------------------


def test_create_and_load_job(tmp_path):
    ledger = Ledger(str(tmp_path / "job"))
    job = ledger.create({"type": "parallel", "name": "x"}, "type: parallel\nname: x\n")

    assert ledger.exists()
    loaded = ledger.load_job()
    assert loaded == job
    assert loaded["spec"] == {"type": "parallel", "name": "x"}
    assert (tmp_path / "job" / "spec.yml").read_text() == "type: parallel\nname: x\n"


def test_create_refuses_a_second_create(tmp_path):
    ledger = Ledger(str(tmp_path / "job"))
    first = ledger.create({"name": "first"}, "name: first\n")

    with pytest.raises(UsageError) as info:
        Ledger(str(tmp_path / "job")).create({"name": "second"}, "name: second\n")

    assert info.value.exit_code == 2
    assert "already holds" in info.value.headline
    assert ledger.load_job() == first
    assert (tmp_path / "job" / "spec.yml").read_text() == "name: first\n"


def test_load_job_on_empty_dir(tmp_path):
    with pytest.raises(UsageError) as info:
        Ledger(str(tmp_path)).load_job()
    assert "not a raypar job dir" in info.value.headline
    assert info.value.exit_code == 2


@pytest.mark.parametrize("content, message", [
    ('{"format": 1, "spec"', "corrupted"),
    ('{"format": 1}', "corrupted"),
    ('{"format": 99, "spec": {}, "raypar_version": "9.0"}', r"unsupported format 99 \(written by raypar 9.0; "
                                                             r"this raypar .* reads formats 1, 2, 3, 4\)"),
    pytest.param("[]", "corrupted"),
])
def test_load_job_corrupted(tmp_path, content, message):  # (and a newer format, refused in one line)
    (tmp_path / "job.json").write_text(content)
    with pytest.raises(LedgerError, match=message):
        Ledger(str(tmp_path)).load_job()


def test_a_session_upgrades_an_older_job_dir_s_format_and_leaves_the_rest_of_job_json_as_it_was(tmp_path):
    ledger = Ledger(str(tmp_path / "job"))
    created = ledger.create({"name": "x"}, "name: x\n")
    path = tmp_path / "job" / "job.json"
    same = path.read_bytes()
    ledger.upgrade_format()  # already this raypar's: not written again
    assert path.read_bytes() == same
    path.write_text(json.dumps({**created, "format": 2}))  # as a raypar before segment folders wrote it
    ledger.upgrade_format()
    assert json.loads(path.read_text()) == {**created, "format": ledger_module.FORMAT,
                                            "upgraded_by": created["raypar_version"]}


# -- manifest -------------------------------------------------------------------------


def test_manifest_round_trip_in_several_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(ledger_module, "CHUNK_SIZE", 3)
    ledger = Ledger(str(tmp_path / "job"))
    batches = make_batches(10)

    assert ledger.write_manifest(iter(batches)) == 10

    assert sorted(os.listdir(tmp_path / "job" / "manifest")) == [
        "COMPLETE.json", "chunk-000000.jsonl", "chunk-000001.jsonl", "chunk-000002.jsonl", "chunk-000003.jsonl",
    ]
    assert Ledger(str(tmp_path / "job")).read_manifest() == batches


def test_empty_manifest(tmp_path):
    ledger = planned(tmp_path, 0)
    assert ledger.read_manifest() == []
    assert list(ledger.view().pending()) == []


def test_manifest_refuses_ordinal_gaps(tmp_path):
    batches = make_batches(3)
    with pytest.raises(LedgerError):
        Ledger(str(tmp_path)).write_manifest([batches[0], batches[2]])


def test_no_manifest_reads_as_none(tmp_path):
    ledger = Ledger(str(tmp_path / "job"))
    assert ledger.read_manifest() is None
    with pytest.raises(LedgerError, match="incomplete"):
        ledger.view().pending()


def test_manifest_without_complete_marker_reads_as_none(tmp_path, monkeypatch):
    monkeypatch.setattr(ledger_module, "CHUNK_SIZE", 2)
    ledger = planned(tmp_path, 5)
    os.unlink(tmp_path / "job" / "manifest" / "COMPLETE.json")
    assert ledger.read_manifest() is None


def test_missing_chunk_raises_ledger_error(tmp_path, monkeypatch):
    monkeypatch.setattr(ledger_module, "CHUNK_SIZE", 2)
    ledger = planned(tmp_path, 5)
    os.unlink(tmp_path / "job" / "manifest" / "chunk-000001.jsonl")
    manifest = ledger.read_manifest()  # chunks are read when their batches are needed
    assert len(manifest) == 5
    with pytest.raises(LedgerError, match="chunk-000001.jsonl"):
        ledger.view(manifest).pending()


def test_counts_and_a_resume_read_only_the_chunks_they_need(tmp_path, monkeypatch):
    monkeypatch.setattr(ledger_module, "CHUNK_SIZE", 2)
    ledger = planned(tmp_path, 5)
    for ordinal in range(4):
        finish(ledger, ordinal)
    for chunk in ("chunk-000000.jsonl", "chunk-000001.jsonl"):  # only done batches live there
        os.unlink(tmp_path / "job" / "manifest" / chunk)
    view = Ledger(str(tmp_path / "job")).view()
    assert view.counts() == {"total": 5, "completed": 4, "failed": 0, "pending": 1}
    assert [b.id for b in view.pending()] == [bid(4)]


def test_a_resume_queues_its_pending_batches_reading_a_few_chunks_at_a_time(tmp_path, monkeypatch):
    monkeypatch.setattr(ledger_module, "CHUNK_SIZE", 2)
    monkeypatch.setattr(tables_module, "CHUNKS_READ_TOGETHER", 2)
    ledger = planned(tmp_path, 11)  # 6 chunks
    for ordinal in (0, 1, 4, 7):
        finish(ledger, ordinal)
    manifest = Ledger(str(tmp_path / "job")).read_manifest()
    reads = []
    load = manifest.lines.load
    monkeypatch.setattr(manifest.lines, "load", lambda chunks: reads.append(sorted(chunks)) or load(chunks))

    queue = Ledger(str(tmp_path / "job")).view(manifest).pending()

    assert reads == [[1, 2], [3, 4], [5]]  # chunk 0 holds only done batches: never read
    assert manifest.lines.chunks == {}  # the queue holds the lines now, packed
    assert [b.to_json() for b in queue] == [manifest[i].to_json() for i in (2, 3, 5, 6, 8, 9, 10)]


def test_torn_complete_marker_reads_as_none(tmp_path):
    ledger = planned(tmp_path, 5)
    marker = tmp_path / "job" / "manifest" / "COMPLETE.json"
    marker.write_bytes(marker.read_bytes()[:20])
    assert ledger.read_manifest() is None


def test_corrupted_chunk_raises(tmp_path, monkeypatch):
    monkeypatch.setattr(ledger_module, "CHUNK_SIZE", 2)
    ledger = planned(tmp_path, 5)
    chunk = tmp_path / "job" / "manifest" / "chunk-000001.jsonl"
    chunk.write_text(chunk.read_text().replace("f2.txt", "f9.txt"))

    with pytest.raises(LedgerError) as info:
        ledger.view().pending()
    assert "chunk-000001.jsonl" in info.value.headline
    assert "corrupted" in info.value.headline


# -- done records and the resume rule ---------------------------------------------------


def test_pending_is_manifest_minus_done(tmp_path):
    ledger = planned(tmp_path, 6)
    for ordinal in (4, 1, 2):
        finish(ledger, ordinal)

    assert pending_ids(ledger) == [bid(0), bid(3), bid(5)]
    assert sorted(ledger.view().done) == [bid(1), bid(2), bid(4)]


def test_done_batches_are_in_the_view(tmp_path):
    ledger = planned(tmp_path, 12)
    finish(ledger, 1)
    finish(ledger, 10)
    assert bid(1) in ledger.view().done
    assert bid(10) in ledger.view().done
    assert bid(0) not in ledger.view().done
    assert bid(11) not in ledger.view().done


def test_torn_done_record_is_not_done(tmp_path):
    ledger = planned(tmp_path, 3)
    path = record_file(ledger, finish(ledger, 1))
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])

    assert pending_ids(ledger) == [bid(0), bid(1), bid(2)]
    assert bid(1) not in ledger.view().done


def test_tampered_done_record_is_not_done(tmp_path):
    ledger = planned(tmp_path, 3)
    path = record_file(ledger, finish(ledger, 1))
    body = json.loads(path.read_text())
    body["returned"] = 1  # still valid JSON, still a well-formed record
    path.write_text(json.dumps(body, sort_keys=True))

    assert pending_ids(ledger) == [bid(0), bid(1), bid(2)]
    assert bid(1) not in ledger.view().done


def test_done_record_without_checksum_is_not_done(tmp_path):
    ledger = planned(tmp_path, 2)
    path = record_file(ledger, finish(ledger, 0))
    body = json.loads(path.read_text())
    del body["sha256"]
    path.write_text(json.dumps(body))
    assert pending_ids(ledger) == [bid(0), bid(1)]


def test_done_record_with_missing_part_is_not_done(tmp_path):
    ledger = planned(tmp_path, 3)
    record = finish(ledger, 1)
    os.unlink(ledger.store.path("parts", record.part))

    assert pending_ids(ledger) == [bid(0), bid(1), bid(2)]
    assert bid(1) not in ledger.view().done


def test_done_record_with_truncated_part_is_not_done(tmp_path):
    ledger = planned(tmp_path, 3)
    record = finish(ledger, 1, rows=b"a\nb\nc\n")
    Path(ledger.store.path("parts", record.part)).write_bytes(b"a\nb\n")

    assert pending_ids(ledger) == [bid(0), bid(1), bid(2)]
    assert bid(1) not in ledger.view().done


def test_summary_only_done_record_needs_no_part(tmp_path):
    ledger = planned(tmp_path, 2)
    ledger.record_done(DoneRecord(batch=bid(0), run="r1", attempt=1, items=2, returned=1, part=None))
    view = ledger.view()
    assert [b.id for b in view.pending()] == [bid(1)]
    assert view.done[bid(0)].failed_items == 1


def test_two_valid_done_records_choose_one_deterministically(tmp_path):
    ledger = planned(tmp_path, 2)
    finish(ledger, 0, run="r2", attempt=1)
    finish(ledger, 0, run="r1", attempt=10)
    finish(ledger, 0, run="r1", attempt=2)

    chosen = {ledger.view().done[bid(0)] for _ in range(3)}

    assert len(chosen) == 1
    (record,) = chosen
    assert (record.run, record.attempt) == ("r1", 2)  # attempts compare as numbers, not text
    assert pending_ids(ledger) == [bid(1)]


def test_the_choice_does_not_depend_on_write_order(tmp_path):
    one = planned(tmp_path / "one", 1)
    two = planned(tmp_path / "two", 1)
    for run, attempt in [("r1", 3), ("r2", 1), ("r1", 2)]:
        finish(one, 0, run, attempt)
    for run, attempt in [("r1", 2), ("r1", 3), ("r2", 1)]:
        finish(two, 0, run, attempt)
    assert one.view().done == two.view().done


# -- failed records --------------------------------------------------------------------


def test_failed_batches_are_final_failures_not_yet_done(tmp_path):
    ledger = planned(tmp_path, 4)
    fail(ledger, 0, final=False)
    fail(ledger, 1, final=False, attempt=1)
    fail(ledger, 1, final=True, attempt=2)
    fail(ledger, 2, final=True)

    view = ledger.view()
    assert view.failed_batches() == {bid(1), bid(2)}
    assert [(r.attempt, r.final) for r in view.failed[bid(1)]] == [(1, False), (2, True)]
    assert [b.id for b in view.pending()] == [bid(0), bid(1), bid(2), bid(3)]

    finish(ledger, 1, run="r2")  # a resume succeeded
    assert ledger.view().failed_batches() == {bid(2)}


def reports_of(ledger: Ledger, state: str) -> dict[str, bytes]:
    """The session's text reports as the end of a session stores them: {path under the job dir: bytes}."""
    from raypar.engine.reports import write_reports

    write_reports(ledger, ledger.view(), state, "", None)
    root = Path(ledger.url)
    return {str(p.relative_to(root)): p.read_bytes() for p in (root / "reports").rglob("*") if p.is_file()}


def test_processed_mini_batches_csv_lists_every_attempt_in_batch_run_attempt_order(tmp_path):
    import csv
    import io

    ledger = planned(tmp_path, 3)
    finish(ledger, 2, run="r1")
    fail(ledger, 0, final=False, run="r2", attempt=1)
    fail(ledger, 0, final=False, run="r1", attempt=2)
    finish(ledger, 0, run="r2", attempt=2)
    fail(ledger, 1, final=True, run="r1", attempt=1)

    files = reports_of(ledger, "failed")
    rows = list(csv.DictReader(io.StringIO(files["reports/processed_mini_batches.csv"].decode())))
    assert [(r["batch"], r["run"], r["attempt"], r["status"]) for r in rows] == [
        (bid(0), "r1", "2", "exception"), (bid(0), "r2", "1", "exception"), (bid(0), "r2", "2", "done"),
        (bid(1), "r1", "1", "exception"), (bid(2), "r1", "1", "done")]
    assert [(r["items"], r["succeeded"], r["error"], r["seconds"] and float(r["seconds"])) for r in rows][:3] == [
        ("2", "0", "boom 2", ""), ("2", "0", "boom 1", ""), ("2", "2", "", 0.0)]


def test_failed_attempts_go_to_one_errors_file_in_batch_order_and_the_result_names_the_most_frequent(tmp_path):
    from raypar.engine.reports import COMMON_ERRORS

    ledger = planned(tmp_path, 12)
    for ordinal in (11, 3, 7):  # recorded out of batch order
        fail(ledger, ordinal, final=False, attempt=1)
        fail(ledger, ordinal, final=True, attempt=2)
    for ordinal in (0, 1, 2, 4, 5):  # five more distinct error lines, once each
        ledger.record_failed(FailedRecord(batch=bid(ordinal), run="r1", attempt=1, error=f"Traceback\nKeyError: {ordinal}",
                                          kind="user", final=True))
    finish(ledger, 6)

    files = reports_of(ledger, "failed")
    assert "reports/errors.txt" in files and not any(name.startswith("reports/errors/") for name in files)  # one file
    errors = files["reports/errors.txt"].decode()
    headers = [line.split()[1] for line in errors.splitlines() if line.startswith("=== ")]
    assert headers == [bid(o) for o in (0, 1, 2, 3, 3, 4, 5, 7, 7, 11, 11)]  # every failed attempt, by batch
    assert "Traceback\nKeyError: 4\n" in errors  # whole tracebacks
    # a traceback written before is named, not written again (a bug every batch hits: one copy)
    assert errors.count("boom 1") == errors.count("boom 2") == 1
    sections = errors.split("\n\n")
    assert f"=== {bid(7)} run r1 attempt 1: exception on ? (node ?)\n(the same traceback as {bid(3)} run r1 attempt 1)" \
        in sections

    result = files["reports/job_result.txt"].decode().splitlines()
    first = result.index("failed attempts: 11 in 8 mini-batch(es), tracebacks in reports/errors.txt "
                         "(one mini-batch's: `raypar logs JOB_DIR --batch ID`); the most frequent errors:")
    assert result[first + 1:first + 3] == ["  3x boom 1", "  3x boom 2"]
    assert result[first + 3].startswith("  1x KeyError: ")
    assert result[first + COMMON_ERRORS + 1] == "  ... and 4 other error line(s); by exception: 5x KeyError, 3x boom 1, 3x boom 2"


def test_a_job_without_failed_attempts_has_an_empty_errors_file(tmp_path):
    ledger = planned(tmp_path, 2)
    finish(ledger, 0)
    finish(ledger, 1)
    files = reports_of(ledger, "succeeded")
    assert files["reports/errors.txt"] == b""
    assert not any(line.startswith("failed attempts") for line in files["reports/job_result.txt"].decode().splitlines())


def test_a_session_that_gathers_failures_again_stores_them_under_new_names(tmp_path):
    """A round of batches after rows failed verification gathers the session's failures again: the
    first round's segment must not be written over (nor the new one refused as existing)."""
    ledger = planned(tmp_path, 4)
    for ordinal in (1, 2):  # two rounds of one session
        ledger.gather_failures("r1", seconds=3600)
        fail(ledger, ordinal, final=True)
        ledger.end_gathering_failures()

    assert os.listdir(tmp_path / "job" / "failed") == ["r1~f00000"]  # a folder of the run's segments
    assert sorted(os.listdir(tmp_path / "job" / "failed" / "r1~f00000")) == ["r1~000000.jsonl", "r1~000001.jsonl"]
    assert Ledger(ledger.url).view().failed_batches() == {bid(1), bid(2)}


def test_a_view_without_failed_records_plans_the_same_batches(tmp_path):
    ledger = planned(tmp_path, 5)
    finish(ledger, 0)
    fail(ledger, 1, final=False)
    fail(ledger, 1, final=True, attempt=2)
    finish(ledger, 3)
    full, lean = ledger.view(lean=True), ledger.view(lean=True, failed=False)  # what a resume plans from
    assert [b.id for b in lean.pending()] == [b.id for b in full.pending()] == [bid(i) for i in (1, 2, 4)]
    assert full.failed_batches() == {bid(1)} and lean.failed == {}


def test_torn_failed_record_is_ignored(tmp_path):
    ledger = planned(tmp_path, 2)
    path = record_file(ledger, fail(ledger, 0, final=True))
    path.write_bytes(path.read_bytes()[:10])
    assert ledger.view().failed_batches() == set()


def test_failed_records_sealed_by_hand_are_read_and_records_that_are_no_failed_record_left_out(tmp_path):
    """Records are parsed together in C++; one that does not fit the rest (written by hand or by
    another tool) must neither be taken as a failure nor hide the others of its file."""
    ledger = planned(tmp_path, 7)

    def body(ordinal: int, **changes) -> dict:
        return {**FailedRecord(batch=bid(ordinal), run="r1", attempt=1, error="Traceback\nValueError: boom",
                               kind="user", final=True, node="n1").fields(), **changes}

    sealed = json.loads(_sealed(body(1)))  # rewritten by a tool: its checksum first
    reformatted = json.dumps({"sha256": sealed.pop("sha256"), **sealed}, separators=(",", ":")).encode()
    no_final = body(4)
    del no_final["final"]
    lines = [_sealed(body(0)), reformatted, _sealed(body(2, colour="red")), _sealed(body(3, attempt="two")),
             _sealed(no_final), _sealed(body(5)).replace(b"boom", b"bang"), _sealed(body(6, attempt=2))[:-9],
             _sealed({**body(6), "batch": "not-a-batch"})]
    ledger.store.write_atomic(b"\n".join(lines) + b"\n", "failed", "r9~000000.jsonl")

    view = ledger.view()

    assert sorted(view.failed) == [bid(0), bid(1)] == sorted(view.failed_batches())
    assert view.failed[bid(1)] == [FailedRecord(**body(1))]
    assert view.failed_items() == 4 and view.counts()["failed"] == 2  # two planned items each


def test_a_segment_keeps_its_whole_records_in_order_and_leaves_out_torn_and_edited_ones():
    a, b, c, d = ({"batch": f"mb-{i}", "n": i} for i in range(4))
    sealed = json.loads(_sealed(c))  # the same record rewritten by a tool: its checksum first
    reformatted = json.dumps({"sha256": sealed.pop("sha256"), **sealed}, separators=(",", ":")).encode()
    edited = _sealed(d).replace(b'"n":3', b'"n":7')  # its checksum no longer matches
    chunks = [_sealed(a), _sealed(b)[:-5], reformatted, b"", edited, _sealed(d)]
    assert unseal_all(chunks) == [a, c, d]
    assert unseal_all([]) == []
    two_values = _sealed(a)[:-len(b',"sha256":""}') - 64] + b"},{" + b'"n":9}'  # sealed as one text by hand
    two_values = two_values[:-1] + b',"sha256":"' + hashlib.sha256(two_values).hexdigest().encode() + b'"}'
    assert unseal_all([_sealed(b), two_values]) == [b]  # the record of two values is not one record


# -- lease ---------------------------------------------------------------------------------


def write_lease(ledger: Ledger, legacy: bool = False, **fields) -> None:
    """Another driver's lease: the next generation (or, ``legacy``, the lease.json of raypar before
    generations)."""
    body = {"run": "other", "host": "elsewhere", "pid": 4242, "heartbeat": time.time(), "ttl": 30.0, "epoch": 1}
    body.update(fields)
    if legacy:
        path = Path(ledger.url) / "lease.json"
    else:
        folder = Path(ledger.url) / "lease"
        folder.mkdir(parents=True, exist_ok=True)
        newest = max((int(p.stem) for p in folder.glob("*.json")), default=0)
        path = folder / f"{newest + 1:012d}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body))


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_acquire_writes_our_lease(tmp_path):
    ledger = Ledger(str(tmp_path))
    ledger.lease.acquire("r1")
    lease = ledger.lease.read()
    assert (lease["run"], lease["pid"], lease["host"]) == ("r1", os.getpid(), socket.gethostname())
    assert ledger.lease.is_live(lease)
    ledger.lease.acquire("r1")  # the owner may claim again (heartbeat)


def test_second_driver_is_refused_while_the_first_is_live(tmp_path):
    Ledger(str(tmp_path)).lease.acquire("r1")
    with pytest.raises(LeaseHeldError) as info:
        Ledger(str(tmp_path)).lease.acquire("r2")
    assert info.value.exit_code == 2
    assert f"pid {os.getpid()}" in info.value.headline
    assert "\n" not in info.value.headline
    assert Ledger(str(tmp_path)).lease.read()["run"] == "r1"


def test_live_lease_on_another_host_is_respected(tmp_path):
    ledger = Ledger(str(tmp_path))
    write_lease(ledger, host="elsewhere", pid=4242)
    with pytest.raises(LeaseHeldError, match="pid 4242 on elsewhere"):
        ledger.lease.acquire("r2")


def test_another_hosts_lease_is_taken_over_only_once_seen_silent(tmp_path):
    # Its heartbeat's wall-clock age says nothing: that host's clock is not ours.
    ledger = Ledger(str(tmp_path))
    write_lease(ledger, heartbeat=time.time() - 1000)
    with pytest.raises(LeaseHeldError, match="pid 4242 on elsewhere"):
        ledger.lease.acquire("r2")

    ledger.lease.acquire("r2", silent=True)  # the caller watched it stay still for a TTL
    assert ledger.lease.read()["run"] == "r2" and ledger.lease.epoch == 2


def test_a_legacy_lease_json_is_honoured_then_replaced(tmp_path):
    ledger = Ledger(str(tmp_path))
    write_lease(ledger, legacy=True, host=socket.gethostname(), pid=os.getpid(), pid_started=None)
    with pytest.raises(LeaseHeldError):
        ledger.lease.acquire("r2")
    write_lease(ledger, legacy=True, host=socket.gethostname(), pid=dead_pid())
    ledger.lease.acquire("r2")
    assert ledger.lease.read()["run"] == "r2" and not (tmp_path / "lease.json").exists()


def test_dead_pid_on_this_host_can_be_taken_over_immediately(tmp_path):
    ledger = Ledger(str(tmp_path))
    write_lease(ledger, host=socket.gethostname(), pid=dead_pid(), heartbeat=time.time())
    assert not ledger.lease.is_live(ledger.lease.read())

    ledger.lease.acquire("r2")
    assert ledger.lease.read()["run"] == "r2"


def test_torn_lease_can_be_taken_over(tmp_path):
    (tmp_path / "lease.json").write_text('{"run": "other", "pi')
    ledger = Ledger(str(tmp_path))
    assert ledger.lease.read() is None
    ledger.lease.acquire("r2")
    assert ledger.lease.read()["run"] == "r2"


def test_heartbeat_after_a_takeover_fails_and_never_steals_the_lease(tmp_path):
    old_driver, new_driver = Ledger(str(tmp_path)), Ledger(str(tmp_path))
    old_driver.lease.acquire("r1")
    old_driver.lease.heartbeat("r1")
    assert old_driver.lease.generation == 2 and old_driver.lease.epoch == 1
    first = tmp_path / "lease" / f"{2:012d}.json"  # r1 now looks like a driver on another host, silent
    first.write_text(json.dumps({**json.loads(first.read_text()), "host": "frozen-host"}))
    new_driver.lease.acquire("r2", silent=True)

    with pytest.raises(LeaseHeldError, match="taken over by run r2"):
        old_driver.lease.heartbeat("r1")  # its next generation exists: the compare-and-swap fails
    assert new_driver.lease.read()["run"] == "r2"
    new_driver.lease.heartbeat("r2")
    assert sorted(p.name for p in (tmp_path / "lease").iterdir()) == [f"{3:012d}.json", f"{4:012d}.json"]


def test_two_drivers_racing_for_a_free_lease(tmp_path):
    """The rival claims the free lease between our check and our create: we must lose."""
    first, second = Ledger(str(tmp_path)), Ledger(str(tmp_path))
    create = second.store.write_new

    def rival_first(data, *parts):
        first.lease.acquire("r1")
        return create(data, *parts)

    second.store.write_new = rival_first
    with pytest.raises(LeaseHeldError):
        second.lease.acquire("r2")
    assert first.lease.read()["run"] == "r1"


def test_release_removes_only_our_own_lease(tmp_path):
    ledger = Ledger(str(tmp_path))
    ledger.lease.acquire("r1")

    ledger.lease.release("r2")
    assert ledger.lease.read()["run"] == "r1"

    ledger.lease.release("r1")
    assert ledger.lease.read() is None
    assert len(list((tmp_path / "lease").iterdir())) <= 2  # a released generation, and the one before


# -- state -----------------------------------------------------------------------------------


def test_state_write_and_read(tmp_path):
    ledger = Ledger(str(tmp_path))
    assert ledger.read_state()["state"] == "created"
    ledger.write_state(JobState.FAILED, "r1", "error_threshold crossed")
    state = ledger.read_state()
    assert (state["state"], state["run"], state["reason"]) == ("failed", "r1", "error_threshold crossed")


def test_unreadable_state_reads_as_interrupted(tmp_path):
    (tmp_path / "state.json").write_text('{"state": "runn')
    assert Ledger(str(tmp_path)).read_state()["state"] == "interrupted"


@pytest.mark.parametrize("old, new", [
    ("created", "running"), ("created", "failed"), ("created", "canceled"),
    ("running", "succeeded"), ("running", "failed"), ("running", "canceled"), ("running", "running"),
    ("succeeded", "running"), ("failed", "running"), ("canceled", "running"), ("interrupted", "running"),
])
def test_legal_transitions(old, new):
    JobState(old).check_transition(JobState(new))


@pytest.mark.parametrize("old, new", [
    ("created", "succeeded"), ("created", "created"), ("succeeded", "failed"), ("failed", "succeeded"),
    ("canceled", "succeeded"), ("running", "created"), ("running", "interrupted"), ("interrupted", "succeeded"),
])
def test_illegal_transitions(old, new):
    with pytest.raises(ValueError, match=f"{old} -> {new}"):
        JobState(old).check_transition(JobState(new))


def test_terminal_states():
    assert {s.value for s in JobState if s.is_terminal()} == {"succeeded", "failed", "canceled"}
    assert JobState("running") == "running"


# -- output rows ---------------------------------------------------------------------------------


def test_count_and_serialize_list():
    assert count_and_serialize([1, "a b", 2.5, (1, 2)], with_rows=True) == (4, b"1\na b\n2.5\n(1, 2)\n")
    assert count_and_serialize([1, "a b"], with_rows=False) == (2, None)


def test_count_and_serialize_tuple():
    assert count_and_serialize(("x", "y"), with_rows=True) == (2, b"x\ny\n")


def test_count_and_serialize_empty_list():
    assert count_and_serialize([], with_rows=True) == (0, b"")
    assert count_and_serialize([], with_rows=False) == (0, None)


def test_count_and_serialize_dataframe():
    frame = pd.DataFrame({"file": ["a.txt", "b.txt"], "score": [1, 2.5]}, index=[10, 20])
    assert count_and_serialize(frame, with_rows=True) == (2, b"a.txt 1.0\nb.txt 2.5\n")
    assert count_and_serialize(frame, with_rows=False) == (2, None)


def test_count_and_serialize_empty_dataframe():
    assert count_and_serialize(pd.DataFrame({"a": []}), with_rows=True) == (0, b"")


@pytest.mark.parametrize("result", [None, {"a": 1}, "text", 3])
def test_count_and_serialize_rejects(result):
    with pytest.raises(ResultError) as info:
        count_and_serialize(result, with_rows=True)
    assert type(result).__name__ in str(info.value)


# -- assembly ----------------------------------------------------------------------------------------


def test_assemble_concatenates_done_parts_in_manifest_order(tmp_path):
    ledger = planned(tmp_path, 5)
    for ordinal in (3, 0, 4):
        finish(ledger, ordinal, rows=f"row {ordinal}\n".encode())
    ledger.write_part(f"{bid(1)}~r1~1", b"orphan part of a killed attempt\n")  # no done record
    finish(ledger, 0, run="r2", rows=b"duplicate of batch 0\n")  # not the chosen record
    out_dir = tmp_path / "out"
    target = out_dir / "parallel_run_step.txt"

    written = assemble(ledger, ledger.view(), str(target))

    assert target.read_bytes() == b"row 0\nrow 3\nrow 4\n"
    assert written == len(b"row 0\nrow 3\nrow 4\n")
    assert os.listdir(out_dir) == ["parallel_run_step.txt"]


def test_assemble_replaces_an_old_output_whole(tmp_path):
    ledger = planned(tmp_path, 2)
    finish(ledger, 0, rows=b"a\n")
    finish(ledger, 1, rows=b"b\n")
    target = tmp_path / "out.txt"
    target.write_text("stale output from an earlier run, much longer than the new one\n")

    assert assemble(ledger, ledger.view(), str(target)) == 4

    assert target.read_bytes() == b"a\nb\n"
    assert sorted(os.listdir(tmp_path)) == ["job", "out.txt"]


def test_assemble_with_nothing_done_writes_an_empty_file(tmp_path):
    ledger = planned(tmp_path, 3)
    target = tmp_path / "out" / "rows.txt"
    assert assemble(ledger, ledger.view(), str(target)) == 0
    assert target.read_bytes() == b""
    assert os.listdir(tmp_path / "out") == ["rows.txt"]


# -- status ----------------------------------------------------------------------------------------------


def status_ledger(tmp_path: Path, planned_count=6) -> Ledger:
    """A job dir built by hand: a created job with an append_row output."""
    spec = spec_from_dict({
        "type": "parallel",
        "name": "status-test",
        "inputs": {"data": {"type": "uri_folder", "path": str(tmp_path / "data")}},
        "outputs": {"out": {"type": "uri_file", "path": str(tmp_path / "out.txt")}},
        "input_data": "${{inputs.data}}",
        "task": {"code": str(tmp_path / "src"), "entry_script": "score.py", "append_row_to": "${{outputs.out}}"},
    })
    ledger = Ledger(str(tmp_path / "job"))
    ledger.create(spec.to_dict(), spec.to_yaml())
    if planned_count is not None:
        ledger.write_manifest(make_batches(planned_count))
    return ledger


def counts(status: dict) -> tuple:
    return status["state"], status["total"], status["completed"], status["failed"], status["pending"]


def test_status_of_a_new_job(tmp_path):
    ledger = status_ledger(tmp_path, planned_count=None)
    status = job_status(ledger.url)
    assert counts(status) == ("created", 0, 0, 0, 0)  # nothing planned so far
    assert status["planning_complete"] is False
    assert status["name"] == "status-test"
    assert status["job_id"] == ledger.load_job()["job_id"]
    assert status["output"] == str(tmp_path / "out.txt")


def test_status_counts(tmp_path):
    ledger = status_ledger(tmp_path, planned_count=6)
    finish(ledger, 0)
    finish(ledger, 1)
    fail(ledger, 2, final=True)
    fail(ledger, 3, final=False)
    fail(ledger, 4, final=True)
    finish(ledger, 4, run="r2")  # retried on resume and done
    ledger.lease.acquire("r2")
    ledger.write_state(JobState.RUNNING, "r2")

    status = job_status(ledger.url)

    assert counts(status) == ("running", 6, 3, 1, 2)
    assert status["errors"] == [{"batch": bid(2), "kind": "user", "error": "boom 1"}]
    assert status["driver"]["run"] == "r2"


def test_status_of_a_running_job_counts_what_its_driver_s_heartbeat_carries_and_exact_counts_the_ledger(tmp_path):
    """A status of a million-batch job on an object store would read the ledger (every worker's open
    folder listed, megabytes of index) at each poll: the running driver's lease carries its counts."""
    ledger = status_ledger(tmp_path, planned_count=30)
    finish(ledger, 0)  # stored by an earlier session
    ledger.lease.acquire("r2")
    ledger.write_state(JobState.RUNNING, "r2")
    progress = Progress(total=30, done=1, done_before=1)
    progress.done += 2  # answered, not stored yet
    progress.unreturned_items = progress.failed_items = 1  # an item of a done batch that run() dropped
    for ordinal in range(29, 17, -1):  # twelve batches fail for good, the last first
        progress.batch_failed(bid(ordinal), "user", "Traceback\n" + "  line\n" * 1000 + f"ValueError: bad {ordinal}")
        progress.failed += 1
        progress.failed_items += 2
    ledger.lease.heartbeat("r2", progress=progress.for_status())

    status = job_status(ledger.url)

    assert counts(status) == ("running", 30, 3, 12, 15) and status["counted_by"] == "driver"
    assert (status["failed_items"], status["unreturned_items"], status["planning_complete"]) == (25, 1, True)
    assert [e["batch"] for e in status["errors"]] == [bid(18), bid(19), bid(20)]  # the first, by ordinal
    assert status["errors"][0]["error"].endswith("ValueError: bad 18") and len(status["errors"][0]["error"]) == 2000
    assert len(job_status(ledger.url, errors=20)["errors"]) == 10  # what the heartbeat carries
    assert abs(status["counted_at"] - time.time()) < 60 and "progress" not in status["driver"]
    exact = job_status(ledger.url, exact=True)
    assert counts(exact) == ("running", 30, 1, 0, 29) and exact["counted_by"] == "ledger"

    ledger.lease.heartbeat("r2")  # a renewal without counts (the session not scheduling yet): the ledger's
    assert job_status(ledger.url)["counted_by"] == "ledger"
    ledger.lease.heartbeat("r2", progress=progress.for_status())
    ledger.write_state(JobState.FAILED, "r2")
    ledger.lease.release("r2")
    assert counts(job_status(ledger.url)) == ("failed", 30, 1, 0, 29)  # no live driver: what is stored


def test_status_holds_the_tracebacks_of_the_failed_batches_it_shows_only(tmp_path, monkeypatch):
    """A million tracebacks that name their item are a gigabyte: status shows the last error of the
    first failed batches and keeps no other, in whatever order the records were stored."""
    import raypar.jobdir.ledger as ledger_module

    monkeypatch.setattr(ledger_module, "FAILED_FLUSH_RECORDS", 1)  # a segment per record, in the order stored
    monkeypatch.setattr(ledger_module, "RECORDS_WINDOW", 1)  # each segment a window of its own
    ledger = status_ledger(tmp_path, planned_count=8)
    ledger.gather_failures("r1", seconds=3600)
    for ordinal, attempt, final in ((6, 1, True), (5, 1, False), (5, 2, True), (0, 1, True), (2, 1, True),
                                    (4, 1, True), (3, 1, False), (3, 2, True)):
        ledger.record_failed(FailedRecord(batch=bid(ordinal), run="r1", attempt=attempt, kind="user", final=final,
                                          error=f"Traceback\nValueError: bad {ordinal}.{attempt}"))
    ledger.end_gathering_failures()
    finish(ledger, 0, run="r2")  # retried on resume and done: no longer failed
    finish(ledger, 1, run="r2")

    status = job_status(ledger.url, errors=2)

    assert status["errors"] == [{"batch": bid(2), "kind": "user", "error": "Traceback\nValueError: bad 2.1"},
                                {"batch": bid(3), "kind": "user", "error": "Traceback\nValueError: bad 3.2"}]
    assert status["failed"] == 5 and status["failed_items"] == 5 * ledger.read_manifest()[2].item_count
    held = ledger.view(lean=True, errors_of=2).failed.table.column("error")
    assert set(held.drop_null().to_pylist()) == {"Traceback\nValueError: bad 2.1", "Traceback\nValueError: bad 3.2"}
    assert sum(len(chunk.dictionary) for chunk in held.chunks) == 2  # the windows' other tracebacks let go


def test_status_running_without_a_live_driver_is_interrupted(tmp_path):
    ledger = status_ledger(tmp_path, planned_count=3)
    finish(ledger, 0)
    ledger.write_state(JobState.RUNNING, "r1")
    write_lease(ledger, run="r1", host=socket.gethostname(), pid=dead_pid())

    status = job_status(ledger.url)

    assert counts(status) == ("interrupted", 3, 1, 0, 2)
    assert status["driver"] is None


def test_status_of_a_finished_job(tmp_path):
    ledger = status_ledger(tmp_path, planned_count=2)
    finish(ledger, 0)
    finish(ledger, 1)
    ledger.write_state(JobState.SUCCEEDED, "r1")
    assert counts(job_status(ledger.url)) == ("succeeded", 2, 2, 0, 0)


# -- local segments: one worker's appended rows and records ----------------------------------


def write_segment(ledger: Ledger, ordinals, writer: str = "r1~w1"):
    out = ledger.done_writer(writer)
    records = []
    for i in ordinals:
        record = DoneRecord(batch=bid(i), run="r1", attempt=1, items=1, returned=1, part=None)
        records.append(out.write(record, f"row {i}\n".encode()))
    return records


def test_segment_records_name_exact_row_ranges(tmp_path):
    ledger = planned(tmp_path, 4)
    records = write_segment(ledger, [2, 0, 1])

    view = ledger.view()

    assert [b.id for b in view.pending()] == [bid(3)]
    assert [ledger.read_rows(view.done[bid(i)]) for i in range(3)] == [b"row 0\n", b"row 1\n", b"row 2\n"]
    assert {r.part for r in records} == {"r1~w1.data"}
    target = tmp_path / "out.txt"
    assemble(ledger, view, str(target))
    assert target.read_bytes() == b"row 0\nrow 1\nrow 2\n"


def test_torn_last_segment_record_is_not_done(tmp_path):
    ledger = planned(tmp_path, 3)
    write_segment(ledger, [0, 1, 2])
    log = tmp_path / "job" / "done" / "r1~w1.jsonl"
    log.write_bytes(log.read_bytes()[:-20])  # the process died mid-append

    assert [b.id for b in ledger.view().pending()] == [bid(2)]


def test_segment_rows_cut_short_are_not_done(tmp_path):
    ledger = planned(tmp_path, 2)
    write_segment(ledger, [0, 1])
    rows = tmp_path / "job" / "parts" / "r1~w1.data"
    rows.write_bytes(rows.read_bytes()[:-1])

    assert [b.id for b in ledger.view().pending()] == [bid(1)]


def test_changed_rows_fail_assembly_and_their_batch_runs_again_after_void(tmp_path):
    ledger = planned(tmp_path, 2)
    write_segment(ledger, [0, 1])
    rows = tmp_path / "job" / "parts" / "r1~w1.data"
    rows.write_bytes(rows.read_bytes().replace(b"row 1", b"row X"))  # same size, other bytes
    target = tmp_path / "out.txt"

    with pytest.raises(CorruptPartsError) as caught:
        assemble(ledger, ledger.view(), str(target))

    assert not target.exists()  # nothing published
    assert [r.batch for r in caught.value.records] == [bid(1)]
    ledger.void(caught.value.records[0], "test")
    assert [b.id for b in ledger.view().pending()] == [bid(1)]


def test_two_writers_never_share_a_segment(tmp_path):
    ledger = planned(tmp_path, 2)
    write_segment(ledger, [0], writer="r1~same")
    with pytest.raises(FileExistsError):
        write_segment(ledger, [1], writer="r1~same")


# -- compaction: one Arrow file instead of every record, for large jobs -----------------------


def test_compaction_covers_what_it_read_and_later_appends_still_count(tmp_path):
    ledger = planned(tmp_path, 6)
    out = ledger.done_writer("r1~w1")
    for i in (0, 1, 2, 3):
        out.write(DoneRecord(batch=bid(i), run="r1", attempt=1, items=1, returned=1, part=None), b"row\n")
    assert ledger.compact("r1") is True
    assert ledger.compact("r1") is False  # nothing new: no second file
    for i in (4,):  # the same worker keeps appending after the compaction
        out.write(DoneRecord(batch=bid(i), run="r1", attempt=1, items=1, returned=1, part=None), b"row\n")
    finish(ledger, 5, run="r2")  # and a one-record-per-file record

    view = ledger.view()

    assert sorted(view.done) == [bid(i) for i in range(6)]
    assert list(view.pending()) == []
    assert ledger.compact("r2") is True
    assert sorted(Ledger(str(tmp_path / "job")).view().done) == [bid(i) for i in range(6)]
    names = sorted(os.listdir(tmp_path / "job" / "compact"))
    # Incremental: the second compaction wrote a delta of the 2 new records (fewer than the 4 of the
    # first file: not merged), its index names both files, and the first index (superseded) is gone.
    assert [n.rsplit(".", 1)[1] for n in names] == ["arrow", "arrow", "idx"]
    index = json.loads((tmp_path / "job" / "compact" / names[2]).read_text())
    assert [f["rows"] for f in index["files"]] == [4, 2]


def test_reported_failed_items_survive_compaction_and_count_as_failed(tmp_path):
    ledger = planned(tmp_path, 3)
    out = ledger.done_writer("r1~w1")
    failed = json.dumps({"ValueError: flaky": [1, 3]})
    out.write(DoneRecord(batch=bid(0), run="r1", attempt=1, items=4, returned=4, part=None, reported=2,
                         failed=failed), b"rows\n")  # run() also returned a row for each
    out.write(DoneRecord(batch=bid(1), run="r1", attempt=1, items=4, returned=3, part=None), b"rows\n")
    assert ledger.compact("r1") is True
    finish(ledger, 2, run="r2")

    fresh = Ledger(str(tmp_path / "job"))
    assert fresh.view().done[bid(0)].failed == failed and fresh.view().done[bid(1)].failed is None
    assert fresh.view().unreturned_items() == fresh.view(lean=True).unreturned_items() == 2 + 1


def reporting(ledger: Ledger, ordinal: int, places, run: str = "r1", attempt: int = 1) -> DoneRecord:
    """A done batch of 4 items whose run() reported the items at ``places`` failed."""
    rows = f"rows of {ordinal} ({run}/{attempt})\n".encode()
    part = ledger.write_part(f"{bid(ordinal)}~{run}~{attempt}", rows)
    failed = json.dumps({f"ValueError: {run}/{attempt}": list(places)}) if places else None
    record = DoneRecord(batch=bid(ordinal), run=run, attempt=attempt, items=4, returned=4, part=part,
                        part_bytes=len(rows), reported=len(places), failed=failed)
    ledger.record_done(record)
    return record


def test_the_reporting_records_read_lean_are_those_the_full_view_chose(tmp_path):
    ledger = planned(tmp_path, 6)
    reporting(ledger, 0, [1])
    reporting(ledger, 1, [])
    reporting(ledger, 2, [0, 2], run="r2")  # chosen below: r1 sorts first
    reporting(ledger, 3, [3], run="r2")
    ledger.compact("r1")  # what follows is read from records, not the compact file
    reporting(ledger, 2, [], run="r1")  # batch 2's chosen record reports nothing
    reporting(ledger, 3, [2], run="r1")  # batch 3's chosen record reports item 2, not item 3
    reporting(ledger, 4, [0, 1])
    gone = reporting(ledger, 5, [0])
    os.remove(os.path.join(ledger.url, "parts", gone.part))  # its rows are gone: not done

    def rows(table):
        return list(zip(*(table.column(c).to_pylist() for c in ("ordinal", "items", "failed")), strict=True))

    full = ledger.view().done.table
    lean = ledger.view(lean=True, reported=True)
    assert rows(lean.reported) == rows(full.filter(full.column("failed").is_valid()).select(
        ["ordinal", "items", "failed"]))
    assert [(o, json.loads(f)) for o, _, f in rows(lean.reported)] == [
        (0, {"ValueError: r1/1": [1]}), (3, {"ValueError: r1/1": [2]}), (4, {"ValueError: r1/1": [0, 1]})]
    assert ledger.view(lean=True).reported is None  # only when asked for


def test_planning_the_retry_of_reported_items_reads_no_failed_record(tmp_path, monkeypatch):
    """`resume --retry-failed-items` plans from the done records that reported items: the failed
    attempts' tracebacks (a gigabyte per million) are not read for it."""
    from raypar.engine.retry_items import plan_item_retries

    ledger = planned(tmp_path, 4)  # 2 files a batch
    ledger.record_done(DoneRecord(batch=bid(0), run="r1", attempt=1, items=2, returned=1, part=None, reported=1,
                                  failed=json.dumps({"ValueError: unreadable": [1]})))
    finish(ledger, 1)
    fail(ledger, 2, final=True)
    read = []
    spied = ledger.store.read_ranges
    monkeypatch.setattr(ledger.store, "read_ranges", lambda paths, starts, ends: read.extend(paths)
                        or spied(paths, starts, ends))

    assert plan_item_retries(ledger, ledger.read_manifest()) == (1, 1)  # batch 0 retired, its failed item planned again

    assert not [p for p in read if "/failed" in p]
    assert Ledger(ledger.url).view().failed_batches() == {bid(2)}


def test_the_reporting_records_survive_a_damaged_compact_file(tmp_path):
    ledger = planned(tmp_path, 3)
    reporting(ledger, 0, [1])
    reporting(ledger, 1, [])
    ledger.compact("r1")
    arrow = next(p for p in (tmp_path / "job" / "compact").iterdir() if p.suffix == ".arrow")
    arrow.write_bytes(arrow.read_bytes()[:-10])
    reporting(ledger, 2, [0])

    assert ledger.view(lean=True, reported=True).reported.column("ordinal").to_pylist() == [0, 2]


def test_compact_files_written_before_reported_items_read_as_none_reported(tmp_path):
    from raypar.jobdir import tables

    ledger = planned(tmp_path, 2)
    for i in (0, 1):
        finish(ledger, i)
    old = tables.empty_table().drop_columns(["reported", "failed"])  # the schema before them
    assert tables.from_ipc(tables.to_ipc(old)).schema == tables.SCHEMA
    path = tmp_path / "old.arrow"
    record = ledger.view().done.table.drop_columns(["reported", "failed"])
    path.write_bytes(tables.to_ipc(record))
    [batch] = list(tables.ipc_batches(str(path), tables.LEAN_COLUMNS))
    assert batch.column("reported").to_pylist() == [0, 0]
    assert tables.from_ipc(path.read_bytes()).column("failed").to_pylist() == [None, None]


def test_compact_files_written_before_crc32_keep_their_parts_sha256(tmp_path):
    """A compact file of an older raypar has no part_crc32 column: its parts are checked by sha256."""
    from raypar.jobdir import tables

    ledger = planned(tmp_path, 2)
    for i in (0, 1):
        finish(ledger, i)
    sha = tables.SCHEMA.get_field_index("part_sha256")
    before = ledger.view().done.table.drop_columns(["part_crc32"])
    before = before.set_column(sha, "part_sha256", before.column("part").cast("string"))  # any value, kept as is

    read = tables.from_ipc(tables.to_ipc(before))

    assert read.schema == tables.SCHEMA
    assert read.column("part_crc32").to_pylist() == [None, None]
    assert read.column("part_sha256").to_pylist() == before.column("part").cast("string").to_pylist()


def newest_index(folder: Path) -> dict:
    """The one compact index left in ``folder`` (the ones it superseded are removed)."""
    indexes = [n for n in os.listdir(folder) if n.endswith(".idx")]
    assert len(indexes) == 1, indexes
    return unseal_all([(folder / indexes[0]).read_bytes()])[0]


def binary(count: int) -> list[int]:
    """``count`` as the powers of two that sum to it, largest first: 7 -> [4, 2, 1]."""
    return [1 << bit for bit in reversed(range(count.bit_length())) if count >> bit & 1]


@pytest.mark.parametrize("most", [16, 2])
def test_a_compaction_merges_only_the_newest_delta_files_no_larger_than_its_records(tmp_path, monkeypatch, most):
    """A record per compaction: the index's files hold the count's binary digits (each record rewritten
    about log2 times, not at every few compactions); past ``most`` files, everything is merged."""
    monkeypatch.setattr(compact_tiers, "MAX_COMPACT_FILES", most)
    ledger = planned(tmp_path, 12)
    out = ledger.done_writer("r1~w1")
    folder = tmp_path / "job" / "compact"
    rows_per_index = []
    for i in range(12):
        out.write(DoneRecord(batch=bid(i), run="r1", attempt=1, items=1, returned=1, part=None), b"row\n")
        assert ledger.compact("r1") is True
        index = newest_index(folder)
        rows_per_index.append([f["rows"] for f in index["files"]])
        assert sorted(n for n in os.listdir(folder) if n.endswith(".arrow")) == \
            sorted(f["file"] for f in index["files"])  # the files merged are removed
        assert sorted(Ledger(str(tmp_path / "job")).view().done) == [bid(k) for k in range(i + 1)]
    if most == 16:
        assert rows_per_index == [binary(n) for n in range(1, 13)]
    else:  # 7 would be [4, 2, 1], 3 files: all merged; and 10
        assert rows_per_index == [[1], [2], [2, 1], [4], [4, 1], [4, 2], [7], [7, 1], [7, 2], [10], [10, 1], [10, 2]]


def test_the_next_session_s_compaction_counts_even_where_an_earlier_driver_s_clock_ran_an_hour_ahead(
        tmp_path, monkeypatch):
    """Indexes sort by the lease epoch of the session that wrote them, then by its clock: the holder's
    compaction is the one views read, and it removes the earlier session's as superseded."""
    from raypar.jobdir import layout

    ledger = planned(tmp_path, 8)
    ledger.lease.acquire("r1")
    now = time.time_ns
    monkeypatch.setattr(layout.time, "time_ns", lambda: now() + 3600 * 10**9)  # r1's host, an hour ahead
    write_segment(ledger, [0, 1, 2, 3])
    assert ledger.compact("r1") is True and ledger.compact_failures("r1") is False
    fail(ledger, 0, final=False)
    assert ledger.compact_failures("r1") is True
    ledger.lease.release("r1")  # (or lost: a fenced driver's late index is named the same way)
    monkeypatch.setattr(layout.time, "time_ns", now)
    later = Ledger(ledger.url)
    later.lease.acquire("r2")
    write_segment(later, [4, 5, 6, 7], writer="r2~w1")
    fail(later, 4, final=False, run="r2")

    assert later.compact("r2") is True and later.compact_failures("r2") is True

    for folder in ("compact", "failed-compact"):
        indexes = [n for n in os.listdir(tmp_path / "job" / folder) if n.endswith(".idx")]
        assert len(indexes) == 1 and indexes[0].endswith("-r2.idx"), indexes  # r1's: superseded, removed
    assert later.compact("r2") is False  # nothing new since the index views read
    view = Ledger(ledger.url).view()
    assert sorted(view.done) == [bid(i) for i in range(8)] and sorted(view.failed) == [bid(0), bid(4)]


def test_a_compaction_that_would_merge_a_damaged_file_compacts_every_record_again(tmp_path):
    ledger = planned(tmp_path, 8)
    out = ledger.done_writer("r1~w1")
    for i in range(8):
        out.write(DoneRecord(batch=bid(i), run="r1", attempt=1, items=1, returned=1, part=None), b"row\n")
        if i == 3:
            assert ledger.compact("r1") is True
            arrow = next(p for p in (tmp_path / "job" / "compact").iterdir() if p.suffix == ".arrow")
            arrow.write_bytes(arrow.read_bytes()[:-10])  # the 4 records' file, to be merged next

    assert ledger.compact("r1") is True

    assert [f["rows"] for f in newest_index(tmp_path / "job" / "compact")["files"]] == [8]  # from the records
    assert sorted(Ledger(str(tmp_path / "job")).view().done) == [bid(i) for i in range(8)]


def test_a_corrupted_compact_file_falls_back_to_the_records(tmp_path):
    ledger = planned(tmp_path, 3)
    write_segment(ledger, [0, 1, 2])
    ledger.compact("r1")
    arrow = next(p for p in (tmp_path / "job" / "compact").iterdir() if p.suffix == ".arrow")
    arrow.write_bytes(arrow.read_bytes()[:-10])

    assert sorted(ledger.view().done) == [bid(0), bid(1), bid(2)]


def test_compacted_records_are_checked_against_their_rows_again(tmp_path):
    ledger = planned(tmp_path, 2)
    write_segment(ledger, [0, 1])
    ledger.compact("r1")
    rows = tmp_path / "job" / "parts" / "r1~w1.data"
    rows.write_bytes(rows.read_bytes()[:-1])  # cut after compaction

    assert [b.id for b in ledger.view().pending()] == [bid(1)]


# -- failed records compacted: their columns in Arrow, their tracebacks in pieces of their own ------


def flaky_ledger(tmp_path: Path, monkeypatch) -> Ledger:
    """12 planned batches; 0-9 failed twice (the second time for good), stored as a driver stores
    them (segments of 4 records), tracebacks shared by some batches; one stored as a file of its own
    (a record written outside a session); batch 3 done since."""
    monkeypatch.setattr(ledger_module, "FAILED_FLUSH_RECORDS", 4)
    monkeypatch.setattr(ledger_module, "RECORDS_WINDOW", 1)  # each record file a window of its own
    ledger = status_ledger(tmp_path, planned_count=12)
    ledger.gather_failures("r1", seconds=3600)
    for ordinal in range(10):
        for attempt in (1, 2):
            ledger.record_failed(FailedRecord(batch=bid(ordinal), run="r1", attempt=attempt, kind="user",
                                              final=attempt == 2, node="n1", worker="w1", items=2,
                                              error=f"Traceback\nValueError: bad {ordinal % 4}.{attempt}"))
    ledger.end_gathering_failures()
    fail(ledger, 11, final=True)
    finish(ledger, 3, run="r2")
    return ledger


def without_compaction(ledger: Ledger, tmp_path: Path) -> Ledger:
    """A copy of the job dir with no failed compaction: what the records themselves say."""
    shutil.copytree(ledger.url, tmp_path / "records")
    shutil.rmtree(tmp_path / "records" / "failed-compact", ignore_errors=True)
    return Ledger(str(tmp_path / "records"))


def failed_views(ledger: Ledger) -> tuple:
    """The failed records every reader sees: the full view's, status's (two errors shown) and the reports'."""
    fresh = Ledger(ledger.url)
    status = job_status(ledger.url, errors=2)
    return (fresh.view().failed.table.to_pylist(), fresh.view(lean=True, errors_of=2).failed.table.to_pylist(),
            status["errors"], status["failed"], status["failed_items"],
            {name: data.replace(ledger.url.encode(), b"JOB") for name, data in reports_of(fresh, "failed").items()})


def test_compacted_failed_records_read_as_the_records_themselves_and_status_reads_only_what_it_shows(
        tmp_path, monkeypatch):
    from raypar.jobdir import failed_compact

    monkeypatch.setattr(failed_compact, "ERROR_ROWS", 2)  # several pieces of tracebacks
    ledger = flaky_ledger(tmp_path, monkeypatch)
    assert ledger.compact_failures("r2") is True
    assert ledger.compact_failures("r2") is False  # nothing new: no second compaction
    ledger.record_failed(FailedRecord(batch=bid(10), run="r3", attempt=1, kind="user", final=True,
                                      error="Traceback\nKeyError: late"))  # stored after the compaction
    ledger.record_failed(FailedRecord(batch=bid(0), run="r3", attempt=1, kind="user", final=True,
                                      error="Traceback\nValueError: bad 0.2"))  # a batch failed again

    assert failed_views(ledger) == failed_views(without_compaction(ledger, tmp_path))
    status = job_status(ledger.url, errors=2)
    assert [e["error"] for e in status["errors"]] == ["Traceback\nValueError: bad 0.2", "Traceback\nValueError: bad 1.2"]

    read = []
    spied = ledger.store.read_ranges

    def spy(paths, starts, ends):
        read.extend(os.path.relpath(p, ledger.url) for p in paths)
        return spied(paths, starts, ends)

    monkeypatch.setattr(ledger.store, "read_ranges", spy)
    ledger.view(lean=True, errors_of=2)
    failed = sorted(p for p in read if p.startswith("failed/"))
    assert failed == [f"failed/{bid(0)}~r3~1.json", f"failed/{bid(10)}~r3~1.json"]  # not the records compacted
    # The tracebacks of batches 0 and 1 (shown): the 2 pieces of their segment's 4, of the 11 pieces
    # written (a piece of 1 for batch 11's file, 2 for each segment of 4 records).
    pieces = sorted(p.rsplit(".errors-")[1] for p in read if ".errors-" in p)
    assert pieces == ["00001.arrow", "00002.arrow"]
    assert len(ledger.store.list_files("failed-compact")) == 1 + 1 + 11  # columns, index, pieces


def test_tracebacks_repeated_across_pieces_point_at_their_first_copy_and_look_alikes_stay_apart():
    """A full view reads every piece of tracebacks: a repeat (a bug every window hits) points at
    its first copy, found by its length and ends; a different traceback with the same length and
    ends (what differs is in the middle) is never taken for it."""
    import pyarrow as pa

    from raypar.jobdir.tables import KEY_CHARACTERS, first_copies

    frame = "  File \"score.py\", line 9, in run\n" * 4
    same_ends = [f"Traceback\n{frame}x = {v}\n{frame}ValueError: bad" for v in ("1", "2", "3")]  # one length
    assert len({len(t) for t in same_ends}) == 1 and len(frame) > KEY_CHARACTERS
    texts = ["A", same_ends[0], "B", same_ends[1], "A", same_ends[0], same_ends[2], same_ends[1], "é", "é"]

    copies = first_copies(pa.array(texts, pa.large_string()))

    assert copies.tolist() == [0, 1, 2, 3, 0, 1, 6, 3, 8, 8]
    assert all(texts[c] == t for c, t in zip(copies, texts, strict=True))


def test_failed_compactions_are_deltas_whose_columns_merge_and_whose_tracebacks_are_never_rewritten(
        tmp_path, monkeypatch):
    ledger = planned(tmp_path, 8)
    folder = tmp_path / "job" / "failed-compact"
    columns_per_index, pieces = [], {}
    for i in range(7):
        ledger.record_failed(FailedRecord(batch=bid(i), run="r1", attempt=1, kind="user", final=True,
                                          error=f"Traceback\nValueError: {i}"))
        assert ledger.compact_failures("r1") is True
        names = sorted(os.listdir(folder))
        assert len([n for n in names if n.endswith(".idx")]) == 1
        columns_per_index.append([f["rows"] for f in newest_index(folder)["files"]])
        assert len([n for n in names if n.endswith(".arrow") and ".errors-" not in n]) == len(columns_per_index[-1])
        for name in pieces:  # every piece written before is still there, untouched
            assert (folder / name).stat().st_ino == pieces[name]
        pieces.update({n: (folder / n).stat().st_ino for n in names if ".errors-" in n})
        view = Ledger(ledger.url).view()
        assert {b: [r.error for r in rs] for b, rs in view.failed.items()} == {
            bid(k): [f"Traceback\nValueError: {k}"] for k in range(i + 1)}
    assert columns_per_index == [binary(n) for n in range(1, 8)]  # merged as the done records' are
    assert len(pieces) == 7


@pytest.mark.parametrize("damaged", ["columns", "piece", "index"])
def test_a_damaged_failed_compaction_is_passed_over_for_the_records(tmp_path, monkeypatch, caplog, damaged):
    ledger = flaky_ledger(tmp_path, monkeypatch)
    ledger.compact_failures("r2")
    folder = tmp_path / "job" / "failed-compact"
    names = sorted(os.listdir(folder))
    target = folder / next(n for n in names if {"columns": n.endswith(".arrow") and ".errors-" not in n,
                                                 "piece": ".errors-" in n, "index": n.endswith(".idx")}[damaged])
    target.write_bytes(target.read_bytes()[:-10])

    assert failed_views(ledger) == failed_views(without_compaction(ledger, tmp_path))
    if damaged == "piece":
        assert "missing or corrupted; reading the failed records themselves" in caplog.text

    # The next compaction sees the cut file in its listing and compacts again from the records.
    assert ledger.compact_failures("r3") is True
    assert target.name not in os.listdir(folder)
    caplog.clear()
    assert failed_views(ledger) == failed_views(without_compaction(ledger, tmp_path / "again"))
    assert "reading the failed records themselves" not in caplog.text


def test_a_piece_damaged_in_place_is_compacted_again_once_a_view_of_the_session_found_it(tmp_path, monkeypatch, caplog):
    """Bit rot keeps a file's size, which is all the next compaction's listing shows; the session's
    own views read every piece and tell it."""
    ledger = flaky_ledger(tmp_path, monkeypatch)
    ledger.compact_failures("r2")
    piece = next(p for p in (tmp_path / "job" / "failed-compact").iterdir() if ".errors-" in p.name)
    data = bytearray(piece.read_bytes())
    data[len(data) // 2] ^= 0xFF  # the same size
    piece.write_bytes(bytes(data))
    assert ledger.compact_failures("r3") is False  # nothing new, and nothing seen wrong

    assert failed_views(ledger) == failed_views(without_compaction(ledger, tmp_path))  # (from the records)
    ledger.view()  # as the session's end reads
    assert "missing or corrupted; reading the failed records themselves" in caplog.text

    assert ledger.compact_failures("r3") is True
    assert not piece.exists()
    caplog.clear()
    assert failed_views(ledger) == failed_views(without_compaction(ledger, tmp_path / "again"))
    assert "reading the failed records themselves" not in caplog.text


def test_a_failed_compaction_that_stopped_before_its_index_counts_for_nothing_and_is_removed_by_the_next(
        tmp_path, monkeypatch):
    ledger = flaky_ledger(tmp_path, monkeypatch)
    write_atomic = ledger.store.write_atomic

    def stopped(data, *parts):
        if parts[-1].endswith(".idx"):
            raise OSError("the driver died here")
        return write_atomic(data, *parts)

    monkeypatch.setattr(ledger.store, "write_atomic", stopped)
    with pytest.raises(OSError):
        ledger.compact_failures("r2")
    left = sorted(os.listdir(tmp_path / "job" / "failed-compact"))
    assert left and not any(n.endswith(".idx") for n in left)  # its columns and pieces, no index
    assert failed_views(ledger) == failed_views(without_compaction(ledger, tmp_path))
    monkeypatch.setattr(ledger.store, "write_atomic", write_atomic)

    assert ledger.compact_failures("r3") is True
    assert not set(left) & set(os.listdir(tmp_path / "job" / "failed-compact"))  # the leftovers removed
    assert failed_views(ledger) == failed_views(without_compaction(ledger, tmp_path / "again"))


@pytest.mark.parametrize("compacted", [True, False])
def test_a_view_for_one_batch_holds_its_tracebacks_only_and_reads_only_their_pieces(tmp_path, monkeypatch, compacted):
    """`raypar logs D --batch ID`: a million failed attempts' tracebacks took it to 1.7 GB."""
    from raypar.jobdir import failed_compact

    monkeypatch.setattr(failed_compact, "ERROR_ROWS", 2)
    ledger = flaky_ledger(tmp_path, monkeypatch)
    if compacted:
        ledger.compact_failures("r2")
    read = []
    spied = ledger.store.read_ranges
    monkeypatch.setattr(ledger.store, "read_ranges", lambda paths, starts, ends: read.extend(paths)
                        or spied(paths, starts, ends))

    view = ledger.view(errors_for=[bid(5)])

    assert view.failed[bid(5)] == Ledger(ledger.url).view().failed[bid(5)]  # its two tries, whole
    assert [r.error for r in view.failed[bid(6)]] == [None, None]  # the others' records, without tracebacks
    assert set(view.failed.table.column("error").drop_null().to_pylist()) == {
        "Traceback\nValueError: bad 1.1", "Traceback\nValueError: bad 1.2"}
    pieces = [p for p in read if ".errors-" in p]
    assert len(pieces) == (1 if compacted else 0)  # batch 5's segment holds 4 tracebacks in 2 pieces: one read


def test_logs_of_one_batch_prints_its_tries_and_names_a_batch_the_job_does_not_have(tmp_path, monkeypatch, capsys):
    from conftest import cli_in_process

    ledger = flaky_ledger(tmp_path, monkeypatch)
    ledger.compact_failures("r2")

    shown = cli_in_process(capsys, "logs", ledger.url, "--batch", bid(5))

    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines()[:6] == [
        "=== attempt 1 (run r1): exception on w1, node n1", "Traceback", "ValueError: bad 1.1",
        "=== attempt 2 (run r1): exception on w1, node n1", "Traceback", "ValueError: bad 1.2"]
    for wrong in (bid(12), "batch-5"):
        refused = cli_in_process(capsys, "logs", ledger.url, "--batch", wrong)
        assert (refused.returncode, refused.stdout) == (2, "")
        assert refused.stderr == f"raypar: error: {ledger.url}: no mini-batch {wrong} in this job\n"


def test_a_failed_segment_compacted_while_it_was_written_is_read_on_from_its_last_whole_line(tmp_path, monkeypatch):
    """On local disk a segment is written in place: a compaction (or another process's) may list it
    half written. What it covers ends at the last whole record; the rest is read from there."""
    ledger = flaky_ledger(tmp_path, monkeypatch)
    lines = [_sealed(FailedRecord(batch=bid(i), run="r9", attempt=attempt, kind="user", final=True,
                                  error=f"Traceback\nOSError: {i}").fields()) + b"\n"
             for i, attempt in ((10, 1), (11, 1), (10, 2))]
    segment = tmp_path / "job" / "failed" / "r9~000000.jsonl"
    segment.write_bytes(lines[0] + lines[1][:25])  # one record and the start of the next
    assert ledger.compact_failures("r2") is True
    assert [r.attempt for r in Ledger(ledger.url).view().failed[bid(10)]] == [1]
    assert ledger.compact_failures("r2") is False  # the torn tail is not something new

    segment.write_bytes(b"".join(lines))  # the write ends

    assert failed_views(ledger) == failed_views(without_compaction(ledger, tmp_path))
    assert [r.attempt for r in Ledger(ledger.url).view().failed[bid(10)]] == [1, 2]  # each once
    assert ledger.compact_failures("r3") is True
    assert failed_views(ledger) == failed_views(without_compaction(ledger, tmp_path / "again"))


def test_a_session_compacts_its_failed_records_every_compact_every_attempts_stored(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from raypar.engine import upkeep

    monkeypatch.setattr(upkeep, "COMPACT_EVERY", 3)
    ledger = planned(tmp_path, 8)
    ledger.gather_failures("r1", seconds=0)
    shown = []
    compactor = upkeep.Compactor(ledger, "r1", lambda p, final=False: shown.append(p), may_write=lambda: True)
    indexes = []
    for i in range(7):
        ledger.record_failed(FailedRecord(batch=bid(i), run="r1", attempt=1, kind="user", final=True, error=f"e{i}"))
        compactor(SimpleNamespace(done=0, gone=set(), segments=0, workers=1))  # stores the gathered record (a second old here), maybe compacts
        compactor.join()  # on its own thread
        index = [n for n in ledger.store.list_files("failed-compact") if n.endswith(".idx")]
        indexes.append(json.loads(Path(index[0]).read_bytes())["rows"] if index else 0)
    assert indexes == [0, 0, 3, 3, 3, 6, 6]
    assert len(shown) == 7


def test_a_session_s_compaction_runs_beside_the_scheduler_one_at_a_time(tmp_path, monkeypatch):
    # On an object store a compaction reads every segment stored since the last: minutes at
    # 50,000 one-batch segments, while in the scheduler's loop no batch was handed out.
    import threading
    from types import SimpleNamespace

    from raypar.engine import upkeep

    monkeypatch.setattr(upkeep, "COMPACT_EVERY", 2)
    ledger = planned(tmp_path, 8)
    out = ledger.done_writer("r1~w1")
    started, release, compacted = threading.Event(), threading.Event(), []
    compact = Ledger.compact

    def slow(self, run, **kw):
        started.set()
        release.wait(timeout=30)
        compacted.append(compact(self, run, **kw))

    monkeypatch.setattr(Ledger, "compact", slow)
    shown = []
    compactor = upkeep.Compactor(ledger, "r1", lambda p, final=False: shown.append(p.done), may_write=lambda: True)
    compactor(SimpleNamespace(done=0, gone=set(), segments=0, workers=1))
    for i in range(4):
        out.write(DoneRecord(batch=bid(i), run="r1", attempt=1, items=1, returned=1, part=None), b"row\n")
    compactor(SimpleNamespace(done=2, gone=set(), segments=0, workers=1))  # due: starts, and this call returns while it runs
    assert started.wait(timeout=30) and not release.is_set()
    compactor(SimpleNamespace(done=4, gone=set(), segments=0, workers=1))  # due again, but one runs: none starts
    assert shown == [0, 2, 4] and compacted == []
    release.set()
    compactor.join()
    assert compacted == [True]
    assert sorted(Ledger(ledger.url).view().done) == [bid(i) for i in range(4)]
    compactor(SimpleNamespace(done=4, gone=set(), segments=0, workers=1))  # the next one starts now that the first is over
    compactor.join()
    assert compacted == [True, False]  # nothing new since


def test_the_session_s_last_compaction_waits_for_one_still_running_on_its_thread(tmp_path, monkeypatch):
    # A second Ctrl-C while the driver waits for its compaction's thread skips that wait; its last
    # compaction then must not run beside the other (each may remove the other's files as superseded).
    import threading
    from types import SimpleNamespace

    from raypar.engine import upkeep

    monkeypatch.setattr(upkeep, "COMPACT_EVERY", 2)
    ledger = planned(tmp_path, 4)
    out = ledger.done_writer("r1~w1")
    for i in range(2):
        out.write(DoneRecord(batch=bid(i), run="r1", attempt=1, items=1, returned=1, part=None), b"row\n")
    started, release, order = threading.Event(), threading.Event(), []
    compact = Ledger.compact

    def slow(self, run, **kw):
        order.append(("in", kw.get("session_over")))
        started.set()
        release.wait(timeout=30)
        order.append(("out", compact(self, run, **kw)))

    monkeypatch.setattr(Ledger, "compact", slow)
    compactor = upkeep.Compactor(ledger, "r1", lambda p, final=False: None, may_write=lambda: True)
    compactor(SimpleNamespace(done=0, gone=set(), segments=0, workers=1))
    compactor(SimpleNamespace(done=2, gone=set(), segments=0, workers=1))  # due: runs on its thread, held
    assert started.wait(timeout=30)
    last = threading.Thread(target=upkeep.compact, args=(ledger, "r1", lambda: True), kwargs={"session_over": True})
    last.start()  # the driver's last compaction, its wait for the thread cut short
    last.join(timeout=0.5)  # time to reach Ledger.compact, were it not waiting
    assert last.is_alive() and order == [("in", False)]  # it waits for the one running
    release.set()
    last.join(timeout=30)
    compactor.join()
    assert order == [("in", False), ("out", True), ("in", True), ("out", False)]  # one after the other (nothing new)
    assert sorted(Ledger(ledger.url).view().done) == [bid(0), bid(1)]


def test_a_session_compacts_every_compact_seconds_once_compact_sooner_batches_are_new(tmp_path, monkeypatch):
    # A slow job (one segment a batch on an object store) would take hours to reach COMPACT_EVERY,
    # and every status and resume meanwhile reads each segment stored since the last compaction.
    from types import SimpleNamespace

    from raypar.engine import upkeep

    monkeypatch.setattr(upkeep, "COMPACT_EVERY", 100)
    monkeypatch.setattr(upkeep, "COMPACT_SOONER", 3)
    ledger = planned(tmp_path, 8)
    out = ledger.done_writer("r1~w1")
    now = [0.0]
    compactor = upkeep.Compactor(ledger, "r1", lambda p, final=False: None, lambda: True, clock=lambda: now[0])
    compactor(SimpleNamespace(done=0, gone=set(), segments=0, workers=1))

    def step(done: int, at: float) -> int:
        now[0] = at
        compactor(SimpleNamespace(done=done, gone=set(), segments=0, workers=1))
        compactor.join()
        index = json.loads(open(sorted(p for p in ledger.store.list_files("compact") if p.endswith(".idx"))[-1],
                                "rb").read().split(b"\n")[0]) if ledger.store.list_files("compact") else {}
        return index.get("rows", 0)

    for i in range(3):
        out.write(DoneRecord(batch=bid(i), run="r1", attempt=1, items=1, returned=1, part=None), b"row\n")
    assert step(3, upkeep.COMPACT_SECONDS - 1) == 0  # enough batches, not yet the time
    assert step(3, upkeep.COMPACT_SECONDS) == 3
    for i in range(3, 6):
        out.write(DoneRecord(batch=bid(i), run="r1", attempt=1, items=1, returned=1, part=None), b"row\n")
    assert step(5, 3 * upkeep.COMPACT_SECONDS) == 3  # the time, not yet enough batches (2 since)
    assert step(6, 3 * upkeep.COMPACT_SECONDS) == 6


def test_a_session_compacts_every_compact_segments_segments_stored_however_few_batches(tmp_path, monkeypatch):
    """On an object store every segment not compacted is a GET in each view: a job whose segments
    hold a batch each compacts after COMPACT_SEGMENTS of them, long before COMPACT_EVERY batches
    or COMPACT_SECONDS."""
    from types import SimpleNamespace

    from raypar.engine import upkeep

    monkeypatch.setattr(upkeep, "COMPACT_SEGMENTS", 3)
    monkeypatch.setattr(upkeep, "COMPACT_SEGMENTS_PER_WORKER", 1)
    ledger = planned(tmp_path, 8)
    out = ledger.done_writer("r1~w1")
    compactor = upkeep.Compactor(ledger, "r1", lambda p, final=False: None, lambda: True, clock=lambda: 0.0)
    compactor(SimpleNamespace(done=0, gone=set(), segments=0, workers=1))  # the session's first step

    def compacted_rows(done: int, segments: int, workers: int) -> int:
        compactor(SimpleNamespace(done=done, gone=set(), segments=segments, workers=workers))
        compactor.join()
        folder = tmp_path / "job" / "compact"
        return newest_index(folder)["rows"] if folder.exists() and os.listdir(folder) else 0

    compacted = []
    for i in range(7):
        out.write(DoneRecord(batch=bid(i), run="r1", attempt=1, items=1, returned=1, part=None), b"row\n")
        compacted.append(compacted_rows(i + 1, i + 1, workers=1))  # a segment per batch
    assert compacted == [0, 0, 3, 3, 3, 6, 6]
    # With many workers, COMPACT_SEGMENTS_PER_WORKER each: every compaction lists each one's open folder.
    monkeypatch.setattr(upkeep, "COMPACT_SEGMENTS_PER_WORKER", 2)
    compactor = upkeep.Compactor(ledger, "r1", lambda p, final=False: None, lambda: True, clock=lambda: 0.0)
    compactor(SimpleNamespace(done=7, gone=set(), segments=7, workers=3))
    out.write(DoneRecord(batch=bid(7), run="r1", attempt=1, items=1, returned=1, part=None), b"row\n")
    assert [compacted_rows(8, segments, workers=3) for segments in (12, 13)] == [6, 8]  # 6 since: 3 workers x 2


def test_a_session_compacts_its_failed_records_every_compact_seconds_if_any_were_stored(tmp_path, monkeypatch):
    # A slow, flaky job stores a failed-records file for each failure (at most one a second): far
    # fewer than COMPACT_EVERY records in hours, and every status reads each file not compacted.
    from types import SimpleNamespace

    from raypar.engine import upkeep

    ledger = planned(tmp_path, 8)
    ledger.gather_failures("r1", seconds=0)
    now, runs = [0.0], []
    compact_failures = Ledger.compact_failures
    monkeypatch.setattr(Ledger, "compact_failures", lambda self, run, **kw: runs.append(now[0]) or
                        compact_failures(self, run, **kw))
    compactor = upkeep.Compactor(ledger, "r1", lambda p, final=False: None, lambda: True, clock=lambda: now[0])

    def step(at: float, failing: int | None = None) -> int:
        if failing is not None:
            ledger.record_failed(FailedRecord(batch=bid(failing), run="r1", attempt=1, kind="user", final=True,
                                              error=f"e{failing}"))
        now[0] = at
        compactor(SimpleNamespace(done=0, gone=set(), segments=0, workers=1))  # stores the gathered record, maybe compacts
        compactor.join()
        index = [n for n in ledger.store.list_files("failed-compact") if n.endswith(".idx")]
        return json.loads(Path(index[0]).read_bytes())["rows"] if index else 0

    period = upkeep.COMPACT_SECONDS
    assert step(period - 1, failing=0) == 0 and runs == []  # stored, not yet the time
    assert step(period) == 1 and runs == [period]
    assert step(3 * period) == 1 and runs == [period]  # the time, but nothing new was stored
    assert step(3 * period, failing=1) == 2 and runs == [period, 3 * period]


def lean_and_full(ledger: Ledger) -> tuple:
    """What a resume plans with and status shows, from the lean view and from the full one."""
    views = [Ledger(ledger.url).view(lean=lean) for lean in (True, False)]
    return tuple((sorted(v.done), [b.id for b in v.pending()], v.counts(), v.unreturned_items(), v.lean)
                 for v in views)


def test_the_lean_view_agrees_with_the_records(tmp_path, monkeypatch):
    import raypar.jobdir.tables as tables

    monkeypatch.setattr(tables, "ROWS_PER_BATCH", 2)  # compact files of several record batches
    ledger = planned(tmp_path, 12)
    out = ledger.done_writer("r1~w1")
    for i in range(7):  # batch 3 leaves one item unreturned
        out.write(DoneRecord(batch=bid(i), run="r1", attempt=1, items=2, returned=1 if i == 3 else 2,
                             part=None), f"row {i}\n".encode())
    ledger.compact("r1")
    out.write(DoneRecord(batch=bid(2), run="r1", attempt=2, items=2, returned=2, part=None), b"again\n")
    finish(ledger, 8, run="r2")  # read since the compaction
    finish(ledger, 9, run="r2")
    ledger.void(ledger.view().done[bid(5)], "rows changed")  # voided after it was compacted
    rows = tmp_path / "job" / "parts" / "r1~w1.data"
    with open(rows, "r+b") as f:  # batch 2's second attempt cut short: its first attempt still counts
        f.truncate(rows.stat().st_size - 1)
    fail(ledger, 10, final=True)

    lean, full = lean_and_full(ledger)
    assert lean[:4] == full[:4] and (lean[4], full[4]) == (True, False)
    assert lean[0] == [bid(i) for i in (0, 1, 2, 3, 4, 6, 8, 9)]
    assert lean[3] == 1 and lean[2]["failed"] == 1

    arrow = next(p for p in (tmp_path / "job" / "compact").iterdir() if p.suffix == ".arrow")
    arrow.write_bytes(arrow.read_bytes()[:-10])  # a damaged compact file: both fall back to the records
    lean, full = lean_and_full(ledger)
    assert lean[:4] == full[:4] and lean[0] == [bid(i) for i in (0, 1, 2, 3, 4, 6, 8, 9)]


def test_a_silent_lease_from_another_host_is_waited_out_then_taken(tmp_path):
    # A driver lost with its cluster (a KubeRay retry): its lease outlives it until the TTL ends.
    from raypar.engine.session_lease import claim_lease

    ledger = Ledger(str(tmp_path))
    write_lease(ledger, host="lost-head-pod", pid=4242, ttl=2.0)
    said = []
    claim_lease(ledger, "retry", said.append)
    assert ledger.lease.read()["run"] == "retry"
    assert len(said) == 1 and "leased by pid 4242 on lost-head-pod" in said[0]


def test_a_beating_lease_from_another_host_is_refused(tmp_path):
    from raypar.engine.session_lease import claim_lease

    ledger = Ledger(str(tmp_path))
    write_lease(ledger, host="live-head-pod", pid=4242, ttl=3.0)
    stop = threading.Event()

    def beat():  # the other driver is alive: its heartbeat moves
        while not stop.wait(0.2):
            write_lease(ledger, host="live-head-pod", pid=4242, ttl=3.0)

    beating = threading.Thread(target=beat)
    beating.start()
    try:
        with pytest.raises(LeaseHeldError, match="pid 4242 on live-head-pod"):
            claim_lease(ledger, "second", lambda line: None)
    finally:
        stop.set()
        beating.join()
    assert ledger.lease.read()["run"] == "other"


@pytest.mark.parametrize("listing_fails", [False, True])
def test_planning_hands_the_process_its_switch_interval_back(tmp_path, listing_fails):
    """The planner shortens Python's switch interval while it runs, so that the scheduler's thread
    gets Python's lock back soon after each call into Ray; a program that runs raypar in-process
    gets its own interval back when planning ends, also when the listing fails."""
    seen = []

    def batches():
        for batch in make_batches(3):
            seen.append(sys.getswitchinterval())
            yield batch
        if listing_fails:
            raise OSError("the listing broke")

    own = sys.getswitchinterval()
    sys.setswitchinterval(0.004)
    try:
        feed = PlanFeed(Ledger(str(tmp_path / "job")), batches())
        feed.start()
        feed.join(timeout=30)
        assert seen == [PLANNING_SWITCH_INTERVAL] * 3
        assert sys.getswitchinterval() == pytest.approx(0.004)
        assert feed.finished.is_set()
        assert (feed.error or "").startswith("planning failed: OSError: the listing broke") == listing_fails
    finally:
        sys.setswitchinterval(own)


def test_two_planners_at_once_give_the_switch_interval_back_when_the_last_one_ends(tmp_path):
    """Two jobs run from threads of one program plan at once: the planner that started first and
    ends first leaves the short interval to the other, and the program's own comes back when the
    other ends."""
    later_started, earlier_ended = threading.Event(), threading.Event()
    seen_by_later = []

    def earlier():
        yield from make_batches(2)
        assert later_started.wait(30)

    def later():
        later_started.set()
        yield from make_batches(2)
        assert earlier_ended.wait(30)
        seen_by_later.append(sys.getswitchinterval())

    own = sys.getswitchinterval()
    sys.setswitchinterval(0.004)
    try:
        first = PlanFeed(Ledger(str(tmp_path / "earlier")), earlier())
        first.start()
        second = PlanFeed(Ledger(str(tmp_path / "later")), later())
        second.start()
        first.join(timeout=30)
        earlier_ended.set()
        second.join(timeout=30)
        assert first.error is None and second.error is None
        assert seen_by_later == [PLANNING_SWITCH_INTERVAL]
        assert sys.getswitchinterval() == pytest.approx(0.004)
    finally:
        sys.setswitchinterval(own)


def test_an_added_file_that_a_batch_already_reads_is_never_planned_again(tmp_path):
    # Job dirs planned before every input's version was recorded (an MLTable's folders) list
    # such files as "added": a growing run records their versions and plans nothing for them.
    from raypar.engine.replan import InputChanges, append_added

    ledger = Ledger(str(tmp_path / "job"))
    batches = make_batches(3)
    batches[0] = MiniBatch(ordinal=0, kind="files", payload=batches[0].payload, item_count=2,
                           inputs={"f0.txt": "size:1 mtime:1"})  # versions recorded for some files only
    ledger.write_manifest(batches)
    changes = InputChanges(added=["g1.txt"], added_versions={"g1.txt": "size:1 mtime:2"})

    mltable_with_a_folder = {"entries": [{"kind": "folder", "value": "./rows"}]}
    assert append_added(ledger, None, mltable_with_a_folder, {}, ledger.read_manifest(), changes) == ([], 0)

    manifest = ledger.read_manifest()
    assert len(manifest) == 3 and manifest.live == 3
    assert ledger.read_input_versions()["g1.txt"] == "size:1 mtime:2"


def test_an_unfinished_plan_whose_slices_name_no_row_group_goes_on_with_its_lines_as_written(tmp_path):
    # A plan left unfinished by a raypar whose manifest lines did not name a slice's row group:
    # listing again gives the same slices with their row group, which is the same plan.
    def sliced(count, named, first_rows=0):
        for i in range(count):
            piece = {"file": "t.parquet", "rows": [first_rows + 100 * i, first_rows + 100 * i + 100]}
            if named:
                piece["row_group"] = 0
            yield MiniBatch(ordinal=i, kind="table", payload={"pieces": [piece]}, item_count=100)

    ledger = Ledger(str(tmp_path / "job"))
    writer = ledger.manifest_writer([])
    for batch in sliced(3, named=False):
        writer.add(batch)
    writer.flush()  # chunks written, the plan not complete: the driver died while listing
    assert len(ledger.read_manifest_prefix()) == 3 and ledger.read_manifest() is None

    second = PlanFeed(ledger, sliced(5, named=True))
    second.start()
    second.join(timeout=30)

    assert second.error is None
    queued = second.take()
    assert [q.row_group for q in queued] == [None] * 3 + [("t.parquet", 0)] * 2  # the old lines, as written
    assert [json.loads(q.line)["payload"]["pieces"][0]["rows"] for q in queued] == \
        [[100 * i, 100 * i + 100] for i in range(5)]

    other = Ledger(str(tmp_path / "other"))
    writer = other.manifest_writer([])
    for batch in sliced(3, named=False):
        writer.add(batch)
    writer.flush()
    changed = PlanFeed(other, sliced(5, named=True, first_rows=50))  # slices that differ: still refused
    changed.start()
    changed.join(timeout=30)
    assert "the input changed since this job started planning (mb-0000000 differs)" in changed.error
