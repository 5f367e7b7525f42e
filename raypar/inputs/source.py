"""Where an input's files are, how to list them, and how to read them as a table.

``describe`` runs on the driver and turns the spec's ``input_data`` into a
plain dict (no pydantic, no secrets: it goes into every worker's plan);
``open_source`` turns that dict back into a filesystem on either side.
Listing is sorted and streamed: the same folder always lists in the same
order (full paths, by code point), and the first files come back before a
large folder is fully listed: an object store's folder is listed flat, a page
at a time (flat_listing.py), any other walked one folder at a time.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Iterator, Optional

from fsspec.implementations.local import LocalFileSystem

from raypar.credentials import describe_error, open_fs, redact
from raypar.errors import SpecError, StorageError
from raypar.inputs import flat_listing
from raypar.inputs.mltable import load_mltable
from raypar.storage import is_url

if TYPE_CHECKING:
    from raypar.spec.models import JobSpec

# Extension → table format, for folders and files read as tables.
TABLE_EXTENSIONS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "csv",
                    ".jsonl": "json_lines", ".ndjson": "json_lines"}
# MLTable's read_* transformations → raypar's format names.
_MLTABLE_FORMATS = {"delimited": "csv", "parquet": "parquet", "json_lines": "json_lines"}


def table_format_of(name: str) -> Optional[str]:
    return TABLE_EXTENSIONS.get(posixpath.splitext(name)[1].lower())


def describe(spec: JobSpec, storage: dict) -> dict:
    """The input as plain values: root, mode, and for tables the format and read options.

    Raises SpecError for an input that does not exist or cannot be read the way the spec asks.
    """
    data, where = spec.data_input, f"inputs.{spec.data_input_name}"
    fs, path = _fs(data.path, storage, f"{where}.path")
    desc: dict[str, Any] = {"type": data.type, "path": data.path, "mode": data.mode, "format": None,
                            "read": {}, "partition_format": None, "keep_columns": None, "drop_columns": None,
                            "entries": None}
    if data.type == "mltable":
        if spec.raypar.input_format:
            raise SpecError(f"raypar.input_format applies to uri_folder and uri_file inputs; {where} is an "
                            f"MLTable, whose read_* step gives the format")
        _describe_mltable(desc, fs, path, where)
    else:
        _check_exists(fs, path, data.type, data.path, f"{where}.path")
        desc["root"] = data.path.rstrip("/") if data.type == "uri_folder" else _parent(data.path)
        sized = spec.batch_size().is_bytes if spec.mini_batch_size is not None else False
        if spec.raypar.input_format or sized:
            desc["format"] = spec.raypar.input_format or "auto"
    desc["tabular"] = desc["format"] is not None
    # An input inside task.code travels with the code as a copy (a submitted job's Ray working_dir),
    # and each copy gets new mtimes: its files are known by their content instead.
    desc["by_content"] = _inside(desc["root"], spec.task.code)
    return desc


def _inside(root: str, code: str) -> bool:
    if is_url(root) or is_url(code):
        return False
    root, code = os.path.abspath(root), os.path.abspath(code)
    return root == code or root.startswith(code.rstrip(os.sep) + os.sep)


def _describe_mltable(desc: dict, fs, path: str, where: str) -> None:

    _check_exists(fs, path, "mltable", desc["path"], f"{where}.path")
    folder_url = desc["path"].rstrip("/")
    if fs.isfile(path):  # the MLTable file itself
        folder_url = _parent(folder_url)
    try:
        table = load_mltable(path, fs)
    except SpecError as exc:
        raise SpecError(f"{where}.path: {exc.headline}") from None
    desc["root"] = folder_url
    desc["entries"] = [{"kind": e.kind, "value": e.value} for e in table.paths]
    desc["format"] = _MLTABLE_FORMATS.get(table.read_format) if table.read_format else None
    desc["read"] = dict(table.read_options)
    desc["partition_format"] = table.partition_format
    desc["keep_columns"] = list(table.keep_columns) if table.keep_columns else None
    desc["drop_columns"] = list(table.drop_columns) if table.drop_columns else None


def _parent(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[0] or "/"


def _fs(url: str, storage: dict, where: str):
    try:
        return open_fs(url, storage)
    except Exception as exc:  # noqa: BLE001 - a missing fsspec package, a bad URL
        raise SpecError(f"{where}: {getattr(exc, 'headline', exc)}") from None


def _check_exists(fs, path: str, kind: str, shown: str, where: str) -> None:
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise SpecError(f"{where}: {shown} not found") from None
    except PermissionError as exc:
        raise SpecError(f"{where}: {shown}: permission denied ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - auth, network: named, never read as "absent", and not the spec's fault
        raise StorageError(f"{where}: {redact(shown)}: cannot access ({describe_error(exc)})") from None
    is_file = info.get("type") == "file"
    if kind == "uri_file" and not is_file:
        raise SpecError(f"{where}: {shown}: a uri_file input must be a single file, found a folder")
    if kind == "uri_folder" and is_file:
        raise SpecError(f"{where}: {shown}: a uri_folder input must be a folder, found a file")


@dataclass
class Source:
    """An input opened for listing and reading (driver and workers)."""

    desc: dict
    fs: Any
    root: str  # the fs path names are relative to
    first_header: Optional[tuple] = None  # CSV header "from_first_file": (file, end), set while planning
    # name -> identity (file_version) of every file listed and not yet taken by the planner
    versions: dict = field(default_factory=dict)
    only: Optional[list] = None  # re-planning: just these names, in this order (see restricted)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def fs_path(self, name: str) -> str:
        """The fs path of a file named in a manifest (relative to the root, or absolute)."""
        if is_url(name):
            return self.fs._strip_protocol(name)
        if name.startswith("/") and self.is_local:
            return name
        return f"{self.root.rstrip('/')}/{name}"

    def url(self, name: str) -> str:
        """What a user sees for a manifest name: a local path, or a full URL for remote inputs."""
        return name if is_url(name) else self.url_of(self.fs_path(name))

    def url_of(self, fs_path: str) -> str:
        """The user-facing form of an fs path (the input's own protocol for remote inputs)."""
        if self.is_local:
            return fs_path
        return f"{self.desc['path'].split('://', 1)[0]}://{fs_path}"

    def files(self) -> Iterator[str]:
        """Every input file as a name for the manifest, in a stable sorted order, streamed.

        Each file's identity (``file_version``) is kept in ``versions`` until the planner takes it.
        """
        desc = self.desc
        if self.only is not None:
            yield from self.only
            return
        if desc["type"] == "uri_file":
            name = posixpath.basename(desc["path"].rstrip("/"))
            self.versions[name] = self._info_version(self.fs_path(name))
            yield name
            return
        if desc["entries"] is None:
            yield from self._files_below(self.root, "")
            return
        for entry in desc["entries"]:  # MLTable paths, in the order the MLTable lists them
            yield from self._entry_files(entry)

    def _entry_files(self, entry: dict) -> Iterator[str]:
        value = entry["value"]
        if not self._on_this_store(value):
            raise SpecError(f"{self.desc['path']}/MLTable: path {value} is on another storage than the MLTable "
                            f"itself; raypar reads an MLTable's paths from the MLTable's own storage")
        target = self._to_fs_path(value)
        if entry["kind"] == "file":
            if not self.fs.isfile(target):
                raise SpecError(f"{self.desc['path']}/MLTable: file {entry['value']} not found")
            name = self._name(target)
            self.versions[name] = self._info_version(target)
            yield name
        elif entry["kind"] == "folder":
            if not self.fs.isdir(target):
                raise SpecError(f"{self.desc['path']}/MLTable: folder {entry['value']} not found")
            # Named (and versioned: the key a resume compares by) as the manifest names them.
            yield from self._files_below(target, self._name(target.rstrip("/")) + "/")
        else:
            found = self.fs.glob(target, detail=True)
            matches = sorted(p for p, info in found.items() if info.get("type") == "file")
            if not matches:
                raise SpecError(f"{self.desc['path']}/MLTable: pattern {entry['value']} matches no file")
            for p in matches:
                name = self._name(p)
                self.versions[name] = file_version(found[p])
                yield name

    def _on_this_store(self, value: str) -> bool:
        if not is_url(value):
            return self.is_local
        protocols = self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)
        return value.split("://", 1)[0] in protocols

    def _to_fs_path(self, value: str) -> str:
        return self.fs._strip_protocol(value) if is_url(value) else value

    def _name(self, fs_path: str) -> str:
        """Relative to the root when below it, else absolute (so manifests stay small)."""
        root = self.root.rstrip("/") + "/"
        if fs_path.startswith(root):
            return fs_path[len(root):]
        return self.url_of(fs_path)

    def _files_below(self, folder: str, prefix: str) -> Iterator[str]:
        """Every file below ``folder`` (names starting with ``prefix``) in sorted full-path order:
        an object store's one flat listing, a page at a time (flat_listing.py); a walk elsewhere."""
        listed = None if self.is_local else flat_listing.pages(self.fs, folder)
        if listed is None:
            yield from self._walk(folder, prefix)
            return
        start, last = len(folder.strip("/")) + 1, None
        while True:
            try:
                page = next(listed, None)
            except Exception as exc:  # noqa: BLE001 - named by _cannot_list
                raise self._cannot_list(folder, exc) from None
            if page is None:
                break
            for path, info in sorted(page, key=lambda entry: entry[0]):
                name = f"{prefix}{path.strip('/')[start:]}"
                if last is not None and name <= last:  # the order every plan of this input must repeat
                    raise StorageError(f"{redact(self.url_of(folder))}: the store listed {name} after {last}; "
                                       f"raypar needs an object store that lists keys in order")
                self.versions[name] = file_version(info)
                last = name
                yield name
        if last is None:  # no file below it: an empty folder, or one gone since the spec was checked
            try:
                self.fs.info(folder)
            except Exception as exc:  # noqa: BLE001 - named by _cannot_list
                raise self._cannot_list(folder, exc) from None

    def _walk(self, folder: str, prefix: str) -> Iterator[str]:
        # A folder's entries sorted with "/" after folder names: the walk then yields
        # exactly the order of sorting all paths, one folder listing at a time.
        try:
            entries = self._list(folder)
        except Exception as exc:  # noqa: BLE001 - named by _cannot_list
            raise self._cannot_list(folder, exc) from None
        for _key, name, version in sorted(entries):
            rel, path = f"{prefix}{name}", f"{folder.rstrip('/')}/{name}"
            if version is None:
                yield from self._walk(path, f"{rel}/")
            else:
                self.versions[rel] = version or self._local_file_version(path)
                yield rel

    def _cannot_list(self, folder: str, exc: Exception) -> Exception:
        if isinstance(exc, FileNotFoundError):
            return SpecError(f"{self.url_of(folder)}: input folder not found")
        if isinstance(exc, PermissionError):
            return SpecError(f"{self.url_of(folder)}: cannot list input folder ({exc.strerror or exc})")
        if isinstance(exc, (SpecError, StorageError)):
            return exc
        return StorageError(f"{redact(self.url_of(folder))}: cannot list input folder ({describe_error(exc)})")

    def _list(self, folder: str) -> list[tuple[str, str, Optional[str]]]:
        """(sort key, name, the file's version or None for a folder) of each entry; on local disk
        a file's version is "" here and read as the walk reaches the file, so the first mini-batch
        does not wait for a stat of every file of a large folder."""
        if self.is_local:
            out = []
            with os.scandir(folder) as it:
                for e in it:
                    is_dir = e.is_dir()  # follows symlinks, as os.walk(followlinks=True) did
                    out.append((e.name + ("/" if is_dir else ""), e.name, None if is_dir else ""))
            return out
        out = []
        for info in self.fs.ls(folder, detail=True):
            name = info["name"].rstrip("/").rsplit("/", 1)[-1]
            is_dir = info.get("type") == "directory"
            if not name or (not is_dir and info["name"].rstrip("/") == folder.rstrip("/")):
                continue
            out.append((name + ("/" if is_dir else ""), name, None if is_dir else file_version(info)))
        return out

    def _local_file_version(self, path: str) -> str:
        try:
            return self._info_version(path)
        except FileNotFoundError:
            raise SpecError(f"{path}: input file not found (a broken link, or removed while listed)") from None
        except PermissionError as exc:
            raise SpecError(f"{path}: cannot read input file ({exc.strerror or exc})") from None

    def _info_version(self, fs_path: str) -> str:
        if self.is_local:
            return self._local_version(fs_path, os.stat(fs_path))
        return file_version(self.fs.info(fs_path))

    def _local_version(self, path: str, st) -> str:
        if self.desc.get("by_content"):  # a copy's mtime says nothing (see describe)
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            return f"size:{st.st_size} sha256:{digest.hexdigest()}"
        return _stat_version(st)

    def take_versions(self, names) -> dict:
        """The versions of ``names`` recorded by the listing, each handed out once."""
        return {n: self.versions.pop(n) for n in names if n in self.versions}

    def restricted(self, names: list, versions: dict) -> "Source":
        """A copy that lists only ``names`` (in that order) with known versions: for re-planning."""
        return replace(self, versions=dict(versions), only=list(names), first_header=None)


def file_version(info: dict) -> str:
    """What changes when a stored file changes: its etag, else its size and modification time."""
    etag = info.get("etag") or info.get("ETag")
    if etag:
        return f"etag:{str(etag).strip(chr(34))}"
    when = next((info[k] for k in ("mtime", "last_modified", "LastModified", "updated", "created") if info.get(k)), "")
    return f"size:{info.get('size')} time:{when}"


def _stat_version(st) -> str:
    # Nanosecond mtime with the size: what make and rsync trust (an editor's save-by-rename gets a new mtime).
    return f"size:{st.st_size} mtime:{st.st_mtime_ns}"




def open_source(desc: dict, storage: dict) -> Source:
    fs, root = open_fs(desc["root"], storage)
    # fsspec shares one filesystem per set of options in a process, with its listings: a source
    # opened now must see the input as it is now (a resume in the same process after a fix).
    fs.invalidate_cache()
    return Source(desc=desc, fs=fs, root=root)

