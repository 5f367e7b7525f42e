"""The engine: one driver session from a validated spec to an assembled output.

- ``driver``: the session's flow (claim the job dir, plan, run what is pending, assemble) and
  ``cancel_job``; ``session_lease`` takes, keeps and fences the lease; ``upkeep`` compacts,
  shows progress and writes the reports.
- ``planning`` / ``replan``: mini-batches planned into the manifest, and re-planned when an input changed.
- ``scheduler``: the Ray-free scheduling policy (slots, attempts, retries, timeouts, speculation),
  stepped over a ``transport``: ``ray_transport`` for jobs, ``simulated`` for tests and benchmarks.
- ``cluster``: connecting to a Ray cluster or starting the embedded one; ``signals``: SIGTERM as Ctrl-C;
  ``metrics``, ``progress``, ``console_relay``: what a running job shows; ``worker_time``: what the
  session's workers spent their time on (its last line).
- ``status`` / ``reports``: a job dir's state and its reports, read without a cluster.
"""
