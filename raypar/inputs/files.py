"""File inputs (``uri_folder`` / ``uri_file``): batches of N files in sorted order."""

from __future__ import annotations

import os
from typing import Iterator

from ..errors import SpecError
from ..spec import InputSpec, JobSpec, is_url
from ..storage import find_files, relative_to
from .base import MiniBatch

KIND = "files"


def check(data: InputSpec, where: str) -> None:
    """The input exists and is the kind of path its type says."""
    if is_url(data.path):
        raise SpecError(f"{where}.path: {data.path}: remote inputs are not supported by this raypar version; "
                        f"use a local path")
    if not os.path.exists(data.path):
        raise SpecError(f"{where}.path: {data.path} not found")
    is_file = os.path.isfile(data.path)
    if data.type == "uri_file" and not is_file:
        raise SpecError(f"{where}.path: {data.path}: a uri_file input must be a single file, found a folder")
    if data.type == "uri_folder" and is_file:
        raise SpecError(f"{where}.path: {data.path}: a uri_folder input must be a folder, found a file")


def _root(data: InputSpec) -> str:
    return data.path.rstrip("/") if data.type == "uri_folder" else os.path.dirname(data.path)


def plan(data: InputSpec, files_per_batch: int) -> Iterator[MiniBatch]:
    """Batches of ``files_per_batch`` files; every file below the folder, sorted by path."""
    root = _root(data)
    names = [relative_to(root, p) for p in find_files(data.path)]
    for ordinal, start in enumerate(range(0, len(names), files_per_batch)):
        chunk = names[start:start + files_per_batch]
        yield MiniBatch(ordinal=ordinal, kind=KIND, payload={"files": chunk}, item_count=len(chunk))


def materialize(batch: MiniBatch, spec: JobSpec) -> list[str]:
    """Absolute local paths of the batch's files."""
    root = _root(spec.data_input)
    return [os.path.join(root, name) for name in batch.payload["files"]]
