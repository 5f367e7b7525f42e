"""`raypar kube render`: a ready KubeRay RayJob (plus the ConfigMap with the code) for a spec.

What the rendered objects do:

- A ConfigMap holds the spec (``raypar-job.yml``, with ``task.code`` at a fixed
  path) and task.code. KubeRay's submitter pod mounts it at that path, and its
  ``ray job submit`` uploads it as the job's working dir.
- The RayJob's entrypoint is ``python -m raypar run raypar-job.yml --job-dir URL
  --code-dir .``: every attempt runs the very same spec on the very same job dir,
  and ``raypar run`` resumes a job dir that holds the same spec. A KubeRay retry
  (``backoffLimit``) on a fresh cluster continues where the lost one stopped.
- Worker replicas are ``instance_count``; each worker pod has room for
  ``max_concurrency_per_instance`` workers of ``raypar.worker``'s size. The head has
  ``num-cpus: 0``, so raypar's placement (one instance per node) uses only workers.
  An elastic job (``max_instance_count``) gets KubeRay's autoscaler: ``instance_count``
  worker pods at first, up to ``max_instance_count``.
- Credentials come from a Kubernetes Secret (``envFrom``) on every Ray pod; the
  manifest names it and never holds a secret value.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import yaml

from raypar.errors import UsageError
from raypar.launch.submission import (
    META_CODE,
    META_JOB_DIR,
    META_NAME,
    REMOTE_PROGRESS_INTERVAL,
    STOP_GRACE_SECONDS,
    check_code,
    check_reachable,
    default_remote_job_dir,
)
from raypar.spec.loading import as_spec, relocate_code
from raypar.spec.models import JobSpec, parse_bytes
from raypar.spec.runtime_env import (
    ENVIRONMENT_WARNED,
    azure_from_environment,
    forwarded_variables,
    inline_files,
    pip_packages,
)
from raypar.storage import is_url, normalize_path
from raypar.version import __version__

RAY_VERSION = "2.60.0"  # the pinned ray[default]>=2.60,<2.61; deploy/docker/Dockerfile builds on it
DEFAULT_IMAGE = f"raypar:{__version__}"  # what deploy/docker/Dockerfile builds (see docs/kubernetes.md)
CODE_MOUNT = "/home/ray/raypar/code"  # task.code in the submitter pod, and in the spec the job dir keeps
SPEC_FILE = "raypar-job.yml"  # the spec, next to the code in the ConfigMap
DEFAULT_SECRET = "raypar-storage"
CONFIGMAP_LIMIT = 1_000_000  # Kubernetes refuses objects over 1 MiB; leave room for the metadata
NAME_LIMIT = 47  # KubeRay: a RayJob name is a DNS-1035 label of at most 63 - 16 characters
SKIPPED = {"__pycache__", ".git", ".ipynb_checkpoints", ".pytest_cache"}
GIB = 1024 ** 3
HEAD_RESOURCES = {"cpu": "2", "memory": "4Gi"}  # GCS, dashboard and the raypar driver
OBJECT_STORE_SHARE = 0.3  # Ray keeps this share of a pod's memory for its object store
DEFAULT_SLOT_MEMORY = 2 * GIB  # per worker when raypar.worker.memory is not given


def rayjob_name(spec: JobSpec, name: Optional[str]) -> str:
    wanted = name or f"raypar-{spec.name or 'job'}"
    label = re.sub(r"[^a-z0-9-]+", "-", wanted.lower()).strip("-")
    label = re.sub(r"^[^a-z]+", "", label)[:NAME_LIMIT].rstrip("-")
    if name and label != name:
        raise UsageError(f"--name {name}: a RayJob name is lowercase letters, digits and '-', starts with a "
                         f"letter and has at most {NAME_LIMIT} characters (e.g. {label or 'raypar-job'})")
    return label or "raypar-job"


def code_files(code: str) -> list[tuple[str, bytes]]:
    """``(relative path, content)`` of every file under task.code, sorted; caches and VCS folders skipped."""
    files = []
    for folder, dirs, names in os.walk(code):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED)
        for name in sorted(names):
            if not name.endswith(".pyc"):
                path = os.path.join(folder, name)
                files.append((os.path.relpath(path, code), Path(path).read_bytes()))
    return files


def job_configmap(name: str, namespace: Optional[str], spec_text: str,
                  files: list[tuple[str, bytes]]) -> tuple[dict, list[dict]]:
    """The ConfigMap holding the spec and task.code, and the volume ``items`` that put each key at its path."""
    if any(relative == SPEC_FILE for relative, _ in files):
        raise UsageError(f"task.code: holds a file named {SPEC_FILE}, where raypar puts the spec; rename it")
    data, binary, items = {SPEC_FILE: spec_text}, {}, [{"key": SPEC_FILE, "path": SPEC_FILE}]
    for index, (relative, content) in enumerate(files):
        # A key cannot hold '/': number the keys, and let items place each file at its path.
        key = f"f{index:04d}-{re.sub(r'[^-._a-zA-Z0-9]+', '_', os.path.basename(relative))}"
        try:
            data[key] = content.decode("utf-8")
        except UnicodeDecodeError:
            binary[key] = base64.b64encode(content).decode()
        items.append({"key": key, "path": relative})
    size = sum(len(v.encode()) for v in data.values()) + sum(len(v) for v in binary.values())
    if size > CONFIGMAP_LIMIT:
        raise UsageError(f"task.code: {size / 1e6:.1f} MB is more than a ConfigMap holds (1 MiB); bake the code "
                         f"into the image and pass --code-in-image DIR, or move data inputs to a URL")
    configmap = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _metadata(name, namespace), "data": data}
    if binary:
        configmap["binaryData"] = binary
    return configmap, items


def _metadata(name: str, namespace: Optional[str], job: Optional[str] = None) -> dict:
    labels = {"app.kubernetes.io/name": "raypar", "app.kubernetes.io/managed-by": "raypar"}
    if job:
        labels["raypar.dev/job"] = job
    meta = {"name": name, "labels": labels}
    if namespace:
        meta["namespace"] = namespace
    return meta


def _quantity_cpu(cpus: float) -> str:
    return str(max(1, math.ceil(cpus)))  # whole CPUs: Ray counts a pod's CPUs from its limit


def _gib(amount: float) -> str:
    return f"{max(1, math.ceil(amount / GIB))}Gi"


def worker_pod_resources(spec: JobSpec) -> dict[str, str]:
    """Requests (= limits) of one worker pod: room for max_concurrency_per_instance workers."""
    worker, slots = spec.raypar.worker, spec.max_concurrency_per_instance
    slot_memory = parse_bytes(worker.memory) if worker.memory is not None else DEFAULT_SLOT_MEMORY
    # Ray offers a pod's memory minus its object store to tasks; one more GiB for raylet and friends.
    memory = slots * slot_memory / (1 - OBJECT_STORE_SHARE) + GIB
    resources = {"cpu": _quantity_cpu(slots * worker.num_cpus), "memory": _gib(memory)}
    if worker.num_gpus:
        resources["nvidia.com/gpu"] = str(math.ceil(slots * worker.num_gpus))
    return resources


def _container(name: str, image: str, resources: dict, secret: str, ports: Optional[list] = None) -> dict:
    container = {
        "name": name, "image": image,
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        # The job's credentials (AZURE_STORAGE_*, the spec's $VARs) for the driver and the workers.
        "envFrom": [{"secretRef": {"name": secret}}],
    }
    if ports:
        container["ports"] = ports
    return container


# Elastic jobs (max_instance_count): KubeRay's autoscaler adds worker pods up to maxReplicas as the
# job asks for them (raypar/engine/elastic.py) and removes them a minute after they idle.
AUTOSCALING = {"enableInTreeAutoscaling": True,
               "autoscalerOptions": {"version": "v2", "upscalingMode": "Default", "idleTimeoutSeconds": 60}}


def ray_cluster_spec(spec: JobSpec, image: str, secret: str) -> dict:
    """Head (no CPUs for tasks: the driver only) plus one worker group of instance_count pods
    (between instance_count and max_instance_count, autoscaled, for an elastic job)."""
    head_ports = [{"containerPort": 6379, "name": "gcs-server"}, {"containerPort": 8265, "name": "dashboard"},
                  {"containerPort": 10001, "name": "client"}]
    resources = worker_pod_resources(spec)
    worker_start = {}
    if spec.raypar.worker.resources:  # custom Ray resources the workers reserve
        worker_start["resources"] = ray_resources_param(
            {k: v * spec.max_concurrency_per_instance for k, v in spec.raypar.worker.resources.items()})
    worker_template = {"spec": {"containers": [_container("ray-worker", image, resources, secret)]}}
    if "nvidia.com/gpu" in resources:
        worker_template["spec"]["tolerations"] = [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    low = spec.resources.instance_count
    high = spec.resources.max_instance_count or low
    return {
        "rayVersion": RAY_VERSION,
        "authOptions": {"mode": "token"},  # the operator makes the token Secret; `raypar submit` needs it
        "headGroupSpec": {
            "rayStartParams": {"num-cpus": "0"},
            "template": {"spec": {"containers": [
                _container("ray-head", image, HEAD_RESOURCES, secret, head_ports)]}},
        },
        "workerGroupSpecs": [{
            "groupName": "workers", "replicas": low, "minReplicas": low, "maxReplicas": high,
            "rayStartParams": worker_start, "template": worker_template,
        }],
        **(AUTOSCALING if spec.resources.elastic else {}),
    }


def ray_resources_param(resources: dict) -> str:
    """rayStartParams ``resources`` as KubeRay wants it: JSON, double-quoted for the shell
    (KubeRay pastes ``--resources=<value>`` into the container's ``ray start`` command)."""
    return '"' + json.dumps(resources).replace('"', '\\"') + '"'


def submitter_template(image: str, configmap: str, items: list[dict], mount: str) -> dict:
    """KubeRay's submitter pod, with the ConfigMap mounted where the spec says task.code is."""
    return {"spec": {
        "restartPolicy": "Never",
        "containers": [{
            "name": "ray-job-submitter", "image": image,
            "resources": {"requests": {"cpu": "500m", "memory": "512Mi"},
                          "limits": {"cpu": "1", "memory": "1Gi"}},
            "volumeMounts": [{"name": "raypar-job", "mountPath": mount, "readOnly": True}],
        }],
        "volumes": [{"name": "raypar-job", "configMap": {"name": configmap, "items": items}}],
    }}


@dataclass
class Rendered:
    objects: list[dict]  # ConfigMap of the spec (and task.code), RayJob
    job_dir: str
    image: str
    secret_variables: list[str] = field(default_factory=list)  # what the Secret must hold

    def to_yaml(self, secret: str = DEFAULT_SECRET) -> str:
        rayjob = self.objects[-1]["metadata"]["name"]
        lines = [f"Rendered by raypar {__version__}: RayJob {rayjob}, job dir {self.job_dir}",
                 "Apply with: kubectl apply -f THIS_FILE   (the KubeRay operator must be installed)"]
        if self.image == DEFAULT_IMAGE:
            lines.append(f"Image {DEFAULT_IMAGE}: build deploy/docker/Dockerfile, push it, and render with --image")
        if self.secret_variables:
            literals = " ".join(f"--from-literal={n}=..." for n in self.secret_variables)
            lines += [f"Needs Secret {secret} with {', '.join(self.secret_variables)}:",
                      f"  kubectl create secret generic {secret} {literals}"]
        head = "".join(f"# {line}\n" for line in lines)
        return head + "".join("---\n" + dump_yaml(o) for o in self.objects)


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (the spec, the code) as readable ``|`` blocks."""


_BlockDumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
    "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))


def dump_yaml(data) -> str:
    return yaml.dump(data, Dumper=_BlockDumper, sort_keys=False, allow_unicode=True, width=120)


def render(spec, image: Optional[str] = None, job_dir: Optional[str] = None, name: Optional[str] = None,
           namespace: Optional[str] = None, secret: str = DEFAULT_SECRET, backoff_limit: int = 2,
           cluster: Optional[str] = None, code_in_image: Optional[str] = None,
           shared_paths: tuple[str, ...] = (), echo: Callable[[str], None] = print) -> Rendered:
    """The Kubernetes objects that run ``spec`` (a path, dict or JobSpec) on KubeRay.

    ``cluster`` targets an existing RayCluster (``clusterSelector``) instead of
    creating one; KubeRay then allows no retries (``backoffLimit`` 0).
    ``code_in_image`` is where the image already holds task.code (the ConfigMap
    then holds only the spec).
    """

    spec = inline_files(as_spec(spec))
    rayjob = rayjob_name(spec, name)
    job_dir = normalize_path(job_dir) if job_dir else default_remote_job_dir(rayjob, "raypar kube render")
    if not is_url(job_dir) and not any(job_dir.startswith(s) for s in shared_paths):
        raise UsageError(f"job dir {job_dir}: a KubeRay retry runs on a fresh cluster, so the job dir must be a URL "
                         f"(e.g. az://container/raypar-jobs/{rayjob}) or a path every pod mounts (--shared-path)")
    check_reachable(spec, job_dir, shared_paths)
    if backoff_limit < 0:
        raise UsageError(f"--backoff-limit {backoff_limit}: must be 0 or more")
    if cluster and backoff_limit:
        echo(f"raypar: --cluster {cluster}: KubeRay allows no retries on a cluster it did not create, so "
             f"backoffLimit is 0 (resume a failed job with `raypar resume {job_dir}`)")
        backoff_limit = 0
    image = image or DEFAULT_IMAGE
    if code_in_image is None:
        check_code(spec.task.code, spec.task.entry_script, "it goes into the ConfigMap")
        files = code_files(spec.task.code)
    else:
        files = []  # the image has task.code; the ConfigMap holds only the spec
    spec = relocate_code(spec, code_in_image or CODE_MOUNT)
    # The mount is the job's working dir; with the code in the image it holds only the spec.
    mount = CODE_MOUNT if code_in_image is None else "/home/ray/raypar/spec"
    configmap, items = job_configmap(f"{rayjob}-job", namespace, spec_text(spec), files)
    rayjob_spec = {
        "entrypoint": f"python -m raypar run {SPEC_FILE} --job-dir {shlex.quote(job_dir)}"
                      + (" --code-dir ." if code_in_image is None else ""),
        "runtimeEnvYAML": dump_yaml(_runtime_env(spec, mount)),
        "metadata": {META_JOB_DIR: job_dir, META_CODE: spec.task.code, META_NAME: spec.name or ""},
        # Each retry is a fresh cluster; raypar resumes the job dir, so a retry redoes only unfinished batches.
        "backoffLimit": backoff_limit,
        "submitterPodTemplate": submitter_template(image, configmap["metadata"]["name"], items, mount),
    }
    if cluster:
        rayjob_spec["clusterSelector"] = {"ray.io/cluster": cluster}
    else:
        rayjob_spec["rayClusterSpec"] = ray_cluster_spec(spec, image, secret)
        rayjob_spec["shutdownAfterJobFinishes"] = True
        rayjob_spec["ttlSecondsAfterFinished"] = 600  # keep pods (and their logs) ten minutes
    objects = [configmap, {"apiVersion": "ray.io/v1", "kind": "RayJob",
                           "metadata": _metadata(rayjob, namespace, spec.name), "spec": rayjob_spec}]
    _, warning = pip_packages(spec)
    if warning:
        echo(f"raypar: warning: {warning}")
    return Rendered(objects, job_dir, image, secret_variables(spec, job_dir))


def render_raycluster(spec, image: Optional[str] = None, name: str = "raypar", namespace: Optional[str] = None,
                      secret: str = DEFAULT_SECRET) -> dict:
    """A standing RayCluster shaped for ``spec``: for `raypar submit` from a laptop, and RayJobs with --cluster."""

    spec = as_spec(spec)
    return {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": _metadata(rayjob_name(spec, name), namespace),
            "spec": ray_cluster_spec(spec, image or DEFAULT_IMAGE, secret)}


def secret_variables(spec: JobSpec, job_dir: str) -> list[str]:
    """The variables the pods need from the Secret: the spec's $VARs and the Azure credentials."""
    names = set(forwarded_variables(spec, job_dir))
    if azure_from_environment(spec, job_dir) and not any(n.startswith("AZURE_STORAGE_") for n in names):
        names.add("AZURE_STORAGE_CONNECTION_STRING")  # or ACCOUNT_NAME + ACCOUNT_KEY / SAS_TOKEN
    return sorted(names)


def spec_text(spec: JobSpec) -> str:
    """The spec as YAML, without the values that are defaults anyway."""
    data = spec.model_dump(mode="json", by_alias=True, exclude_none=True, exclude_defaults=True)
    return dump_yaml({"type": spec.type, **data})


def _runtime_env(spec: JobSpec, mount: str) -> dict:
    env = {
        "working_dir": mount,  # the submitter's mount of the ConfigMap; `ray job submit` uploads it
        "env_vars": {
            "RAYPAR_PROGRESS_INTERVAL": REMOTE_PROGRESS_INTERVAL,
            "RAY_JOB_STOP_WAIT_TIME_S": STOP_GRACE_SECONDS,
            ENVIRONMENT_WARNED: "1",
        },
    }
    packages, _ = pip_packages(spec)
    if packages:
        env["pip"] = packages
    return env
