"""Elastic instances: one placement group per instance, each on a node of its own, joining and
leaving as nodes come and go (``resources.max_instance_count``, or ``instance_count: "2..8"``).

A fixed job reserves all its instances in one STRICT_SPREAD group, and a lost node's instance
waits for Ray to place it again. An elastic job instead pins each instance's one-bundle group to a
node by its ``ray.io/node-id`` label: the job starts once ``instance_count`` of them are placed,
takes each node that joins (up to ``max_instance_count``), and lets an instance whose node left
simply end, so nothing ever waits on a lost node while others remain.

An autoscaler (Ray's, KubeRay's) is told the job could use ``max_instance_count`` instances
(``ray.autoscaler.sdk.request_resources``), and the request is withdrawn when the job ends. The
scheduler asks for changes about once a second (scheduler.INSTANCE_POLL_SECONDS): one listing of
the nodes, whatever the size of the job.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Optional

import ray
from ray.autoscaler.sdk import request_resources
from ray.util.placement_group import NODE_ID_LABEL_KEY, placement_group, remove_placement_group

from raypar.errors import PlacementError

log = logging.getLogger("raypar")
PLACE_SECONDS = 10.0  # a node that fits but has no room free (another job's workers) for this long...
BUSY_SECONDS = 30.0  # ...is not offered again for this long: it must not hold a place other nodes could take


class ElasticInstances:
    """The job's instances, each a placement group on one node; new ones wait until Ray places them."""

    def __init__(self, bundle: dict[str, float], least: int, most: int, run: str, timeout: float,
                 echo: Callable[[str], None] = log.info, shape: str = ""):
        self.bundle, self.least, self.most, self.run = bundle, least, most, run
        self.shape = shape or str(bundle)  # the bundle as messages show it
        self.timeout, self.echo = timeout, echo
        self.placed: dict[int, tuple] = {}  # instance -> (placement group, node id)
        self.waiting: dict[int, tuple] = {}  # instance -> (placement group, node id, its ready() ref, since)
        self.busy: dict[str, float] = {}  # node id -> until when it is not offered again
        self.next_instance = 0
        self.wanted = most  # fewer at the job's tail, once instances have no work left (want())
        self.asked_autoscaler = False

    # -- the session's start and end ---------------------------------------

    def reserve(self) -> list[int]:
        """Place at least ``least`` instances (up to ``most`` on the nodes there are), or raise
        PlacementError after ``timeout`` seconds saying what the cluster lacks."""
        self._ask_autoscaler(self.most)
        deadline = time.monotonic() + self.timeout
        while True:
            alive = self._alive_nodes()
            self._expire(alive)  # a busy node must not keep a free one out at the start either
            self._offer(alive)
            self._collect(wait=min(0.5, max(0.0, deadline - time.monotonic())))
            if len(self.placed) >= self.least:
                return sorted(self.placed)
            if time.monotonic() >= deadline:
                fitting = sum(self._fits(n) for n in alive.values())
                self.release()
                raise PlacementError(
                    f"the job needs at least {self.least} node(s) with {self.shape} free each (instance_count="
                    f"{self.least}, max_instance_count={self.most}); {len(self.placed)} placed, the cluster has "
                    f"{fitting} such node(s) of {len(alive)} alive; waited {self.timeout:.0f}s "
                    f"(raypar.placement_timeout)")

    def release(self) -> None:
        """Remove every placement group and withdraw the autoscaler request."""
        for group, *_ in [*self.placed.values(), *self.waiting.values()]:
            _remove(group)
        self.placed.clear()
        self.waiting.clear()
        if self.asked_autoscaler:
            self.asked_autoscaler = False
            try:
                request_resources(bundles=[])
            except Exception as exc:  # noqa: BLE001 - the cluster may be gone already
                log.debug("withdrawing the autoscaler request failed: %s", exc)

    # -- while the job runs -------------------------------------------------

    def changes(self) -> tuple[list[int], list[int]]:
        """(instances placed since the last call, instances whose node is gone); reserves
        nodes that joined, up to ``most`` instances."""
        alive = self._alive_nodes()
        left = [i for i, (_, node) in self.placed.items() if node not in alive]
        joined = self._collect(wait=0)
        self._expire(alive)
        self._offer(alive)
        return joined, left

    def _expire(self, alive: dict[str, dict]) -> None:
        """Give up the places offered to nodes that left, or that had no room free in PLACE_SECONDS."""
        now = time.monotonic()
        for instance, (group, node, _, since) in list(self.waiting.items()):
            if node not in alive or now - since > PLACE_SECONDS:  # gone, or busy with other work
                _remove(group)
                del self.waiting[instance]
                if node in alive:
                    self.busy[node] = now + BUSY_SECONDS
                    log.info("node %s has no room free for an instance; offered again in %gs", node[:8], BUSY_SECONDS)

    def drop(self, instance: int) -> None:
        """Give an instance's placement group back (its node left, or it has no work left)."""
        entry = self.placed.pop(instance, None)
        if entry is not None:
            _remove(entry[0])

    def want(self, count: Optional[int]) -> None:
        """Use at most ``count`` instances from now on (None: ``most`` again): no node is offered
        beyond them, and the autoscaler is asked for only as many, so it may remove the others."""
        self.wanted = self.most if count is None else count
        if count is not None:
            for group, *_ in self.waiting.values():  # offered, not placed yet: no longer wanted
                _remove(group)
            self.waiting.clear()
        self._ask_autoscaler(self.wanted)

    def node_of(self, instance: int) -> Optional[str]:
        entry = self.placed.get(instance)
        return entry[1] if entry else None

    def group_of(self, instance: int):
        return self.placed[instance][0]

    def placed_instances(self) -> set[int]:
        alive = self._alive_nodes()
        return {i for i, (_, node) in self.placed.items() if node in alive}

    # -- nodes ------------------------------------------------------------

    def _offer(self, alive: dict[str, dict]) -> None:
        """A placement group on each fitting node that has no instance, up to ``most`` in all."""
        used = {node for _, node, *_ in [*self.placed.values(), *self.waiting.values()]}
        now = time.monotonic()
        for node_id in sorted(alive):  # in a fixed order, whatever order Ray lists them in
            node = alive[node_id]
            if len(self.placed) + len(self.waiting) >= self.wanted:
                return
            if node_id in used or not self._fits(node) or self.busy.get(node_id, 0) > now:
                continue
            instance, self.next_instance = self.next_instance, self.next_instance + 1
            group = placement_group([self.bundle], strategy="STRICT_PACK", name=f"raypar-{self.run}-{instance}",
                                    bundle_label_selector=[{NODE_ID_LABEL_KEY: node_id}])
            self.waiting[instance] = (group, node_id, group.ready(), now)

    def _collect(self, wait: float) -> list[int]:
        """Move the groups Ray has placed (waiting up to ``wait`` seconds for one) into ``placed``."""
        if not self.waiting:
            return []
        refs = {entry[2]: instance for instance, entry in self.waiting.items()}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=wait)
        joined = []
        for ref in ready:
            instance = refs[ref]
            group, node, *_ = self.waiting.pop(instance)
            self.placed[instance] = (group, node)
            joined.append(instance)
        return sorted(joined)

    def _fits(self, node: dict) -> bool:
        return all(node["Resources"].get(k, 0) >= v for k, v in self.bundle.items())

    def _ask_autoscaler(self, count: int) -> None:
        """Tell an autoscaler the job could use ``count`` instances (a cluster without one ignores it)."""
        try:
            request_resources(bundles=[self.bundle] * count)
            self.asked_autoscaler = True
        except Exception as exc:  # noqa: BLE001 - a request the cluster cannot take changes nothing here
            log.debug("asking the autoscaler for %d instance(s) failed: %s", count, exc)

    @staticmethod
    def _alive_nodes() -> dict[str, dict]:
        return {n["NodeID"]: n for n in ray.nodes() if n.get("Alive")}


def _remove(group) -> None:
    try:
        remove_placement_group(group)
    except Exception as exc:  # noqa: BLE001 - the cluster may already be gone
        log.debug("removing placement group failed: %s", exc)
