"""The offline manifest harness (tests/kuberay.py) itself: it must accept good manifests and
reject bad ones with a message naming the path. Fast, no Ray, no cluster."""

import copy
import importlib.util
from pathlib import Path

import pytest
import yaml
from kuberay import KUBECTL, RAY_SCHEMAS, controller_violations, kustomize, load_schema, submitter_command, validate

CRD_DIR = Path("/work/shared/kuberay/crds")


def ray_container(name, cpu):
    return {"name": name, "image": "rayproject/ray:2.60.0",
            "resources": {"limits": {"cpu": cpu, "memory": "4Gi"}}}


def rayjob():
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": "raypar-job", "namespace": "raypar", "labels": {"app.kubernetes.io/name": "raypar"}},
        "spec": {
            "entrypoint": "python -m raypar run /jobs/spec.yaml",
            "runtimeEnvYAML": "env_vars:\n  RAYPAR_MODE: kube\n",
            "backoffLimit": 2,
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 300,
            "rayClusterSpec": {
                "rayVersion": "2.60.0",
                "authOptions": {"mode": "token"},
                "headGroupSpec": {
                    "rayStartParams": {"num-cpus": "0"},
                    "template": {"spec": {"containers": [ray_container("ray-head", "2")]}},
                },
                "workerGroupSpecs": [{
                    "groupName": "workers",
                    "replicas": 2,
                    "minReplicas": 2,
                    "maxReplicas": 2,
                    "rayStartParams": {},
                    "template": {"spec": {"containers": [ray_container("ray-worker", 1)]}},
                }],
            },
        },
    }


def mutated(change):
    doc = rayjob()
    change(doc)
    return doc


def spec(doc):
    return doc["spec"]


def cluster(doc):
    return doc["spec"]["rayClusterSpec"]


def worker(doc):
    return cluster(doc)["workerGroupSpecs"][0]


def test_minimal_rayjob_is_valid():
    assert validate(rayjob()) == []
    assert controller_violations(rayjob()) == []


def test_raycluster_is_valid():
    doc = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "raypar"},
           "spec": copy.deepcopy(cluster(rayjob()))}
    assert validate(doc) == []
    assert controller_violations(doc) == []


# -- schema (API server) ---------------------------------------------------------------------

@pytest.mark.parametrize("change, expected", [
    (lambda d: spec(d).update(backoffLimitt=2), 'spec.backoffLimitt: unknown field "backoffLimitt"'),
    (lambda d: worker(d)["template"]["spec"]["containers"][0].update(imagePullPolicyy="Always"),
     "spec.rayClusterSpec.workerGroupSpecs[0].template.spec.containers[0].imagePullPolicyy: unknown field"),
    (lambda d: worker(d).pop("groupName"), "spec.rayClusterSpec.workerGroupSpecs[0].groupName: required value"),
    (lambda d: spec(d).update(backoffLimit="2"), "spec.backoffLimit: '2' is not of type 'integer'"),
    (lambda d: spec(d).update(backoffLimit=2**31), "spec.backoffLimit: 2147483648 is not a 'int32'"),
    (lambda d: cluster(d)["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
     "spec.rayClusterSpec.headGroupSpec.rayStartParams.num-cpus: 0 is not of type 'string'"),
    (lambda d: cluster(d)["authOptions"].update(mode="Token"),
     "spec.rayClusterSpec.authOptions.mode: 'Token' is not one of ['disabled', 'token']"),
    # int-or-string quantities: an int or a string, never a float
    (lambda d: worker(d)["template"]["spec"]["containers"][0]["resources"]["limits"].update(cpu=1.5),
     "spec.rayClusterSpec.workerGroupSpecs[0].template.spec.containers[0].resources.limits.cpu: 1.5 must be an integer or a string"),
    (lambda d: d["metadata"].update(label={"a": "b"}), 'metadata.label: unknown field "label"'),
    (lambda d: d["metadata"]["labels"].update(team=7), "metadata.labels.team: 7 is not of type 'string'"),
    (lambda d: d["metadata"].update(name="Raypar_Job"), "metadata.name: 'Raypar_Job' is not a DNS-1123 subdomain"),
    (lambda d: d["metadata"]["labels"].update({"bad key!": "x"}), "metadata.labels: invalid key 'bad key!'"),
    (lambda d: d.pop("metadata"), "metadata: required value"),
    # CEL rules of the CRD
    (lambda d: spec(d).update(managedBy="me"), "spec.managedBy: the managedBy field value must be either"),
    (lambda d: spec(d).update(deletionStrategy={"onSuccess": {"policy": "DeleteCluster"}}),
     "spec.deletionStrategy: deletionStrategy requires either BOTH onSuccess and onFailure"),
    (lambda d: spec(d).update(deletionStrategy={"deletionRules": [{"policy": "DeleteSelf", "condition": {}}]}),
     "spec.deletionStrategy.deletionRules[0].condition: the deletion condition requires either"),
])
def test_schema_rejects_with_path(change, expected):
    errors = validate(mutated(change))
    assert any(expected in e for e in errors), errors
    assert all(e.startswith(("RayJob/raypar-job: ", "RayJob/Raypar_Job: ", "RayJob/<unnamed>: ")) for e in errors)


def test_int_or_string_accepts_both():
    doc = rayjob()
    worker(doc)["template"]["spec"]["containers"][0]["resources"]["limits"].update(cpu="1500m", memory=2**33)
    assert validate(doc) == []


def test_unknown_kinds_have_no_schema():
    alpha = mutated(lambda d: d.update(apiVersion="ray.io/v1alpha1"))
    assert "RayJob/raypar-job: no schema for kind 'RayJob' in apiVersion 'ray.io/v1alpha1'" in validate(alpha)[0]
    widget = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    assert "no schema for kind 'Widget'" in validate(widget)[0]


# -- controller rules ------------------------------------------------------------------------

def use_cluster_selector(doc):
    del spec(doc)["rayClusterSpec"]
    spec(doc).update(clusterSelector={"ray.io/cluster": "shared"}, backoffLimit=0)


@pytest.mark.parametrize("change, expected", [
    (lambda d: (use_cluster_selector(d), spec(d).update(backoffLimit=1)),
     "spec.backoffLimit: BackoffLimit is incompatible with ClusterSelector mode"),
    (lambda d: (use_cluster_selector(d), spec(d).update(clusterSelector={"app": "x"})),
     "spec.clusterSelector: cluster name in ClusterSelector (ray.io/cluster) should not be empty"),
    (lambda d: spec(d).update(suspend=True, shutdownAfterJobFinishes=False, ttlSecondsAfterFinished=0),
     "spec.suspend: a RayJob with shutdownAfterJobFinishes set to false is not allowed to be suspended"),
    (lambda d: spec(d).update(shutdownAfterJobFinishes=False),
     "spec.ttlSecondsAfterFinished: a RayJob with shutdownAfterJobFinishes set to false cannot have"),
    (lambda d: spec(d).update(runtimeEnvYAML="env_vars: [unclosed"), "spec.runtimeEnvYAML: not valid YAML"),
    (lambda d: spec(d).update(runtimeEnvYAML="- pip\n- uv\n"), "spec.runtimeEnvYAML: must be a YAML mapping"),
    (lambda d: worker(d).update(minReplicas=3, maxReplicas=4),
     "spec.rayClusterSpec.workerGroupSpecs[0].replicas: 2 < minReplicas 3: KubeRay silently runs 3"),
    (lambda d: worker(d).update(minReplicas=3, maxReplicas=1),
     "spec.rayClusterSpec.workerGroupSpecs[0]: worker group workers has minReplicas 3 greater than maxReplicas 1"),
    (lambda d: cluster(d)["workerGroupSpecs"].append(copy.deepcopy(worker(d))),
     "spec.rayClusterSpec.workerGroupSpecs[1].groupName: worker group names must be unique"),
    (lambda d: spec(d).update(submissionMode="InteractiveMode"),
     "spec.backoffLimit: BackoffLimit is incompatible with InteractiveMode"),
    (lambda d: spec(d).update(submissionMode="K8sJob"), "spec.submissionMode: 'K8sJob' is not one of"),
    (lambda d: spec(d).update(activeDeadlineSeconds=0), "spec.activeDeadlineSeconds: activeDeadlineSeconds must be"),
    (lambda d: spec(d).pop("entrypoint"), "spec.entrypoint: required in K8sJobMode"),
    (lambda d: cluster(d).update(rayVersion="2.51.0"),
     "spec.rayClusterSpec.rayVersion: authOptions.mode is 'token' but minimum Ray version is 2.52.0"),
    (lambda d: cluster(d).pop("rayVersion"), "authOptions.mode is 'token' but RayVersion was not specified"),
    (lambda d: cluster(d)["headGroupSpec"]["template"]["spec"].update(containers=[]),
     "spec.rayClusterSpec.headGroupSpec.template.spec.containers: headGroupSpec should have at least one container"),
    (lambda d: worker(d)["rayStartParams"].update(labels="a=b"),
     "workerGroupSpecs[0].rayStartParams: rayStartParams['labels'] is not supported"),
    (lambda d: d["metadata"].update(name="r" * 48), "metadata.name: RayJob name should be no more than 47"),
    (lambda d: d["metadata"].update(name="1job"), "metadata.name: RayJob name should be a valid DNS1035 label"),
    (lambda d: cluster(d).update(tlsOptions={"enabled": True}),
     "spec.rayClusterSpec.tlsOptions: requires the RayClusterMTLS feature gate"),
])
def test_controller_rules(change, expected):
    doc = mutated(change)
    errors = controller_violations(doc)
    assert any(expected in e for e in errors), errors
    assert all(e.startswith(f"RayJob/{doc['metadata']['name']}: ") for e in errors)


def test_feature_gate_override():
    doc = mutated(lambda d: cluster(d).update(tlsOptions={"enabled": True}))
    assert controller_violations(doc, {"RayClusterMTLS": True}) == []


def test_controller_ignores_core_objects():
    assert controller_violations({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}}) == []


# -- core objects ----------------------------------------------------------------------------

def core(kind, **fields):
    return {"apiVersion": "v1", "kind": kind, "metadata": {"name": "raypar", "namespace": "raypar"}, **fields}


@pytest.mark.parametrize("doc", [
    core("Secret", type="Opaque", stringData={"auth_token": "s3cret", "AZURE_STORAGE_KEY": "k"}),
    core("Secret", data={"auth_token": "czNjcmV0"}),
    core("ConfigMap", data={"spec.yaml": "name: job\n", "run_id": "1"}),
    core("ServiceAccount"),
    core("Service", spec={"selector": {"app": "raypar"}, "ports": [{"port": 8265, "targetPort": "dashboard"}]}),
])
def test_core_objects_pass(doc):
    assert validate(doc) == []


@pytest.mark.parametrize("doc, expected", [
    (core("ConfigMap", data={"jobs/spec.yaml": "x"}), "ConfigMap/raypar: data[jobs/spec.yaml]: invalid key"),
    (core("ConfigMap", dataa={"a": "b"}), 'ConfigMap/raypar: dataa: unknown field "dataa"'),
    (core("ConfigMap", data={"n": 1}), "ConfigMap/raypar: data.n: 1 is not of type"),
    (core("Secret", data={"token": "not base64!"}), "Secret/raypar: data[token]: not valid base64"),
    (core("ServiceAccount", metadata={"name": "Raypar"}), "ServiceAccount/Raypar: metadata.name: 'Raypar' is not"),
])
def test_core_objects_fail(doc, expected):
    errors = validate(doc)
    assert any(expected in e for e in errors), errors


# -- kustomize -------------------------------------------------------------------------------

@pytest.mark.skipif(not KUBECTL, reason="kubectl is not installed: kustomize overlays are not built")
def test_kustomize_builds_and_validates(tmp_path):
    (tmp_path / "rayjob.yaml").write_text(yaml.safe_dump(rayjob()))
    (tmp_path / "kustomization.yaml").write_text(
        "namespace: raypar-test\nresources: [rayjob.yaml]\n"
        "configMapGenerator:\n- name: raypar-spec\n  literals: [run_id=1]\n")
    docs = kustomize(tmp_path)
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "RayJob"]
    assert {d["metadata"]["namespace"] for d in docs} == {"raypar-test"}
    assert [e for d in docs for e in validate(d) + controller_violations(d)] == []


@pytest.mark.skipif(not KUBECTL, reason="kubectl is not installed: kustomize overlays are not built")
def test_kustomize_failure_carries_stderr(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: [missing.yaml]\n")
    with pytest.raises(RuntimeError, match="missing.yaml"):
        kustomize(tmp_path)


# -- submitter command -----------------------------------------------------------------------

def test_submitter_command_matches_kuberay_k8sjobmode():
    doc = mutated(lambda d: spec(d).update(metadata={"owner": "raypar"}, entrypointNumCpus=1,
                                           entrypoint=" python -m raypar run 'a b.yaml' "))
    assert submitter_command(doc, "raypar-job-head-svc.raypar.svc.cluster.local:8265", "raypar-job-abcde") == [
        "ray", "job", "submit", "--address", "http://raypar-job-head-svc.raypar.svc.cluster.local:8265",
        "--no-wait",
        "--runtime-env-json", '{"env_vars":{"RAYPAR_MODE":"kube"}}',
        "--metadata-json", '{"owner":"raypar"}',
        "--submission-id", "raypar-job-abcde",
        "--entrypoint-num-cpus", "1.000000",
        "--", "python", "-m", "raypar", "run", "a b.yaml",
    ]


@pytest.mark.parametrize("entrypoint", ["python a.py && echo done", "python a.py --out $OUT", "a.py\nb.py"])
def test_submitter_command_refuses_shell_syntax(entrypoint):
    with pytest.raises(ValueError, match="bash"):
        submitter_command(mutated(lambda d: spec(d).update(entrypoint=entrypoint)), "http://h:8265", "id")


def test_submitter_template_command_replaces_kuberay_command():
    doc = mutated(lambda d: spec(d).update(submitterPodTemplate={"spec": {"restartPolicy": "Never", "containers": [
        {"name": "submitter", "image": "rayproject/ray:2.60.0", "command": ["sh", "-c", "true"]}]}}))
    assert validate(doc) == []
    with pytest.raises(ValueError, match="sets a command"):
        submitter_command(doc, "http://h:8265", "id")


# -- vendored schemas ------------------------------------------------------------------------

@pytest.mark.skipif(not CRD_DIR.is_dir(), reason=f"{CRD_DIR} not present: nothing to compare the vendored schemas to")
def test_vendored_schemas_match_crds():
    path = Path(__file__).parent / "kuberay_schemas" / "update.py"
    spec_ = importlib.util.spec_from_file_location("kuberay_schemas_update", path)
    update = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(update)
    assert set(update.CRDS) == set(RAY_SCHEMAS.values())
    for out_name, crd_name in update.CRDS.items():
        assert load_schema(out_name) == update.v1_schema(CRD_DIR / crd_name), out_name
