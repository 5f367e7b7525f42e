"""What a view of a job dir on object storage lists when every batch is a segment of its own.

A worker stores a segment when its oldest buffered batch is ``flush_seconds`` (1 s) old, so a job
whose batches take longer than that (GPU inference) leaves a segment object per batch in parts/.
Format 2 kept them all at the top of parts/, and every view (``raypar status``, a resume, a
session's end) listed every one. Format 3 stores a worker's segments in folders of
SEGMENTS_PER_FOLDER; a compaction closes the folders it read whole, and a view lists the top of
parts/ (a name per folder) and the folders still open.

For each count of segments (--segments, written by --writers writers, one batch each, through the
real writer), this builds the job dir twice on the emulator: with format 2's flat names (the
baseline: the layout this replaces) and with format 3's folders. Then, in this process with a
fresh client each time, it times the lean view ``raypar status`` and a resume read (best of
--repeat), while the session runs before its first compaction (every folder open), after a
compaction while it runs (each writer's last folder open), after one that knows half the workers
were replaced (their writers gone: all their folders closed), and after the session's end (its
last compaction, its workers gone: every folder closed).

It prints seconds and the names the listings returned, side by side, and their ratio.

    python benchmarks/bench_parts_listing.py [--store azurite|s3] [--segments 1000 3000 10000] [--writers 8]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import flat_against_folders  # noqa: E402

from raypar.inputs.base import MiniBatch  # noqa: E402
from raypar.jobdir import writers  # noqa: E402
from raypar.jobdir.ledger import Ledger  # noqa: E402
from raypar.jobdir.records import DoneRecord  # noqa: E402

ONE_PER_SEGMENT = {"flush_batches": 1, "flush_bytes": 1 << 30, "flush_seconds": 0}
CASES = [  # (when the view is taken, the compaction before it)
    ("running, nothing compacted yet", None),  # the first COMPACT_EVERY batches of a session
    ("running, after a compaction", {}),  # every writer's last folder open
    ("running, half the workers replaced", "half"),  # those writers gone (Progress.gone): their last closed
    ("after the session's end", {"session_over": True}),  # its workers gone: every folder closed
]


def flat_name(writer: str, seq: int) -> str:
    return f"{writer}~{seq:06d}.seg"  # format 2: every segment at the top of parts/


def build(url: str, options: dict, segments: int, writer_count: int, flat: bool) -> None:
    ledger = Ledger(url, options)
    ledger.write_manifest(MiniBatch(ordinal=i, kind="files", payload={"files": [f"f{i}.jpg"]}, item_count=1)
                          for i in range(segments))
    named = writers.segment_name
    if flat:
        writers.segment_name = flat_name
    try:
        def write(w: int) -> None:
            writer = ledger.done_writer(f"r1~w{w:02d}", ONE_PER_SEGMENT)
            for ordinal in range(w, segments, writer_count):
                rows = f"label of f{ordinal}.jpg\n".encode()
                writer.write(DoneRecord(batch=f"mb-{ordinal:07d}", run="r1", attempt=1, items=1, returned=1,
                                        part=None), rows)

        with ThreadPoolExecutor(writer_count) as pool:
            list(pool.map(write, range(writer_count)))
    finally:
        writers.segment_name = named


def measure(url: str, options: dict) -> tuple[float, int, int]:
    """(seconds, names listed, done) of the lean view status and a resume read, a fresh client."""
    ledger = Ledger(url, {**options, "skip_instance_cache": True})
    counted = {"names": 0}
    entries = ledger.store.entries

    def counting(folder):
        files, folders = entries(folder)
        counted["names"] += len(files) + len(folders)
        return files, folders

    ledger.store.entries = counting
    started = time.perf_counter()
    view = ledger.view(lean=True, failed=False)
    seconds = time.perf_counter() - started
    return seconds, counted["names"], len(view.done)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", choices=["azurite", "s3"], default="s3")
    parser.add_argument("--segments", type=int, nargs="+", default=[1000, 3000, 10000])
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3, help="views timed per case (best shown)")
    args = parser.parse_args()

    def compact(url: str, options: dict, how) -> None:
        if how == "half":
            Ledger(url, options).compact("r1", gone=frozenset(f"r1~w{w:02d}" for w in range(args.writers // 2)))
        elif how is not None:
            Ledger(url, options).compact("r1", **how)

    flat_against_folders(args.store, "raypar-bench-parts-", args.segments, ("format 2 (flat)", "format 3 (folders)"),
                         CASES, lambda url, options, count, flat: build(url, options, count, args.writers, flat),
                         compact, measure, args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
