"""Credentials: resolved from the environment, never from literals in the spec, and scrubbed
from any text raypar writes."""

import pytest

from raypar.credentials import describe_error, open_fs, options_for, redact, resolve_storage
from raypar.errors import SpecError
from raypar.spec.models import RayparSpec


def test_env_references_are_resolved_and_azure_defaults_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("MY_KEY", "s3cr3t-value")
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", "DefaultEndpointsProtocol=http;AccountName=a;AccountKey=k0")
    storage = resolve_storage({"s3": {"key": "${MY_KEY}", "endpoint_url": "http://127.0.0.1:9"}})
    assert storage["s3"] == {"key": "s3cr3t-value", "endpoint_url": "http://127.0.0.1:9"}
    assert options_for("az://c/p", storage) == {"connection_string": storage["az"]["connection_string"]}
    assert storage["abfs"] == storage["az"]
    assert options_for("/local/path", storage) == {}


def test_a_missing_variable_names_it(monkeypatch):
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    with pytest.raises(SpecError, match=r"raypar.storage_options.az.account_key: environment variable "
                                        r"NOT_SET_ANYWHERE is not set"):
        resolve_storage({"az": {"account_name": "a", "account_key": "$NOT_SET_ANYWHERE"}})


@pytest.mark.parametrize("key", ["account_key", "sas_token", "connection_string", "client_secret", "secret"])
def test_literal_secrets_are_refused_in_specs(key):
    with pytest.raises(ValueError, match=f"az.{key}: secrets are not written in specs"):
        RayparSpec(storage_options={"az": {key: "literal"}})


def test_a_protocol_without_its_package_names_the_package():
    with pytest.raises(SpecError, match=r"s3://bucket/x: no filesystem for 's3://' is installed; pip install s3fs"):
        open_fs("s3://bucket/x", {})  # s3fs is not a raypar dependency


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
