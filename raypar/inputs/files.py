"""File inputs: batches of N files, handed to ``run()`` as paths or URIs.

Local inputs are always passed as their own paths. Remote inputs follow the
input's ``mode``, as Azure does: ``direct`` passes the URIs; ``download``
copies the batch's files to a temporary folder on the worker, removed after
``run()`` returns; ``ro_mount`` (the default) fetches each file on first use
into a cache folder shared by the node's workers and kept for later batches,
retries and other workers -- what a mount with a local file cache does. A
cached file is used only while the remote one is unchanged (etag, or size and
modification time): a later job never reads stale data.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from typing import Iterator

from raypar.inputs.source import Source, file_version

KIND = "files"


def plan(source: Source, files_per_batch: int) -> Iterator[list[str]]:
    """Batches of ``files_per_batch`` file names, in listing order, streamed."""
    chunk: list[str] = []
    for name in source.files():
        chunk.append(name)
        if len(chunk) == files_per_batch:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def cache_root() -> str:
    return os.environ.get("RAYPAR_CACHE_DIR") or os.path.join(tempfile.gettempdir(), "raypar-cache")


class FileFetcher:
    """Turns manifest file names into what run() receives, per the input mode."""

    def __init__(self, source: Source):
        self.source = source
        self.mode = source.desc["mode"]
        root_key = hashlib.sha1(source.desc["root"].encode()).hexdigest()[:16]
        self.cache = os.path.join(cache_root(), root_key)

    def paths(self, names: list[str]) -> tuple[list[str], str | None]:
        """(what run() receives, a temporary folder to remove after run() or None)."""
        source = self.source
        if source.is_local:
            return [source.fs_path(n) for n in names], None
        if self.mode == "direct":
            return [source.url(n) for n in names], None
        if self.mode == "download":
            folder = tempfile.mkdtemp(prefix="raypar-download-")
            return [self._fetch(n, os.path.join(folder, _local_name(n))) for n in names], folder
        return [self._cached(n) for n in names], None

    def _cached(self, name: str) -> str:
        """The cached copy, fetched again when the remote file changed (its etag, or size and time)."""
        target = os.path.join(self.cache, _local_name(name))
        marker = os.path.join(self.cache, ".versions", _local_name(name))
        version = file_version(self.source.fs.info(self.source.fs_path(name)))
        try:
            with open(marker) as f:
                if f.read() == version and os.path.exists(target):
                    return target
        except FileNotFoundError:
            pass
        self._fetch(name, target)
        os.makedirs(os.path.dirname(marker), exist_ok=True)
        tmp = f"{marker}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "w") as f:
            f.write(version)
        os.replace(tmp, marker)  # written after the file: a crash in between only costs a fetch
        return target

    def _fetch(self, name: str, target: str) -> str:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            self.source.fs.get_file(self.source.fs_path(name), tmp)
            os.replace(tmp, target)  # whole or absent: another worker may read the cache now
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return target


def _local_name(name: str) -> str:
    """A manifest name as a relative local path (URLs of files outside the root keep their path)."""
    return name.split("://", 1)[-1].lstrip("/")


def cleanup(folder: str | None) -> None:
    if folder:
        shutil.rmtree(folder, ignore_errors=True)
