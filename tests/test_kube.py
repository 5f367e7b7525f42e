"""Kubernetes without a cluster: the image's Ray tag, every manifest in deploy/ and every rendered
one valid for KubeRay v1.7.0 (strict CRD schema, core schemas, controller rules), each
kustomization built with kubectl, and `raypar kube render`'s sizing, code delivery and refusals."""

import base64
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import tomllib
import yaml
from conftest import cli_in_process
from kuberay import KUBECTL, controller_violations, kustomize, validate

from raypar.errors import UsageError
from raypar.launch import kube
from raypar.spec.loading import load_spec, spec_from_yaml

REPO = Path(__file__).resolve().parent.parent
KUBERAY = REPO / "deploy" / "kuberay"
KUSTOMIZATIONS = sorted(p.parent.relative_to(KUBERAY).as_posix() for p in KUBERAY.rglob("kustomization.yaml"))
EXAMPLE = REPO / "examples" / "wordcount" / "kubernetes.yml"
EXAMPLE_JOB_DIR = "az://raypar/jobs/wordcount"
needs_kubectl = pytest.mark.skipif(not KUBECTL, reason="kubectl is not installed: kustomize overlays are not built")


@pytest.fixture(autouse=True)
def no_storage_credentials(monkeypatch):
    """The rendered header lists the Azure variables of this environment: start from none."""
    for name in [n for n in os.environ if n.startswith("AZURE_STORAGE_")]:
        monkeypatch.delenv(name)


def assert_valid(objects):
    problems = [p for doc in objects for p in validate(doc) + controller_violations(doc)]
    assert problems == []


def by_kind(objects, kind):
    return [o for o in objects if o["kind"] == kind]


def worker_container(rayjob_or_cluster):
    spec = rayjob_or_cluster["spec"].get("rayClusterSpec", rayjob_or_cluster["spec"])
    return spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]


def assert_shaped_for_its_spec(objects):
    """Each RayJob's cluster is sized from the spec in its ConfigMap; each Ray container gets the Secret."""
    configmaps = {c["metadata"]["name"]: c for c in by_kind(objects, "ConfigMap")}
    for rayjob in by_kind(objects, "RayJob"):
        volume = rayjob["spec"]["submitterPodTemplate"]["spec"]["volumes"][0]["configMap"]
        configmap = configmaps[volume["name"]]  # the ConfigMap the submitter mounts is in the build
        assert {i["key"] for i in volume["items"]} == set(configmap.get("data", {})) | set(configmap.get("binaryData", {}))
        spec = spec_from_yaml(configmap["data"][kube.SPEC_FILE], source="raypar-job.yml")
        assert spec.task.code == kube.CODE_MOUNT
        assert rayjob["spec"]["metadata"]["raypar.code"] == kube.CODE_MOUNT
        if "rayClusterSpec" not in rayjob["spec"]:
            continue
        cluster = rayjob["spec"]["rayClusterSpec"]
        group = cluster["workerGroupSpecs"][0]
        low, high = spec.resources.instance_count, spec.resources.max_instance_count or spec.resources.instance_count
        assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (low, low, high)
        assert cluster.get("enableInTreeAutoscaling", False) is spec.resources.elastic
        assert worker_container(rayjob)["resources"]["limits"] == kube.worker_pod_resources(spec)
        assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # instances land on workers only
        containers = [cluster["headGroupSpec"]["template"]["spec"]["containers"][0], worker_container(rayjob)]
        assert all(c["envFrom"] == [{"secretRef": {"name": "raypar-storage"}}] for c in containers)
    assert not by_kind(objects, "Secret")  # credentials never live in a manifest


# -- the image -------------------------------------------------------------------------------


def test_dockerfile_builds_on_the_ray_image_of_the_pinned_version_with_the_azure_extra():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pin = next(d for d in project["dependencies"] if d.startswith("ray["))
    low, high = re.fullmatch(r"ray\[default\]>=(\d+\.\d+),<(\d+\.\d+)", pin).groups()
    dockerfile = (REPO / "deploy" / "docker" / "Dockerfile").read_text()
    tag = re.search(r"^ARG RAY_IMAGE=rayproject/ray:(\S+)$", dockerfile, re.MULTILINE).group(1)
    version, python = re.fullmatch(r"(\d+\.\d+\.\d+)-(py\d+)", tag).groups()
    assert version.rsplit(".", 1)[0] == low and low != high  # a patch release of the pinned minor
    assert python == f"py3{sys.version_info.minor}"  # the Python the tests (and raypar's py_modules) run
    assert kube.RAY_VERSION == version  # rendered clusters say the same rayVersion
    assert ray.__version__.startswith(low + ".")
    assert re.search(r"^FROM \$\{RAY_IMAGE\}$", dockerfile, re.MULTILINE)
    assert re.search(r'pip install .*"/tmp/raypar\[azure\]"', dockerfile)
    assert any(d.startswith("adlfs") for d in project["optional-dependencies"]["azure"])
    rules = [line for line in (REPO / ".dockerignore").read_text().splitlines() if line and line[0] != "#"]
    assert rules[0] == "*" and "!raypar/" in rules  # a small build context: raypar's sources only


# -- deploy/ --------------------------------------------------------------------------------


def test_every_manifest_file_in_deploy_is_valid():
    files = [p for p in KUBERAY.rglob("*.yaml") if p.name != "kustomization.yaml"]
    assert len(files) >= 2
    for path in files:
        assert_valid([d for d in yaml.safe_load_all(path.read_text()) if d])
    for path in KUBERAY.rglob(kube.SPEC_FILE):  # spec files merged into ConfigMaps by overlays
        assert load_spec(path).task.code == kube.CODE_MOUNT


@needs_kubectl
@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_each_kustomization_builds_into_valid_objects_shaped_for_their_spec(directory):
    objects = kustomize(KUBERAY / directory)
    assert objects
    assert_valid(objects)
    assert_shaped_for_its_spec(objects)


def test_kustomizations_cover_a_rayjob_retrying_a_cluster_an_existing_cluster_and_gpus():
    assert {"base", "raycluster", "overlays/existing-cluster", "overlays/gpu"} <= set(KUSTOMIZATIONS)


def test_base_is_what_render_prints():
    rendered = kube.render(str(EXAMPLE), job_dir=EXAMPLE_JOB_DIR, echo=print)
    assert (KUBERAY / "base" / "wordcount.yaml").read_text() == rendered.to_yaml(), \
        f"regenerate: raypar kube render {EXAMPLE.relative_to(REPO)} --job-dir {EXAMPLE_JOB_DIR} " \
        f"-o deploy/kuberay/base/wordcount.yaml"
    rayjob = rendered.objects[-1]["spec"]
    assert rayjob["backoffLimit"] > 0 and rayjob["shutdownAfterJobFinishes"] is True
    assert rayjob["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    cluster = yaml.safe_load_all((KUBERAY / "raycluster" / "raycluster.yaml").read_text())
    assert [d for d in cluster if d] == [kube.render_raycluster(str(EXAMPLE))]


@needs_kubectl
def test_existing_cluster_overlay_is_what_render_prints_for_that_cluster():
    built = by_kind(kustomize(KUBERAY / "overlays" / "existing-cluster"), "RayJob")[0]
    rendered = kube.render(str(EXAMPLE), job_dir=EXAMPLE_JOB_DIR, cluster="raypar", echo=print).objects[-1]
    assert built == rendered
    assert built["spec"]["clusterSelector"] == {"ray.io/cluster": "raypar"} and built["spec"]["backoffLimit"] == 0


@needs_kubectl
def test_gpu_overlay_gives_each_worker_pod_a_gpu_per_worker_on_the_cuda_image():
    objects = kustomize(KUBERAY / "overlays" / "gpu")
    rayjob, = by_kind(objects, "RayJob")
    container = worker_container(rayjob)
    spec = spec_from_yaml(by_kind(objects, "ConfigMap")[0]["data"][kube.SPEC_FILE])
    assert container["resources"]["limits"]["nvidia.com/gpu"] == str(
        int(spec.max_concurrency_per_instance * spec.raypar.worker.num_gpus)) == "2"
    assert container["image"].endswith("-gpu")
    assert rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["tolerations"]


# -- raypar kube render ----------------------------------------------------------------------


def project(tmp_path, **overrides):
    code = tmp_path / "code"
    (code / "lib").mkdir(parents=True)
    (code / "score.py").write_text("def init():\n    pass\n\n\ndef run(mini_batch):\n    return mini_batch\n")
    (code / "lib" / "__init__.py").write_text("")
    (code / "lib" / "model.bin").write_bytes(bytes(range(256)))  # not UTF-8
    (code / "__pycache__").mkdir()
    (code / "__pycache__" / "score.cpython-311.pyc").write_bytes(b"\0")
    (code / "data").mkdir()
    (code / "data" / "a.txt").write_text("a")
    spec = {
        "type": "parallel", "name": "Scoring_Job",
        "inputs": {"data": {"type": "uri_folder", "path": "./code/data"}},
        "outputs": {"rows": {"type": "uri_file", "path": "az://c/out/rows.txt"}},
        "input_data": "${{inputs.data}}", "mini_batch_size": "2",
        "resources": {"instance_count": 3}, "max_concurrency_per_instance": 3,
        "task": {"type": "run_function", "code": "./code", "entry_script": "score.py",
                 "append_row_to": "${{outputs.rows}}"},
    }
    spec.update(overrides)
    path = tmp_path / "job.yml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_rendered_configmap_mounts_back_into_exactly_task_code(tmp_path):
    rendered = kube.render(str(project(tmp_path)), job_dir="az://c/jobs/x", echo=print)
    configmap, rayjob = rendered.objects
    assert_valid(rendered.objects)
    volume = rayjob["spec"]["submitterPodTemplate"]["spec"]["volumes"][0]
    mounted = {}
    for item in volume["configMap"]["items"]:  # what the kubelet writes into the submitter pod
        if item["key"] in configmap.get("binaryData", {}):
            mounted[item["path"]] = base64.b64decode(configmap["binaryData"][item["key"]])
        else:
            mounted[item["path"]] = configmap["data"][item["key"]].encode()
    code = tmp_path / "code"
    originals = {p.relative_to(code).as_posix(): p.read_bytes() for p in code.rglob("*")
                 if p.is_file() and "__pycache__" not in p.parts}
    assert {k: v for k, v in mounted.items() if k != kube.SPEC_FILE} == originals
    spec = spec_from_yaml(mounted[kube.SPEC_FILE].decode())
    assert spec.inputs["data"].path == f"{kube.CODE_MOUNT}/data"  # inputs inside task.code move with it
    assert yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])["working_dir"] == kube.CODE_MOUNT
    assert rayjob["spec"]["entrypoint"] == \
        "python -m raypar run raypar-job.yml --job-dir az://c/jobs/x --code-dir ."
    assert rayjob["metadata"]["name"] == "raypar-scoring-job"


@pytest.mark.parametrize("worker, expected", [
    ({}, {"cpu": "3", "memory": "10Gi"}),  # 3 workers x (1 CPU, 2 GiB) / 0.7 + 1 GiB
    ({"num_cpus": 0.5, "memory": "1gb"}, {"cpu": "2", "memory": "6Gi"}),  # 3 x 1 GiB / 0.7 + 1 GiB
    ({"num_cpus": 1, "num_gpus": 0.5}, {"cpu": "3", "memory": "10Gi", "nvidia.com/gpu": "2"}),
])
def test_worker_pods_have_room_for_max_concurrency_workers(tmp_path, worker, expected):
    spec = project(tmp_path, raypar={"worker": worker})
    rendered = kube.render(str(spec), job_dir="az://c/jobs/x", echo=print)
    assert_valid(rendered.objects)
    container = worker_container(rendered.objects[-1])
    assert container["resources"]["limits"] == container["resources"]["requests"] == expected
    assert rendered.objects[-1]["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] == 3


@pytest.mark.parametrize("resources", [{"instance_count": "2..6"}, {"instance_count": 2, "max_instance_count": 6}])
def test_an_elastic_job_gets_a_cluster_that_autoscales_between_its_bounds(tmp_path, resources):
    spec = project(tmp_path, resources=resources)
    rendered = kube.render(str(spec), job_dir="az://c/jobs/x", echo=print)
    assert_valid(rendered.objects)
    assert_shaped_for_its_spec(rendered.objects)
    cluster = rendered.objects[-1]["spec"]["rayClusterSpec"]
    group = cluster["workerGroupSpecs"][0]
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (2, 2, 6)
    assert cluster["enableInTreeAutoscaling"] is True and cluster["autoscalerOptions"]["version"] == "v2"


def test_custom_worker_resources_become_the_worker_rayStartParams(tmp_path):
    spec = project(tmp_path, raypar={"worker": {"num_cpus": 1, "resources": {"accelerator_x": 1}}})
    rayjob = kube.render(str(spec), job_dir="az://c/jobs/x", echo=print).objects[-1]
    assert_valid([rayjob])
    params = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["rayStartParams"]
    # KubeRay pastes `--resources=<value>` into the pod's `ray start` shell command.
    argument, = shlex.split(f"--resources={params['resources']}")
    assert json.loads(argument.removeprefix("--resources=")) == {"accelerator_x": 3}


def test_existing_cluster_code_in_image_and_namespace(tmp_path):
    said = []
    rendered = kube.render(str(project(tmp_path)), job_dir="az://c/jobs/x", cluster="shared", namespace="team-a",
                           code_in_image="/opt/job", backoff_limit=3, echo=said.append)
    assert_valid(rendered.objects)
    configmap, rayjob = rendered.objects
    assert set(configmap["data"]) == {kube.SPEC_FILE} and "binaryData" not in configmap  # code is in the image
    assert spec_from_yaml(configmap["data"][kube.SPEC_FILE]).task.code == "/opt/job"
    assert rayjob["spec"]["clusterSelector"] == {"ray.io/cluster": "shared"}
    assert rayjob["spec"]["backoffLimit"] == 0  # KubeRay allows no retries on a cluster it did not make
    assert any("backoffLimit is 0" in line for line in said)
    assert "rayClusterSpec" not in rayjob["spec"] and "--code-dir" not in rayjob["spec"]["entrypoint"]
    assert all(o["metadata"]["namespace"] == "team-a" for o in rendered.objects)


def test_secret_variables_are_named_and_never_inlined(tmp_path, monkeypatch):
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", "AccountName=x;AccountKey=c2VjcmV0")
    monkeypatch.setenv("SCORING_KEY", "s3cr3t-value")
    spec = project(tmp_path, raypar={"runtime_env": {"env_vars": {"SCORING_KEY": "$SCORING_KEY"}}})
    rendered = kube.render(str(spec), job_dir="az://c/jobs/x", echo=print)
    text = rendered.to_yaml()
    assert rendered.secret_variables == ["AZURE_STORAGE_CONNECTION_STRING", "SCORING_KEY"]
    assert "kubectl create secret generic raypar-storage --from-literal=AZURE_STORAGE_CONNECTION_STRING=..." \
           " --from-literal=SCORING_KEY=..." in text
    assert "s3cr3t-value" not in text and "c2VjcmV0" not in text


def raypar_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "raypar", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("change, args, message", [
    ({}, ["--job-dir", "/tmp/jobs/x"], "job dir /tmp/jobs/x: a KubeRay retry runs on a fresh cluster"),
    ({}, [], "raypar kube render needs a job dir the cluster can reach"),
    ({"inputs": {"data": {"type": "uri_folder", "path": "/srv/data"}}}, ["--job-dir", "az://c/j"],
     "inputs.data.path: /srv/data is on this machine, outside task.code"),
    ({"outputs": {"rows": {"type": "uri_file", "path": "./out/rows.txt"}}}, ["--job-dir", "az://c/j"],
     "is a local path"),
    ({}, ["--job-dir", "az://c/j", "--name", "Bad_Name"], "--name Bad_Name: a RayJob name is lowercase"),
    ({}, ["--job-dir", "az://c/j", "--backoff-limit", "-1"], "--backoff-limit -1: must be 0 or more"),
])
def test_render_refuses_what_a_cluster_cannot_run_with_one_line(tmp_path, monkeypatch, capsys, change, args, message):
    monkeypatch.delenv("RAYPAR_JOB_ROOT", raising=False)
    result = cli_in_process(capsys, "kube", "render", str(project(tmp_path, **change)), *args)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


def test_render_refuses_code_over_a_configmap(tmp_path):
    spec = project(tmp_path)
    (tmp_path / "code" / "weights.bin").write_bytes(b"\xff" * 900_000)  # base64 makes it 1.2 MB
    result = raypar_cli("kube", "render", str(spec), "--job-dir", "az://c/j")
    assert result.returncode == 2 and "more than a ConfigMap holds" in result.stderr
    assert "--code-in-image" in result.stderr


def test_render_cli_writes_a_file_that_kubectl_accepts(tmp_path):
    out = tmp_path / "job.k8s.yaml"
    result = raypar_cli("kube", "render", str(project(tmp_path)), "--job-dir", "az://c/jobs/x", "--image",
                        "registry.example/raypar:0.1.0", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stderr and result.stdout == ""
    objects = [d for d in yaml.safe_load_all(out.read_text()) if d]
    assert_valid(objects)
    images = {c["image"] for rayjob in by_kind(objects, "RayJob")
              for c in [worker_container(rayjob), rayjob["spec"]["submitterPodTemplate"]["spec"]["containers"][0]]}
    assert images == {"registry.example/raypar:0.1.0"}
    assert out.read_text().startswith("# Rendered by raypar")


def test_render_of_a_standing_raycluster_refuses_rayjob_options(tmp_path):
    result = raypar_cli("kube", "render", str(project(tmp_path)), "--kind", "RayCluster", "--job-dir", "az://c/j")
    assert result.returncode == 2 and "--job-dir: options of a RayJob, not of --kind RayCluster" in result.stderr


def test_render_of_a_standing_raycluster(tmp_path):
    result = raypar_cli("kube", "render", str(project(tmp_path)), "--kind", "RayCluster", "--name", "team-cluster")
    assert result.returncode == 0, result.stderr
    cluster, = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert_valid([cluster])
    assert (cluster["kind"], cluster["metadata"]["name"]) == ("RayCluster", "team-cluster")
    assert cluster["spec"]["workerGroupSpecs"][0]["replicas"] == 3


def test_rayjob_name_from_the_spec_is_a_dns_label():
    spec = load_spec(EXAMPLE)
    assert kube.rayjob_name(spec, None) == "raypar-wordcount"
    with pytest.raises(UsageError):
        kube.rayjob_name(spec, "x" * 60)


def test_render_to_a_folder_that_does_not_exist_is_one_line(tmp_path):
    result = raypar_cli("kube", "render", str(project(tmp_path)), "--job-dir", "az://c/j",
                        "-o", str(tmp_path / "missing" / "job.yaml"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "missing/job.yaml: cannot write it (No such file or directory)" in result.stderr
