"""The job-dir store: the few operations the ledger needs, on local disk or an object store.

A backend implements six methods (in the spirit of fsspec's ``AbstractFileSystem``:
a few required, the rest derived):

- ``read_ranges(paths, starts, ends)``: byte ranges of many files at once; per path the
  bytes or the exception (``FileNotFoundError`` when absent);
- ``entries(folder)``: ({path: size} of the files directly in a folder, the paths of the
  folders directly in it); ({}, []) when absent;
- ``size(path)``: one file's size, ``FileNotFoundError`` when absent;
- ``put(path, data)``: write a whole file, replacing any: readers see all of it or nothing;
- ``create(path, data)``: write a whole file only if the name is free (False if it was not);
  two writers can never both win;
- ``remove(path)``: delete a file (absent is fine).

Two capabilities tell the ledger what the medium offers: ``appends`` (files grow in
place, so a worker appends its records to one segment file) and :meth:`local_path` (a
real path on this host, for what needs one: tailing logs, an ``output_dir`` folder).

Only ``FileNotFoundError`` means "absent". Any other error (auth, network, permissions)
propagates, so it can never be mistaken for "this batch is not done".
"""

from __future__ import annotations

import hashlib
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Mapping, Optional, Sequence, Union

import fsspec
from fsspec.implementations.local import LocalFileSystem

from raypar.errors import LedgerError
from raypar.storage import _PACKAGE_FOR_PROTOCOL, atomic_file

Ranges = list[Union[bytes, BaseException]]
LISTINGS_AT_ONCE = 32  # folders listed concurrently on an object store (a view's open segment folders)


class Store:
    """A job dir's folder (a local path or an fsspec URL). Use :func:`open_store`."""

    appends = False

    def __init__(self, root: str, root_path: str):
        self.root = root  # as the user wrote it (URL form for object stores)
        self._root_path = root_path  # as the backend names it

    # -- the contract: what a backend implements ----------------------------

    def read_ranges(self, paths: Sequence[str], starts: Sequence[Optional[int]],
                    ends: Sequence[Optional[int]]) -> Ranges:
        raise NotImplementedError

    def entries(self, folder: str) -> tuple[dict[str, int], list[str]]:
        raise NotImplementedError

    def size(self, path: str) -> int:
        raise NotImplementedError

    def put(self, path: str, data: bytes) -> None:
        raise NotImplementedError

    def create(self, path: str, data: bytes) -> bool:
        raise NotImplementedError

    def remove_path(self, path: str) -> None:
        raise NotImplementedError

    def local_path(self, *parts: str) -> Optional[str]:
        """A path on this host's file system, or None (object stores)."""
        return None

    def create_fast(self, path: str, data: bytes) -> None:
        """:meth:`create` for content that proves its own integrity (sealed records, rows a
        sealed record checks): a backend may skip making it appear whole. Raises
        FileExistsError if the name was used."""
        if not self.create(path, data):
            raise FileExistsError(path)

    # -- derived ------------------------------------------------------------

    def path(self, *parts: str) -> str:
        return "/".join([self._root_path.rstrip("/"), *parts]) if parts else self._root_path

    def url(self, *parts: str) -> str:
        """A user-facing location of ``parts`` (the URL form for remote stores)."""
        return "/".join([self.root, *parts])

    def read_bytes(self, *parts: str) -> bytes:
        """Raises FileNotFoundError if absent; any other error propagates."""
        return self.read_range(self.path(*parts))

    def read_range(self, path: str, start: Optional[int] = None, end: Optional[int] = None) -> bytes:
        got = self.read_ranges([path], [start], [end])[0]
        if isinstance(got, BaseException):
            raise got
        return got

    def read_many(self, paths: list[str]) -> dict[str, bytes]:
        """Whole files, read at once (concurrently on object stores); absent files are skipped."""
        got = self.read_ranges(paths, [None] * len(paths), [None] * len(paths)) if paths else []
        out = {}
        for path, value in zip(paths, got, strict=True):
            if isinstance(value, FileNotFoundError):
                continue
            if isinstance(value, BaseException):
                raise value
            out[path] = value
        return out

    def read_verified(self, folder: str, entries: Sequence[Mapping]) -> Optional[list[bytes]]:
        """The files an index names (``{"file", "file_sha256"}`` each) in ``folder``, read at once;
        None when one is missing or is not the bytes the index sealed (compact files)."""
        paths = [self.path(folder, entry["file"]) for entry in entries]
        data = self.read_many(paths)  # concurrently on object stores
        if not all(path in data and hashlib.sha256(data[path]).hexdigest() == entry["file_sha256"]
                   for path, entry in zip(paths, entries, strict=True)):
            return None
        return [data.pop(path) for path in paths]

    def exists(self, *parts: str) -> bool:
        try:
            self.size(self.path(*parts))
            return True
        except FileNotFoundError:
            return False

    def sizes(self, folder: str) -> dict[str, int]:
        return self.entries(folder)[0]

    def file_sizes(self, *parts: str) -> dict[str, int]:
        """{full path: size} of the files directly in a folder; {} when the folder is absent."""
        return self.sizes(self.path(*parts))

    def list_files(self, *parts: str) -> list[str]:
        """Full paths of the files directly in a folder; [] when the folder is absent."""
        return sorted(self.file_sizes(*parts))

    def listings(self, folders: Sequence[str]) -> dict[str, tuple[dict[str, int], list[str]]]:
        """{folder: :meth:`entries` of it} for several folders under the root, each named by
        its path there (``parts/x``); concurrently on object stores, where each is a round trip."""
        return {folder: self.entries_under(folder) for folder in folders}

    def entries_under(self, folder: str) -> tuple[dict[str, int], list[str]]:
        """:meth:`entries` of a folder named by its path under the root (``parts/x``)."""
        return self.entries(self.path(*folder.split("/")))

    def write_atomic(self, data: bytes, *parts: str) -> str:
        """Write a whole file so readers see all of it or nothing; returns its path."""
        target = self.path(*parts)
        self.put(target, data)
        return target

    def write_many(self, files: Mapping[str, bytes]) -> None:
        """:meth:`write_atomic` of each file, keyed by its path under the root (concurrently on
        object stores)."""
        for name, data in files.items():
            self.write_atomic(data, *name.split("/"))

    def writing(self, *parts: str):
        """A binary file handle whose content appears under the root whole when the block ends,
        or not at all: for a file too large to build in memory first (a million attempts' reports)."""
        return atomic_file(self.fs, self.path(*parts))

    def write_new(self, data: bytes, *parts: str) -> bool:
        """Create a whole file only if it does not exist yet; False if it already did."""
        return self.create(self.path(*parts), data)

    def write_once(self, data: bytes, *parts: str) -> str:
        """Create a file under a name nobody else uses, the fast way (see :meth:`create_fast`)."""
        target = self.path(*parts)
        self.create_fast(target, data)
        return target

    def remove(self, *parts: str) -> None:
        self.remove_path(self.path(*parts))


class LocalStore(Store):
    """Local disk (or a shared file system mounted on every node)."""

    appends = True
    fs = LocalFileSystem()

    def __init__(self, root: str, root_path: str):
        super().__init__(root, root_path)
        self._folders: set[str] = set()

    def local_path(self, *parts: str) -> Optional[str]:
        return self.path(*parts)

    def read_ranges(self, paths, starts, ends) -> Ranges:
        out: Ranges = []
        for path, start, end in zip(paths, starts, ends, strict=True):
            try:
                with open(path, "rb") as f:
                    start = start or 0
                    f.seek(start)
                    out.append(f.read() if end is None else f.read(max(end - start, 0)))
            except OSError as exc:
                out.append(exc)
        return out

    def entries(self, folder: str) -> tuple[dict[str, int], list[str]]:
        try:  # os.scandir: a ledger folder may hold thousands of files
            with os.scandir(folder) as found:
                found = list(found)
        except FileNotFoundError:
            return {}, []
        return ({e.path: e.stat().st_size for e in found if e.is_file() and not e.name.startswith(".tmp-")},
                [e.path for e in found if e.is_dir()])

    def size(self, path: str) -> int:
        return os.stat(path).st_size

    def put(self, path: str, data: bytes) -> None:
        tmp = self._durable_temp(path, data)
        os.replace(tmp, path)

    def create(self, path: str, data: bytes) -> bool:
        tmp = self._durable_temp(path, data)
        try:
            os.link(tmp, path)  # exclusive: fails if the name exists
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def create_fast(self, path: str, data: bytes) -> None:
        # No temp file, rename or fsync: the content proves its own integrity.
        self._folder_of(path)
        with open(path, "xb") as f:
            f.write(data)

    def remove_path(self, path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def _folder_of(self, path: str) -> str:
        folder = os.path.dirname(path)
        if folder not in self._folders:
            os.makedirs(folder, exist_ok=True)
            self._folders.add(folder)
        return folder

    def _durable_temp(self, path: str, data: bytes) -> str:
        tmp = os.path.join(self._folder_of(path), f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp


class ObjectStore(Store):
    """An object store through fsspec (Azure Blob via adlfs, S3, GCS): a PUT is atomic, a
    conditional PUT (If-None-Match: *) is the exclusive create, objects are never appended to."""

    def __init__(self, root: str, root_path: str, fs):
        super().__init__(root, root_path)
        self.fs = fs

    def read_ranges(self, paths, starts, ends) -> Ranges:
        # cat_ranges, not cat: adlfs's cat reads one file after the other and checks each
        # name first; cat_ranges runs the reads concurrently on async stores.
        return self.fs.cat_ranges(list(paths), list(starts), list(ends), on_error="return") if paths else []

    def entries(self, folder: str) -> tuple[dict[str, int], list[str]]:
        try:
            found = self.fs.ls(folder, detail=True)
        except FileNotFoundError:
            return {}, []
        return ({e["name"]: e.get("size") for e in found if e.get("type") == "file"},
                [e["name"].rstrip("/") for e in found if e.get("type") == "directory"])

    def listings(self, folders: Sequence[str]) -> dict[str, tuple[dict[str, int], list[str]]]:
        # Threads, not the async API: any fsspec filesystem answers ls from several threads.
        with ThreadPoolExecutor(min(len(folders), LISTINGS_AT_ONCE) or 1, thread_name_prefix="raypar-list") as pool:
            return dict(zip(folders, pool.map(self.entries_under, folders), strict=True))

    def write_many(self, files: Mapping[str, bytes]) -> None:
        if files:  # fsspec's pipe of a dict: concurrent PUTs on async stores (adlfs, s3fs, gcsfs)
            self.fs.pipe({self.path(*name.split("/")): data for name, data in files.items()})

    def size(self, path: str) -> int:
        # Not fs.exists: fsspec's default answers False on *any* error (auth, network).
        return self.fs.info(path)["size"]

    def put(self, path: str, data: bytes) -> None:
        self.fs.pipe_file(path, data)  # one PUT (or one block-list commit): published whole

    def create(self, path: str, data: bytes) -> bool:
        # Not exists-then-put: two writers could both see "absent" and both write.
        try:
            self.fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        return True

    def remove_path(self, path: str) -> None:
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            pass


def open_store(root: str, storage_options: Optional[dict] = None) -> Store:
    """The store of a local path or an fsspec URL; a clear LedgerError when it cannot be opened."""
    root = root.rstrip("/") if root != "/" else root
    protocol = root.split("://", 1)[0] if "://" in root else "file"
    # No listings cache: other processes (workers, a second driver) add files, and a
    # cached listing would hide their records for the life of this process.
    options = {**(storage_options or {}), "use_listings_cache": False}
    try:
        fs, root_path = fsspec.core.url_to_fs(root, **options)
    except ImportError as exc:
        package = _PACKAGE_FOR_PROTOCOL.get(protocol)
        hint = f"; install it with: pip install {package}" if package else ""
        raise LedgerError(f"{root}: no filesystem for '{protocol}://'{hint} ({exc})") from None
    except ValueError as exc:
        # An unknown protocol, or options the filesystem refuses (adlfs: a malformed
        # connection string) -- a setting to fix, not a package to install.
        raise LedgerError(f"{root}: cannot open '{protocol}://' storage ({exc})") from None
    if isinstance(fs, LocalFileSystem):
        return LocalStore(root, root_path)
    return ObjectStore(root, root_path, fs)
