"""Where everything lives in a job dir, and how each file is named.

Everything is JSON or Arrow; nothing here is ever unpickled or executed::

    job.json                    frozen spec + job identity (written once)
    spec.yml                    readable copy of the frozen spec (never read back)
    manifest/chunk-NNNNNN.jsonl the planned mini-batches, one JSON line each, written as planned
    manifest/COMPLETE.json      written when planning ends: chunk names, counts, checksums
    done/<run>~<worker>.jsonl   local disk: one worker process's done records, appended
    parts/<run>~<worker>.data   local disk: that worker's output rows, appended
    parts/<run>~<worker>~fNNNNN/<run>~<worker>~NNNNNN.seg  object stores: one flush of a worker:
                                the rows of up to ``raypar.ledger.flush_batches`` batches, their
                                records, a trailer; SEGMENTS_PER_FOLDER of a worker's segments to a
                                folder, so a view lists only the folders a compaction has not closed
    parts/<run>~<worker>~NNNNNN.seg object stores, format 2: the same segments, not in folders
    done/<batch>~<run>~<try>.json   object stores, before segments: one done record per attempt
    parts/<batch>~<run>~<try>.part  object stores, before segments: one attempt's output rows
    failed/<run>~fNNNNN/<run>~NNNNNN.jsonl  a driver session's failed attempts (sealed lines with the
                                error text), stored a second's worth at a time, SEGMENTS_PER_FOLDER
                                to a folder as parts/'s segments are
    failed/<run>~NNNNNN.jsonl   before format 4: the same, not in folders
    failed/<batch>~<run>~<try>.json one failed attempt, outside a driver's session and in older job dirs
    void/<batch>~<run>~<try>.json   a done record whose rows failed verification
    compact/compact-<id>.arrow  every done record read so far, as Arrow columns (+ a sealed .idx
                                naming what it covers): a large job resumes without parsing each
    failed-compact/compact-<id>.arrow  every failed record read so far, as Arrow columns; their
                                tracebacks in .errors-NNNNN.arrow pieces, a sealed .idx naming both and
                                what it covers (raypar/jobdir/failed_compact.py): status reads columns
    cancel/<run>.json           `raypar cancel` asking the driver of that run to stop
    logs/<run>~<worker>.log     one worker process's entry-script logging, stdout and stderr
    logs/<run>~<worker>~NNNNNN.log  object stores: that log, stored in pieces as it grows
    reports/                    derived at the end of each session (see raypar/engine/reports.py;
                                reports/report.html: raypar/engine/report_html.py)
    state.json                  last state written by the driver holding the lease
    worker_time/<run>.json      what that session's workers' time went to (written once: by the
                                session at its end, or from its last heartbeat by the session that
                                took its lease over)
    lease/NNNNNNNNNNNN.json     which driver owns the job dir: one generation per heartbeat, each
                                created exclusively (see raypar/jobdir/lease.py)

Every file has one writer and a name nobody else uses (run ID + worker, or
run ID + attempt); nothing is ever read-modified-written. A done record is
sealed with the sha256 of its own content and holds the offset, length and
CRC-32 of its rows, which are written first: a record torn by a crash, or
whose rows are missing, short or different, counts as not done.

Local disk appends to per-worker segment files because creating a file
costs more than running a small batch; on object stores, where a PUT is
atomic and appends are not, each worker buffers its finished batches and
stores them as one segment object per flush (a batch counts once stored).
A worker stores its segments one after the other, so once its folder N+1
exists, folder N holds all it ever will: a compaction that read it marks it
closed, and later views list only the folders still open (see
raypar/jobdir/segment_folders.py); a driver stores its failed records the same way.

The one resume rule lives in :meth:`LedgerView.pending`: manifest - done.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from typing import Optional

from raypar.inputs.base import ordinal_of

SEGMENT_SUFFIX = ".seg"
SEGMENTS_PER_FOLDER = 100  # a worker's segments to a folder: a view lists at most this many of each writer
_SEGMENT_FOLDER = re.compile(r"^(.+)~f(\d{5,})$")  # parts/<writer>~fNNNNN: one folder of a writer's segments
REPORT_HTML = "report.html"  # under reports/: the job's one-page report
WORKER_TIME = "worker_time"  # worker_time/<run>.json: a session's worker time
_LOG_PIECE = re.compile(r"^(.+)~(\d{6})\.log$")  # one piece of a worker's log on object storage


def attempt_name(batch: str, run: str, attempt: int) -> str:
    return f"{batch}~{run}~{attempt}"


def segment_name(writer: str, seq: int, suffix: str = SEGMENT_SUFFIX) -> str:
    """The ``seq``-th segment of a writer (numbered from 0, stored one after the other): a
    worker's under parts/, a driver's failed records (``.jsonl``) under failed/:
    ``<writer>~fNNNNN/<writer>~NNNNNN<suffix>``, SEGMENTS_PER_FOLDER to a folder."""
    return f"{writer}~f{seq // SEGMENTS_PER_FOLDER:05d}/{writer}~{seq:06d}{suffix}"


def segment_folder(name: str) -> Optional[tuple[str, int]]:
    """(writer, folder number) of a segment folder (of parts/ or failed/), or of a segment named
    in one (its ``segment_name``); None for anything else (a file at the top of the folder)."""
    head = name.split("/", 1)[0]
    match = _SEGMENT_FOLDER.match(head) if "." not in head else None  # a file's name has a suffix
    return (match.group(1), int(match.group(2))) if match else None


def log_piece_name(writer: str, seq: int) -> str:
    return f"{writer}~{seq:06d}.log"


def log_name(file_name: str) -> str:
    """The worker log a file of logs/ belongs to: a piece names its whole log."""
    match = _LOG_PIECE.match(file_name)
    return f"{match.group(1)}.log" if match else file_name


def chunk_name(index: int) -> str:
    return f"chunk-{index:06d}.jsonl"


def inputs_name(index: int) -> str:
    return f"inputs-{index:06d}.jsonl"


def compact_name(run: str, epoch: int) -> str:
    """Sorts after every earlier compaction's: the newest index is the last name. First by the
    lease ``epoch`` of the session compacting (its fencing token: each session takes the lease at
    a higher one), so no clock decides between sessions: a driver whose clock ran ahead, or one
    fenced whose index landed late, never names an index that sorts after the holder's (it would
    be read instead, and remove the holder's files as superseded). Then by this host's clock, to
    the nanosecond, within a session. ``s`` sorts after the ``r`` of names before epochs."""
    now = time.time_ns()
    stamp = time.strftime("r%Y%m%d%H%M%S", time.gmtime(now // 10**9)) + f"{now % 10**9:09d}"
    return f"compact-s{epoch:010d}-{stamp}-{uuid.uuid4().hex[:6]}-{run}"


def void_key_of(name: str) -> Optional[str]:
    """void/<batch>~<run>~<attempt>.json -> the key tables.choose uses."""
    try:
        batch, run, attempt = name[:-len(".json")].split("~")
        return f"{ordinal_of(batch)}~{run}~{int(attempt)}"
    except ValueError:
        return None


def default_job_dir(name: Optional[str]) -> str:
    """A new job's dir when none is given: ``./raypar-jobs/<name>-<time>-<4 hex>``, absolute."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    slug = (name or "job").replace("/", "-")
    return os.path.realpath(os.path.join("raypar-jobs", f"{slug}-{stamp}-{uuid.uuid4().hex[:4]}"))
