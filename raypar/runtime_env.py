"""The job's software environment as a Ray runtime env, and what a submitted driver needs.

``raypar.runtime_env`` (pip packages, env vars) is raypar's own field. Azure's
``task.environment`` names an Azure image or a conda file: a conda file's
``pip:`` list maps onto Ray's pip runtime env; the rest cannot be honoured on
Ray and is named in one warning line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import yaml

from .credentials import _AZURE, env_reference, protocol_of
from .errors import SpecError
from .spec import JobSpec

# Packages of Azure's own runtime: meaningless outside Azure ML (raypar plays their part).
_AZURE_ONLY_PREFIXES = ("azureml-", "azureml_", "azure-ai-ml")
# Conda packages every environment has anyway.
_CONDA_BASICS = ("python", "pip", "setuptools", "wheel")
# Set in a submitted driver's environment: the submitter already warned about task.environment.
ENVIRONMENT_WARNED = "RAYPAR_ENVIRONMENT_WARNED"
# Variables adlfs reads: a submitted driver authenticates with the submitter's when the spec gives none.
AZURE_STORAGE_VARIABLES = tuple(f"AZURE_STORAGE_{v}" for v in (
    "CONNECTION_STRING", "ACCOUNT_NAME", "ACCOUNT_KEY", "SAS_TOKEN", "CLIENT_ID", "CLIENT_SECRET", "TENANT_ID",
    "ANON"))


def _read_pip(value: Any) -> list[str]:
    """``raypar.runtime_env.pip``: a list of requirements, or a requirements file."""
    if value is None:
        return []
    if isinstance(value, list):
        return list(value)
    try:
        lines = Path(value).read_text().splitlines()
    except OSError as exc:
        raise SpecError(f"raypar.runtime_env.pip: cannot read requirements file {value}: "
                        f"{exc.strerror or exc}") from None
    return [line.split(" #")[0].strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _conda(environment: Any) -> tuple[list[str], list[str]]:
    """(pip packages, what is ignored) of Azure's ``task.environment``."""
    if environment is None:
        return [], []
    if not isinstance(environment, dict):
        return [], [f"environment {environment}"]
    ignored = [f"image {environment['image']}"] if environment.get("image") else []
    conda = environment.get("conda_file")
    if isinstance(conda, str):
        try:
            conda = yaml.safe_load(Path(conda).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise SpecError(f"task.environment.conda_file: cannot read {conda}: {exc}") from None
    pip: list[str] = []
    for dep in (conda or {}).get("dependencies", []) if isinstance(conda, dict) else []:
        if isinstance(dep, dict):
            pip.extend(str(p) for p in dep.get("pip", []))
        elif str(dep).split("=")[0].split(">")[0].split("<")[0].strip() not in _CONDA_BASICS:
            ignored.append(f"conda package {dep}")
    kept = [p for p in pip if not p.lower().startswith(_AZURE_ONLY_PREFIXES)]
    ignored += [f"pip package {p} (Azure ML only)" for p in pip if p not in kept]
    return kept, ignored


def _environments(spec: JobSpec) -> list[tuple[str, Any]]:
    return [(where, e) for where, e in (("task.environment", spec.task.environment),
                                        ("environment", spec.environment)) if e is not None]


def pip_packages(spec: JobSpec) -> tuple[list[str], Optional[str]]:
    """The pip packages the job's processes need, and one warning line naming what is ignored (or None)."""
    packages = _read_pip(spec.raypar.runtime_env.pip)
    ignored: list[str] = []
    for where, environment in _environments(spec):
        more, skipped = _conda(environment)
        packages += [p for p in more if p not in packages]
        ignored += [f"{where}: {item}" if where != "task.environment" else item for item in skipped]
    warning = None
    if ignored:
        warning = ("task.environment: not used on Ray: " + ", ".join(ignored)
                   + "; the cluster's Python environment runs the job (add packages under raypar.runtime_env.pip)")
    return packages, warning


def inline_files(spec: JobSpec) -> JobSpec:
    """The spec with its requirements and conda files read in: a submitted driver cannot read
    files of the submitter's machine."""
    data = spec.to_dict()
    runtime_env = data.get("raypar", {}).get("runtime_env", {})
    if isinstance(runtime_env.get("pip"), str):
        runtime_env["pip"] = _read_pip(runtime_env["pip"])
    for holder in (data["task"], data):
        environment = holder.get("environment")
        if isinstance(environment, dict) and isinstance(environment.get("conda_file"), str):
            try:
                environment["conda_file"] = yaml.safe_load(Path(environment["conda_file"]).read_text())
            except (OSError, yaml.YAMLError) as exc:
                raise SpecError(f"task.environment.conda_file: cannot read {environment['conda_file']}: "
                                f"{exc}") from None
    return JobSpec.model_validate(data)


def env_vars(spec: JobSpec) -> dict[str, str]:
    """``raypar.runtime_env.env_vars`` with ``$VAR`` references resolved from this process's environment."""
    resolved = {}
    for name, value in spec.raypar.runtime_env.env_vars.items():
        ref = env_reference(value)
        if ref is not None:
            if ref not in os.environ:
                raise SpecError(f"raypar.runtime_env.env_vars.{name}: environment variable {ref} is not set")
            value = os.environ[ref]
        resolved[name] = value
    return resolved


def worker_runtime_env(spec: JobSpec) -> Optional[dict]:
    """The runtime env of every worker actor: one env for all, so Ray can reuse its processes."""
    env = {**env_vars(spec), **spec.environment_variables}
    packages, _ = pip_packages(spec)
    runtime_env: dict[str, Any] = {}
    if env:
        runtime_env["env_vars"] = env
    if packages:
        runtime_env["pip"] = packages
    return runtime_env or None


def forwarded_variables(spec: JobSpec, job_dir: str) -> list[str]:
    """Variables a driver elsewhere needs from this environment: the spec's ``$VAR`` references,
    and the ``AZURE_STORAGE_*`` credentials when Azure storage is used without storage_options."""
    names = []
    for options in spec.raypar.storage_options.values():
        names += [env_reference(v) for v in options.values() if isinstance(v, str) and env_reference(v)]
    names += [env_reference(v) for v in spec.raypar.runtime_env.env_vars.values() if env_reference(v)]
    if azure_from_environment(spec, job_dir):
        names += [v for v in AZURE_STORAGE_VARIABLES if os.environ.get(v)]
    return sorted(set(names))


def azure_from_environment(spec: JobSpec, job_dir: str) -> bool:
    """True when the job uses Azure storage with credentials from ``AZURE_STORAGE_*`` (no storage_options)."""
    paths = [job_dir, *(i.path for i in spec.inputs.values() if hasattr(i, "path")),
             *(o.path for o in spec.outputs.values() if o.path)]
    return any(protocol_of(p) in _AZURE for p in paths) and not any(p in spec.raypar.storage_options for p in _AZURE)
