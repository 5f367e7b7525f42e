"""Progress display (terminal bar, log lines), its parser, and the runtime env a spec asks for."""

import io

import pytest
from conftest import make_spec

from raypar.engine.progress import ProgressDisplay, Snapshot, parse_line
from raypar.errors import SpecError
from raypar.spec.loading import spec_from_dict
from raypar.spec.runtime_env import (
    forwarded_variables,
    pip_packages,
    pip_verdict,
    running_python,
    setup_failure,
    without_inherited_pip,
    worker_runtime_env,
)


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_plain_line_round_trips_through_the_parser():
    snap = Snapshot(done=12, failed=1, total=40, planning=False, rate=2.0)
    assert snap.line() == "raypar: 12/40 done, 1 failed, 2.00 mini-batches/s, ETA 0:00:14"
    assert parse_line(snap.line()) == snap
    planning = Snapshot(done=3, failed=0, total=10, planning=True, rate=1.5)
    assert planning.line().startswith("raypar: 3/10+ done") and planning.line().endswith("ETA ?")
    assert parse_line(planning.line()) == planning
    assert parse_line("raypar: job dir /x") is None


def test_a_terminal_gets_one_bar_redrawn_in_place_and_messages_above_it():
    out = Terminal()
    display = ProgressDisplay(stream=out)
    display.update(Snapshot(0, 0, 4, False, 0.0))
    display.echo("raypar: a message")  # clears the bar, prints, draws the bar again below
    display.update(Snapshot(4, 0, 4, False, 2.0), final=True)
    display.close()
    bar0 = "[------------------------] 0/4 done, 0 failed, 0.0/s, ETA ?"
    assert out.getvalue() == (f"\r\033[K{bar0}" + "\r\033[Kraypar: a message\n" + bar0
                              + "\r\033[K[########################] 4/4 done, 0 failed, 2.0/s, ETA 0:00:00\n")


def test_a_log_gets_a_line_only_when_counts_change():
    lines = []
    display = ProgressDisplay(echo=lines.append, every=0)
    display.update(Snapshot(1, 0, 4, False, 1.0))
    display.update(Snapshot(1, 0, 4, False, 0.5))  # only the rate moved: no new line
    display.update(Snapshot(2, 0, 4, False, 1.0))
    display.update(Snapshot(2, 0, 4, False, 1.0), final=True)  # the final line always shows
    assert [parse_line(line).done for line in lines] == [1, 2, 2]


def _spec(tmp_path, **overrides):
    return spec_from_dict(make_spec(tmp_path, {"a.txt": "x"}, **overrides), base_dir=tmp_path)


def test_conda_file_pip_list_maps_and_the_rest_is_named_once(tmp_path):
    (tmp_path / "conda.yml").write_text(
        f"dependencies:\n  - python={running_python()}\n  - pip\n  - scikit-learn=1.3\n"
        "  - pip:\n    - pandas==2.1\n    - azureml-defaults\n")
    (tmp_path / "requirements.txt").write_text("# pinned\nrequests==2.31  # http\n\n")
    spec = _spec(tmp_path, **{"task.environment": {"image": "mcr/x:1", "conda_file": "conda.yml"},
                              "raypar.runtime_env": {"pip": "requirements.txt"}})
    packages, warning = pip_packages(spec)
    assert packages == ["requests==2.31", "pandas==2.1"]
    assert warning == ("task.environment: not used on Ray: image mcr/x:1, conda package scikit-learn=1.3, "
                       "pip package azureml-defaults (Azure ML only); the cluster's Python environment runs "
                       "the job (add packages under raypar.runtime_env.pip)")
    assert pip_packages(_spec(tmp_path, **{"task.environment": "azureml:sklearn:1"}))[1].startswith(
        "task.environment: not used on Ray: environment azureml:sklearn:1")
    assert pip_packages(_spec(tmp_path)) == ([], None)


def test_a_conda_file_pinning_another_python_is_named_in_the_warning(tmp_path):
    (tmp_path / "conda.yml").write_text("dependencies:\n  - python=3.7.9\n  - pip:\n    - pandas==0.25.3\n")
    packages, warning = pip_packages(_spec(tmp_path, **{"task.environment": {"conda_file": "conda.yml"}}))
    assert packages == ["pandas==0.25.3"]
    assert warning == (f"task.environment's conda_file pins python=3.7.9, but the cluster runs Python "
                       f"{running_python()}: its pip pins are installed there as written and may not exist for "
                       f"it (relax them, or list working ones under raypar.runtime_env.pip)")


# pip's own words for a requirement it cannot install or build (pip 23-25), as Ray's error carries them.
PIP_OUTPUTS = {
    "not found": ("    ERROR: Could not find a version that satisfies the requirement scikit-learn==0.22.1 "
                  "(from versions: 1.3.0, 1.4.0)\n    ERROR: No matching distribution found for scikit-learn==0.22.1",
                  "install 'scikit-learn==0.22.1'"),
    "wheel build": ("  Building wheel for pandas (pyproject.toml): finished with status 'error'\n"
                    "  ERROR: Failed building wheel for pandas\nFailed to build pandas\n"
                    "ERROR: Could not build wheels for pandas, which is required to install pyproject.toml-based "
                    "projects", "build 'pandas'"),
    "metadata": ("Collecting numpy==1.17.4\n  Downloading numpy-1.17.4.zip (6.4 MB)\n"
                 "  error: subprocess-exited-with-error\n  \u00d7 Getting requirements to build wheel did not run "
                 "successfully.\n  \u2502 exit code: 1\nnote: This error originates from a subprocess, and is "
                 "likely not a problem with pip.", "build 'numpy==1.17.4'"),
    "python": ("ERROR: Package 'oldpkg' requires a different Python: 3.11.7 not in '<3.8'", "install 'oldpkg'"),
}


@pytest.mark.parametrize("case", PIP_OUTPUTS)
def test_a_runtime_env_failure_is_one_line_naming_the_requirement_and_the_python(case):
    text, what = PIP_OUTPUTS[case]
    assert setup_failure(f"Failed to set up runtime environment.\n{text}\n", "3.11") == \
        f"environment: pip could not {what} on Python 3.11 (the cluster's); relax the pin or set raypar.runtime_env.pip"


def test_a_runtime_env_that_failed_without_pip_refusing_anything_is_not_a_verdict():
    """Ray's env setup racing on a busy node (seen in CI): the slot tries again instead of the job stopping."""
    text = ("Failed to set up runtime environment.\nFileNotFoundError: [Errno 2] No such file or directory: "
            "'/tmp/ray/session_x/runtime_resources/pip/e0db/virtualenv_app_data/wheel/3.11/image/1/CopyPipInstall'")
    assert pip_verdict(text, "3.11") is None
    assert setup_failure(text, "3.11").startswith("environment: Ray could not set up the workers' runtime env on "
                                                  "Python 3.11: FileNotFoundError")
    assert pip_verdict(PIP_OUTPUTS["not found"][0], "3.11") is not None


def test_workers_inherit_a_pip_env_the_submitted_job_already_installs():
    mine = {"pip": ["tomli-w==1.0.0"], "env_vars": {"A": "1"}}
    job = {"pip": {"packages": ["tomli-w==1.0.0"], "pip_check": False}, "working_dir": "gcs://x"}
    assert without_inherited_pip(mine, job) == {"env_vars": {"A": "1"}}
    assert without_inherited_pip({"pip": ["tomli-w==1.0.0"]}, job) is None
    assert without_inherited_pip(mine, {}) == mine  # an embedded or plain cluster: the workers install it
    assert without_inherited_pip(mine, {"pip": {"packages": ["other"]}}) == mine


def test_runtime_env_vars_resolve_references_and_refuse_literal_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_TOKEN", "s3cret")
    spec = _spec(tmp_path, **{"raypar.runtime_env": {"env_vars": {"HF_TOKEN": "$MY_TOKEN", "MODE": 1}},
                              "environment_variables": {"OMP_NUM_THREADS": 1}})
    assert worker_runtime_env(spec) == {"env_vars": {"HF_TOKEN": "s3cret", "MODE": "1", "OMP_NUM_THREADS": "1"}}
    assert "MY_TOKEN" in forwarded_variables(spec, str(tmp_path / "job"))
    monkeypatch.delenv("MY_TOKEN")
    with pytest.raises(SpecError, match="raypar.runtime_env.env_vars.HF_TOKEN: environment variable MY_TOKEN"):
        worker_runtime_env(spec)
    with pytest.raises(SpecError, match="runtime_env.env_vars.HF_TOKEN: secrets are not written in specs"):
        _spec(tmp_path, **{"raypar.runtime_env": {"env_vars": {"HF_TOKEN": "literal"}}})


def test_azure_credentials_are_forwarded_only_when_azure_storage_is_used(tmp_path, monkeypatch):
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", "DefaultEndpointsProtocol=http;AccountKey=k")
    local = _spec(tmp_path)
    assert forwarded_variables(local, str(tmp_path / "job")) == []
    assert forwarded_variables(local, "az://c/job") == ["AZURE_STORAGE_CONNECTION_STRING"]
    explicit = _spec(tmp_path, **{"raypar.storage_options": {"az": {"account_name": "a", "account_key": "$KEY"}}})
    assert forwarded_variables(explicit, "az://c/job") == ["KEY"]


@pytest.mark.timeout(180)
def test_raypar_run_on_a_terminal_draws_the_bar(ray_cluster, tmp_path):
    """stdout is a pseudo-terminal: the bar is redrawn in place and ends on its own line.
    (On the session cluster: the bar does not depend on which Ray runs the job.)"""
    import os
    import pty
    import subprocess
    import sys

    import yaml

    spec = make_spec(tmp_path, {f"f{i}.txt": f"v{i}" for i in range(4)}, mini_batch_size="1",
                     **{"resources.instance_count": 1, "max_concurrency_per_instance": 1})
    (tmp_path / "job.yml").write_text(yaml.safe_dump(spec))
    leader, follower = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-m", "raypar", "run", str(tmp_path / "job.yml"),
                             "--job-dir", str(tmp_path / "job"), "--address", ray_cluster.address],
                            stdout=follower, stderr=subprocess.DEVNULL,
                            env=env)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert proc.wait(timeout=120) == 0
    text = b"".join(chunks).decode()
    assert "\r\x1b[K[########################] 4/4 done, 0 failed" in text
    assert "raypar: 4/4 done" not in text  # no plain progress lines on a terminal
    assert "succeeded: 4/4 mini-batches done" in text
