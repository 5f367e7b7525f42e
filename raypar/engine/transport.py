"""What the scheduler needs from a cluster, and nothing else: Ray-free.

The scheduler (raypar/engine/scheduler.py) decides; a transport places workers, moves calls
and reports how they ended. raypar/engine/ray_transport.py is the one that runs jobs; the
simulation in benchmarks/bench_engine_simulation.py drives the same scheduler with thousands
of simulated workers on a simulated clock, and the engine's unit tests with a few.

A call's outcome is its answer (:meth:`Transport.get`) or one of three errors, which the
scheduler classifies (docs/failures.md#how-a-failure-is-classified):
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Optional


class WorkerLost(Exception):
    """The worker process, or its node, is gone (a crash, a kill, a lost node)."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind  # the cluster's name for it (Ray: ActorDiedError, ...)


class WorkerRaised(Exception):
    """raypar's own code raised in the worker (its user's errors are answers, never raised)."""


class SetupFailed(Exception):
    """The worker's software environment could not be set up (Ray: RuntimeEnvSetupError)."""


class Transport:
    """Workers and calls on a cluster. ``slot`` arguments are raypar.engine.scheduler.Slot."""

    clock: Callable[[], float] = staticmethod(time.monotonic)

    elastic = False  # instances join and leave with nodes: see changes()

    def reserve(self, count: int, slots: Optional[int] = None) -> Optional[list[int]]:
        """Reserve ``count`` instances' nodes (instance_count, or fewer for a session with fewer
        batches), each with the resources of ``slots`` workers (None: max_concurrency_per_instance),
        or raise PlacementError; returns the instances placed when they are not ``range(count)``
        (elastic jobs)."""

    def changes(self) -> tuple[list[int], list[int]]:
        """Elastic jobs: (instances placed since the last call, instances whose node left)."""
        return [], []

    def drop(self, instance: int) -> None:
        """Elastic jobs: give an instance's reservation back (its node left, or it has no work left)."""

    def want(self, count: Optional[int]) -> None:
        """Elastic jobs: use at most ``count`` instances from now on (None: up to max_instance_count)."""

    def idle(self, seconds: float) -> None:
        """Wait ``seconds`` with nothing to wait for (an elastic job whose every node left)."""
        time.sleep(seconds)

    def release(self) -> None:
        """Give the reservation back."""

    def placed_instances(self) -> set[int]:
        """Instances that sit on a live node now."""
        raise NotImplementedError

    def new_worker(self, slot) -> Any:
        """A worker process for ``slot``; returns its handle."""
        raise NotImplementedError

    def call(self, worker: Any, method: str, *args) -> Any:
        """Call a worker method (calls on one worker run in order); returns the call's handle."""
        raise NotImplementedError

    def call_aside(self, worker: Any, method: str, *args) -> Any:
        """Call a worker method beside its ordered calls (while one runs): a hint such as reading
        a queued batch ahead, or storing what it finished. Returns the call's handle, for a caller
        that waits for it; transports without such calls ignore it and return None."""
        return None

    def wait(self, calls, timeout: float) -> list:
        """The calls that have ended, once one has or ``timeout`` seconds have passed ([] then).
        ``calls``: a list, or a mapping whose keys are the calls (``in`` must be fast)."""
        raise NotImplementedError

    def ended(self, calls: Iterable) -> list:
        """Those of ``calls`` that have ended already (no waiting)."""
        raise NotImplementedError

    def get(self, call: Any) -> Any:
        """The answer of an ended call, or WorkerLost, WorkerRaised or SetupFailed."""
        raise NotImplementedError

    def cancel(self, call: Any) -> None:
        """Drop a call that has not started (one that did runs to its end)."""

    def kill(self, worker: Any) -> None:
        """End a worker process at once."""

    def batch_done(self, seconds: Optional[float]) -> None:
        """Metrics: a mini-batch done (``seconds`` of run time, when known)."""

    def batch_failed(self) -> None:
        """Metrics: a mini-batch out of tries."""
