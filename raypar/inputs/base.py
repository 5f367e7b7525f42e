"""The mini-batch abstraction shared by every input kind."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

from ..errors import SpecError

if TYPE_CHECKING:  # the worker side imports this module without pydantic
    from ..spec import JobSpec


@dataclass(frozen=True)
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

    @property
    def id(self) -> str:
        return batch_id(self.ordinal)

    def to_json(self) -> str:
        return json.dumps(
            {"id": self.id, "ordinal": self.ordinal, "kind": self.kind,
             "items": self.item_count, "payload": self.payload},
            separators=(",", ":"), sort_keys=True,
        )

    @classmethod
    def from_json(cls, line: str) -> "MiniBatch":
        data = json.loads(line)
        batch = cls(ordinal=data["ordinal"], kind=data["kind"], payload=data["payload"],
                    item_count=data["items"])
        if batch.id != data["id"]:
            raise ValueError(f"manifest line for {data['id']} has ordinal {data['ordinal']}")
        return batch


def batch_id(ordinal: int) -> str:
    """Stable, sortable ID of the batch at ``ordinal`` in the plan."""
    return f"mb-{ordinal:07d}"


def ordinal_of(batch: str) -> int:
    """The ordinal a batch ID names (ValueError if it is not one)."""
    if not batch.startswith("mb-") or not batch[3:].isdigit():
        raise ValueError(f"not a mini-batch ID: {batch!r}")
    return int(batch[3:])


def check_input(spec: JobSpec) -> None:
    """Raise SpecError now for an input raypar cannot plan (before any job dir is written)."""
    from . import files

    data = spec.data_input
    if spec.partition_keys is not None:
        raise SpecError("partition_keys: splitting by partition keys is not supported by this raypar version")
    if data.type == "mltable":
        raise SpecError(f"inputs.{spec.data_input_name}: mltable inputs are not supported by this raypar version")
    size = spec.batch_size()
    if size.is_bytes:
        raise SpecError(
            f"mini_batch_size {spec.mini_batch_size!r} is a byte size, which applies to tabular input; "
            f"inputs.{spec.data_input_name} is {data.type}: give a file count such as '10'"
        )
    files.check(data, f"inputs.{spec.data_input_name}")


def plan_batches(spec: JobSpec) -> Iterator[MiniBatch]:
    """The deterministic stream of mini-batches for the spec's ``input_data``."""
    from . import files

    check_input(spec)
    return files.plan(spec.data_input, spec.batch_size().value)


def materialize(batch: MiniBatch, data_input: dict) -> Any:
    """What ``run(mini_batch)`` receives for ``batch`` (runs on the worker).

    ``data_input`` is the input's ``{"type", "path"}`` as plain values.
    """
    from . import files

    loaders = {files.KIND: files.materialize}
    try:
        loader = loaders[batch.kind]
    except KeyError:
        raise ValueError(f"unknown mini-batch kind {batch.kind!r} in the manifest") from None
    return loader(batch, data_input)
