"""Azure ML datastore URLs, ``azureml://datastores/<store>/paths/<path>``, resolved through a mapping.

Azure resolves a datastore name through its workspace. raypar has none, so the
user maps each datastore once, to a local folder or an fsspec URL, in either place:

- ``raypar.datastores`` in the job spec (or at the top of a pipeline YAML):
  ``{workspaceblobstore: az://container/prefix}``; relative paths are relative to
  the YAML, as every spec path is;
- the ``RAYPAR_DATASTORES`` environment variable: a JSON object, or the path of a
  YAML or JSON file holding one (relative paths inside are relative to that file;
  in inline JSON, to the working directory).

The spec wins per name. ``${{default_datastore}}`` names the ``default`` entry
(or, without one, ``workspaceblobstore``, Azure's default datastore); an entry's
value may be another entry's name of the same mapping (``default: workspaceblobstore``).

Path strings also get ``${{name}}`` filled: the job's name (a pipeline step's
name; for a pipeline's own outputs, the pipeline's). Azure fills it with the
run's generated name; here it is stable, so a re-run writes to the same place.

Pure: reads the environment and the mapping file, nothing else.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping, Optional

import yaml

from raypar.errors import SpecError
from raypar.storage import is_url

ENV = "RAYPAR_DATASTORES"
DEFAULT = "default"
AZURE_DEFAULT = "workspaceblobstore"  # what ${{default_datastore}} is on a fresh Azure workspace

# The short form and the long one Azure also accepts (subscription, resource group, workspace).
_URL_RE = re.compile(
    r"^azureml://(?:subscriptions/[^/]+/resource[gG]roups/[^/]+/(?:providers/Microsoft\.MachineLearningServices/)?"
    r"workspaces/[^/]+/)?datastores/([^/]+)/paths(?:/(.*))?$")
_PLACEHOLDER_RE = re.compile(r"\$\{\{\s*([^}]*?)\s*\}\}")


def is_datastore_url(path) -> bool:
    """True for ``azureml://datastores/<store>/paths/<path>`` (placeholders not filled yet included)."""
    return isinstance(path, str) and bool(_URL_RE.match(path))


def has_placeholders(path) -> bool:
    return isinstance(path, str) and "${{" in path


def read_mapping(text: Optional[str], where: str, base: Path) -> dict[str, str]:
    """A mapping from JSON or YAML text; relative folder paths made absolute against ``base``."""
    if not text or not text.strip():
        return {}
    try:
        mapping = yaml.safe_load(text)  # JSON is YAML
    except yaml.YAMLError:
        mapping = None
    return absolute(check(mapping, where), base)


def check(mapping, where: str) -> dict[str, str]:
    """``mapping`` if it maps datastore names to non-empty strings; else a one-line SpecError."""
    if not isinstance(mapping, dict) or not all(isinstance(k, str) and k and "/" not in k and isinstance(v, str) and v
                                                for k, v in mapping.items()):
        raise SpecError(f"{where}: expected a mapping of datastore name -> folder or URL, such as "
                        f"{{\"workspaceblobstore\": \"az://container/prefix\"}}")
    return mapping


def absolute(mapping: Mapping[str, str], base: Path) -> dict[str, str]:
    """Relative folders made absolute against ``base``; URLs and aliases (another entry's name) kept."""
    return {name: target if is_url(target) or target in mapping
            else str((base / os.path.expanduser(target)).resolve())
            for name, target in mapping.items()}


def env_mapping(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """``RAYPAR_DATASTORES``: inline JSON, or the path of a YAML/JSON file."""
    value = (environ.get(ENV) or "").strip()
    if not value:
        return {}
    if value.startswith("{"):
        return read_mapping(value, ENV, Path.cwd())
    path = Path(os.path.expanduser(value))
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(f"{ENV}={value}: not JSON and not a readable file ({exc.strerror or exc})") from None
    return read_mapping(text, f"{ENV} file {value}", path.parent.resolve())


def merged(spec_mapping: Optional[Mapping[str, str]], environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The environment's mapping overlaid by the spec's (already absolute)."""
    return {**env_mapping(environ), **(spec_mapping or {})}


def fill(text: str, name: str) -> str:
    """``${{name}}`` and ``${{default_datastore}}`` in a path; any other ``${{...}}`` is an error."""
    def value(match) -> str:
        key = match.group(1)
        if key == "name":
            return name
        if key == "default_datastore":
            return DEFAULT
        raise SpecError(f"{text}: ${{{{{key}}}}} in a path: raypar fills ${{{{name}}}} and "
                        f"${{{{default_datastore}}}} there (bindings are whole values: ${{{{parent...}}}})")

    return _PLACEHOLDER_RE.sub(value, text)


def resolve(path: str, name: str, mapping: Mapping[str, str]) -> str:
    """``path`` with its placeholders filled and a datastore URL replaced by the mapped location."""
    if not isinstance(path, str) or not (has_placeholders(path) or path.startswith("azureml://")):
        return path
    text = fill(path, name)
    match = _URL_RE.match(text)
    if not match:
        return text
    store, rest = match.group(1), match.group(2) or ""
    target = _lookup(store, mapping, path)
    return f"{target.rstrip('/')}/{rest}" if rest else target


def _lookup(store: str, mapping: Mapping[str, str], url: str) -> str:
    seen = []
    while store in mapping or (store == DEFAULT and AZURE_DEFAULT in mapping):
        seen.append(store)
        target = mapping[store] if store in mapping else mapping[AZURE_DEFAULT]
        if target not in mapping:
            return target
        if target in seen:
            raise SpecError(f"{url}: datastore names that name each other in a loop: {' -> '.join(seen + [target])}")
        store = target  # an alias: default -> workspaceblobstore
    known = ", ".join(sorted(mapping)) or "none"
    if store == DEFAULT:
        raise SpecError(f"{url}: the default datastore is not mapped (mapped: {known}); map it once: "
                        f"raypar.datastores: {{{DEFAULT}: az://container/folder}} (or {AZURE_DEFAULT}, Azure's default) "
                        f"in the spec, or {ENV}='{{\"{DEFAULT}\": \"/local/folder\"}}'")
    raise SpecError(f"{url}: datastore {store!r} is not mapped (mapped: {known}); map it once: raypar.datastores: "
                    f"{{{store}: az://container/folder}} in the spec, or {ENV}='{{\"{store}\": \"/local/folder\"}}'")
