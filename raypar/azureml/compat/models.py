"""The model mapping behind ``azureml.core``'s ``Model.get_model_path``: model name -> path or URL.

Azure resolves a model name through its workspace's model registry. raypar has
none, so the user sets a mapping once, in either place:

- ``raypar.models`` in the job spec (``{name: path}``; relative paths are relative
  to the YAML, as every spec path is), or
- the ``RAYPAR_MODELS`` environment variable of the process that runs the driver:
  a JSON object (``{"iris-prs": "/models/iris.pkl"}``; relative paths are relative
  to that process's working directory).

A key is a model name or ``name:version``. The driver merges the two (the spec
wins per key) and gives every worker the result in its own ``RAYPAR_MODELS``;
the shim (raypar/worker/shim/azureml/core/model.py) resolves names there. A URL is copied
once per host into a local cache, since Azure also hands scripts a local path.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
import tempfile
from typing import Mapping, Optional

from raypar.credentials import open_fs, resolve_storage
from raypar.errors import ModelNotFoundError, SpecError
from raypar.storage import is_url

ENV = "RAYPAR_MODELS"
CACHE_ROOT = os.path.join(tempfile.gettempdir(), "raypar-models")


def read_mapping(text: Optional[str], where: str = ENV) -> dict[str, str]:
    """A mapping as JSON text (None or empty: no models).

    Raises:
        SpecError: the text is not a JSON object of names to path strings.
    """
    if not text or not text.strip():
        return {}
    try:
        mapping = json.loads(text)
    except ValueError:
        mapping = None
    if not isinstance(mapping, dict) or not all(isinstance(k, str) and isinstance(v, str) and v
                                                for k, v in mapping.items()):
        raise SpecError(f"{where}: expected a JSON object of model name -> path or URL, "
                        f"such as {{\"iris-prs\": \"/models/iris.pkl\"}}")
    return mapping


def model_mapping_env(spec_models: Mapping[str, str], environ: Mapping[str, str] = os.environ) -> dict:
    """``{"RAYPAR_MODELS": json}`` for the workers (``{}`` when no model is mapped).

    The driver's own ``RAYPAR_MODELS`` (relative paths made absolute here), overlaid by ``raypar.models``.
    """
    merged = {name: path if is_url(path) else os.path.abspath(os.path.expanduser(path))
              for name, path in read_mapping(environ.get(ENV)).items()}
    merged.update(spec_models)
    return {ENV: json.dumps(merged, sort_keys=True)} if merged else {}


def model_path(name: str, version=None, environ: Mapping[str, str] = os.environ) -> str:
    """The local path of model ``name`` (``name:version`` first when a version is given).

    Raises:
        ModelNotFoundError: the name is not mapped (one line naming it and where to map it).
    """
    mapping = read_mapping(environ.get(ENV))
    keys = ([f"{name}:{version}"] if version is not None else []) + [name]
    for key in keys:
        if key in mapping:
            target = mapping[key]
            return local_copy(target) if is_url(target) else target
    known = ", ".join(sorted(mapping)) or "none"
    shown = f"{name}:{version}" if version is not None else name
    raise ModelNotFoundError(
        f"Model.get_model_path: model {shown!r} is not mapped (mapped: {known}); add it to raypar.models "
        f"in the job spec ({name}: /path/to/model) or to the driver's {ENV} environment variable "
        f"({ENV}='{{\"{name}\": \"/path/to/model\"}}')")


def local_copy(url: str) -> str:
    """A local copy of the file or folder at ``url``, downloaded once per host (a cache under $TMPDIR)."""

    target = os.path.join(CACHE_ROOT, hashlib.sha256(url.encode()).hexdigest()[:16],
                          posixpath.basename(url.rstrip("/")) or "model")
    if os.path.exists(target):
        return target
    fs, path = open_fs(url, resolve_storage({}))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".download-", dir=os.path.dirname(target))
    try:
        local = os.path.join(staging, os.path.basename(target))
        fs.get(path, local, recursive=fs.isdir(path))
        try:
            os.rename(local, target)  # atomic: another worker on this host may have won the race
        except OSError:
            if not os.path.exists(target):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
