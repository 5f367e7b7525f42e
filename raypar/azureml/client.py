"""Azure ML SDK v2's ``MLClient`` as far as running jobs goes: ``ml_client.jobs.create_or_update(job)`` and
``ml_client.jobs.stream(job)``, run here on Ray instead of in a workspace.

``create_or_update`` starts the job in a background thread of this process and
returns at once, as Azure returns once the job is submitted: a pipeline from
``@pipeline`` runs through :mod:`raypar.pipelines.run` (its YAML written once
into raypar's cache, so ``raypar status`` / ``raypar resume`` work on its
pipeline dir), a parallel job (``parallel_run_function``, a ``ParallelRunStep``)
through :func:`raypar.run`. Ray is the one at ``address`` (an ``MLClient``
argument raypar adds), else ``RAY_ADDRESS``, else an embedded local Ray on
127.0.0.1. ``stream`` prints the job's progress lines and waits for its end.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from typing import Optional, Union

import raypar
from raypar.azureml.components import Component
from raypar.azureml.dsl import PipelineJob, single_step
from raypar.azureml.v1_paths import cache_dir
from raypar.errors import RayparError
from raypar.jobdir.layout import default_job_dir
from raypar.pipelines.loading import load_pipeline
from raypar.pipelines.run import run_pipeline
from raypar.spec.loading import as_spec
from raypar.storage import normalize_path


class JobFailed(RayparError):
    """A job run through ``MLClient`` ended without succeeding."""


class Job:
    """What ``create_or_update`` returns: ``name`` (its job or pipeline dir), ``status``, ``outputs``."""

    def __init__(self, name: str, display_name: str, experiment_name: Optional[str], outputs: dict):
        self.name = name
        self.display_name = display_name
        self.experiment_name = experiment_name
        self.outputs = outputs  # output name -> path
        self.status = "Running"
        self.exit_code: Optional[int] = None
        self._lines: queue.Queue = queue.Queue()
        self._done = threading.Event()
        self._error: Optional[BaseException] = None

    def __repr__(self) -> str:
        return f"Job(name={self.name!r}, status={self.status!r})"


class JobOperations:
    """``ml_client.jobs``."""

    def __init__(self, address: Optional[str] = None):
        self._address = address
        self._jobs: dict[str, Job] = {}

    def create_or_update(self, job, *, experiment_name: Optional[str] = None, description: Optional[str] = None,
                         compute: Optional[str] = None, tags: Optional[dict] = None, job_dir: Optional[str] = None,
                         **kwargs) -> Job:
        """Start ``job`` (a ``@pipeline`` result, a parallel job, a ParallelRunStep, or a component node such
        as ``command(...)``, run as a pipeline of that one step); returns at once.

        ``job_dir`` (a raypar extension) is the pipeline or job dir (default ``./raypar-jobs/<name>-...``).
        """
        if isinstance(job, Component):
            job = single_step(job)
        if isinstance(job, PipelineJob):
            handle, work = self._pipeline(job, experiment_name, job_dir)
        else:
            handle, work = self._parallel(job, experiment_name, job_dir)
        self._jobs[handle.name] = handle
        threading.Thread(target=self._run, args=(handle, work), name=f"raypar-mlclient-{handle.display_name}",
                         daemon=False).start()
        return handle

    def _pipeline(self, job: PipelineJob, experiment_name, job_dir):

        text = job.to_yaml()
        path = cache_dir("pipelines", hashlib.sha256(text.encode()).hexdigest()[:16] + ".yml")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if not os.path.isfile(path):
            with open(path + ".tmp", "w") as f:
                f.write(text)
            os.replace(path + ".tmp", path)
        plan = load_pipeline(path, job_dir=job_dir)  # errors now, in the caller, as Azure validates on submit
        handle = Job(plan.job_dir, job.display_name or job.name, experiment_name or job.experiment_name,
                     dict(plan.outputs))
        return handle, lambda echo: run_pipeline(plan, address=self._address, echo=echo, warn=echo)

    def _parallel(self, job, experiment_name, job_dir):

        spec = as_spec(job)
        folder = normalize_path(job_dir) if job_dir else default_job_dir(spec.name)
        handle = Job(folder, spec.display_name or spec.name or "job", experiment_name or spec.experiment_name,
                     {k: o.path or f"{folder}/outputs/{k}" for k, o in spec.outputs.items()})

        def work(echo) -> int:
            return raypar.run(spec, job_dir=folder, address=self._address, echo=echo).wait().exit_code

        return handle, work

    @staticmethod
    def _run(handle: Job, work) -> None:
        try:
            handle.exit_code = work(handle._lines.put)
            handle.status = "Completed" if handle.exit_code == 0 else "Failed"
        except BaseException as exc:  # noqa: BLE001 - reported by stream(), in the caller's thread
            handle._error = exc
            handle.status = "Failed"
        finally:
            handle._done.set()

    def stream(self, name: Union[str, Job]) -> None:
        """Print the job's progress lines until it ends (Azure's ``jobs.stream``).

        Raises:
            JobFailed: the job ended without succeeding (one line naming its dir).
        """
        handle = name if isinstance(name, Job) else self._jobs.get(name)
        if handle is None:
            raise RayparError(f"no job {name!r} was started by this MLClient")
        while not (handle._done.is_set() and handle._lines.empty()):
            try:
                print(handle._lines.get(timeout=0.2), flush=True)
            except queue.Empty:
                continue
        if handle._error is not None:
            if isinstance(handle._error, RayparError):
                raise JobFailed(f"{handle.display_name}: {handle._error.headline}") from None
            raise handle._error
        if handle.exit_code:
            raise JobFailed(f"{handle.display_name}: failed (exit code {handle.exit_code}); "
                            f"details: raypar status {handle.name}")

    def get(self, name: str) -> Job:
        return self._jobs[name]


class MLClient:
    """``azure.ai.ml.MLClient``: the workspace arguments are accepted and ignored; ``jobs`` runs on Ray.

    Args:
        credential, subscription_id, resource_group_name, workspace_name: ignored (no workspace).
        address: the Ray cluster (a raypar extension); default ``RAY_ADDRESS``, else an embedded local Ray.
    """

    def __init__(self, credential=None, subscription_id: Optional[str] = None,
                 resource_group_name: Optional[str] = None, workspace_name: Optional[str] = None, *,
                 address: Optional[str] = None, **kwargs):
        self.subscription_id, self.resource_group_name, self.workspace_name = \
            subscription_id, resource_group_name, workspace_name
        self.jobs = JobOperations(address)

    @classmethod
    def from_config(cls, credential=None, path=None, file_name=None, **kwargs) -> "MLClient":
        """Accepted as in Azure: there is no config to read, the client runs on Ray."""
        return cls(credential, **kwargs)
