"""Laptop to cluster: send a job through the Ray Jobs API, then watch, stop and resume it.

The submitted entrypoint is raypar itself (``python -m raypar run``), with

- ``task.code`` as the runtime env's working dir (Ray uploads it),
- raypar's own package as a ``py_module``, so the driver and workers run the
  submitter's raypar version,
- the spec, as the user wrote it, in the ``RAYPAR_SPEC`` variable; the driver
  runs it with ``--code-dir .`` (Ray's copy of task.code), and its job dir keeps
  the spec with the submitter's paths, so it resumes from anywhere,
- the credentials the job needs, forwarded from the submitter's environment.

Everything the cluster reads must be reachable from it: inputs are URLs or
inside task.code; outputs and the job dir are URLs (or paths every node
mounts, named with ``shared_paths``).
"""

from __future__ import annotations

import os
import re
import shlex
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from raypar.credentials import describe_error
from raypar.engine.progress import ProgressDisplay, parse_line
from raypar.errors import RayparError, UsageError
from raypar.jobdir.state import JobState
from raypar.launch.jobs_api import JobsApi
from raypar.polling import poll
from raypar.spec.loading import as_spec, spec_from_yaml
from raypar.spec.models import InputSpec, JobSpec
from raypar.spec.runtime_env import ENVIRONMENT_WARNED, forwarded_variables, inline_files, pip_packages
from raypar.storage import is_url, normalize_path

SPEC_VARIABLE = "RAYPAR_SPEC"
# A submitted driver prints progress this often, so `--wait` can draw a live bar from its log.
REMOTE_PROGRESS_INTERVAL = "2"
# Seconds Ray waits after SIGTERM before SIGKILL: time to mark the job canceled and release its lease.
STOP_GRACE_SECONDS = "30"
META_JOB_DIR, META_CODE, META_NAME = "raypar.job_dir", "raypar.code", "raypar.name"
EXIT_OF_RAY_STATUS = {"SUCCEEDED": 0, "STOPPED": 130}
Echo = Callable[[str], None]


# -- what the cluster can reach ------------------------------------------------


def _inside(path: str, folder: str) -> bool:
    folder = folder.rstrip("/")
    return path == folder or path.startswith(folder + "/")


def check_reachable(spec: JobSpec, job_dir: str, shared_paths: tuple[str, ...] = ()) -> None:
    """Refuse local paths the cluster cannot see, naming the key and suggesting a URL."""
    code = spec.task.code
    shared = tuple(str(Path(p).expanduser().resolve()) for p in shared_paths)

    def reachable(path: str) -> bool:
        return is_url(path) or any(_inside(path, s) for s in shared)

    hint = "use a URL (e.g. az://container/folder) or --shared-path if every node mounts it"
    for name, item in spec.inputs.items():
        if isinstance(item, InputSpec) and not reachable(item.path) and not _inside(item.path, code):
            raise UsageError(f"inputs.{name}.path: {item.path} is on this machine, outside task.code ({code}), "
                             f"so the cluster cannot read it; {hint}")
    for name, output in spec.outputs.items():
        if output.path and not reachable(output.path):
            raise UsageError(f"outputs.{name}.path: {output.path} is a local path: what the cluster writes there "
                             f"never comes back here; {hint}")
    if not reachable(job_dir):
        raise UsageError(f"job dir {job_dir}: a local path is not reachable from the cluster (resume and status "
                         f"need it); pass --job-dir URL (e.g. az://container/raypar-jobs/NAME), set "
                         f"RAYPAR_JOB_ROOT, or --shared-path if every node mounts it")


def default_remote_job_dir(slug: str, command: str = "raypar submit") -> str:
    root = os.environ.get("RAYPAR_JOB_ROOT")
    if not root:
        raise UsageError(f"{command} needs a job dir the cluster can reach: --job-dir URL "
                         "(e.g. az://container/raypar-jobs/NAME), or set RAYPAR_JOB_ROOT to a URL")
    return f"{root.rstrip('/')}/{slug}"


def _job_slug(spec: JobSpec) -> str:
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", spec.name or "job").strip("-") or "job"
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"


# -- the runtime env ---------------------------------------------------------


def _raypar_package() -> str:
    return str(Path(__file__).resolve().parents[1])  # the raypar package


def runtime_env_for(spec: JobSpec, code_dir: str, job_dir: str, extra_env: Optional[dict] = None,
                    echo: Echo = print) -> dict:
    """The runtime env of a submitted driver (its workers inherit it)."""
    env = {name: os.environ[name] for name in forwarded_variables(spec, job_dir) if name in os.environ}
    forwarded = sorted(env)
    env.update({
        SPEC_VARIABLE: spec.to_yaml(),
        "RAYPAR_PROGRESS_INTERVAL": REMOTE_PROGRESS_INTERVAL,
        "RAY_JOB_STOP_WAIT_TIME_S": STOP_GRACE_SECONDS,
        ENVIRONMENT_WARNED: "1",
    })
    env.update(extra_env or {})
    if forwarded:
        echo(f"raypar: forwarding {', '.join(forwarded)} to the cluster (anyone who can see the job's runtime "
             f"env in the dashboard can read them)")
    runtime_env = {"working_dir": code_dir, "py_modules": [_raypar_package()], "env_vars": env}
    packages, warning = pip_packages(spec)
    if warning:
        echo(f"raypar: warning: {warning}")
    if packages:
        runtime_env["pip"] = packages
    return runtime_env


def parse_env(pairs: Optional[list[str]]) -> dict[str, str]:
    """``--env NAME`` (this environment's value) or ``--env NAME=VALUE``."""
    env = {}
    for pair in pairs or []:
        name, sep, value = pair.partition("=")
        if not sep:
            if name not in os.environ:
                raise UsageError(f"--env {name}: not set in this environment")
            value = os.environ[name]
        env[name] = value
    return env


# -- submitting ----------------------------------------------------------------


def submit_job(spec, address: Optional[str] = None, job_dir: Optional[str] = None, headers: Optional[dict] = None,
               shared_paths: tuple[str, ...] = (), env: Optional[dict] = None, echo: Echo = print,
               api: Optional[JobsApi] = None) -> "SubmittedJob":
    """Submit a spec to a cluster's Jobs API; returns at once with a handle (see ``SubmittedJob.wait``)."""

    spec = inline_files(as_spec(spec))
    slug = _job_slug(spec)
    job_dir = normalize_path(job_dir) if job_dir else default_remote_job_dir(slug)
    check_code(spec.task.code, spec.task.entry_script)
    check_reachable(spec, job_dir, shared_paths)
    api = api or JobsApi(address, headers)
    runtime_env = runtime_env_for(spec, spec.task.code, job_dir, env, echo)
    entrypoint = f"python -m raypar run env:{SPEC_VARIABLE} --job-dir {shlex.quote(job_dir)} --code-dir ."
    return _send(api, spec, job_dir, entrypoint, runtime_env, {}, slug)


def _spec_in(job_dir: str) -> JobSpec:
    """The spec a job dir holds (its job.json)."""
    from raypar.jobdir.ledger import Ledger  # noqa: PLC0415 - lazy: a submit never loads the ledger's pyarrow

    return JobSpec.model_validate(Ledger(job_dir).load_job()["spec"])


def resume_remote(target: str, address: Optional[str] = None, headers: Optional[dict] = None,
                  code_dir: Optional[str] = None, shared_paths: tuple[str, ...] = (), env: Optional[dict] = None,
                  echo: Echo = print, api: Optional[JobsApi] = None,
                  retry_failed_items: bool = False) -> "SubmittedJob":
    """Submit a driver that continues a job: ``target`` is a submission ID or the job dir URL.
    ``retry_failed_items``: as ``raypar resume --retry-failed-items``."""

    api = api or JobsApi(address, headers)
    if is_url(target) or os.path.isabs(target):
        job_dir, resumes = target, ""
        spec = _spec_in(job_dir)
    else:
        info = api.info(target)
        job_dir, resumes = _job_dir_of(info, target), target
        spec_yaml = ((info.runtime_env or {}).get("env_vars") or {}).get(SPEC_VARIABLE)
        if spec_yaml:
            spec = spec_from_yaml(spec_yaml, source=f"{target}'s spec")
        else:  # submitted by other means (a KubeRay RayJob): the job dir has the spec
            spec = _spec_in(job_dir)
    code = str(Path(code_dir).expanduser().resolve()) if code_dir else spec.task.code
    if not os.path.isdir(code):
        raise UsageError(f"task.code {code} is not on this machine: give the job's code folder with --code DIR")
    check_code(code, spec.task.entry_script)
    check_reachable(spec, job_dir, shared_paths)
    runtime_env = runtime_env_for(spec, code, job_dir, env, echo)
    entrypoint = f"python -m raypar resume {shlex.quote(job_dir)} --code-dir ."
    if retry_failed_items:
        entrypoint += " --retry-failed-items"
    return _send(api, spec, job_dir, entrypoint, runtime_env, {"raypar.resumes": resumes} if resumes else {},
                 _job_slug(spec))


def check_code(code: str, entry_script: str, sent: str = "it is uploaded to the cluster") -> None:
    """task.code is a folder here with the entry script in it: what is ``sent`` from this machine."""
    if not os.path.isdir(code):
        raise UsageError(f"task.code: {code} is not a folder on this machine ({sent})")
    if not os.path.isfile(os.path.join(code, entry_script)):
        raise UsageError(f"task.entry_script: {os.path.join(code, entry_script)} not found")


def _send(api: JobsApi, spec: JobSpec, job_dir: str, entrypoint: str, runtime_env: dict,
          metadata: dict, slug: str) -> "SubmittedJob":
    submission_id = f"raypar-{slug}"
    metadata = {META_JOB_DIR: job_dir, META_CODE: spec.task.code, META_NAME: spec.name or "", **metadata}
    api.submit(entrypoint=entrypoint, submission_id=submission_id, runtime_env=runtime_env, metadata=metadata)
    return SubmittedJob(api, submission_id, job_dir)


def _job_dir_of(info, submission_id: str) -> str:
    job_dir = (info.metadata or {}).get(META_JOB_DIR)
    if not job_dir:
        raise UsageError(f"{submission_id} was not submitted by raypar (its metadata names no job dir)")
    return job_dir


# -- a submitted job -----------------------------------------------------------------


@dataclass
class RemoteOutcome:
    """How a submitted job ended, in the CLI's exit-code terms."""

    submission_id: str
    job_dir: str
    ray_status: str
    exit_code: int
    state: str  # raypar's state when the job dir is readable here, else Ray's status, lower case
    counts: dict = field(default_factory=dict)
    message: str = ""


class SubmittedJob:
    """A job sent with :func:`submit_job`: its status, its log, cancel, wait."""

    def __init__(self, api: JobsApi, submission_id: str, job_dir: Optional[str] = None):
        self.api, self.submission_id = api, submission_id
        self.job_dir = job_dir or _job_dir_of(api.info(submission_id), submission_id)

    @property
    def address(self) -> str:
        return self.api.address

    def ray_status(self) -> str:
        return str(self.api.info(self.submission_id).status.value)

    def status(self, exact: bool = False) -> dict:
        """raypar's view from the job dir when it is readable here (``exact``: as job_status); else the
        driver's last progress line."""
        from raypar.engine.status import job_status  # noqa: PLC0415 - lazy: a submit never loads pyarrow
        from raypar.jobdir.ledger import Ledger  # noqa: PLC0415 - lazy: a submit never loads pyarrow

        info = self.api.info(self.submission_id)
        ray_status = str(info.status.value)
        try:
            if Ledger(self.job_dir).exists():
                status = job_status(self.job_dir, exact=exact)
                status["source"] = "job dir"
            else:  # the driver is starting, or failed before it could create the job dir
                state = ray_status.lower() if self._terminal(info) else JobState.STARTING.value
                status = {"job_dir": self.job_dir, "name": (info.metadata or {}).get(META_NAME), "state": state,
                          "source": "Ray (no job dir yet)"}
        except Exception as exc:  # noqa: BLE001 - no credentials here, or a path only the cluster sees
            status = {"job_dir": self.job_dir, "name": (info.metadata or {}).get(META_NAME),
                      "state": ray_status.lower(), "source": f"driver log (job dir not readable here: "
                                                              f"{describe_error(exc)})"}
            snapshot = last_progress(self.api.logs(self.submission_id))
            if snapshot is not None:
                status.update(completed=snapshot.done, failed=snapshot.failed, total=snapshot.total,
                              planning_complete=not snapshot.planning)
        status.update(submission_id=self.submission_id, ray_status=ray_status, address=self.address,
                      ray_message=info.message or "")
        return status

    def logs(self) -> str:
        return self.api.logs(self.submission_id)

    def cancel(self, wait: float = 60.0, echo: Echo = print) -> RemoteOutcome:
        """Stop the driver (SIGTERM: it marks the job canceled, resumable) and wait until it has ended."""
        self.api.stop(self.submission_id)
        if poll(self._ended, wait, 0.5):
            return self.outcome()
        raise RayparError(f"{self.submission_id}: stop requested, but the job has not ended within {wait:.0f}s")

    def wait(self, timeout: Optional[float] = None, echo: Echo = print, show=None) -> RemoteOutcome:
        """Follow the driver's log until the job ends: progress lines go to ``show(snapshot)``,
        other lines to ``echo``. Without ``show``, every line goes to ``echo``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        partial = ""
        for chunk in self.api.tail(self.submission_id):
            *lines, partial = (partial + chunk).split("\n")
            for line in lines:
                snapshot = parse_line(line) if show is not None else None
                if snapshot is not None:
                    show(snapshot)
                elif line.strip():
                    echo(line)
            if deadline is not None and time.monotonic() > deadline:
                raise RayparError(f"{self.submission_id}: still running after {timeout:.0f}s")
        if partial.strip():
            echo(partial)
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not poll(self._ended, left, 0.2):  # the log can end just before the status does
            raise RayparError(f"{self.submission_id}: still running after {timeout:.0f}s")
        return self.outcome()

    def _ended(self) -> bool:
        return self._terminal(self.api.info(self.submission_id))

    def outcome(self) -> RemoteOutcome:
        info = self.api.info(self.submission_id)
        ray_status = str(info.status.value)
        code = EXIT_OF_RAY_STATUS.get(ray_status)
        if code is None:
            code = info.driver_exit_code if info.driver_exit_code not in (None, 0) else 1
        status = self.status()
        counts = {k: status[k] for k in ("completed", "failed", "pending", "total") if k in status}
        return RemoteOutcome(self.submission_id, self.job_dir, ray_status, code, status["state"], counts,
                             info.message or "")

    @staticmethod
    def _terminal(info) -> bool:
        return str(info.status.value) in ("SUCCEEDED", "FAILED", "STOPPED")


def last_progress(log_text: str):
    """The last progress snapshot in a driver's log, or None."""
    for line in reversed(log_text.splitlines()):
        snapshot = parse_line(line)
        if snapshot is not None:
            return snapshot
    return None


def follow(job: SubmittedJob, echo: Echo = print, display: Optional[ProgressDisplay] = None) -> RemoteOutcome:
    """Wait for ``job`` showing a live progress display; used by the CLI's ``--wait``."""
    display = display or ProgressDisplay()
    try:  # a terminal gets the bar; a log gets the driver's own progress lines as they come
        outcome = job.wait(echo=display.echo, show=display.update if display.tty else None)
        if display.last is not None:
            display.update(display.last, final=True)
        return outcome
    finally:
        display.close()


def submitted_exit_line(outcome: RemoteOutcome) -> str:
    counts = outcome.counts
    done = f": {counts['completed']}/{counts['total']} mini-batches done" if "completed" in counts else ""
    return f"raypar: {outcome.submission_id} {outcome.state}{done} (Ray status {outcome.ray_status})"

