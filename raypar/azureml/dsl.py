"""Azure ML SDK v2's ``@pipeline`` (``azure.ai.ml.dsl.pipeline``): a Python function as a ``type: pipeline`` job.

Calling a decorated function builds a :class:`PipelineJob`: the function runs
once with placeholders for its parameters; each job it calls
(``parallel_run_function``'s result, a component from ``load_component`` or
``command(...)``, :mod:`raypar.azureml.components`) becomes a step, named
after the local variable that holds it, as Azure names them; passing a
parameter or a step's output to another step wires it
(``${{parent.inputs.X}}``, ``${{parent.jobs.S.outputs.Y}}``); the returned dict
names the pipeline's outputs. ``to_dict()`` is the same ``type: pipeline``
mapping a pipeline YAML holds, and :mod:`raypar.pipelines.loading` /
:mod:`raypar.pipelines.run` plan and run it (``MLClient.jobs.create_or_update``,
``raypar.azureml.client``).
"""

from __future__ import annotations

import copy
import functools
import inspect
import re
import sys
from typing import Any, Callable, Optional

import yaml

from raypar.azureml.components import LITERAL_OF, Component
from raypar.azureml.v2 import _BUILDERS, Input, Output, _Node, _Ports, absolute

_PROVISIONAL = re.compile(r"parent\.jobs\.(__node\d+__)\.")


class _Settings:
    """``pipeline_job.settings``: ``default_compute`` and friends, accepted (Azure-only on Ray)."""

    def __init__(self, **given):
        vars(self).update(given)

    def to_dict(self) -> dict:
        return {k: v for k, v in vars(self).items() if v is not None}


class _Builder:
    """The nodes a pipeline function creates, and what each wiring object stands for."""

    def __init__(self):
        self.nodes: list[_Node] = []
        self.parameters: dict[int, str] = {}  # id(placeholder) -> ${{parent.inputs.X}}

    def add_node(self, node: _Node) -> None:
        object.__setattr__(node, "_node_id", f"__node{len(self.nodes)}__")
        self.nodes.append(node)

    def output_of(self, value) -> Optional[tuple[_Node, str]]:
        for node in self.nodes:
            for name, out in node.outputs.items():
                if out is value:
                    return node, name
        return None

    def binding_of(self, value) -> Optional[str]:
        if id(value) in self.parameters:
            return self.parameters[id(value)]
        found = self.output_of(value)
        if found is not None:
            return f"${{{{parent.jobs.{found[0]._node_id}.outputs.{found[1]}}}}}"
        return None


class _Parameter(Input):
    """A pipeline parameter inside the function body (its value is bound when the pipeline runs)."""


def _parameter(value) -> _Parameter:
    """The placeholder of a pipeline parameter, of its value's type (``command()`` declares inputs by it)."""
    if isinstance(value, Input):
        return _Parameter(type=value.type)
    return _Parameter(type=LITERAL_OF.get(type(value)))


def pipeline(func: Optional[Callable] = None, *, name: Optional[str] = None, version: Optional[str] = None,
             display_name: Optional[str] = None, description: Optional[str] = None,
             experiment_name: Optional[str] = None, tags: Optional[dict] = None, **kwargs):
    """``@pipeline`` / ``@pipeline(...)``: see the module docstring.

    ``default_compute``, ``default_datastore``, ``continue_on_step_failure`` and other keyword
    settings are accepted and kept in ``settings`` (they have no meaning on Ray).
    """

    def decorate(function: Callable) -> Callable[..., "PipelineJob"]:
        @functools.wraps(function)
        def build(*args, **inputs) -> PipelineJob:
            bound = inspect.signature(function).bind(*args, **inputs)
            bound.apply_defaults()
            return _build(function, dict(bound.arguments), name=name or function.__name__,
                          display_name=display_name, description=description or inspect.getdoc(function),
                          experiment_name=experiment_name, tags=tags, settings=kwargs)

        return build

    return decorate(func) if func is not None else decorate


def _build(function: Callable, values: dict, **fields) -> "PipelineJob":
    builder = _Builder()
    placeholders = {}
    for key in values:
        placeholders[key] = _parameter(values[key])
        builder.parameters[id(placeholders[key])] = f"${{{{parent.inputs.{key}}}}}"
    _BUILDERS.append(builder)
    try:
        returned, local_names = _call_keeping_locals(function, placeholders)
    finally:
        _BUILDERS.pop()
    if returned is not None and not isinstance(returned, dict):
        raise TypeError(f"@pipeline {function.__name__}: return a dict of pipeline outputs "
                        f"(name -> a step's output), not {type(returned).__name__}")
    outputs = {}
    for out_name, value in (returned or {}).items():
        found = builder.output_of(value)
        if found is None:
            raise TypeError(f"@pipeline {function.__name__}: output {out_name!r} is not the output of a step")
        outputs[out_name] = found
    names = _node_names(builder.nodes, local_names)
    return PipelineJob(values, builder.nodes, names, outputs, **fields)


def single_step(node: _Node) -> "PipelineJob":
    """A component node submitted alone (``command(...)``, a loaded component called with inputs):
    a pipeline of that one step, whose outputs are the pipeline's."""
    node = copy.deepcopy(node)
    object.__setattr__(node, "_node_id", "__node0__")
    name = re.sub(r"[^A-Za-z0-9_-]", "_", node.name or node.type or "job")
    return PipelineJob({}, [node], {"__node0__": name}, {key: (node, key) for key in node.outputs}, name=name,
                       display_name=node.display_name, description=node.description)


def _call_keeping_locals(function: Callable, inputs: dict) -> tuple[Any, dict]:
    """The function's result and its local variables at return (the names Azure gives steps)."""
    captured: dict = {}
    code = function.__code__

    def profile(frame, event, arg):
        if event == "return" and frame.f_code is code:
            captured.update(frame.f_locals)

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        returned = function(**inputs)
    finally:
        sys.setprofile(previous)
    return returned, captured


def _node_names(nodes: list, local_names: dict) -> dict:
    """Step name per node: its local variable, else its job name, made unique."""
    by_id = {id(v): k for k, v in local_names.items() if isinstance(v, _Node)}
    names: dict[str, str] = {}
    used: set = set()
    for index, node in enumerate(nodes):
        base = by_id.get(id(node)) or node.name or f"node_{index}"
        base = re.sub(r"[^A-Za-z0-9_-]", "_", base)
        name, n = base, 1
        while name in used:
            n += 1
            name = f"{base}_{n}"
        used.add(name)
        names[node._node_id] = name
    return names


class PipelineJob:
    """A pipeline built by ``@pipeline``: ``inputs``, ``outputs`` (set ``.type`` / ``.path`` on them),
    ``settings``, ``jobs`` (step name -> node); ``to_dict()`` / ``to_yaml()`` / ``dump(path)``."""

    def __init__(self, values: dict, nodes: list, names: dict, outputs: dict, *, name: str,
                 display_name=None, description=None, experiment_name=None, tags=None, settings=None):
        self.name, self.display_name, self.description = name, display_name, description
        self.experiment_name, self.tags = experiment_name, tags
        self.settings = _Settings(**(settings or {}))
        self.inputs = _Ports(values)
        self.jobs = {names[node._node_id]: node for node in nodes}
        self._names = names
        self._bound_outputs = outputs  # pipeline output -> (node, its output)
        self.outputs = _Ports({key: Output(type=node.outputs[out].type, path=node.outputs[out].path,
                                           mode=node.outputs[out].mode)
                               for key, (node, out) in outputs.items()})

    def __repr__(self) -> str:
        return f"PipelineJob(name={self.name!r}, jobs={list(self.jobs)!r})"

    def to_dict(self) -> dict:
        """The ``type: pipeline`` mapping (local paths absolute), as a pipeline YAML holds it."""
        jobs = {}
        for step, node in self.jobs.items():
            data = node.to_step() if isinstance(node, Component) else _ParallelStep(node).to_dict()
            for key, (owner, out) in self._bound_outputs.items():
                if owner is node:
                    data.setdefault("outputs", {})[out] = {"path": f"${{{{parent.outputs.{key}}}}}"}
            jobs[step] = data
        data = {"type": "pipeline", "name": self.name, "display_name": self.display_name,
                "description": self.description, "experiment_name": self.experiment_name, "tags": self.tags,
                "settings": self.settings.to_dict() or None, "inputs": self._inputs(),
                "outputs": {k: v._spec_entry("rw_mount") for k, v in self.outputs.items()} or None,
                "jobs": _rename(jobs, self._names)}
        return {k: v for k, v in data.items() if v is not None}

    def _inputs(self) -> Optional[dict]:
        result = {}
        for key, value in self.inputs.items():
            if isinstance(value, Input):
                result[key] = value.value() if value.is_literal else value._spec_entry("ro_mount")
            elif value is not None:
                result[key] = value if isinstance(value, (bool, int, float, str)) else str(value)
        return result or None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, width=10**6)

    def dump(self, path) -> str:
        """Write the pipeline YAML to ``path``; returns the path."""

        path = absolute(path)
        with open(path, "w") as f:
            f.write(self.to_yaml())
        return path


class _ParallelStep:
    """A node as a pipeline step: its inputs may be ``${{parent...}}`` bindings, its unbound inputs left out."""

    def __init__(self, node):
        self.node = copy.copy(node)
        object.__setattr__(self.node, "_settings", dict(node._settings))
        self.node.inputs = {k: v for k, v in node.inputs.items() if not _unbound(v)}

    def to_dict(self) -> dict:
        return self.node.to_dict()


def _unbound(value) -> bool:
    return isinstance(value, Input) and value.optional and value.path is None and value.default is None


def _rename(value, names: dict):
    """Provisional node IDs in bindings replaced by step names."""
    if isinstance(value, dict):
        return {k: _rename(v, names) for k, v in value.items()}
    if isinstance(value, list):
        return [_rename(v, names) for v in value]
    if isinstance(value, str):
        return _PROVISIONAL.sub(lambda m: f"parent.jobs.{names[m.group(1)]}.", value)
    return value
