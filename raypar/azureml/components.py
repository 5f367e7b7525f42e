"""Azure ML SDK v2's ``load_component`` and ``command``: command and parallel components as ``@pipeline`` nodes.

``load_component(source="./src/prepare_data.yml")`` reads a ``type: command``
or ``type: parallel`` component YAML; ``command(...)`` builds a command
component in Python. Either is a :class:`Component`: calling it with inputs
gives a node (a step, inside ``@pipeline``) whose ``outputs`` wire into other
nodes' inputs, as ``parallel_run_function`` jobs do. A node becomes a
component step of the ``type: pipeline`` YAML (``component: FILE`` or an
inline mapping, with ``inputs:`` and ``outputs:`` bindings), so
:mod:`raypar.pipelines.loading` binds and checks it as it does a YAML pipeline's, and
:mod:`raypar.pipelines.run` runs a command step locally, in its code folder.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from raypar.azureml.v2 import (
    _BUILDERS,
    LITERAL_TYPES,
    Input,
    JobResourceConfiguration,
    Output,
    _Node,
    _plain_environment,
    _Ports,
    absolute,
)
from raypar.errors import SpecError
from raypar.spec.components import read_yaml

COMPONENT_TYPES = ("command", "parallel")
# Python values given as command() inputs, and the literal type each declares.
LITERAL_OF = {bool: "boolean", int: "integer", float: "number", str: "string"}
# Attributes every node answers (None when the component does not set them).
_COMMON = ("name", "display_name", "description", "version", "tags", "type")


class Component(_Node):
    """A command or parallel component; ``component(name=value, ...)`` is a node with those inputs bound.

    ``inputs`` / ``outputs`` hold the declarations (``Input`` / ``Output``): set ``.mode``,
    ``.type`` or an output's ``.path`` on a node's, as in Azure. Other attributes set on a
    node (``node.compute = ...``, ``node.environment_variables = {...}``,
    ``node.resources.instance_count = 2`` on a parallel one) are laid over the component's
    keys in the step; what a step of its type does not take is one line when the pipeline is
    submitted (``jobs.STEP: unknown key ...``).
    """

    def __init__(self, data: dict, source: Any):
        object.__setattr__(self, "_data", data)
        object.__setattr__(self, "_source", source)  # the YAML file's absolute path, or the mapping itself
        object.__setattr__(self, "_overrides", {})
        self.inputs = _Ports({k: _declared_input(v, k, self._label) for k, v in (data.get("inputs") or {}).items()})
        self.outputs = _Ports({k: _declared_output(v) for k, v in (data.get("outputs") or {}).items()})

    def __getattr__(self, key):
        if key.startswith("_"):
            raise AttributeError(key)
        if key in self._overrides:
            return self._overrides[key]
        if key == "resources":  # node.resources.instance_count = 2
            resources = JobResourceConfiguration(**(self._data.get("resources") or {}))
            self._overrides["resources"] = resources
            return resources
        if key in self._data or key in _COMMON:
            return self._data.get(key)
        raise AttributeError(f"{self._label} has no attribute {key!r}")

    def __setattr__(self, key, value):
        if key in ("inputs", "outputs"):
            object.__setattr__(self, key, _Ports(value or {}))
        elif key.startswith("_"):
            object.__setattr__(self, key, value)
        else:
            self._overrides[key] = value

    @property
    def _label(self) -> str:
        kind = self._data.get("type")
        return f"{kind} component {self._data['name']!r}" if self._data.get("name") else f"{kind} component"

    def __repr__(self) -> str:
        return f"Component(type={self.type!r}, name={self.name!r}, inputs={dict(self.inputs)!r})"

    def to_step(self) -> dict:
        """The node as a pipeline step: ``component:`` with its ``inputs`` / ``outputs`` bindings and overrides."""
        step = {"component": self._source, "inputs": {}, "outputs": {}}
        for key, item in self.inputs.items():
            if not isinstance(item, Input):  # a bound literal, or a ${{parent...}} binding
                step["inputs"][key] = item
            elif item.is_literal and item.value() is not None:
                step["inputs"][key] = item.value()
            elif not item.is_literal and item.path is not None:
                step["inputs"][key] = item._spec_entry("ro_mount")
            # else unbound: the component's default applies, or the pipeline names the missing input
        for key, out in self.outputs.items():
            step["outputs"][key] = out._spec_entry("rw_mount")
        for key, value in self._overrides.items():
            if key == "environment":
                value = _plain_environment(value)
            step[key] = value.to_dict() if hasattr(value, "to_dict") else value
        return step


def _declared_input(decl: Any, key: str, label: str) -> Input:
    """A YAML input declaration as an ``Input`` (data defaults stay in the YAML, where their folder is known)."""
    if not isinstance(decl, dict):
        raise SpecError(f"{label}: inputs.{key}: must be a declaration ({{type: ...}})")
    kind = decl.get("type")
    literal = kind in LITERAL_TYPES
    return Input(type=kind, mode=decl.get("mode"), optional=decl.get("optional"),
                 description=decl.get("description"), default=decl.get("default") if literal else None,
                 min=decl.get("min"), max=decl.get("max"), enum=decl.get("enum"))


def _declared_output(decl: Any) -> Output:
    decl = decl if isinstance(decl, dict) else {}
    return Output(type=decl.get("type"), mode=decl.get("mode"), description=decl.get("description"))


def load_component(source=None, *, relative_origin: Optional[str] = None, params_override: Optional[list] = None,
                   **kwargs) -> Component:
    """``azure.ai.ml.load_component``: a ``type: command`` or ``type: parallel`` component YAML file.

    ``relative_origin`` and ``params_override`` are accepted and not used.

    Raises:
        SpecError: not a file, not YAML, ``azureml:`` (registered) components, other component types.
    """

    if source is None or not isinstance(source, (str, os.PathLike)):
        raise SpecError(f"load_component: give the path of a component YAML file, not {type(source).__name__}")
    if os.fspath(source).startswith("azureml:"):
        raise SpecError(f"load_component: {source}: registered azureml: components are not supported; "
                        f"load the component's YAML file")
    path = absolute(source)
    data, _, _ = read_yaml(path)
    if not isinstance(data, dict):
        raise SpecError(f"{path}: a component must be a YAML mapping")
    if data.get("type") not in COMPONENT_TYPES:
        raise SpecError(f"{path}: type {data.get('type')!r}: raypar loads command and parallel components")
    return Component(data, path)


def command(*, name: Optional[str] = None, display_name: Optional[str] = None, description: Optional[str] = None,
            command: Optional[str] = None, code=None, inputs: Optional[dict] = None, outputs: Optional[dict] = None,
            environment_variables: Optional[dict] = None, environment: Any = None, compute: Optional[str] = None,
            tags: Optional[dict] = None, experiment_name: Optional[str] = None, is_deterministic: bool = True,
            **kwargs) -> Component:
    """``azure.ai.ml.command``: a command node; inside ``@pipeline``, a step.

    ``inputs`` are declared and bound at once: an ``Input`` (with or without a path), a pipeline
    parameter, another node's output, or a number, string or boolean. The command runs with
    ``/bin/sh`` in ``code`` (default: the working directory now). ``environment``, ``compute``,
    ``distribution``, ``resources``, ``instance_count`` and the other Azure-only keywords are
    accepted and ignored.
    """
    if not isinstance(command, str) or not command.strip():
        raise SpecError("command(): give command='...' (the shell command to run)")
    declared, values = {}, {}
    for key, value in (inputs or {}).items():
        declared[key], values[key] = _declaration_of(key, value), value
    data = {"type": "command", "name": name, "display_name": display_name, "description": description,
            "command": command, "code": absolute(code if code is not None else os.getcwd()),
            "environment_variables": environment_variables, "inputs": declared,
            "outputs": {k: _output_declaration(k, v) for k, v in (outputs or {}).items()},
            "tags": tags, "is_deterministic": is_deterministic}
    data = {k: v for k, v in data.items() if v is not None}
    component = Component(data, data)
    for key, value in (outputs or {}).items():
        if isinstance(value, Output) and value.path is not None:
            component.outputs[key].path = value.path
    for key, value in {"environment": environment, "compute": compute}.items():
        if value is not None:
            setattr(component, key, value)
    return component(**{k: v for k, v in values.items() if not _declaration_only(v)})


def _declaration_of(key: str, value: Any) -> dict:
    """The declaration a ``command()`` input implies: its ``Input``'s type, an output's, a literal's."""
    if isinstance(value, (Input, Output)):
        entry = {"type": value.type, "optional": getattr(value, "optional", None), "description": value.description}
        return {k: v for k, v in entry.items() if v is not None}
    if type(value) in LITERAL_OF:
        return {"type": LITERAL_OF[type(value)]}
    raise SpecError(f"command(): inputs.{key}: give an Input, another node's output or a number, string or "
                    f"boolean, not {type(value).__name__}")


def _declaration_only(value: Any) -> bool:
    """An ``Input`` with nothing to bind (``Input(type="uri_folder")``), unless it stands for a pipeline input."""
    bound_by_pipeline = bool(_BUILDERS) and _BUILDERS[-1].binding_of(value) is not None
    return isinstance(value, Input) and not bound_by_pipeline and value.path is None and value.default is None


def _output_declaration(key: str, value: Any) -> dict:
    if value is None:
        return {"type": "uri_folder"}
    if not isinstance(value, Output):
        raise SpecError(f"command(): outputs.{key}: give an Output, not {type(value).__name__}")
    return {k: v for k, v in {"type": value.type, "mode": value.mode}.items() if v is not None}
