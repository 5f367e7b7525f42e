"""The job directory: the durable truth about a job, on any fsspec URL.

The layout and the file names are in raypar/jobdir/layout.py; the store that holds them
(local disk or an object store) in raypar/jobdir/store.py.

The one resume rule lives in :meth:`LedgerView.pending`: manifest - done.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional

import numpy as np
import pyarrow as pa

from raypar.errors import LedgerError, UsageError
from raypar.inputs.base import MiniBatch, QueuedBatch, batch_id, ordinal_of
from raypar.inputs.pending import PendingQueue
from raypar.jobdir import failed_compact, segment_folders
from raypar.jobdir.compact_tiers import newest_to_merge
from raypar.jobdir.layout import (
    SEGMENT_SUFFIX,
    WORKER_TIME,
    attempt_name,
    chunk_name,
    compact_name,
    inputs_name,
    log_name,
    void_key_of,
)
from raypar.jobdir.lease import Lease
from raypar.jobdir.records import DoneRecord, FailedRecord, _sealed, _unseal, _verified
from raypar.jobdir.state import JobState
from raypar.jobdir.store import open_store
from raypar.jobdir.tables import (
    LEAN_COLUMNS,
    ChunkedLines,
    DoneIndex,
    DoneSet,
    FailedRecords,
    Manifest,
    ReportedRecords,
    choose,
    empty_table,
    failed_table,
    from_ipc,
    ipc_batches,
    records_table,
    to_ipc,
)
from raypar.jobdir.writers import DoneWriter, FailedLog, segment_records, writer_for
from raypar.version import __version__

log = logging.getLogger("raypar")

# 2: segment objects on object stores, compact indexes of several files, the chunked manifest.
# A raypar that reads format 1 only would miss segments and misread indexes: it refuses 2.
# 3: segments in folders of parts/ (a raypar that reads 2 lists only the top: it refuses 3).
# 4: failed records in folders of failed/ (a raypar that reads 3 would miss them: it refuses 4).
FORMAT = 4
READS = (1, 2, 3, 4)  # format 1 job dirs (per-try objects, one-file compacts) resume as they are
CHUNK_SIZE = 10_000
FAILED_FLUSH_SECONDS = 1.0  # a driver's failed records wait at most this long to be stored...
FAILED_FLUSH_RECORDS = 1000  # ... or until this many are gathered
RECORDS_WINDOW = 32 << 20  # bytes of record files read at once (a view's failed records)


@dataclass
class _DoneRead:
    """The done records as read: ``base`` from the compact files, ``fresh`` read since."""

    base: pa.Table
    fresh: pa.Table
    coverage: dict
    covered: dict
    files: list
    closed: dict  # the segment folders the compaction read from had closed (segment_folders)

    @property
    def table(self) -> pa.Table:
        return pa.concat_tables([self.base, self.fresh]) if self.fresh.num_rows else self.base


def new_run_id() -> str:
    """A sortable, unique ID for one driver session."""
    return time.strftime("r%Y%m%d%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


@dataclass
class LedgerView:
    """A consistent read of the ledger at one moment."""

    manifest: Optional[Sequence[MiniBatch]]
    done: Mapping[str, DoneRecord]  # a DoneIndex when read from the ledger, a DoneSet when lean
    failed: FailedRecords = field(default_factory=FailedRecords)  # batch ID -> its failed attempts
    lean: bool = False  # done is a DoneSet: no records, so nothing to assemble or report from
    reported: Optional[pa.Table] = None  # view(lean=True, reported=True): ordinal, items, failed

    def pending(self, among: Optional[np.ndarray] = None) -> PendingQueue:
        """The resume rule, written once: every planned batch without a done record, queued
        (``among``: only those of these ordinals)."""
        if self.manifest is None:
            raise LedgerError("the manifest is incomplete; the job must be planned again")
        if isinstance(self.done, (DoneIndex, DoneSet)):
            todo = ~self.done.mask(len(self.manifest))
        else:
            todo = np.ones(len(self.manifest), dtype=bool)
            done = np.fromiter((ordinal_of(b) for b in self.done), dtype=np.int64)
            todo[done[done < len(todo)]] = False
        retired = getattr(self.manifest, "retired", None)
        if retired is not None and len(retired):
            todo[retired] = False
        if among is not None:
            wanted = np.zeros(len(todo), dtype=bool)
            wanted[among[among < len(todo)]] = True
            todo &= wanted
        ordinals = np.flatnonzero(todo)
        if isinstance(self.manifest, Manifest):
            return self.manifest.queue(ordinals)  # reads the chunks of pending batches only
        return PendingQueue(QueuedBatch.of(self.manifest[int(i)]) for i in ordinals)

    def counts(self) -> dict:
        """Mini-batch counts: total, completed, failed (tries spent), pending (never finished)."""
        total = getattr(self.manifest, "live", len(self.manifest)) if self.manifest is not None else None
        failed = len(self.failed_ordinals())
        pending = None if total is None else total - len(self.done) - failed
        return {"total": total, "completed": len(self.done), "failed": failed, "pending": pending}

    def unreturned_items(self) -> int:
        """Items of done batches that run() did not return a result for (Azure counts them as failed)."""
        return self.done.failed_items() if isinstance(self.done, (DoneIndex, DoneSet)) else \
            sum(r.failed_items for r in self.done.values())

    def failed_items(self) -> int:
        """Items that did not succeed: unreturned items of done batches + every item of failed ones:
        the most rows any try read, or the planned count when no try reported one."""
        done = self.unreturned_items()
        failed = self.failed_ordinals()
        if self.manifest is None or not len(failed):
            return done
        table = self.failed.table
        known = np.where(np.isin(self.failed.ordinals, failed),
                         table.column("items").fill_null(-1).to_numpy(zero_copy_only=False), -1)
        most = np.maximum.reduceat(known, self.failed.starts)[np.searchsorted(self.failed.batches, failed)]
        return done + int(most[most >= 0].sum()) + int(self.planned_items(failed[most < 0]).sum())

    def planned_items(self, ordinals: np.ndarray) -> np.ndarray:
        """The planned item count of each batch of ``ordinals``."""
        if isinstance(self.manifest, Manifest):
            return self.manifest.item_counts(ordinals)
        return np.array([self.manifest[int(o)].item_count for o in ordinals], dtype=np.int64)

    def failed_ordinals(self) -> np.ndarray:
        """Batches (sorted ordinals) whose tries were spent and that are still not done."""
        final = self.failed.final_ordinals()
        if not len(final):
            return final
        if isinstance(self.done, (DoneIndex, DoneSet)):
            return final[~self.done.mask(int(final[-1]) + 1)[final]]
        return np.array([o for o in final.tolist() if batch_id(o) not in self.done], dtype=np.int64)

    def failed_batches(self) -> set[str]:
        """Batches whose tries were spent and that are still not done."""
        return {batch_id(o) for o in self.failed_ordinals().tolist()}


class Ledger:
    """Reads and writes one job directory."""

    def __init__(self, url: str, storage_options: Optional[dict] = None):
        self.url = url.rstrip("/")
        self.store = open_store(self.url, storage_options)
        self.lease = Lease(self.store, self.url)
        self._snapshot = threading.local()  # see _listed: per thread, as the driver reads from several
        self.failed_log: Optional[FailedLog] = None  # gather_failures(): the driver's session
        self._failed_segments: dict[str, int] = {}  # run -> its next failed segment, across gatherings
        self._failed_compact_damaged = False  # a view found a piece damaged: the next compaction starts afresh
        self.compacting = threading.Lock()  # a session's compactions one at a time (its thread's, its last)

    # -- identity -------------------------------------------------------

    def create(self, spec_dict: dict, spec_yaml: str) -> dict:
        """Write job.json once; raises UsageError if the dir already holds a job."""
        job = {
            "format": FORMAT,
            "raypar_version": __version__,
            "job_id": uuid.uuid4().hex,
            "created": time.time(),
            "created_by": f"{getpass.getuser()}@{socket.gethostname()}",
            "spec": spec_dict,
        }
        if not self.store.write_new(json.dumps(job, indent=2, sort_keys=True).encode(), "job.json"):
            raise UsageError(f"{self.url}: already holds a raypar job")
        self.store.write_atomic(spec_yaml.encode(), "spec.yml")
        return job

    def load_job(self) -> dict:
        """job.json, validated; a clear error when the dir is not a job dir."""
        try:
            raw = self.store.read_bytes("job.json")
        except FileNotFoundError:
            raise UsageError(f"{self.url}: not a raypar job dir (no job.json)") from None
        try:
            job = json.loads(raw)
            if not isinstance(job, dict):
                raise ValueError("not an object")
            if job.get("format") not in READS:
                raise LedgerError(f"{self.url}/job.json: unsupported format {job.get('format')!r} (written by "
                                  f"raypar {job.get('raypar_version', '?')}; this raypar {__version__} reads "
                                  f"formats {', '.join(map(str, READS))}): use that raypar or a newer one")
            job["spec"]
        except (ValueError, KeyError, TypeError):
            raise LedgerError(f"{self.url}/job.json: corrupted") from None
        return job

    def upgrade_format(self) -> None:
        """Have job.json say FORMAT from now on where it says an older one: a session of this raypar
        stores in folders an older raypar would not list (``parts/``, ``failed/``), so that one must
        refuse the job dir now. Called by the lease holder before it writes; every other field stays."""
        job = self.load_job()
        if job["format"] < FORMAT:
            job["format"], job["upgraded_by"] = FORMAT, __version__
            self.store.write_atomic(json.dumps(job, indent=2, sort_keys=True).encode(), "job.json")

    def exists(self) -> bool:
        return self.store.exists("job.json")

    # -- manifest -------------------------------------------------------

    def write_manifest(self, batches: Iterable[MiniBatch]) -> int:
        """Persist a whole plan, then the COMPLETE marker; returns the batch count."""
        writer = self.manifest_writer([])
        for batch in batches:
            writer.add(batch)
            if len(writer.buffer) >= CHUNK_SIZE:
                writer.flush()
        return writer.complete()

    def manifest_writer(self, prefix_lines: list[bytes]) -> "ManifestWriter":
        """A writer that continues the chunks already written (``read_manifest_prefix``)."""
        return ManifestWriter(self, prefix_lines)

    def read_manifest_prefix(self) -> Manifest:
        """The chunks a planning that never finished wrote, in order (each is whole or absent)."""
        lines: list[bytes] = []
        for i in range(len(self.store.list_files("manifest")) + 1):
            try:
                data = self.store.read_bytes("manifest", chunk_name(i))
            except FileNotFoundError:
                break
            lines.extend(data.split(b"\n")[:-1])
        return Manifest(lines)

    def read_manifest(self) -> Optional[Manifest]:
        """The planned batches, or None when planning never finished.

        Revisions (``manifest/rev-NNNNNN.json``, written when planned input files changed) add
        batches after the plan and retire the ones they replace.
        """
        marker = self._complete_marker()
        if marker is None:
            return None
        chunks = list(marker["chunks"])
        planned = sum(c["count"] for c in chunks)
        if planned != marker["batches"]:
            raise LedgerError(f"{self.url}/manifest: the chunks hold {planned} batches, "
                              f"COMPLETE.json says {marker['batches']}")
        revisions, carried = [], {}
        for rev in self._revisions():
            if rev["first"] not in (None, planned):  # None: the revision added no batch
                raise LedgerError(f"{self.url}/manifest/{rev['name']}: adds batches from {rev['first']}, "
                                  f"the plan has {planned}")
            chunks.extend(rev["chunks"])
            planned += sum(c["count"] for c in rev["chunks"])
            revisions.append([(run["retired"], tuple(run["added"])) for run in rev["runs"]])
            carried.update({new: old for new, old in rev.get("carried", [])})
        lines = ChunkedLines([c["count"] for c in chunks], lambda indices: self._load_chunks(chunks, indices))
        return Manifest(lines, revisions, planned=marker["batches"], carried=carried)

    def _load_chunks(self, chunks: list[dict], indices: list[int], key: str = "name") -> dict[int, list[bytes]]:
        """{index: lines} of the manifest chunks ``indices`` (or with ``key="inputs"`` of their input
        versions), read concurrently and checked."""
        named = {i: chunks[i][key] for i in indices if chunks[i].get(key)}
        paths = {i: self.store.path("manifest", name) for i, name in named.items()}
        data = self.store.read_many(list(paths.values()))
        out = {i: [] for i in indices if i not in named}  # a revision's empty chunk, a chunk without inputs
        for i, path in paths.items():
            if path not in data:
                raise LedgerError(f"{self.url}/manifest/{named[i]}: missing (named by the manifest)")
            if hashlib.sha256(data[path]).hexdigest() != chunks[i]["sha256" if key == "name" else "inputs_sha256"]:
                raise LedgerError(f"{self.url}/manifest/{named[i]}: corrupted (checksum mismatch)")
            lines = data[path].split(b"\n")
            out[i] = lines[:-1] if lines and not lines[-1] else lines
            if key == "name" and len(out[i]) != chunks[i]["count"]:
                raise LedgerError(f"{self.url}/manifest/{named[i]}: holds {len(out[i])} batches, "
                                  f"the manifest says {chunks[i]['count']}")
        return out

    def _complete_marker(self) -> Optional[dict]:
        try:
            return _unseal(self.store.read_bytes("manifest", "COMPLETE.json"))  # None if torn: plan again
        except FileNotFoundError:
            return None

    def _read_chunks(self, chunks: list[dict], key: str = "name") -> list[bytes]:
        """Every line of ``chunks`` (manifest chunks, or with ``key="inputs"`` their input versions)."""
        loaded = self._load_chunks(chunks, list(range(len(chunks))), key)
        return [line for i in range(len(chunks)) for line in loaded[i]]

    def _revisions(self) -> list[dict]:
        """The sealed revision records, in order; one that is torn ends the list (it never counted)."""
        names = sorted(os.path.basename(p) for p in self.store.list_files("manifest")
                       if os.path.basename(p).startswith("rev-") and p.endswith(".json"))
        out = []
        for name in names:
            body = _unseal(self.store.read_bytes("manifest", name))
            if body is None:
                break
            out.append({**body, "name": name})
        return out

    def last_added(self) -> Optional[dict]:
        """The input files the newest growing run added (``files``) and its new batches
        (``batches``), or None when no run added any (see raypar/engine/replan.py, append_added)."""
        for rev in reversed(self._revisions()):
            if rev.get("added"):
                batches = sum(end - first for run in rev["runs"] if not run["retired"] for first, end in [run["added"]])
                return {"files": rev["added"], "batches": batches, "when": rev.get("written")}
        return None

    def read_input_versions(self) -> Optional[dict]:
        """name -> version of every planned input file (the newest one a revision recorded), or None for
        a job dir planned before raypar recorded input versions."""
        marker = self._complete_marker()
        if marker is None:
            return None
        chunks = list(marker["chunks"])
        if chunks and not any("inputs" in c for c in chunks):
            return None
        for rev in self._revisions():
            chunks.extend(rev["chunks"])
        return self.read_prefix_versions(chunks)

    def read_prefix_versions(self, chunks: list[dict]) -> dict:
        """name -> version of the files the batches of ``chunks`` read first (later chunks win)."""
        versions: dict = {}
        for line in self._read_chunks(chunks, key="inputs"):
            entry = json.loads(line)
            versions[entry["name"]] = entry["version"]
        return versions

    def write_revision(self, runs: list[tuple[list[int], list[MiniBatch]]], versions: dict,
                       changed: list[str], carried: Optional[dict] = None, added: Optional[list] = None) -> None:
        """Retire batches and append the ones that replace them, as one sealed revision.

        ``runs``: (retired ordinals, their replacements, numbered after the plan; no retired
        ordinals: batches of ``added`` input files, after all the others). ``carried``:
        {replacement: retired} whose done record carries over (see Manifest.carried). The new
        chunks and input versions are written first; the sealed record last, so a crash
        in between leaves the plan as it was.
        """
        index = len(self._revisions())
        first = min((b.ordinal for _, batches in runs for b in batches), default=None)
        lines = [b.to_json() for _, batches in runs for b in batches]
        prefix = f"rev-{index:06d}"
        chunks = []
        for i in range(0, max(len(lines), 1), CHUNK_SIZE):
            part = lines[i:i + CHUNK_SIZE]
            entry = {"count": len(part)}
            if part:
                data = ("\n".join(part) + "\n").encode()
                entry.update(name=f"{prefix}-chunk-{i // CHUNK_SIZE:06d}.jsonl", sha256=hashlib.sha256(data).hexdigest())
                self.store.write_atomic(data, "manifest", entry["name"])
            if i == 0 and versions:
                data = _inputs_lines(versions)
                entry.update(inputs=f"{prefix}-inputs.jsonl", inputs_sha256=hashlib.sha256(data).hexdigest())
                self.store.write_atomic(data, "manifest", entry["inputs"])
            chunks.append(entry)
        body = {"first": first, "chunks": chunks, "changed": changed, "written": time.time(),
                "carried": sorted([new, old] for new, old in (carried or {}).items()), "added": added or [],
                "runs": [{"retired": retired, "added": [batches[0].ordinal, batches[-1].ordinal + 1]
                          if batches else [0, 0]} for retired, batches in runs]}
        self.store.write_atomic(_sealed(body), "manifest", f"{prefix}.json")  # last: the revision counts now

    # -- records --------------------------------------------------------

    def done_writer(self, writer: str, limits: Optional[dict] = None) -> DoneWriter:
        """The recorder of one worker process; ``writer`` must be unique to that process.

        ``limits``: when a writer that buffers (object stores) stores a segment (``raypar.ledger``
        in the worker plan); without them it stores each record as it is written.
        """
        return writer_for(self.store)(self.store, writer, limits or {"flush_batches": 1, "flush_bytes": 0,
                                                                        "flush_seconds": 0.0})

    def recent_done(self, writer: str, position: int) -> set[str]:
        """Batches with a whole done record that ``writer`` stored after ``position`` (its
        ``DoneWriter.position`` when the driver last heard from it): what a lost worker recorded
        that its driver was not told, read without reading anyone else's records."""
        lines = writer_for(self.store).records_after(self.store, writer, position)
        return {json.loads(body)["batch"] for body in map(_verified, lines) if body is not None}

    def write_part(self, name: str, data: bytes) -> str:
        """Write one attempt's rows as their own file (object stores)."""
        self.store.write_once(data, "parts", f"{name}.part")
        return f"{name}.part"

    def record_done(self, record: DoneRecord) -> None:
        """Write one done record as its own file (object stores)."""
        name = attempt_name(record.batch, record.run, record.attempt)
        self.store.write_once(_sealed(record.__dict__), "done", f"{name}.json")

    def record_failed(self, record: FailedRecord) -> None:
        if self.failed_log is not None:  # a driver's session: stored a segment at a time
            self.failed_log.add(record.fields())
            return
        name = attempt_name(record.batch, record.run, record.attempt)
        self.store.write_atomic(_sealed(record.fields()), "failed", f"{name}.json")

    def gather_failures(self, run: str, seconds: float = FAILED_FLUSH_SECONDS) -> None:
        """From now on, failed records are gathered and stored as segments (:class:`FailedLog`)."""
        # A session gathers again for each round of batches (after rows failed verification): its
        # segments are numbered on, never stored twice under one name.
        self.failed_log = FailedLog(self.store, run, seconds, FAILED_FLUSH_RECORDS,
                                    first=self._failed_segments.get(run, 0))

    def flush_failures(self, due_only: bool = False) -> None:
        """Store the gathered failed records (``due_only``: only once the oldest is old enough)."""
        if self.failed_log is not None:
            self.failed_log.flush(due_only)

    def end_gathering_failures(self) -> None:
        """Store what is gathered; failed records are written one by one again."""
        gathered, self.failed_log = self.failed_log, None
        if gathered is not None:
            try:
                gathered.flush()
            finally:
                self._failed_segments[gathered.run] = gathered.next

    def void(self, record: DoneRecord, why: str) -> None:
        """Mark a done record invalid (its part failed verification): the batch runs again."""
        name = attempt_name(record.batch, record.run, record.attempt)
        self.store.write_atomic(json.dumps({"why": why}).encode(), "void", f"{name}.json")

    def read_rows(self, record: DoneRecord) -> bytes:
        """The rows a done record names (a whole part file, or a range of a segment)."""
        return self.store.read_range(self.store.path("parts", record.part), record.part_offset,
                                     record.part_offset + record.part_bytes)

    def view(self, manifest: Optional[Sequence[MiniBatch]] = None, lean: bool = False,
             reported: bool = False, failed: bool = True, errors_of: Optional[int] = None,
             errors_for: Optional[Sequence[str]] = None) -> LedgerView:
        """Read the records; pass ``manifest`` when already in hand to skip re-reading it.

        ``lean``: the done batches as a :class:`DoneSet` (which are done, and their unreturned
        items), read a record batch at a time: what a resume plans with and ``status`` counts,
        in a bit and an int per batch. Otherwise every chosen done record (:class:`DoneIndex`),
        which assembly and the reports need.

        ``reported`` (with ``lean``): also the chosen records whose run() reported items failed,
        as a table of ordinal, items and failed (:class:`ReportedRecords`), in ``view.reported``.

        ``failed=False``: no failed records (``view.failed`` is empty), for a caller that plans from
        the done set alone: with tracebacks, they are most of what a view of a flaky job reads.

        ``errors_of``: keep the tracebacks of the first ``errors_of`` failed batches only (by ordinal;
        what ``status`` shows), not of every failed attempt: a million distinct ones are a gigabyte.
        ``errors_for``: keep the tracebacks of these batches (IDs) only (what ``raypar logs --batch`` shows).

        Records of batches a revision retired (their input changed) are left out: they never count.
        """
        self.flush_failures()  # this session's own failures are part of what it reads
        manifest = manifest if manifest is not None else self.read_manifest()
        if lean and manifest is not None and not len(manifest):
            # No batch planned yet (a fresh job): none can be done or have failed, as a batch is
            # handed out only once its manifest chunk is written. Nothing to list.
            return LedgerView(manifest=manifest, done=DoneSet(0), lean=True,
                              reported=ReportedRecords().table() if reported else None)
        collector = ReportedRecords() if lean and reported else None
        with self._listed("parts", "void", "compact", "done", *(("failed", failed_compact.FOLDER) if failed else ())):
            done = self._done_set(len(manifest) if manifest is not None else 0, collector) if lean \
                else self._done_records()
            failed = self._failed_records(errors_of, done, getattr(manifest, "retired", None),
                                          errors_for=errors_for) if failed else FailedRecords()
        if getattr(manifest, "carried", None):
            done = done.carry(manifest.carried)  # before the retired records leave
        table = collector.table() if collector is not None else None
        retired = getattr(manifest, "retired", None)
        if retired is not None and len(retired):
            done = done.without(retired)
            failed = failed.without(retired)
            if table is not None:
                table = table.filter(pa.array(~np.isin(table.column("ordinal").to_numpy(), retired)))
        return LedgerView(manifest=manifest, done=done, failed=failed, lean=lean, reported=table)

    @contextmanager
    def _listed(self, *folders: str):
        """List ``folders`` at once (one round trip on an object store, not one per folder) and
        answer this thread's listings of them from that until the block ends. A record listed
        without the part it names is not counted, in whatever order the listings were taken,
        so listing together is as safe as listing one after the other."""
        outer = getattr(self._snapshot, "listings", {})
        outer_indexes = getattr(self._snapshot, "indexes", None)
        listed = self.store.listings(folders)
        listings = {**outer, **{folder: files for folder, (files, _) in listed.items()}}
        self._snapshot.listings = listings
        self._snapshot.indexes = outer_indexes if outer_indexes is not None else {}
        try:
            for folder in ("parts", "failed"):  # their tops; the open segment folders when asked for
                if folder in listed:
                    listings[folder] = segment_folders.SegmentListing(self.store, folder, listed[folder])
            yield
        finally:
            self._snapshot.listings = outer
            self._snapshot.indexes = outer_indexes

    def _segments(self, folder: str) -> segment_folders.SegmentListing:
        """The listing of ``parts`` or ``failed`` (this block's, see _listed): the top, and the
        segment folders a compaction left open once asked for with its ``closed``."""
        listed = getattr(self._snapshot, "listings", {}).get(folder)
        return listed if listed is not None else \
            segment_folders.SegmentListing(self.store, folder, self.store.entries_under(folder))

    def _file_sizes(self, folder: str) -> dict[str, int]:
        listed = getattr(self._snapshot, "listings", {}).get(folder)
        return listed if listed is not None else self.store.file_sizes(folder)

    def _list_files(self, folder: str) -> list[str]:
        return sorted(self._file_sizes(folder))

    def _failed_windows(self, covers: dict, closed: segment_folders.Closed) -> Iterator[list[tuple[str, int, bytes]]]:
        """The files of sealed failed records (``.json`` files hold one, ``.jsonl`` segments one per
        line) outside the segment folders ``closed`` closes, past what ``covers`` ({name under
        failed/: bytes}) says was compacted, as (path, start, bytes), RECORDS_WINDOW bytes of them
        at a time (read concurrently on object stores): a million failed attempts are a gigabyte
        of tracebacks, never all in memory at once."""
        listing = self._segments("failed")
        sizes = listing.sizes(closed)
        window: list[tuple[str, int]] = []
        window_bytes = 0

        def read() -> list[tuple[str, int, bytes]]:
            got = self.store.read_ranges([p for p, _ in window], [s for _, s in window],
                                         [sizes[p] for p, _ in window])
            out = []
            for (path, start), data in zip(window, got, strict=True):
                if isinstance(data, BaseException) and not isinstance(data, FileNotFoundError):
                    raise data
                if not isinstance(data, BaseException):
                    out.append((path, start, data))
            return out

        for path in sorted(p for p in sizes if p.endswith((".json", ".jsonl"))):
            start = covers.get(listing.name(path), 0)
            if start >= sizes[path]:
                continue
            window.append((path, start))
            window_bytes += sizes[path] - start
            if window_bytes >= RECORDS_WINDOW:
                yield read()
                window, window_bytes = [], 0
        if window:
            yield read()

    def _done_records(self) -> DoneIndex:
        read = self._done_table()
        part_sizes, voided = self._proof(read)
        return choose(read.table, part_sizes, voided)

    def _done_set(self, size: int, reported: Optional[ReportedRecords] = None) -> DoneSet:
        """The done batches, from the compact files a record batch at a time (only LEAN_COLUMNS
        decoded) plus the records read since; a damaged compact file falls back to a full read.
        ``reported``: also gather the reporting records there (their ``failed`` column decoded)."""
        read = self._done_table(base=False)
        part_sizes, voided = self._proof(read)
        columns = ReportedRecords.COLUMNS if reported is not None else LEAN_COLUMNS
        done = DoneSet(size)
        try:
            for batch in self._record_batches(read, columns):
                keep = done.add(batch, part_sizes, voided)
                if reported is not None:
                    reported.add(batch, keep)
        except LedgerError:
            chosen = self._done_records().table  # it passes over damaged files
            done = DoneSet(size)
            keep = done.add(chosen, part_sizes, voided)
            if reported is not None:
                reported.clear()
                reported.add(chosen, keep)
            return done
        if reported is not None and len(ambiguous := reported.ambiguous()):
            # Read again only the records of batches with several valid ones: choose() decides.
            rows = [b.filter(pa.array(np.isin(b.column("ordinal").to_numpy(), ambiguous)))
                    for b in self._record_batches(read, columns)]
            rows = [pa.Table.from_batches([b]) if isinstance(b, pa.RecordBatch) else b for b in rows]
            reported.decided = choose(pa.concat_tables(rows, promote_options="permissive"), part_sizes,
                                      voided).table
        return done

    def _record_batches(self, read: "_DoneRead", columns: list[str]) -> Iterator:
        """The done records of ``read`` with ``columns``: each compact file a record batch at a
        time, then those read since the newest compaction."""
        for entry in read.files:
            yield from self._compact_batches(entry, columns)
        if read.fresh.num_rows:
            yield read.fresh.select(columns)

    def _compact_batches(self, entry: dict, columns: list[str] = LEAN_COLUMNS) -> Iterator:
        """The record batches of one compact file, checked against its sha256 first (streamed from
        local disk, so the file is never whole in memory there)."""
        name = entry["file"]
        local = self.store.local_path("compact", name)
        try:
            if local is not None:
                with open(local, "rb") as f:
                    digest, source = hashlib.file_digest(f, "sha256").hexdigest(), local
            else:
                source = self.store.read_bytes("compact", name)
                digest = hashlib.sha256(source).hexdigest()
        except FileNotFoundError:
            raise LedgerError(f"{self.url}/compact/{name}: missing") from None
        if digest != entry["file_sha256"]:
            raise LedgerError(f"{self.url}/compact/{name}: corrupted (checksum mismatch)")
        yield from ipc_batches(source, columns)

    def _proof(self, read: "_DoneRead") -> tuple[dict, set]:
        """What the done records ``read`` are checked against: the sizes of parts/ by name there
        (a closed folder's segments whole: the compaction read their records out of them), and
        the voided records' keys."""
        part_sizes = self._segments("parts").proof(read.closed)
        voided = {void_key_of(os.path.basename(p)) for p in self._list_files("void")}
        return part_sizes, voided - {None}

    # -- compaction -----------------------------------------------------

    def _done_table(self, base: bool = True) -> "_DoneRead":
        """Every sealed done record (not yet checked against parts): the compacted ones, the ones
        read since, and what each covers.

        Starts from the newest intact compact file and adds only what it does
        not cover: record files and segment objects it does not name (in the segment folders it
        did not close), and segment-file bytes past it. ``base=False`` leaves the compact files
        unread (an incremental compaction needs only what they cover).
        """
        base, covered, files, closed = self._latest_compact(load=base)
        listing = self._segments("parts")
        coverage, lines = dict(covered), []
        sizes = self._file_sizes("done")
        new = [p for p in sizes if p.endswith(".json") and os.path.basename(p) not in covered]
        for path, data in self.store.read_many(new).items():  # object stores: concurrent reads
            body = _verified(data)
            if body is not None:  # a torn record is read again next time
                lines.append(body)
                coverage[os.path.basename(path)] = sizes[path]
        segments = {p: size for p, size in listing.sizes(closed).items()
                    if p.endswith(SEGMENT_SUFFIX) and listing.name(p) not in covered}
        for path, records in segment_records(self.store, segments).items():  # object stores
            lines.extend(b for b in map(_verified, records) if b is not None)
            coverage[listing.name(path)] = len(records)
        for path, size in sizes.items():
            name = os.path.basename(path)
            if name.endswith(".jsonl") and size > covered.get(name, 0):
                start = covered.get(name, 0)
                data = self.store.read_range(path, start, size)
                whole = data[:data.rfind(b"\n") + 1]  # a line being written is read next time
                lines.extend(b for b in map(_verified, whole.split(b"\n")) if b is not None)
                coverage[name] = start + len(whole)
        fresh = records_table(lines) if lines else empty_table()
        return _DoneRead(base, fresh, coverage, covered, files, closed)

    def _latest_compact(self, load: bool = True) -> tuple:
        """(the compacted records, their coverage, the files holding them) of the newest intact
        compact index; an index whose files are missing or damaged is passed over for an older one.
        ``load=False``: the newest sealed index, its files neither read nor checked (no records)."""
        for path in sorted(self._list_files("compact"), reverse=True):
            if not path.endswith(".idx"):
                continue
            index = self._index(os.path.basename(path))
            if index is None:
                continue
            files = index.get("files") or [{"file": index["file"], "file_sha256": index["file_sha256"],
                                            "rows": index.get("rows")}]  # an index of one file (before deltas)
            closed = segment_folders.closed_of(index)
            if not load:
                return empty_table(), index["covers"], files, closed
            data = self.store.read_verified("compact", files)
            if data is not None:
                tables = [from_ipc(d) for d in data]
                return (pa.concat_tables(tables) if len(tables) > 1 else tables[0]), index["covers"], files, closed
        return empty_table(), {}, [], {}

    def _index(self, name: str) -> Optional[dict]:
        """A sealed compact index (None if torn), read once per listing (see _listed)."""
        cache = getattr(self._snapshot, "indexes", None)
        if cache is None or name not in cache:
            index = _unseal(self.store.read_bytes("compact", name))
            if cache is None:
                return index
            cache[name] = index
        return cache[name]

    def compact(self, run: str, session_over: bool = False, may_write: Optional[Callable[[], bool]] = None,
                gone: frozenset = frozenset()) -> bool:
        """Fold the done records read since the last compaction into the compact index; False if
        nothing was new. ``session_over``: ``run``'s workers are gone (its session's last compaction).
        ``may_write``: whether ``run`` still holds the lease, asked after the listing and before
        the index is written (none is written if not; the folders it closes depend on it, see
        SegmentListing.closing); None where the caller knows it does. ``gone``: writers of ``run``
        whose workers are gone, what they stored read first (their folders are closed).

        Incremental: the new records go to a delta file of their own, named by the new index next
        to the files it keeps, merged with the newest files no larger than they are (see
        compact_tiers). Files and indexes the new index supersedes are removed.
        """
        with self._listed("compact", "done", "parts"):
            read = self._done_table(base=False)  # what the compact files cover, not their records
            closed = self._segments("parts").closing(read.closed, run, session_over, gone)
            if read.coverage == read.covered and closed == read.closed:
                return False
            kept = len(read.files) - newest_to_merge(read.files, read.fresh.num_rows)
            data = self.store.read_verified("compact", read.files[kept:]) if kept < len(read.files) else []
            if data is None:  # one is missing or damaged: everything, from the newest intact index
                read = self._done_table()
                closed = self._segments("parts").closing(read.closed, run, session_over, gone)
                kept, merged = 0, [read.base]
            else:
                merged = [from_ipc(d) for d in data]
        name = compact_name(run, self.lease.epoch)
        files = list(read.files[:kept])
        table = pa.concat_tables([*merged, read.fresh]) if merged else read.fresh
        if table.num_rows:
            data = to_ipc(table.unify_dictionaries().combine_chunks())
            self.store.write_atomic(data, "compact", f"{name}.arrow")
            files.append({"file": f"{name}.arrow", "file_sha256": hashlib.sha256(data).hexdigest(),
                          "rows": table.num_rows})
        # The segment folders it read whole are closed: later views list neither them nor their names.
        index = {"files": files, "rows": sum(f["rows"] or 0 for f in files),
                 "covers": segment_folders.prune(read.coverage, closed), "closed": closed}
        if may_write is not None and not may_write():
            return False  # the job dir is another session's now (its delta file goes as superseded)
        self.store.write_atomic(_sealed(index), "compact", f"{name}.idx")  # last: the compact now counts
        self._remove_superseded(f"{name}.idx", {f["file"] for f in files})
        return True

    def _remove_superseded(self, index: str, kept: set[str], folder: str = "compact") -> None:
        """Remove the compact files and indexes older than ``index`` that it does not name (a
        reader still on one of them falls back to an older index, or to the records)."""
        for path in self.store.list_files(folder):
            name = os.path.basename(path)
            if name < index and name not in kept:
                try:
                    self.store.remove(folder, name)
                except OSError as exc:  # a leftover costs space, never correctness
                    log.warning("could not remove the superseded %s: %s", name, exc)

    def _failed_records(self, errors_of: Optional[int] = None, done=None, retired=None,
                        compacted: bool = True, errors_for: Optional[Sequence[str]] = None) -> FailedRecords:
        """The failed records: the newest compaction's columns (its tracebacks: all, or with
        ``errors_of`` or ``errors_for`` only those shown) and the record files it does not cover,
        read in windows."""
        latest = failed_compact.latest(self.store, self.url, self._file_sizes(failed_compact.FOLDER)) \
            if compacted else None
        tables, shown = [], np.empty(0, dtype=np.int64)
        some = errors_of is not None or errors_for is not None  # only the tracebacks of ``shown``
        if errors_for is not None:
            shown = np.unique(np.array([ordinal_of(b) for b in errors_for], dtype=np.int64))
        if latest is not None and errors_of is not None and latest.table.num_rows:
            shown = _lowest_failed(latest.table, shown, errors_of, done, retired)
        # A window's texts are dictionary-encoded as it is read: a million attempts of one bug hold
        # one copy of its traceback, not a million (a Python string each took `raypar status` to 2.6 GiB).
        covers, closed = (latest.covers, latest.closed) if latest is not None else ({}, {})
        for files in self._failed_windows(covers, closed):
            table = failed_table([data for _, _, data in files])
            del files  # before the next window is read
            if some and table.num_rows:
                if errors_of is not None:
                    shown = _lowest_failed(table, shown, errors_of, done, retired)
                table = _errors_of(table, shown)
            tables.append(table)
        if latest is not None:
            try:  # the tracebacks last: only now is it known which are shown
                tables.insert(0, latest.records(self.store, shown if some else None))
            except LedgerError as exc:
                log.warning("%s; reading the failed records themselves", exc)
                self._failed_compact_damaged = True
                return self._failed_records(errors_of, done, retired, compacted=False, errors_for=errors_for)
        if some and tables:  # those of batches shown for a while, then passed by lower ones
            tables = [_errors_of(table, shown) for table in tables if table.num_rows]
        return FailedRecords(pa.concat_tables(tables) if tables else None)

    def compact_failures(self, run: str, afresh: bool = False, session_over: bool = False,
                         may_write: Optional[Callable[[], bool]] = None) -> bool:
        """Fold the failed records stored since the last compaction of them into a delta of columns
        and pieces of tracebacks (see raypar/jobdir/failed_compact.py); False if nothing was new.
        The segment folders of failed/ it read whole are closed, as :meth:`compact` closes those
        of parts/ (``session_over``: the session's driver stores no more failed records;
        ``may_write``: as :meth:`compact`'s).

        The columns are merged with the newest column files no larger than they are, as
        :meth:`compact` merges (see compact_tiers); the pieces of tracebacks are never rewritten
        (a million distinct ones are a gigabyte). A compaction whose files are missing, cut or
        damaged is started again from the records (a view passes it over meanwhile): seen in the
        listing, or by a view of this ledger (a driver's session reads every piece).
        """
        folder = failed_compact.FOLDER
        afresh, self._failed_compact_damaged = afresh or self._failed_compact_damaged, False
        with self._listed(folder, "failed"):
            listed = self._file_sizes(folder)
            before = None if afresh else failed_compact.latest(self.store, self.url, listed, load=False)
            if before is not None and not before.whole(listed):
                return self.compact_failures(run, afresh=True, session_over=session_over, may_write=may_write)
            name = compact_name(run, self.lease.epoch)
            files, pieces = (list(before.files), list(before.pieces)) if before is not None else ([], [])
            covered = dict(before.covers) if before is not None else {}
            was_closed = dict(before.closed) if before is not None else {}
            covers, tables, listing = dict(covered), [], self._segments("failed")
            for window in self._failed_windows(covered, was_closed):
                table, texts = failed_compact.columns_of(failed_table([data for _, _, data in window]), len(pieces))
                for piece in texts:
                    data = failed_compact.piece_bytes(piece)
                    piece_name = f"{name}.errors-{len(pieces):05d}.arrow"
                    self.store.write_atomic(data, folder, piece_name)
                    pieces.append({"file": piece_name, "file_sha256": hashlib.sha256(data).hexdigest(),
                                   "rows": len(piece), "bytes": len(data)})
                # Up to the last whole line of a segment: one still being written is read on from there.
                covers.update({listing.name(path): start + (data.rfind(b"\n") + 1 if path.endswith(".jsonl")
                                                                else len(data))
                               for path, start, data in window})
                tables.append(table)
            closed = listing.closing(was_closed, run, session_over)
        if covers == covered and closed == was_closed:  # (a torn last line is read each time, never covered)
            return False
        kept = len(files) - newest_to_merge(files, sum(t.num_rows for t in tables))
        if kept < len(files):  # merge the columns; the pieces stay as they are
            data = self.store.read_verified(folder, files[kept:])
            if data is None:
                # (this one's pieces go as superseded)
                return self.compact_failures(run, afresh=True, session_over=session_over, may_write=may_write)
            tables = [pa.ipc.open_file(pa.BufferReader(d)).read_all() for d in data] + tables
            files = files[:kept]
        if any(t.num_rows for t in tables):
            data, rows = failed_compact.columns_bytes(tables)
            self.store.write_atomic(data, folder, f"{name}.arrow")
            files.append({"file": f"{name}.arrow", "file_sha256": hashlib.sha256(data).hexdigest(), "rows": rows,
                          "bytes": len(data)})
        # The segment folders it read whole are closed: later views list neither them nor their names.
        index = {"files": files, "errors": pieces, "rows": sum(f["rows"] for f in files),
                 "covers": segment_folders.prune(covers, closed), "closed": closed}
        if may_write is not None and not may_write():
            return False  # the job dir is another session's now
        self.store.write_atomic(_sealed(index), folder, f"{name}.idx")  # last: the compaction now counts
        self._remove_superseded(f"{name}.idx", {f["file"] for f in files} | {p["file"] for p in pieces}, folder)
        return True

    # -- state ----------------------------------------------------------

    def write_state(self, state: JobState, run: str, reason: str = "") -> None:
        # The epoch fences it: a state from a session that no longer held the lease is not trusted.
        body = {"state": state.value, "run": run, "reason": reason, "updated": time.time(),
                "epoch": self.lease.epoch}
        self.store.write_atomic(json.dumps(body, sort_keys=True).encode(), "state.json")

    def read_state(self) -> dict:
        try:
            body = json.loads(self.store.read_bytes("state.json"))
            JobState(body["state"])
            return body
        except FileNotFoundError:
            return {"state": JobState.CREATED.value, "run": None, "reason": ""}
        except (ValueError, KeyError, TypeError):
            # A torn state file only loses the last label; the records are the truth.
            return {"state": JobState.INTERRUPTED.value, "run": None, "reason": "state.json unreadable"}

    # -- worker time ----------------------------------------------------

    def record_worker_time(self, run: str, ended: str, split: dict) -> None:
        """What session ``run``'s workers' time went to (raypar/engine/worker_time.py), and how it
        ``ended``. Created once: the session's own record at its end wins over the one the next
        session makes from the lease a killed driver left."""
        body = {"run": run, "ended": ended, "worker_time": split}
        self.store.write_new(json.dumps(body, sort_keys=True).encode(), WORKER_TIME, f"{run}.json")

    def worker_times(self) -> list[dict]:
        """Every recorded session's, oldest first (run IDs sort by their start): a listing and a
        read per session."""
        paths = sorted(p for p in self.store.list_files(WORKER_TIME) if p.endswith(".json"))
        data = self.store.read_many(paths)
        records = []
        for path in paths:
            try:
                records.append(json.loads(data[path]))
            except (KeyError, ValueError):  # gone meanwhile, or torn: that session is not counted
                continue
        return records

    # -- cancel ---------------------------------------------------------

    def log_path(self, writer: str) -> Optional[str]:
        """Local file for a worker's user log; None when the job dir is on object storage (the
        worker then stores its log in pieces: raypar/jobdir/log_shipper.py)."""
        return self.store.local_path("logs", f"{writer}.log")

    def worker_logs(self) -> list[tuple[str, str]]:
        """(where, text) of each worker's log, in name order. On object stores a worker's log is
        stored in pieces (``logs/<writer>~NNNNNN.log``, see raypar/jobdir/log_shipper.py): joined here."""
        paths = [p for p in self.store.list_files("logs") if p.endswith(".log")]
        data = self.store.read_many(paths)
        logs: dict[str, list] = {}
        for path in paths:
            logs.setdefault(log_name(os.path.basename(path)), []).append(data.get(path, b""))
        return [(self.store.url("logs", name), b"".join(pieces).decode(errors="replace"))
                for name, pieces in sorted(logs.items())]

    def request_cancel(self, run: str) -> None:
        """Ask the driver of ``run`` to stop (``raypar cancel``); other runs ignore it."""
        body = {"run": run, "requested": time.time(), "by": f"{getpass.getuser()}@{socket.gethostname()}"}
        self.store.write_atomic(json.dumps(body).encode(), "cancel", f"{run}.json")

    def cancel_requested(self, run: str) -> bool:
        # A read, not exists(): on object stores a missing name costs one GET, where a HEAD
        # is followed by a listing (is it a folder?); the driver loop asks every few seconds.
        marker = self.store.path("cancel", f"{run}.json")
        return marker in self.store.read_many([marker])


_VERSION_LINE = json.JSONEncoder(separators=(",", ":")).encode  # one encoder, not one per line


def _lowest_failed(table: pa.Table, shown: np.ndarray, count: int, done, retired) -> np.ndarray:
    """The ``count`` lowest batches failed for good among ``shown`` and those of ``table`` (failed
    records). Whose tracebacks a view with ``errors_of`` keeps: a batch among the lowest at the end
    was among them from its final record on, so its last record's traceback is kept (records are
    read in the order they were stored; the compacted ones' tracebacks are read at the end)."""
    ordinals = table.column("ordinal").to_numpy()
    failed = table.column("final").to_numpy(zero_copy_only=False) & ~done.mask(int(ordinals.max()) + 1)[ordinals]
    if retired is not None and len(retired):
        failed &= ~np.isin(ordinals, retired)
    return np.unique(np.concatenate([shown, ordinals[failed]]))[:count]


def _errors_of(table: pa.Table, shown: np.ndarray) -> pa.Table:
    """``table`` (FAILED_SCHEMA) with the tracebacks of the batches ``shown`` only; the dictionary
    goes with the tracebacks let go."""
    keep = np.isin(table.column("ordinal").to_numpy(), shown)
    error = table.column("error").combine_chunks()
    keep &= error.is_valid().to_numpy(zero_copy_only=False)  # (let go already)
    indices = error.indices.fill_null(0).to_numpy()
    used = np.unique(indices[keep])
    kept = pa.DictionaryArray.from_arrays(
        pa.array(np.searchsorted(used, indices).clip(0, max(len(used) - 1, 0)).astype(np.int32), mask=~keep),
        error.dictionary.take(pa.array(used, pa.int64())))
    return table.set_column(table.schema.get_field_index("error"), "error", kept)


def _inputs_lines(versions: dict) -> bytes:
    """Input file versions as JSON lines, in the order the planner met the files."""
    return "".join(_VERSION_LINE({"name": n, "version": v}) + "\n" for n, v in versions.items()).encode()


class ManifestWriter:
    """Appends planned batches to the manifest chunk by chunk, then seals it with COMPLETE.json.

    Each chunk is written whole (atomic), and the planner hands a batch to the
    scheduler only after its chunk is written: a batch that ran is always in
    the manifest a resume reads.
    """

    def __init__(self, ledger: Ledger, prefix_lines: list[bytes]):
        self.store = ledger.store
        self.chunks: list[dict] = []
        self.count = 0
        self.buffer: list[str] = []
        index = 0
        self.inputs: dict = {}  # versions of the files the buffered batches read first
        while prefix_lines and self.count < len(prefix_lines):  # describe the chunks already there
            data = self.store.read_bytes("manifest", chunk_name(index))
            n = data.count(b"\n")
            entry = {"name": chunk_name(index), "count": n, "sha256": hashlib.sha256(data).hexdigest()}
            try:
                inputs = self.store.read_bytes("manifest", inputs_name(index))
                entry.update(inputs=inputs_name(index), inputs_sha256=hashlib.sha256(inputs).hexdigest())
            except FileNotFoundError:
                pass
            self.chunks.append(entry)
            self.count += n
            index += 1

    def add(self, batch: MiniBatch) -> str:
        """Buffer ``batch`` for the next chunk; returns its manifest line."""
        if batch.ordinal != self.count + len(self.buffer):
            raise LedgerError(f"planner produced ordinal {batch.ordinal}, expected {self.count + len(self.buffer)}")
        line = batch.to_json()
        self.buffer.append(line)
        if batch.inputs:
            self.inputs.update(batch.inputs)
        return line

    def flush(self) -> int:
        """Write the buffered batches as the next chunk (their input versions first); returns how many."""
        if not self.buffer:
            return 0
        name = chunk_name(len(self.chunks))
        entry: dict = {}
        if self.inputs:
            inputs = _inputs_lines(self.inputs)
            self.store.write_atomic(inputs, "manifest", inputs_name(len(self.chunks)))
            entry = {"inputs": inputs_name(len(self.chunks)), "inputs_sha256": hashlib.sha256(inputs).hexdigest()}
            self.inputs = {}
        data = ("\n".join(self.buffer) + "\n").encode()
        self.store.write_atomic(data, "manifest", name)
        self.chunks.append({"name": name, "count": len(self.buffer), "sha256": hashlib.sha256(data).hexdigest(),
                            **entry})
        written = len(self.buffer)
        self.count += written
        self.buffer.clear()
        return written

    def complete(self) -> int:
        self.flush()
        self.store.write_atomic(_sealed({"batches": self.count, "chunks": self.chunks}), "manifest", "COMPLETE.json")
        return self.count
