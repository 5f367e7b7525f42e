"""A job dir on Azure Blob (Azurite): workers store their done batches as segment objects, one
per flush. A worker or a driver killed while finished batches are still unstored loses only
those: they run again, every row lands exactly once, and nothing stored runs twice."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading

import fsspec
import psutil
import pytest
import yaml
from conftest import cli_in_process, make_spec, quiet, record_listings, wait_for

import raypar
from raypar.inputs.base import batch_id
from raypar.jobdir import layout
from raypar.jobdir.ledger import Ledger
from raypar.jobdir.state import JobState

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]

# Logs "<pid> <file>" per run() call. The first run() given HOLD_FILE or a later file by a worker that
# ran a batch before (so it holds finished batches) writes GATE/holding-<pid> (holding the file's name)
# and waits for GATE/release.
ENTRY = textwrap.dedent("""
    import os, sys, time

    def init():
        global log, hold, gate
        log, hold, gate = sys.argv[1:4]

    def run(mini_batch):
        names = [os.path.basename(p) for p in mini_batch]
        with open(os.path.join(log, f"{os.getpid()}-{names[0]}-{time.monotonic_ns()}"), "w") as f:
            f.write(f"{os.getpid()} {' '.join(names)}")
        ran_before = any(p.startswith(f"{os.getpid()}-") and not p.startswith(f"{os.getpid()}-{names[0]}-")
                         for p in os.listdir(log))
        if names[0] >= hold and ran_before and not os.path.exists(os.path.join(gate, "release")):
            try:  # one holder
                os.close(os.open(os.path.join(gate, "held"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return [f"{n} {open(p).read().upper()}" for n, p in zip(names, mini_batch)]
            with open(os.path.join(gate, f"holding-{os.getpid()}.tmp"), "w") as f:
                f.write(names[0])
            os.replace(os.path.join(gate, f"holding-{os.getpid()}.tmp"), os.path.join(gate, f"holding-{os.getpid()}"))
            while not os.path.exists(os.path.join(gate, "release")):
                time.sleep(0.05)
        return [f"{n} {open(p).read().upper()}" for n, p in zip(names, mini_batch)]
""")


@pytest.fixture
def blob(azurite, monkeypatch):
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite.connection_string)
    container = azurite.new_container()
    return container, fsspec.filesystem("az", connection_string=azurite.connection_string, use_listings_cache=False)


def job_spec(tmp_path, count, hold, flush, **overrides):
    files = {f"f{i:02d}.txt": f"v{i}" for i in range(count)}
    log, gate = tmp_path / "exec", tmp_path / "gate"
    log.mkdir()
    gate.mkdir()
    spec = make_spec(tmp_path, files, mini_batch_size="1", **{
        "task.program_arguments": f"{log} {hold} {gate}", "task.entry_script": "segments_entry.py",
        "raypar.ledger": flush, **overrides})
    (tmp_path / "code" / "segments_entry.py").write_text(ENTRY)
    return files, log, gate, spec


def runs(log):
    """[(pid, file)] of every run() call."""
    return [tuple(p.read_text().split()) for p in log.iterdir()]


def rows(tmp_path):
    return (tmp_path / "out" / "parallel_run_step.txt").read_text().splitlines()


NEVER = {"flush_batches": 1000, "flush_seconds": 3600}  # workers store only when idle or asked


def test_a_lost_worker_s_unstored_batches_run_again_and_nothing_runs_twice(ray_cluster, blob, tmp_path):
    container, fs = blob
    files, log, gate, spec = job_spec(tmp_path, 16, "f09.txt", NEVER, **{
        "resources.instance_count": 1, "max_concurrency_per_instance": 2})
    job = f"az://{container}/jobs/lost-worker"
    victim = {}

    def kill_the_holder():
        wait_for(lambda: list(gate.glob("holding-[0-9]*[0-9]")), "a batch from f09 on to be held")
        holding = next(gate.glob("holding-[0-9]*[0-9]"))
        victim["pid"], victim["held"] = int(holding.name.split("-")[1]), holding.read_text()
        victim["finished"] = {f for pid, f in runs(log) if int(pid) == victim["pid"] and f != victim["held"]}
        os.kill(victim["pid"], signal.SIGKILL)
        (gate / "release").touch()

    killer = threading.Thread(target=kill_the_holder, daemon=True)
    killer.start()
    outcome = raypar.run(spec, job_dir=job, echo=quiet).wait()
    killer.join(timeout=60)

    assert outcome.state is JobState.SUCCEEDED, outcome.reason
    assert rows(tmp_path) == [f"{n} {t.upper()}" for n, t in sorted(files.items())]
    count = {name: sum(1 for _, f in runs(log) if f == name) for name in files}
    # What the killed worker had finished was never stored: it ran again; everything else ran once.
    assert victim["finished"], "the killed worker had finished batches"
    assert {n for n, c in count.items() if c == 2} == victim["finished"] | {victim["held"]}
    assert all(c in (1, 2) for c in count.values())
    segments = [p for p in fs.find(f"{container}/jobs/lost-worker/parts") if p.endswith(".seg")]
    assert 1 <= len(segments) <= 4  # one per flush, not one per batch (16 batches)
    assert not fs.exists(f"{container}/jobs/lost-worker/done")  # no per-batch record objects


def test_a_lost_worker_s_segment_folders_are_closed_by_the_next_compaction_while_the_job_runs(
        ray_cluster, blob, tmp_path, monkeypatch):
    # Nodes come and go: a lost worker would leave its last folder of one-batch segments open, listed
    # by every view, until the session's end. The session's next compaction closes all of them.
    from raypar.engine import upkeep
    from raypar.jobdir import segment_folders

    container, _ = blob
    monkeypatch.setattr(upkeep, "COMPACT_EVERY", 2)  # the driver runs in this process: compactions while it runs
    seen = []  # (session_over, gone, the folders each gone writer had listed, how many the compaction closed)
    closing = segment_folders.SegmentListing.closing

    def recording(self, closed, run, session_over=False, gone=frozenset()):
        out = closing(self, closed, run, session_over, gone)
        if self.folder == "parts":
            folders = {}  # writer -> how many folders it has
            for writer, number in filter(None, map(layout.segment_folder, self.folders)):
                folders[writer] = max(folders.get(writer, 0), number + 1)
            listed = {w: folders[w] for w in gone if w in folders}
            seen.append((session_over, set(gone), listed, {w: out.get(w, 0) for w in listed}))
        return out

    monkeypatch.setattr(segment_folders.SegmentListing, "closing", recording)
    files, log, gate, spec = job_spec(tmp_path, 16, "f09.txt", {"flush_batches": 1, "flush_seconds": 0}, **{
        "resources.instance_count": 1, "max_concurrency_per_instance": 2})
    victim = {}

    def kill_the_holder():
        wait_for(lambda: list(gate.glob("holding-[0-9]*[0-9]")), "a batch from f09 on to be held")
        holding = next(gate.glob("holding-[0-9]*[0-9]"))
        victim["pid"] = int(holding.name.split("-")[1])
        os.kill(victim["pid"], signal.SIGKILL)
        (gate / "release").touch()

    killer = threading.Thread(target=kill_the_holder, daemon=True)
    killer.start()
    outcome = raypar.run(spec, job_dir=f"az://{container}/jobs/lost-folders", echo=quiet).wait()
    killer.join(timeout=60)

    assert outcome.state is JobState.SUCCEEDED, outcome.reason
    assert rows(tmp_path) == [f"{n} {t.upper()}" for n, t in sorted(files.items())]
    while_running = [(listed, closed) for over, _, listed, closed in seen if not over and listed]
    assert while_running, seen  # a compaction after the loss, the lost worker's folders in its listing
    for listed, closed in while_running:
        assert closed == listed  # every folder of a lost writer closed, its last one too


CLI = [sys.executable, "-m", "raypar.cli"]


def cli(*args):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, timeout=180)


def test_a_driver_killed_with_unstored_batches_resumes_to_the_exact_output(ray_cluster, blob, tmp_path, capsys):
    container, fs = blob
    # One worker, batches in order; a segment every 3 batches: f00-f02 and f03-f05 stored, f06 not.
    files, log, gate, spec = job_spec(tmp_path, 10, "f07.txt", {"flush_batches": 3, "flush_seconds": 3600}, **{
        "resources.instance_count": 1, "max_concurrency_per_instance": 1})
    (tmp_path / "job.yml").write_text(yaml.safe_dump(spec))
    job = f"az://{container}/jobs/killed-driver"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # On the session cluster: the killed driver's workers end with it (Ray ends the actors of a
    # driver that is gone), as a dead host's embedded Ray would.
    proc = subprocess.Popen([*CLI, "run", str(tmp_path / "job.yml"), "--job-dir", job,
                             "--address", ray_cluster.address],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    spawned = []
    try:
        wait_for(lambda: list(gate.glob("holding-[0-9]*[0-9]")), "f07's batch to be held")
        spawned = psutil.Process(proc.pid).children(recursive=True)
        proc.kill()  # SIGKILL: the driver stores nothing more
        proc.wait(timeout=30)
    finally:
        for p in spawned:  # anything it started, as on a dead host
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(spawned, timeout=30)
    status = json.loads(cli_in_process(capsys, "status", job, "--json").stdout)
    assert (status["state"], status["completed"], status["pending"]) == ("interrupted", 6, 4)
    assert sorted(f for _, f in runs(log)) == [f"f{i:02d}.txt" for i in range(8)]
    for p in log.iterdir():
        p.unlink()
    (gate / "release").touch()

    resumed = cli("resume", job, "--address", ray_cluster.address)

    assert resumed.returncode == 0, resumed.stderr
    assert sorted(f for _, f in runs(log)) == [f"f{i:02d}.txt" for i in range(6, 10)]  # unstored f06, then on
    assert rows(tmp_path) == [f"{n} {t.upper()}" for n, t in sorted(files.items())]
    view = Ledger(job).view()
    assert len(view.done) == 10


def test_worker_logs_are_stored_in_an_object_store_job_dir(ray_cluster, blob, tmp_path):
    container, fs = blob
    files = {f"f{i:02d}.txt": ("bad " if i == 3 else "") + f"v{i}" for i in range(8)}
    spec = make_spec(tmp_path, files, **{"max_concurrency_per_instance": 2, "mini_batch_size": "1", "retry_settings.max_retries": 0,
                                         "resources.instance_count": 1})  # score.py prints "scoring <file>"
    job = f"az://{container}/jobs/logs"

    outcome = raypar.run(spec, job_dir=job, echo=quiet).wait()

    assert (outcome.state, outcome.completed, outcome.failed) == (JobState.SUCCEEDED, 7, 1)
    every = cli("logs", job)
    assert every.returncode == 0, every.stderr
    assert sorted(line.split()[1] for line in every.stdout.splitlines() if line.startswith("scoring ")) == \
        sorted(files)  # each batch's print, once, from the pieces each worker stored
    assert every.stdout.count(f"==> az://{container}/jobs/logs/logs/") == 2  # one log per worker process
    failed = cli("logs", job, "--batch", "mb-0000003")
    assert "ValueError: cannot score f03.txt: bad record" in failed.stdout
    assert "scoring f03.txt" in failed.stdout  # the attempt's own output, from its worker's log


def test_azurite_frozen_while_workers_store_segments_ends_with_every_row_once(ray_cluster, azurite, blob, tmp_path):
    container, fs = blob
    # Small, frequent segments; one worker holds f20 until the store is frozen.
    files, log, gate, spec = job_spec(tmp_path, 40, "f20.txt", {"flush_batches": 2, "flush_seconds": 0.2}, **{
        "resources.instance_count": 1, "max_concurrency_per_instance": 2})
    job = f"az://{container}/jobs/frozen"
    seen = {}

    def freeze_then_thaw():
        wait_for(lambda: list(gate.glob("holding-[0-9]*[0-9]")), "f20's batch to be held")
        os.kill(azurite.pid, signal.SIGSTOP)  # every request now waits: PUTs, listings, the lease
        try:
            (gate / "release").touch()
            threading.Event().wait(3.0)  # the fault: the store answers nothing for 3 s
            seen["runs while frozen"] = len(runs(log))
        finally:
            os.kill(azurite.pid, signal.SIGCONT)

    freezer = threading.Thread(target=freeze_then_thaw, daemon=True)
    freezer.start()
    try:
        outcome = raypar.run(spec, job_dir=job, echo=quiet).wait()
    finally:
        freezer.join(timeout=60)
        os.kill(azurite.pid, signal.SIGCONT)

    assert seen["runs while frozen"] < 40  # the workers were stuck storing a segment, not done
    assert outcome.state is JobState.SUCCEEDED, outcome.reason
    assert rows(tmp_path) == [f"{n} {t.upper()}" for n, t in sorted(files.items())]
    assert sorted(f for _, f in runs(log)) == sorted(files)  # nobody was lost: nothing ran twice
    assert len(Ledger(job).view().done) == 40


# Logs "<pid> <file>" per run() call; a file whose name ends in 7 fails until FLAG exists.
FLAKY = textwrap.dedent("""
    import os, sys, time

    def init():
        global log, flag
        log, flag = sys.argv[1:3]

    def run(mini_batch):
        name = os.path.basename(mini_batch[0])
        with open(os.path.join(log, f"{os.getpid()}-{name}-{time.monotonic_ns()}"), "w") as f:
            f.write(f"{os.getpid()} {name}")
        if name.endswith("7.txt") and not os.path.exists(flag):
            raise ValueError(f"{name} is not ready")
        return [f"{name} {open(mini_batch[0]).read().upper()}"]
""")


def listed_folders(job):
    """A fresh view of ``job``, and the folders of parts/ and of failed/ its listings listed (by
    name there, "" for the folder itself)."""
    ledger = Ledger(job)
    parts, failed = record_listings(ledger.store), record_listings(ledger.store, "failed")
    return ledger.view(lean=True), sorted(parts), sorted(failed)


def index_epochs(fs, container: str) -> list[int]:
    """The lease epochs in the names of the compact indexes left (done records', then failed ones')."""
    names = [os.path.basename(p) for folder in ("compact", "failed-compact")
             for p in sorted(fs.find(f"{container}/jobs/one-batch-segments/{folder}")) if p.endswith(".idx")]
    epochs = [re.fullmatch(r"compact-s(\d{10})-r\d{23}-\w{6}-.+\.idx", name) for name in names]
    assert all(epochs), names
    return [int(match.group(1)) for match in epochs]


def test_a_job_of_one_batch_segments_resumes_exactly_and_its_views_list_no_closed_folder(ray_cluster, blob, tmp_path,
                                                                                          capsys, monkeypatch):
    # Every batch a segment of its own (as batches slower than flush_seconds leave them): one worker
    # stores 108 of them, 100 to a folder; the driver (in this process) each failure, 2 to a folder.
    # The session compacts every 25 segments stored (COMPACT_SEGMENTS), so no view while it runs
    # reads most of them one by one. The session's end closes their folders: later views (status,
    # the resume) list the top of parts/ and of failed/ only, and the resume runs exactly the failed
    # batches.
    import raypar.jobdir.ledger as ledger_module
    from raypar.engine import upkeep
    from raypar.jobdir import layout

    monkeypatch.setattr(ledger_module, "FAILED_FLUSH_RECORDS", 1)
    monkeypatch.setattr(layout, "SEGMENTS_PER_FOLDER", 2)  # the driver's: the workers store 100 a folder
    monkeypatch.setattr(upkeep, "COMPACT_SEGMENTS", 25)
    monkeypatch.setattr(upkeep, "COMPACT_SEGMENTS_PER_WORKER", 1)
    read_by_compactions, segment_records = [], ledger_module.segment_records  # on the compaction thread

    def reading(store, sizes):
        if threading.current_thread().name == "raypar-compact":
            read_by_compactions.append(len(sizes))
        return segment_records(store, sizes)

    monkeypatch.setattr(ledger_module, "segment_records", reading)
    container, fs = blob
    files = {f"f{i:03d}.txt": f"v{i}" for i in range(120)}
    log, flag = tmp_path / "exec", tmp_path / "ready"
    log.mkdir()
    spec = make_spec(tmp_path, files, mini_batch_size="1", **{
        "task.program_arguments": f"{log} {flag}", "task.entry_script": "flaky_entry.py",
        "retry_settings.max_retries": 0, "raypar.ledger": {"flush_batches": 1},
        "resources.instance_count": 1, "max_concurrency_per_instance": 1})
    (tmp_path / "code" / "flaky_entry.py").write_text(FLAKY)
    (tmp_path / "job.yml").write_text(yaml.safe_dump(spec))
    job = f"az://{container}/jobs/one-batch-segments"
    failing = sorted(n for n in files if n.endswith("7.txt"))

    outcome = raypar.run(spec, job_dir=job, echo=quiet).wait()

    assert (outcome.state, outcome.completed, outcome.failed) == (JobState.SUCCEEDED, 108, 12), outcome.reason
    # Compacted while running, each segment read once (the 108 would be one read at the end else).
    # How many each compaction reads depends on the thread's pace (under load it falls behind: one
    # read 59 in a full run), not on the product: it is not asserted.
    assert len(read_by_compactions) >= 3 and sum(read_by_compactions) <= 108, read_by_compactions
    segments = sorted(p.split("/parts/", 1)[1] for p in fs.find(f"{container}/jobs/one-batch-segments/parts"))
    folders = sorted({s.split("/")[0] for s in segments})
    assert len(segments) == 108 and all(s.endswith(".seg") and s.count("/") == 1 for s in segments)
    assert len(folders) == 2 and [s.split("/")[0] for s in segments].count(folders[0]) == 100
    failures = sorted(p.split("/failed/", 1)[1] for p in fs.find(f"{container}/jobs/one-batch-segments/failed"))
    assert len(failures) == 12 and len({f.split("/")[0] for f in failures}) == 6  # a segment each, 2 a folder
    view, parts, failed = listed_folders(job)
    assert (len(view.done), parts, failed) == (108, [""], [""])  # every folder closed at the session's end
    assert sorted(view.failed_batches()) == [batch_id(int(n[1:4])) for n in failing]  # f007.txt: the 8th batch
    status = json.loads(cli_in_process(capsys, "status", job, "--json").stdout)
    assert (status["completed"], status["failed"]) == (108, 12)
    first_epochs = index_epochs(fs, container)
    for p in log.iterdir():
        p.unlink()
    flag.touch()
    job_json = f"{container}/jobs/one-batch-segments/job.json"
    created = json.loads(fs.cat_file(job_json))
    fs.pipe_file(job_json, json.dumps({**created, "format": 3}).encode())  # as a raypar before folders of failed/

    resumed = cli("resume", job, "--address", ray_cluster.address)

    assert resumed.returncode == 0, resumed.stderr
    # From now on an older raypar refuses the job dir: it would miss the records in folders.
    assert json.loads(fs.cat_file(job_json)) == {**created, "format": ledger_module.FORMAT,
                                                 "upgraded_by": created["raypar_version"]}
    assert sorted(f for _, f in runs(log)) == failing  # exactly the failed batches, once each
    assert rows(tmp_path) == [f"{n} {t.upper()}" for n, t in sorted(files.items())]
    view, parts, failed = listed_folders(job)
    assert (len(view.done), parts, failed) == (120, [""], [""])
    # Each session's compactions are named by the lease epoch it held: the resume's sort last (it
    # stored no failed record: the first session's compaction of them stays).
    assert len(first_epochs) == 2 and first_epochs[0] == first_epochs[1] > 0
    done_epoch, failed_epoch = index_epochs(fs, container)
    assert done_epoch > first_epochs[0] and failed_epoch == first_epochs[1]
