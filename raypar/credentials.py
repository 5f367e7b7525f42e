"""Storage credentials: read from the environment, handed to workers in memory, never written.

A spec names secrets only as ``$VAR`` references (spec.RayparSpec checks it),
because the job dir keeps a copy of the spec. The driver resolves them once
into ``storage`` -- ``{protocol: fsspec options}`` -- and passes that to its
workers with their plan: workers of a remote cluster do not share the
driver's environment. ``redact`` scrubs those values from any text raypar
writes (errors, reports, state).
"""

from __future__ import annotations

import os
import re
from typing import Any, Optional

import fsspec

from raypar.errors import SpecError
from raypar.storage import (
    _PACKAGE_FOR_PROTOCOL,
    azure_options_from_env,
    gcs_options_from_env,
    is_url,
    s3_options_from_env,
)

_AZURE = ("az", "abfs", "abfss")
_S3 = ("s3", "s3a")
_GCS = ("gs", "gcs")
# Option names that hold secrets: a spec may only give them as $VAR references.
SECRET_WORDS = ("key", "secret", "token", "password", "sas", "connection_string", "credential")
_ENV_REF_RE = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$|^\$([A-Za-z_][A-Za-z0-9_]*)$")
_SECRET_PATTERNS = [
    re.compile(r"(AccountKey=)[^;\s'\"]+", re.IGNORECASE),
    re.compile(r"(SharedAccessSignature=)[^;\s'\"]+", re.IGNORECASE),
    re.compile(r"([?&]sig=)[^&\s'\"]+", re.IGNORECASE),
]


def resolve_storage(spec_options: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{protocol: options}`` with every ``$VAR`` replaced by its value from the environment.

    Azure protocols without options in the spec get them from the standard
    ``AZURE_STORAGE_*`` variables, S3 and GCS from ``AWS_*`` and the Google variables
    (under the spec's own), so workers on other nodes can authenticate too.
    """
    storage: dict[str, dict[str, Any]] = {}
    for protocol, options in spec_options.items():
        resolved = {}
        for key, value in options.items():
            name = env_reference(value) if isinstance(value, str) else None
            if name is not None:
                if name not in os.environ:
                    raise SpecError(f"raypar.storage_options.{protocol}.{key}: environment variable {name} is not set")
                value = os.environ[name]
            resolved[key] = value
        storage[protocol] = resolved
    azure = next((storage[p] for p in _AZURE if p in storage), None)
    if azure is None:
        azure = azure_options_from_env()
    for protocol in _AZURE:
        storage.setdefault(protocol, azure)
    # S3 and GCS: the variables fill what the spec leaves out (an endpoint in the spec, keys in
    # the environment); Azure's spec options replace its variables (their precedence is adlfs's).
    for family, from_env in ((_S3, s3_options_from_env), (_GCS, gcs_options_from_env)):
        given, from_variables = next((storage[p] for p in family if p in storage), {}), from_env()
        for protocol in family:
            storage[protocol] = {**from_variables, **storage.get(protocol, given)}
    return storage


def env_reference(value: str) -> Optional[str]:
    """The variable a ``$NAME`` / ``${NAME}`` value names, or None for a literal."""
    match = _ENV_REF_RE.match(value.strip()) if isinstance(value, str) else None
    return (match.group(1) or match.group(2)) if match else None


def protocol_of(url: str) -> str:
    return url.split("://", 1)[0].lower() if is_url(url) else "file"


def options_for(url: str, storage: Optional[dict]) -> dict:
    """The fsspec options for ``url``'s protocol (empty for local paths)."""
    return dict((storage or {}).get(protocol_of(url), {}))


def open_fs(url: str, storage: Optional[dict]):
    """``(filesystem, path)`` for a local path or URL; a missing package is named."""
    protocol = protocol_of(url)
    try:
        return fsspec.core.url_to_fs(url, **options_for(url, storage))
    except ImportError:
        package = _PACKAGE_FOR_PROTOCOL.get(protocol)
        hint = f"pip install {package}" if package else f"install the fsspec package for '{protocol}://'"
        raise SpecError(f"{redact(url)}: no filesystem for '{protocol}://' is installed; {hint}") from None
    except ValueError as exc:
        if "Protocol not known" in str(exc):
            raise SpecError(f"{redact(url)}: unknown storage protocol '{protocol}://'") from None
        raise SpecError(f"{redact(url)}: {redact(str(exc))}") from None


def secret_values(storage: Optional[dict]) -> list[str]:
    values = []
    for options in (storage or {}).values():
        for key, value in options.items():
            if isinstance(value, str) and len(value) >= 6 and any(w in key.lower() for w in SECRET_WORDS):
                values.append(value)
    return values


def redact(text: str, storage: Optional[dict] = None) -> str:
    """``text`` with known secret values and secret-looking URL or connection-string parts masked."""
    for value in sorted(set(secret_values(storage)), key=len, reverse=True):
        text = text.replace(value, "***")
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(r"\1***", text)
    return text


def describe_error(exc: BaseException, storage: Optional[dict] = None) -> str:
    """One redacted line for an error from storage (Azure SDK messages run over many lines)."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    name = type(exc).__name__
    if refused_credentials(exc):
        first = "authentication failed: check the storage credentials (AZURE_STORAGE_* or raypar.storage_options)"
    return redact(f"{name}: {first}" if first else name, storage)


def refused_credentials(exc: BaseException) -> bool:
    """True when the storage refused the credentials themselves (a wrong key or signature), as
    opposed to a right the credentials lack."""
    return any(sign in str(exc) for sign in ("AuthenticationFailed", "failed to authenticate", "AuthorizationFailure")) \
        or type(exc).__name__ == "ClientAuthenticationError"
