"""The mini-batch abstraction shared by every input kind."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Optional

import pyarrow as pa
import pyarrow.compute as pc

from raypar.errors import SpecError
from raypar.inputs import files, partitioned, tabular
from raypar.inputs.mltable import PartitionFormat
from raypar.inputs.source import describe, open_source

if TYPE_CHECKING:  # the worker side imports this module without pydantic
    from raypar.spec.models import JobSpec

# One encoder for every manifest line: json.dumps with options builds a new one per call,
# a third of the line's cost when a million batches are planned.
_LINE = json.JSONEncoder(separators=(",", ":"), sort_keys=True).encode


@dataclass(frozen=True, slots=True)  # no per-batch __dict__: a resume may hold millions
class MiniBatch:
    """One unit of work: an ordinal (its place in the output), a stable ID and a payload.

    The payload is plain JSON describing *which* items the batch holds (file
    names relative to the input root, later row ranges of a table); the
    worker's loader for ``kind`` turns it into the argument of ``run()``.
    """

    ordinal: int
    kind: str
    payload: dict = field(hash=False)
    item_count: int = 0
    # name -> version of the input files this batch is the first to touch, while planning only:
    # the manifest writer keeps them beside the batch (never part of its JSON line)
    inputs: Optional[dict] = field(default=None, hash=False, compare=False, repr=False)

    @property
    def id(self) -> str:
        return batch_id(self.ordinal)

    def to_json(self) -> str:
        return _LINE({"id": self.id, "ordinal": self.ordinal, "kind": self.kind,
                      "items": self.item_count, "payload": self.payload})

    @property
    def row_group(self) -> Optional[tuple[str, int]]:
        """(file, row group) when the batch is a slice of a cut parquet row group, else None."""
        return _row_group_of(self.payload)

    @classmethod
    def from_json(cls, line: str) -> "MiniBatch":
        data = json.loads(line)
        batch = cls(ordinal=data["ordinal"], kind=data["kind"], payload=data["payload"],
                    item_count=data["items"])
        if batch.id != data["id"]:
            raise ValueError(f"manifest line for {data['id']} has ordinal {data['ordinal']}")
        return batch


@dataclass(frozen=True, slots=True)
class QueuedBatch:
    """A planned mini-batch as the scheduler queues it: its ordinal and its manifest line, the
    JSON a call carries, parsed only when asked. A million may wait in the queue: this is a third
    of a parsed MiniBatch's memory, and no line is encoded again to send the batch."""

    ordinal: int
    line: str

    @classmethod
    def of(cls, batch: MiniBatch) -> "QueuedBatch":
        return cls(batch.ordinal, batch.to_json())

    @property
    def id(self) -> str:
        return batch_id(self.ordinal)

    @property
    def item_count(self) -> int:
        return json.loads(self.line)["items"]

    @property
    def row_group(self) -> Optional[tuple[str, int]]:
        """(file, row group) when the batch is a slice of a cut parquet row group, else None.
        Parsed only for such lines: the scheduler asks it of every batch it reserves."""
        return _row_group_of(json.loads(self.line)["payload"]) if '"row_group":' in self.line else None

    def to_json(self) -> str:
        return self.line


def _row_group_of(payload: dict) -> Optional[tuple[str, int]]:
    pieces = payload.get("pieces") or ()
    if len(pieces) != 1 or "row_group" not in pieces[0]:
        return None
    return pieces[0]["file"], pieces[0]["row_group"]


def files_of(payload: dict) -> list[str]:
    """The input files whose data a batch's payload holds, in order."""
    if "files" in payload:
        return list(payload["files"])
    return list(dict.fromkeys(piece["file"] for piece in payload.get("pieces", ())))


def files_read_by(payload: dict) -> set[str]:
    """Every input file a batch reads: its data files and the file a CSV piece takes its header from."""
    return {*files_of(payload), *(p["header_file"] for p in payload.get("pieces", ()) if p.get("header_file"))}


def batch_id(ordinal: int) -> str:
    """Stable, sortable ID of the batch at ``ordinal`` in the plan."""
    return f"mb-{ordinal:07d}"


def batch_ids(ordinals) -> pa.Array:
    """batch_id of each of an Arrow column of ordinals, as Arrow strings."""
    return pc.binary_join_element_wise("mb-", pc.utf8_lpad(pc.cast(ordinals, pa.string()), 7, "0"), "")


def ordinal_of(batch: str) -> int:
    """The ordinal a batch ID names (ValueError if it is not one)."""
    if not batch.startswith("mb-") or not batch[3:].isdigit():
        raise ValueError(f"not a mini-batch ID: {batch!r}")
    return int(batch[3:])


def check_input(spec: JobSpec, storage: Optional[dict] = None) -> dict:
    """The input described as plain values (see source.describe); SpecError now for an input
    raypar cannot plan, before any job dir is written."""

    desc = describe(spec, storage or {})
    desc["name"] = spec.data_input_name  # for mini_batch_context.dataset
    where = f"inputs.{spec.data_input_name}"
    if spec.mini_batch_size is not None and not desc["tabular"] and spec.batch_size().is_bytes:
        raise SpecError(
            f"mini_batch_size {spec.mini_batch_size!r} is a byte size, which splits tables; {where} is a "
            f"list of files: give a file count such as '10'")
    if spec.partition_keys is not None:
        if not spec.partition_keys or len(set(spec.partition_keys)) != len(spec.partition_keys):
            raise SpecError("partition_keys: give one or more distinct column names")
    return desc


def plan_batches(spec: JobSpec, desc: dict, storage: Optional[dict] = None) -> Iterator[MiniBatch]:
    """The deterministic stream of mini-batches for the spec's ``input_data``, each carrying the
    versions of the input files it is the first to read (see ``MiniBatch.inputs``)."""

    source = open_source(desc, storage or {})
    for b in plan_source(spec, source):
        yield MiniBatch(b.ordinal, b.kind, b.payload, b.item_count, source.take_versions(files_of(b.payload)))


def plan_source(spec: JobSpec, source) -> Iterator[MiniBatch]:
    """The batches of an opened source, numbered from 0."""

    desc = source.desc
    if spec.partition_keys:
        for ordinal, (key, names, data_keys, pieces) in enumerate(partitioned.plan(source, spec.partition_keys)):
            if desc["tabular"]:
                payload = {"pieces": pieces, "key": list(key.items()), "filter": data_keys}
                yield MiniBatch(ordinal=ordinal, kind=tabular.KIND, payload=payload, item_count=0)
            else:
                yield MiniBatch(ordinal=ordinal, kind=files.KIND, payload={"files": names, "key": list(key.items())},
                                item_count=len(names))
        return
    if desc["tabular"]:
        for ordinal, (pieces, rows) in enumerate(tabular.plan(source, spec.table_batch_bytes())):
            yield MiniBatch(ordinal=ordinal, kind=tabular.KIND, payload={"pieces": pieces}, item_count=rows)
        return
    for ordinal, names in enumerate(files.plan(source, spec.batch_size().value)):
        yield MiniBatch(ordinal=ordinal, kind=files.KIND, payload={"files": names}, item_count=len(names))


@dataclass(frozen=True)
class InputDataset:
    """``mini_batch_context.dataset``: the job's input. Azure gives its dataset object filtered to
    the mini-batch's partition; raypar gives the input's ``name``, ``path`` (local path or URL),
    ``type`` and that filter, ``partition_key_value`` (empty without ``partition_keys``)."""

    name: Optional[str]
    path: str
    type: str
    partition_key_value: dict = field(default_factory=dict)


class MiniBatchContext:
    """The optional second argument of ``run(mini_batch, mini_batch_context)``, as in Azure."""

    def __init__(self, partition_key_value: dict, mini_batch_id: str, dataset: Optional[InputDataset] = None):
        self.partition_key_value = partition_key_value
        self.mini_batch_id = mini_batch_id
        self.dataset = dataset

    def __repr__(self) -> str:
        return (f"MiniBatchContext(partition_key_value={self.partition_key_value!r}, "
                f"mini_batch_id={self.mini_batch_id!r}, dataset={self.dataset!r})")


class BatchReader:
    """Worker side: turns a batch's payload into what ``run()`` receives."""

    def __init__(self, desc: dict, storage: Optional[dict] = None, cache_bytes: Optional[int] = None):

        self.source = open_source(desc, storage or {})
        self.desc = desc
        self._fetcher = None
        self._cache_bytes = cache_bytes  # raypar.mount_cache.max_size (None: the default)
        self._partition_format = None
        self._row_groups = tabular.RowGroupCache()  # a cut row group, decoded once for its slices

    def read(self, batch: MiniBatch) -> tuple[Any, MiniBatchContext, Optional[str]]:
        """(mini_batch, its context, a temporary folder to remove after run() or None)."""

        # [[key, value], ...]: manifest lines sort their keys, a list keeps partition_keys' order
        key = dict(batch.payload.get("key") or [])
        dataset = InputDataset(self.desc.get("name"), self.desc["path"], self.desc["type"], key)
        context = MiniBatchContext(key, batch.id, dataset)
        if batch.kind == files.KIND:
            if self._fetcher is None:
                self._fetcher = files.FileFetcher(self.source, self._cache_bytes)
            paths, temp = self._fetcher.paths(batch.payload["files"])
            return paths, context, temp
        if batch.kind == tabular.KIND:
            return self._table(batch, context), context, None
        raise ValueError(f"unknown mini-batch kind {batch.kind!r} in the manifest")

    def close(self) -> None:
        """The worker stops: leave the node's mount cache tidy (batch folders of killed workers)."""
        if self._fetcher is not None:
            self._fetcher.remove_orphan_batches()

    def items_of_unreadable(self, batch: MiniBatch) -> int:
        """How many items a batch that could not be read holds, so thresholds count them as failed:
        the planned count, else its text lines (a CSV or JSON lines range), else one per piece."""
        if batch.item_count or batch.kind != "table":
            return batch.item_count
        total = 0
        for piece in batch.payload["pieces"]:
            if "rows" in piece:
                total += piece["rows"][1] - piece["rows"][0]
                continue
            try:
                data = self.source.fs.cat_file(self.source.fs_path(piece["file"]), start=piece["bytes"][0],
                                               end=piece["bytes"][1])
                lines = sum(1 for line in data.splitlines() if line.strip())
            except Exception:  # noqa: BLE001 - gone or unreachable: at least the piece failed
                lines = 1
            total += max(lines - (1 if piece.get("embedded_header") else 0), 1)
        return total

    def _table(self, batch: MiniBatch, context: MiniBatchContext):


        desc, source = self.desc, self.source
        if desc["partition_format"] and self._partition_format is None:
            self._partition_format = PartitionFormat(desc["partition_format"])
        tables = []
        for piece in batch.payload["pieces"]:
            keys = tuple(batch.payload.get("filter") or ())  # read as text, as when planning
            columns = None
            if desc["keep_columns"] and not self._partition_format:  # the keys are needed to keep the rows
                columns = [*desc["keep_columns"], *(k for k in keys if k not in desc["keep_columns"])]
            table = tabular.read_piece(source, piece, columns, text_columns=keys, cache=self._row_groups)
            if self._partition_format is not None:  # MLTable partition columns join the data, as in Azure
                for column, value in (self._partition_format.extract(piece["file"]) or {}).items():
                    if column not in table.column_names:
                        table = table.append_column(column, pa.array([value] * table.num_rows))
            if desc["read"].get("include_path_column"):
                column = desc["read"].get("path_column") or "Path"
                table = table.append_column(column, pa.array([source.url(piece["file"])] * table.num_rows))
            if batch.payload.get("filter"):
                table = partitioned.keep_rows(table, context.partition_key_value, batch.payload["filter"],
                                              source.url(piece["file"]))
            tables.append(table)
        table = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
        if desc["keep_columns"]:
            table = table.select([c for c in desc["keep_columns"] if c in table.column_names])
        if desc["drop_columns"]:
            table = table.drop_columns([c for c in desc["drop_columns"] if c in table.column_names])
        if batch.payload.get("take") is not None:  # some rows of the batch (failed items planned again)
            table = table.take(pa.array(batch.payload["take"], pa.int64()))
        if desc.get("batch_format") == "pyarrow":  # raypar.batch_format: no conversion at all
            return table
        return table.to_pandas()
