"""Storage helpers shared by every stage: URLs, Azure credentials from the environment, and
publishing an output file whole. The job dir's own store is raypar/jobdir/store.py."""

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


def normalize_path(path: str) -> str:
    """A URL as it is; a local path absolute, ``~`` expanded (how job dirs and outputs are named)."""
    return path if is_url(path) else os.path.realpath(os.path.expanduser(path))
