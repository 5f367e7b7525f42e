"""``raypar failed``: the items of a job that did not succeed, with their error, written in a
form that is directly a new job's input.

An item failed when run() reported it (``raypar.item_failed``) in a done mini-batch, or when
its whole mini-batch failed (its tries spent): then each of its items failed with the batch's
error. Items run() merely returned no row for are not listed: which ones they are is not known.

A files job gives paths: ``txt`` (one per line), ``csv`` / ``parquet`` (``path``,
``raypar_error``, ``raypar_batch``), or ``mltable`` (a folder whose ``MLTable`` lists the files:
a uri_folder-like input of just them). A table job gives the failed rows themselves, read
again from the input, with ``raypar_error`` and ``raypar_batch`` columns: ``csv``, ``parquet``,
or ``mltable`` (a folder with the rows as parquet and an ``MLTable`` that reads them).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Optional

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import yaml

from raypar.credentials import options_for, resolve_storage
from raypar.engine.reports import last_lines
from raypar.errors import UsageError
from raypar.inputs import files as input_files
from raypar.inputs.base import BatchReader, batch_id, check_input
from raypar.inputs.files import cleanup
from raypar.jobdir.ledger import Ledger
from raypar.spec.models import JobSpec
from raypar.storage import atomic_output

FORMATS = ("txt", "csv", "parquet", "mltable")
ERROR, BATCH = "raypar_error", "raypar_batch"


@dataclass
class FailedItems:
    kind: str  # "files" or "table"
    paths: list = field(default_factory=list)  # files: where each failed item is
    errors: list = field(default_factory=list)
    batches: list = field(default_factory=list)
    rows: list = field(default_factory=list)  # tables: pyarrow tables of failed rows, error columns added

    def __len__(self) -> int:
        return len(self.paths) if self.kind == input_files.KIND else sum(t.num_rows for t in self.rows)


def collect(job_dir: str) -> FailedItems:
    """The failed items of ``job_dir``, in mini-batch order (and each batch's own order)."""
    ledger = Ledger(job_dir, options_for(job_dir, resolve_storage({})))
    spec = JobSpec.model_validate(ledger.load_job()["spec"])
    storage = resolve_storage(spec.raypar.storage_options)
    ledger = Ledger(job_dir, options_for(job_dir, storage))
    manifest = ledger.read_manifest()
    if manifest is None:
        manifest = ledger.read_manifest_prefix()
    # Lean: which batches are done, and only the records that reported items failed (a million
    # batches' records are never all in memory).
    view = ledger.view(manifest, lean=True, reported=True)
    failures: dict[int, list] = {}  # ordinal -> [(places or None for all, error)]
    reported = view.reported
    if reported is not None and reported.num_rows:
        for ordinal, text in zip(reported.column("ordinal").to_pylist(), reported.column("failed").to_pylist(),
                                 strict=True):
            failures[ordinal] = [(places, error) for error, places in json.loads(text).items()]
    last = view.failed.last_rows(view.failed_ordinals())
    for ordinal, error in zip(last.column("ordinal").to_pylist(), last_lines(last.column("error")).to_pylist(), strict=True):
        failures[ordinal] = [(None, error)]
    desc = check_input(spec, storage)
    reader = BatchReader(desc, storage)
    out = FailedItems(kind=input_files.KIND if desc.get("format") is None else "table")
    for ordinal in sorted(failures):
        batch = manifest[ordinal]
        out.kind = batch.kind
        if batch.kind == input_files.KIND:
            names = batch.payload["files"]
            for places, error in failures[ordinal]:
                for place in places if places is not None else range(len(names)):
                    out.paths.append(reader.source.url(names[place]))
                    out.errors.append(error)
                    out.batches.append(batch_id(ordinal))
            continue
        mini_batch, _, temp = reader.read(batch)
        cleanup(temp)
        table = mini_batch if isinstance(mini_batch, pa.Table) else pa.Table.from_pandas(mini_batch,
                                                                                        preserve_index=False)
        for places, error in failures[ordinal]:
            rows = table.take(pa.array(places if places is not None else range(table.num_rows), pa.int64()))
            rows = rows.append_column(ERROR, pa.array([error] * rows.num_rows, pa.string()))
            out.rows.append(rows.append_column(BATCH, pa.array([batch_id(ordinal)] * rows.num_rows, pa.string())))
    reader.close()
    return out


def table_of(items: FailedItems) -> pa.Table:
    if items.kind == input_files.KIND:
        return pa.table({"path": pa.array(items.paths, pa.string()), ERROR: pa.array(items.errors, pa.string()),
                         BATCH: pa.array(items.batches, pa.string())})
    if not items.rows:
        return pa.table({ERROR: pa.array([], pa.string()), BATCH: pa.array([], pa.string())})
    return pa.concat_tables(items.rows, promote_options="permissive")


def write(items: FailedItems, fmt: str, target: Optional[str], storage: Optional[dict] = None) -> Optional[bytes]:
    """Write ``items`` as ``fmt`` to ``target`` (a file, or for mltable a folder; a path or URL),
    published whole; without ``target``, return the bytes (txt and csv only)."""
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    if fmt == "txt" and items.kind != input_files.KIND:
        raise UsageError("--format txt lists files; this job's failed items are table rows: use csv, parquet "
                         "or mltable")
    if target is None and fmt in ("parquet", "mltable"):
        raise UsageError(f"--format {fmt} writes {'a folder' if fmt == 'mltable' else 'a file'}: give it with -o")
    if fmt == "mltable":
        _write_mltable(items, target.rstrip("/"), storage)
        return None
    data = _encode(items, fmt)
    if target is None:
        return data
    with atomic_output(target, options_for(target, storage)) as f:
        f.write(data)
    return None


def _encode(items: FailedItems, fmt: str) -> bytes:
    if fmt == "txt":
        return "".join(f"{p}\n" for p in items.paths).encode()
    sink = io.BytesIO()
    if fmt == "csv":
        pa_csv.write_csv(table_of(items), sink)
    else:
        pq.write_table(table_of(items), sink)
    return sink.getvalue()


def _write_mltable(items: FailedItems, folder: str, storage: Optional[dict]) -> None:
    """An MLTable folder: for files, the failed files themselves; for tables, their rows as
    parquet next to the MLTable file. The MLTable is written last: a folder with it is whole."""
    if items.kind == input_files.KIND:
        document = {"type": "mltable", "paths": [{"file": p} for p in dict.fromkeys(items.paths)]}
    else:
        with atomic_output(f"{folder}/failed_items.parquet", options_for(folder, storage)) as f:
            f.write(_encode(items, "parquet"))
        document = {"type": "mltable", "paths": [{"file": "./failed_items.parquet"}],
                    "transformations": ["read_parquet"]}
    with atomic_output(f"{folder}/MLTable", options_for(folder, storage)) as f:
        f.write(yaml.safe_dump(document, sort_keys=False).encode())


def describe(items: FailedItems, target: Optional[str], fmt: str) -> str:
    where = target if target is not None else "stdout"
    what = "file(s)" if items.kind == input_files.KIND else "row(s)"
    hint = f"; run them as a new job's input: inputs.<name>: {{type: mltable, path: {target}}}" \
        if fmt == "mltable" and target else ""
    return f"raypar: {len(items)} failed {what} written to {where} ({fmt}){hint}" if len(items) else \
        f"raypar: no failed items (written to {where} as an empty {fmt})"

