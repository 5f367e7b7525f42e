"""Reading a v1 tabular dataset whole, and ``TabularDataset.partition_by``.

Both read through raypar's own input code (the dataset as a job input, each file
read as a worker reads it), so the rows and types match what a job's ``run()``
would see. ``partition_by`` does what Azure does: it copies the data into one
folder per key combination under ``target`` (parquet files without the key
columns) and returns a dataset whose partition format gives the keys back, as
the last columns. The copy goes into ``target/<hash>/``, the hash of the source
files' versions, the keys and the read options: calling it again with the same
data reuses it, so a notebook run twice and a resumed job read the same input.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING
from urllib.parse import quote

import pyarrow as pa

from raypar.azureml import v1_paths
from raypar.credentials import open_fs, resolve_storage
from raypar.errors import SpecError
from raypar.inputs import tabular
from raypar.inputs.base import BatchReader, MiniBatch, check_input
from raypar.inputs.source import open_source
from raypar.spec.loading import spec_from_dict

if TYPE_CHECKING:
    from raypar.azureml.v1_data import DatasetInput

DONE_MARKER = "_RAYPAR_PARTITIONED"
PART_FILE = "part-0.parquet"


def _open(dataset: "DatasetInput"):
    """(source, reader) of the dataset as a job input, read as a table."""

    if dataset.table_format is None:
        raise ValueError("this is a file dataset: only a tabular dataset (Dataset.Tabular) is read as a table")
    entry = dataset.to_input()._spec_entry("ro_mount")
    spec = spec_from_dict({"type": "parallel", "inputs": {"data": entry}, "input_data": "${{inputs.data}}",
                           "task": {"code": ".", "entry_script": "unused.py"},
                           "raypar": {} if dataset.is_mltable else {"input_format": dataset.table_format}},
                          source="dataset")
    desc = check_input(spec)
    return open_source(desc, {}), BatchReader(desc)


def _tables(source, reader):
    """(file name, its rows as an Arrow table) per file, in listing order."""


    for ordinal, name in enumerate(source.files()):
        batch = MiniBatch(ordinal=ordinal, kind=tabular.KIND,
                          payload={"pieces": [tabular.pieces_of_whole_file(source, name)]})
        frame, _, _ = reader.read(batch)
        yield name, pa.Table.from_pandas(frame, preserve_index=False)


def read_dataset(dataset: "DatasetInput"):
    """The whole dataset as one Arrow table."""

    tables = [table for _, table in _tables(*_open(dataset))]
    if not tables:
        raise SpecError(f"dataset {dataset.paths}: no file to read")
    return pa.concat_tables(tables, promote_options="permissive")


def partition_by(dataset: "DatasetInput", partition_keys: list, target) -> "DatasetInput":
    """See the module docstring; ``target`` is a folder, a URL, a ``(datastore, path)`` pair or a DataPath."""
    import pyarrow.compute as pc  # noqa: PLC0415 - lazy: only jobs of that format load it


    if not isinstance(partition_keys, list) or not partition_keys or \
            not all(isinstance(k, str) for k in partition_keys) or len(set(partition_keys)) != len(partition_keys):
        raise ValueError(f"partition_by: partition_keys {partition_keys!r} must be a list of distinct column names")
    root = v1_paths.resolve(target)
    if len(root) != 1 or v1_paths.is_glob(root[0]):
        raise ValueError(f"partition_by: target {target!r} must be one folder or URL")
    source, reader = _open(dataset)
    names = list(source.files())
    versions = [_version(source, n) for n in names]
    digest = hashlib.sha256(json.dumps([names, versions, partition_keys, dataset.mltable()],
                                       sort_keys=True, default=str).encode()).hexdigest()[:16]
    folder = v1_paths.join(root[0].rstrip("/"), digest)
    fmt = f"{digest}/" + "/".join(f"{{{k}}}" for k in partition_keys) + f"/{PART_FILE}"
    result = type(dataset)(v1_paths.join(folder, f"**/{PART_FILE}"), table_format="parquet", partition_format=fmt)
    fs, fs_folder = open_fs(folder, resolve_storage({}))
    if fs.exists(f"{fs_folder}/{DONE_MARKER}"):
        return result
    if fs.exists(fs_folder):
        fs.rm(fs_folder, recursive=True)  # an earlier copy that did not finish
    table = pa.concat_tables([t for _, t in _tables(source, reader)], promote_options="permissive")
    missing = [k for k in partition_keys if k not in table.column_names]
    if missing:
        raise ValueError(f"partition_by: no column {missing[0]!r} (columns: {', '.join(table.column_names)})")
    keys = table.select(partition_keys).cast(pa.schema([(k, pa.string()) for k in partition_keys]))
    data = table.drop_columns(partition_keys)
    for combo in keys.group_by(partition_keys).aggregate([]).sort_by([(k, "ascending") for k in partition_keys]) \
            .to_pylist():
        if any(v is None or v == "" for v in combo.values()):
            raise ValueError(f"partition_by: a row has no value for a key ({combo}); raypar cannot name its folder")
        mask = None
        for k, v in combo.items():
            match = pc.equal(keys[k], v)
            mask = match if mask is None else pc.and_(mask, match)
        part = "/".join(quote(combo[k], safe=" ") for k in partition_keys)
        _write_parquet(fs, f"{fs_folder}/{part}/{PART_FILE}", data.filter(mask))
    fs.pipe_file(f"{fs_folder}/{DONE_MARKER}", b"")
    return result


def _version(source, name: str) -> str:
    """What changes when an input file changes (its etag, else its size and modification time)."""
    info = source.fs.info(source.fs_path(name))
    return str(info.get("etag") or (info.get("size"), info.get("mtime") or info.get("last_modified")))


def _write_parquet(fs, path: str, table) -> None:
    import pyarrow.parquet as pq  # noqa: PLC0415 - lazy: only jobs of that format load it

    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "wb") as f:
        pq.write_table(table, f)
