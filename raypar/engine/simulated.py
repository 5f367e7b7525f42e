"""A cluster that exists only as times on a simulated clock: the engine's test bench.

Each worker runs its calls one after the other, each begun when the one before it ends (as an
actor does: a call queued behind another can be taken back until then); what a mini-batch does
(how long it takes, whether run() fails, whether the worker dies in it) comes from a
``behaviour`` function, asked when the batch begins.
The scheduler runs unchanged on it: no Ray, no processes, no sleeping, so a million
mini-batches on a thousand workers take seconds of CPU, all of it the scheduler's own
(benchmarks/bench_engine_simulation.py), and a unit test can walk the policy through one
transition at a time (tests/test_engine_policy.py).
"""

from __future__ import annotations

import collections
import heapq
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from raypar.engine.transport import Transport, WorkerLost, WorkerRaised
from raypar.inputs.base import MiniBatch
from raypar.jobdir.records import DoneRecord
from raypar.worker.withdrawals import call_name


@dataclass
class Outcome:
    """What one attempt of a mini-batch does on a simulated worker."""

    seconds: float
    result: str = "ok"  # "ok", "user" (run() raised), "lost" (the worker dies in it), "raised" (raypar raised)
    error: str = "ValueError: simulated"
    # "lost": the answer of the worker's call before this one is lost with it (Ray can fail a call
    # that ended just before its worker died, as if the worker had died in it).
    loses_answer_before: bool = False


@dataclass
class _Waiting:
    """A call queued on a worker behind the one it runs."""

    cid: int
    method: str
    args: tuple
    made: float  # when the driver made it: it begins no sooner
    withdrawn: bool = False  # taken back: its turn answers {"withdrawn": True} at once


@dataclass
class _Worker:
    slot: Any
    dies_at: Optional[float] = None
    written: int = 0
    calls: set = field(default_factory=set)  # its calls not yet answered
    waiting: collections.deque = field(default_factory=collections.deque)  # _Waiting, in order
    running: Optional[int] = None  # the call it runs, until that one's end is reached
    last_call: Optional[int] = None
    writer: Any = None  # its DoneWriter, with a ledger
    ran: float = 0.0  # seconds of run() its answers count (as the real worker's TimeSpent does)


class SimulatedCluster(Transport):
    """``behaviour(batch_json, attempt, worker)`` -> Outcome, for each run_batch call (the batch as
    MiniBatch.to_json() gives it, unparsed: parsing is the behaviour's cost, not the scheduler's)."""

    def __init__(self, behaviour: Callable[[dict, int, int], Outcome], start_seconds: float = 1.0,
                 instances: Optional[set] = None, record: bool = False, ledger=None, withdraw_seconds: float = 0.0):
        self.behaviour, self.start_seconds = behaviour, start_seconds
        self.start_error: Callable[[Any], Optional[str]] = lambda slot: None  # init()'s traceback, if it fails
        # How long a request to take calls back takes to reach its worker, and its answer to come back.
        self.withdraw_seconds = withdraw_seconds
        self.arriving: dict[int, tuple[int, list]] = {}  # withdraw call -> (worker, names), on its way
        self.now = 0.0
        self.clock = lambda: self.now
        self.instances = instances  # placed instances (None: all)
        self.ledger = ledger  # with one, each worker stores its done records there, as real ones do
        self.workers: dict[int, _Worker] = {}
        self.events: list = []  # (end, call id) of calls not yet ended
        self.results: dict[int, tuple] = {}  # call id -> (end, kind, value)
        self.ended_calls: set[int] = set()
        self.ids = itertools.count(1)
        self.stats = {"workers": 0, "run_batch": 0, "canceled": 0, "killed": 0, "done": 0, "failed": 0}
        # With ``record`` (tests), what the read-ahead hints were about; each grows with the job.
        self.record = record
        self.run_starts: dict[str, float] = {}  # batch json -> when its last run_batch call starts
        self.queued: list[str] = []  # batches whose run_batch waited behind another call
        self.asides: list[tuple[str, bool]] = []  # (batch json, its run_batch had not started) per hint
        self.withdrawn: list[str] = []  # batches whose run_batch was taken back before it began
        self.started: list[tuple[int, int]] = []  # (instance, slot index) of each worker, as it started
        self.reserved: Optional[int] = None  # the instances the scheduler asked to reserve
        self.reserved_slots: Optional[int] = None  # ... with this many worker slots each (None: all)
        # Elastic instances (see elastic()): node arrivals and departures at chosen instants.
        self.timeline: list[tuple[float, str, int]] = []  # heap of (when, "join" | "leave", instance)
        self.joined: list[int] = []
        self.left: list[int] = []
        self.first_instances: Optional[list[int]] = None
        self.given_back: list[tuple[float, int]] = []  # (when, instance) of each drop()
        self.wants: list[tuple[float, Optional[int]]] = []  # (when, count) of each want()

    def with_nodes(self, instances: list[int], timeline: list[tuple[float, str, int]]) -> "SimulatedCluster":
        """Make this an elastic cluster: ``instances`` placed at the start, then each
        ``(when, "join" | "leave", instance)``: an instance placed on a node that joined, or one
        whose node left (its workers die at that instant)."""
        self.first_instances, self.instances = list(instances), set(instances)
        self.timeline = list(timeline)
        heapq.heapify(self.timeline)
        return self

    @property
    def elastic(self) -> bool:
        return self.first_instances is not None

    def reserve(self, count: int, slots: Optional[int] = None) -> Optional[list[int]]:
        self.reserved, self.reserved_slots = count, slots
        return self.first_instances

    def changes(self) -> tuple[list[int], list[int]]:
        joined, left, self.joined, self.left = self.joined, self.left, [], []
        return joined, left

    def idle(self, seconds: float) -> None:
        self.wait([], seconds)

    def drop(self, instance: int) -> None:
        self.given_back.append((self.now, instance))
        self.instances.discard(instance)

    def want(self, count: Optional[int]) -> None:
        self.wants.append((self.now, count))

    def _node_event(self, action: str, instance: int) -> None:
        if action == "join":
            self.instances.add(instance)
            self.joined.append(instance)
            return
        self.instances.discard(instance)
        self.left.append(instance)
        for wid, w in self.workers.items():
            if w.slot.instance != instance:
                continue
            w.dies_at = min(w.dies_at, self.now) if w.dies_at is not None else self.now
            for cid in w.calls:  # its calls not yet ended end now, lost (those waiting, as they begin)
                if cid in self.results and self.results[cid][0] > self.now:
                    self.results[cid] = (self.now, "lost", "NodeDied", wid)
                    heapq.heappush(self.events, (self.now, cid))

    def placed_instances(self) -> set[int]:
        return self.instances if self.instances is not None else {s.instance for s in
                                                                   (w.slot for w in self.workers.values())}

    def new_worker(self, slot) -> int:
        wid = next(self.ids)
        self.stats["workers"] += 1
        self.workers[wid] = _Worker(slot=slot)
        if self.record:
            self.started.append((slot.instance, slot.index))
        return wid

    def call(self, worker: int, method: str, *args) -> int:
        cid = next(self.ids)
        w = self.workers[worker]
        w.calls.add(cid)
        if w.running is not None or w.waiting:  # it runs another call: this one waits its turn
            w.waiting.append(_Waiting(cid, method, args, self.now))
        else:
            self._begin(worker, _Waiting(cid, method, args, self.now), self.now)
        return cid

    def _begin(self, worker: int, call: _Waiting, start: float) -> None:
        """The worker's turn comes to ``call`` at ``start``: what it does decides when it ends."""
        w = self.workers[worker]
        method, args = call.method, call.args
        kind, value, seconds, outcome = "ok", None, 0.0, None
        if call.withdrawn:
            value = {"withdrawn": True}
        elif method == "start":
            error = self.start_error(w.slot)
            seconds, value = self.start_seconds, {"ok": True, "node": f"node-{w.slot.instance}", "writer": f"w{worker}",
                                                  "init": self.start_seconds}
            if error:
                value = {"ok": False, "error": error, "stage": "init()", "init": self.start_seconds}
            if self.instances is not None and w.slot.instance not in self.instances and self.first_instances is None:
                seconds = float("inf")  # its node is gone: Ray holds the actor until it re-places the bundle
        elif method in ("run_batch", "run_batches") and w.dies_at is not None:
            pass  # queued on a worker that dies before it: it never runs (it ends with the worker, below)
        elif method == "run_batch":
            self.stats["run_batch"] += 1
            if self.record:
                self.run_starts[args[0]] = start
                if start > call.made:
                    self.queued.append(args[0])
            outcome = self.behaviour(args[0], args[1], worker)
            seconds = outcome.seconds
            if outcome.result in ("ok", "user"):
                w.ran += seconds
            if outcome.result == "ok":
                self._store(worker, args[0], args[1])
                w.written += 1
                value = {"ok": True, "items": 1, "returned": 1, "seconds": seconds, "durable": w.written,
                         "position": 0, "index": w.written, "spent": [0.0, w.ran, 0.0]}
            elif outcome.result == "user":
                value = {"ok": False, "items": 1, "error": outcome.error, "durable": w.written, "position": 0,
                         "spent": [0.0, w.ran, 0.0]}
            elif outcome.result == "raised":
                kind, value = "raised", outcome.error
            else:
                kind, value = "lost", "ActorDiedError"
        elif method == "run_batches":  # a group: its batches one after the other, answered together
            self.stats["groups"] = self.stats.get("groups", 0) + 1
            self.stats["grouped"] = self.stats.get("grouped", 0) + len(args[0])
            parts = []
            for batch_json, attempt in args[0]:
                self.stats["run_batch"] += 1
                outcome = self.behaviour(batch_json, attempt, worker)
                seconds += outcome.seconds
                if outcome.result == "lost":
                    kind, value = "lost", "ActorDiedError"
                    break
                if outcome.result == "raised":  # the worker answers the parts before it, as run_batches does
                    value = {"parts": parts, "raised": outcome.error}
                    break
                w.ran += outcome.seconds
                if outcome.result == "ok":
                    self._store(worker, batch_json, attempt)
                    w.written += 1
                    parts.append({"ok": True, "items": 1, "returned": 1, "seconds": outcome.seconds,
                                  "durable": w.written, "position": 0, "index": w.written, "spent": [0.0, w.ran, 0.0]})
                else:
                    parts.append({"ok": False, "items": 1, "error": outcome.error, "durable": w.written,
                                  "position": 0, "spent": [0.0, w.ran, 0.0]})
            else:
                value = {"parts": parts}
        elif method == "flush":
            value = {"durable": w.written, "position": 0}
        end = start + seconds
        if w.dies_at is not None and w.dies_at <= end:  # calls queued on a worker that dies end with it
            end, kind, value = max(start, w.dies_at), "lost", "ActorDiedError"
        elif kind == "lost":
            w.dies_at = end
            if outcome.loses_answer_before and w.last_call in self.results:
                before = self.results[w.last_call]
                self.results[w.last_call] = (before[0], "lost", "ActorDiedError", worker)
        w.last_call, w.running = call.cid, call.cid
        self.results[call.cid] = (end, kind, value, worker)
        heapq.heappush(self.events, (end, call.cid))

    def _ended(self, cid: int, end: float) -> None:
        """``cid`` ended at ``end``: its worker begins its next call."""
        worker = self.results[cid][3]
        w = self.workers.get(worker)
        if w is None or w.running != cid:
            return
        w.running = None
        if w.waiting:
            call = w.waiting.popleft()
            self._begin(worker, call, max(end, call.made))

    def _store(self, worker: int, batch_json: str, attempt: int) -> None:
        """The worker's done record of a batch, in the ledger (stored as the call begins: fine for
        what tests ask, which batches a lost worker had stored)."""
        w = self.workers[worker]
        if self.ledger is None or w.dies_at is not None:
            return
        if w.writer is None:
            w.writer = self.ledger.done_writer(f"w{worker}")  # the name its start answer gives
        w.writer.write(DoneRecord(batch=MiniBatch.from_json(batch_json).id, run="r1", attempt=attempt, items=1,
                                  returned=1, part=None), None)

    def call_aside(self, worker: int, method: str, *args) -> Optional[int]:
        self.stats["asides"] = self.stats.get("asides", 0) + 1
        w = self.workers[worker]
        if self.record and method == "prefetch":
            self.asides.append((args[0], any(c.method == "run_batch" and c.args[0] == args[0] for c in w.waiting)))
        if method != "withdraw":
            return None
        cid, trip = next(self.ids), self.withdraw_seconds
        w.calls.add(cid)
        self.results[cid] = (self.now + 2 * trip, "ok", None, worker)
        heapq.heappush(self.events, (self.now + 2 * trip, cid))
        if trip:  # it reaches the worker halfway: the calls begun by then are not withdrawn
            self.arriving[cid] = (worker, args[0])
            heapq.heappush(self.events, (self.now + trip, -cid))
        else:
            self._arrive(cid, worker, args[0])
        return cid

    def _arrive(self, cid: int, worker: int, names: list) -> None:
        """A request to take calls back reaches ``worker`` (its "store" thread answers it at once)."""
        taken = []
        for call in self.workers[worker].waiting if worker in self.workers else ():
            if not call.withdrawn and call.method in ("run_batch", "run_batches") and _name(call) in names:
                call.withdrawn = True
                taken.append(_name(call))
                self.withdrawn.extend([call.args[0]] if call.method == "run_batch" else [b for b, _ in call.args[0]])
        if cid in self.results:
            self.results[cid] = (*self.results[cid][:2], {"withdrawn": taken}, worker)

    def wait(self, calls, timeout: float) -> list:
        """Advance the clock to the next end among ``calls`` (or by ``timeout``)."""
        wanted = set(calls) if isinstance(calls, (list, tuple)) else calls  # anything with a fast "in"
        while True:
            while self.events and self.events[0][1] > 0 and (
                    self.events[0][1] not in self.results or self.events[0][1] in self.ended_calls
                    or self.results[self.events[0][1]][0] != self.events[0][0]):
                heapq.heappop(self.events)  # canceled, a killed worker's, or one a node's departure ended sooner
            limit = min(self.now + timeout, self.events[0][0] if self.events else float("inf"))
            if not self.timeline or self.timeline[0][0] > limit:
                break
            when, action, instance = heapq.heappop(self.timeline)
            timeout -= max(0.0, when - self.now)
            self.now = max(self.now, when)
            self._node_event(action, instance)
        if not self.events or self.events[0][0] > self.now + timeout:
            self.now += timeout
            return []
        self.now = max(self.now, self.events[0][0])
        ready = []
        while self.events and self.events[0][0] <= self.now:
            end, cid = heapq.heappop(self.events)
            if cid < 0:  # a request to take calls back reaches its worker
                self._arrive(-cid, *self.arriving.pop(-cid))
            elif cid in self.results and self.results[cid][0] == end and cid not in self.ended_calls:
                self.ended_calls.add(cid)
                self._ended(cid, end)
                if cid in wanted:
                    ready.append(cid)
        return ready

    def ended(self, calls) -> list:
        return [c for c in calls if c in self.ended_calls or (c in self.results and self.results[c][0] <= self.now)]

    def get(self, call: int) -> Any:
        if call not in self.ended_calls:  # ended by the clock, not yet seen by wait(): the next call begins
            self._ended(call, self.results[call][0])
        _, kind, value, worker = self.results.pop(call)
        self.ended_calls.discard(call)
        if worker in self.workers:
            self.workers[worker].calls.discard(call)
        if kind == "lost":
            raise WorkerLost(value)
        if kind == "raised":
            raise WorkerRaised(value)
        return value

    def cancel(self, call: int) -> None:
        for w in self.workers.values():  # a call that has begun runs to its end
            waiting = next((c for c in w.waiting if c.cid == call), None)
            if waiting is not None:
                self.stats["canceled"] += 1
                w.waiting.remove(waiting)
                w.calls.discard(call)
                return

    def kill(self, worker: int) -> None:
        w = self.workers.pop(worker, None)
        if w is not None:
            self.stats["killed"] += 1
            for cid in w.calls:
                self.results.pop(cid, None)
                self.ended_calls.discard(cid)

    def batch_done(self, seconds: Optional[float]) -> None:
        self.stats["done"] += 1

    def batch_failed(self) -> None:
        self.stats["failed"] += 1


def _name(call: _Waiting) -> str:
    """The name the worker knows a batch call by (raypar/worker/withdrawals.py)."""
    batch_json, attempt = call.args if call.method == "run_batch" else call.args[0][0]
    return call_name(MiniBatch.from_json(batch_json).id, attempt)
