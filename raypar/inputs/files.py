"""File inputs (``uri_folder`` / ``uri_file``): batches of N files in sorted order."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Iterator

from ..errors import SpecError
from ..storage import is_url
from .base import MiniBatch

if TYPE_CHECKING:
    from ..spec import InputSpec

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


def _walk(root: str) -> list[str]:
    """Every file below ``root`` as a relative path, sorted (symlinked folders followed)."""
    names = []
    def unreadable(error: OSError):
        raise SpecError(f"{error.filename}: cannot list input folder ({error.strerror})")

    for folder, _, files in os.walk(root, onerror=unreadable, followlinks=True):
        rel = os.path.relpath(folder, root)
        names.extend(f if rel == "." else f"{rel}/{f}" for f in files)
    return sorted(names)


def _root(data_type: str, path: str) -> str:
    return path.rstrip("/") if data_type == "uri_folder" else os.path.dirname(path)


def plan(data: InputSpec, files_per_batch: int) -> Iterator[MiniBatch]:
    """Batches of ``files_per_batch`` files; every file below the folder, sorted by path."""
    root = _root(data.type, data.path)
    names = [os.path.basename(data.path)] if data.type == "uri_file" else _walk(root)
    for ordinal, start in enumerate(range(0, len(names), files_per_batch)):
        chunk = names[start:start + files_per_batch]
        yield MiniBatch(ordinal=ordinal, kind=KIND, payload={"files": chunk}, item_count=len(chunk))


def materialize(batch: MiniBatch, data_input: dict) -> list[str]:
    """Absolute local paths of the batch's files."""
    root = _root(data_input["type"], data_input["path"])
    return [os.path.join(root, name) for name in batch.payload["files"]]
