"""File inputs (``uri_folder`` / ``uri_file``): batches of N files in sorted order."""

from __future__ import annotations

import os
from typing import Iterator

from ..errors import SpecError
from ..spec import InputSpec, JobSpec, is_url
from ..storage import find_files, relative_to
from .base import MiniBatch

KIND = "files"


def plan(data: InputSpec, files_per_batch: int) -> Iterator[MiniBatch]:
    """Batches of ``files_per_batch`` files; every file below the folder, sorted by path."""
    if is_url(data.path):
        raise SpecError(f"{data.path}: remote inputs are not supported by this raypar version; use a local path")
    try:
        paths = find_files(data.path)
    except FileNotFoundError:
        raise SpecError(f"{data.path}: input not found") from None
    is_file = os.path.isfile(data.path)
    if data.type == "uri_file" and not is_file:
        raise SpecError(f"{data.path}: a uri_file input must be a single file, found a folder")
    if data.type == "uri_folder" and is_file:
        raise SpecError(f"{data.path}: a uri_folder input must be a folder, found a file")
    root = data.path.rstrip("/") if data.type == "uri_folder" else os.path.dirname(data.path)
    names = [relative_to(root, p) for p in paths]
    for ordinal, start in enumerate(range(0, len(names), files_per_batch)):
        chunk = names[start:start + files_per_batch]
        yield MiniBatch(ordinal=ordinal, kind=KIND, payload={"files": chunk}, item_count=len(chunk))


def materialize(batch: MiniBatch, spec: JobSpec) -> list[str]:
    """Absolute local paths of the batch's files."""
    data = spec.data_input
    root = data.path.rstrip("/") if data.type == "uri_folder" else os.path.dirname(data.path)
    return [os.path.join(root, name) for name in batch.payload["files"]]
