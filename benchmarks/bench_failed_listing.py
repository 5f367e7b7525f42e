"""What a view of a job dir on object storage lists when a long, flaky job stored a segment of
failed records for every failure.

A driver stores the failed records it gathered once the oldest is a second old, so a job whose
failures come slower than that (a bad input now and then in a job of hours) leaves a segment
object per failure in failed/. Format 3 kept them all at the top of failed/, and every view that
reads failed records (``raypar status``, a session's end, the reports) listed every one. Format 4
stores them in folders of SEGMENTS_PER_FOLDER; the compaction of failed records closes the
folders it read whole, and a view lists the top of failed/ (a name per folder) and the folders
still open.

For each count of segments (--segments, one failed attempt each, written one after the other by
the real FailedLog of one session), this builds the job dir twice on the emulator: with format
3's flat names (the baseline: the layout this replaces) and with format 4's folders. Then, in this
process with a fresh client each time, it times the view ``raypar status`` takes (lean, the
tracebacks of the first 3 failed batches; best of --repeat), while the session runs before its
first compaction of failed records (every folder open), after one while it runs (its last folder
open), and after the session's end (its last compaction: every folder closed).

It prints seconds and the names the listings of failed/ returned, side by side, and their ratio.

    python benchmarks/bench_failed_listing.py [--store azurite|s3] [--segments 1000 3000 10000]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import flat_against_folders  # noqa: E402

import raypar.jobdir.ledger as ledger_module  # noqa: E402
from raypar.inputs.base import MiniBatch, batch_id  # noqa: E402
from raypar.jobdir import writers  # noqa: E402
from raypar.jobdir.ledger import Ledger  # noqa: E402
from raypar.jobdir.records import FailedRecord  # noqa: E402

CASES = [  # (when the view is taken, the compaction of failed records before it)
    ("running, nothing compacted yet", None),  # the first COMPACT_SECONDS of a session
    ("running, after a compaction", {}),  # the session's last folder open
    ("after the session's end", {"session_over": True}),  # every folder closed
]
TRACEBACK = ('Traceback (most recent call last):\n  File "score.py", line 41, in run\n    image = load(path)\n'
             '  File "score.py", line 17, in load\n    return Image.open(path).convert("RGB")\n'
             "PIL.UnidentifiedImageError: cannot identify image file 'images/{}.jpg'")


def flat_name(writer: str, seq: int, suffix: str) -> str:
    return f"{writer}~{seq:06d}{suffix}"  # format 3: every segment at the top of failed/


def build(url: str, options: dict, segments: int, flat: bool) -> None:
    ledger = Ledger(url, options)
    ledger.write_manifest(MiniBatch(ordinal=i, kind="files", payload={"files": [f"images/{i}.jpg"]}, item_count=1)
                          for i in range(segments))
    named, every = writers.segment_name, ledger_module.FAILED_FLUSH_RECORDS
    writers.segment_name = flat_name if flat else named
    ledger_module.FAILED_FLUSH_RECORDS = 1  # a failure a second or slower: a segment each
    try:
        ledger.gather_failures("r1")
        for ordinal in range(segments):
            ledger.record_failed(FailedRecord(batch=batch_id(ordinal), run="r1", attempt=1, kind="user", final=True,
                                              node="10.0.0.7", error=TRACEBACK.format(ordinal)))
        ledger.end_gathering_failures()
    finally:
        writers.segment_name, ledger_module.FAILED_FLUSH_RECORDS = named, every


def compact(url: str, options: dict, how: Optional[dict]) -> None:
    if how is not None:
        Ledger(url, options).compact_failures("r1", **how)


def measure(url: str, options: dict) -> tuple[float, int, int]:
    """(seconds, names listed in failed/, failed batches) of status's view, a fresh client."""
    ledger = Ledger(url, {**options, "skip_instance_cache": True})
    counted = {"names": 0}
    entries, root = ledger.store.entries, ledger.store.path("failed")

    def counting(folder):
        files, folders = entries(folder)
        if folder == root or folder.startswith(root + "/"):
            counted["names"] += len(files) + len(folders)
        return files, folders

    ledger.store.entries = counting
    started = time.perf_counter()
    view = ledger.view(lean=True, errors_of=3)
    seconds = time.perf_counter() - started
    return seconds, counted["names"], len(view.failed_ordinals())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", choices=["azurite", "s3"], default="s3")
    parser.add_argument("--segments", type=int, nargs="+", default=[1000, 3000, 10000])
    parser.add_argument("--repeat", type=int, default=3, help="views timed per case (best shown)")
    args = parser.parse_args()
    flat_against_folders(args.store, "raypar-bench-failed-", args.segments, ("format 3 (flat)", "format 4 (folders)"),
                         CASES, build, compact, measure, args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
