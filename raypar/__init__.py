"""raypar: Azure-ML-style parallel jobs on any Ray cluster, with resume.

The Python API mirrors the ``raypar`` command: :func:`run` and :func:`resume`
drive a job from this process, :func:`submit` sends it to a cluster's Jobs
API. Each returns a handle with ``status()``, ``wait()`` and ``cancel()``.
Heavy imports (Ray) happen only when a job actually runs. Their warnings are
printed as the CLI prints them (``raypar: WARNING ...``) unless the program
configured logging itself (:mod:`raypar.api_log`).
"""

from raypar.errors import RayparError
from raypar.version import __version__


def item_failed(item, error) -> None:
    """From ``run()``: report one item of the mini-batch as failed, with its error (a string or
    an exception). ``item`` is one of the paths run() got (or its place in the list) for a
    batch of files; for a table batch, a row's place in the batch (an int, a list of them, or a
    slice of the DataFrame run() got). Reported items are recorded with the batch: ``raypar
    failed JOB_DIR`` writes them out as a new job's input. A reported item counts as failed
    for ``error_threshold``, whether or not run() also returned a row for it."""
    from raypar.worker.items import report

    report(item, error)


def run(spec, job_dir=None, address=None, wait=True, **kwargs):
    """Run a job spec from this process: a path to YAML, a dict, a JobSpec, or a job built in Python
    (:func:`parallel_run_function`'s job, a :class:`ParallelRunStep`).

    Returns a :class:`raypar.launch.handles.LocalJob`. With ``wait=True`` (default) the
    job has ended when it returns (``.wait()`` gives the outcome at once);
    with ``wait=False`` the driver runs in a background thread. Other keyword
    arguments (``echo``, ``progress``) are :func:`raypar.engine.driver.run_job`'s.
    """
    from raypar.api_log import install
    from raypar.engine.driver import run_job
    from raypar.jobdir.layout import default_job_dir
    from raypar.launch.handles import LocalJob
    from raypar.spec.loading import as_spec
    from raypar.storage import normalize_path

    install()
    spec = as_spec(spec)
    job_dir = normalize_path(job_dir) if job_dir else default_job_dir(spec.name)
    return LocalJob(job_dir, lambda: run_job(spec, job_dir=job_dir, address=address, **kwargs), background=not wait)


def resume(job_dir, address=None, wait=True, **kwargs):
    """Resume the job in ``job_dir``: run exactly the mini-batches that are not done. Returns a LocalJob."""
    from raypar.api_log import install
    from raypar.engine.driver import resume_job
    from raypar.launch.handles import LocalJob
    from raypar.storage import normalize_path

    install()
    job_dir = normalize_path(job_dir)
    return LocalJob(job_dir, lambda: resume_job(job_dir, address=address, **kwargs), background=not wait)


def submit(spec, address=None, job_dir=None, wait=False, **kwargs):
    """Send a job spec (as :func:`run` takes) to a Ray cluster's Jobs API (``address``: ``http://HEAD:8265``).

    Returns a :class:`raypar.launch.submission.SubmittedJob`; ``wait=True`` also waits for
    the job to end. Other keyword arguments (``headers``, ``shared_paths``,
    ``env``, ``echo``) are :func:`raypar.launch.submission.submit_job`'s.
    """
    from raypar.api_log import install
    from raypar.launch.submission import submit_job

    install()
    job = submit_job(spec, address=address, job_dir=job_dir, **kwargs)
    if wait:
        job.wait(echo=kwargs.get("echo", print))
    return job


# Azure ML SDK shapes (docs/azureml-sdk.md), imported on first use: a worker importing raypar never loads them.
_AZUREML_NAMES = ("parallel_run_function", "RunFunction", "Input", "Output", "RetrySettings", "AssetTypes",
                  "InputOutputModes", "ParallelJob", "ParallelRunConfig", "ParallelRunStep")


def __getattr__(name):
    if name in _AZUREML_NAMES:
        from raypar import azureml

        return getattr(azureml, name)
    raise AttributeError(f"module 'raypar' has no attribute {name!r}")


__all__ = ["run", "resume", "submit", "item_failed", "RayparError", "__version__", *_AZUREML_NAMES]
