"""Azure ML SDK v1's shape: ``ParallelRunConfig`` + ``ParallelRunStep``, converted to a v2 job.

The parameters, defaults and checks are azureml-pipeline-steps'. ``to_v2()``
converts with Azure's own mapping (the v1 → v2 migration guide): ``run_max_try``
counts tries, v2's ``max_retries`` retries, so ``max_retries = run_max_try - 1``;
``allowed_failed_percent`` becomes ``--allowed_failed_percent`` in
``program_arguments``; ``allowed_failed_count`` becomes ``mini_batch_error_threshold``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from typing import Any, Optional

from raypar.azureml.v1_data import (
    Dataset,
    DatasetInput,
    OutputFileDatasetConfig,
    PipelineData,
    PipelineParameter,
    value_of,
)
from raypar.azureml.v2 import Input, Output, ParallelJob, RetrySettings, RunFunction, absolute, parallel_run_function
from raypar.spec.models import APPEND_ROW_FILE_NAME

# The v1 names in one place: `from raypar.azureml.v1 import ParallelRunStep, Dataset, PipelineData`.
__all__ = ["ParallelRunConfig", "ParallelRunStep", "Dataset", "OutputFileDatasetConfig", "PipelineData",
           "PipelineParameter", "RESERVED_ARGUMENTS"]

# Argument names the v1 driver passes itself: a step's own arguments may not use them.
RESERVED_ARGUMENTS = ("mini_batch_size", "error_threshold", "allowed_failed_count", "allowed_failed_percent",
                      "output", "output_action", "logging_level", "process_count_per_node",
                      "run_invocation_timeout", "run_max_try", "append_row_file_name", "partition_keys")
_STEP_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_BINDING = re.compile(r"^\$\{\{\s*(inputs|outputs)\.[^}]+\}\}$")


def _int_at_least(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} {value!r} is not an int value greater than or equal to {low}")


class ParallelRunConfig:
    """The settings of a ParallelRunStep, as ``azureml.pipeline.steps.ParallelRunConfig``.

    ``entry_script``, ``error_threshold``, ``output_action`` and ``node_count`` are required.
    ``environment`` and ``compute_target`` are accepted and ignored (the Ray cluster's Python
    environment runs the job). A setting may be a :class:`PipelineParameter`: its default is used.
    """

    def __init__(self, environment=None, entry_script: Optional[str] = None, error_threshold=None,
                 output_action: Optional[str] = None, compute_target=None, node_count=None,
                 process_count_per_node=None, mini_batch_size=None, source_directory: Optional[str] = None,
                 description: Optional[str] = None, logging_level="INFO", run_invocation_timeout=60,
                 run_max_try=3, append_row_file_name: Optional[str] = None, allowed_failed_count=None,
                 allowed_failed_percent=None, partition_keys=None, environment_variables: Optional[dict] = None):
        missing = [k for k, v in (("entry_script", entry_script), ("error_threshold", error_threshold),
                                  ("output_action", output_action), ("node_count", node_count)) if v is None]
        if missing:
            raise TypeError(f"ParallelRunConfig() missing required argument(s): {', '.join(missing)}")
        self.environment = environment  # ignored
        self.compute_target = compute_target  # ignored
        self.entry_script = entry_script.strip()
        self.source_directory = None if source_directory is None else absolute(source_directory.strip())
        # Without a source directory the script may be anywhere: its path is relative to the working directory now.
        self._script_path = absolute(self.entry_script) if source_directory is None else None
        self.error_threshold = value_of(error_threshold)
        self.output_action = output_action.lower()
        self.node_count = value_of(node_count)
        self.process_count_per_node = value_of(process_count_per_node)
        self.mini_batch_size = value_of(mini_batch_size)
        self.description = description
        self.logging_level = value_of(logging_level) or "INFO"
        self.run_invocation_timeout = value_of(run_invocation_timeout)
        self.run_max_try = value_of(run_max_try)
        self.append_row_file_name = append_row_file_name
        self.allowed_failed_count = value_of(allowed_failed_count)
        self.allowed_failed_percent = value_of(allowed_failed_percent)
        self.partition_keys = _partition_keys(value_of(partition_keys))
        self.environment_variables = environment_variables
        self._validate()

    def _validate(self) -> None:
        if self.output_action not in ("append_row", "summary_only"):
            raise ValueError("Parameter output_action must be summary_only or append_row")
        _int_at_least("error_threshold", self.error_threshold, -1)
        if self.allowed_failed_count is not None:
            _int_at_least("allowed_failed_count", self.allowed_failed_count, -1)
        percent = self.allowed_failed_percent
        if percent is not None and (isinstance(percent, bool) or not isinstance(percent, (int, float))
                                    or not 0 <= percent <= 100):
            raise ValueError(f"allowed_failed_percent {percent!r} is not a number between 0 and 100")
        size = self.mini_batch_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, (int, str))
                                 or isinstance(size, str) and not re.match(r"^\d+([kKmMgG][bB])*$", size)):
            raise ValueError(r"Parameter mini_batch_size must be an int or follow regex rule ^\d+([kKmMgG][bB])*$")
        if size is not None and self.partition_keys is not None:
            raise ValueError("partition_keys and mini_batch_size cannot be used together")
        _int_at_least("node_count", self.node_count, 1)
        for name in ("process_count_per_node", "run_invocation_timeout", "run_max_try"):
            if getattr(self, name) is not None:
                _int_at_least(name, getattr(self, name), 1)
        if self.append_row_file_name is not None and re.search(r'[~"#%&*:<>?/\\{|}]', self.append_row_file_name):
            raise ValueError("Parameter append_row_file_name must be a valid UNIX file name")

    def code_and_script(self) -> tuple[str, str]:
        """``task.code`` and ``task.entry_script``: without a source directory, the script's folder is the code."""
        if self.source_directory is not None:
            return self.source_directory, self.entry_script
        folder, script = os.path.split(self._script_path)
        return folder, script


def _partition_keys(keys) -> Optional[list]:
    # v1 pipeline parameters carry partition_keys as a JSON string.
    if isinstance(keys, str):
        try:
            keys = json.loads(keys)
        except json.JSONDecodeError:
            raise ValueError(f"partition_keys {keys!r} is not a JSON list of key names") from None
    if keys is not None and (not isinstance(keys, list) or not all(isinstance(k, str) for k in keys)):
        raise ValueError(f"partition_keys {keys!r} must be a list of key names")
    return keys


class ParallelRunStep:
    """A step that runs ``parallel_run_config`` over ``inputs``, as ``azureml.pipeline.steps.ParallelRunStep``.

    ``inputs`` holds one dataset (raypar splits one input per job): a path, an :class:`Input`
    or a :class:`Dataset` stand-in. ``side_inputs`` are given to the script whole; ``output`` is a
    path, an :class:`Output`, ``PipelineData`` or ``OutputFileDatasetConfig``. ``arguments`` may
    hold these objects (or ``${{inputs.NAME}}`` strings): they become their paths. ``allow_reuse``
    is accepted and ignored. ``raypar`` is the spec's ``raypar:`` block (a raypar extension).
    """

    def __init__(self, name: str, parallel_run_config: ParallelRunConfig, inputs: list, output=None,
                 side_inputs: Optional[list] = None, arguments: Optional[list] = None, allow_reuse: bool = True,
                 *, raypar: Optional[dict] = None):
        if not isinstance(name, str) or not 3 <= len(name) <= 32 or not _STEP_NAME.match(name):
            raise ValueError(f"step name {name!r} must have 3-32 characters and follow regex rule "
                             f"^[a-z]([-a-z0-9]*[a-z0-9])?$")
        if not isinstance(parallel_run_config, ParallelRunConfig):
            raise TypeError("parallel_run_config must be a raypar ParallelRunConfig")
        if not isinstance(inputs, list) or len(inputs) != 1:
            raise ValueError("inputs must be a list of one input: raypar splits one input per job "
                             "(run one job per dataset, or put the files under one folder)")
        if arguments is not None and not isinstance(arguments, (list, tuple)):
            raise ValueError(f"arguments must be a list of command-line arguments, not {type(arguments).__name__}")
        if parallel_run_config.output_action == "append_row" and output is None:
            raise ValueError("Please specify output parameter (output_action is append_row)")
        self.name = name
        self.parallel_run_config = parallel_run_config
        self.inputs = list(inputs)
        self.output = output
        self.side_inputs = list(side_inputs or [])
        self.arguments = list(arguments or [])
        self.allow_reuse = allow_reuse
        self.raypar = raypar
        _check_arguments(self.arguments)

    # -- conversion ------------------------------------------------------------

    def to_v2(self) -> ParallelJob:
        """The v2 parallel job this step is (Azure's v1 → v2 mapping)."""
        config = self.parallel_run_config
        ports = _Ports()
        split_name = ports.add_input(self.inputs[0], "input_data")
        for i, item in enumerate(self.side_inputs):
            ports.add_input(item, f"side_input_{i}")
        output_name = ports.add_output(self.output) if self.output is not None else None
        arguments = [ports.token(item, i) for i, item in enumerate(self.arguments)]
        if config.allowed_failed_percent is not None:
            arguments += ["--allowed_failed_percent", f"{config.allowed_failed_percent:g}"]
        append_row_to = None
        raypar = dict(self.raypar or {})
        if config.output_action == "append_row":
            append_row_to, file_name = ports.append_row_output(output_name, config.append_row_file_name)
            if file_name is not None:  # an output without a path yet: the name travels in the spec
                raypar.setdefault("append_row_file_name", file_name)
        table_format = getattr(self.inputs[0], "table_format", None)
        if table_format and not getattr(self.inputs[0], "is_mltable", False):  # an MLTable names its format
            raypar.setdefault("input_format", table_format)
        code, script = config.code_and_script()
        size = config.mini_batch_size
        return parallel_run_function(
            name=self.name, description=config.description, inputs=ports.inputs, outputs=ports.outputs,
            input_data=f"${{{{inputs.{split_name}}}}}", instance_count=config.node_count,
            max_concurrency_per_instance=config.process_count_per_node,
            mini_batch_size=None if size is None else str(size), partition_keys=config.partition_keys,
            error_threshold=config.error_threshold, mini_batch_error_threshold=config.allowed_failed_count,
            retry_settings=RetrySettings(max_retries=config.run_max_try - 1, timeout=config.run_invocation_timeout),
            logging_level=config.logging_level, environment_variables=config.environment_variables,
            is_deterministic=bool(self.allow_reuse),
            task=RunFunction(code=code, entry_script=script, append_row_to=append_row_to,
                             program_arguments=_join(arguments) or None),
            raypar=raypar or None)

    def to_dict(self) -> dict:
        return self.to_v2().to_dict()

    def to_spec(self):
        return self.to_v2().to_spec()

    def to_yaml(self, relative_to: Optional[str] = None) -> str:
        return self.to_v2().to_yaml(relative_to=relative_to)

    def dump(self, path) -> str:
        return self.to_v2().dump(path)

    def __repr__(self) -> str:
        return f"ParallelRunStep(name={self.name!r})"


def _check_arguments(arguments: list) -> None:
    if arguments and isinstance(arguments[0], str) and not arguments[0].startswith("-"):
        raise ValueError(f"Found invalid argument '{arguments[0]}'. As your arguments will be merged with "
                         f"reserved argument, you can only use keyword argument.")
    for item in arguments:
        if isinstance(item, str) and item.startswith("--"):
            name = item[2:].split("=")[0]
            if name in RESERVED_ARGUMENTS:
                raise ValueError(f"'{name}' is a reserved argument in ParallelRunStep, "
                                 f"please use another argument name instead.")


def _join(arguments: list[str]) -> str:
    # A ${{...}} binding stays bare, so the YAML reads as Azure's; anything else is shell-quoted.
    return " ".join(a if _BINDING.match(a) else shlex.quote(a) for a in arguments)


class _Ports:
    """The v2 inputs and outputs of a step, named, and how arguments refer to them."""

    def __init__(self):
        self.inputs: dict[str, Any] = {}
        self.outputs: dict[str, Output] = {}
        self._objects: list[tuple[Any, str]] = []  # (the v1 object, its binding)

    def _name(self, item, default: str) -> str:
        name = getattr(item, "name", None) or default
        if name in self.inputs or name in self.outputs:
            raise ValueError(f"two inputs or outputs are named {name!r}: give them distinct names "
                             f"(as_named_input)")
        return name

    def add_input(self, item, default_name: str) -> str:
        name = self._name(item, default_name)
        if isinstance(item, DatasetInput):
            converted = item.to_input()
        elif isinstance(item, Input):
            converted = item
        elif isinstance(item, (str, os.PathLike)):
            converted = DatasetInput(item).to_input()
        else:
            raise ValueError(f"input {item!r}: give a path, an Input or a Dataset (raypar.azureml.v1.Dataset)")
        self.inputs[name] = converted
        self._objects.append((item, f"${{{{inputs.{name}}}}}"))
        return name

    def add_output(self, item) -> str:
        name = self._name(item, "output")
        if isinstance(item, OutputFileDatasetConfig):
            converted = item.to_output()
        elif isinstance(item, Output):
            converted = item
        elif isinstance(item, (str, os.PathLike)):
            converted = Output(path=item)
        else:
            raise ValueError(f"output {item!r}: give a path, an Output, PipelineData or OutputFileDatasetConfig")
        self.outputs[name] = converted
        self._objects.append((item, f"${{{{outputs.{name}}}}}"))
        return name

    def token(self, item, index: int) -> str:
        """An argument as text: a port becomes its binding (a dataset not given as an input becomes a side input)."""
        if isinstance(item, PipelineParameter):
            return str(item.default_value)
        if isinstance(item, (str, int, float)):
            return str(item)
        named = isinstance(item, DatasetInput) and item.name
        for obj, binding in self._objects:
            if obj is item or (named and getattr(obj, "name", None) == item.name):
                return binding
        if isinstance(item, (DatasetInput, Input)):
            name = self.add_input(item, f"argument_input_{index}")
            return f"${{{{inputs.{name}}}}}"
        raise ValueError(f"arguments[{index}]: {item!r} is not an input, the output, a PipelineParameter or text")

    def append_row_output(self, output_name: str, file_name: Optional[str]) -> tuple[str, Optional[str]]:
        """(``append_row_to``, ``raypar.append_row_file_name`` or None).

        The output folder itself for Azure's file name; a ``uri_file`` output inside the folder when
        it has a path (Azure's own v2 shape); for a folder without a path yet (``PipelineData``,
        placed under the job dir when the job starts), the folder with the file name in the spec.
        """
        binding = f"${{{{outputs.{output_name}}}}}"
        if file_name is None or file_name == APPEND_ROW_FILE_NAME:
            return binding, None
        folder = self.outputs[output_name].path
        if folder is None:
            return binding, file_name
        file_output = f"{output_name}_append_row"
        self.outputs[file_output] = Output(type="uri_file", path=os.path.join(folder, file_name))
        return f"${{{{outputs.{file_output}}}}}", None
