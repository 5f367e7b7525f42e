"""One storage contract, run on local disk, Azure Blob (Azurite), S3 (moto's server) and GCS
(gcp-storage-emulator): the real protocols.

``raypar.jobdir.store`` and ``raypar.jobdir.ledger.Ledger`` must behave the same on
both: only a missing file reads as "absent", exclusive creates have exactly
one winner, and whole-file writes are seen whole or not at all.
"""

from __future__ import annotations

import base64
import gc
import json
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass

import pytest

from raypar import held_upload
from raypar.errors import LeaseHeldError, LedgerError, UsageError
from raypar.inputs.base import MiniBatch
from raypar.jobdir import layout, writers
from raypar.jobdir.layout import segment_name
from raypar.jobdir.ledger import Ledger
from raypar.jobdir.records import DoneRecord, FailedRecord
from raypar.jobdir.store import Store, open_store
from raypar.jobdir.writers import ObjectSegmentWriter, SegmentWriter
from raypar.polling import poll
from raypar.storage import atomic_output, azure_options_from_env

pytestmark = pytest.mark.timeout(60)


@dataclass
class Backend:
    name: str
    url: str  # the folder every test of this backend works in
    options: dict

    def store(self, own_client: bool = False) -> Store:
        """A Store; ``own_client`` gives it a filesystem instance of its own, as another process has."""
        return open_store(self.url, self._options(own_client))

    def ledger(self, own_client: bool = False) -> Ledger:
        return Ledger(self.url, self._options(own_client))

    def _options(self, own_client: bool) -> dict:
        return {**self.options, "skip_instance_cache": True} if own_client else dict(self.options)


@pytest.fixture(params=["local", "azure", "s3", "gcs"])
def backend(request, tmp_path) -> Backend:
    if request.param == "local":
        return Backend("local", str(tmp_path / "job"), {})
    if request.param == "azure":
        azurite = request.getfixturevalue("azurite")  # started only when an Azure case runs
        return Backend("azure", f"az://{azurite.new_container()}/job", {"connection_string": azurite.connection_string})
    server = request.getfixturevalue({"s3": "s3_server", "gcs": "gcs_server"}[request.param])
    return Backend(request.param, f"{server.protocol}://{server.new_bucket()}/job", server.options)


def race(count: int, action) -> list:
    """Run ``action(i)`` in ``count`` threads released together; their results (or exceptions), in order."""
    barrier = threading.Barrier(count)
    results: list = [None] * count

    def run(i):
        barrier.wait()
        try:
            results[i] = action(i)
        except Exception as exc:  # noqa: BLE001 - the caller asserts on it
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


# -- Store ------------------------------------------------------------------------


def test_read_bytes_of_an_absent_file_is_file_not_found(backend):
    store = backend.store()
    with pytest.raises(FileNotFoundError):
        store.read_bytes("nope.json")
    with pytest.raises(FileNotFoundError):
        store.read_bytes("no", "such", "folder.json")
    assert not store.exists("nope.json")


def test_write_atomic_writes_and_overwrites_whole(backend):
    store = backend.store()
    path = store.write_atomic(b"first", "state", "x.json")

    assert store.read_bytes("state", "x.json") == b"first"
    assert store.exists("state", "x.json")
    assert store.write_atomic(b"second, longer", "state", "x.json") == path
    assert store.read_bytes("state", "x.json") == b"second, longer"
    assert store.list_files("state") == [path]  # no temp file left beside it


def test_write_once_refuses_a_used_name(backend):
    store = backend.store()
    store.write_once(b"rows of attempt 1", "parts", "p.part")

    with pytest.raises(FileExistsError):
        backend.store(own_client=True).write_once(b"other rows", "parts", "p.part")
    assert store.read_bytes("parts", "p.part") == b"rows of attempt 1"


def test_write_new_creates_only_once(backend):
    store = backend.store()
    assert store.write_new(b"first", "job.json") is True
    assert store.write_new(b"second", "job.json") is False
    assert store.read_bytes("job.json") == b"first"


def test_write_new_race_has_exactly_one_winner(backend):
    stores = [backend.store(own_client=True) for _ in range(6)]  # six clients, as six processes
    for round_ in range(8):
        name = f"claim-{round_}.json"
        won = race(len(stores), lambda i, name=name: stores[i].write_new(f"writer {i}".encode(), "race", name))

        assert all(isinstance(w, bool) for w in won), won
        assert won.count(True) == 1, f"round {round_}: winners {won}"
        assert stores[0].read_bytes("race", name) == f"writer {won.index(True)}".encode()


def test_file_sizes_and_list_files(backend):
    store = backend.store()
    assert store.file_sizes("done") == {}
    assert store.list_files("done") == []

    store.write_atomic(b"a", "done", "a.json")
    store.write_atomic(b"bbb", "done", "b.json")
    store.write_atomic(b"cc", "done", "sub", "c.json")  # a sub-folder is not a file of done/
    store.write_atomic(b"d", "done-other", "d.json")  # nor is a sibling sharing the prefix
    store.write_atomic(b"e", "done.json")

    assert store.file_sizes("done") == {store.path("done", "a.json"): 1, store.path("done", "b.json"): 3}
    assert store.list_files("done") == [store.path("done", "a.json"), store.path("done", "b.json")]
    # Files written through another client appear at once: nothing serves a stale listing.
    backend.store(own_client=True).write_atomic(b"ffff", "done", "f.json")
    assert store.file_sizes("done")[store.path("done", "f.json")] == 4


def test_listings_of_several_folders_at_once(backend):
    store = backend.store()
    store.write_atomic(b"a", "done", "a.json")
    store.write_atomic(b"bb", "parts", "b.seg")
    store.write_atomic(b"ccc", "parts", "sub", "c.seg")  # a sub-folder's file is not a file of parts/

    assert store.listings(["done", "parts", "void", "parts/sub"]) == {
        "done": ({store.path("done", "a.json"): 1}, []),
        "parts": ({store.path("parts", "b.seg"): 2}, [store.path("parts", "sub")]),  # its folder, named
        "void": ({}, []),  # absent: empty, as file_sizes says
        "parts/sub": ({store.path("parts", "sub", "c.seg"): 3}, []),
    }
    assert store.listings([]) == {}


def test_write_many_writes_each_file_whole(backend):
    store = backend.store()
    store.write_atomic(b"old", "reports", "job_result.txt")
    files = {"reports/job_result.txt": b"new", "reports/errors/batch-1.txt": b"trace 1",
             **{f"reports/errors/batch-{i}.txt": f"trace {i}".encode() for i in range(2, 40)}}

    store.write_many(files)

    reader = backend.store(own_client=True)
    assert reader.read_many([reader.path(name) for name in files]) == {
        reader.path(name): data for name, data in files.items()}  # the old file replaced
    store.write_many({})  # nothing to write: no request, no error


def test_read_many_skips_absent_files(backend):
    store = backend.store()
    store.write_atomic(b"one", "failed", "1.json")
    store.write_atomic(b"two", "failed", "2.json")
    paths = [store.path("failed", "1.json"), store.path("failed", "gone.json"),
             store.path("failed", "2.json"), store.path("absent-folder", "x.json")]

    assert store.read_many(paths) == {paths[0]: b"one", paths[2]: b"two"}
    assert store.read_many([]) == {}


def test_read_ranges_and_size(backend):
    store = backend.store()
    store.write_atomic(b"0123456789", "parts", "seg")
    present, absent = store.path("parts", "seg"), store.path("parts", "gone")
    got = store.read_ranges([present, absent, present, present], [2, 0, None, 7], [5, 4, None, None])
    assert got[0] == b"234" and got[2] == b"0123456789" and got[3] == b"789"
    assert isinstance(got[1], FileNotFoundError)
    assert store.read_range(present, 8) == b"89"
    assert store.size(present) == 10
    with pytest.raises(FileNotFoundError):
        store.size(absent)


def test_what_the_medium_offers(backend):
    # Local disk appends in place and has real paths; an object store has neither.
    store = backend.store()
    local = backend.name == "local"
    assert store.appends is local
    assert (store.local_path("logs") == store.path("logs")) if local else store.local_path("logs") is None


def test_remove_of_an_absent_file_is_quiet(backend):
    store = backend.store()
    store.remove("lease.json")
    store.write_atomic(b"x", "lease.json")
    store.remove("lease.json")
    assert not store.exists("lease.json")
    with pytest.raises(FileNotFoundError):
        store.read_bytes("lease.json")


def test_atomic_output_is_published_whole(backend):
    store = backend.store()
    url = backend.url + "/out/result.txt"
    chunk = bytes(range(256)) * 256  # 64 KiB
    with atomic_output(url, backend.options) as f:
        for _ in range(40):
            f.write(chunk)
        assert not store.exists("out", "result.txt")  # nothing visible before the end

    assert store.read_bytes("out", "result.txt") == chunk * 40
    assert store.list_files("out") == [store.path("out", "result.txt")]


def test_an_empty_atomic_output_is_published_empty(backend):
    """A job whose batches all returned no rows still has its (empty) output file."""
    store = backend.store()
    url = backend.url + "/out/result.txt"
    with atomic_output(url, backend.options):
        pass
    assert store.read_bytes("out", "result.txt") == b""
    assert store.list_files("out") == [store.path("out", "result.txt")]


def write_then_fail(url: str, options: dict) -> None:
    """As outputs.assemble does on a corrupt part: the handle dies with this frame."""
    with atomic_output(url, options) as out:
        out.write(b"partial rows\n" * 10_000)
        raise RuntimeError("corrupt part")


def test_atomic_output_publishes_nothing_on_error(backend):
    store = backend.store()
    url = backend.url + "/out/result.txt"
    for content in (None, b"the previous output\n"):  # a first output, then a replacement
        if content is not None:
            with atomic_output(url, backend.options) as f:
                f.write(content)
        with pytest.raises(RuntimeError):
            write_then_fail(url, backend.options)
        gc.collect()  # the handle the failed writer left behind must not publish when collected either

        if content is None:
            assert not store.exists("out", "result.txt")
            assert store.list_files("out") == []
        else:
            assert store.read_bytes("out", "result.txt") == content
            assert store.list_files("out") == [store.path("out", "result.txt")]


def uploaded_so_far(backend: Backend, url: str, handle=None) -> int:
    """Bytes of ``url`` the service holds but does not show yet, as the service answers (GCS: of
    the upload session of ``handle``, a write handle or its session's URI)."""
    fs = backend.store(own_client=True).fs
    bucket, key = url.split("://", 1)[1].split("/", 1)
    if backend.name == "s3":
        uploads = [u for u in fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key).get("Uploads", [])
                   if u["Key"] == key]
        return sum(part["Size"] for u in uploads
                   for part in fs.call_s3("list_parts", Bucket=bucket, Key=key, UploadId=u["UploadId"]).get("Parts", []))
    if backend.name == "azure":
        from azure.storage.blob import BlobClient

        blob = BlobClient.from_connection_string(backend.options["connection_string"], bucket, key)
        try:
            return sum(b.size for b in blob.get_block_list("uncommitted")[1])
        except Exception:  # noqa: BLE001 - no blob at all, not even uncommitted blocks
            return 0
    session = handle if isinstance(handle, str) else handle.handle.location
    if session is None:
        return 0  # not started yet
    headers, _ = fs.call("PUT", session, headers={"Content-Range": "bytes */*", "Content-Length": "0"})
    return int(headers["Range"].rsplit("-", 1)[1]) + 1 if "Range" in headers else 0  # a GCS upload session


@pytest.mark.parametrize("backend", ["azure", "s3", "gcs"], indirect=True)
def test_a_remote_output_is_uploaded_while_written_and_appears_only_when_committed(backend, monkeypatch):
    monkeypatch.setattr(held_upload, "PART_BYTES", 5 << 20)  # S3's smallest part
    store = backend.store()
    url = backend.url + "/out/result.bin"
    chunk = os.urandom(1 << 20)
    with atomic_output(url, backend.options) as f:
        for _ in range(12):
            f.write(chunk)
        # two parts are on the service already (a thread of the handle's sends them)
        assert poll(lambda: uploaded_so_far(backend, url, f) >= 10 << 20, timeout=30, interval=0.05)
        assert not store.exists("out", "result.bin")  # and nothing is visible before the end

    assert store.read_bytes("out", "result.bin") == chunk * 12
    if backend.name != "gcs":  # (a GCS session is asked through its handle, gone now)
        assert uploaded_so_far(backend, url) == 0  # nothing left uncommitted
    assert store.list_files("out") == [store.path("out", "result.bin")]


@pytest.mark.parametrize("backend", ["azure", "s3", "gcs"], indirect=True)
def test_an_output_that_fails_after_its_first_parts_are_uploaded_publishes_nothing(backend, monkeypatch):
    monkeypatch.setattr(held_upload, "PART_BYTES", 5 << 20)
    store = backend.store()
    url = backend.url + "/out/result.txt"
    with pytest.raises(RuntimeError), atomic_output(url, backend.options) as f:
        f.write(os.urandom(6 << 20))
        assert poll(lambda: uploaded_so_far(backend, url, f) >= 5 << 20, timeout=30, interval=0.05)
        session = getattr(f.handle, "location", None)  # (GCS: its upload session, which discard() forgets)
        raise RuntimeError("corrupt part")
    gc.collect()  # nor when its handle is collected
    assert not store.exists("out", "result.txt")
    assert store.list_files("out") == []
    if backend.name == "s3":
        assert uploaded_so_far(backend, url) == 0  # the multipart upload was aborted, not left billing
    if backend.name == "gcs":
        with pytest.raises(FileNotFoundError):
            uploaded_so_far(backend, url, session)  # the upload session was canceled


@pytest.mark.parametrize("backend", ["azure", "s3", "gcs"], indirect=True)
def test_a_missing_bucket_is_told_from_one_that_exists(backend):
    """What the driver asks before a job whose output goes there runs (not after its last batch)."""
    fs = backend.store().fs
    bucket = backend.url.split("://", 1)[1].split("/", 1)[0]
    held_upload.look_at_bucket(fs, f"{bucket}/out/x.txt")  # there: no answer
    with pytest.raises(FileNotFoundError):
        held_upload.look_at_bucket(fs, "raypar-no-such-bucket/out/x.txt")


KILLED_WRITER = """
import sys
from raypar import held_upload
from raypar.storage import atomic_output
held_upload.PART_BYTES = 5 << 20
with atomic_output(sys.argv[1], {options}) as f:
    f.write(b"old rows " * (2 << 20))
    sys.stdin.read()  # killed while here, its output half uploaded
"""


@pytest.mark.parametrize("backend", ["azure", "s3"], indirect=True)
def test_a_writer_killed_mid_upload_leaves_nothing_visible_and_the_next_one_clears_its_parts(backend):
    store = backend.store()
    url = backend.url + "/out/result.txt"
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER.format(options=repr(backend.options)), url],
                              stdin=subprocess.PIPE)
    try:
        assert poll(lambda: uploaded_so_far(backend, url) >= 10 << 20, timeout=30, interval=0.05)  # its parts
    finally:
        writer.kill()  # SIGKILL: nothing of it runs after this
        writer.wait(timeout=30)
    assert not store.exists("out", "result.txt")

    with atomic_output(url, backend.options) as f:
        f.write(b"new rows\n")
    assert store.read_bytes("out", "result.txt") == b"new rows\n"
    assert uploaded_so_far(backend, url) == 0  # S3: aborted by the new writer; Azure: dropped by its commit


def test_a_session_s_worker_time_is_recorded_once_and_listed_in_run_order(backend):
    ledger = backend.ledger()
    ledger.record_worker_time("r20261207-b", "lost", {"workers": 1, "run()": 5.0})  # from a killed driver's lease
    ledger.record_worker_time("r20261207-b", "failed", {"workers": 9, "run()": 1.0})  # the first record stays
    ledger.record_worker_time("r20261207-a", "succeeded", {"workers": 2, "run()": 3.0})

    assert [(r["run"], r["ended"], r["worker_time"]["workers"]) for r in backend.ledger(own_client=True).worker_times()] \
        == [("r20261207-a", "succeeded", 2), ("r20261207-b", "lost", 1)]


def test_an_auth_error_never_reads_as_absent(azurite):
    container = azurite.new_container()
    good = open_store(f"az://{container}/job", {"connection_string": azurite.connection_string})
    good.write_atomic(b"{}", "job.json")
    good.write_atomic(b"{}", "done", "a.json")
    wrong_key = base64.b64encode(b"not the key".ljust(64, b"!")).decode()  # well-formed, wrong
    bad_options = {"connection_string": azurite.connection_string.replace(azurite.account_key, wrong_key)}
    bad = open_store(f"az://{container}/job", bad_options)

    for name, call in [
        ("read_bytes of a file", lambda: bad.read_bytes("job.json")),
        ("read_bytes of an absent file", lambda: bad.read_bytes("nope.json")),
        ("exists of a file", lambda: bad.exists("job.json")),
        ("exists of an absent file", lambda: bad.exists("nope.json")),
        ("file_sizes", lambda: bad.file_sizes("done")),
        ("file_sizes of an absent folder", lambda: bad.file_sizes("nope")),
        ("list_files", lambda: bad.list_files("done")),
        ("read_many", lambda: bad.read_many([bad.path("done", "a.json")])),
        ("load_job", lambda: Ledger(bad.root, bad_options).load_job()),
    ]:
        with pytest.raises(Exception) as info:
            call()
        assert not isinstance(info.value, (FileNotFoundError, UsageError)), f"{name}: {info.value!r}"
        assert "authenticate" in str(info.value), f"{name}: {info.value!r}"


def test_a_malformed_connection_string_is_a_setting_not_a_missing_package():
    with pytest.raises(LedgerError) as info:
        open_store("az://container/job", {"connection_string": "not a connection string"})
    assert "cannot open 'az://'" in info.value.headline
    assert "pip install" not in info.value.headline


def test_azure_options_from_env():
    key, sas, cs = "k3y==", "sv=2024&sig=abc", "DefaultEndpointsProtocol=https;AccountName=a;AccountKey=k"
    assert azure_options_from_env({}) == {}
    assert azure_options_from_env({"AZURE_STORAGE_CONNECTION_STRING": cs, "AZURE_STORAGE_ACCOUNT_NAME": "b"}) \
        == {"connection_string": cs}
    assert azure_options_from_env({"AZURE_STORAGE_ACCOUNT_NAME": "acct", "AZURE_STORAGE_ACCOUNT_KEY": key,
                                   "AZURE_STORAGE_SAS_TOKEN": sas}) == {"account_name": "acct", "account_key": key}
    assert azure_options_from_env({"AZURE_STORAGE_ACCOUNT_NAME": "acct", "AZURE_STORAGE_SAS_TOKEN": sas}) \
        == {"account_name": "acct", "sas_token": sas}
    principal = {"AZURE_STORAGE_CLIENT_ID": "id", "AZURE_STORAGE_CLIENT_SECRET": "s", "AZURE_STORAGE_TENANT_ID": "t"}
    assert azure_options_from_env({"AZURE_STORAGE_ACCOUNT_NAME": "acct", **principal}) \
        == {"account_name": "acct", "client_id": "id", "client_secret": "s", "tenant_id": "t"}
    assert azure_options_from_env({"AZURE_STORAGE_ACCOUNT_NAME": "acct"}) == {"account_name": "acct"}
    assert azure_options_from_env({"AZURE_STORAGE_ACCOUNT_KEY": key}) == {}  # a key without its account


def test_azure_options_from_env_reach_azurite(azurite, monkeypatch):
    options = azure_options_from_env({"AZURE_STORAGE_CONNECTION_STRING": azurite.connection_string})
    for var in ("AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT_KEY"):
        monkeypatch.delenv(var, raising=False)  # as on a worker: only the explicit options
    store = open_store(f"az://{azurite.new_container()}/job", options)
    store.write_atomic(b"hello", "x.txt")
    assert store.read_bytes("x.txt") == b"hello"


# -- Ledger -----------------------------------------------------------------------


def make_batches(count: int) -> list[MiniBatch]:
    return [MiniBatch(ordinal=i, kind="files", payload={"files": [f"f{i}.txt"]}, item_count=1) for i in range(count)]


def bid(ordinal: int) -> str:
    return f"mb-{ordinal:07d}"


def done(writer, ordinal: int, run: str = "r1", attempt: int = 1) -> tuple[DoneRecord, bytes]:
    rows = f"rows of {bid(ordinal)} ({run}/{attempt})\n".encode()
    record = DoneRecord(batch=bid(ordinal), run=run, attempt=attempt, items=1, returned=1, part=None)
    return writer.write(record, rows), rows


def pending_ids(ledger: Ledger) -> list[str]:
    return [b.id for b in ledger.view().pending()]


def test_ledger_create_once_and_load(backend):
    ledger = backend.ledger()
    with pytest.raises(UsageError, match="not a raypar job dir"):
        ledger.load_job()
    assert not ledger.exists()

    job = ledger.create({"type": "parallel", "name": "x"}, "type: parallel\nname: x\n")
    with pytest.raises(UsageError, match="already holds"):
        backend.ledger(own_client=True).create({"name": "second"}, "name: second\n")

    assert ledger.exists()
    assert ledger.load_job() == job
    assert ledger.store.read_bytes("spec.yml") == b"type: parallel\nname: x\n"


def test_ledger_manifest_round_trip(backend, monkeypatch):
    import raypar.jobdir.ledger as ledger_module

    monkeypatch.setattr(ledger_module, "CHUNK_SIZE", 3)  # several chunks
    ledger = backend.ledger()
    assert ledger.read_manifest() is None
    batches = make_batches(7)

    assert ledger.write_manifest(batches) == 7
    manifest = backend.ledger(own_client=True).read_manifest()
    assert [manifest[i] for i in range(len(manifest))] == batches
    assert pending_ids(ledger) == [b.id for b in batches]


def test_ledger_done_records_and_the_resume_rule(backend):
    ledger = backend.ledger()
    ledger.write_manifest(make_batches(6))
    writer = ledger.done_writer("r1~w1")
    assert isinstance(writer, SegmentWriter if backend.name == "local" else ObjectSegmentWriter)

    written = dict(done(writer, o) for o in (4, 1))
    assert pending_ids(ledger) == [bid(0), bid(2), bid(3), bid(5)]

    # Another worker process, with its own client, records a batch: the driver sees it on its next read.
    other = backend.ledger(own_client=True)
    record, rows = done(other.done_writer("r1~w2"), 2)
    written[record] = rows
    view = ledger.view()
    assert [b.to_json() for b in view.pending()] == [b.to_json() for b in make_batches(6) if b.ordinal in (0, 3, 5)]
    assert sorted(view.done) == [bid(1), bid(2), bid(4)]
    for record, rows in written.items():
        assert ledger.read_rows(view.done[record.batch]) == rows
    assert bid(2) in ledger.view().done and bid(3) not in ledger.view().done


def stored_segments(ledger) -> list[str]:
    """The segments under parts/, at any depth, by their names there."""
    root = ledger.store.path("parts")
    return sorted(p[len(root) + 1:] for p in ledger.store.fs.find(root) if p.endswith(".seg"))


def seg(number: int, writer: str = "r1~w1") -> str:
    return segment_name(writer, number)


def test_a_worker_stores_its_done_batches_in_one_segment_per_flush(backend):
    from conftest import wait_for

    ledger = backend.ledger()
    ledger.write_manifest(make_batches(8))
    writer = ledger.done_writer("r1~w1", {"flush_batches": 3, "flush_bytes": 1 << 30, "flush_seconds": 3600})
    written = dict(done(writer, o) for o in (5, 2))
    local = backend.name == "local"
    # Local disk appends each batch at once; an object store holds them until the flush.
    assert sorted(ledger.view().done) == ([bid(2), bid(5)] if local else [])
    assert (writer.written, writer.durable) == (2, 2 if local else 0)
    assert ledger.recent_done("r1~w1", 0) == ({bid(2), bid(5)} if local else set())
    before = writer.position
    written.update([done(writer, 7)])  # the third: flush_batches reached (stored by the clock's thread)
    wait_for(lambda: writer.durable == 3, "the full segment to be stored")
    view = ledger.view()
    assert sorted(view.done) == [bid(2), bid(5), bid(7)]
    for record, rows in written.items():
        assert ledger.read_rows(view.done[record.batch]) == rows
    assert ledger.recent_done("r1~w1", before) == ({bid(7)} if local else {bid(2), bid(5), bid(7)})
    assert ledger.recent_done("r1~w1", writer.position) == set()
    if not local:  # one object for the three batches: rows, records and trailer
        assert stored_segments(ledger) == [seg(0)]
        done(writer, 0)
        writer.flush()
        assert ledger.recent_done("r1~w1", before + 1) == {bid(0)}
    # A segment cut short (a foreign or damaged object) never counts; the others still do.
    if not local:
        path = ledger.store.path("parts", seg(1))
        ledger.store.put(path, ledger.store.read_range(path)[:-5])
        assert sorted(backend.ledger(own_client=True).view().done) == [bid(2), bid(5), bid(7)]


def test_a_worker_stores_a_lone_done_batch_within_flush_seconds(backend):
    from conftest import wait_for

    ledger = backend.ledger()
    ledger.write_manifest(make_batches(2))
    writer = ledger.done_writer("r1~w1", {"flush_batches": 100, "flush_bytes": 1 << 30, "flush_seconds": 0.2})
    done(writer, 1)  # then the worker runs a long batch: nobody calls the writer again
    wait_for(lambda: bid(1) in backend.ledger(own_client=True).view().done, "the record to be stored by the clock")
    assert writer.durable == 1


def azure_ledger(azurite) -> Ledger:
    return Ledger(f"az://{azurite.new_container()}/job", {"connection_string": azurite.connection_string})


def test_a_segment_the_clock_is_storing_does_not_hold_up_the_next_batches(azurite):
    # Azure Blob frozen (SIGSTOP) while the clock thread stores a segment: that PUT waits, the
    # worker's next batches do not (before, the clock held the buffer's lock through its PUT).
    from conftest import wait_for

    ledger = azure_ledger(azurite)
    ledger.write_manifest(make_batches(5))
    writer = ledger.done_writer("r1~w1", {"flush_batches": 100, "flush_bytes": 1 << 30, "flush_seconds": 0.2})
    os.kill(azurite.pid, signal.SIGSTOP)
    try:
        written = dict([done(writer, 0)])
        wait_for(lambda: writer.cut is not None, "the clock to start storing the first segment")
        later = threading.Thread(target=lambda: written.update(done(writer, o) for o in range(1, 5)))
        later.start()
        later.join(timeout=10)
        assert not later.is_alive()  # four more batches written while the PUT is stuck
        assert (writer.written, writer.durable, writer.position) == (5, 0, 0)
    finally:
        os.kill(azurite.pid, signal.SIGCONT)
    writer.flush()  # the stuck segment first, then the four written meanwhile

    assert (writer.durable, writer.position) == (5, 2)
    assert stored_segments(ledger) == [seg(0), seg(1)]
    view = Ledger(ledger.url, {"connection_string": azurite.connection_string}).view()
    assert sorted(view.done) == [bid(o) for o in range(5)]
    for record, rows in written.items():
        assert ledger.read_rows(view.done[record.batch]) == rows


def test_a_full_segment_is_stored_beside_the_next_batches_and_the_next_full_one_waits_for_it(azurite):
    # Azure Blob frozen (SIGSTOP): the write that fills a segment returns while the clock's thread
    # stores it (before, the worker stored it itself, and its next run() waited for the PUT); the
    # write that fills a second waits for the first, so no more than two are held.
    from conftest import wait_for

    ledger = azure_ledger(azurite)
    ledger.write_manifest(make_batches(4))
    writer = ledger.done_writer("r1~w1", {"flush_batches": 2, "flush_bytes": 1 << 30, "flush_seconds": 3600})
    written = {}
    os.kill(azurite.pid, signal.SIGSTOP)
    try:
        first = threading.Thread(target=lambda: written.update(done(writer, o) for o in (0, 1)))
        first.start()
        first.join(timeout=10)
        assert not first.is_alive()  # the segment is full, its PUT stuck, and the writes returned
        wait_for(lambda: writer.cut is not None, "the clock's thread to store the first segment")
        second = threading.Thread(target=lambda: written.update(done(writer, o) for o in (2, 3)))
        second.start()
        second.join(timeout=0.5)
        assert second.is_alive()  # it filled the second: it waits for the first to be stored
        assert (writer.written, writer.durable) == (4, 0)
    finally:
        os.kill(azurite.pid, signal.SIGCONT)
    second.join(timeout=30)
    assert not second.is_alive()
    writer.flush()

    assert (writer.durable, writer.position) == (4, 2)
    assert stored_segments(ledger) == [seg(0), seg(1)]
    view = Ledger(ledger.url, {"connection_string": azurite.connection_string}).view()
    assert sorted(view.done) == [bid(o) for o in range(4)]
    for record, rows in written.items():
        assert ledger.read_rows(view.done[record.batch]) == rows


def test_a_segment_whose_put_failed_is_stored_again_under_its_name(azurite):
    # The container is gone when the first flush runs: that PUT fails, the next flush stores the
    # same segment under the same name (its records name it), then what came after it.
    ledger = azure_ledger(azurite)
    ledger.write_manifest(make_batches(4))
    container = ledger.url.split("/")[2]
    writer = ledger.done_writer("r1~w1", {"flush_batches": 2, "flush_bytes": 1 << 30, "flush_seconds": 3600})
    written = dict([done(writer, 0)])
    fs = ledger.store.fs
    manifest = {p: fs.cat_file(p) for p in fs.find(container)}
    fs.rm(container, recursive=True)
    from azure.core.exceptions import ResourceNotFoundError
    from conftest import wait_for

    written.update([done(writer, 1)])  # the second: flush_batches reached, the clock's thread stores it
    wait_for(lambda: writer.failure is not None, "the segment's PUT to fail")
    assert (writer.written, writer.durable) == (2, 0)
    fs.mkdir(container)
    fs.pipe(manifest)
    written.update([done(writer, 2)])  # into the next segment: the failed one is not reopened
    with pytest.raises(ResourceNotFoundError):
        writer.flush()  # the failure, raised to the next caller that stores
    writer.flush()  # the failed segment under its own name, then the next

    assert (writer.durable, writer.position) == (3, 2)
    assert stored_segments(ledger) == [seg(0), seg(1)]
    view = Ledger(ledger.url, {"connection_string": azurite.connection_string}).view()
    assert sorted(view.done) == [bid(0), bid(1), bid(2)]
    for record, rows in written.items():
        assert ledger.read_rows(view.done[record.batch]) == rows


OBJECT_STORES = ["azure", "s3", "gcs"]


def two_segments_a_folder(backend, monkeypatch, batches: int):
    """A ledger of ``batches`` planned, whose writers store two segments to a folder."""
    monkeypatch.setattr(layout, "SEGMENTS_PER_FOLDER", 2)
    ledger = backend.ledger()
    ledger.write_manifest(make_batches(batches))
    return ledger


def viewed(ledger, written: dict) -> tuple[list[str], list[str]]:
    """A view of ``ledger``: its done batches and the folders of parts/ it listed (by name there,
    "" for parts/ itself); every row of ``written`` ({record: rows}) read back through it."""
    from conftest import record_listings

    seen = record_listings(ledger.store)
    view = ledger.view()
    for record, rows in written.items():
        assert ledger.read_rows(view.done[record.batch]) == rows
    return sorted(view.done), sorted(seen)


def one_per_segment(ledger, writer: str):
    return ledger.done_writer(writer, {"flush_batches": 1, "flush_bytes": 1 << 30, "flush_seconds": 0})


@pytest.mark.parametrize("backend", OBJECT_STORES, indirect=True)
def test_a_view_lists_only_the_segment_folders_no_compaction_closed(backend, monkeypatch):
    ledger = two_segments_a_folder(backend, monkeypatch, 10)
    writer = one_per_segment(ledger, "r1~w1")
    written = dict(done(writer, o) for o in range(7))  # segments 0-6: folders f0-f2 full, f3 begun
    assert stored_segments(ledger) == [seg(n) for n in range(7)]
    assert [seg(n).split("/")[0] for n in (0, 2, 4, 6)] == [f"r1~w1~f0000{f}" for f in range(4)]

    from conftest import record_listings

    seen = record_listings(ledger.store)
    assert sorted(ledger.view().done) == [bid(o) for o in range(7)]
    assert sorted(seen) == ["", "r1~w1~f00000", "r1~w1~f00001", "r1~w1~f00002", "r1~w1~f00003"]

    # A compaction of that session closes the folders below the writer's last: they are whole.
    assert ledger.compact("r1")
    seen.clear()
    view = ledger.view()
    assert sorted(view.done) == [bid(o) for o in range(7)]
    assert sorted(seen) == ["", "r1~w1~f00003"]
    for record, rows in written.items():
        assert ledger.read_rows(view.done[record.batch]) == rows

    # A session after it closes the last folder of that session's writers too; its own are open.
    written.update([done(one_per_segment(ledger, "r2~w1"), 7, run="r2")])
    assert ledger.compact("r2")
    seen.clear()
    views = [ledger.view()]
    assert sorted(seen) == ["", "r2~w1~f00000"]
    for view in [*views, backend.ledger(own_client=True).view()]:
        assert sorted(view.done) == [bid(o) for o in range(8)]
        assert [b.id for b in view.pending()] == [bid(8), bid(9)]
        for record, rows in written.items():
            assert ledger.read_rows(view.done[record.batch]) == rows
    index = json.loads(ledger.store.read_bytes("compact", sorted(
        os.path.basename(p) for p in ledger.store.list_files("compact") if p.endswith(".idx"))[-1]).split(b"\n")[0])
    assert index["closed"] == {"r1~w1": 4}
    assert not [name for name in index["covers"] if name.startswith("r1~w1")]  # a closed folder's names are not kept


@pytest.mark.parametrize("backend", OBJECT_STORES, indirect=True)
def test_a_segment_stored_into_a_closed_folder_is_never_read_and_its_batch_runs_again(backend, monkeypatch):
    # Only a writer of a session that already lost the job dir could store one: like a segment
    # lost in a crash, its batch counts as not done, and the one record it gets later is the output's.
    ledger = two_segments_a_folder(backend, monkeypatch, 4)
    late = one_per_segment(ledger, "r1~w1")
    done(late, 0)
    assert ledger.compact("r2")  # another session's compaction: r1's folders are closed
    done(late, 1)  # r1~w1's segment 1, into its closed folder f0
    assert stored_segments(ledger) == [seg(0), seg(1)]
    view = backend.ledger(own_client=True).view()
    assert sorted(view.done) == [bid(0)]
    assert [b.id for b in view.pending()] == [bid(1), bid(2), bid(3)]
    record, rows = done(one_per_segment(ledger, "r2~w1"), 1, run="r2")
    view = ledger.view()
    assert sorted(view.done) == [bid(0), bid(1)]
    assert (view.done[bid(1)].run, ledger.read_rows(view.done[bid(1)])) == ("r2", rows)


@pytest.mark.parametrize("backend", OBJECT_STORES, indirect=True)
def test_the_lease_holder_closes_another_session_s_folders_whatever_its_run_id_and_a_fenced_one_closes_none(
        backend, monkeypatch):
    # No clock is compared: a session whose driver's clock ran ahead has a run ID that sorts after
    # the one holding the lease now. Its compaction, its lease lost after it listed, writes no index
    # (it would have closed the holder's open folder); the holder's closes all of its folders.
    ledger = two_segments_a_folder(backend, monkeypatch, 10)
    earlier = one_per_segment(ledger, "r9~w1")
    written = dict(done(earlier, o, run="r9") for o in range(3))  # r9~w1: f0 full, f1 begun
    holder = one_per_segment(ledger, "r1~w1")
    written.update(done(holder, o) for o in range(3, 6))  # r1~w1: f0 full, f1 begun

    assert not ledger.compact("r9", session_over=True, may_write=lambda: False)
    assert not ledger.compact_failures("r9", session_over=True, may_write=lambda: False)
    assert not [p for p in ledger.store.fs.find(ledger.store.path()) if p.endswith(".idx")]

    assert ledger.compact("r1", may_write=lambda: True)
    written.update(done(holder, o) for o in range(6, 8))  # the holder stores on: its f1 whole, f2 begun
    # None of r9's folders listed; the holder's from its last on.
    assert viewed(ledger, written) == ([bid(o) for o in range(8)], ["", "r1~w1~f00001", "r1~w1~f00002"])


@pytest.mark.parametrize("backend", OBJECT_STORES, indirect=True)
def test_a_compaction_closes_every_folder_of_a_worker_gone_during_the_session(backend, monkeypatch):
    # Nodes come and go: a replaced worker would leave its last folder open until the session's end.
    ledger = two_segments_a_folder(backend, monkeypatch, 10)
    replaced, live = one_per_segment(ledger, "r1~w1"), one_per_segment(ledger, "r1~w2")
    written = dict(done(replaced, o) for o in range(3))  # w1: f0 full, f1 begun; then its worker died
    written.update(done(live, o) for o in range(3, 6))  # w2: the same, and it stores on

    assert ledger.compact("r1", gone=frozenset({"r1~w1"}))
    assert viewed(ledger, written) == ([bid(o) for o in range(6)], ["", "r1~w2~f00001"])


@pytest.mark.parametrize("backend", OBJECT_STORES, indirect=True)
def test_a_view_falling_back_from_a_damaged_compaction_lists_the_folders_it_had_closed(backend, monkeypatch):
    ledger = two_segments_a_folder(backend, monkeypatch, 8)
    writer = one_per_segment(ledger, "r1~w1")
    written = dict(done(writer, o) for o in range(5))
    assert ledger.compact("r1")  # closes f0 and f1
    written.update(done(writer, o) for o in (5, 6))
    assert ledger.compact("r1")  # closes f2: its records in a file of their own
    newest = sorted(p for p in ledger.store.list_files("compact") if p.endswith(".arrow"))[-1]
    ledger.store.put(newest, b"not the file the index sealed")

    view = backend.ledger(own_client=True).view()
    assert sorted(view.done) == [bid(o) for o in range(7)]
    for record, rows in written.items():
        assert ledger.read_rows(view.done[record.batch]) == rows
    assert sorted(backend.ledger(own_client=True).view(lean=True).done) == [bid(o) for o in range(7)]


@pytest.mark.parametrize("backend", OBJECT_STORES, indirect=True)
def test_a_format_2_job_dir_s_segments_at_the_top_of_parts_still_count(backend, monkeypatch):
    ledger = backend.ledger()
    ledger.write_manifest(make_batches(4))
    flat = lambda writer, seq: f"{writer}~{seq:06d}.seg"  # noqa: E731 - how format 2 named them
    monkeypatch.setattr(writers, "segment_name", flat)
    old = one_per_segment(ledger, "r1~w1")
    written = dict(done(old, o) for o in (0, 1))
    monkeypatch.undo()
    assert stored_segments(ledger) == [flat("r1~w1", 0), flat("r1~w1", 1)]
    assert ledger.compact("r2")
    written.update([done(one_per_segment(ledger, "r2~w1"), 2, run="r2")])
    for view in (backend.ledger(own_client=True).view(), ledger.view()):
        assert sorted(view.done) == [bid(0), bid(1), bid(2)]
        for record, rows in written.items():
            assert ledger.read_rows(view.done[record.batch]) == rows


def test_ledger_failed_records(backend):
    ledger = backend.ledger()
    ledger.write_manifest(make_batches(4))
    for attempt, final in ((1, False), (2, True)):
        ledger.record_failed(FailedRecord(batch=bid(3), run="r1", attempt=attempt, error=f"boom {attempt}",
                                          kind="user", final=final))
    ledger.record_failed(FailedRecord(batch=bid(1), run="r1", attempt=1, error="slow", kind="timeout", final=False))
    done(ledger.done_writer("r1~w1"), 1, attempt=2)

    view = ledger.view()
    assert [r.attempt for r in view.failed[bid(3)]] == [1, 2]
    assert view.failed_batches() == {bid(3)}  # batch 1 failed once, then finished
    assert view.counts() == {"total": 4, "completed": 1, "failed": 1, "pending": 2}


def test_a_sessions_failed_records_are_stored_a_segment_at_a_time(backend, monkeypatch):
    import raypar.jobdir.ledger as ledger_module

    monkeypatch.setattr(ledger_module, "FAILED_FLUSH_RECORDS", 250)
    ledger = backend.ledger()
    ledger.write_manifest(make_batches(400))
    ledger.gather_failures("r1", seconds=3600)  # no flush by age in this test
    for i in range(300):
        ledger.record_failed(FailedRecord(batch=bid(i), run="r1", attempt=1, error=f"bad input {i}", kind="user",
                                          final=i % 2 == 0))
    # 250 gathered: stored as one segment; the other 50 wait. Another reader sees only what is stored.
    assert [p.rsplit("/", 1)[-1] for p in ledger.store.list_files("failed", "r1~f00000")] == ["r1~000000.jsonl"]
    other = backend.ledger()
    assert len(other.view().failed) == 250
    ledger.flush_failures(due_only=True)  # not old enough: nothing stored
    assert len(backend.ledger().view().failed) == 250

    view = ledger.view()  # the session's own view stores what it gathered first
    assert len(view.failed) == 300 and view.failed_batches() == {bid(i) for i in range(0, 300, 2)}
    assert len(ledger.store.list_files("failed", "r1~f00000")) == 2
    ledger.end_gathering_failures()
    ledger.record_failed(FailedRecord(batch=bid(399), run="r2", attempt=1, error="late", kind="user", final=True))
    assert bid(399) in backend.ledger().view().failed  # one by one again, stored at once


def test_a_view_reads_failed_records_a_window_at_a_time_and_keeps_one_copy_of_each_traceback(backend, monkeypatch):
    """A bug in run() that every batch hits: a million records of the same kilobyte. The view reads
    them a few files at a time and keeps each distinct text once, as Arrow dictionaries (2.6 GiB ->
    451 MiB for a million attempts, benchmarks/README.md)."""
    import raypar.jobdir.ledger as ledger_module

    monkeypatch.setattr(ledger_module, "FAILED_FLUSH_RECORDS", 10)
    monkeypatch.setattr(ledger_module, "RECORDS_WINDOW", 1)  # every file a window of its own
    ledger = backend.ledger()
    ledger.write_manifest(make_batches(60))
    ledger.gather_failures("r1", seconds=3600)
    same = "Traceback (most recent call last):\n  ...\nNameError: name 'modle' is not defined"
    for i in range(50):
        ledger.record_failed(FailedRecord(batch=bid(i), run="r1", attempt=1, kind="user", final=True, node="n" * 56,
                                          error=same if i < 40 else f"ValueError: bad row {i}"))
    ledger.end_gathering_failures()
    reads = []
    read_ranges = ledger.store.read_ranges
    monkeypatch.setattr(ledger.store, "read_ranges", lambda paths, starts, ends: reads.append(len(paths))
                        or read_ranges(paths, starts, ends))

    view = ledger.view()

    assert len(ledger.store.list_files("failed", "r1~f00000")) == 5 and reads.count(1) >= 5  # one segment per read
    assert sorted(view.failed) == [bid(i) for i in range(50)]
    assert [view.failed[bid(i)][0].error for i in (0, 39, 40, 49)] == [same, same, "ValueError: bad row 40",
                                                                       "ValueError: bad row 49"]
    columns = view.failed.table.combine_chunks()
    assert len(columns.column("error").chunks[0].dictionary) == 11  # one copy of the repeated one, not forty
    assert len(columns.column("node").chunks[0].dictionary) == 1


def failed_view(backend, **view) -> tuple[dict[str, list[str]], list[str]]:
    """A fresh ledger's view of the failed records ({batch: its tracebacks}), and the folders of
    failed/ it listed (by name there, "" for failed/ itself)."""
    from conftest import record_listings

    ledger = backend.ledger()
    seen = record_listings(ledger.store, "failed")
    failed = ledger.view(**view).failed
    return {b: [r.error for r in records] for b, records in failed.items()}, sorted(seen)


def test_a_view_lists_only_the_failed_record_folders_no_compaction_closed(backend, monkeypatch):
    """A slow, flaky job stores a segment of failed records a second at most: tens of thousands in
    a long job. The compaction of failed records closes the folders it read whole, as parts/'s:
    a view lists the top of failed/ and the folders still open, and still reads every failure."""
    import raypar.jobdir.failed_compact as failed_compact
    import raypar.jobdir.ledger as ledger_module

    ledger = two_segments_a_folder(backend, monkeypatch, 20)
    monkeypatch.setattr(ledger_module, "FAILED_FLUSH_RECORDS", 1)  # every failure a segment of its own
    errors = {}

    def fail(run: str, ordinals) -> None:
        ledger.gather_failures(run, seconds=3600)
        for o in ordinals:
            errors[bid(o)] = [f"Traceback\nValueError: bad {o} in {run}"]
            ledger.record_failed(FailedRecord(batch=bid(o), run=run, attempt=1, kind="user", final=True,
                                              error=errors[bid(o)][0]))
        ledger.end_gathering_failures()

    fail("r1", range(7))  # segments 0-6: folders f0-f2 full, f3 begun
    r1 = [f"r1~f0000{f}" for f in range(4)]
    assert failed_view(backend) == (errors, ["", *r1])

    # The session's compaction closes the folders below its last: they are whole.
    assert ledger.compact_failures("r1")
    assert failed_view(backend) == (errors, ["", "r1~f00003"])
    latest = failed_compact.latest(ledger.store, ledger.url, ledger.store.file_sizes("failed-compact"), load=False)
    assert (latest.closed, sorted(latest.covers)) == ({"r1": 3}, ["r1~f00003/r1~000006.jsonl"])
    shown, _ = failed_view(backend, lean=True, errors_of=2)  # what `raypar status` reads
    assert shown == {bid(o): errors[bid(o)] if o < 2 else [None] for o in range(7)}

    # A later session's compaction closes every folder of the earlier one, and its own below its last.
    fail("r2", range(7, 10))  # its segments 0-2: f0 full, f1 begun
    assert ledger.compact_failures("r2")
    assert failed_view(backend) == (errors, ["", "r2~f00001"])
    # Its last compaction, its failures all stored, closes the rest.
    assert ledger.compact_failures("r2", session_over=True)
    assert not ledger.compact_failures("r2", session_over=True)  # nothing new, nothing more to close
    assert failed_view(backend) == (errors, [""])

    # Tracebacks damaged in the compaction: the view reads the records themselves, every folder of them.
    piece = next(p for p in ledger.store.list_files("failed-compact") if ".errors-" in p)
    ledger.store.fs.pipe_file(piece, ledger.store.fs.cat_file(piece)[::-1])  # the same size, other bytes
    assert failed_view(backend) == (errors, ["", *r1, "r2~f00000", "r2~f00001"])


def test_failed_records_compacted_are_read_as_the_records_and_a_status_reads_only_the_pieces_it_shows(
        backend, monkeypatch):
    """On every store: the failed records' columns in one Arrow file, their tracebacks in pieces; a
    status-like view reads the columns, the records stored since, and the pieces of what it shows."""
    import raypar.jobdir.failed_compact as failed_compact
    import raypar.jobdir.ledger as ledger_module

    monkeypatch.setattr(ledger_module, "FAILED_FLUSH_RECORDS", 10)
    monkeypatch.setattr(failed_compact, "ERROR_ROWS", 4)
    ledger = backend.ledger()
    ledger.write_manifest(make_batches(40))
    ledger.gather_failures("r1", seconds=3600)
    for i in range(30):
        for attempt in (1, 2):
            ledger.record_failed(FailedRecord(batch=bid(i), run="r1", attempt=attempt, kind="user", final=attempt == 2,
                                              error=f"ValueError: bad row {i}.{attempt}"))
    ledger.end_gathering_failures()
    done(ledger.done_writer("r2~w1"), 0, run="r2")  # batch 0 retried and done
    before = backend.ledger(own_client=True).view().failed.table.to_pylist()

    assert ledger.compact_failures("r2") is True
    assert ledger.compact_failures("r2") is False
    ledger.record_failed(FailedRecord(batch=bid(35), run="r3", attempt=1, kind="user", final=True, error="late"))

    fresh = backend.ledger(own_client=True)
    assert fresh.view().failed.table.to_pylist() == before + [
        {"ordinal": 35, "run": "r3", "attempt": 1, "error": "late", "kind": "user", "final": True,
         "node": None, "worker": None, "started": None, "items": None}]
    reads = []
    read_ranges = fresh.store.read_ranges
    monkeypatch.setattr(fresh.store, "read_ranges", lambda paths, starts, ends: reads.extend(paths)
                        or read_ranges(paths, starts, ends))
    shown = fresh.view(lean=True, errors_of=2)
    assert shown.failed.last_rows(shown.failed_ordinals()[:2]).column("error").to_pylist() == [
        "ValueError: bad row 1.2", "ValueError: bad row 2.2"]
    names = [p.rsplit("/", 1)[-1] for p in reads]
    assert [p.rsplit("/", 1)[-1] for p in reads if "/failed/" in p] == [f"{bid(35)}~r3~1.json"]  # stored since
    assert [n.rsplit(".errors-")[1] for n in names if ".errors-" in n] == ["00000.arrow", "00001.arrow"]
    assert len([p for p in fresh.store.list_files("failed-compact") if ".errors-" in p]) == 15  # 60 distinct, 4 a piece


def test_the_session_reports_are_written_as_they_are_composed_and_replace_the_last_ones(backend, monkeypatch):
    """The attempts CSV and errors.txt grow with the attempts (a million failed ones: 386 MB): they go
    to the job dir a slice of attempts at a time, uploaded while composed on object stores, and
    replace the last session's whole."""
    import csv
    import io
    from contextlib import contextmanager

    from raypar.engine import reports

    monkeypatch.setattr(reports, "CSV_ROWS", 4)  # a slice of four attempts at a time
    ledger = backend.ledger()
    ledger.write_manifest(make_batches(10))
    ledger.store.write_atomic(b"a stale report", "reports", "errors.txt")
    writer = ledger.done_writer("r2~w1")
    for ordinal in (0, 2, 3, 5, 6, 7, 8, 9):
        done(writer, ordinal, run="r2", attempt=2 if ordinal == 3 else 1)
    writer.flush()
    for ordinal, attempt, final in ((3, 1, False), (4, 1, False), (4, 2, True), (1, 1, True)):
        ledger.record_failed(FailedRecord(batch=bid(ordinal), run="r2", attempt=attempt, kind="user", final=final,
                                          error=f"Traceback\nValueError: bad {ordinal}", node="n1", worker="w1"))
    writes: dict[str, int] = {}
    writing = ledger.store.writing

    class Counted(io.RawIOBase):
        def __init__(self, out, name):
            super().__init__()
            self.out, self.name = out, name

        def writable(self):
            return True

        def write(self, data):
            writes[self.name] = writes.get(self.name, 0) + 1
            return self.out.write(data)

    @contextmanager
    def counted(*parts):
        with writing(*parts) as out:
            yield Counted(out, "/".join(parts))

    monkeypatch.setattr(ledger.store, "writing", counted)

    reports.write_reports(ledger, ledger.view(), "succeeded", "", None)

    reader = backend.ledger(own_client=True).store
    rows = list(csv.DictReader(io.StringIO(reader.read_bytes("reports", "processed_mini_batches.csv").decode())))
    assert [(r["batch"], r["attempt"], r["status"], r["error"]) for r in rows] == [
        (bid(0), "1", "done", ""), (bid(1), "1", "exception", "ValueError: bad 1"),
        (bid(2), "1", "done", ""), (bid(3), "1", "exception", "ValueError: bad 3"), (bid(3), "2", "done", ""),
        (bid(4), "1", "exception", "ValueError: bad 4"), (bid(4), "2", "exception", "ValueError: bad 4"),
        *((bid(o), "1", "done", "") for o in range(5, 10))]
    errors = reader.read_bytes("reports", "errors.txt").decode()
    assert errors.count("=== ") == 4 and "a stale report" not in errors
    assert f"=== {bid(4)} run r2 attempt 2: exception on w1 (node n1)\n(the same traceback as {bid(4)} run r2 " \
           f"attempt 1)\n" in errors
    assert writes["reports/processed_mini_batches.csv"] >= 3 and writes["reports/errors.txt"] == 1  # 12 rows; 4
    assert sorted(os.path.basename(p) for p in reader.list_files("reports")) == [
        "errors.txt", "job_result.txt", "processed_mini_batches.csv"]


def test_gathered_failed_records_are_stored_once_they_are_old_enough(tmp_path):
    ledger = Ledger(str(tmp_path / "job"))
    ledger.write_manifest(make_batches(2))
    ledger.gather_failures("r1", seconds=0)  # any gathered record is due at once
    ledger.record_failed(FailedRecord(batch=bid(0), run="r1", attempt=1, error="bad", kind="user", final=True))

    ledger.flush_failures(due_only=True)  # as the driver's upkeep does after each step

    assert Ledger(str(tmp_path / "job")).view().failed_batches() == {bid(0)}


def test_ledger_void_makes_a_batch_pending_again(backend):
    ledger = backend.ledger()
    ledger.write_manifest(make_batches(3))
    writer = ledger.done_writer("r1~w1")
    bad, _ = done(writer, 0)
    done(writer, 1)
    assert pending_ids(ledger) == [bid(2)]

    ledger.void(bad, "rows failed verification")
    assert pending_ids(ledger) == [bid(0), bid(2)]
    done(ledger.done_writer("r2~w1"), 0, run="r2")  # the rerun counts
    assert pending_ids(ledger) == [bid(2)]


def test_ledger_compact_then_view(backend):
    ledger = backend.ledger()
    batches = make_batches(8)
    ledger.write_manifest(batches)
    writer = ledger.done_writer("r1~w1")
    records = dict(done(writer, o) for o in (0, 3, 5))

    assert ledger.compact("r1") is True
    assert ledger.compact("r1") is False  # nothing new since
    assert any(p.endswith(".idx") for p in ledger.store.list_files("compact"))
    assert pending_ids(ledger) == [bid(i) for i in (1, 2, 4, 6, 7)]

    records.update([done(writer, 6)])  # after the compact: read from its record
    fresh = backend.ledger(own_client=True)
    view = fresh.view()
    assert sorted(view.done) == [bid(i) for i in (0, 3, 5, 6)]
    assert [b.id for b in view.pending()] == [bid(i) for i in (1, 2, 4, 7)]
    for record, rows in records.items():
        assert fresh.read_rows(view.done[record.batch]) == rows
    lean = backend.ledger(own_client=True).view(lean=True)  # what a resume plans with: no records held
    assert lean.lean and sorted(lean.done) == sorted(view.done)
    assert [b.id for b in lean.pending()] == [bid(i) for i in (1, 2, 4, 7)]


def test_compactions_merge_the_newest_files_and_the_next_session_s_index_counts_whatever_its_clock(
        backend, monkeypatch):
    """Seven compactions of a record each leave files of 4, 2 and 1 records (a binary counter); the
    next session, at a higher lease epoch and its host's clock an hour behind, compacts one more:
    its index is the one left and read, all 8 records in one file, every row read back."""
    import time

    from raypar.jobdir.records import unseal_all

    def indexes(ledger) -> list[tuple[str, list[int]]]:
        found = sorted(p for p in ledger.store.list_files("compact") if p.endswith(".idx"))
        return [(os.path.basename(p), [f["rows"] for f in unseal_all([ledger.store.read_range(p)])[0]["files"]])
                for p in found]

    ledger = backend.ledger()
    ledger.write_manifest(make_batches(8))
    ledger.lease.acquire("r1")
    writer, written = one_per_segment(ledger, "r1~w1"), {}
    for ordinal in range(7):
        written.update([done(writer, ordinal)])
        assert ledger.compact("r1") is True
    assert [rows for _, rows in indexes(ledger)] == [[4, 2, 1]]
    assert len([p for p in ledger.store.list_files("compact") if p.endswith(".arrow")]) == 3  # merged ones removed
    ledger.lease.release("r1")
    now = time.time_ns
    monkeypatch.setattr(layout.time, "time_ns", lambda: now() - 3600 * 10**9)  # r2's host: an hour behind
    later = backend.ledger(own_client=True)
    later.lease.acquire("r2")
    written.update([done(one_per_segment(later, "r2~w1"), 7, run="r2")])

    assert later.compact("r2") is True

    assert [(name.endswith("-r2.idx"), rows) for name, rows in indexes(later)] == [(True, [8])]
    view = backend.ledger(own_client=True).view()
    assert sorted(view.done) == [bid(i) for i in range(8)]
    for record, rows in written.items():
        assert later.read_rows(view.done[record.batch]) == rows


def test_ledger_lease(backend):
    first, second = backend.ledger(), backend.ledger(own_client=True)
    assert first.lease.read() is None

    first.lease.acquire("r1")
    with pytest.raises(LeaseHeldError, match="another raypar driver"):
        second.lease.acquire("r2")
    second.lease.release("r2")  # not its lease: left alone
    assert first.lease.read()["run"] == "r1"
    first.lease.heartbeat("r1")

    first.lease.release("r1")
    assert first.lease.read() is None
    second.lease.acquire("r2")
    assert first.lease.read()["run"] == "r2"


def test_ledger_lease_race_has_one_owner(backend):
    ledgers = [backend.ledger(own_client=True) for _ in range(4)]
    results = race(len(ledgers), lambda i: ledgers[i].lease.acquire(f"r{i}"))

    winners = [i for i, r in enumerate(results) if r is None]
    assert len(winners) == 1, results
    assert all(isinstance(r, LeaseHeldError) for r in results if r is not None), results
    assert ledgers[0].lease.read()["run"] == f"r{winners[0]}"


def test_a_lease_taken_between_the_look_and_the_claim_makes_the_claim_fail(backend, monkeypatch):
    # The interleaving behind a race with two winners: a rival takes the lease just after this
    # driver listed the free lease folder. The claim must fail, not take the generation after.
    first, second = backend.ledger(), backend.ledger(own_client=True)
    listing = second.lease.store.list_files

    def rival_claims_after_the_listing(*parts):
        found = listing(*parts)
        if not first.lease.epoch:
            first.lease.acquire("r1")
        return found

    monkeypatch.setattr(second.lease.store, "list_files", rival_claims_after_the_listing)
    with pytest.raises(LeaseHeldError, match="at the same moment"):
        second.lease.acquire("r2")
    assert first.lease.read()["run"] == "r1"


def test_a_heartbeat_whose_reply_was_lost_keeps_the_lease(backend):
    # The store took the next generation but the reply never came (a timeout): the retry finds
    # its own generation there and must not read it as a takeover.
    ledger = backend.ledger()
    ledger.lease.acquire("r1")
    create = ledger.store.write_new

    def lost_reply(data, *parts):
        create(data, *parts)
        raise TimeoutError("the reply was lost")

    ledger.store.write_new = lost_reply
    with pytest.raises(TimeoutError):
        ledger.lease.heartbeat("r1")
    ledger.store.write_new = create
    ledger.lease.heartbeat("r1")  # the retry
    ledger.lease.heartbeat("r1")
    assert ledger.lease.read()["run"] == "r1" and ledger.lease.generation == 3
    assert backend.ledger(own_client=True).lease.read()["generation"] == 3


def test_a_stale_lease_raced_for_has_one_new_owner_and_the_old_one_is_fenced(backend):
    # A driver on another host went silent; four drivers that watched it for a TTL race for it.
    frozen = backend.ledger()
    frozen.lease.acquire("frozen")
    stale = json.loads(frozen.store.read_bytes("lease", f"{1:012d}.json"))
    frozen.store.write_atomic(json.dumps({**stale, "host": "frozen-host"}).encode(), "lease", f"{1:012d}.json")
    ledgers = [backend.ledger(own_client=True) for _ in range(4)]

    results = race(len(ledgers), lambda i: ledgers[i].lease.acquire(f"r{i}", silent=True))

    winners = [i for i, r in enumerate(results) if r is None]
    assert len(winners) == 1, results
    assert all(isinstance(r, LeaseHeldError) for r in results if r is not None), results
    assert ledgers[0].lease.read()["run"] == f"r{winners[0]}" and ledgers[winners[0]].lease.epoch == 2
    with pytest.raises(LeaseHeldError, match=f"taken over by run r{winners[0]}"):
        frozen.lease.heartbeat("frozen")  # thawed: its next generation is taken


def test_ledger_cancel_request(backend):
    ledger = backend.ledger()
    assert not ledger.cancel_requested("r1")
    backend.ledger(own_client=True).request_cancel("r1")
    assert ledger.cancel_requested("r1")
    assert not ledger.cancel_requested("r2")


def test_a_resumed_session_writes_its_output_while_its_batches_run(backend):
    """The job dir and the output on each store: the batches done before the session are found in
    the ledger (segment objects on object stores) and written, with the session's own, before its end."""
    from raypar.outputs.assembly import assemble
    from raypar.outputs.live import LiveAssembly

    manifest = [MiniBatch(ordinal=i, kind="files", payload={"files": [f"f{i}"]}, item_count=1) for i in range(8)]
    ledger = Ledger(backend.url, backend.options)
    ledger.write_manifest(manifest)

    def store(writer, ordinals):
        out = ledger.done_writer(writer, {"flush_batches": 100, "flush_bytes": 1 << 20, "flush_seconds": 1e9})
        records = [out.write(DoneRecord(batch=f"mb-{i:07d}", run=writer[:2], attempt=1, items=1, returned=1,
                                        part=None), f"row {i}\n".encode()) for i in ordinals]
        out.flush()
        return records

    store("r1~w1", [0, 1, 3, 4, 6, 7])  # the earlier session: 2 and 5 failed there
    target = backend.url.rsplit("/", 1)[0] + "/out/rows.txt"
    live = LiveAssembly(ledger, target, "text", backend.options, resumed=manifest)
    assert poll(lambda: live.written == 2, timeout=60, interval=0.05)  # 0 and 1, before this session's batches
    live.stored([(r.batch, [r.part, r.part_offset, r.part_bytes, r.part_sha256, r.part_crc32])
                 for r in store("r2~w1", [5, 2])])
    view = ledger.view(manifest)

    assert live.finish(view) == len("".join(f"row {i}\n" for i in range(8)))
    assert (live.written_while_running, live.written, live.gave_up) == (8, 8, None)
    with open_store(target.rsplit("/", 1)[0], backend.options).fs.open(target, "rb") as f:
        written = f.read()
    assert written == "".join(f"row {i}\n" for i in range(8)).encode()
    assemble(ledger, view, target + ".end", "text", backend.options)  # byte for byte what assemble() writes
    with open_store(target.rsplit("/", 1)[0], backend.options).fs.open(target + ".end", "rb") as f:
        assert f.read() == written
