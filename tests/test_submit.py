"""`raypar submit` against a real Jobs server: the session cluster's head serves the Jobs API on
JOBS_API (a free port of 127.0.0.1) with token auth on. Jobs span 2 of the 3 nodes; their job dirs and outputs live on
Azure Blob (Azurite), whose credentials only the submitter has: raypar must forward them."""

import json
import os
import re
import shutil
import subprocess
import sys

import fsspec
import pytest
import requests
import yaml
from conftest import ENTRY_DIR, JOBS_API, cli_in_process, free_port, quiet, start_cluster, wait_for

import raypar
from raypar.jobdir.ledger import Ledger

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]
CLI = [sys.executable, "-m", "raypar.cli"]
NAMES = [f"f{i:02d}.txt" for i in range(12)]


def cli(*args, env=None, drop=(), timeout=240):
    full = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", *drop)}
    full.update(env or {})
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=full, timeout=timeout)


def status(capsys, submission, drop=()) -> dict:
    """`raypar status --address JOBS_API SUBMISSION --json`. Run in this process when it sees what
    this process sees (polled until a count shows, a fresh interpreter per look costs a second
    and more); in a fresh one without ``drop``, environment variables it must not see (a laptop
    without the storage credentials: this process's storage clients already hold them)."""
    if drop:
        result = cli("status", "--address", JOBS_API, submission, "--json", drop=drop)
    else:
        with pytest.MonkeyPatch.context() as env:
            env.delenv("RAY_ADDRESS", raising=False)
            result = cli_in_process(capsys, "status", "--address", JOBS_API, submission, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def jobs_cluster(ray_cluster):
    """The session's 3-node cluster, whose head serves the Jobs API at JOBS_API; these tests
    only talk HTTP to it, as a laptop does."""
    return ray_cluster


def wait_for_jobs_api(address: str) -> str:
    token = {"Authorization": f"Bearer {os.environ['RAY_AUTH_TOKEN']}"}

    def answers():
        try:
            return requests.get(f"{address}/api/version", headers=token, timeout=2).status_code == 200
        except requests.ConnectionError:
            return False

    wait_for(answers, f"the Jobs API on {address}")
    return address


@pytest.fixture
def jobs_api(jobs_cluster):
    return wait_for_jobs_api(JOBS_API)


@pytest.fixture
def blob(azurite, monkeypatch):
    """A fresh container; only this process (the submitter) has the credentials."""
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite.connection_string)
    container = azurite.new_container()
    return container, fsspec.filesystem("az", connection_string=azurite.connection_string,
                                        use_listings_cache=False)


def project(tmp_path, names=NAMES, arguments="", output=None, **overrides):
    """A laptop project: job.yml next to code/ (the entry script, with its data inside)."""
    code = tmp_path / "code"
    shutil.copytree(ENTRY_DIR, code)
    (code / "data").mkdir()
    for name in names:
        (code / "data" / name).write_text(f"text of {name}")
    spec = {
        "type": "parallel", "name": "submitted",
        "inputs": {"data": {"type": "uri_folder", "path": "./code/data"}},
        "outputs": {"out": {"type": "uri_folder", "path": output}},
        "input_data": "${{inputs.data}}", "mini_batch_size": "1",
        "resources": {"instance_count": 2}, "max_concurrency_per_instance": 1,
        "retry_settings": {"max_retries": 1, "timeout": 300},
        "task": {"type": "run_function", "code": "./code", "entry_script": "score.py",
                 "program_arguments": arguments, "append_row_to": "${{outputs.out}}"},
        "raypar": {"worker": {"num_cpus": 0.5}, "placement_timeout": 60},
    }
    for key, value in overrides.items():
        spec[key] = value
    path = tmp_path / "job.yml"
    path.write_text(yaml.safe_dump(spec))
    return path


def expected_rows(names=NAMES):
    return [f"{name} TEXT OF {name.upper()}" for name in names]


def submission_of(result) -> str:
    match = re.search(r"submitted (\S+) to", result.stdout)
    assert match, result.stdout + result.stderr
    return match.group(1)


def executed(log_dir):
    return sorted(p.read_text() for p in log_dir.iterdir())


def test_submit_poll_cancel_resume_remotely_gives_exact_output(jobs_cluster, jobs_api, blob, tmp_path, capsys):
    container, fs = blob
    log, hold = tmp_path / "exec", tmp_path / "hold"
    log.mkdir(), hold.mkdir()
    # Batches f04 and later wait for hold/release: the job is stopped with 2 batches in flight.
    spec = project(tmp_path, arguments=f"--exec-log {log} --hold-from f04.txt {hold}",
                   output=f"az://{container}/out")
    job_dir = f"az://{container}/jobs/submitted"

    sent = cli("submit", str(spec), "--address", jobs_api, "--job-dir", job_dir)
    assert sent.returncode == 0, sent.stderr
    assert f"job dir {job_dir}" in sent.stdout
    assert "forwarding AZURE_STORAGE_CONNECTION_STRING" in sent.stdout
    submission = submission_of(sent)

    # Progress, polled from the laptop while the job runs: both workers end up holding.
    def holders():  # the Ray node of each worker holding a batch
        return [p.read_text() for p in hold.glob("holding-*") if p.read_text()]

    wait_for(lambda: len(holders()) == 2, "both workers to hold a batch", timeout=180)
    # The job spans 2 nodes: the two workers holding a batch at once run on distinct nodes.
    # (Which worker finishes which batch is a race, so the done records may name one node.)
    assert len(set(holders())) == 2 and set(holders()) <= {n.node_id for n in jobs_cluster.list_all_nodes()}
    # Workers store finished batches within raypar.ledger.flush_seconds (1 s), even while holding one.
    wait_for(lambda: status(capsys, submission).get("completed") == 4, "the 4 finished batches to be stored")
    running = status(capsys, submission)
    assert (running["state"], running["ray_status"], running["source"]) == ("running", "RUNNING", "job dir")
    assert (running["completed"], running["failed"], running["total"]) == (4, 0, 12)
    # Without the storage credentials the counts come from the driver's progress lines.
    from_log = status(capsys, submission, drop=("AZURE_STORAGE_CONNECTION_STRING",))
    assert from_log["source"].startswith("driver log")
    wait_for(lambda: status(capsys, submission, drop=("AZURE_STORAGE_CONNECTION_STRING",)).get("completed") == 4,
             "the driver to print 4 done")

    canceled = cli("cancel", "--address", jobs_api, submission)
    assert canceled.returncode == 0, canceled.stderr
    assert "canceled (Ray status STOPPED)" in canceled.stdout
    after = status(capsys, submission)
    assert (after["state"], after["ray_status"], after["completed"]) == ("canceled", "STOPPED", 4)
    assert "SIGTERM" in after["reason"]
    ran = executed(log)
    assert ran[:4] == NAMES[:4] and len(ran) == 6  # 4 done + 2 caught mid-run

    for p in log.iterdir():
        p.unlink()
    (hold / "release").touch()
    resumed = cli("resume", "--address", jobs_api, submission, "--wait")
    assert resumed.returncode == 0, resumed.stderr
    assert re.search(r"^raypar: 12/12 done, 0 failed", resumed.stdout, re.MULTILINE), resumed.stdout
    assert "succeeded: 12/12 mini-batches done" in resumed.stdout
    assert executed(log) == NAMES[4:]  # done batches never ran again
    assert fs.cat_file(f"{container}/out/parallel_run_step.txt").decode().splitlines() == expected_rows()

    view = Ledger(job_dir).view()
    nodes_of_run = {}
    for record in view.done.values():
        nodes_of_run.setdefault(record.run, set()).add(record.node)
    assert len(nodes_of_run) == 2  # the first driver and the resuming one
    assert all(len(nodes) <= 2 for nodes in nodes_of_run.values())  # instance_count 2: 2 nodes per session
    assert set().union(*nodes_of_run.values()) <= {n.node_id for n in jobs_cluster.list_all_nodes()}
    # The job dir keeps the spec as written on the laptop: it resumes from anywhere.
    assert Ledger(job_dir).load_job()["spec"]["task"]["code"] == str(tmp_path / "code")


def jobs_now():
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(JOBS_API, headers={"Authorization": f"Bearer {os.environ['RAY_AUTH_TOKEN']}"})
    return {job.submission_id for job in client.list_jobs()}


def assert_one_line_error(result, code, *fragments):
    assert result.returncode == code, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_wrong_or_missing_token_is_one_clear_line_and_submits_nothing(jobs_api, tmp_path):
    spec = project(tmp_path, names=NAMES[:2], output=str(tmp_path / "out"))
    args = ("submit", str(spec), "--address", jobs_api, "--job-dir", str(tmp_path / "job"),
            "--shared-path", str(tmp_path))
    before = jobs_now()
    wrong = cli(*args, env={"RAY_AUTH_TOKEN": "not-the-token"})
    assert_one_line_error(wrong, 2, jobs_api, "rejected the token from RAY_AUTH_TOKEN")
    home = tmp_path / "home"  # no ~/.ray/auth_token there
    home.mkdir()
    missing = cli(*args, env={"HOME": str(home)}, drop=("RAY_AUTH_TOKEN", "RAY_AUTH_MODE"))
    assert_one_line_error(missing, 2, "requires a token", "RAY_AUTH_TOKEN")
    unreachable = cli("status", "--address", "http://127.0.0.1:9", "raypar-x")
    assert_one_line_error(unreachable, 1, "http://127.0.0.1:9", "cannot connect")
    assert jobs_now() == before
    assert not (tmp_path / "job").exists()

    # The token the way Ray finds it, and as an explicit header: the cluster lets us in.
    token_file = tmp_path / "token"
    token_file.write_text(os.environ["RAY_AUTH_TOKEN"])
    by_path = cli("status", "--address", jobs_api, "raypar-unknown", env={"RAY_AUTH_TOKEN_PATH": str(token_file)},
                  drop=("RAY_AUTH_TOKEN",))
    assert_one_line_error(by_path, 2, "no job raypar-unknown")
    by_header = cli("status", "--address", jobs_api, "raypar-unknown", "--header",
                    f"Authorization: Bearer {os.environ['RAY_AUTH_TOKEN']}", env={"HOME": str(home)},
                    drop=("RAY_AUTH_TOKEN",))
    assert_one_line_error(by_header, 2, "no job raypar-unknown")


def test_paths_the_cluster_cannot_reach_are_refused_before_submitting(jobs_api, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "a.txt").write_text("x")
    spec = project(tmp_path, names=NAMES[:1], output="az://container/out")
    data = yaml.safe_load(spec.read_text())
    before = jobs_now()

    data["inputs"]["data"]["path"] = str(outside)
    spec.write_text(yaml.safe_dump(data))
    result = cli("submit", str(spec), "--address", jobs_api, "--job-dir", "az://container/job")
    assert_one_line_error(result, 2, f"inputs.data.path: {outside}", "outside task.code", "use a URL")

    data["inputs"]["data"]["path"] = "./code/data"
    data["outputs"]["out"]["path"] = str(tmp_path / "out")
    spec.write_text(yaml.safe_dump(data))
    result = cli("submit", str(spec), "--address", jobs_api, "--job-dir", "az://container/job")
    assert_one_line_error(result, 2, "outputs.out.path", "never comes back")

    data["outputs"]["out"]["path"] = "az://container/out"
    spec.write_text(yaml.safe_dump(data))
    result = cli("submit", str(spec), "--address", jobs_api, "--job-dir", str(tmp_path / "job"))
    assert_one_line_error(result, 2, f"job dir {tmp_path / 'job'}", "--job-dir URL")
    result = cli("submit", str(spec), "--address", jobs_api, drop=("RAYPAR_JOB_ROOT",))
    assert_one_line_error(result, 2, "--job-dir URL", "RAYPAR_JOB_ROOT")
    assert jobs_now() == before


def test_wait_exits_with_the_jobs_exit_code(jobs_api, tmp_path, capsys):
    names = ["a.txt", "b.txt", "c.txt"]
    spec = project(tmp_path, names=names, output=str(tmp_path / "out"), mini_batch_error_threshold=0,
                   retry_settings={"max_retries": 0, "timeout": 60})
    (tmp_path / "code" / "data" / "b.txt").write_text("a bad record")
    job_dir = tmp_path / "job"  # on the path the cluster's nodes share with us
    failed = cli("submit", str(spec), "--address", jobs_api, "--job-dir", str(job_dir),
                 "--shared-path", str(tmp_path), "--wait")
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "failed" in failed.stderr and "raypar resume --address" in failed.stderr
    assert json.loads(cli_in_process(capsys, "status", str(job_dir), "--json").stdout)["state"] == "failed"
    assert not (tmp_path / "out" / "parallel_run_step.txt").exists()

    (tmp_path / "code" / "data" / "b.txt").write_text("now fine")
    fixed = cli("resume", "--address", jobs_api, str(job_dir), "--shared-path", str(tmp_path), "--wait")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    # The wait returns once the job ended and its log went quiet: the driver's last line came, once.
    assert fixed.stdout.count("raypar: succeeded: 3/3 mini-batches done; output") == 1, fixed.stdout
    assert (tmp_path / "out" / "parallel_run_step.txt").read_text().splitlines() == \
        ["a.txt TEXT OF A.TXT", "b.txt NOW FINE", "c.txt TEXT OF C.TXT"]


def test_a_job_built_with_the_azure_v2_sdk_shape_is_submitted_and_its_handle_waits_for_it(jobs_api, tmp_path, monkeypatch):
    from raypar import Input, Output, RunFunction, parallel_run_function

    project(tmp_path, names=NAMES[:3])  # code/score.py and code/data/
    monkeypatch.chdir(tmp_path)  # paths in Python jobs are relative to the working directory
    score = parallel_run_function(
        name="sdk_submitted", inputs={"data": Input(type="uri_folder")},
        outputs={"out": Output(type="uri_folder", path="./out")}, input_data="${{inputs.data}}",
        instance_count=2, max_concurrency_per_instance=1, mini_batch_size="1",
        task=RunFunction(code="./code", entry_script="score.py", append_row_to="${{outputs.out}}"))
    job = raypar.submit(score(data=Input(path="./code/data")), address=jobs_api, job_dir=str(tmp_path / "job"),
                        shared_paths=(str(tmp_path),), echo=quiet)
    assert job.submission_id.startswith("raypar-sdk_submitted-")
    outcome = job.wait(echo=quiet)
    assert (outcome.exit_code, outcome.state, outcome.ray_status) == (0, "succeeded", "SUCCEEDED"), job.logs()
    assert outcome.counts["completed"] == 3
    assert job.status()["state"] == "succeeded"
    assert (tmp_path / "out" / "parallel_run_step.txt").read_text().splitlines() == expected_rows(NAMES[:3])


@pytest.fixture
def one_node_jobs_api():
    """A Jobs API over a one-node cluster. The nodes of an in-process multi-node cluster share one
    runtime_resources folder, where their agents building the same pip env trip over each other
    (seen in CI: missing files of the env, "Directory not empty"); a real cluster's hosts each
    have their own, as this one node does."""
    port = free_port()
    cluster = start_cluster(workers=0, num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
                            dashboard_port=port)
    yield wait_for_jobs_api(f"http://127.0.0.1:{port}")
    cluster.shutdown()


def test_software_environment_travels_as_a_runtime_env(one_node_jobs_api, tmp_path):
    """Azure's conda_file pip list and raypar.runtime_env reach the driver and the workers."""
    spec = project(tmp_path, names=NAMES[:2], output=str(tmp_path / "out"))
    (tmp_path / "code" / "uses_pip.py").write_text(
        "import os\nimport tomli_w\n\n\ndef init():\n    pass\n\n\ndef run(mini_batch):\n"
        "    return [tomli_w.dumps({'file': os.path.basename(p), 'greeting': os.environ['GREETING']}).replace("
        "'\\n', ' ').strip() for p in mini_batch]\n")
    (tmp_path / "conda.yml").write_text(yaml.safe_dump({"dependencies": [
        "python=3.11", "numpy", {"pip": ["tomli-w==1.0.0", "azureml-core"]}]}))
    data = yaml.safe_load(spec.read_text())
    data["task"].update(entry_script="uses_pip.py", program_arguments="",
                        environment={"image": "mcr.microsoft.com/azureml/x:1", "conda_file": "./conda.yml"})
    data["raypar"]["runtime_env"] = {"env_vars": {"GREETING": "$LAPTOP_GREETING"}}
    data["resources"]["instance_count"] = 1
    spec.write_text(yaml.safe_dump(data))
    result = cli("submit", str(spec), "--address", one_node_jobs_api, "--job-dir", str(tmp_path / "job"),
                 "--shared-path", str(tmp_path), "--wait", env={"LAPTOP_GREETING": "hello"}, timeout=280)
    assert result.returncode == 0, result.stdout + result.stderr
    warning = [line for line in result.stdout.splitlines() if "warning: task.environment" in line][0]
    for ignored in ("image mcr.microsoft.com/azureml/x:1", "conda package numpy", "azureml-core"):
        assert ignored in warning
    assert "python=3.11" not in warning and "tomli-w" not in warning
    assert "forwarding LAPTOP_GREETING" in result.stdout
    assert (tmp_path / "out" / "parallel_run_step.txt").read_text().splitlines() == [
        f'file = "{name}" greeting = "hello"' for name in NAMES[:2]]
