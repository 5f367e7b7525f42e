"""The job's software environment as a Ray runtime env, and what a submitted driver needs.

``raypar.runtime_env`` (pip packages, env vars) is raypar's own field. Azure's
``task.environment`` names an Azure image or a conda file: a conda file's
``pip:`` list maps onto Ray's pip runtime env; the rest cannot be honoured on
Ray and is named in one warning line.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any, Optional

import yaml

from raypar.credentials import _AZURE, env_reference, protocol_of
from raypar.errors import SpecError
from raypar.spec.models import JobSpec

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


def _conda(environment: Any) -> tuple[list[str], list[str], Optional[str]]:
    """(pip packages, what is ignored, the ``python=`` pin of its conda file) of Azure's ``task.environment``."""
    if environment is None:
        return [], [], None
    if not isinstance(environment, dict):
        return [], [f"environment {environment}"], None
    ignored = [f"image {environment['image']}"] if environment.get("image") else []
    conda = environment.get("conda_file")
    if isinstance(conda, str):
        try:
            conda = yaml.safe_load(Path(conda).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise SpecError(f"task.environment.conda_file: cannot read {conda}: {exc}") from None
    pip: list[str] = []
    python = None
    for dep in (conda or {}).get("dependencies", []) if isinstance(conda, dict) else []:
        if isinstance(dep, dict):
            pip.extend(str(p) for p in dep.get("pip", []))
            continue
        name = str(dep).split("=")[0].split(">")[0].split("<")[0].strip()
        if name == "python":
            python = str(dep)[len(name):].lstrip("=<>! ").strip() or None
        elif name not in _CONDA_BASICS:
            ignored.append(f"conda package {dep}")
    kept = [p for p in pip if not p.lower().startswith(_AZURE_ONLY_PREFIXES)]
    ignored += [f"pip package {p} (Azure ML only)" for p in pip if p not in kept]
    return kept, ignored, python


def running_python() -> str:
    """``major.minor`` of this Python: Ray refuses a driver whose Python differs from the cluster's,
    so it is the cluster's too."""
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def _other_python(pinned: Optional[str]) -> bool:
    """True when a conda ``python=`` pin names another minor version than the one running."""
    if not pinned:
        return False
    numbers = re.match(r"(\d+)(?:\.(\d+))?", pinned)
    if not numbers:
        return False
    major, minor = numbers.group(1), numbers.group(2)
    return (major, minor or str(sys.version_info.minor)) != (str(sys.version_info.major), str(sys.version_info.minor))


def _environments(spec: JobSpec) -> list[tuple[str, Any]]:
    return [(where, e) for where, e in (("task.environment", spec.task.environment),
                                        ("environment", spec.environment)) if e is not None]


def pip_packages(spec: JobSpec) -> tuple[list[str], Optional[str]]:
    """The pip packages the job's processes need, and one warning line naming what is ignored (or None)."""
    packages = _read_pip(spec.raypar.runtime_env.pip)
    ignored: list[str] = []
    pins: list[str] = []
    for where, environment in _environments(spec):
        more, skipped, python = _conda(environment)
        packages += [p for p in more if p not in packages]
        ignored += [f"{where}: {item}" if where != "task.environment" else item for item in skipped]
        if _other_python(python):
            pins.append(f"{where}'s conda_file pins python={python}")
    parts = []
    if ignored:
        parts.append("task.environment: not used on Ray: " + ", ".join(ignored)
                     + "; the cluster's Python environment runs the job (add packages under raypar.runtime_env.pip)")
    if pins:  # Azure samples pin 3.7/3.8: their pip pins rarely install on a newer Python
        parts.append(f"{' and '.join(pins)}, but the cluster runs Python {running_python()}: its pip pins are "
                     f"installed there as written and may not exist for it (relax them, or list working ones "
                     f"under raypar.runtime_env.pip)")
    return packages, "; ".join(parts) or None


# What pip says about the requirement it failed on, most specific first: (pattern, verb).
_PIP_FAILURES = (
    (re.compile(r"No matching distribution found for (\S+)"), "install"),
    (re.compile(r"Could not find a version that satisfies the requirement (\S+)"), "install"),
    (re.compile(r"Package '([^']+)' requires a different Python"), "install"),
    (re.compile(r"Failed building wheel for (\S+)"), "build"),
    (re.compile(r"Failed to build (?:installable wheels for some pyproject\.toml based projects \()?([^\s)]+)"),
     "build"),
    (re.compile(r"Could not build wheels for (\S+)"), "build"),
    (re.compile(r"Building wheel for (\S+) \(.*\) did not run successfully"), "build"),
)
_COLLECTING = re.compile(r"^\s*Collecting (\S+)", re.M)
_CONFLICT = re.compile(r"Cannot install (.+?) because these package versions have conflicting dependencies")


def setup_failure(text: str, python: Optional[str] = None) -> str:
    """One line for a Ray runtime env that could not be set up (``RuntimeEnvSetupError``'s text):
    the requirement pip failed on and the Python it ran for, or the last error line."""
    verdict = pip_verdict(text, python)
    if verdict:
        return verdict
    errors = [line.strip() for line in text.splitlines() if line.strip().startswith(("ERROR:", "error:"))]
    last = errors[-1] if errors else next((line.strip() for line in reversed(text.splitlines()) if line.strip()),
                                          "no detail")
    return f"environment: Ray could not set up the workers' runtime env on Python {python or running_python()}: {last}"


def pip_verdict(text: str, python: Optional[str] = None) -> Optional[str]:
    """The line naming what pip refused to install, or None when pip did not refuse anything
    (the runtime env failed some other way, which may pass on another try)."""
    python = python or running_python()
    advice = "relax the pin or set raypar.runtime_env.pip"
    for pattern, verb in _PIP_FAILURES:
        found = pattern.search(text)
        if found:
            requirement = found.group(1).rstrip(".,;")
            return f"environment: pip could not {verb} {requirement!r} on Python {python} (the cluster's); {advice}"
    conflict = _CONFLICT.search(text)
    if conflict:
        return (f"environment: pip found no versions of {conflict.group(1)} that fit together on Python {python} "
                f"(the cluster's); {advice}")
    errors = [line.strip() for line in text.splitlines() if line.strip().startswith(("ERROR:", "error:"))]
    if "pip" in text and ("did not run successfully" in text or errors):
        collecting = _COLLECTING.findall(text)  # setup.py / metadata failures name the package only here
        if collecting:
            return (f"environment: pip could not build {collecting[-1]!r} on Python {python} (the cluster's); "
                    f"{advice}")
    return None


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


def without_inherited_pip(runtime_env: Optional[dict], job_env: dict) -> Optional[dict]:
    """The workers' runtime env less a pip list the job's own runtime env (a submitted job's)
    already installs: the actors inherit that env instead of asking Ray to build the same one
    again while the driver's is still in use, which can race on a busy node."""
    if not runtime_env or "pip" not in runtime_env:
        return runtime_env
    installed = (job_env.get("pip") or {})
    installed = installed.get("packages") if isinstance(installed, dict) else installed
    if list(installed or []) != list(runtime_env["pip"]):
        return runtime_env
    rest = {k: v for k, v in runtime_env.items() if k != "pip"}
    return rest or None


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
