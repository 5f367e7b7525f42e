"""``raypar convert``: an Azure ML SDK v1 ParallelRunStep, from YAML or Python, as v2 job YAML.

The YAML holds a ``parallel_run_config:`` mapping (the keys ``ParallelRunConfig``
takes; ``ParallelRunConfig.save_to_yaml`` writes this shape) and the step's own
keys at the top level. Relative paths are relative to the YAML file. A Python
file is run (with its folder as working directory, so its relative paths are
relative to it) and the ``ParallelRunStep`` it defines is converted.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import runpy
import sys
from pathlib import Path
from typing import Optional

from raypar import yamlfile
from raypar.azureml.v1 import ParallelRunConfig, ParallelRunStep
from raypar.azureml.v1_data import DatasetInput, OutputFileDatasetConfig
from raypar.azureml.v2 import absolute
from raypar.errors import SpecError, UsageError
from raypar.version import __version__

_CONFIG_KEYS = set(inspect.signature(ParallelRunConfig).parameters) | {"compute_target_name"}
_STEP_KEYS = {"parallel_run_config", "name", "inputs", "output", "side_inputs", "arguments", "allow_reuse", "raypar"}
_INPUT_KEYS = {"name", "path", "type", "mode", "format"}
_OUTPUT_KEYS = {"name", "path"}


def convert_file(path: str, step: Optional[str] = None, relative_to: Optional[str] = None) -> str:
    """The v2 YAML of the v1 step in ``path`` (``.yml``/``.yaml`` or ``.py``), with a header comment.

    Raises:
        SpecError: the v1 config is wrong (one line naming the file).
        UsageError: the file cannot be used (missing, another kind, no or several steps).
    """
    source = Path(path)
    if not source.is_file():
        raise UsageError(f"{path}: file not found")
    if source.suffix == ".py":
        found = step_from_python(source, step)
    elif source.suffix in (".yml", ".yaml"):
        if step is not None:
            raise UsageError("--step picks a step of a Python file; a YAML file holds one step")
        found = step_from_yaml(source)
    else:
        raise UsageError(f"{path}: give a v1 config as .yml/.yaml or a .py file that defines a ParallelRunStep")
    try:
        text = found.to_yaml(relative_to=relative_to)
    except SpecError as exc:
        raise SpecError(f"{path}: the converted job is not valid: {exc.headline}") from None
    except ValueError as exc:
        raise SpecError(f"{path}: {exc}") from None
    return f"# Converted by raypar {__version__} from {source.name} (Azure ML SDK v1 ParallelRunStep)\n{text}"


def step_from_yaml(path: Path) -> ParallelRunStep:
    """The ParallelRunStep a v1 YAML file describes."""
    data = yamlfile.parse(path.read_text(), str(path))
    if not isinstance(data, dict) or not isinstance(data.get("parallel_run_config"), dict):
        raise SpecError(f"{path}: a v1 config is a mapping with a parallel_run_config: mapping")
    _no_unknown(data, _STEP_KEYS, path, "")
    config = dict(data["parallel_run_config"])
    _no_unknown(config, _CONFIG_KEYS, path, "parallel_run_config.")
    config.pop("compute_target_name", None)  # ParallelRunConfig.save_to_yaml writes it; ignored
    base = str(path.parent.resolve())
    if config.get("source_directory") is not None:
        config["source_directory"] = absolute(str(config["source_directory"]), base)
    elif config.get("entry_script") is not None:
        config["entry_script"] = absolute(str(config["entry_script"]), base)
    inputs = data.get("inputs")
    try:
        return ParallelRunStep(
            name=data.get("name"), parallel_run_config=ParallelRunConfig(**config),
            inputs=[_input(item, base, path) for item in inputs] if isinstance(inputs, list) else inputs,
            output=_output(data.get("output"), base, path),
            side_inputs=[_input(item, base, path) for item in data.get("side_inputs") or []],
            arguments=data.get("arguments"), allow_reuse=data.get("allow_reuse", True), raypar=data.get("raypar"))
    except (TypeError, ValueError) as exc:
        raise SpecError(f"{path}: {exc}") from None


def _no_unknown(data: dict, known: set, path: Path, where: str) -> None:
    unknown = sorted(set(data) - known)
    if unknown:
        raise SpecError(f"{path}: unknown key '{where}{unknown[0]}'")


def _input(item, base: str, path: Path) -> DatasetInput:
    if isinstance(item, str):
        return DatasetInput(absolute(item, base))
    if not isinstance(item, dict) or "path" not in item:
        raise SpecError(f"{path}: an input is a path or a mapping with a path (and name, type, mode, format)")
    _no_unknown(item, _INPUT_KEYS, path, "inputs.")
    return DatasetInput(absolute(str(item["path"]), base), table_format=item.get("format"), name=item.get("name"),
                        mode=item.get("mode"), type=item.get("type"))


def _output(item, base: str, path: Path) -> Optional[OutputFileDatasetConfig]:
    if item is None:
        return None
    if isinstance(item, str):
        return OutputFileDatasetConfig(destination=absolute(item, base))
    if not isinstance(item, dict):
        raise SpecError(f"{path}: output is a path or a mapping with a name and a path")
    _no_unknown(item, _OUTPUT_KEYS, path, "output.")
    where = item.get("path")
    return OutputFileDatasetConfig(name=item.get("name"), destination=None if where is None else absolute(where, base))


def step_from_python(path: Path, name: Optional[str] = None) -> ParallelRunStep:
    """Run ``path`` and take the ParallelRunStep it defines (the one called ``name``, if given)."""
    namespace = _run(path)
    steps: dict[str, ParallelRunStep] = {}
    for variable, value in namespace.items():
        if isinstance(value, ParallelRunStep) and value not in steps.values():
            steps[variable] = value
    if name is not None:
        chosen = [s for variable, s in steps.items() if name in (variable, s.name)]
        if not chosen:
            raise UsageError(f"{path}: no ParallelRunStep named {name!r} (found: {', '.join(steps) or 'none'})")
        return chosen[0]
    if not steps:
        raise UsageError(f"{path}: defines no ParallelRunStep (from raypar import ParallelRunStep) at module level")
    if len(steps) > 1:
        raise UsageError(f"{path}: defines several ParallelRunSteps ({', '.join(steps)}): pick one with --step NAME")
    return next(iter(steps.values()))


def _run(path: Path) -> dict:
    folder = str(path.parent.resolve())
    with _working_dir(folder):
        try:
            return runpy.run_path(str(path.resolve()), run_name="__raypar_convert__")
        except SystemExit as exc:
            raise SpecError(f"{path}: exited ({exc.code}) while raypar ran it") from None
        except Exception as exc:  # noqa: BLE001 - the user's script failed: one line naming it
            raise SpecError(f"{path}: {type(exc).__name__}: {exc}".splitlines()[0]) from None


@contextlib.contextmanager
def _working_dir(folder: str):
    # As `cd folder && python file.py`: relative paths and sibling imports resolve from the file's folder.
    old_cwd, old_path = os.getcwd(), list(sys.path)
    os.chdir(folder)
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        os.chdir(old_cwd)
        sys.path[:] = old_path
