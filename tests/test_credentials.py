"""Credentials: resolved from the environment, never from literals in the spec, and scrubbed
from any text raypar writes."""

import json
import os

import pytest

from raypar.credentials import describe_error, open_fs, options_for, redact, resolve_storage
from raypar.errors import SpecError
from raypar.spec.models import RayparSpec


def clear_storage_variables(monkeypatch):
    for name in list(os.environ):
        if name.startswith(("AWS_", "AZURE_STORAGE_", "GOOGLE_")) or name == "STORAGE_EMULATOR_HOST":
            monkeypatch.delenv(name)


def test_env_references_are_resolved_and_azure_defaults_come_from_the_environment(monkeypatch):
    clear_storage_variables(monkeypatch)
    monkeypatch.setenv("MY_KEY", "s3cr3t-value")
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", "DefaultEndpointsProtocol=http;AccountName=a;AccountKey=k0")
    storage = resolve_storage({"s3": {"key": "${MY_KEY}", "endpoint_url": "http://127.0.0.1:9"}})
    assert storage["s3"] == {"key": "s3cr3t-value", "endpoint_url": "http://127.0.0.1:9"}
    assert options_for("az://c/p", storage) == {"connection_string": storage["az"]["connection_string"]}
    assert storage["abfs"] == storage["az"]
    assert options_for("/local/path", storage) == {}


def test_s3_options_come_from_the_aws_variables_under_the_specs_own(monkeypatch):
    clear_storage_variables(monkeypatch)
    assert resolve_storage({})["s3"] == {}  # nothing set: each node's own chain
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    assert resolve_storage({})["s3"] == {}  # a key id without its secret is not passed on
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "FwoGZXIvYXdz")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    storage = resolve_storage({"s3": {"endpoint_url": "https://minio.internal:9000"}})
    assert storage["s3"] == storage["s3a"] == {
        "key": "AKIDEXAMPLE", "secret": "wJalrXUtnFEMI", "token": "FwoGZXIvYXdz",
        "endpoint_url": "https://minio.internal:9000",  # the spec's own wins
        "client_kwargs": {"region_name": "eu-west-1"}}
    assert "wJalrXUtnFEMI" not in redact("refused: wJalrXUtnFEMI", storage)


def test_gcs_options_come_from_the_google_variables(monkeypatch, tmp_path):
    clear_storage_variables(monkeypatch)
    key_file = tmp_path / "sa.json"
    key = {"type": "service_account", "client_email": "raypar@example.iam.gserviceaccount.com"}
    key_file.write_text(json.dumps(key))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key_file))
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "scoring")
    # The key file's contents travel: a worker's node need not have the file.
    assert resolve_storage({})["gs"] == resolve_storage({})["gcs"] == {"token": key, "project": "scoring"}
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    assert resolve_storage({})["gs"] == {"project": "scoring"}  # left to gcsfs, which names the file
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9023")
    assert resolve_storage({})["gs"] == {"endpoint_url": "http://127.0.0.1:9023", "token": "anon",
                                         "project": "scoring"}


def test_a_missing_variable_names_it(monkeypatch):
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    with pytest.raises(SpecError, match=r"raypar.storage_options.az.account_key: environment variable "
                                        r"NOT_SET_ANYWHERE is not set"):
        resolve_storage({"az": {"account_name": "a", "account_key": "$NOT_SET_ANYWHERE"}})


@pytest.mark.parametrize("key", ["account_key", "sas_token", "connection_string", "client_secret", "secret"])
def test_literal_secrets_are_refused_in_specs(key):
    with pytest.raises(ValueError, match=f"az.{key}: secrets are not written in specs"):
        RayparSpec(storage_options={"az": {key: "literal"}})


def test_a_protocol_without_its_package_names_the_package(monkeypatch):
    from fsspec.registry import _registry, known_implementations

    # s3fs comes with the test extra: take it out of fsspec's sight, as on a machine without it.
    monkeypatch.setitem(known_implementations, "s3",
                        {"class": "raypar_absent_s3fs.S3FileSystem", "err": "Install s3fs"})
    monkeypatch.delitem(_registry, "s3", raising=False)
    with pytest.raises(SpecError, match=r"s3://bucket/x: no filesystem for 's3://' is installed; "
                                        r"pip install 'raypar\[s3\]'"):
        open_fs("s3://bucket/x", {})
    with pytest.raises(SpecError, match=r"oci://bucket/x: no filesystem for 'oci://' is installed; "
                                        r"install the fsspec package for 'oci://'"):
        open_fs("oci://bucket/x", {})  # a protocol raypar has no extra for


def test_redact_masks_known_values_and_secret_shaped_parts():
    storage = {"az": {"account_key": "abcdef123456", "account_name": "acct"}}
    text = ("failed with key abcdef123456 at https://acct.blob.core.windows.net/c/x?sv=1&sig=SIGNATURE "
            "using AccountKey=OTHERKEY;EndpointSuffix=core")
    out = redact(text, storage)
    assert "abcdef123456" not in out and "SIGNATURE" not in out and "OTHERKEY" not in out
    assert "acct" in out  # names are not secrets


def test_describe_error_is_one_line_and_names_auth_failures():
    exc = RuntimeError("Server failed to authenticate the request.\nRequestId:1\nTime:2")
    line = describe_error(exc)
    assert "\n" not in line and "authentication failed" in line
