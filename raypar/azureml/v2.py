"""Azure ML SDK v2's shape: ``parallel_run_function``, ``RunFunction``, ``Input``, ``Output``.

The names, parameters and defaults are ``azure.ai.ml``'s; what they build is a
raypar job spec. ``parallel_run_function(...)`` returns a :class:`ParallelJob`:
calling it with keyword inputs gives a new one with those inputs bound, as a
component does in Azure; ``to_dict()`` is the ``type: parallel`` YAML that
``raypar run`` reads, and ``raypar.run(job)`` runs it.

Local paths are made absolute when they are set, against the working directory
of that moment (Azure resolves them against the working directory too).
"""

from __future__ import annotations

import copy
import inspect
import os
from typing import Any, Optional, Union

import yaml

from raypar.errors import SpecError
from raypar.spec.loading import spec_from_dict
from raypar.storage import is_url


class AssetTypes:
    """Data types of inputs and outputs (``azure.ai.ml.constants.AssetTypes``)."""

    URI_FILE = "uri_file"
    URI_FOLDER = "uri_folder"
    MLTABLE = "mltable"
    MLFLOW_MODEL = "mlflow_model"
    TRITON_MODEL = "triton_model"
    CUSTOM_MODEL = "custom_model"


class InputOutputModes:
    """How data reaches the job (``azure.ai.ml.constants.InputOutputModes``)."""

    MOUNT = "mount"
    DOWNLOAD = "download"
    UPLOAD = "upload"
    RO_MOUNT = "ro_mount"
    RW_MOUNT = "rw_mount"
    EVAL_MOUNT = "eval_mount"
    EVAL_DOWNLOAD = "eval_download"
    DIRECT = "direct"


# Literal (parameter) input types and how a default given as text is read.
LITERAL_TYPES = {"integer": int, "number": float, "string": str, "boolean": lambda v: str(v).lower() == "true"}
# Model assets are folders to raypar: it only substitutes their path into program_arguments.
_MODEL_TYPES = {AssetTypes.MLFLOW_MODEL, AssetTypes.TRITON_MODEL, AssetTypes.CUSTOM_MODEL}


def absolute(path: Union[str, os.PathLike], base_dir: Optional[str] = None) -> str:
    """A local path made absolute against ``base_dir`` (default: the working directory now).

    URLs (``az://...``, ``file://...``) and ``azureml:`` references are kept as written.
    """
    path = os.fspath(path)
    if is_url(path) or path.startswith("azureml:"):
        return path
    return os.path.normpath(os.path.join(base_dir or os.getcwd(), os.path.expanduser(path)))


class _Port:
    """An input or output: its ``path`` becomes absolute when it is set."""

    type: str
    mode: Optional[str]
    description: Optional[str]

    @property
    def path(self) -> Optional[str]:
        return self._path

    @path.setter
    def path(self, value) -> None:
        self._path = None if value is None else absolute(value)

    def _spec_entry(self, mount_mode: str) -> dict:
        kind = AssetTypes.URI_FOLDER if self.type in _MODEL_TYPES else self.type
        mode = mount_mode if self.mode == InputOutputModes.MOUNT else self.mode
        entry = {"type": kind, "path": self.path, "mode": mode, "description": self.description}
        return {k: v for k, v in entry.items() if v is not None}

    def __repr__(self) -> str:
        fields = {"type": self.type, "path": self.path, "mode": self.mode, "default": getattr(self, "default", None)}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in fields.items() if v is not None)})"


class Input(_Port):
    """An input: data (``uri_folder``, ``uri_file``, ``mltable``, a model) or a literal value.

    Literal inputs have type ``integer``, ``number``, ``string`` or ``boolean`` and
    a ``default``. ``min``, ``max``, ``enum``, ``path_on_compute``, ``datastore`` and
    ``intellectual_property`` are accepted and not used.
    """

    def __init__(self, *, type: Optional[str] = None, path=None, mode: Optional[str] = None,
                 path_on_compute: Optional[str] = None, default: Any = None, optional: Optional[bool] = None,
                 min: Any = None, max: Any = None, enum: Any = None, description: Optional[str] = None,
                 datastore: Optional[str] = None, intellectual_property: Any = None):
        self._type_given = type is not None  # a bound Input without a type keeps the declared one
        self.type = type or AssetTypes.URI_FOLDER
        self.path = path
        self.mode = mode
        self.description = description
        self.optional = optional
        if default is not None and not self.is_literal:
            raise ValueError(f"Input of type {self.type!r} has no default value (only literal inputs have one)")
        self.default = default
        # Accepted as in azure-ai-ml, not used by raypar.
        self.path_on_compute, self.datastore, self.intellectual_property = path_on_compute, datastore, \
            intellectual_property
        self.min, self.max, self.enum = min, max, enum

    @property
    def is_literal(self) -> bool:
        return self.type in LITERAL_TYPES

    def value(self):
        """A literal input's value (its default, read as its type); None when it has none."""
        if self.default is None or not isinstance(self.default, str):
            return self.default
        return LITERAL_TYPES[self.type](self.default)


class Output(_Port):
    """An output folder or file. Without a path, raypar puts it under the job dir.

    ``name``, ``version``, ``is_control``, ``early_available`` and ``intellectual_property``
    are accepted and not used.
    """

    def __init__(self, *, type: Optional[str] = None, path=None, mode: Optional[str] = None,
                 description: Optional[str] = None, name: Optional[str] = None, version: Optional[str] = None,
                 is_control: Optional[bool] = None, early_available: Optional[bool] = None,
                 intellectual_property: Any = None):
        self.type = type or AssetTypes.URI_FOLDER
        self.path = path
        self.mode = mode
        self.description = description
        self.name, self.version = name, version
        self.is_control, self.early_available, self.intellectual_property = is_control, early_available, \
            intellectual_property


class RetrySettings:
    """Retries of a failed or timed-out mini-batch: ``max_retries`` (v2 counts retries; default 2)
    and ``timeout`` seconds per ``run()`` call (default 60)."""

    def __init__(self, *, timeout: Optional[int] = None, max_retries: Optional[int] = None):
        self.timeout = timeout
        self.max_retries = max_retries

    def to_dict(self) -> dict:
        return {k: v for k, v in (("max_retries", self.max_retries), ("timeout", self.timeout)) if v is not None}


BatchRetrySettings = RetrySettings  # azure-ai-ml's other name for it


class RunFunction:
    """The task: ``entry_script`` in the ``code`` folder, its ``program_arguments``, ``append_row_to``.

    Without ``code``, the entry script's own folder is the code folder. ``model`` is accepted and
    not used; ``environment`` is read as ``task.environment`` is (pip packages of its conda file).
    """

    def __init__(self, *, code=None, entry_script: Optional[str] = None, program_arguments: Optional[str] = None,
                 model: Any = None, append_row_to: Optional[str] = None, environment: Any = None):
        if code is None and entry_script is not None:
            code, entry_script = os.path.split(absolute(entry_script))
        self.code = None if code is None else absolute(code)
        self.entry_script = entry_script
        self.program_arguments = program_arguments
        self.model = model
        self.append_row_to = append_row_to
        self.environment = _plain_environment(environment)

    def to_dict(self) -> dict:
        task = {"type": "run_function", "code": self.code, "entry_script": self.entry_script,
                "program_arguments": self.program_arguments, "append_row_to": self.append_row_to,
                "environment": self.environment}
        return {k: v for k, v in task.items() if v is not None}


class Environment:
    """``azure.ai.ml.entities.Environment``: an image and/or a conda file, as the job's ``environment``.

    raypar reads the ``pip:`` list of ``conda_file`` (see docs/azureml-sdk.md); ``image`` is
    accepted and not used on Ray. ``conda_file`` is kept as given (a relative path is read
    against the working directory when the job is built, and ``dump()`` writes it relative).
    """

    def __init__(self, *, name: Optional[str] = None, version: Optional[str] = None, image: Optional[str] = None,
                 conda_file=None, description: Optional[str] = None, tags: Optional[dict] = None,
                 build: Any = None, properties: Optional[dict] = None, **kwargs):
        self.name, self.version, self.image, self.description = name, version, image, description
        self.conda_file = None if conda_file is None else os.fspath(conda_file)
        self.tags, self.build, self.properties = tags, build, properties

    def __repr__(self) -> str:
        return f"Environment(name={self.name!r}, image={self.image!r}, conda_file={self.conda_file!r})"


class JobResourceConfiguration:
    """``azure.ai.ml.entities.JobResourceConfiguration``: ``node.resources.instance_count = 2`` works."""

    def __init__(self, *, instance_count: Optional[int] = None, instance_type: Optional[str] = None,
                 shm_size: Optional[str] = None, docker_args: Optional[str] = None, properties: Any = None,
                 locations: Any = None, max_instance_count: Optional[int] = None, **kwargs):
        self.instance_count, self.instance_type, self.shm_size = instance_count, instance_type, shm_size
        self.docker_args, self.properties, self.locations = docker_args, properties, locations
        self.max_instance_count = max_instance_count

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in _RESOURCE_KEYS if getattr(self, k) is not None}

    def __repr__(self) -> str:
        return f"JobResourceConfiguration({self.to_dict()!r})"


def _plain_environment(environment):
    """An environment as YAML: a string or mapping as given, an Environment object by its fields."""
    if environment is None or isinstance(environment, str):
        return environment
    if isinstance(environment, dict):
        environment = dict(environment)
    else:
        fields = ("name", "version", "image", "conda_file")
        environment = {k: getattr(environment, k) for k in fields if getattr(environment, k, None) is not None}
    if isinstance(environment.get("conda_file"), (str, os.PathLike)):
        environment["conda_file"] = absolute(environment["conda_file"])
    return environment


def _plain(value):
    """Accepted-and-ignored values (identity, tags) as YAML: objects become their type name."""
    if value is None or isinstance(value, (str, int, float, bool, list, dict)):
        return value
    return {"type": str(getattr(value, "type", None) or type(value).__name__)}


_RESOURCE_KEYS = ("instance_count", "max_instance_count", "instance_type", "shm_size", "docker_args", "properties",
                  "locations")


def parallel_run_function(
    *,
    name: Optional[str] = None,
    description: Optional[str] = None,
    tags: Optional[dict] = None,
    properties: Optional[dict] = None,
    display_name: Optional[str] = None,
    experiment_name: Optional[str] = None,
    compute: Optional[str] = None,
    retry_settings: Union[RetrySettings, dict, None] = None,
    environment_variables: Optional[dict] = None,
    logging_level: Optional[str] = None,
    max_concurrency_per_instance: Optional[int] = None,
    error_threshold: Optional[int] = None,
    mini_batch_error_threshold: Optional[int] = None,
    task: Optional[RunFunction] = None,
    mini_batch_size: Union[str, int, None] = None,
    partition_keys: Optional[list] = None,
    input_data: Optional[str] = None,
    inputs: Optional[dict] = None,
    outputs: Optional[dict] = None,
    instance_count: Optional[int] = None,
    instance_type: Optional[str] = None,
    docker_args: Optional[str] = None,
    shm_size: Optional[str] = None,
    identity: Any = None,
    is_deterministic: bool = True,
    resources: Any = None,
    environment: Any = None,
    raypar: Optional[dict] = None,
) -> "ParallelJob":
    """A parallel job, with azure-ai-ml's parameters and defaults.

    Unset settings take Azure's v2 defaults (1 instance, 1 worker per instance, 2 retries,
    60 s timeout, thresholds -1, ``INFO``, 10 files per mini-batch). ``raypar`` is the
    ``raypar:`` block of the spec (worker resources, output format, ...). ``tags``,
    ``properties``, ``display_name``, ``experiment_name``, ``compute``, ``identity``,
    ``is_deterministic``, ``instance_type``, ``docker_args`` and ``shm_size`` are accepted and
    ignored, as the spec's Azure-only keys are.

    Returns:
        A :class:`ParallelJob`; call it with keyword inputs to bind them.
    """
    return ParallelJob(**locals())


_SETTINGS = tuple(inspect.signature(parallel_run_function).parameters)
_RESOURCE_SETTINGS = ("instance_count", "instance_type", "docker_args", "shm_size")


def _resources_object(given) -> JobResourceConfiguration:
    """``resources`` as a JobResourceConfiguration: None, a dict or an object with its attributes."""
    if isinstance(given, JobResourceConfiguration):
        return given
    if given is None:
        return JobResourceConfiguration()
    if isinstance(given, dict):
        unknown = sorted(set(given) - set(_RESOURCE_KEYS))
        if unknown:
            raise TypeError(f"resources: unknown key(s) {', '.join(unknown)}")
        return JobResourceConfiguration(**given)
    return JobResourceConfiguration(**{k: getattr(given, k) for k in _RESOURCE_KEYS
                                       if getattr(given, k, None) is not None})


# Pipelines being built by @pipeline (raypar.azureml.dsl): a called job is a node of the innermost one.
_BUILDERS: list = []


class _Ports(dict):
    """``job.inputs`` / ``job.outputs``: a dict whose entries are also attributes (``job.inputs.data.mode = ...``)."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


class _Node:
    """A job that becomes a pipeline step when it is called inside ``@pipeline``: ``inputs`` and ``outputs``
    are :class:`_Ports`; calling it binds inputs (subclasses: :class:`ParallelJob`, ``components.Component``)."""

    inputs: _Ports
    outputs: _Ports

    def __call__(self, **inputs) -> "_Node":
        """A copy of this job with ``inputs`` bound (a component called in a pipeline, in Azure)."""
        bound = copy.deepcopy(self)
        for key, value in inputs.items():
            bound.inputs[key] = self._bind(key, value)
        if _BUILDERS:
            _BUILDERS[-1].add_node(bound)
        return bound

    def _bind(self, key: str, value):
        if key not in self.inputs:
            known = ", ".join(self.inputs) or "none"
            raise TypeError(f"{self._label} got an unexpected input {key!r} (its inputs: {known})")
        declared = self.inputs[key]
        binding = _BUILDERS[-1].binding_of(value) if _BUILDERS else None
        if binding is not None:  # a pipeline input or another node's output: wired by the pipeline
            if not isinstance(declared, Input) or declared.is_literal:
                return binding
            bound = copy.copy(declared)
            bound._path = binding
            return bound
        if isinstance(declared, Input) and not declared.is_literal:
            if not isinstance(value, (Input, str, os.PathLike)) or (isinstance(value, Input) and value.is_literal):
                raise TypeError(f"input {key!r} is data ({declared.type}): give a path or an Input, "
                                f"not {type(value).__name__}")
            bound = copy.copy(declared)
            if isinstance(value, Input):
                bound._path = value.path  # already absolute, against the working directory it was made in
                bound.type = value.type if value._type_given else declared.type
                bound.mode = value.mode or declared.mode
            else:
                bound.path = value
            return bound
        if isinstance(value, Input):
            value = value.value()
        if not isinstance(value, (bool, int, float, str)):
            raise TypeError(f"input {key!r} is a literal value: give a number, a string or a boolean, "
                            f"not {type(value).__name__}")
        return value


class ParallelJob(_Node):
    """A parallel job built in Python; the settings are :func:`parallel_run_function`'s parameters.

    ``job(name=value, ...)`` returns a copy with those inputs bound: a path or an
    :class:`Input` for a data input, a value for a literal one. ``to_dict()`` /
    ``to_yaml()`` / ``dump(path)`` give the spec; ``raypar.run(job)`` runs it.
    """

    def __init__(self, **settings):
        unknown = sorted(set(settings) - set(_SETTINGS))
        if unknown:
            raise TypeError(f"ParallelJob() got unexpected keyword argument(s): {', '.join(unknown)}")
        settings = {key: settings.get(key) for key in _SETTINGS}
        if settings["is_deterministic"] is None:
            settings["is_deterministic"] = True
        settings["resources"] = _resources_object(settings["resources"])
        for key in _RESOURCE_SETTINGS:  # one home for them: job.resources (azure-ai-ml does the same)
            value = settings.pop(key)
            if value is not None:
                setattr(settings["resources"], key, value)
        object.__setattr__(self, "_settings", settings)
        self.inputs = _Ports(settings.pop("inputs") or {})
        self.outputs = _Ports(settings.pop("outputs") or {})

    def __getattr__(self, key):
        settings = self.__dict__.get("_settings", {})
        if key in settings:
            return settings[key]
        if key in _RESOURCE_SETTINGS and "resources" in settings:
            return getattr(settings["resources"], key)
        raise AttributeError(f"{type(self).__name__} has no attribute {key!r}")

    def __setattr__(self, key, value):
        if key == "resources":
            self._settings[key] = _resources_object(value)
        elif key in _RESOURCE_SETTINGS:
            setattr(self._settings["resources"], key, value)
        elif key in self._settings:
            self._settings[key] = value
        elif key in ("inputs", "outputs"):
            object.__setattr__(self, key, _Ports(value or {}))
        else:
            raise AttributeError(f"{type(self).__name__} has no setting {key!r}")

    def __repr__(self) -> str:
        return f"ParallelJob(name={self.name!r}, inputs={dict(self.inputs)!r})"

    # -- the spec ----------------------------------------------------------

    def to_dict(self) -> dict:
        """The ``type: parallel`` spec as a dict (paths absolute), as raypar's spec loader reads it.

        Raises:
            SpecError: a data input has no path, or a literal input no value.
        """
        s = self._settings
        retry = s["retry_settings"]
        retry = retry.to_dict() if isinstance(retry, RetrySettings) else retry
        data = {
            "type": "parallel", "name": s["name"], "display_name": s["display_name"],
            "description": s["description"], "inputs": self._spec_inputs(),
            "outputs": {k: v._spec_entry(InputOutputModes.RW_MOUNT) if isinstance(v, Output) else v
                        for k, v in self.outputs.items()},
            "input_data": s["input_data"], "mini_batch_size": s["mini_batch_size"],
            "partition_keys": s["partition_keys"], "resources": self._resources(),
            "max_concurrency_per_instance": s["max_concurrency_per_instance"],
            "error_threshold": s["error_threshold"], "mini_batch_error_threshold": s["mini_batch_error_threshold"],
            "logging_level": s["logging_level"], "retry_settings": retry,
            "environment_variables": s["environment_variables"],
            "task": s["task"].to_dict() if isinstance(s["task"], RunFunction) else s["task"],
            # Azure-only: accepted and ignored.
            "tags": _plain(s["tags"]), "properties": _plain(s["properties"]),
            "experiment_name": s["experiment_name"], "compute": s["compute"], "identity": _plain(s["identity"]),
            "is_deterministic": s["is_deterministic"], "environment": _plain_environment(s["environment"]),
            "raypar": s["raypar"],
        }
        return {k: v for k, v in data.items() if v is not None and v != {}}

    def _spec_inputs(self) -> dict:
        result = {}
        for key, item in self.inputs.items():
            if not isinstance(item, Input):
                result[key] = item
            elif item.is_literal:
                if item.value() is not None:
                    result[key] = item.value()
                elif not item.optional:
                    raise SpecError(f"{self._label}: inputs.{key} has no value: bind one, job({key}=...)")
            elif item.path is not None:
                result[key] = item._spec_entry(InputOutputModes.RO_MOUNT)
            elif not item.optional:
                raise SpecError(f"{self._label}: inputs.{key} has no path: bind it, job({key}=Input(path=...))")
        return result

    @property
    def _label(self) -> str:
        return f"parallel job {self.name!r}" if self.name else "parallel job"

    def _resources(self) -> dict:
        return self._settings["resources"].to_dict()

    def to_spec(self):
        """The validated :class:`raypar.spec.JobSpec` (raises :class:`raypar.errors.SpecError`)."""

        return spec_from_dict(self.to_dict(), source=self._label)

    def to_yaml(self, relative_to: Optional[str] = None) -> str:
        """The spec as YAML, checked first; local paths inside ``relative_to`` are written relative to it."""
        self.to_spec()
        data = self.to_dict()
        if relative_to is not None:
            data = relative_paths(data, relative_to)
        return yaml.safe_dump(data, sort_keys=False, width=10**6)  # one line per value, however long

    def dump(self, path: Union[str, os.PathLike]) -> str:
        """Write the spec YAML to ``path`` (paths inside its folder relative to it); returns the path."""
        path = absolute(path)
        text = self.to_yaml(relative_to=os.path.dirname(path))
        with open(path, "w") as f:
            f.write(text)
        return path


def relative_paths(data: dict, folder: str) -> dict:
    """The spec dict with the local paths that lie inside ``folder`` relative to it (as ``./x``)."""
    folder = os.path.abspath(folder)

    def rel(p: str) -> str:
        if is_url(p) or not os.path.isabs(p) or os.path.commonpath([p, folder]) != folder:
            return p
        return "./" + os.path.relpath(p, folder) if p != folder else "."

    data = copy.deepcopy(data)
    for entry in [*data.get("inputs", {}).values(), *data.get("outputs", {}).values()]:
        if isinstance(entry, dict) and isinstance(entry.get("path"), str):
            entry["path"] = rel(entry["path"])
    if isinstance(data.get("task", {}).get("code"), str):
        data["task"]["code"] = rel(data["task"]["code"])
    for holder in (data.get("task", {}), data):
        environment = holder.get("environment")
        if isinstance(environment, dict) and isinstance(environment.get("conda_file"), str):
            environment["conda_file"] = rel(environment["conda_file"])
    return data
