"""Which compact files a compaction merges with its new records (done and failed records alike).

Every compaction adds the records read since the last one as a file of their own (a delta), and
merges into it the newest files no larger than what it merges so far: a binary counter. A record
is rewritten about log2(compactions) times over a job and an index names about as many files.
Merging everything every few compactions (as raypar did before) rewrote every record every few
compactions: at a compaction per 2,000 segments a million records were written 32 times over.
"""

from __future__ import annotations

MAX_COMPACT_FILES = 16  # an index that would name more merges them all (rows unknown, or a very long job)


def newest_to_merge(files: list[dict], rows: int) -> int:
    """How many of ``files`` (an index's, oldest first, each with its ``rows``) to merge with
    ``rows`` new records: the newest while each is no larger than the records merged so far, or
    all of them where the index would name more than MAX_COMPACT_FILES."""
    merged, count = rows, 0
    for file in reversed(files):
        size = file.get("rows")
        if size is None or size > merged:  # (an index of one file from before deltas has no rows)
            break
        merged += size
        count += 1
    return len(files) if len(files) - count + 1 > MAX_COMPACT_FILES else count
