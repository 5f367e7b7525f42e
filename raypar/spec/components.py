"""Azure ML components and bindings: YAML whose inputs are *declared*, made into job specs.

A ``type: parallel`` component (``parallelComponent.schema.json``) is a job spec
whose inputs are declarations (``type``, ``description``, ``default``,
``optional``) instead of values. Binding gives each declaration a value: a path
for a data input, a literal for a ``string`` / ``integer`` / ``number`` /
``boolean`` one; the result is validated like any other spec (``spec_from_dict``).
Bindings come in layers, each with the folder its relative paths are relative
to: ``inputs:`` in a YAML file that uses the component (relative to that file),
then ``--set inputs.NAME=VALUE`` (relative to the current directory).

Pure: this module reads YAML files, nothing else.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

import yaml
from pydantic import BaseModel, ConfigDict

from raypar import yamlfile
from raypar.errors import SpecError, UsageError
from raypar.spec.datastores import is_datastore_url
from raypar.spec.loading import check_shape, spec_from_dict
from raypar.spec.models import BINDING_RE, JobSpec
from raypar.storage import is_url

DATA_TYPES = {"uri_folder", "uri_file", "mltable"}
# Azure's model types are folders (or files) to raypar: the entry script gets their path.
MODEL_TYPES = {"custom_model", "mlflow_model", "triton_model"}
LITERAL_TYPES = {"string": str, "integer": int, "number": float, "boolean": bool}
INPUT_TYPES = tuple(sorted(DATA_TYPES | MODEL_TYPES | set(LITERAL_TYPES)))
COMPONENT_SCHEMA = "parallelComponent.schema.json"
# Keys a component has and a job does not (component metadata).
COMPONENT_ONLY_KEYS = ("version",)
# Keys of a file or pipeline step that uses a component, beside the component's own keys.
USE_KEYS = ("type", "component", "inputs", "outputs")

_OPTIONAL_BLOCK_RE = re.compile(r"\$\[\[(.*?)\]\]", re.S)
# inputs.NAME, outputs.NAME (and Azure CLI's NAME.path), jobs.STEP.outputs.NAME of a pipeline step.
_SET_RE = re.compile(r"^(?:jobs\.([A-Za-z_][\w-]*)\.)?(inputs|outputs)\.([A-Za-z_][\w-]*)(\.path)?$")

class InputDeclaration(BaseModel):
    """A declared input of a component or pipeline (Azure's component schema)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal[INPUT_TYPES]  # type: ignore[valid-type]
    description: Optional[str] = None
    default: Any = None
    optional: bool = False
    min: Optional[float] = None
    max: Optional[float] = None
    enum: Optional[list] = None
    mode: Optional[str] = None


class OutputDeclaration(BaseModel):
    """A declared output: its type, mode and (optionally) where it goes."""

    model_config = ConfigDict(extra="forbid")
    type: Optional[str] = None
    mode: Optional[str] = None
    path: Optional[str] = None
    description: Optional[str] = None


Layers = Sequence[tuple[dict, Path]]  # (bindings, the folder their relative paths are relative to)


# -- reading ---------------------------------------------------------------


def read_yaml(path: Union[str, os.PathLike]) -> tuple[Any, Path, str]:
    """The parsed YAML of a file (or ``env:NAME``), its folder and its name for messages."""
    text, base, source = yamlfile.read_source(path)
    return yamlfile.parse(text, source), base, source


def is_component(data: Any) -> bool:
    """A parallel component (declared inputs), or a file that uses one (``component:``)."""
    if not isinstance(data, dict):
        return False
    if data.get("component") is not None:
        return True
    declared = data.get("inputs") if isinstance(data.get("inputs"), dict) else {}
    return data.get("type") == "parallel" and (
        str(data.get("$schema", "")).endswith(COMPONENT_SCHEMA) or any(map(is_declaration, declared.values())))


def is_declaration(value: Any) -> bool:
    """An input declared, not bound: a mapping without ``path`` (``{type: uri_folder}``, ``{type: integer}``)."""
    return isinstance(value, dict) and "path" not in value


def local_or_url(path: str, base: Path, where: str) -> str:
    """``path`` made absolute against ``base``; URLs kept; ``azureml:`` assets refused (as the spec loader does).

    Datastore URLs and ``${{name}}`` / ``${{default_datastore}}`` stay as written: they are
    resolved with the job's name and datastore mapping (:mod:`raypar.datastores`).
    """
    if not isinstance(path, str):
        raise SpecError(f"{where}: a path must be a string, got {path!r}")
    if is_datastore_url(path):
        return path
    if path.startswith("azureml:"):
        raise SpecError(f"{where}: {path!r} is an Azure ML asset reference; give a local path, an fsspec URL "
                        f"or a datastore URL azureml://datastores/<store>/paths/<path>")
    path = path.removeprefix("file://")
    return path if is_url(path) else str((base / os.path.expanduser(path)).resolve())


def parse_sets(items: Sequence[str]) -> dict[str, dict]:
    """``["inputs.data=./d", "outputs.out.path=/o", "jobs.score.outputs.x=/x"]`` →
    ``{"inputs": {"data": "./d"}, "outputs": {"out": "/o"}, "jobs": {"score": {"outputs": {"x": "/x"}}}}``."""
    sets: dict[str, dict] = {"inputs": {}, "outputs": {}, "jobs": {}}
    for item in items or ():
        key, sep, value = item.partition("=")
        match = _SET_RE.match(key.strip())
        if not sep or not match:
            raise UsageError(f"--set {item}: expected inputs.NAME=VALUE, outputs.NAME=PATH or (in a pipeline) "
                             f"jobs.STEP.outputs.NAME=PATH")
        step, kind, name, _ = match.groups()
        if step is not None and kind == "inputs":
            raise UsageError(f"--set {item}: a step's inputs are wired in the pipeline YAML; bind a pipeline "
                             f"input instead (--set inputs.NAME=VALUE)")
        holder = sets if step is None else sets["jobs"].setdefault(step, {"outputs": {}})
        holder[kind][name] = value
    return sets


# -- components ------------------------------------------------------------


def load_component(ref: Any, base: Path, where: str) -> tuple[dict, Path]:
    """The component a ``component:`` key names (``./c.yml`` or ``file:./c.yml``) and its folder.

    An inline component (a mapping) is returned as is, with ``base``.
    """
    if isinstance(ref, dict):
        return ref, base
    if not isinstance(ref, str) or ref.startswith("azureml:"):
        raise SpecError(f"{where}.component: {ref!r}: give the path of a component YAML file "
                        f"(registered azureml: components are not supported)")
    path = Path(local_or_url(ref.removeprefix("file:"), base, f"{where}.component"))
    data, folder, _ = read_yaml(path)
    if not isinstance(data, dict):
        raise SpecError(f"{path}: a component must be a YAML mapping")
    return data, folder


def use_component(component: dict, use: dict) -> dict:
    """The component with the keys a step (or job file) sets beside ``component:`` laid over it.

    Mappings (``resources``, ``retry_settings``, ``task``, ...) merge one level deep.
    """
    merged = dict(component)
    for key, value in use.items():
        if key in USE_KEYS:
            continue
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            value = {**merged[key], **value}
        merged[key] = value
    return merged


def bind_inputs(declared: dict, layers: Layers, where: str, yaml_base: Path) -> dict:
    """Every input of ``declared`` given its value: bound, its default, or dropped when optional.

    Data inputs become ``{type, path[, mode]}`` with absolute paths (URLs kept).

    Raises:
        SpecError: a required input without a value, a binding of no declared input,
            a literal that does not fit its type.
    """
    bound = _layered(declared, layers, f"{where}inputs", "input")
    result = {}
    for name, decl in declared.items():
        key = f"{where}inputs.{name}"
        if name in bound:
            value = _bound_input(decl, *bound[name], key)
        elif decl is None:
            raise SpecError(f"{key}: has no value")
        elif is_declaration(decl):
            value = _unbound_input(decl, yaml_base, key, where)
        else:
            value = _value(decl, yaml_base, key)
        if value is not None:
            result[name] = value
    return result


def _layered(declared: Any, layers: Layers, key: str, noun: str) -> dict[str, tuple[Any, Path]]:
    """The last value each layer binds to a name, with that layer's folder; binding an undeclared name is an error."""
    if not isinstance(declared, dict):
        raise SpecError(f"{key}: must be a mapping")
    bound = {}
    for values, base in layers:
        for name, value in (values or {}).items():
            if name not in declared:
                raise SpecError(f"{key}.{name}: no such {noun} (declared: {', '.join(declared) or 'none'})")
            if value is not None:  # None: left unbound (an optional pipeline input without a value)
                bound[name] = (value, base)
    return bound


def _check_declaration(decl: dict, key: str) -> str:
    return check_shape(InputDeclaration, decl, key).type


def _unbound_input(decl: dict, yaml_base: Path, key: str, where: str):
    kind = _check_declaration(decl, key)
    if "default" in decl and decl["default"] is not None:
        return _typed(decl, decl["default"], yaml_base, key)
    if decl.get("optional"):
        return None
    name = key.rpartition("inputs.")[2]
    how = f"under {where}inputs" if where else f"--set inputs.{name}={'VALUE' if kind in LITERAL_TYPES else 'PATH'}"
    raise SpecError(f"{key}: missing required input '{name}' (bind it: {how})")


def _bound_input(decl: Any, value: Any, base: Path, key: str):
    if is_declaration(decl):
        _check_declaration(decl, key)
        return _typed(decl, value, base, key)
    if isinstance(decl, dict):  # a data input with a path: rebind its path, keep the rest
        path = value.get("path") if isinstance(value, dict) else value
        return {**decl, "path": local_or_url(path, base, key)}
    if isinstance(value, str) and not isinstance(decl, str):
        return yaml.safe_load(value)  # `--set inputs.n=5` for a literal `n: 3`
    return value


def _typed(decl: dict, value: Any, base: Path, key: str):
    """A value for a declared input: a data input's path, or a literal of the declared type."""
    kind = decl["type"]
    if kind in LITERAL_TYPES:
        return _literal(decl, value, key)
    path, mode = (value.get("path"), value.get("mode")) if isinstance(value, dict) else (value, None)
    data = {"type": kind if kind in DATA_TYPES else "uri_folder", "path": local_or_url(path, base, key)}
    if mode or decl.get("mode"):
        data["mode"] = mode or decl["mode"]
    return data


def _literal(decl: dict, value: Any, key: str):
    kind = decl["type"]
    if isinstance(value, dict):
        raise SpecError(f"{key}: a {kind} input takes a value, not a path")
    try:
        if kind == "boolean":
            if isinstance(value, str) and value.lower() in ("true", "false"):
                value = value.lower() == "true"
            elif not isinstance(value, bool):
                raise ValueError
        elif kind == "string":
            value = value if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)
        elif isinstance(value, bool):
            raise ValueError
        else:
            value = LITERAL_TYPES[kind](value)
    except ValueError:
        raise SpecError(f"{key}: {value!r} is not a valid {kind}") from None
    if decl.get("enum") is not None and value not in decl["enum"]:
        raise SpecError(f"{key}: {value!r} is not one of {decl['enum']}")
    for bound, breaks in (("min", lambda v, b: v < b), ("max", lambda v, b: v > b)):
        if decl.get(bound) is not None and kind in ("integer", "number") and breaks(value, decl[bound]):
            raise SpecError(f"{key}: {value} is {'below' if bound == 'min' else 'above'} its {bound} {decl[bound]}")
    return value


def _value(value: Any, base: Path, key: str):
    """An input given as a value in the YAML itself: a literal, or a data input with a path."""
    if isinstance(value, dict):
        return {**value, "path": local_or_url(value["path"], base, f"{key}.path")}
    return value


def bind_outputs(declared: Optional[dict], layers: Layers, where: str, yaml_base: Path,
                 default_root: Optional[str] = None) -> dict:
    """Every output of ``declared`` with its type and path: bound, written in the YAML, or under ``default_root``."""
    declared = declared or {}
    bound = _layered(declared, layers, f"{where}outputs", "output")
    result = {}
    for name, decl in declared.items():
        key = f"{where}outputs.{name}"
        decl = decl or {}
        check_shape(OutputDeclaration, decl, key)
        out = {k: v for k, v in decl.items() if k in ("type", "mode", "description")}
        kind = out.get("type", "uri_folder")
        out["type"] = kind if kind in DATA_TYPES else "uri_folder" if kind in MODEL_TYPES else kind
        if name in bound:
            value, base = bound[name]
            out["path"] = local_or_url(value.get("path") if isinstance(value, dict) else value, base, key)
        elif decl.get("path") is not None:
            out["path"] = local_or_url(decl["path"], yaml_base, key)
        elif default_root is not None:
            out["path"] = f"{default_root.rstrip('/')}/{name}"
        result[name] = out
    return result


def drop_optional_blocks(text: Optional[str], present: set, where: str) -> Optional[str]:
    """Azure's ``$[[ ... ]]``: kept (brackets removed) when every input inside has a value, else dropped."""
    if not text:
        return text

    def block(match) -> str:
        inner = match.group(1)
        refs = [r.partition(".")[2] for r in BINDING_RE.findall(inner) if r.startswith("inputs.")]
        return inner if all(r in present for r in refs) else ""

    text = _OPTIONAL_BLOCK_RE.sub(block, text)
    for ref in BINDING_RE.findall(text):
        kind, _, name = ref.partition(".")
        if kind == "inputs" and name not in present:
            raise SpecError(f"{where}: ${{{{{ref}}}}} has no value (an optional input not bound); "
                            f"put it inside $[[...]] so it is left out")
    return text


def component_job(component: dict, layers_in: Layers, outputs: dict, where: str, base: Path) -> dict:
    """A parallel component with its inputs bound and its ``outputs`` (from :func:`bind_outputs`):
    a job spec as a dict, not validated yet."""
    job = {k: v for k, v in component.items() if k not in COMPONENT_ONLY_KEYS}
    job["inputs"] = bind_inputs(component.get("inputs") or {}, layers_in, where, base)
    job["outputs"] = outputs
    if isinstance(job.get("task"), dict) and job["task"].get("program_arguments"):
        job["task"] = {**job["task"], "program_arguments": drop_optional_blocks(
            job["task"]["program_arguments"], set(job["inputs"]), f"{where}task.program_arguments")}
    return job


def job_from_file(path: Union[str, os.PathLike], sets: Sequence[str] = ()) -> JobSpec:
    """A parallel job, component, or file using a component, with ``--set`` bindings, as a validated JobSpec."""
    data, base, source = read_yaml(path)
    if not isinstance(data, dict):
        return spec_from_dict(data, source=source)  # the loader's own error
    bindings = parse_sets(sets)
    if bindings["jobs"]:
        raise UsageError(f"--set jobs.{next(iter(bindings['jobs']))}...: {source} is a single job, not a pipeline "
                         f"(bind its outputs with --set outputs.NAME=PATH)")
    layers_in, layers_out = [(bindings["inputs"], Path.cwd())], [(bindings["outputs"], Path.cwd())]
    component, folder = data, base
    if data.get("component") is not None:
        component, folder = load_component(data["component"], base, source)
        component = use_component(component, data)
        layers_in.insert(0, (data.get("inputs") or {}, base))
        layers_out.insert(0, (data.get("outputs") or {}, base))
    if component.get("type") != "parallel":
        spec_from_dict(component, source=source)  # "type must be 'parallel'": pipelines are run elsewhere
    try:
        outputs = bind_outputs(component.get("outputs"), layers_out, "", folder)
        job = component_job(component, layers_in, outputs, "", folder)
    except SpecError as exc:
        raise SpecError(f"{source}: {exc.headline}") from None
    return spec_from_dict(job, base_dir=folder, source=source)
