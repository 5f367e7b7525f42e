"""The Ray transport: the placement group, worker actors, and Ray's calls, waits and errors.

Placement: one STRICT_SPREAD placement group with ``instance_count`` bundles,
one bundle per instance sized for ``max_concurrency_per_instance`` workers.
STRICT_SPREAD reserves all instances on distinct nodes atomically (or not at
all, so a job never starts half-placed) and GCS re-places a bundle whose node
died; plain node affinity can do neither. On the embedded one-node Ray the
instances are packed onto that node instead (STRICT_PACK): every Azure sample
asks for 2 nodes, and a laptop has one. Elastic instances (``max_instance_count``) are placed
one group each, joining and leaving with their nodes: raypar/engine/elastic.py.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Iterable, Optional

import ray
from ray.exceptions import GetTimeoutError, RayError, RayTaskError, RuntimeEnvSetupError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from raypar.credentials import describe_error
from raypar.engine import cluster
from raypar.engine.elastic import ElasticInstances
from raypar.engine.metrics import JobMetrics
from raypar.engine.transport import SetupFailed, Transport, WorkerLost, WorkerRaised
from raypar.errors import PlacementError
from raypar.spec.models import JobSpec
from raypar.spec.runtime_env import without_inherited_pip
from raypar.worker.actor import Worker
from raypar.worker.plan import WorkerPlan

log = logging.getLogger("raypar")
# Seconds Ray may take to create a placement group the cluster has the nodes for, whatever
# raypar.placement_timeout (0 fails at once only when the nodes are not there: creating the
# group takes milliseconds to seconds even then).
GROUP_CREATION_SECONDS = 10.0
ASIDE = "aside"  # the actor's concurrency group for calls beside its ordered ones (while one runs)
# A thread of its own for requests answered at once, never behind a read ahead: an interrupted
# driver's last one (store what you finished), and taking back queued calls (worker/withdrawals.py).
STORE = "store"
GROUP_OF = {"store_finished": STORE, "withdraw": STORE}  # the calls aside that are not hints (ASIDE: the rest)


class Placement:
    """The placement group and the factory of worker actors pinned into it."""

    def __init__(self, spec: JobSpec, job_url: str, run: str, owned_cluster: bool, plan: WorkerPlan,
                 runtime_env: Optional[dict] = None, echo: Callable[[str], None] = log.info):

        self.spec, self.job_url, self.run = spec, job_url, run
        # The embedded Ray (started by this driver, or by the pipeline running it) knows its
        # own nodes: it never grows, so waiting for placement cannot help.
        self.owned = owned_cluster or cluster.is_embedded()
        self.echo = echo
        self.pg = None
        self.elastic: Optional[ElasticInstances] = None  # set by reserve() for an elastic job on a cluster
        self.plan = plan  # engine.worker_plan.worker_plan(): what each worker is told
        # runtime_env.worker_runtime_env(), less what a submitted job's own env already installs
        self.runtime_env = without_inherited_pip(runtime_env, dict(ray.get_runtime_context().runtime_env))
        self._remote = _worker_actor()

    def bundle(self, slots: int) -> dict[str, float]:
        """One instance's resources: ``slots`` workers'."""
        w, n = self.spec.raypar.worker, slots
        bundle = {"CPU": w.num_cpus * n, "GPU": w.num_gpus * n}
        if w.memory is not None:
            bundle["memory"] = float(w.memory_bytes() * n)
        bundle.update({k: v * n for k, v in w.resources.items()})
        return {k: v for k, v in bundle.items() if v > 0}

    def reserve(self, count: int, slots: Optional[int] = None) -> Optional[list[int]]:
        """Reserve ``count`` distinct nodes (instance_count, or fewer for a session with fewer
        mini-batches; on the embedded one-node Ray: that node for all of them), each with the
        resources of ``slots`` workers (None: max_concurrency_per_instance), or raise
        PlacementError saying why not. Returns the instances of an elastic job (None: ``range(count)``)."""
        resources = self.spec.resources
        slots = slots or self.spec.max_concurrency_per_instance
        bundle = self.bundle(slots)
        timeout = self.spec.raypar.placement_timeout
        line = fewer_reserved(count, slots, resources.instance_count, self.spec.max_concurrency_per_instance)
        if line:
            self.echo(line)
        alive = [n for n in ray.nodes() if n.get("Alive")]
        if self.owned and len(alive) == 1 and (count > 1 or resources.elastic):
            if resources.elastic:
                self.echo(f"raypar: elastic instances on a one-node Ray, which never grows: "
                          f"running instance_count={count}")
            self._reserve_packed(alive[0], bundle, count, slots, timeout)
            return None
        if resources.elastic:
            self.elastic = ElasticInstances(bundle, count, resources.max_instance_count, self.run,
                                            0.0 if self.owned else timeout, self.echo, _fmt(bundle))
            return self.elastic.reserve()
        fitting = [n for n in alive if all(n["Resources"].get(k, 0) >= v for k, v in bundle.items())]
        need = (
            f"the job needs {count} node(s) with {_fmt(bundle)} each "
            f"({_instances(count, resources.instance_count)} x {_slots(slots, self.spec.max_concurrency_per_instance)}); "
            f"the cluster has {len(fitting)} such node(s) of {len(alive)} alive"
        )
        if len(fitting) < count and (self.owned or timeout == 0):
            raise PlacementError(need)
        self._create([bundle] * count, "STRICT_SPREAD", timeout, need)

    def _reserve_packed(self, node: dict, bundle: dict[str, float], count: int, slots: int, timeout: float) -> None:
        """All instances on the embedded Ray's one node, or PlacementError at once when they cannot fit."""
        total = {k: v * count for k, v in bundle.items()}
        has = node["Resources"]
        if not all(has.get(k, 0) >= v for k, v in total.items()):
            offered = {k: has.get(k, 0) for k in total}
            raise PlacementError(
                f"the job needs {_fmt(total)} on this machine for its {count} instances "
                f"({_instances(count, self.spec.resources.instance_count)} x {_slots(slots, self.spec.max_concurrency_per_instance)}, "
                f"{_fmt(bundle)} each); the embedded one-node Ray "
                f"has {_fmt(offered)}; lower instance_count or raypar.worker, or give a cluster with --address")
        named = self.spec.resources.instance_count
        self.echo(f"raypar: instance_count {named} on a one-node Ray: running "
                  f"{'the' if count == named else f'{count} of the'} {named} instances on this machine")
        self._create([bundle] * count, "STRICT_PACK", timeout,
                     f"the job needs {_fmt(total)} on this machine for its {count} instances")

    def _create(self, bundles: list[dict], strategy: str, timeout: float, need: str) -> None:
        self.pg = placement_group(bundles, strategy=strategy, name=f"raypar-{self.run}")
        waited = timeout or GROUP_CREATION_SECONDS  # placement_timeout 0: the nodes are there
        try:
            ray.get(self.pg.ready(), timeout=waited)
        except GetTimeoutError:
            self.release()
            why = "raypar.placement_timeout" if timeout else "for Ray to reserve them: raypar.placement_timeout is 0"
            raise PlacementError(f"{need} free; waited {waited:.0f}s ({why})") from None

    def new_actor(self, slot):
        w = self.spec.raypar.worker
        slot.generation += 1
        return self._remote.options(
            num_cpus=w.num_cpus, num_gpus=w.num_gpus, memory=w.memory_bytes(),
            resources=w.resources or None, max_restarts=0, max_concurrency=1,
            scheduling_strategy=self._strategy(slot.instance),
            # The same runtime env for every actor (set before the process starts), so Ray can
            # share worker processes between them.
            runtime_env=self.runtime_env,
            name=self.actor_name(slot),
        ).remote(self.job_url, self.plan, self.run, slot.instance, slot.index)

    def _strategy(self, instance: int) -> PlacementGroupSchedulingStrategy:
        if self.elastic is not None:
            return PlacementGroupSchedulingStrategy(self.elastic.group_of(instance), placement_group_bundle_index=0)
        return PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=instance)

    def actor_name(self, slot) -> str:
        """Job, node, instance and slot, as the dashboard's actor list shows them."""
        node = self.node_of(slot.instance)
        again = f":restart{slot.generation - 1}" if slot.generation > 1 else ""
        return (f"raypar:{self.spec.name or 'job'}:node-{node[:8] if node else 'pending'}:"
                f"instance{slot.instance}-slot{slot.index}{again}:{self.run}")

    def node_of(self, instance: int) -> Optional[str]:
        """The node ID the instance's bundle sits on now (None while Ray re-places it)."""
        if self.elastic is not None:
            return self.elastic.node_of(instance)
        if self.pg is None:
            return None
        return ray.util.placement_group_table(self.pg).get("bundles_to_node_id", {}).get(instance) or None

    def placed_instances(self) -> set[int]:
        """Instances whose bundle currently sits on a live node (a lost node's wait for re-placement)."""
        if self.elastic is not None:
            return self.elastic.placed_instances()
        if self.pg is None:
            return set()
        table = ray.util.placement_group_table(self.pg)
        return {int(i) for i, node in table.get("bundles_to_node_id", {}).items() if node}

    def release(self) -> None:
        if self.elastic is not None:
            self.elastic.release()
        if self.pg is not None:
            try:
                remove_placement_group(self.pg)
            except Exception as exc:  # noqa: BLE001 - the cluster may already be gone
                log.debug("removing placement group failed: %s", exc)
            self.pg = None


@functools.lru_cache(maxsize=1)
def _worker_actor():
    """The actor class, made once per process: Ray exports (pickles) a class per ray.remote() call."""
    # Two threads beside the ordered calls: "aside" for hints (reading a batch ahead), "store" for
    # requests answered at once (store the finished batches now, take back queued calls).
    return ray.remote(concurrency_groups={ASIDE: 1, STORE: 1})(Worker)


class RayTransport(Transport):
    """Worker actors pinned into the job's placement group; Ray's errors as the engine's."""

    def __init__(self, placement: Placement):
        self.placement = placement
        self.metrics = JobMetrics(placement.spec.name or "job", placement.job_url)

    def reserve(self, count: int, slots: Optional[int] = None) -> Optional[list[int]]:
        return self.placement.reserve(count, slots)

    @property
    def elastic(self) -> bool:
        return self.placement.elastic is not None

    def changes(self) -> tuple[list[int], list[int]]:
        return self.placement.elastic.changes()

    def drop(self, instance: int) -> None:
        self.placement.elastic.drop(instance)

    def want(self, count: Optional[int]) -> None:
        self.placement.elastic.want(count)

    def release(self) -> None:
        self.metrics.flush()
        self.placement.release()

    def placed_instances(self) -> set[int]:
        return self.placement.placed_instances()

    def new_worker(self, slot) -> Any:
        return self.placement.new_actor(slot)

    def call(self, worker: Any, method: str, *args) -> Any:
        return getattr(worker, method).remote(*args)

    def call_aside(self, worker: Any, method: str, *args) -> Any:
        return getattr(worker, method).options(concurrency_group=GROUP_OF.get(method, ASIDE)).remote(*args)

    def wait(self, calls, timeout: float) -> list:
        self.metrics.flush_if_due()
        calls = list(calls)
        ready, _ = ray.wait(calls, num_returns=1, timeout=timeout)
        if ready:
            ready, _ = ray.wait(calls, num_returns=len(calls), timeout=0)
        return ready

    def ended(self, calls: Iterable) -> list:
        calls = list(calls)
        return ray.wait(calls, num_returns=len(calls), timeout=0)[0] if calls else []

    def get(self, call: Any) -> Any:
        try:
            return ray.get(call)
        except RuntimeEnvSetupError as exc:
            raise SetupFailed(str(exc)) from None
        except RayTaskError as exc:  # the method raised: raypar's own code (run() errors are answers)
            raise WorkerRaised(_cause(exc)) from None
        except RayError as exc:
            raise WorkerLost(type(exc).__name__, str(exc)) from None

    def cancel(self, call: Any) -> None:
        ray.cancel(call)

    def kill(self, worker: Any) -> None:
        try:
            ray.kill(worker, no_restart=True)
        except Exception as exc:  # noqa: BLE001 - already dead
            log.debug("kill: %s", exc)

    def batch_done(self, seconds: Optional[float]) -> None:
        self.metrics.batch_done(seconds)

    def batch_failed(self) -> None:
        self.metrics.batch_failed()


def _cause(exc: RayTaskError) -> str:
    """One line for an exception raised in a worker's raypar code (its last traceback line)."""
    cause = getattr(exc, "cause", None)
    if cause is not None:
        return describe_error(cause)
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(exc).__name__


def fewer_reserved(count: int, slots: int, instances: int, per_instance: int) -> Optional[str]:
    """The line a session with few mini-batches says when it reserves fewer instances, or fewer
    worker slots on each, than the spec names (None when it reserves them all)."""
    reserved = f"the {count} instances" if count == instances else f"{count} of the {instances} instances"
    if slots < per_instance:
        each = f"{slots} of their {per_instance} worker slots each"
        if instances == 1:
            reserved, each = "the instance", f"{slots} of its {per_instance} worker slots"
        return f"raypar: {reserved} reserved with {each}: fewer mini-batches to run than worker slots"
    if count < instances:
        return f"raypar: {reserved} reserved: fewer mini-batches to run than instances"
    return None


def _instances(count: int, named: int) -> str:
    """How a placement error names the instances it reserves: all, or fewer for fewer batches."""
    return f"instance_count={named}" if count == named else f"{count} of instance_count={named}: fewer mini-batches"


def _slots(slots: int, named: int) -> str:
    """How a placement error names the worker slots of each instance it reserves: all, or fewer."""
    return f"max_concurrency_per_instance={named}" if slots == named else f"{slots} of max_concurrency_per_instance={named}"


def _fmt(bundle: dict[str, float]) -> str:
    parts = []
    for k, v in bundle.items():
        if k == "memory":
            parts.append(f"memory {v / 2**30:.1f} GiB")
        else:
            parts.append(f"{k} {v:g}")
    return "{" + ", ".join(parts) + "}"
