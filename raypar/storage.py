"""Every file operation raypar makes, through fsspec, for local paths and URLs.

The contract is narrow on purpose: only ``FileNotFoundError`` means "absent".
Any other error (auth, network, permissions) propagates, so it can never be
mistaken for "this batch is not done".
"""

from __future__ import annotations

import os
import re
import tempfile
import uuid
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Optional

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .errors import LedgerError


def is_url(path: str) -> bool:
    """True for ``scheme://...`` paths (fsspec URLs); False for local paths."""
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", path))


_PACKAGE_FOR_PROTOCOL = {
    "az": "'raypar[azure]'", "abfs": "'raypar[azure]'", "abfss": "'raypar[azure]'", "s3": "s3fs", "s3a": "s3fs",
    "gs": "gcsfs", "gcs": "gcsfs",
}


def azure_options_from_env(env: Optional[Mapping] = None) -> dict:
    """adlfs options from the standard ``AZURE_STORAGE_*`` variables; {} when none is set.

    adlfs reads these same variables itself (``AZURE_STORAGE_CONNECTION_STRING``,
    ``_ACCOUNT_NAME``, ``_ACCOUNT_KEY``, ``_SAS_TOKEN``, ``_CLIENT_ID``,
    ``_CLIENT_SECRET``, ``_TENANT_ID``, ``_ANON``), but only in the process
    that has them: the driver passes these options explicitly to Ray workers,
    which do not share its environment. Precedence follows adlfs: a connection
    string wins; else the account name with its key, a SAS token, or a service
    principal (with only the name, adlfs falls back to DefaultAzureCredential).
    """
    env = os.environ if env is None else env
    if env.get("AZURE_STORAGE_CONNECTION_STRING"):
        return {"connection_string": env["AZURE_STORAGE_CONNECTION_STRING"]}
    if not env.get("AZURE_STORAGE_ACCOUNT_NAME"):
        return {}
    options = {"account_name": env["AZURE_STORAGE_ACCOUNT_NAME"]}
    if env.get("AZURE_STORAGE_ACCOUNT_KEY"):
        options["account_key"] = env["AZURE_STORAGE_ACCOUNT_KEY"]
    elif env.get("AZURE_STORAGE_SAS_TOKEN"):
        options["sas_token"] = env["AZURE_STORAGE_SAS_TOKEN"]
    elif all(env.get(f"AZURE_STORAGE_{v}") for v in ("CLIENT_ID", "CLIENT_SECRET", "TENANT_ID")):
        options.update({v.lower(): env[f"AZURE_STORAGE_{v}"] for v in ("CLIENT_ID", "CLIENT_SECRET", "TENANT_ID")})
    return options


class Store:
    """A folder (local path or fsspec URL) with atomic, append-style writes."""

    def __init__(self, root: str, storage_options: Optional[dict] = None):
        self.root = root.rstrip("/") if root not in ("/",) else root
        protocol = root.split("://", 1)[0] if "://" in root else "file"
        # No listings cache: other processes (workers, a second driver) add files, and a
        # cached listing would hide their records for the life of this process.
        options = {**(storage_options or {}), "use_listings_cache": False}
        try:
            self.fs, self._root_path = fsspec.core.url_to_fs(self.root, **options)
        except ImportError as exc:
            package = _PACKAGE_FOR_PROTOCOL.get(protocol)
            hint = f"; install it with: pip install {package}" if package else ""
            raise LedgerError(f"{root}: no filesystem for '{protocol}://'{hint} ({exc})") from None
        except ValueError as exc:
            # An unknown protocol, or options the filesystem refuses (adlfs: a malformed
            # connection string) -- a setting to fix, not a package to install.
            raise LedgerError(f"{root}: cannot open '{protocol}://' storage ({exc})") from None
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
        # cat_ranges, not cat: adlfs's cat reads one file after the other and checks
        # each name first; cat_ranges runs the reads concurrently on async stores.
        got = self.fs.cat_ranges(list(paths), None, None, on_error="return")
        out = {}
        for p, value in zip(paths, got):
            if isinstance(value, FileNotFoundError):
                continue
            if isinstance(value, BaseException):
                raise value
            out[p] = value
        return out

    def exists(self, *parts: str) -> bool:
        # Not fs.exists: fsspec's default answers False on *any* error (auth, network).
        try:
            self.fs.info(self.path(*parts))
            return True
        except FileNotFoundError:
            return False

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
            # One conditional PUT (If-None-Match: *): the blob appears whole, never over another.
            self.fs.pipe_file(target, data, mode="create")
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

        Local disk uses an exclusive hard link, object stores a conditional create
        (adlfs: If-None-Match: *), so two writers can never both win.
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
        # Not exists-then-put: two writers could both see "absent" and both write.
        try:
            self.fs.pipe_file(target, data, mode="create")
        except FileExistsError:
            return False
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
def atomic_output(url: str, storage_options: Optional[dict] = None):
    """A binary file handle whose content appears at ``url`` whole, or not at all."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
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
    # Staged in a local temp file, then one upload: an fsspec write handle left open by an
    # exception still commits what it holds when garbage-collected (adlfs's discard() is a
    # no-op), so a remote handle cannot promise "nothing" on failure.
    with tempfile.TemporaryDirectory(prefix="raypar-output-") as folder:
        staged = os.path.join(folder, os.path.basename(path) or "output")
        with open(staged, "wb") as f:
            yield f
        fs.put_file(staged, path)  # adlfs: one upload_blob; large files commit their blocks at once
