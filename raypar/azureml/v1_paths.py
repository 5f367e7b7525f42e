"""Where v1 datasets point: paths, ``(datastore, path)`` pairs, globs, and the MLTable files raypar writes for them.

azureml-core's datasets take a path, a URL, a ``(datastore, "path/**/*.csv")``
pair, a ``DataPath`` or a list of these. raypar has no workspace, so a datastore
is its root: a local folder or an fsspec URL (``az://container``), given as a
string or as :class:`Datastore`. A dataset that one folder or file cannot
express (globs, several paths, a partition format, read options) becomes an
MLTable file that raypar writes once into its cache
(``$RAYPAR_CACHE_DIR``, else ``$XDG_CACHE_HOME/raypar``, else ``~/.cache/raypar``),
named by its content's hash, so the same dataset always gives the same input path
and a job that uses it can be resumed.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from typing import Union

import yaml

from raypar.azureml.v2 import absolute, is_url
from raypar.credentials import open_fs, resolve_storage

_GLOB = re.compile(r"[*?\[]")


class Datastore:
    """A datastore as a root folder or URL: ``Datastore("/data")``, ``Datastore("az://container")``."""

    def __init__(self, root: Union[str, os.PathLike], name: str = "datastore"):
        self.root = absolute(root)
        self.name = name

    def path(self, path: str = "", data_reference_name=None) -> "DataPath":
        """A path on this datastore (``datastore.path("iris/")``)."""
        return DataPath(self, path)

    def __repr__(self) -> str:
        return f"Datastore(root={self.root!r})"


class DataPath:
    """``azureml.data.datapath.DataPath``: a path on a datastore (a :class:`Datastore`, a folder or a URL)."""

    def __init__(self, datastore=None, path_on_datastore: str = "", name=None):
        self.datastore = datastore
        self.path_on_datastore = path_on_datastore or ""

    def full_path(self) -> str:
        return join(root_of(self.datastore), self.path_on_datastore)

    def __repr__(self) -> str:
        return f"DataPath({self.full_path()!r})"


def root_of(datastore) -> str:
    """A datastore's root: a :class:`Datastore`, a folder or a URL."""
    if isinstance(datastore, Datastore):
        return datastore.root
    if isinstance(datastore, (str, os.PathLike)):
        return absolute(datastore)
    raise ValueError(f"datastore {datastore!r}: raypar has no Azure ML workspace; give the datastore's root as a "
                     f"folder or URL, e.g. ('/data', 'iris/*.csv') or Datastore('az://container')")


def join(root: str, path: str) -> str:
    path = str(path).lstrip("/")
    if not path:
        return root
    if is_url(root):
        return f"{root.rstrip('/')}/{path}"
    return os.path.normpath(os.path.join(root, path)) + ("/" if path.endswith("/") else "")


def resolve(path) -> list[str]:
    """A dataset's ``path`` argument as absolute local paths or URLs (globs kept)."""
    items = path if isinstance(path, list) else [path]
    if not items:
        raise ValueError("dataset path: an empty list names no data")
    return [_one(item) for item in items]


def _one(item) -> str:
    if isinstance(item, DataPath):
        return item.full_path()
    if isinstance(item, tuple):
        if len(item) != 2:
            raise ValueError(f"dataset path {item!r}: a pair is (datastore, path on the datastore)")
        return join(root_of(item[0]), item[1])
    if isinstance(item, (str, os.PathLike)):
        return absolute(item)
    raise ValueError(f"dataset path {item!r}: give a folder, a file, a URL, a glob, a (datastore, path) pair "
                     f"or a DataPath")


def is_glob(path: str) -> bool:
    return bool(_GLOB.search(path))


def path_entry(path: str) -> dict:
    """The MLTable ``paths`` entry of one path: a ``pattern`` for a glob, else a ``file`` or a ``folder``."""
    if is_glob(path):
        return {"pattern": path}
    if path.endswith("/"):
        return {"folder": path.rstrip("/") or "/"}
    if not is_url(path):
        return {"file" if os.path.isfile(path) else "folder": path}

    fs, fs_path = open_fs(path, resolve_storage({}))
    return {"file" if fs.isfile(fs_path) else "folder": path}


def cache_dir(*parts: str) -> str:
    """A folder under raypar's cache (see the module docstring)."""
    root = os.environ.get("RAYPAR_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "raypar")
    return os.path.join(root, *parts)


def write_mltable(doc: dict) -> str:
    """The folder of an MLTable file holding ``doc``, written once (its name is the content's hash)."""
    text = yaml.safe_dump(doc, sort_keys=False, width=10**6)
    folder = cache_dir("datasets", hashlib.sha256(text.encode()).hexdigest()[:16])
    target = os.path.join(folder, "MLTable")
    if not os.path.isfile(target):
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".MLTable-", dir=folder)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, target)
    return folder
