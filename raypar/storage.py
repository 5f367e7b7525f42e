"""Every file operation raypar makes, through fsspec, for local paths and URLs.

The contract is narrow on purpose: only ``FileNotFoundError`` means "absent".
Any other error (auth, network, permissions) propagates, so it can never be
mistaken for "this batch is not done".
"""

from __future__ import annotations

import os
import re
import uuid
from contextlib import contextmanager
from typing import Optional

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .errors import LedgerError

def is_url(path: str) -> bool:
    """True for ``scheme://...`` paths (fsspec URLs); False for local paths."""
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", path))


_PACKAGE_FOR_PROTOCOL = {
    "az": "adlfs", "abfs": "adlfs", "abfss": "adlfs", "s3": "s3fs", "s3a": "s3fs",
    "gs": "gcsfs", "gcs": "gcsfs",
}


class Store:
    """A folder (local path or fsspec URL) with atomic, append-style writes."""

    def __init__(self, root: str, storage_options: Optional[dict] = None):
        self.root = root.rstrip("/") if root not in ("/",) else root
        try:
            self.fs, self._root_path = fsspec.core.url_to_fs(self.root, **(storage_options or {}))
        except (ImportError, ValueError) as exc:
            protocol = root.split("://", 1)[0] if "://" in root else "file"
            package = _PACKAGE_FOR_PROTOCOL.get(protocol)
            hint = f"; install it with: pip install {package}" if package else ""
            raise LedgerError(f"{root}: no filesystem for '{protocol}://'{hint} ({exc})") from None
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self._folders: set[str] = set()

    def path(self, *parts: str) -> str:
        return "/".join([self._root_path.rstrip("/"), *parts]) if parts else self._root_path

    def url(self, *parts: str) -> str:
        """A user-facing location of ``parts`` (the URL form for remote stores)."""
        return "/".join([self.root, *parts])

    def child(self, *parts: str) -> "Store":
        sub = Store.__new__(Store)
        sub.root, sub.fs, sub.is_local, sub._folders = self.url(*parts), self.fs, self.is_local, set()
        sub._root_path = self.path(*parts)
        return sub

    # -- reading --------------------------------------------------------

    def read_bytes(self, *parts: str) -> bytes:
        """Raises FileNotFoundError if absent; any other error propagates."""
        return self.fs.cat_file(self.path(*parts))

    def read_many(self, paths: list[str]) -> dict[str, bytes]:
        """Read many files at once (concurrent on async stores); absent files are skipped."""
        if not paths:
            return {}
        if self.is_local:
            out = {}
            for p in paths:
                try:
                    with open(p, "rb") as f:
                        out[p] = f.read()
                except FileNotFoundError:
                    continue
            return out
        got = self.fs.cat(paths, on_error="return")
        out = {}
        for p, value in got.items():
            if isinstance(value, FileNotFoundError):
                continue
            if isinstance(value, BaseException):
                raise value
            out[p] = value
        return out

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def list_files(self, *parts: str) -> list[str]:
        """Full paths of the files directly in a folder; [] when the folder is absent."""
        return sorted(self.file_sizes(*parts))

    def file_sizes(self, *parts: str) -> dict[str, int]:
        """{full path: size} of the files directly in a folder; {} when the folder is absent."""
        folder = self.path(*parts)
        if self.is_local:  # os.scandir: ledgers list thousands of records
            try:
                with os.scandir(folder) as entries:
                    return {e.path: e.stat().st_size for e in entries
                            if e.is_file() and not e.name.startswith(".tmp-")}
            except FileNotFoundError:
                return {}
        try:
            entries = self.fs.ls(folder, detail=True)
        except FileNotFoundError:
            return {}
        return {e["name"]: e.get("size") for e in entries if e.get("type") == "file"}

    # -- writing --------------------------------------------------------

    def write_atomic(self, data: bytes, *parts: str) -> str:
        """Write a whole file so readers see all of it or nothing; returns its path."""
        target = self.path(*parts)
        if self.is_local:
            folder = os.path.dirname(target)
            os.makedirs(folder, exist_ok=True)
            tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex}-{os.path.basename(target)}")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        else:
            # One PUT (or one block-list commit): object stores publish a blob whole.
            self.fs.pipe_file(target, data)
        return target

    def write_once(self, data: bytes, *parts: str) -> str:
        """Create a file under a name nobody else uses; the fast path for per-batch files.

        No temp file, rename or fsync: a reader may see it half-written, so
        callers only use it for content that proves its own integrity (sealed
        records, parts whose sha256 a sealed record holds). Raises
        FileExistsError if the name was used.
        """
        target = self.path(*parts)
        if not self.is_local:
            self.fs.pipe_file(target, data)  # one PUT: the blob appears whole
            return target
        folder = os.path.dirname(target)
        if folder not in self._folders:
            os.makedirs(folder, exist_ok=True)
            self._folders.add(folder)
        with open(target, "xb") as f:
            f.write(data)
        return target

    def write_new(self, data: bytes, *parts: str) -> bool:
        """Create a file only if it does not exist yet; False if it already did.

        Local disk uses an exclusive hard link, so two writers can never both win.
        """
        target = self.path(*parts)
        if self.is_local:
            folder = os.path.dirname(target)
            os.makedirs(folder, exist_ok=True)
            tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex}")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, target)
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
        if self.fs.exists(target):
            return False
        self.fs.pipe_file(target, data)
        return True

    def remove(self, *parts: str) -> None:
        try:
            self.fs.rm_file(self.path(*parts))
        except FileNotFoundError:
            pass

    def makedirs(self, *parts: str) -> None:
        if self.is_local:
            os.makedirs(self.path(*parts), exist_ok=True)


@contextmanager
def atomic_output(url: str):
    """A binary file handle whose content appears at ``url`` whole, or not at all."""
    fs, path = fsspec.core.url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        suffix = f"-{os.path.basename(path)}"
        for stale in os.listdir(folder):  # left by a writer killed mid-way (the lease makes us the only one)
            if stale.startswith(".tmp-") and stale.endswith(suffix):
                os.unlink(os.path.join(folder, stale))
        tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex}{suffix}")
        try:
            with open(tmp, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return
    f = fs.open(path, "wb")
    try:
        yield f
    except BaseException:
        # Closing would publish a partial blob; discard the staged data instead.
        getattr(f, "discard", lambda: None)()
        raise
    f.close()
