"""raypar: Azure-ML-style parallel jobs on any Ray cluster, with resume.

The public Python API is :func:`run`; the ``raypar`` command wraps the same
functions. Heavy imports (Ray) happen only when a job actually runs.
"""

__version__ = "0.1.0"

from .errors import RayparError  # noqa: E402


def run(spec, job_dir=None, address=None, **kwargs):
    """Run a job spec (a path to YAML, a dict or a JobSpec) and return its outcome.

    See :func:`raypar.driver.run_job` for the arguments.
    """
    from .driver import run_job

    return run_job(spec, job_dir=job_dir, address=address, **kwargs)


def resume(job_dir, address=None, **kwargs):
    """Resume the job in ``job_dir``: run exactly the mini-batches that are not done."""
    from .driver import resume_job

    return resume_job(job_dir, address=address, **kwargs)


__all__ = ["run", "resume", "RayparError", "__version__"]
