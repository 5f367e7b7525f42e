"""Storage helpers shared by every stage: URLs, Azure credentials from the environment, and
publishing an output file whole. The job dir's own store is raypar/jobdir/store.py."""

from __future__ import annotations

import json
import os
import re
import tempfile
import uuid
from collections.abc import Mapping
from contextlib import contextmanager, suppress
from typing import Optional

import fsspec
from fsspec.implementations.local import LocalFileSystem

from raypar.held_upload import open_held


def is_url(path: str) -> bool:
    """True for ``scheme://...`` paths (fsspec URLs); False for local paths."""
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", path))


_PACKAGE_FOR_PROTOCOL = {
    "az": "'raypar[azure]'", "abfs": "'raypar[azure]'", "abfss": "'raypar[azure]'",
    "s3": "'raypar[s3]'", "s3a": "'raypar[s3]'", "gs": "'raypar[gcs]'", "gcs": "'raypar[gcs]'",
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


def s3_options_from_env(env: Optional[Mapping] = None) -> dict:
    """s3fs options from the standard ``AWS_*`` variables; {} when none is set.

    botocore reads the same variables itself, but only in the process that has them: the
    driver hands these options to workers on other nodes. Keys go together (an access key id
    without its secret is not passed on); without keys, each node uses its own chain
    (``~/.aws``, an instance role).
    """
    env = os.environ if env is None else env
    options: dict = {}
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        options.update(key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"])
        if env.get("AWS_SESSION_TOKEN"):
            options["token"] = env["AWS_SESSION_TOKEN"]
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["endpoint_url"] = endpoint
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        options["client_kwargs"] = {"region_name": region}
    return options


def gcs_options_from_env(env: Optional[Mapping] = None) -> dict:
    """gcsfs options from the standard Google variables; {} when none is set.

    ``STORAGE_EMULATOR_HOST`` (an emulator, no auth) wins; else the key file that
    ``GOOGLE_APPLICATION_CREDENTIALS`` names is read here, so workers on nodes without that
    file authenticate with its contents; ``GOOGLE_CLOUD_PROJECT`` names the project.
    Without them, each node uses its own (the metadata server, ``gcloud`` login).
    """
    env = os.environ if env is None else env
    options: dict = {}
    if env.get("STORAGE_EMULATOR_HOST"):
        options.update(endpoint_url=env["STORAGE_EMULATOR_HOST"], token="anon")
    elif env.get("GOOGLE_APPLICATION_CREDENTIALS"):
        path = env["GOOGLE_APPLICATION_CREDENTIALS"]
        try:
            with open(path) as f:
                options["token"] = json.load(f)
        except (OSError, ValueError):
            pass  # gcsfs names the unreadable file itself, and only to a job that uses gs://
    if env.get("GOOGLE_CLOUD_PROJECT"):
        options["project"] = env["GOOGLE_CLOUD_PROJECT"]
    return options


def atomic_output(url: str, storage_options: Optional[dict] = None):
    """A binary file handle whose content appears at ``url`` whole, or not at all."""
    return atomic_file(*fsspec.core.url_to_fs(url, **(storage_options or {})))


@contextmanager
def atomic_file(fs, path: str):
    """A binary file handle whose content appears at ``path`` of ``fs`` whole, or not at all."""
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
    held = open_held(fs, path)
    if held is not None:  # uploaded while written, published by commit() only
        try:
            yield held
            held.close()
            held.commit()
        except BaseException:
            with suppress(Exception):
                held.discard()
            raise
        return
    # Elsewhere staged in a local temp file, then one upload: an fsspec write handle left open by
    # an exception may still commit what it holds when garbage-collected.
    with tempfile.TemporaryDirectory(prefix="raypar-output-") as folder:
        staged = os.path.join(folder, os.path.basename(path) or "output")
        with open(staged, "wb") as f:
            yield f
        fs.put_file(staged, path)


def normalize_path(path: str) -> str:
    """A URL as it is; a local path absolute, ``~`` expanded (how job dirs and outputs are named)."""
    return path if is_url(path) else os.path.realpath(os.path.expanduser(path))
