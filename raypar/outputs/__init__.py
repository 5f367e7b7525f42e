"""Output rows, from run()'s result to the one append-row file.

- ``rows`` (worker side): run()'s result counted and serialized into the batch's part.
- ``formats``: the table formats (csv, jsonl, parquet) as Arrow parts and as file sinks; ``jsonl``
  its JSON encoder.
- ``assembly`` (driver side): every done batch's part, verified, in batch order, into one file.

A worker imports ``rows`` (and through it ``formats``) only, never ``assembly``.
"""
