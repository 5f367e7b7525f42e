"""A KubeRay retry, emulated for real: a rendered RayJob runs on a loopback Ray cluster built as its
rayClusterSpec describes; the whole cluster is killed mid-job; a fresh cluster runs the same
entrypoint (what KubeRay does with backoffLimit) and the job finishes from where it stopped.

The emulation plays the parts Kubernetes plays and nothing more:
- the kubelet: the ConfigMap's items are written where the submitter pod mounts them, and the
  Ray processes get the storage Secret's variables (envFrom);
- KubeRay: one Ray node per pod (head with its rayStartParams, `replicas` workers with the CPUs
  of their limits), token auth on (authOptions), and the submitter's `ray job submit` command;
- pod deletion: SIGKILL to every process of the cluster, the raypar driver included.
"""

import os
import signal
import subprocess
import sys
import uuid

import fsspec
import psutil
import pytest
import yaml
from conftest import ENTRY_DIR, free_port, wait_for
from kuberay import submitter_command

from raypar.jobdir.ledger import Ledger
from raypar.launch.kube import render

pytestmark = [pytest.mark.ray, pytest.mark.timeout(400)]
NAMES = [f"f{i:02d}.txt" for i in range(10)]


def job_spec(tmp_path, container, arguments):
    code = tmp_path / "laptop" / "code"
    code.mkdir(parents=True)
    (code / "score.py").write_bytes((ENTRY_DIR / "score.py").read_bytes())
    (code / "data").mkdir()
    for name in NAMES:
        (code / "data" / name).write_text(f"text of {name}")
    spec = {
        "type": "parallel", "name": "kube-retry",
        "inputs": {"data": {"type": "uri_folder", "path": "./code/data"}},
        "outputs": {"rows": {"type": "uri_file", "path": f"az://{container}/out/rows.txt"}},
        "input_data": "${{inputs.data}}", "mini_batch_size": "1",
        "resources": {"instance_count": 2}, "max_concurrency_per_instance": 1,
        "retry_settings": {"max_retries": 1, "timeout": 300},
        "task": {"type": "run_function", "code": "./code", "entry_script": "score.py",
                 "program_arguments": arguments, "append_row_to": "${{outputs.rows}}"},
        "raypar": {"placement_timeout": 120},
    }
    path = tmp_path / "laptop" / "job.yml"
    path.write_text(yaml.safe_dump(spec))
    return path


def mount_configmap(configmap, volume, where):
    """The kubelet's part, laid out as its atomic writer does: the items' files in a hidden
    timestamped folder, `..data` linking to it, and a link per top-level name into `..data`."""
    payload = where / "..2026_11_22_00_00_00.000000001"
    for item in volume["configMap"]["items"]:
        target = payload / item["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(configmap["data"][item["key"]])
    (where / "..data").symlink_to(payload.name)
    for name in {item["path"].split("/")[0] for item in volume["configMap"]["items"]}:
        (where / name).symlink_to(f"..data/{name}")


def cpus(container) -> int:
    return int(container["resources"]["limits"]["cpu"])


class EmulatedRayCluster:
    """One Ray node per pod of a rayClusterSpec, all on 127.0.0.1, with the Secret's variables."""

    def __init__(self, cluster_spec, secret_env):
        from ray.cluster_utils import Cluster

        self.spec = cluster_spec
        head = cluster_spec["headGroupSpec"]
        assert cluster_spec["authOptions"] == {"mode": "token"}  # the session runs RAY_AUTH_MODE=token
        self.dashboard_port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("AZURE_STORAGE_")}
        env.update(secret_env)  # envFrom: the storage Secret
        env["PATH"] = f"{os.path.dirname(sys.executable)}{os.pathsep}{env['PATH']}"  # the image's python
        saved = dict(os.environ)
        os.environ.clear()
        os.environ.update(env)
        try:
            self.cluster = Cluster(initialize_head=True, head_node_args={
                "num_cpus": int(head["rayStartParams"]["num-cpus"]),
                "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": self.dashboard_port,
                "dashboard_agent_listen_port": free_port()})
            for group in cluster_spec["workerGroupSpecs"]:
                container = group["template"]["spec"]["containers"][0]
                for _ in range(group["replicas"]):
                    self.cluster.add_node(num_cpus=cpus(container))
            self.cluster.wait_for_nodes()
        finally:
            os.environ.clear()
            os.environ.update(saved)

    @property
    def address(self):
        return f"http://127.0.0.1:{self.dashboard_port}"

    def node_ids(self):
        return {node.node_id for node in self.cluster.list_all_nodes()}

    def kill(self):
        """Every pod deleted at once: SIGKILL to each Ray process and all it started."""
        processes = []
        for node in self.cluster.list_all_nodes():
            for infos in node.all_processes.values():
                for info in infos:
                    try:
                        root = psutil.Process(info.process.pid)
                        processes += [root, *root.children(recursive=True)]
                    except psutil.NoSuchProcess:
                        pass
        assert any(_is_raypar_driver(p) for p in processes)  # the driver goes with the cluster
        for process in processes:
            try:
                process.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(processes, timeout=30)
        self.shutdown()

    def shutdown(self):
        try:
            self.cluster.shutdown()
        except Exception:  # noqa: BLE001 - already killed: nothing left to stop
            pass


def _is_raypar_driver(process) -> bool:
    try:
        return "raypar run" in " ".join(process.cmdline())
    except psutil.Error:
        return False


def jobs_client(address):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address, headers={"Authorization": f"Bearer {os.environ['RAY_AUTH_TOKEN']}"})


def submit_like_kuberay(rayjob, mount, address):
    """The submitter Job's `ray job submit`, run from a pod that mounts the ConfigMap at `mount`."""
    runtime_env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    volume_mount = rayjob["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["volumeMounts"][0]
    assert runtime_env["working_dir"] == volume_mount["mountPath"]
    runtime_env["working_dir"] = str(mount)  # the kubelet's mount of that path
    pod_view = {**rayjob, "spec": {**rayjob["spec"], "runtimeEnvYAML": yaml.safe_dump(runtime_env)}}
    submission = f"{rayjob['metadata']['name']}-{uuid.uuid4().hex[:5]}"  # KubeRay: a new ID per attempt
    command = submitter_command(pod_view, address, submission)
    result = subprocess.run(command, capture_output=True, text=True, timeout=180,
                            env={**os.environ, "RAY_ADDRESS": address})
    assert result.returncode == 0, result.stdout + result.stderr
    return submission


@pytest.fixture(scope="module")
def fresh_cluster(azurite, tmp_path_factory):
    """A loopback cluster as the rendered RayJob's rayClusterSpec describes, with the storage
    Secret's variables, started on the first call and the same one after: the retry test's fresh
    cluster (KubeRay's retry, started once the first cluster is gone, as KubeRay starts it), then
    the cluster the cancel test submits to."""
    started = []

    def cluster() -> EmulatedRayCluster:
        if not started:
            spec = job_spec(tmp_path_factory.mktemp("cluster-spec"), "any-container", "")
            _, rayjob = render(str(spec), image="raypar:test", job_dir="az://any-container/job",
                               echo=lambda line: None).objects
            started.append(EmulatedRayCluster(rayjob["spec"]["rayClusterSpec"],
                                              {"AZURE_STORAGE_CONNECTION_STRING": azurite.connection_string}))
        return started[0]

    yield cluster
    for one in started:
        one.shutdown()


def test_kuberay_retry_on_a_fresh_cluster_resumes_the_job(azurite, fresh_cluster, tmp_path, monkeypatch):
    container = azurite.new_container()
    secret_env = {"AZURE_STORAGE_CONNECTION_STRING": azurite.connection_string}
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite.connection_string)  # to read the ledger here
    fs = fsspec.filesystem("az", connection_string=azurite.connection_string, use_listings_cache=False)
    log, hold = tmp_path / "exec", tmp_path / "hold"
    log.mkdir(), hold.mkdir()
    spec = job_spec(tmp_path, container, f"--exec-log {log} --hold-from f04.txt {hold}")
    job_dir = f"az://{container}/jobs/kube-retry"

    configmap, rayjob = render(str(spec), image="raypar:test", job_dir=job_dir, echo=lambda line: None).objects
    assert rayjob["spec"]["backoffLimit"] > 0 and rayjob["spec"]["shutdownAfterJobFinishes"]
    pod = rayjob["spec"]["submitterPodTemplate"]["spec"]
    mount = tmp_path / "submitter-pod"
    mount_configmap(configmap, pod["volumes"][0], mount)

    # Attempt 1: both workers end up holding a batch (4 done), then the cluster is lost.
    first = EmulatedRayCluster(rayjob["spec"]["rayClusterSpec"], secret_env)
    try:
        submission = submit_like_kuberay(rayjob, mount, first.address)
        client = jobs_client(first.address)

        def holding():
            assert not client.get_job_status(submission).is_terminal(), client.get_job_logs(submission)
            return len([p for p in hold.glob("holding-*") if p.read_text()]) == 2

        wait_for(holding, "both workers to hold a batch", timeout=180)
        holders = {p.read_text() for p in hold.glob("holding-*")}
        assert len(holders) == 2 and holders <= first.node_ids()  # 2 worker pods, never the head
        assert client.get_job_status(submission) == "RUNNING"
        # The 4 finished batches are stored within raypar.ledger.flush_seconds (1 s), even while
        # their workers hold the next one; what a cluster loss takes before that runs again.
        wait_for(lambda: len(Ledger(job_dir).view().done) == 4, "the 4 finished batches to be stored")
        first_nodes = first.node_ids()
        first.kill()
    except BaseException:
        first.shutdown()
        raise
    done_before = set(Ledger(job_dir).view().done)
    assert len(done_before) == 4
    assert sorted(p.read_text() for p in log.iterdir())[:4] == NAMES[:4]

    # Attempt 2: KubeRay's retry, a fresh cluster (one the job never ran on) and the same entrypoint.
    for p in log.iterdir():
        p.unlink()
    (hold / "release").touch()
    second = fresh_cluster()
    assert second.spec == rayjob["spec"]["rayClusterSpec"] and not second.node_ids() & first_nodes
    submission = submit_like_kuberay(rayjob, mount, second.address)
    client = jobs_client(second.address)
    assert len(client.list_jobs()) == 1  # no job ran on it before
    wait_for(lambda: client.get_job_status(submission).is_terminal(), "the retried job to end", timeout=240)
    driver_log = client.get_job_logs(submission)
    assert client.get_job_status(submission) == "SUCCEEDED", driver_log

    assert "already holds this job: resuming it" in driver_log
    assert sorted(p.read_text() for p in log.iterdir()) == NAMES[4:]  # done batches never ran again
    assert fs.cat_file(f"{container}/out/rows.txt").decode().splitlines() == [
        f"{name} TEXT OF {name.upper()}" for name in NAMES]
    view = Ledger(job_dir).view()
    assert set(view.done) >= done_before and len(view.done) == len(NAMES)
    job = Ledger(job_dir).load_job()
    assert job["spec"]["task"]["code"] == "/home/ray/raypar/code"  # the same spec on every attempt


def test_a_rayjob_submission_is_canceled_and_resumed_by_its_id_from_a_laptop(azurite, fresh_cluster, tmp_path,
                                                                             monkeypatch):
    # What docs/kubernetes.md tells users: port-forward 8265, then raypar cancel / resume by submission ID.
    container = azurite.new_container()
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite.connection_string)
    log, hold = tmp_path / "exec", tmp_path / "hold"
    log.mkdir(), hold.mkdir()
    spec = job_spec(tmp_path, container, f"--exec-log {log} --hold-from f04.txt {hold}")
    job_dir = f"az://{container}/jobs/kube-cancel"
    configmap, rayjob = render(str(spec), image="raypar:test", job_dir=job_dir, echo=lambda line: None).objects
    mount = tmp_path / "submitter-pod"
    mount_configmap(configmap, rayjob["spec"]["submitterPodTemplate"]["spec"]["volumes"][0], mount)
    cluster = fresh_cluster()
    assert cluster.spec == rayjob["spec"]["rayClusterSpec"]
    submission = submit_like_kuberay(rayjob, mount, cluster.address)
    wait_for(lambda: len([p for p in hold.glob("holding-*") if p.read_text()]) == 2,
             "both workers to hold a batch", timeout=180)

    def raypar_cli(*args):
        return subprocess.run([sys.executable, "-m", "raypar", *args], capture_output=True, text=True,
                              timeout=240, env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})

    canceled = raypar_cli("cancel", "--address", cluster.address, submission)
    assert canceled.returncode == 0, canceled.stderr
    assert "canceled (Ray status STOPPED)" in canceled.stdout
    assert len(Ledger(job_dir).view().done) == 4
    for p in log.iterdir():
        p.unlink()
    (hold / "release").touch()
    resumed = raypar_cli("resume", "--address", cluster.address, submission,
                         "--code", str(tmp_path / "laptop" / "code"), "--wait")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert sorted(p.read_text() for p in log.iterdir()) == NAMES[4:]
    fs = fsspec.filesystem("az", connection_string=azurite.connection_string, use_listings_cache=False)
    assert fs.cat_file(f"{container}/out/rows.txt").decode().splitlines() == [
        f"{name} TEXT OF {name.upper()}" for name in NAMES]
