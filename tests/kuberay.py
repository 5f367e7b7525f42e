"""Offline checks for raypar's Kubernetes manifests (a test helper, not a test file).

- ``validate(doc)``: what the API server would reject on ``kubectl apply --validate=strict``.
  RayJob/RayCluster (ray.io/v1) are checked against the vendored KubeRay v1.7.0 CRD schemas
  (tests/kuberay_schemas/), made strict as server-side field validation is, plus the CRD's
  CEL rules that apply to a create. Core objects go through the ``kubernetes-validate`` package.
- ``controller_violations(doc)``: what the KubeRay operator rejects after the object is stored
  (the CRD schema does not encode these; the operator just emits an ``InvalidRayJobSpec`` event
  and the job never runs).
- ``kustomize(directory)``: ``kubectl kustomize`` output, parsed.
- ``submitter_command(rayjob, address, submission_id)``: the ``ray job submit`` argv KubeRay's
  submitter runs for a RayJob.

KubeRay source read (ray-project/kuberay; the code index keeps undated snapshots, so no commit
hash is known): the newest stored ``ray-operator/controllers/ray/utils/validation.go``, the one
whose checks match the v1.7.0 CRD fields (networkPolicy, tlsOptions, worker ``priority``,
``authOptions.enableK8sTokenAuth``, GCS FT ``storage``); ``pkg/webhooks/v1/raycluster_webhook.go``;
``pkg/features/features.go`` (gate defaults); ``controllers/ray/common/job.go`` and
``job_test.go`` (submitter command); ``controllers/ray/common/pod.go`` (env and rayStartParams
KubeRay injects). Rules are written from reading that code, one small check each, with the
Go function they mirror. Unlike Go, which stops at the first problem, every problem is listed.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import json
import re
import shlex
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping

import jsonschema
import kubernetes_validate
import yaml

KUBECTL = shutil.which("kubectl")
SCHEMA_DIR = Path(__file__).resolve().parent / "kuberay_schemas"
RAY_SCHEMAS = {
    ("ray.io/v1", "RayJob"): "rayjob.v1.json.gz",
    ("ray.io/v1", "RayCluster"): "raycluster.v1.json.gz",
}

# -- Kubernetes name rules (k8s.io/apimachinery/pkg/util/validation) ------------------------

_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS1123_LABEL = re.compile(_LABEL)
_DNS1123_SUBDOMAIN = re.compile(rf"{_LABEL}(\.{_LABEL})*")
_DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_QUALIFIED_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_CONFIG_KEY = re.compile(r"[-._a-zA-Z0-9]+")


def _is_dns1123_label(s: str) -> bool:
    return len(s) <= 63 and bool(_DNS1123_LABEL.fullmatch(s))


def _is_dns1123_subdomain(s: str) -> bool:
    return len(s) <= 253 and bool(_DNS1123_SUBDOMAIN.fullmatch(s))


def _is_dns1035_label(s: str) -> bool:
    return len(s) <= 63 and bool(_DNS1035_LABEL.fullmatch(s))


def _qualified_name_problem(key: str) -> str | None:
    """IsQualifiedName: [prefix/]name, prefix a DNS-1123 subdomain, name <= 63 chars."""
    prefix, slash, name = key.rpartition("/")
    if slash and not _is_dns1123_subdomain(prefix):
        return f"invalid key {key!r}: the prefix must be a DNS-1123 subdomain"
    if len(name) > 63 or not _QUALIFIED_NAME.fullmatch(name):
        return (f"invalid key {key!r}: the name must be at most 63 characters of [-A-Za-z0-9_.], "
                "starting and ending with an alphanumeric")
    return None


def _label_value_problem(value: str) -> str | None:
    if value and (len(value) > 63 or not _QUALIFIED_NAME.fullmatch(value)):
        return f"invalid label value {value!r}: at most 63 characters of [-A-Za-z0-9_.], alphanumeric at both ends"
    return None


def _config_key_problem(key: str) -> str | None:
    """IsConfigMapKey, also used for Secret keys."""
    if len(key) > 253 or not _CONFIG_KEY.fullmatch(key):
        return f"invalid key {key!r}: must consist of alphanumeric characters, '-', '_' or '.'"
    if key in (".", "..") or key.startswith(".."):
        return f"invalid key {key!r}: must not be '.', '..' or start with '..'"
    return None


# -- small accessors that tolerate schema-invalid input (the schema reports those) ---------

def _dict(x: Any) -> dict:
    return x if isinstance(x, dict) else {}


def _list(x: Any) -> list:
    return x if isinstance(x, list) else []


def _int(x: Any) -> int | None:
    return x if isinstance(x, int) and not isinstance(x, bool) else None


def _who(doc: Mapping) -> str:
    name = _dict(doc.get("metadata")).get("name") or "<unnamed>"
    return f"{doc.get('kind', '<no kind>')}/{name}"


def _path(parts: Iterable[Any]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


# == validate ===============================================================================

# ObjectMeta as the API server accepts it at the top of a custom resource (the CRD only says
# `type: object`); server-set fields are allowed because generated YAML often carries them.
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_OBJECT_META = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string"},
        "generateName": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
        "finalizers": {"type": "array", "items": {"type": "string"}},
        "ownerReferences": {"type": "array", "items": {
            "type": "object",
            "additionalProperties": False,
            "required": ["apiVersion", "kind", "name", "uid"],
            "properties": {k: {"type": "string"} for k in ("apiVersion", "kind", "name", "uid")}
            | {"controller": {"type": "boolean"}, "blockOwnerDeletion": {"type": "boolean"}},
        }},
        "uid": {"type": "string"},
        "resourceVersion": {"type": "string"},
        "generation": {"type": "integer"},
        "creationTimestamp": {"type": ["string", "null"]},
        "deletionTimestamp": {"type": ["string", "null"]},
        "deletionGracePeriodSeconds": {"type": "integer"},
        "selfLink": {"type": "string"},
        "managedFields": {"type": "array", "items": {"type": "object"}},
    },
}


def _strict(schema: dict) -> dict:
    """An openAPIV3Schema node rewritten as strict JSON Schema (Draft 7), recursively."""
    s = dict(schema)
    if "properties" in s:
        s["properties"] = {k: _strict(v) for k, v in s["properties"].items()}
    for key in ("additionalProperties", "items"):
        if isinstance(s.get(key), dict):
            s[key] = _strict(s[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in s:
            s[key] = [_strict(v) for v in s[key]]
    # Strict field validation rejects what pruning would drop: any key the schema doesn't list.
    if s.get("type") == "object" and "additionalProperties" not in s \
            and not s.get("x-kubernetes-preserve-unknown-fields"):
        s["additionalProperties"] = False
    if s.get("x-kubernetes-int-or-string"):
        s.pop("type", None)
        s["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if s.get("nullable") and isinstance(s.get("type"), str):
        s["type"] = [s["type"], "null"]
    return s


def load_schema(name: str) -> dict:
    """The vendored v1 openAPIV3Schema (tests/kuberay_schemas/<name>), as upstream wrote it."""
    return json.loads(gzip.decompress((SCHEMA_DIR / name).read_bytes()))


_FORMATS = jsonschema.FormatChecker()
# int32/int64 are the only formats the CRDs use on spec fields; jsonschema has no checker for them.
_FORMATS.checks("int32")(lambda v: _int(v) is None or -2**31 <= v < 2**31)
_FORMATS.checks("int64")(lambda v: _int(v) is None or -2**63 <= v < 2**63)


@lru_cache(maxsize=None)
def _validator(name: str) -> jsonschema.Draft7Validator:
    schema = _strict(load_schema(name))
    schema["properties"]["metadata"] = _OBJECT_META
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata"})
    return jsonschema.Draft7Validator(schema, format_checker=_FORMATS)


def _describe(error: jsonschema.ValidationError) -> list[str]:
    """kubectl-like messages naming the full JSON path of each problem."""
    path = list(error.absolute_path)
    if error.validator == "additionalProperties" and error.validator_value is False:
        known = error.schema.get("properties", {})
        return [f'{_path(path + [k])}: unknown field "{k}"' for k in error.instance if k not in known]
    if error.validator == "required":
        return [f"{_path(path + [k])}: required value" for k in error.validator_value
                if k not in error.instance]
    if error.validator == "anyOf" and error.schema.get("x-kubernetes-int-or-string"):
        return [f"{_path(path)}: {error.instance!r} must be an integer or a string"]
    message = error.message if len(error.message) <= 200 else error.message[:200] + "…"
    return [f"{_path(path)}: {message}"]


_MANAGED_BY = ("ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue")


def _cel_errors(doc: dict) -> list[str]:
    """The CRD's x-kubernetes-validations that apply on create (the `self == oldSelf` ones
    only guard updates)."""
    spec = _dict(doc.get("spec"))
    errors = []
    managed_by = {"spec.managedBy": spec.get("managedBy")}
    if doc["kind"] == "RayJob":
        managed_by["spec.rayClusterSpec.managedBy"] = _dict(spec.get("rayClusterSpec")).get("managedBy")
        if isinstance(strategy := spec.get("deletionStrategy"), dict):
            legacy = "onSuccess" in strategy or "onFailure" in strategy
            if legacy and "deletionRules" in strategy:
                errors.append("spec.deletionStrategy: legacy policies (onSuccess/onFailure) and "
                              "deletionRules cannot be used together within the same deletionStrategy")
            if not (("onSuccess" in strategy and "onFailure" in strategy) or "deletionRules" in strategy):
                errors.append("spec.deletionStrategy: deletionStrategy requires either BOTH onSuccess and "
                              "onFailure, OR the deletionRules field (cannot be empty)")
            for i, rule in enumerate(_list(strategy.get("deletionRules"))):
                condition = _dict(_dict(rule).get("condition"))
                where = f"spec.deletionStrategy.deletionRules[{i}].condition"
                has_status, has_deploy = "jobStatus" in condition, "jobDeploymentStatus" in condition
                if has_status and has_deploy:
                    errors.append(f"{where}: JobStatus and JobDeploymentStatus cannot be used together "
                                  "within the same deletion condition.")
                if not (has_status or has_deploy):
                    errors.append(f"{where}: the deletion condition requires either the JobStatus or "
                                  "the JobDeploymentStatus field.")
    for where, value in managed_by.items():
        if isinstance(value, str) and value not in _MANAGED_BY:
            errors.append(f"{where}: the managedBy field value must be either "
                          f"'{_MANAGED_BY[0]}' or '{_MANAGED_BY[1]}'")
    return errors


@lru_cache(maxsize=1)
def _kubernetes_version() -> str:
    return kubernetes_validate.latest_version()  # the newest schemas the package ships


def _core_errors(doc: dict) -> list[str]:
    try:
        kubernetes_validate.validate(doc, _kubernetes_version(), strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return [f"no schema for kind {doc['kind']!r} in apiVersion {doc['apiVersion']!r} "
                f"(Kubernetes {_kubernetes_version()}, or the vendored KubeRay CRDs)"]
    except kubernetes_validate.ValidationError as error:  # it stops at the first error
        return _describe(error)
    errors = []
    # What the OpenAPI schemas leave to the API server's Go validation.
    if doc["kind"] in ("ConfigMap", "Secret"):
        seen: set[str] = set()
        for field in ("data", "binaryData", "stringData"):
            for key in _dict(doc.get(field)):
                if problem := _config_key_problem(key):
                    errors.append(f"{field}[{key}]: {problem}")
            if doc["kind"] == "ConfigMap":
                if overlap := seen & set(_dict(doc.get(field))):
                    errors.append(f"{field}: keys also in data: {sorted(overlap)}")
                seen |= set(_dict(doc.get(field)))
    if doc["kind"] == "Secret":
        for key, value in _dict(doc.get("data")).items():
            try:
                base64.b64decode(value or "", validate=True)
            except (binascii.Error, ValueError, TypeError):
                errors.append(f"data[{key}]: not valid base64 (use stringData for plain text)")
    return errors


def _metadata_errors(doc: dict) -> list[str]:
    """ObjectMeta rules the schemas don't express: name format, label and annotation keys."""
    meta = doc.get("metadata")
    if not isinstance(meta, dict):
        return []
    errors = []
    name = meta.get("name")
    if not name and not meta.get("generateName"):
        errors.append("metadata.name: required value")
    elif isinstance(name, str) and name:
        kind = doc.get("kind")
        if kind == "Service" and not _is_dns1035_label(name):
            errors.append(f"metadata.name: {name!r} is not a DNS-1035 label (a Service name is one)")
        elif kind == "Namespace" and not _is_dns1123_label(name):
            errors.append(f"metadata.name: {name!r} is not a DNS-1123 label")
        elif not _is_dns1123_subdomain(name):
            errors.append(f"metadata.name: {name!r} is not a DNS-1123 subdomain")
    if isinstance(ns := meta.get("namespace"), str) and not _is_dns1123_label(ns):
        errors.append(f"metadata.namespace: {ns!r} is not a DNS-1123 label")
    for key, value in _dict(meta.get("labels")).items():
        if problem := _qualified_name_problem(key):
            errors.append(f"metadata.labels: {problem}")
        if isinstance(value, str) and (problem := _label_value_problem(value)):
            errors.append(f"metadata.labels[{key}]: {problem}")
    annotations = _dict(meta.get("annotations"))
    for key in annotations:
        if problem := _qualified_name_problem(key):
            errors.append(f"metadata.annotations: {problem}")
    if sum(len(k) + len(str(v)) for k, v in annotations.items()) > 256 * 1024:
        errors.append("metadata.annotations: total size must be at most 256 KiB")
    return errors


def validate(doc: dict) -> list[str]:
    """Problems the API server would report for ``kubectl apply --validate=strict`` of doc.

    Empty when valid. Each string starts with ``Kind/name:`` and names the JSON path.
    """
    if not isinstance(doc, dict):
        return [f"<document>: not a mapping but {type(doc).__name__}"]
    who = _who(doc)
    api_version, kind = doc.get("apiVersion"), doc.get("kind")
    if not isinstance(api_version, str) or not isinstance(kind, str):
        return [f"{who}: apiVersion and kind must both be set"]
    if (api_version, kind) in RAY_SCHEMAS:
        validator = _validator(RAY_SCHEMAS[api_version, kind])
        errors = [m for e in validator.iter_errors(doc) for m in _describe(e)] + _cel_errors(doc)
    else:
        errors = _core_errors(doc)
    errors += _metadata_errors(doc)
    return [f"{who}: {e}" for e in sorted(set(errors))]


# == controller_violations ==================================================================

# pkg/features/features.go defaults for the gates the validation reads.
FEATURE_GATE_DEFAULTS = {
    "RayJobDeletionPolicy": True,  # Beta
    "RayClusterNetworkPolicy": False,  # Alpha
    "GCSFaultToleranceEmbeddedStorage": False,
    "RayClusterMTLS": False,
    "RayClusterHistoryServer": False,
}
MAX_RAYCLUSTER_NAME = 53  # utils/constant.go MaxRayClusterNameLength: 63 - len("-serve-svc")
MAX_RAYJOB_NAME = MAX_RAYCLUSTER_NAME - 6  # MaxRayJobNameLength: the cluster gets a "-xxxxx" suffix
SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")  # rayjob_types.go
CLUSTER_SELECTOR_KEY = "ray.io/cluster"  # RayJobClusterSelectorKey
AUTOSCALER_V2_ENV = "RAY_enable_autoscaler_v2"


def _version(text: Any) -> tuple[int, ...] | None:
    """k8s.io/apimachinery util/version.ParseGeneric: at least two numeric fields."""
    match = re.match(r"\s*v?(\d+(?:\.\d+)+)", text) if isinstance(text, str) else None
    return tuple(int(p) for p in match.group(1).split(".")) if match else None


def _at_least(version: tuple[int, ...], minimum: tuple[int, ...]) -> bool:
    width = max(len(version), len(minimum))
    return version + (0,) * (width - len(version)) >= minimum + (0,) * (width - len(minimum))


def _env(container: Any) -> dict[str, Any]:
    return {e.get("name"): e.get("value") for e in _list(_dict(container).get("env")) if isinstance(e, dict)}


def _pod_spec(group: dict) -> dict:
    return _dict(_dict(group.get("template")).get("spec"))


def _name_violations(kind: str, name: Any, limit: int) -> list[str]:
    """ValidateRayJobMetadata / ValidateRayClusterMetadata."""
    if not isinstance(name, str):
        return []
    out = []
    if len(name) > limit:
        out.append(f"metadata.name: {kind} name should be no more than {limit} characters")
    if not _is_dns1035_label(name):
        out.append(f"metadata.name: {kind} name should be a valid DNS1035 label "
                   "(lower case alphanumeric or '-', starting with a letter)")
    return out


def _group_violations(at: str, group_name: str, group: dict) -> list[str]:
    """validateRayGroupResources and validateRayGroupLabels, for one head or worker group."""
    out = []
    params = _dict(group.get("rayStartParams"))
    if any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")) and group.get("resources"):
        out.append(f"{at}: resource fields should not be set in both rayStartParams and Resources for "
                   f"{group_name} group; please use only one")
    if "labels" in params:
        out.append(f"{at}.rayStartParams: rayStartParams['labels'] is not supported for {group_name} "
                   "group; please use the top-level Labels field instead")
    for key, value in _dict(group.get("labels")).items():
        for problem in (_qualified_name_problem(key), _label_value_problem(str(value))):
            if problem:
                out.append(f"{at}.labels: {problem}")
    return out


def _autoscaler(spec: dict) -> tuple[bool, bool, bool]:
    """(IsAutoscalingEnabled, IsAutoscalingV2Enabled, autoscaler v2 asked for by the head's env)."""
    head_env = _env((_list(_pod_spec(_dict(spec.get("headGroupSpec"))).get("containers")) or [{}])[0])
    return (spec.get("enableInTreeAutoscaling") is True,
            _dict(spec.get("autoscalerOptions")).get("version") == "v2",
            str(head_env.get(AUTOSCALER_V2_ENV)) in ("1", "true"))


def _worker_group_violations(spec: dict, gates: Mapping[str, bool], at: str) -> list[str]:
    """The worker-group part of ValidateRayClusterSpec, plus the webhook's validateWorkerGroups."""
    autoscaling, autoscaler_v2, v2_by_env = _autoscaler(spec)
    ray_version = _version(spec.get("rayVersion"))
    out: list[str] = []
    names: set[Any] = set()
    for i, group in enumerate(_list(spec.get("workerGroupSpecs"))):
        group, where = _dict(group), f"{at}.workerGroupSpecs[{i}]"
        name = group.get("groupName")
        if name in names:  # raycluster_webhook.go validateWorkerGroups
            out.append(f"{where}.groupName: worker group names must be unique ({name!r})")
        names.add(name)
        if not _list(_pod_spec(group).get("containers")):
            out.append(f"{where}.template.spec.containers: workerGroupSpec should have at least one container")
        low, high = _int(group.get("minReplicas")), _int(group.get("maxReplicas"))
        if not autoscaling and (low is None or high is None):
            out.append(f"{where}: worker group {name} must set both minReplicas and maxReplicas "
                       "when autoscaling is disabled")
        for field, value in (("minReplicas", low), ("maxReplicas", high)):
            if value is not None and value < 0:
                out.append(f"{where}.{field}: worker group {name} has negative {field} {value}")
        if low is not None and high is not None and low > high:
            out.append(f"{where}: worker group {name} has minReplicas {low} greater than maxReplicas {high}")
        # Not a rejection: GetWorkerGroupDesiredReplicas (utils/util.go) silently clamps replicas
        # into [minReplicas, maxReplicas], so the manifest would not say how many workers run.
        replicas = _int(group.get("replicas"))
        if replicas is not None and low is not None and replicas < low:
            out.append(f"{where}.replicas: {replicas} < minReplicas {low}: KubeRay silently runs {low}")
        if replicas is not None and high is not None and replicas > high:
            out.append(f"{where}.replicas: {replicas} > maxReplicas {high}: KubeRay silently runs {high}")
        out += _group_violations(where, str(name), group)
        # validateWorkerGroupIdleTimeout
        if (idle := _int(group.get("idleTimeoutSeconds"))) is not None:
            if idle < 0:
                out.append(f"{where}.idleTimeoutSeconds: must be non-negative")
            elif not (autoscaler_v2 or v2_by_env):
                out.append(f"{where}.idleTimeoutSeconds: is set, but autoscaler v2 is not enabled "
                           "(set spec.autoscalerOptions.version: v2)")
        # validateWorkerGroupPriority
        if _int(group.get("priority")):
            if ray_version is None or not _at_least(ray_version, (2, 56, 0)):
                out.append(f"{where}.priority: needs rayVersion 2.56.0 or later")
            elif not (autoscaler_v2 or v2_by_env):
                out.append(f"{where}.priority: priority is only supported with autoscaler v2 enabled")
        if group.get("suspend") is True:
            if not gates["RayJobDeletionPolicy"]:
                out.append(f"{where}.suspend: worker group {name} can be suspended only when the "
                           "RayJobDeletionPolicy feature gate is enabled")
            if autoscaling:
                out.append(f"{where}.suspend: worker group {name} cannot be suspended with Autoscaler enabled")
        if autoscaling and autoscaler_v2 and _pod_spec(group).get("restartPolicy") not in (None, "", "Never"):
            out.append(f"{where}.template.spec.restartPolicy: should be Never or unset when using autoscaler V2")

    return out


def _cluster_spec_violations(spec: dict, annotations: dict, gates: Mapping[str, bool], at: str) -> list[str]:
    """ValidateRayClusterSpec."""
    head = _dict(spec.get("headGroupSpec"))
    head_pod = _pod_spec(head)
    if not _list(head_pod.get("containers")):
        return [f"{at}.headGroupSpec.template.spec.containers: headGroupSpec should have at least one container"]
    # KubeRay takes containers[0] to be the Ray container (RayContainerIndex = 0).
    head_env = _env(head_pod["containers"][0])
    head_params = _dict(head.get("rayStartParams"))
    autoscaling, autoscaler_v2, v2_by_env = _autoscaler(spec)
    options = _dict(spec.get("autoscalerOptions"))
    ray_version = _version(spec.get("rayVersion"))
    out = _group_violations(f"{at}.headGroupSpec", "Head", head)
    out += _worker_group_violations(spec, gates, at)

    # GCS fault tolerance (IsGCSFaultToleranceEnabled: annotation or options).
    ft_options = spec.get("gcsFaultToleranceOptions")
    ft_annotation = str(annotations.get("ray.io/ft-enabled", ""))
    if ft_annotation and ft_options is not None:
        out.append(f"{at}.gcsFaultToleranceOptions: ray.io/ft-enabled annotation and GcsFaultToleranceOptions "
                   "are both set. Please use only GcsFaultToleranceOptions")
    if ft_options is None and ft_annotation.lower() != "true" and "RAY_REDIS_ADDRESS" in head_env:
        out.append(f"{at}.headGroupSpec: RAY_REDIS_ADDRESS is set which implicitly enables GCS fault "
                   "tolerance, but GcsFaultToleranceOptions is not set")
    if ft_options is not None:
        if head_params.get("redis-password"):
            out.append(f"{at}.headGroupSpec.rayStartParams: cannot set `redis-password` when "
                       "GcsFaultToleranceOptions is enabled")
        for env in ("REDIS_PASSWORD", "RAY_REDIS_ADDRESS"):
            if env in head_env:
                out.append(f"{at}.headGroupSpec: cannot set `{env}` env var in head Pod when "
                           "GcsFaultToleranceOptions is enabled")
        if annotations.get("ray.io/external-storage-namespace"):
            out.append("metadata.annotations: cannot set `ray.io/external-storage-namespace` when "
                       "GcsFaultToleranceOptions is enabled")
        ft = _dict(ft_options)
        if ft.get("backend") == "rocksdb" and not gates["GCSFaultToleranceEmbeddedStorage"]:
            out.append(f"{at}.gcsFaultToleranceOptions.backend: 'rocksdb' requires the "
                       "GCSFaultToleranceEmbeddedStorage feature gate")
        if ft.get("backend", "redis") == "redis" and "storage" in ft:
            out.append(f"{at}.gcsFaultToleranceOptions.storage: only applies to the 'rocksdb' backend")
    if head_params.get("redis-username") or "REDIS_USERNAME" in head_env:
        out.append(f"{at}.headGroupSpec: cannot set redis username in rayStartParams or environment "
                   "variables - use GcsFaultToleranceOptions.RedisUsername instead")

    # Autoscaler.
    if not autoscaling and v2_by_env:
        out.append(f"{at}.headGroupSpec: environment variable {AUTOSCALER_V2_ENV} cannot be set to "
                   f"{head_env[AUTOSCALER_V2_ENV]!r} when enableInTreeAutoscaling is false")
    if autoscaling and "version" in options and AUTOSCALER_V2_ENV in head_env:
        out.append(f"{at}: both .autoscalerOptions.version and head Pod env var {AUTOSCALER_V2_ENV} are set")
    if autoscaling and autoscaler_v2 and head_pod.get("restartPolicy") not in (None, "", "Never"):
        out.append(f"{at}.headGroupSpec.template.spec.restartPolicy: should be Never or unset when "
                   "using autoscaler V2")
    if (_int(options.get("idleTimeoutSeconds")) or 0) < 0:
        out.append(f"{at}.autoscalerOptions.idleTimeoutSeconds: must be non-negative")
    if "KUBERAY_GEN_AUTOSCALER_START_CMD" in _env(options):
        out.append(f"{at}.autoscalerOptions.env: must not contain KUBERAY_GEN_AUTOSCALER_START_CMD")

    # Token authentication (IsAuthEnabled, IsK8sAuthEnabled).
    auth = _dict(spec.get("authOptions"))
    k8s_auth = auth.get("enableK8sTokenAuth") is True
    if auth.get("mode") == "token":
        if not spec.get("rayVersion"):
            out.append(f"{at}.rayVersion: authOptions.mode is 'token' but RayVersion was not specified. "
                       "Ray version 2.52.0 or later is required")
        elif ray_version is None:
            out.append(f"{at}.rayVersion: authOptions.mode is 'token' but RayVersion format is invalid")
        elif not _at_least(ray_version, (2, 52, 0)):
            out.append(f"{at}.rayVersion: authOptions.mode is 'token' but minimum Ray version is 2.52.0")
        elif k8s_auth and not _at_least(ray_version, (2, 55, 0)):
            out.append(f"{at}.rayVersion: authOptions.enableK8sTokenAuth needs Ray 2.55.0 or later")
        if k8s_auth and auth.get("secretName"):
            out.append(f"{at}.authOptions: enableK8sTokenAuth is enabled and secretName is also set")
    elif k8s_auth:
        out.append(f"{at}.authOptions: enableK8sTokenAuth is enabled but mode is not 'token'")

    # Alpha features behind gates that are off by default.
    for field, gate in (("historyServerOptions", "RayClusterHistoryServer"),
                        ("networkPolicy", "RayClusterNetworkPolicy"), ("tlsOptions", "RayClusterMTLS")):
        if field in spec and not gates[gate]:
            out.append(f"{at}.{field}: requires the {gate} feature gate to be enabled")
    return out


def _deletion_violations(spec: dict, autoscaling: bool, gates: Mapping[str, bool]) -> list[str]:
    """validateDeletionConfiguration, validateLegacyDeletionPolicies, validateDeletionRules."""
    shutdown = spec.get("shutdownAfterJobFinishes") is True
    selector_mode = bool(_dict(spec.get("clusterSelector")))
    out = []
    if not shutdown and (_int(spec.get("ttlSecondsAfterFinished")) or 0) > 0:
        out.append("spec.ttlSecondsAfterFinished: a RayJob with shutdownAfterJobFinishes set to false "
                   "cannot have TTLSecondsAfterFinished")
    if "deletionStrategy" not in spec:
        return out
    if not gates["RayJobDeletionPolicy"]:
        return out + ["spec.deletionStrategy: RayJobDeletionPolicy feature gate must be enabled"]
    strategy = _dict(spec.get("deletionStrategy"))
    legacy = strategy.get("onSuccess") is not None or strategy.get("onFailure") is not None
    rules = _list(strategy.get("deletionRules"))
    if rules and shutdown:
        out.append("spec.deletionStrategy.deletionRules: spec.shutdownAfterJobFinishes and "
                   "spec.deletionStrategy.deletionRules are mutually exclusive")
    if rules and legacy:
        return out + ["spec.deletionStrategy: cannot use both legacy onSuccess/onFailure and deletionRules"]
    if legacy:
        policies = {k: _dict(strategy.get(k)).get("policy") for k in ("onSuccess", "onFailure")}
        for key, policy in policies.items():
            if policy is None:
                out.append(f"spec.deletionStrategy.{key}.policy: must be set when using the legacy "
                           "deletion policy fields")
            elif selector_mode and policy in ("DeleteCluster", "DeleteWorkers"):
                out.append(f"spec.deletionStrategy.{key}: the ClusterSelector mode doesn't support {policy}")
            elif autoscaling and policy == "DeleteWorkers":
                out.append(f"spec.deletionStrategy.{key}: DeleteWorkers does not support autoscaling")
            elif shutdown and policy == "DeleteNone":
                out.append(f"spec.deletionStrategy.{key}: shutdownAfterJobFinishes is true while the "
                           "deletion policy is DeleteNone")
        return out
    if not rules:
        return out + ["spec.deletionStrategy: requires either BOTH onSuccess and onFailure, "
                      "OR the deletionRules field (cannot be empty)"]
    ttls: dict[tuple[str, Any], dict[Any, int]] = {}
    for i, rule in enumerate(rules):
        rule, where = _dict(rule), f"spec.deletionStrategy.deletionRules[{i}]"
        condition, policy = _dict(rule.get("condition")), rule.get("policy")
        if ("jobStatus" in condition) == ("jobDeploymentStatus" in condition):
            out.append(f"{where}.condition: exactly one of JobStatus and JobDeploymentStatus must be set")
            continue
        if (ttl := _int(condition.get("ttlSeconds")) or 0) < 0:
            out.append(f"{where}.condition.ttlSeconds: TTLSeconds must be non-negative")
            continue
        if selector_mode and policy in ("DeleteCluster", "DeleteWorkers"):
            out.append(f"{where}.policy: '{policy}' not supported when ClusterSelector is set")
            continue
        if autoscaling and policy == "DeleteWorkers":
            out.append(f"{where}.policy: 'DeleteWorkers' not supported with autoscaling enabled")
            continue
        key = ("jobStatus", condition["jobStatus"]) if "jobStatus" in condition \
            else ("jobDeploymentStatus", condition["jobDeploymentStatus"])
        if policy in ttls.setdefault(key, {}):
            out.append(f"{where}: duplicate rule for policy '{policy}' and {key[0]} '{key[1]}'")
            continue
        ttls[key][policy] = ttl
    for (field, value), by_policy in ttls.items():  # validateTTLConsistency: Workers <= Cluster <= Self
        order = [(p, by_policy[p]) for p in ("DeleteWorkers", "DeleteCluster", "DeleteSelf") if p in by_policy]
        for (before, t1), (after, t2) in zip(order, order[1:], strict=False):
            if t2 < t1:
                out.append(f"spec.deletionStrategy.deletionRules: for {field} '{value}': "
                           f"{after} TTL ({t2}) must be >= {before} TTL ({t1})")
    return out


def _rayjob_spec_violations(spec: dict, annotations: dict, gates: Mapping[str, bool]) -> list[str]:
    """ValidateRayJobSpec."""
    shutdown = spec.get("shutdownAfterJobFinishes") is True
    suspend = spec.get("suspend") is True
    selector = _dict(spec.get("clusterSelector"))
    mode = spec.get("submissionMode", "K8sJobMode")
    backoff = _int(spec.get("backoffLimit"))
    cluster = spec.get("rayClusterSpec")
    autoscaling = _dict(cluster).get("enableInTreeAutoscaling") is True
    out = []
    if suspend and not shutdown:
        out.append("spec.suspend: a RayJob with shutdownAfterJobFinishes set to false is not allowed "
                   "to be suspended")
    if (_int(spec.get("ttlSecondsAfterFinished")) or 0) < 0:
        out.append("spec.ttlSecondsAfterFinished: TTLSecondsAfterFinished must be a non-negative integer")
    out += _deletion_violations(spec, autoscaling, gates)
    if cluster is None and not selector:
        out.append("spec: one of rayClusterSpec or clusterSelector must be set")
    if selector:
        if suspend:
            out.append("spec.suspend: the ClusterSelector mode doesn't support the suspend operation")
        if not selector.get(CLUSTER_SELECTOR_KEY):
            out.append(f"spec.clusterSelector: cluster name in ClusterSelector ({CLUSTER_SELECTOR_KEY}) "
                       "should not be empty")
        if mode == "SidecarMode":
            out.append("spec.clusterSelector: ClusterSelector is not supported in SidecarMode")
        if (backoff or 0) > 0:
            out.append("spec.backoffLimit: BackoffLimit is incompatible with ClusterSelector mode")
    if mode not in SUBMISSION_MODES:  # not in the CRD (no enum); the controller has no branch for it
        out.append(f"spec.submissionMode: {mode!r} is not one of {', '.join(SUBMISSION_MODES)}")
    if mode == "InteractiveMode" and (backoff or 0) > 0:
        out.append("spec.backoffLimit: BackoffLimit is incompatible with InteractiveMode")
    if mode == "SidecarMode":
        for field in ("submitterPodTemplate", "submitterConfig"):
            if spec.get(field) is not None:
                out.append(f"spec.{field}: Currently, SidecarMode doesn't support {field}")
        restart = _pod_spec(_dict(_dict(cluster).get("headGroupSpec"))).get("restartPolicy")
        if restart not in (None, "", "Never"):
            out.append("spec.rayClusterSpec.headGroupSpec.template.spec.restartPolicy: should be Never "
                       "or unset when using SidecarMode")
    if isinstance(cluster, dict):
        if _dict(cluster.get("authOptions")).get("enableK8sTokenAuth") is True:
            out.append("spec.rayClusterSpec.authOptions.enableK8sTokenAuth: K8s token auth mode is "
                       "currently not supported for RayJob")
        out += _cluster_spec_violations(cluster, annotations, gates, "spec.rayClusterSpec")
        # ValidateRayClusterUpgradeOptions, on the RayCluster the RayJob creates.
        if _dict(cluster.get("upgradeStrategy")).get("type") is not None:
            out.append("spec.rayClusterSpec.upgradeStrategy: upgradeStrategy cannot be set when "
                       "RayCluster is created by RayJob")
    # dashboardclient.UnmarshalRuntimeEnvYAML: YAML into map[string]interface{}.
    if problem := _runtime_env_problem(spec.get("runtimeEnvYAML")):
        out.append(f"spec.runtimeEnvYAML: {problem}")
    for field in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
        if (value := _int(spec.get(field))) is not None and value <= 0:
            out.append(f"spec.{field}: {field} must be a positive integer")
    if (backoff or 0) < 0:
        out.append("spec.backoffLimit: backoffLimit must be a positive integer")
    # Not in validation.go: BuildJobSubmitCommand would run `ray job submit ... --` with nothing
    # after it, and HTTPMode would POST an empty entrypoint; only InteractiveMode waits for one.
    if mode != "InteractiveMode" and not str(spec.get("entrypoint") or "").strip():
        out.append(f"spec.entrypoint: required in {mode}")
    return out


def controller_violations(doc: dict, feature_gates: Mapping[str, bool] | None = None) -> list[str]:
    """KubeRay operator-side problems with a RayJob or RayCluster (empty for other kinds).

    feature_gates overrides FEATURE_GATE_DEFAULTS (the operator's --feature-gates).
    Each string starts with ``Kind/name:`` and names the JSON path.
    """
    gates = {**FEATURE_GATE_DEFAULTS, **(feature_gates or {})}
    if not isinstance(doc, dict) or doc.get("apiVersion") != "ray.io/v1":
        return []
    meta, spec = _dict(doc.get("metadata")), _dict(doc.get("spec"))
    annotations = _dict(meta.get("annotations"))
    if doc.get("kind") == "RayJob":
        out = _name_violations("RayJob", meta.get("name"), MAX_RAYJOB_NAME)
        out += _rayjob_spec_violations(spec, annotations, gates)
    elif doc.get("kind") == "RayCluster":
        out = _name_violations("RayCluster", meta.get("name"), MAX_RAYCLUSTER_NAME)
        out += _cluster_spec_violations(spec, annotations, gates, "spec")
        if _dict(spec.get("upgradeStrategy")).get("type") not in (None, "Recreate", "None"):
            out.append("spec.upgradeStrategy.type: valid options are Recreate or None")
    else:
        return []
    who = _who(doc)
    return [f"{who}: {v}" for v in out]


# -- runtimeEnvYAML as Go's sigs.k8s.io/yaml reads it ---------------------------------------

class _GoYAMLLoader(yaml.SafeLoader):
    """YAML 1.1 like go-yaml v2, but timestamps stay strings (as they do decoding into interface{})."""


_GoYAMLLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _runtime_env_problem(text: Any) -> str | None:
    if not isinstance(text, str) or not text.strip():
        return None
    try:
        value = yaml.load(text, Loader=_GoYAMLLoader)
    except yaml.YAMLError as error:
        return f"not valid YAML: {str(error).splitlines()[0]}"
    if value is not None and not isinstance(value, dict):
        return f"must be a YAML mapping, got {type(value).__name__}"
    return None


# == kustomize ==============================================================================

def kustomize(directory: str | Path) -> list[dict]:
    """The documents ``kubectl kustomize DIRECTORY`` builds (runs offline)."""
    if not KUBECTL:
        raise RuntimeError("kubectl is not installed: cannot run `kubectl kustomize`")
    result = subprocess.run([KUBECTL, "kustomize", str(directory)], capture_output=True, text=True,
                            timeout=120, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {directory} failed (exit {result.returncode}):\n"
                           f"{result.stderr.strip()}")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return [doc for doc in yaml.load_all(result.stdout, Loader=loader) if doc is not None]


# == submitter_command ======================================================================

def _go_quote(s: str) -> str:
    """Go's strconv.Quote (KubeRay quotes the JSON flag values with it)."""
    escapes = {'"': '\\"', "\\": "\\\\", "\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n",
               "\r": "\\r", "\t": "\\t", "\v": "\\v"}
    out = []
    for ch in s:
        if ch in escapes:
            out.append(escapes[ch])
        elif ch.isprintable():
            out.append(ch)
        else:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x80 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return '"' + "".join(out) + '"'


def _go_json(value: Any) -> str:
    """encoding/json.Marshal: sorted map keys, compact, HTML characters escaped, 1.0 -> 1."""
    def normal(v: Any) -> Any:
        if isinstance(v, dict):
            return {_go_key(k): normal(x) for k, x in v.items()}
        if isinstance(v, list):
            return [normal(x) for x in v]
        if isinstance(v, float) and v.is_integer() and abs(v) < 1e21:
            return int(v)
        return v
    text = json.dumps(normal(value), separators=(",", ":"), sort_keys=True, ensure_ascii=False)
    for ch, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                        ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, escaped)
    return text


def _go_key(key: Any) -> str:
    """sigs.k8s.io/yaml turns non-string YAML keys into their Go text form."""
    if isinstance(key, bool):
        return "true" if key else "false"
    return "null" if key is None else str(key)


def _kuberay_tokens(rayjob: dict, address: str, submission_id: str) -> list[str]:
    """The `ray job submit` part of BuildJobSubmitCommand's token list, before bash sees it."""
    spec = _dict(rayjob.get("spec"))
    mode = spec.get("submissionMode", "K8sJobMode")
    if mode not in ("K8sJobMode", "SidecarMode"):
        raise ValueError(f"submissionMode {mode!r} runs no submitter (K8sJobMode and SidecarMode do)")
    if not address.startswith("http://"):
        address = "http://" + address
    tokens = ["ray", "job", "submit", "--address", address]
    if mode == "K8sJobMode":  # the submitter Job may retry: submit without waiting, then follow logs
        tokens.append("--no-wait")
    runtime_env = spec.get("runtimeEnvYAML") or ""
    if runtime_env:
        if problem := _runtime_env_problem(runtime_env):
            raise ValueError(f"runtimeEnvYAML: {problem}")
        tokens += ["--runtime-env-json", _go_quote(_go_json(yaml.load(runtime_env, Loader=_GoYAMLLoader)))]
    if metadata := _dict(spec.get("metadata")):
        ray_version = _dict(spec.get("rayClusterSpec")).get("rayVersion")
        if ray_version and not _at_least(_version(ray_version) or (0,), (2, 6, 0)):
            raise ValueError("the Ray version must be at least 2.6.0 to use the metadata field")
        tokens += ["--metadata-json", _go_quote(_go_json(metadata))]
    if submission_id:
        tokens += ["--submission-id", submission_id]
    for field, flag in (("entrypointNumCpus", "--entrypoint-num-cpus"), ("entrypointNumGpus", "--entrypoint-num-gpus")):
        if (spec.get(field) or 0) > 0:
            tokens += [flag, "%f" % spec[field]]
    if spec.get("entrypointResources"):
        tokens += ["--entrypoint-resources", _go_quote(spec["entrypointResources"])]
    return tokens + ["--", str(spec.get("entrypoint") or "").strip()]


def submitter_command(rayjob: dict, address: str, submission_id: str) -> list[str]:
    """The argv ``ray job submit`` receives in KubeRay's submitter for this RayJob.

    Source: ray-project/kuberay ray-operator/controllers/ray/common/job.go BuildJobSubmitCommand
    (called by GetK8sJobCommand; expected output pinned in job_test.go
    TestBuildJobSubmitCommandWithK8sJobMode). KubeRay builds a token list
    ``ray job submit --address A --no-wait [--runtime-env-json J] [--metadata-json M]
    [--submission-id ID] [--entrypoint-num-cpus %f] [--entrypoint-num-gpus %f]
    [--entrypoint-resources R] -- ENTRYPOINT`` (J, M, R Go-quoted; ENTRYPOINT one token, trimmed),
    joins it with spaces and runs it as ``/bin/bash -c`` (rayjob_controller.go), so bash splits the
    entrypoint into words. This returns what bash hands to ``ray``: the same split, done with shlex.
    address is Status.DashboardURL (``http://`` is added if missing), submission_id Status.JobId.
    In SidecarMode there is no ``--no-wait``.

    Left out, on purpose: the wrapper around it, which differs between KubeRay versions and is
    shell, not argv: ``if ! ray job status --address A ID >/dev/null 2>&1 ; then <this> ; fi ;
    ray job logs --address A --follow ID`` (so a retried submitter Job does not resubmit), and in
    newer versions a preceding ``until <dashboard GCS health check>; do sleep 2; done`` loop.
    Raises ValueError where bash would not pass the text through verbatim: ``$`` or backquotes
    anywhere (bash expands them in the submitter Pod, even inside the JSON flags), or shell
    operators / newlines / comments in the entrypoint (bash would run them as separate commands
    in the submitter, not in the Ray job).
    """
    template = _dict(_dict(rayjob.get("spec")).get("submitterPodTemplate"))
    containers = _list(_dict(template.get("spec")).get("containers"))
    if containers and _dict(containers[0]).get("command"):
        # rayjob_controller.go getSubmitterTemplate: a command in the template replaces KubeRay's.
        raise ValueError("submitterPodTemplate's first container sets a command: KubeRay runs it instead")
    tokens = _kuberay_tokens(rayjob, address, submission_id)
    line = " ".join(tokens)
    if "$" in line or "`" in line:
        raise ValueError("'$' or '`' in the submit command: bash expands it in the submitter Pod")
    raw = shlex.shlex(tokens[-1], posix=False, punctuation_chars="();<>|&\n")
    raw.whitespace, raw.whitespace_split, raw.commenters = " \t\r", True, ""
    for word in raw:
        if set(word) <= set("();<>|&\n") or word.startswith("#"):
            raise ValueError(f"entrypoint has shell syntax {word!r}: bash runs it in the submitter "
                             "Pod, not as part of the Ray job's entrypoint")
    words = shlex.shlex(line, posix=True)
    words.whitespace_split, words.commenters = True, ""
    return list(words)
