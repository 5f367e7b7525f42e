"""Ray metrics of a job, exported by Ray's metrics agent (Prometheus, the dashboard's Metrics view).

Recorded by the driver as answers arrive: ``raypar_batches_done_total``,
``raypar_batches_failed_total`` (batches out of tries) and the
``raypar_batch_seconds`` histogram of done batches' run time. Ray prefixes
each name with ``ray_``. Every series is tagged with the job's name
(``raypar_job``) and job dir (``raypar_job_dir``).
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Optional

log = logging.getLogger("raypar")

_TAGS = ("raypar_job", "raypar_job_dir")  # not "job": Prometheus keeps that label for its scrape job
_SECONDS_BOUNDARIES = [0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600]
# The done counter is added up and recorded once a second: each record is a few microseconds of
# the scheduler's thread, seconds at a million batches (Ray exports metrics every few seconds).
COUNT_EVERY = 1.0


@functools.lru_cache(maxsize=1)
def _instruments():
    from ray.util.metrics import Counter, Histogram  # noqa: PLC0415 - lazy: only inside a running Ray job

    return (
        Counter("raypar_batches_done", description="mini-batches done", tag_keys=_TAGS),
        Counter("raypar_batches_failed", description="mini-batches failed after their last try", tag_keys=_TAGS),
        Histogram("raypar_batch_seconds", description="run time of done mini-batches (seconds)",
                  boundaries=_SECONDS_BOUNDARIES, tag_keys=_TAGS),
    )


class JobMetrics:
    """The job's instruments with its tags bound; a metrics failure never fails a job."""

    def __init__(self, job: str, job_dir: str):
        self.tags = {"raypar_job": job, "raypar_job_dir": job_dir}
        self.uncounted, self.counted_at = 0, time.monotonic()
        try:
            self.done, self.failed, self.seconds = _instruments()
        except Exception as exc:  # noqa: BLE001 - a Ray without metrics support
            log.debug("Ray metrics unavailable: %s", exc)
            self.done = None

    def batch_done(self, seconds: Optional[float]) -> None:
        """``seconds`` is None when the run time is unknown (the worker died after recording)."""
        if self.done is not None:
            self.uncounted += 1
            if seconds is not None:
                self.seconds.observe(seconds, tags=self.tags)
            self.flush_if_due()

    def flush_if_due(self) -> None:
        """Record the uncounted done batches once a second has passed since the last record (the
        driver's loop asks at every step: a burst before a long batch is counted while it runs)."""
        if self.uncounted and time.monotonic() - self.counted_at >= COUNT_EVERY:
            self.flush()

    def flush(self) -> None:
        """Record the done batches not counted yet (at the session's end, and once a second)."""
        if self.done is not None and self.uncounted:
            self.done.inc(self.uncounted, tags=self.tags)
        self.uncounted, self.counted_at = 0, time.monotonic()

    def batch_failed(self) -> None:
        if self.done is not None:
            self.failed.inc(1, tags=self.tags)
