"""File inputs: batches of N files, handed to ``run()`` as paths or URIs.

Local inputs are always passed as their own paths. Remote inputs follow the
input's ``mode``, as Azure does: ``direct`` passes the URIs; ``download``
copies the batch's files to a temporary folder on the worker, removed after
``run()`` returns; ``ro_mount`` (the default) fetches each file on first use
into a cache folder shared by the node's workers and kept for later batches,
retries and other workers -- what a mount with a local file cache does. A
cached file is used only while the remote one is unchanged (etag, or size and
modification time): a later job never reads stale data.

The cache holds at most ``raypar.mount_cache.max_size`` bytes: past it, the
least recently used files go first. ``run()`` receives hard links to the
cached files in a folder of its batch's own, removed after ``run()``, so a file
evicted by another worker while ``run()`` reads it stays readable until then.
(fsspec's ``filecache`` has neither a size limit nor safety between processes
sharing one cache folder.)
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import uuid
from typing import Iterator, Optional

from filelock import FileLock, Timeout

from raypar.inputs.source import Source, file_version

KIND = "files"
DEFAULT_CACHE_BYTES = 10 * 1024 ** 3
PRUNE_TO = 0.8  # eviction frees down to this share of the limit, so it does not run on every fetch
_INTERNAL = (".versions", ".batches", ".lock")  # cache entries that are not cached files

log = logging.getLogger("raypar")


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

    def __init__(self, source: Source, max_bytes: Optional[int] = None):
        self.source = source
        self.mode = source.desc["mode"]
        root_key = hashlib.sha1(source.desc["root"].encode()).hexdigest()[:16]
        self.cache = os.path.join(cache_root(), root_key)
        self.max_bytes = DEFAULT_CACHE_BYTES if max_bytes is None else max_bytes
        # Bytes this process added since it last looked at the cache's size; the first batch looks
        # at once (a cache left larger by an earlier job, batch folders of killed workers).
        self.fetched = self.max_bytes

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
        linked = self._linked(names)
        if self.fetched > self.max_bytes * (1 - PRUNE_TO):  # a scan costs a listing: not per fetch
            self.evict()  # after linking: this batch's files stay readable whatever it removes
        return linked

    def _linked(self, names: list[str]) -> tuple[list[str], str | None]:
        """Hard links to the batch's cached files in a folder of its own (named by the pid, so a
        folder a killed worker left behind is known as such), or the cached paths where links fail.

        The links are made under the lock eviction holds, so no file goes between its check and
        its link; one evicted since it was fetched (another worker pruned a small cache) is
        fetched again straight into the batch's folder."""
        cached = [self._cached(n) for n in names]  # fetches run outside the lock: they are slow
        folder = os.path.join(self.cache, ".batches", f"{os.getpid()}-{uuid.uuid4().hex[:8]}")
        links = []
        with FileLock(self._lock_path()):
            for name, path in zip(names, cached, strict=True):
                link = os.path.join(folder, _local_name(name))
                os.makedirs(os.path.dirname(link), exist_ok=True)
                try:
                    os.link(path, link)
                except FileNotFoundError:
                    self._fetch(name, link)
                except OSError:  # a filesystem without hard links: the cache's own paths
                    cleanup(folder)
                    return cached, None
                links.append(link)
        return links, folder

    def _lock_path(self) -> str:
        os.makedirs(self.cache, exist_ok=True)
        return os.path.join(self.cache, ".lock")

    def evict(self) -> None:
        """Remove the least recently used files until the cache is within its limit, and the
        batch folders of workers that no longer run. One worker of the node at a time."""
        self.fetched = 0
        try:
            with FileLock(self._lock_path(), timeout=0):
                files, total = [], 0
                for folder, dirs, names in os.walk(self.cache):
                    if folder == self.cache:
                        dirs[:] = [d for d in dirs if d not in _INTERNAL]
                    for name in names:
                        path = os.path.join(folder, name)
                        if folder == self.cache and name in _INTERNAL or ".tmp-" in name:
                            continue
                        try:
                            st = os.stat(path)
                        except FileNotFoundError:
                            continue
                        files.append((st.st_mtime, st.st_size, path))
                        total += st.st_size
                if total > self.max_bytes:
                    files.sort()
                    for _, size, path in files:
                        if total <= self.max_bytes * PRUNE_TO:
                            break
                        _remove(path)
                        _remove(os.path.join(self.cache, ".versions", os.path.relpath(path, self.cache)))
                        total -= size
                    log.info("mount cache %s: evicted down to %d bytes", self.cache, total)
                self.remove_orphan_batches()
        except Timeout:
            pass  # another worker of this node is evicting now

    def remove_orphan_batches(self) -> None:
        """Remove the batch folders of worker processes that are gone (killed mid-batch)."""
        batches = os.path.join(self.cache, ".batches")
        for entry in os.listdir(batches) if os.path.isdir(batches) else []:
            pid = entry.split("-", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                cleanup(os.path.join(batches, entry))

    def _cached(self, name: str) -> str:
        """The cached copy, fetched again when the remote file changed (its etag, or size and time)."""
        target = os.path.join(self.cache, _local_name(name))
        marker = os.path.join(self.cache, ".versions", _local_name(name))
        version = file_version(self.source.fs.info(self.source.fs_path(name)))
        try:
            with open(marker) as f:
                if f.read() == version:
                    os.utime(target)  # its last use, which eviction goes by
                    return target
        except FileNotFoundError:  # not cached, or evicted between the marker and the file
            pass
        self._fetch(name, target)
        self.fetched += os.path.getsize(target)
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


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def cleanup(folder: str | None) -> None:
    if folder:
        shutil.rmtree(folder, ignore_errors=True)
