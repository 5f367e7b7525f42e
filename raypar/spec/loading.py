"""Reading a spec: YAML (a file, a string, ``env:NAME``) or a dict, validated, its local paths made absolute.

Relative paths are relative to the YAML file's folder, as Azure reads them;
``azureml://datastores/...`` paths resolve through the spec's datastores.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

from pydantic import BaseModel, ValidationError

from raypar import yamlfile
from raypar.errors import SpecError
from raypar.spec import datastores
from raypar.spec.models import JobSpec
from raypar.storage import is_url


def load_spec(path: Union[str, os.PathLike]) -> JobSpec:
    """Read and validate a spec file; relative paths become relative to its folder.

    ``env:NAME`` reads the YAML from the environment variable NAME instead
    (how ``raypar submit`` hands a spec to its driver); its relative paths are
    relative to the working directory.

    Raises:
        SpecError: with one line naming the file and the problem.
    """
    text, base, source = yamlfile.read_source(path, "spec file")
    return spec_from_yaml(text, base_dir=base, source=source)


def spec_from_yaml(text: str, base_dir: Union[str, Path, None] = None, source: str = "spec") -> JobSpec:
    """Parse and validate spec YAML text."""
    return spec_from_dict(yamlfile.parse(text, source), base_dir=base_dir, source=source)


def spec_from_dict(data: Any, base_dir: Union[str, Path, None] = None, source: str = "spec") -> JobSpec:
    """Validate a spec given as a dict; ``base_dir`` anchors relative paths."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a job spec must be a YAML mapping, got {type(data).__name__}")
    if data.get("type") != "parallel":
        got = data.get("type")
        raise SpecError(f"{source}: type must be 'parallel' (got {got!r}); raypar runs Azure ML parallel jobs")
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(f"{source}: {describe_validation_error(exc)}") from None
    try:
        return absolutize(spec, Path(base_dir) if base_dir else Path.cwd())
    except SpecError as exc:
        raise SpecError(f"{source}: {exc.headline}") from None


def check_shape(model: type[BaseModel], data: Any, where: str, hints: Optional[dict] = None) -> BaseModel:
    """``data`` validated against a pydantic model of a YAML block's shape; otherwise one line
    naming ``where`` and the key, with the hint of the block the first problem is in."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        line = describe_validation_error(exc)
        loc = exc.errors()[0]["loc"]
        hint = (hints or {}).get(loc[0] if loc else None)
        line += f" ({hint})" if hint else ""
        raise SpecError(f"{where}: {line}" if where else line) from None


def describe_validation_error(exc: ValidationError) -> str:
    """The first pydantic error as one line that names the key."""
    errors = exc.errors()
    first = errors[0]
    where = ".".join(str(p) for p in first["loc"] if not _is_union_tag(p))
    if first["type"] == "extra_forbidden":
        line = f"unknown key '{first['loc'][-1]}'" + (f" at {where}" if "." in where else "")
    elif first["type"] == "missing":
        line = f"missing required key '{where}'"
    else:
        msg = first["msg"].removeprefix("Value error, ")
        line = f"{where}: {msg}" if where else msg
    if len(errors) > 1:
        line += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return line


def _is_union_tag(part) -> bool:
    # pydantic adds the union member's type name to the location; users never wrote it.
    return isinstance(part, str) and part in {"InputSpec", "bool", "int", "float", "str"}


def map_local_paths(spec: JobSpec, fn) -> JobSpec:
    """The spec with ``fn`` applied to every path it holds: inputs, outputs, task.code, the
    conda files of ``task.environment`` / ``environment`` and a requirements file."""
    data = spec.to_dict()
    for item in [*data.get("inputs", {}).values(), *data.get("outputs", {}).values()]:
        if isinstance(item, dict) and item.get("path") is not None:
            item["path"] = fn(item["path"])
    data["task"]["code"] = fn(data["task"]["code"])
    for holder in (data["task"], data):
        environment = holder.get("environment")
        if isinstance(environment, dict) and isinstance(environment.get("conda_file"), str):
            environment["conda_file"] = fn(environment["conda_file"])
    runtime_env = data.get("raypar", {}).get("runtime_env", {})
    if isinstance(runtime_env.get("pip"), str):  # a requirements file
        runtime_env["pip"] = fn(runtime_env["pip"])
    models = data.get("raypar", {}).get("models", {})
    for name, path in models.items():
        models[name] = fn(path)
    stores = data.get("raypar", {}).get("datastores", {})
    for name, path in stores.items():
        if path not in stores:  # an alias names another entry, not a path
            stores[name] = fn(path)
    return JobSpec.model_validate(data)


def absolutize(spec: JobSpec, base_dir: Path) -> JobSpec:
    """Make every local path in the spec absolute; URLs are left alone.

    ``${{name}}`` and ``${{default_datastore}}`` are filled, and datastore URLs
    (``azureml://datastores/<store>/paths/<path>``) become the folder or URL their
    store is mapped to (``raypar.datastores`` over ``RAYPAR_DATASTORES``).
    """
    stores = None

    def fix(p: str) -> str:
        nonlocal stores
        if datastores.has_placeholders(p) or datastores.is_datastore_url(p):
            if stores is None:
                stores = datastores.merged(spec.raypar.datastores)
            p = datastores.resolve(p, spec.name or "job", stores)
        if p.startswith("azureml:"):
            raise SpecError(
                f"path {p!r} is an Azure ML asset reference; give a local path or an fsspec URL instead"
            )
        if p.startswith("file://"):
            p = p[len("file://"):]
        if is_url(p):
            return p
        return str((base_dir / os.path.expanduser(p)).resolve())

    return map_local_paths(spec, fix)


def relocate_code(spec: JobSpec, code_dir: str) -> JobSpec:
    """The spec with ``task.code`` at ``code_dir``; local paths inside the old ``task.code`` move with it.

    A submitted job runs the copy of ``task.code`` Ray unpacked on the cluster, while
    its job dir keeps the spec as the user wrote it (so it resumes from anywhere).
    """
    old, new = spec.task.code.rstrip("/"), str(Path(code_dir).resolve())

    def move(p: str) -> str:
        if is_url(p) or not (p == old or p.startswith(old + "/")):
            return p
        return new + p[len(old):]

    return map_local_paths(spec, move)


def as_spec(spec: Union[str, os.PathLike, dict, JobSpec]) -> JobSpec:
    """A spec from what the API accepts: a JobSpec, a dict, a job built in Python, or a path to YAML."""
    if isinstance(spec, JobSpec):
        return spec
    if isinstance(spec, dict):
        return spec_from_dict(spec)
    if hasattr(spec, "to_spec"):  # a job built in Python (raypar.azureml: ParallelJob, ParallelRunStep)
        return spec.to_spec()
    if hasattr(spec, "to_dict"):
        return spec_from_dict(spec.to_dict())
    return load_spec(spec)


def changed_keys(old, new, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two spec dicts (what makes a job dir hold another job)."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return [prefix or "spec"] if old != new else []
    changed = []
    for key in [*old, *(k for k in new if k not in old)]:
        changed += changed_keys(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else str(key))
    return changed
