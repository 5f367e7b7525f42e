"""The scheduling policy: feed worker slots mini-batches, react to answers, deadlines and losses.

Ray-free: workers, calls and the clock come from a transport (raypar/engine/transport.py;
Ray's is raypar/engine/ray_transport.py), so the same policy runs jobs, the simulation of a
thousand workers (benchmarks/bench_engine_simulation.py) and unit tests on a fake clock.

Dispatch is pull-based: a worker holds one running call plus a short queue
so it never idles on a round trip. The queue is ``PREFETCH`` deep, deeper
(``FAST_PREFETCH``) only for a worker that has proven its batches take
milliseconds (where Ray's round trip is the cost), and no queue at all for a
worker whose current batch runs long or in the tail of the job: a slow worker
never sits on work others could take.

Batches that take milliseconds are also sent several to a call (a *group*,
``run_batches``): one Ray round trip for up to ``GROUP_MAX`` of them, each still
run, recorded and answered as its own. A group must end within one batch's
timeout; when it does not, or its worker is lost, no batch in it is charged a
try: those its worker stored are done, the others run again *solo*, one to a
call, where a batch that hangs or kills its worker is charged as usual.

The slices of a parquet row group cut by the planner are *reserved*: the
worker that takes the first slice keeps the ones after it (a fair share of
the queue at most), because it decodes the row group once and cuts each
slice from it, where slices dealt out in turn are decoded by every worker
that takes one. An idle worker with nothing queued takes half of the largest
reservation; a lost worker's reservation goes back to the queue.

A call already queued behind a batch that turns out to run long is taken back
(*withdrawn*) when another worker idles with nothing left to take: the worker
confirms which queued calls it withdrew before they began (raypar/worker/withdrawals.py),
and only those go back to the queue, so no batch runs twice and none waits for a
straggler it was queued behind.
"""

from __future__ import annotations

import bisect
import collections
import heapq
import logging
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

from raypar.engine.progress import Snapshot
from raypar.engine.transport import SetupFailed, Transport, WorkerLost, WorkerRaised
from raypar.engine.worker_time import WorkerTime
from raypar.inputs.base import QueuedBatch, ordinal_of
from raypar.inputs.pending import PendingQueue
from raypar.jobdir.ledger import Ledger
from raypar.jobdir.records import FailedRecord
from raypar.spec.models import JobSpec
from raypar.spec.runtime_env import pip_verdict, setup_failure
from raypar.worker.withdrawals import call_name

log = logging.getLogger("raypar")

PREFETCH = 2
FAST_PREFETCH = 4
FAST_BATCH_SECONDS = 0.2  # batches faster than this make the round trip worth hiding
# `raypar status` of a running job: the first failed batches' errors the driver's heartbeat carries
# (status shows 3 by default), each cut to its last characters (status prints the last line).
STATUS_ERRORS = 10
STATUS_ERROR_CHARS = 2_000
GROUP_MAX = 32  # mini-batches per call at most, for batches that take milliseconds
GROUP_SECONDS = 0.05  # ... as many as take about this long together
RESERVE_MAX = 1024  # slices of one parquet row group kept for the worker that decodes it, at most
MAX_STARTS_PER_SLOT = 3  # init() tries per slot before the slot is given up
MAX_DEATHS_PER_SLOT = 5  # worker processes lost per slot before the slot is given up
MAX_SYSTEM_FAILURES_PER_BATCH = 3  # worker losses while running one batch (not user tries)
JOB_DIR_FAILURES_TO_STOP = 3  # raypar's own failures in workers in a row (at least one per slot) that stop the job
STOP_TIMEOUT = 30.0  # seconds shutdown() may take on each worker
STORE_ON_STOP_TIMEOUT = 30.0  # seconds a stopped job waits for workers to store the batches they finished
# Seconds an interrupted driver (Ctrl-C, SIGTERM) waits for workers to store what they finished: Ray
# kills a stopped job's driver 3 s after SIGTERM unless RAY_JOB_STOP_WAIT_TIME_S says otherwise.
STORE_ON_INTERRUPT_TIMEOUT = 2.5
# A call queued behind a batch that has run this long is taken back for a worker that idles (far
# longer than the round trip that takes it back; batches of milliseconds are never held up so long).
WITHDRAW_AFTER = 0.2
# How long after its planner started a fresh job's session waits, at most, for it to release a batch
# for every worker slot or finish, to know whether to reserve and start fewer (a folder is listed
# before the planner starts, and a small input planned in milliseconds while the driver connects to
# Ray; planning slower than this starts every slot, init() overlapping the rest of it).
SIZING_WAIT = 2.0
INSTANCE_POLL_SECONDS = 1.0  # elastic jobs: how often the transport is asked which instances joined or left


@dataclass(eq=False)
class Call:
    ref: Any
    batch: QueuedBatch
    attempt: int
    started: Optional[float]  # None while queued behind another call on the actor
    read_ahead: bool = False  # the worker was told to read its batch while the calls before it run
    members: Optional[list["Call"]] = None  # a group: its batches' own calls (ref None), in order
    withdrawing: bool = False  # the worker was asked to take it back (Scheduler._withdraw)

    @property
    def name(self) -> str:
        """How the worker names this call (worker/withdrawals.py): its first batch and that one's attempt."""
        first = self.members[0] if self.members is not None else self
        return call_name(first.batch.id, first.attempt)


class Unstored:
    """A worker's done batches whose records it has not stored yet, keyed by their index among its
    records: confirming the first ``durable`` of them costs O(log n) each, in whatever order the
    answers were handled."""

    def __init__(self):
        self.heap: list[tuple[int, int]] = []  # (index, key)
        self.calls: dict[int, tuple[Call, int, Any]] = {}  # key -> (call, its unreturned items, its part)

    def add(self, call: Call, index: int, unreturned: int, part: Any = None) -> None:
        heapq.heappush(self.heap, (index, id(call)))
        self.calls[id(call)] = (call, unreturned, part)

    def confirm(self, durable: int) -> list[tuple[Call, Any]]:
        """Forget the first ``durable`` records; returns the (call, part) of those it held."""
        confirmed = []
        while self.heap and self.heap[0][0] <= durable:
            entry = self.calls.pop(heapq.heappop(self.heap)[1], None)
            if entry is not None:
                confirmed.append((entry[0], entry[2]))
        return confirmed

    def take_all(self) -> list[tuple[Call, int]]:
        """Every (call, unreturned items), in the order the worker wrote them; empties this."""
        taken = [self.calls[key][:2] for _, key in sorted(self.heap)]
        self.heap, self.calls = [], {}
        return taken

    def __len__(self) -> int:
        return len(self.calls)


@dataclass(eq=False)
class Slot:
    """One worker position: instance (node) and slot index; its actor may be replaced."""

    instance: int
    index: int
    actor: Any = None
    generation: int = 0
    start_ref: Any = None
    ready: bool = False
    retired: bool = False
    left: bool = False  # elastic jobs: its instance's node left the cluster (retired too)
    starts_failed: int = 0
    deaths: int = 0
    node: Optional[str] = None
    calls: collections.deque = field(default_factory=collections.deque)
    # Done batches whose record the worker has not stored yet (object-store job dirs buffer them).
    unflushed: Unstored = field(default_factory=Unstored)
    writer: Optional[str] = None  # the worker process's writer name (its segments' prefix)
    durable: int = 0  # its records stored, as last reported
    position: int = 0  # where its records after those are (DoneWriter.position)
    flush_ref: Any = None
    answers: int = 0
    mean_seconds: float = 0.0  # moving average of this worker's batch durations
    ahead: int = 0  # raypar.prefetch: queued calls whose batches the worker reads ahead
    # The next slices of the parquet row group this worker decodes, kept for it (see _reserve).
    reserved: collections.deque = field(default_factory=collections.deque)

    def depth(self, now: float) -> int:
        """How many calls this worker may hold right now."""
        head = self.calls[0] if self.calls else None
        if head is not None and head.started is not None and \
                now - head.started > max(4 * self.mean_seconds, 0.5):
            return 1  # its batch runs long: queue nothing behind it
        if self.fast:
            return max(FAST_PREFETCH, 1 + self.ahead)
        return max(PREFETCH, 1 + self.ahead)

    @property
    def fast(self) -> bool:
        """Its batches take milliseconds: queue deeper, and send them several to a call."""
        return self.answers >= 2 and self.mean_seconds < FAST_BATCH_SECONDS

    def observe(self, seconds: float) -> None:
        self.answers += 1
        self.mean_seconds = seconds if self.answers == 1 else 0.8 * self.mean_seconds + 0.2 * seconds

    @property
    def label(self) -> str:
        return f"instance {self.instance} slot {self.index}"

    @property
    def worker_name(self) -> str:  # as the worker names itself in its records
        return f"instance{self.instance}-slot{self.index}"


@dataclass
class Progress:
    total: int
    done: int = 0
    failed: int = 0
    failed_items: int = 0
    unreturned_items: int = 0  # of failed_items: items of done batches that run() returned no result for
    done_before: int = 0  # done by earlier sessions: not part of this session's rate
    planning: bool = False  # the input is still being listed: total grows
    # Writers (worker processes) of this session that were killed or lost, each after what it stored was
    # read: a compaction started after may close all their segment folders (Ledger.compact's ``gone``).
    gone: set = field(default_factory=set)
    # Segments of done records this session's workers stored on an object store: a view reads each
    # one (a GET) until a compaction covers it (on local disk a worker appends to one file instead).
    segments: int = 0
    workers: int = 0  # worker slots of the session (each lists its open segment folder in every view)
    started_at: float = field(default_factory=time.monotonic)
    # The first failed batches by ordinal, (ordinal, {batch, kind, error}), as `raypar status` lists them.
    first_failed: list = field(default_factory=list)
    # The session's worker time so far (TimeSplit.fields()), for `raypar status`; set by the scheduler.
    worker_time: Optional[Callable[[], dict]] = None

    def batch_failed(self, batch_id: str, kind: str, error: str) -> None:
        """A batch failed for good (its tries spent): counted by the caller; its error kept if it is
        one of the first STATUS_ERRORS by ordinal."""
        entry = (ordinal_of(batch_id), {"batch": batch_id, "kind": kind, "error": error[-STATUS_ERROR_CHARS:]})
        bisect.insort(self.first_failed, entry, key=lambda e: e[0])
        del self.first_failed[STATUS_ERRORS:]

    def for_status(self) -> dict:
        """The counts `raypar status` shows of the running job, as this driver has them: its lease's
        heartbeat carries them, so a status reads one small object, not the ledger (at a million
        batches on an object store: a listing of every worker's open folder and megabytes of index).
        Read from the heartbeat's thread: each field is one read, the list copied whole."""
        return {"total": self.total, "completed": self.done, "failed": self.failed, "planning": self.planning,
                "failed_items": self.failed_items, "unreturned_items": self.unreturned_items,
                "errors": [error for _, error in list(self.first_failed)],
                "worker_time": self.worker_time() if self.worker_time is not None else None}

    def rate(self, now: float) -> float:
        return (self.done - self.done_before) / max(now - self.started_at, 1e-9)

    def snapshot(self, now: float) -> Snapshot:
        return Snapshot(done=self.done, failed=self.failed, total=self.total, planning=self.planning,
                        rate=self.rate(now))


class Scheduler:
    """Runs the pending batches of one driver session on a set of worker slots."""

    def __init__(self, ledger: Ledger, spec: JobSpec, run: str, pending: Iterable[QueuedBatch],
                 transport: Transport, progress: Progress,
                 on_progress: Callable[[Progress], None] = lambda p: None,
                 interrupt: Callable[[], Optional[str]] = lambda: None, feed=None,
                 may_write: Callable[[], bool] = lambda: True, output=None,
                 attempts_before: Optional[dict[str, int]] = None):
        self.ledger, self.spec, self.run_id, self.transport = ledger, spec, run, transport
        self.segmented = not ledger.store.appends  # the workers store their records as segments
        self.clock = transport.clock
        self.failed_percent_limit = spec.failed_percent_limit()  # parsed from program_arguments once
        self.max_tries = spec.max_tries
        self.queue = pending if isinstance(pending, PendingQueue) else PendingQueue(pending)  # retries in front
        self.feed = feed  # planning.PlanFeed while the input is still being planned
        self.plan_complete = feed is None
        self.progress, self.on_progress = progress, on_progress
        self.interrupt = interrupt  # returns a reason to stop now (lease lost, later cancel)
        self.may_write = may_write  # False once the lease is lost: the job dir is another driver's
        self.output = output  # outputs.live.LiveAssembly: told each batch stored or failed for good
        self.slots = [slot for i in range(spec.resources.instance_count) for slot in self._new_slots(i)]
        progress.workers = len(self.slots)
        self.calls: dict[Any, tuple[Slot, Call]] = {}
        self.starts: dict[Any, Slot] = {}
        self.flushes: dict[Any, Slot] = {}
        self.withdrawals: dict[Any, tuple[Slot, list[Call]]] = {}  # asked to take back, not answered yet
        self.next_withdraw: Optional[float] = None  # when a queued call may be taken back (_withdraw)
        self.tries: dict[str, int] = collections.Counter()  # user tries spent this session
        self.system_failures: dict[str, int] = collections.Counter()
        # A batch's attempt numbers go on from ``attempts_before`` (its attempts in an earlier round of
        # this session): a (run, attempt) names one record, and a void marker voids that one only.
        self.attempts: dict[str, int] = collections.Counter(attempts_before or {})
        self.rows_seen: dict[str, int] = {}  # rows of table batches, as their tries read them
        self.stop_reason: Optional[str] = None
        self.stop_detail: str = ""
        self.job_dir_failures = 0  # failures of raypar's own work in workers since a worker last stored
        self.recent = collections.deque(maxlen=1000)  # seconds of the last batches: their median
        # What a step looks at, so that its cost does not grow with the number of workers:
        self.dirty: set[Slot] = set()  # slots whose calls, readiness or unstored batches changed
        # Slots that had room but got nothing, every queued batch having failed on them: they look
        # again at the next dispatch (nothing else may change for them while they idle).
        self.passed_over: set[Slot] = set()
        self.queue_was_empty = True  # then every slot may have room: the next dispatch looks at all
        self.reserved = 0  # batches in the slots' reserved deques, out of the queue
        self.unstarted: set[Slot] = set()  # slots left without a worker until there is work
        self.deadlines: list = []  # heap of (timeout deadline, seq, call, slot) of running calls
        self.seq = 0
        self.copies: dict[str, list[Call]] = {}  # batch -> its live attempts, while it runs twice
        self.settled: set[str] = set()  # batches one attempt finished while another still ran
        self.solo: set[str] = set()  # batches whose group ended without an answer: one to a call now
        self.avoid: dict[str, Slot] = {}  # batches to retry, and the worker they failed on: another takes them
        self.last_init_error: Optional[str] = None
        self.started_ok = False  # a worker's start (init()) succeeded this session
        self.failed_instances: set[int] = set()  # instances where a worker's start failed this session
        self.last_init_stage = "init()"
        self.next_poll = 0.0  # elastic jobs: when to ask the transport for joined and left instances
        self.starved_since: Optional[float] = None  # elastic jobs: since when no instance is left
        self.wanted: Optional[int] = None  # elastic jobs: instances still wanted at the tail (None: all)
        self.next_tail_look = 0.0  # elastic jobs: when to look for instances with nothing left to run
        self.worker_time = WorkerTime()  # what the workers' time went to (the session's last line)
        progress.worker_time = self._worker_time_so_far  # `raypar status`

    def _worker_time_so_far(self) -> dict:
        """The split so far, the batches running now as such (read from the heartbeat's thread: a
        slot's queue may change meanwhile, and then its running batch is left to the next beat)."""
        running = {}
        for slot in list(self.slots):
            try:
                since = slot.calls[0].started
            except (IndexError, RuntimeError):
                continue
            if since is not None:
                running[slot] = since
        return self.worker_time.split(self.clock(), running).fields()

    def _new_slots(self, instance: int, count: Optional[int] = None) -> list[Slot]:
        return [Slot(instance=instance, index=s, ahead=self.spec.raypar.prefetch)
                for s in range(count or self.spec.max_concurrency_per_instance)]

    # -- lifecycle ------------------------------------------------------

    def run(self) -> Optional[str]:
        """Run until every batch is done or failed, or a stop condition; returns the stop reason."""
        if self.feed is not None and self._may_size():
            # A fresh job plans while it runs. Wait (briefly) until its planner has either released a
            # batch for every slot or finished: then whether to size the session is known, and does
            # not depend on whether the listing beat the driver's connection to Ray.
            self.feed.wait_for(len(self.slots), SIZING_WAIT)
            self._pull_planned()
            if self.stop_reason is not None:  # planning failed: nothing to reserve or start
                return self.stop_reason
        count = self._instances_to_reserve()
        per_instance = self._slots_to_reserve(count)
        instances = self.transport.reserve(count, per_instance)  # elastic: those the cluster had room for
        self.slots = [slot for i in (range(count) if instances is None else instances)
                      for slot in self._new_slots(i, per_instance)]
        self.progress.workers = len(self.slots)
        try:
            for slot in self._first_slots():
                self._start(slot)
            try:
                while not self._finished():
                    self.step(self.clock())
            except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (signals.Stopped): the workers are killed next
                if self.may_write():
                    self._store_finished_now()
                raise
            if self.stop_reason is not None and self.may_write():
                self._store_before_stop()
            self._retire_all(graceful=self.stop_reason is None)
        finally:
            self._kill_all()
            self.transport.release()
        return self.stop_reason

    def _sized_to_batches(self) -> bool:
        """Whether this session may reserve and start less than every slot, as few as its batches
        need: not while the input is planned (the count is not known), not with speculation
        (idle workers take second attempts), not for elastic instances (they come and go with nodes)."""
        return self.plan_complete and self._may_size()

    def _may_size(self) -> bool:
        return not self.spec.raypar.speculation.enabled and not self.spec.resources.elastic

    def _instances_to_reserve(self) -> int:
        """instance_count, or one instance per pending batch when there are fewer, and one more
        when a batch may be retried, so that a retry can still go to another node (a broken GPU
        fails what it gets): a resume of a few holds no node it cannot use (an autoscaler need
        not start them) and runs on a cluster that has lost some of its nodes since."""
        named = self.spec.resources.instance_count
        if not self._sized_to_batches():
            return named
        return max(1, min(named, self._workers_to_hold()))

    def _slots_to_reserve(self, instances: int) -> int:
        """Worker slots to reserve on each of ``instances``: max_concurrency_per_instance, or as few as
        hold the pending batches and one spare when a batch may be retried (a smoke test of 2 batches
        under instances of 8 GPUs holds 1 GPU on each of 3 nodes, not 8)."""
        named = self.spec.max_concurrency_per_instance
        if not self._sized_to_batches():
            return named
        return max(1, min(named, -(-self._workers_to_hold() // instances)))

    def _workers_to_hold(self) -> int:
        """A sized session's room: a worker per pending batch, and a spare when a batch may be retried."""
        return len(self.queue) + (self.max_tries > 1)

    def _first_slots(self) -> list[Slot]:
        """The slots whose workers start now: every slot, unless the session knows its every batch
        and has fewer than slots (a resume of a few; a fresh job plans while it runs). Then one worker
        starts per batch, each instance's first slot first so the batches spread over the nodes,
        and the others wait in ``unstarted`` for retries that need them (_grow): init() can take
        minutes and load a model on a GPU, and a worker with no batch would pay that for nothing."""
        pending = len(self.queue)
        if pending >= len(self.slots) or not self._sized_to_batches() or self.transport.elastic:
            return self.slots
        first = sorted(self.slots, key=_spread)
        self.unstarted.update(first[pending:])
        if pending:
            log.info("%d batch(es) for %d worker slots: %d worker(s) start", pending, len(self.slots), pending)
        return first[:pending]

    def _finished(self) -> bool:
        if self.feed is not None and self.feed.error:
            self._stop(self.feed.error)  # a planning error is the reason, even before any batch ran
        if self.stop_reason is not None:
            return True
        return not self.queue and not self.reserved and not self.calls and not self.flushes and \
            not any(s.unflushed for s in self.slots) and (self.feed is None or self.feed.exhausted)

    def _pull_planned(self) -> None:
        """Queue the batches the planner released since the last step."""
        if self.feed is None:
            return
        self.queue.extend(self.feed.take())
        self.progress.total = self.feed.planned
        self.progress.planning = not self.feed.exhausted
        if self.feed.error:
            self._stop(self.feed.error)
        elif self.feed.exhausted and not self.plan_complete:
            self.plan_complete = True
            self._check_thresholds()  # the percentage counts once every batch is planned

    def step(self, now: float) -> None:
        """One iteration: dispatch, wait briefly for any answer, handle answers and deadlines."""
        reason = self.interrupt()
        if reason:
            self._stop(reason)
            return
        self._pull_planned()
        self._follow_instances(now)
        self._dispatch(now)
        self._withdraw(now)
        self._give_back_idle_instances(now)
        self._speculate(now)
        self._flush_idle()
        waiting = collections.ChainMap(self.calls, self.starts, self.flushes, self.withdrawals)
        if not waiting and not self.queue and self.feed is not None and not self.feed.exhausted:
            self.feed.wait(0.5)  # the planner is still listing: wake when it releases batches
            return
        if not waiting:
            if self.queue and not any(s.ready or s.start_ref for s in self.slots):
                if self._await_instances(now):
                    return
                if self.last_init_error:
                    self._stop(f"no worker could start: {self.last_init_stage} failed on every worker",
                               self.last_init_error)
                else:
                    self._stop("every worker slot was given up after repeated worker losses")
            return
        ready = self.transport.wait(waiting, self._wait_timeout(now))
        now = self.clock()
        for ref in ready:
            if ref in self.starts:
                self._on_started(self.starts.pop(ref), ref)
            elif ref in self.flushes:
                self._on_flushed(self.flushes.pop(ref), ref, now)
            elif ref in self.calls:
                slot, call = self.calls.pop(ref)
                self._on_answer(slot, call, ref, now)
            elif ref in self.withdrawals:
                self._on_withdrawn(*self.withdrawals.pop(ref), ref, now)
        self._enforce_timeouts(now)
        self.on_progress(self.progress)

    def _wait_timeout(self, now: float) -> float:
        deadlines = [self._next_deadline()[0]] if self._next_deadline() else []
        if self.next_withdraw is not None:
            deadlines.append(self.next_withdraw)
        threshold = self._straggler_threshold()
        if threshold is not None:  # wake when a running batch becomes a straggler
            deadlines += [c.started + threshold for s in self.slots for c in list(s.calls)[:1]
                          if c.started and c.batch.id not in self.copies and c.started + threshold > now]
        return max(0.0, min([1.0, *(d - now for d in deadlines)]))

    # -- elastic instances ------------------------------------------------

    def _follow_instances(self, now: float) -> None:
        """Elastic jobs: take the instances placed on nodes that joined, end those whose node left."""
        if not self.transport.elastic or now < self.next_poll:
            return
        self.next_poll = now + INSTANCE_POLL_SECONDS
        joined, left = self.transport.changes()
        for instance in left:
            self._leave(instance, now)
        for instance in joined:
            self._join(instance)

    def _give_back_idle_instances(self, now: float) -> None:
        """The job's tail: nothing is left to send, and an instance whose every worker idles is
        stopped and its node given back (its reservation, and its share of the autoscaler's
        request), so that a cluster that scales down removes the node while the last batches run
        elsewhere. Work that comes back and that no worker took (a lost batch) asks for the nodes
        again. Looked at after each dispatch, about once a second."""
        if not self.transport.elastic or now < self.next_tail_look or not self.spec.raypar.give_back_idle_instances:
            return
        self.next_tail_look = now + INSTANCE_POLL_SECONDS
        if self.queue or self.reserved or not self.plan_complete or self.withdrawals:  # work for idle workers
            if self.queue and self.wanted is not None:
                self.wanted = None
                self.transport.want(None)
            return
        if self.stop_reason is not None or self.spec.raypar.speculation.enabled:
            return  # speculation gives idle workers second attempts of the slowest batches
        instances = collections.defaultdict(list)
        for slot in self.slots:
            if not slot.retired:
                instances[slot.instance].append(slot)
        idle = [i for i, slots in instances.items() if all(_idles(s) for s in slots)]
        if not idle or len(idle) == len(instances):
            return  # work everywhere, or the job ends now anyway
        for instance in idle:
            slots = instances[instance]
            self._stop_workers([s for s in slots if s.ready])
            for slot in slots:
                self._kill(slot)
                slot.retired = True
                self.unstarted.discard(slot)
                self.passed_over.discard(slot)
            self.transport.drop(instance)
        self.wanted = len(instances) - len(idle)
        self.transport.want(self.wanted)
        log.warning("%d instance(s) given back: nothing left to send them; %d still run the last batches",
                    len(idle), self.wanted)

    def _live_instances(self) -> int:
        return len({s.instance for s in self.slots if not s.left})

    def _join(self, instance: int) -> None:
        slots = self._new_slots(instance)
        self.slots.extend(slots)
        self.progress.workers = len(self.slots)
        self.starved_since = None
        log.warning("instance %d joined on a new node: %d instance(s) now", instance, self._live_instances())
        if self.stop_reason is None:
            self.unstarted.update(slots)  # started by the next dispatch, if there is work left
            self.queue_was_empty = True

    def _leave(self, instance: int, now: float) -> None:
        """The instance's node is gone: its workers are lost (their batches run elsewhere), the
        instance ends and its reservation is given back."""
        for slot in [s for s in self.slots if s.instance == instance and not s.left]:
            if slot.actor is not None:
                self._on_worker_lost(slot, WorkerLost("NodeLost", "the instance's node left the cluster"), now)
            self._mark_left(slot)
        self.transport.drop(instance)

    def _mark_left(self, slot: Slot) -> None:
        if not slot.left:
            slot.left = slot.retired = True
            self.unstarted.discard(slot)
            self.dirty.discard(slot)
            if slot.index == 0:
                log.warning("instance %d left with its node: the job goes on with %d instance(s)",
                            slot.instance, self._live_instances())

    def _await_instances(self, now: float) -> bool:
        """Elastic jobs whose every instance left: wait up to raypar.placement_timeout for a node to
        join (True while waiting), then stop."""
        if not self.transport.elastic or any(not s.retired for s in self.slots) or not any(s.left for s in self.slots):
            return False  # a worker is left, or none left with a node (given up: the usual stop)
        timeout = self.spec.raypar.placement_timeout
        if self.starved_since is None:
            self.starved_since = now
            log.warning("every instance of the job left with its node; waiting up to %gs "
                        "(raypar.placement_timeout) for a node to join", timeout)
        if now - self.starved_since >= timeout:
            self._stop(f"every instance's node left the cluster and none joined within "
                       f"raypar.placement_timeout={timeout:g}s")
            return True
        self.transport.idle(min(INSTANCE_POLL_SECONDS, timeout - (now - self.starved_since)))
        return True

    # -- starting workers -------------------------------------------------

    def _start(self, slot: Slot) -> None:
        self.worker_time.born(slot, self.clock())
        slot.actor = self.transport.new_worker(slot)
        slot.ready = False
        slot.start_ref = self.transport.call(slot.actor, "start")
        self.starts[slot.start_ref] = slot

    def _on_started(self, slot: Slot, ref) -> None:
        slot.start_ref = None
        try:
            answer = self.transport.get(ref)
        except SetupFailed as exc:
            if pip_verdict(str(exc)):
                self._on_environment_failed(slot, str(exc))
                return
            # Not pip refusing a requirement (a race or a hiccup of Ray's env setup): another try may pass.
            answer = {"ok": False, "error": setup_failure(str(exc)), "stage": "setting up the runtime env"}
        except (WorkerLost, WorkerRaised) as exc:
            if self.transport.elastic and slot.instance not in self.transport.placed_instances():
                self._kill(slot)
                self._mark_left(slot)  # its node left while the worker started
                return
            answer = {"ok": False, "error": f"worker process lost while starting: {exc}", "lost": True}
        self.worker_time.started(slot, self.clock(), answer.get("init"))
        if answer.get("ok"):
            slot.ready, slot.node = True, answer.get("node")
            self.started_ok = True
            self.dirty.add(slot)
            slot.writer, slot.durable, slot.position = answer.get("writer"), 0, 0
            log.debug("%s ready on node %s", slot.label, slot.node)
            return
        self.last_init_error = answer.get("error", "")
        self.last_init_stage = answer.get("stage", "starting the worker")
        self.failed_instances.add(slot.instance)
        slot.starts_failed += 1
        log.warning("%s failed on %s (try %d of %d):\n%s", self.last_init_stage, slot.label,
                    slot.starts_failed, MAX_STARTS_PER_SLOT, self.last_init_error)
        self._kill(slot)
        if slot.starts_failed >= MAX_STARTS_PER_SLOT:
            slot.retired = True
        elif self.stop_reason is None:
            self._start(slot)
        self._start_spare(slot)  # its node may be the broken one (or gone, while Ray waits to re-place it)

    def _on_environment_failed(self, slot: Slot, text: str) -> None:
        """pip refused the job's packages: every slot would fail the same way, and each try costs a
        whole pip run, so the job stops at the first one. The reason is one
        line; pip's output goes to the job dir's logs."""
        self._kill(slot)
        slot.retired = True
        if self.stop_reason is not None:
            return  # another slot already said it
        where = self._keep_log(f"{self.run_id}~runtime-env.log", text)
        self._stop(setup_failure(text) + (f" (pip's output: {where})" if where else ""))

    def _keep_log(self, name: str, text: str) -> Optional[str]:
        """``text`` as ``logs/<name>`` in the job dir; its location, or None if it could not be written."""
        try:
            self.ledger.store.write_atomic(text.encode(), "logs", name)
        except Exception as exc:  # noqa: BLE001 - the job's reason matters more than its details
            log.warning("could not write %s to the job dir: %s", name, exc)
            return None
        return self.ledger.store.url("logs", name)

    # -- dispatch ---------------------------------------------------------

    def _dispatch(self, now: float) -> None:
        if self.stop_reason is not None:
            return
        if not self.queue and self.reserved:
            self._share_reserved()
        if not self.queue and not self.reserved:
            self.queue_was_empty = True
            return
        if self.unstarted:
            self._grow()
        # Only slots that changed can have room, unless the queue ran dry since the last look.
        candidates = self.slots if self.queue_was_empty else \
            sorted(self.dirty | self.passed_over, key=self._order)
        self.queue_was_empty = False
        self.passed_over.clear()
        ready = [s for s in candidates if s.ready and not s.retired]
        # Fill in waves (one call per worker per wave) so the first batches spread out.
        for wave in range(1, FAST_PREFETCH + 1):
            # The tail: keep work in the queue for whichever worker frees first (if another can).
            # (What is kept for workers counts: it is theirs, but not the tail yet.)
            queued = len(self.queue) + self.reserved
            if wave > 1 and queued <= len(self.slots) * wave and len(self.slots) > 1 and \
                    queued <= sum(s.ready and not s.retired for s in self.slots) * wave:
                break
            for slot in ready:
                if not self.queue and not slot.reserved:
                    if not self.reserved:
                        self.queue_was_empty = True
                        return
                    continue
                if len(slot.calls) < wave <= slot.depth(now) and not self._submit(slot, now):
                    self.passed_over.add(slot)

    def _grow(self) -> None:
        """Start unstarted slots (not started at first, joined instances, a stopped straggler's) for
        the queued batches that the workers up or starting, and idle, cannot take one each. Looked
        at only while some slot is unstarted and the queue is not empty."""
        queued = len(self.queue) + self.reserved
        wanted = queued - sum(not s.retired and not s.calls and (s.ready or s.start_ref is not None)
                              for s in self.slots)
        if wanted > 0:
            self._start_unstarted(wanted)

    def _start_unstarted(self, count: int) -> None:
        slots = sorted(self.unstarted, key=_spread)
        if self.last_init_error and not self.started_ok:
            # No worker has started yet: a slot of the same instance would fail as its others did
            # (a bug in init() fails everywhere), one of another instance may be on a sound node.
            slots = [s for s in slots if s.instance not in self.failed_instances]
        for slot in slots[:count]:
            self.unstarted.discard(slot)
            if slot.actor is None and not slot.retired:
                self._start(slot)

    def _start_spare(self, slot: Slot) -> None:
        """``slot``'s worker failed (a start, a batch, or lost): with no other worker idle or
        starting, start an unstarted slot, so that what it would run again can go elsewhere now
        rather than wait for ``slot``'s restart, or for a node Ray may never give back."""
        if self.unstarted and self.stop_reason is None and not self._another_worker(slot, idle=True):
            self._start_unstarted(1)

    def _order(self, slot: Slot) -> tuple:
        return slot.instance, slot.index

    def _submit(self, slot: Slot, now: float) -> bool:
        """Send ``slot`` its next call; False when every queued batch failed on it (another worker takes them)."""
        if slot.reserved:
            size = self._group_size(slot)
            batches = [slot.reserved.popleft()]
            while len(batches) < size and slot.reserved and batches[0].id not in self.solo \
                    and slot.reserved[0].id not in self.solo:
                batches.append(slot.reserved.popleft())
            self.reserved -= len(batches)
            return self._send(slot, batches, now)
        aside = []  # retries of batches that failed on this worker: another worker takes them
        if self.avoid and self.avoid.get(self.queue.first().id) is slot and self._another_worker(slot):
            while self.queue and self.avoid.get(self.queue.first().id) is slot:
                aside.append(self.queue.popleft())
            if not self.queue:
                self.queue.extendleft(reversed(aside))
                return False
        size = self._group_size(slot)
        batches = [self.queue.popleft()]
        while len(batches) < size and self.queue and self.queue.first().id not in self.solo \
                and batches[0].id not in self.solo and self.avoid.get(self.queue.first().id) is not slot:
            batches.append(self.queue.popleft())
        if aside:
            self.queue.extendleft(reversed(aside))
        self._reserve(slot, batches[-1])
        return self._send(slot, batches, now)

    def _reserve(self, slot: Slot, batch: QueuedBatch) -> None:
        """``batch`` (the last ``slot`` takes) is a slice of a cut parquet row group: keep the slices
        after it, at the head of the queue, for ``slot``. Its worker decodes the row group once and
        cuts them all from it (tabular.RowGroupCache), where slices dealt out in turn are decoded by
        every worker that takes one. At most a fair share of the queue is kept, so every worker has
        work; an idle worker takes half of the largest reservation when the queue is empty
        (_share_reserved)."""
        if self.spec.raypar.speculation.enabled or (key := batch.row_group) is None:
            return
        limit = min(RESERVE_MAX, len(self.queue) // len(self.slots))
        while len(slot.reserved) < limit and self.queue and self.queue.first().row_group == key \
                and self.avoid.get(self.queue.first().id) is not slot:
            slot.reserved.append(self.queue.popleft())
            self.reserved += 1

    def _share_reserved(self) -> None:
        """The queue is empty and batches are kept for busy workers: each idle worker takes the later
        half (at least one) of the largest reservation: it decodes that row group too, rather than idle."""
        idle = [s for s in self.slots if s.ready and not s.retired and not s.calls and not s.reserved]
        for _ in idle:
            donor = max(self.slots, key=lambda s: len(s.reserved))
            if not donor.reserved:
                return
            taken = [donor.reserved.pop() for _ in range(max(1, len(donor.reserved) // 2))]  # the last first
            self.reserved -= len(taken)
            self.queue.extendleft(taken)
            self.queue_was_empty = True  # every idle slot may take them

    def _release_reserved(self, slot: Slot) -> int:
        """The slot's worker is gone: what was kept for it goes back to the front of the queue."""
        count = len(slot.reserved)
        if count:
            self.queue.extendleft(reversed(slot.reserved))
            self.reserved -= count
            slot.reserved.clear()
        return count

    def _send(self, slot: Slot, batches: list[QueuedBatch], now: float) -> bool:
        """One call to ``slot`` carrying ``batches`` (a group when several)."""
        for batch in batches:
            self.attempts[batch.id] += 1
            if self.avoid:
                self.avoid.pop(batch.id, None)
        started = None if slot.calls else now
        if len(batches) == 1:
            batch = batches[0]
            ref = self.transport.call(slot.actor, "run_batch", batch.to_json(), self.attempts[batch.id])
            call = Call(ref=ref, batch=batch, attempt=self.attempts[batch.id], started=started)
        else:
            members = [Call(ref=None, batch=b, attempt=self.attempts[b.id], started=started) for b in batches]
            ref = self.transport.call(slot.actor, "run_batches", [[m.batch.to_json(), m.attempt] for m in members])
            call = Call(ref=ref, batch=batches[0], attempt=0, started=started, members=members)
        slot.calls.append(call)
        self.calls[ref] = (slot, call)
        if call.started is not None:
            self._deadline(slot, call)
        self._read_ahead(slot)
        return True

    def _another_worker(self, slot: Slot, idle: bool = False) -> bool:
        """Another worker is up (with ``idle``: up with nothing to run), or starting, to take what
        failed on ``slot``. A start on an instance whose node is gone does not count: Ray holds it
        until it re-places the instance, maybe never (one look at the placement, only then)."""
        starting = []
        for other in self.slots:
            if other is slot or other.retired:
                continue
            if other.ready and not (idle and other.calls):
                return True
            if other.start_ref is not None:
                starting.append(other.instance)
        return bool(starting) and not self.transport.placed_instances().isdisjoint(starting)

    def _group_size(self, slot: Slot) -> int:
        """How many queued batches the next call to ``slot`` takes: one, unless its batches take
        milliseconds and the queue is far from its tail (every ready worker keeps getting work)."""
        if not slot.fast or self.spec.raypar.speculation.enabled:
            return 1
        # The tail stays one to a call. (Every slot counts, ready or not: a sum over them per call
        # would cost a thousand workers' job more than the grouping saves.)
        share = len(self.queue) // (2 * FAST_PREFETCH * len(self.slots))
        return max(1, min(GROUP_MAX, int(GROUP_SECONDS / max(slot.mean_seconds, 1e-4)), share))

    def _read_ahead(self, slot: Slot) -> None:
        """Tell the worker to read the batches queued behind its running one now (raypar.prefetch),
        so that run() does not wait for their input. A hint: the worker reads a batch itself when
        the hint came too late or its read failed, and the error is then the batch's own."""
        for position, call in enumerate(slot.calls):
            if position > slot.ahead:
                break
            if position and not call.read_ahead and call.members is None:  # a group: its batches take ms
                call.read_ahead = True
                self.transport.call_aside(slot.actor, "prefetch", call.batch.to_json())

    def _deadline(self, slot: Slot, call: Call) -> None:
        """``call`` started running: its timeout deadline joins the heap."""
        self.seq += 1
        heapq.heappush(self.deadlines, (call.started + self.spec.retry_settings.timeout, self.seq, call, slot))

    def _next_deadline(self) -> Optional[tuple]:
        """The earliest deadline of a call still running (stale entries are dropped)."""
        while self.deadlines:
            entry = self.deadlines[0]
            _, _, call, slot = entry
            if slot.calls and slot.calls[0] is call:
                return entry
            heapq.heappop(self.deadlines)
        return None

    def _withdraw(self, now: float) -> None:
        """Workers idle with nothing to take while calls wait behind batches that have run
        WITHDRAW_AFTER or more: ask those workers to take back their last queued calls, one for
        each idle worker. Only the calls a worker confirms it withdrew before they began go back
        to the queue (_on_withdrawn); the others run where they are."""
        self.next_withdraw = None
        if self.queue or self.reserved or self.stop_reason is not None:
            return
        wanted = sum(s.ready and not s.retired and not s.calls for s in self.slots) - \
            sum(len(calls) for _, calls in self.withdrawals.values())
        if wanted <= 0:
            return
        donors = []
        for slot in self.slots:
            head = slot.calls[0] if len(slot.calls) > 1 else None
            if head is None or head.started is None or not (waiting := [c for c in list(slot.calls)[1:]
                                                                      if not c.withdrawing]):
                continue
            if head.started + WITHDRAW_AFTER > now:  # look again then
                self.next_withdraw = min(self.next_withdraw or float("inf"), head.started + WITHDRAW_AFTER)
                continue
            donors.append((head.started, slot.index, slot, waiting))
        for _, _, slot, waiting in sorted(donors, key=lambda d: d[:2]):  # behind the longest-running first
            taken = waiting[-wanted:]  # the last queued: those before them would begin sooner
            ref = self.transport.call_aside(slot.actor, "withdraw", [c.name for c in taken])
            if ref is None:
                return  # a transport without calls aside: nothing can be taken back
            for call in taken:
                call.withdrawing = True
            self.withdrawals[ref] = (slot, taken)
            wanted -= len(taken)
            if wanted <= 0:
                return

    def _on_withdrawn(self, slot: Slot, calls: list[Call], ref, now: float) -> None:
        """The worker answered which of ``calls`` it withdrew: their batches go back to the queue."""
        try:
            withdrawn = set(self.transport.get(ref)["withdrawn"])
        except (WorkerLost, WorkerRaised, SetupFailed):  # the worker is gone: its calls end with it
            withdrawn = set()
        for call in calls:
            call.withdrawing = False
            if call.name in withdrawn:
                self._take_back(slot, call, now)

    def _take_back(self, slot: Slot, call: Call, now: float) -> None:
        """``call`` was withdrawn before it began: no try spent, its batches go to the front of the
        queue. (Its own answer, ``{"withdrawn": True}``, may come first or never: either is this.)"""
        if call not in slot.calls:
            return  # handed back already: its worker was lost or replaced
        slot.calls.remove(call)
        self.calls.pop(call.ref, None)
        if slot.calls and slot.calls[0].started is None:  # it was the head: the next call runs now
            slot.calls[0].started = now
            self._deadline(slot, slot.calls[0])
        self.dirty.add(slot)
        self.queue.extendleft(reversed(_batches(call)))
        self.queue_was_empty = True  # every idle worker may take them
        log.info("%s: %d queued mini-batch(es) taken back for an idle worker (%s runs long)", slot.label,
                 len(_batches(call)), slot.calls[0].batch.id if slot.calls else "the batch before")

    # -- speculation --------------------------------------------------------

    def _speculate(self, now: float) -> None:
        """Nothing left to dispatch and a worker idles: give the slowest running batches (past
        ``multiple`` times the median, and ``min_seconds``) a second attempt on the idle workers."""
        threshold = self._straggler_threshold()
        if threshold is None or self.withdrawals:  # batches taken back for idle workers come first
            return
        idle = [s for s in self.slots if s.ready and not s.retired and not s.calls]
        median = statistics.median(self.recent)
        running = [s.calls[0] for s in self.slots
                   if s.calls and s.calls[0].started is not None and s.calls[0].members is None]
        stragglers = sorted((c for c in running if now - c.started >= threshold and c.batch.id not in self.copies),
                            key=lambda c: c.started)
        for call, slot in zip(stragglers, idle, strict=False):  # as many copies as there are idle slots
            log.info("%s has run %.0fs (median %.1fs): a second attempt on %s", call.batch.id,
                     now - call.started, median, slot.label)
            self.queue.appendleft(call.batch)
            if self._submit(slot, now):
                self.copies[call.batch.id] = [call, slot.calls[-1]]
            else:  # it failed on this slot before: no second attempt here
                self.queue.popleft()

    def _straggler_threshold(self) -> Optional[float]:
        """Seconds after which a running batch gets a second attempt now, or None when none may
        (speculation off, work left to dispatch, no idle worker, fewer than 3 batches timed)."""
        settings = self.spec.raypar.speculation
        if not settings.enabled or self.queue or self.stop_reason is not None or len(self.recent) < 3 \
                or (self.feed is not None and not self.feed.exhausted) \
                or not any(s.ready and not s.retired and not s.calls for s in self.slots):
            return None
        return max(settings.multiple * statistics.median(self.recent), settings.min_seconds)

    def _settle(self, call: Call, answer: dict) -> bool:
        """One attempt of a batch that runs twice answered: True when its answer counts (it won,
        or it failed with no other attempt left); the others are stopped or left to decide."""
        copies = self.copies[call.batch.id]
        copies.remove(call)
        if answer["ok"]:
            del self.copies[call.batch.id]
            self.settled.add(call.batch.id)
            for other in copies:  # the slower attempt: its worker is stopped (a running call cannot be)
                owner = self.calls.get(other.ref)
                if owner is not None:  # restarted only once there is work for it (at the tail, none)
                    self._replace(owner[0], f"a second attempt of {call.batch.id} finished first", lost=False,
                                  restart=bool(self.queue))
            return True
        if copies:
            log.warning("an attempt of %s failed while another still runs: that one decides", call.batch.id)
            return False
        del self.copies[call.batch.id]
        return True

    def _drop_copy(self, call: Call) -> bool:
        """``call`` ended without an answer (its worker was lost or timed out): True when another
        attempt of its batch still runs or already finished, so it needs no retry."""
        if call.batch.id in self.settled:
            return True
        copies = self.copies.get(call.batch.id)
        if copies is None:
            return False
        if call in copies:
            copies.remove(call)
        if copies:
            return True
        del self.copies[call.batch.id]
        return False

    # -- stored records -----------------------------------------------------

    def _flush_idle(self) -> None:
        """Ask each idle worker holding unstored done records to store them: nothing else would
        make it (it flushes by itself only as it runs batches), and the job ends only once all are."""
        if self.stop_reason is not None:
            return
        for slot in self.dirty:  # a slot becomes idle, or gets unstored batches, only by an answer
            if slot.unflushed and not slot.calls and slot.flush_ref is None and slot.ready:
                slot.flush_ref = self.transport.call(slot.actor, "flush")
                self.flushes[slot.flush_ref] = slot
        self.dirty.clear()

    def _on_flushed(self, slot: Slot, ref, now: float) -> None:
        slot.flush_ref = None
        self.dirty.add(slot)
        try:
            answer = self.transport.get(ref)
        except WorkerRaised as exc:  # the flush raised: the job dir could not be written
            self._on_job_dir_failure(slot, None, f"raypar could not store finished mini-batches in the job dir: "
                                                 f"{exc}", "storage")
            return
        except WorkerLost as exc:
            self._on_worker_lost(slot, exc, now)
            return
        self._confirm(slot, answer)

    def _store_before_stop(self) -> None:
        """The job stops early (a threshold, `raypar cancel`, a planning error): keep what workers
        finished but hold unstored. Their queued calls are canceled (Ray drops an actor call that
        has not started); each finishes the batch it runs, at most STORE_ON_STOP_TIMEOUT, then
        stores its records. What is still unstored after that runs again on resume. A worker that
        holds nothing unstored (every worker on local disk, which stores each batch as it ends) is
        not waited for: the stop is not held up by a batch that runs again on resume anyway."""
        slots = [s for s in self.slots if s.ready and s.unflushed]
        for slot in slots:
            for call in list(slot.calls)[1:]:
                self.transport.cancel(call.ref)
                slot.calls.remove(call)
                self.calls.pop(call.ref, None)
            if slot.flush_ref is None:
                slot.flush_ref = self.transport.call(slot.actor, "flush")
                self.flushes[slot.flush_ref] = slot
        deadline = self.clock() + STORE_ON_STOP_TIMEOUT
        while self.flushes and self.clock() < deadline:
            waiting = list(self.flushes) + [c.ref for s in slots for c in s.calls]
            ready = self.transport.wait(waiting, deadline - self.clock())
            now = self.clock()
            for ref in ready:
                if ref in self.calls:
                    slot, call = self.calls.pop(ref)
                    try:
                        self._handle(slot, call, self.transport.get(ref), now)
                    except (WorkerLost, WorkerRaised):
                        slot.calls.remove(call)
                elif ref in self.flushes:
                    slot = self.flushes.pop(ref)
                    slot.flush_ref = None
                    try:
                        self._confirm(slot, self.transport.get(ref))
                    except (WorkerLost, WorkerRaised) as exc:
                        log.warning("%s could not store its finished batches: %s", slot.label, exc)
        unstored = sum(len(s.unflushed) for s in self.slots)
        if unstored:
            log.warning("%d finished mini-batch(es) were not stored before the stop; a resume runs them again",
                        unstored)

    def _store_finished_now(self) -> None:
        """Interrupted: every worker stores the finished batches it holds unstored (an object-store
        job dir's, up to raypar.ledger.flush_seconds of them) beside the batch it runs, which is not
        waited for; at most STORE_ON_INTERRUPT_TIMEOUT. Otherwise the kill loses them and a resume
        runs them again. A second Ctrl-C ends the wait."""
        asked = {}
        for slot in self.slots:
            if slot.ready and slot.actor is not None:
                ref = self.transport.call_aside(slot.actor, "store_finished")
                if ref is not None:
                    asked[ref] = slot
        deadline = self.clock() + STORE_ON_INTERRUPT_TIMEOUT
        while asked and self.clock() < deadline:
            for ref in self.transport.wait(asked, deadline - self.clock()):
                slot = asked.pop(ref)
                try:
                    self.transport.get(ref)
                except (WorkerLost, WorkerRaised) as exc:
                    log.warning("%s could not store its finished batches: %s", slot.label, exc)
        if asked:
            log.warning("%d worker(s) had not stored their finished batches %.1f s after the interrupt; a resume "
                        "runs those again", len(asked), STORE_ON_INTERRUPT_TIMEOUT)

    def _confirm(self, slot: Slot, answer: dict) -> None:
        """Forget the done batches the worker reports stored (answers may be handled out of order)."""
        if "durable" not in answer or answer["durable"] < slot.durable:
            return
        if answer["durable"] > slot.durable:
            self.job_dir_failures = 0  # the job dir takes writes again
        if self.segmented:  # (a worker's position there is the number of its next segment)
            self.progress.segments += max(0, answer["position"] - slot.position)
        slot.durable, slot.position = answer["durable"], answer["position"]
        confirmed = slot.unflushed.confirm(slot.durable)
        for call, _ in confirmed:  # stored for good: never sent again this session (a million entries else)
            self.attempts.pop(call.batch.id, None)
        if self.output is not None:
            self.output.stored([(call.batch.id, part) for call, part in confirmed])

    def _hand_back_unflushed(self, slot: Slot, recorded: set[str]) -> None:
        """The worker is gone: done batches it never stored run again (no try spent)."""
        lost = [(call, items) for call, items in slot.unflushed.take_all() if call.batch.id not in recorded]
        for call, items in reversed(lost):
            self.progress.done -= 1
            self.progress.failed_items -= items
            self.progress.unreturned_items -= items
            self.settled.discard(call.batch.id)  # its winning record was never stored: it runs again
            self.queue.appendleft(call.batch)
        if lost:
            log.warning("%s: %d done mini-batch(es) were not stored yet; they run again", slot.label, len(lost))

    def _recorded(self, slot: Slot) -> set[str]:
        """Batches the slot's (lost) worker stored since it last reported: its own records only."""
        if slot.writer is None:
            return set()
        try:
            return self.ledger.recent_done(slot.writer, slot.position)
        except Exception as exc:  # noqa: BLE001 - storage unreachable: run them again rather than trust nothing
            log.warning("%s: could not read what the lost worker stored: %s", slot.label, exc)
            return set()

    # -- answers ----------------------------------------------------------

    def _on_answer(self, slot: Slot, call: Call, ref, now: float) -> None:
        try:
            answer = self.transport.get(ref)
        except WorkerRaised as exc:  # raypar's own code raised in the worker (run() errors are answers)
            self._on_job_dir_failure(slot, call, f"raypar error in the worker: {exc}", "raypar")
            return
        except WorkerLost as exc:
            self._on_worker_lost(slot, exc, now)
            return
        self._handle(slot, call, answer, now)

    def _handle(self, slot: Slot, call: Call, answer: dict, now: float) -> None:
        if answer.get("withdrawn"):  # its turn came after the worker withdrew it
            self._take_back(slot, call, now)
            return
        self.calls.pop(call.ref, None)
        self._pop_call(slot, call, now)
        if call.members is None:
            self.worker_time.spent(slot, answer.get("spent"))
            self._account(slot, call, answer, now)
            return
        parts = answer["parts"]  # in order; the worker stops a group at raypar's own failure
        if parts:
            self.worker_time.spent(slot, parts[-1].get("spent"))
        for member, part in zip(call.members, parts, strict=False):
            self._account(slot, member, part, now)
        rest = call.members[len(parts):]  # not run: the group stopped at raypar's own failure
        failed = rest.pop(0) if answer.get("raised") else None
        for member in reversed(rest):  # never started: no try spent
            self.queue.appendleft(member.batch)
        if failed is not None:
            self._on_job_dir_failure(slot, failed, f"raypar error in the worker: {answer['raised']}", "raypar")

    def _account(self, slot: Slot, call: Call, answer: dict, now: float) -> None:
        """What one batch's answer means: done, a failed try, or raypar's own failure."""
        if call.batch.id in self.settled:  # the other attempt won: this one's record is a spare
            self._confirm(slot, answer)
            return
        if call.batch.id in self.copies and not self._settle(call, answer):
            self._confirm(slot, answer)
            return
        if answer["ok"]:
            self.progress.done += 1
            self.transport.batch_done(answer.get("seconds", 0.0))
            unreturned = max(answer["items"] - answer["returned"], answer.get("reported", 0), 0)
            self.progress.failed_items += unreturned
            self.progress.unreturned_items += unreturned
            if "index" in answer:
                slot.unflushed.add(call, answer["index"], unreturned, answer.get("part"))
            self._confirm(slot, answer)
            self._check_thresholds()
        elif answer.get("storage"):  # run() succeeded; storing its result did not
            self._on_job_dir_failure(slot, call, answer["error"], "storage")
        else:
            self._confirm(slot, answer)
            self._on_user_failure(call, answer["error"], "user", slot, started=answer.get("started"),
                                  items=answer.get("items"))

    def _pop_call(self, slot: Slot, call: Call, now: float) -> None:
        if call.started is not None:
            each = (now - call.started) / len(_batches(call))  # per batch, whether grouped or not
            slot.observe(each)
            self.recent.extend([each] * len(_batches(call)))
        slot.calls.remove(call)
        self.dirty.add(slot)
        if slot.calls and slot.calls[0].started is None:
            slot.calls[0].started = now
            self._deadline(slot, slot.calls[0])
        self._read_ahead(slot)

    def _on_user_failure(self, call: Call, error: str, kind: str, slot: Slot,
                         started: Optional[float] = None, items: Optional[int] = None) -> None:
        batch = call.batch
        if items is not None:  # the most any try read: a try that failed while reading reports nothing
            self.rows_seen[batch.id] = max(items, self.rows_seen.get(batch.id, 0))
        self.tries[batch.id] += 1
        final = self.tries[batch.id] >= self.max_tries
        self.ledger.record_failed(FailedRecord(
            batch=batch.id, run=self.run_id, attempt=call.attempt, error=error, kind=kind,
            final=final, node=slot.node, worker=slot.worker_name, started=started or self._wall(call.started), items=items,
        ))
        last_line = error.strip().splitlines()[-1] if error.strip() else error
        log.warning("%s failed on %s (try %d of %d): %s", batch.id, slot.label,
                    self.tries[batch.id], self.max_tries, last_line)
        if final:
            if self.output is not None:
                self.output.failed(batch.id)
            self.progress.failed += 1
            self.progress.batch_failed(batch.id, kind, error)
            self.transport.batch_failed()
            # Table batches cut by bytes learn their row count when read: the worker reports it.
            self.progress.failed_items += self.rows_seen.get(batch.id, batch.item_count)
            self._check_thresholds()
        else:
            self.queue.appendleft(batch)  # retry soon, so thresholds are known early
            self.avoid[batch.id] = slot
            self._start_spare(slot)

    def _on_worker_lost(self, slot: Slot, exc: WorkerLost, now: float) -> None:
        """The worker process died: a system failure, not one of the user's tries."""
        # Answers it gave before dying come first: the call it died in is the first unanswered one.
        refs = [c.ref for c in slot.calls]
        answered = self.transport.ended(refs)
        for call in [c for c in list(slot.calls) if c.ref in answered]:
            try:
                answer = self.transport.get(call.ref)
            except (WorkerLost, WorkerRaised):
                break  # the first lost call: the worker died in it
            self._handle(slot, call, answer, now)
        recorded = self._recorded(slot) if slot.unflushed or slot.calls else set()
        running = self._replace(slot, f"worker process lost ({exc.kind})", recorded=recorded)
        if running is not None:
            self._requeue_after_system_failure(running, f"worker lost: {exc}", slot, recorded)
        self._start_spare(slot)

    def _requeue_after_system_failure(self, call: Call, error: str, slot: Slot, recorded: set[str],
                                      kind: str = "system") -> None:
        if call.members is not None:
            self._requeue_group(call, recorded)
            return
        batch = call.batch
        if self._drop_copy(call):
            return  # another attempt of it runs (or won): no retry
        if batch.id in recorded:
            # The worker recorded the batch before it died: it is done, never rerun.
            self.progress.done += 1
            self.transport.batch_done(None)
            return
        self.system_failures[batch.id] += 1
        if self.system_failures[batch.id] > MAX_SYSTEM_FAILURES_PER_BATCH:
            what = "workers lost" if kind == "system" else "failures of raypar's own work"
            self._on_user_failure(call, f"{error} ({MAX_SYSTEM_FAILURES_PER_BATCH} {what} on this batch)",
                                  kind, slot)
            return
        # Kept for the history (status, reports); not final, so not a failed batch.
        self.ledger.record_failed(FailedRecord(
            batch=batch.id, run=self.run_id, attempt=call.attempt, error=error, kind=kind,
            final=False, node=slot.node, worker=slot.worker_name, started=self._wall(call.started),
        ))
        self.queue.appendleft(batch)

    def _on_job_dir_failure(self, slot: Slot, call: Optional[Call], error: str, kind: str) -> None:
        """raypar's own work in a worker failed (storing in the job dir: ``storage``; a raypar bug:
        ``raypar``): neither one of the user's tries nor a lost worker. The worker is replaced (its
        writer's state is unknown; what it held unstored runs again) and ``call``'s batch runs again.
        When the job dir fails every worker in turn with nothing stored in between, the job stops
        with that error rather than retiring every slot for it."""
        self.job_dir_failures += 1
        if call is not None and call in slot.calls:
            slot.calls.remove(call)
            self.calls.pop(call.ref, None)
        running = self._replace(slot, error.splitlines()[0], lost=False)
        if running is not None:  # killed by us mid-batch: no try spent
            self.queue.extendleft(reversed(_batches(running)))
        if call is not None:
            self._requeue_after_system_failure(call, error, slot, set(), kind=kind)
        if self.job_dir_failures >= max(JOB_DIR_FAILURES_TO_STOP, len(self.slots) - len(self.unstarted)):
            self._stop(error.splitlines()[0])

    def _replace(self, slot: Slot, why: str, lost: bool = True, recorded: Optional[set] = None,
                 restart: bool = True) -> Optional[Call]:
        """Kill the slot's actor, hand its queued calls and its unstored done batches back (less
        those in ``recorded``, stored after all), start a fresh actor.

        Returns the call that was running on the actor (the caller decides
        what that attempt counts as).
        """
        if slot.unflushed and recorded is None:
            recorded = self._recorded(slot)
        self._hand_back_unflushed(slot, recorded or set())
        reserved = self._release_reserved(slot)  # behind the calls handed back below
        calls = list(slot.calls)
        if calls:  # the one it runs never answers: its time so far is cut short
            self.worker_time.cut_short(slot, calls[0].started, self.clock())
        slot.calls.clear()
        for call in calls:
            self.calls.pop(call.ref, None)
        for call in reversed(calls[1:]):  # never started, as far as answers tell: no try spent
            if any(b.id in (recorded or ()) for b in _batches(call)):
                # It ran after all: Ray failed it with the worker, its answer lost. What the
                # worker stored is done; the rest runs again, one to a call if it was a group.
                self._requeue_after_system_failure(call, "", slot, recorded)
            else:
                self.queue.extendleft(reversed(_batches(call)))
        self._kill(slot)
        slot.deaths += lost  # a worker we killed for a timeout was not lost to the system
        log.warning("%s: %s; %d queued batch(es) handed back", slot.label, why,
                    reserved + sum(len(_batches(c)) for c in calls[1:]))
        if slot.deaths > MAX_DEATHS_PER_SLOT:
            slot.retired = True
            log.warning("%s given up after %d lost workers", slot.label, slot.deaths)
        elif self.stop_reason is None and not restart:
            self.unstarted.add(slot)
        elif self.stop_reason is None:
            if lost and slot.instance not in self.transport.placed_instances():
                if self.transport.elastic:  # the instance ends with its node; the others go on
                    self._mark_left(slot)
                    return calls[0] if calls else None
                log.warning("instance %d lost its node; the job goes on with the other instances "
                            "until Ray places it on another node", slot.instance)
            self._start(slot)
        return calls[0] if calls else None

    def _enforce_timeouts(self, now: float) -> None:
        timeout = self.spec.retry_settings.timeout
        while (entry := self._next_deadline()) is not None and entry[0] <= now:
            heapq.heappop(self.deadlines)
            head, slot = entry[2], entry[3]
            if self.transport.ended([head.ref]):
                continue  # it answered just now: handled next step, not a timeout
            if head.members is not None:  # which of its batches hangs is not known: each runs alone now
                recorded = self._recorded(slot)
                self._replace(slot, f"a group of {len(head.members)} mini-batches ran past "
                                    f"retry_settings.timeout={timeout}s; worker killed", lost=False, recorded=recorded)
                self._requeue_group(head, recorded)
                continue
            running = self._replace(slot, f"{head.batch.id} ran past retry_settings.timeout={timeout}s; "
                                          f"worker killed", lost=False)
            if self._drop_copy(running):
                continue  # its other attempt goes on
            self._on_user_failure(running, f"TimeoutError: run() did not return within {timeout}s; the worker "
                                  f"process was killed and replaced", "timeout", slot)

    def _requeue_group(self, group: Call, recorded: set[str]) -> None:
        """A group ended without an answer (its worker lost or killed): the batches its worker
        stored are done; the others run again one to a call, no try spent."""
        for member in reversed(group.members):
            if member.batch.id in recorded:
                self.progress.done += 1
                self.transport.batch_done(None)
            else:
                self.solo.add(member.batch.id)
                self.queue.appendleft(member.batch)

    def _check_thresholds(self) -> None:
        spec, p = self.spec, self.progress
        before_success = spec.raypar.failures_before_first_success
        if p.done == 0 and before_success >= 0 and p.failed > before_success:  # done counts earlier sessions'
            self._stop(f"{p.failed} mini-batch(es) failed and none has succeeded: the entry script or the cluster "
                       f"fails every mini-batch, so the job stops before it spends every try of every one "
                       f"(raypar.failures_before_first_success={before_success}; -1 turns this off)")
        elif spec.mini_batch_error_threshold >= 0 and p.failed > spec.mini_batch_error_threshold:
            self._stop(f"{p.failed} mini-batch(es) failed, more than mini_batch_error_threshold="
                       f"{spec.mini_batch_error_threshold}")
        elif spec.error_threshold >= 0 and p.failed_items > spec.error_threshold:
            self._stop(f"{p.failed_items} item(s) failed, more than error_threshold={spec.error_threshold}")
        elif p.total and self.plan_complete \
                and 100.0 * p.failed / p.total > self.failed_percent_limit:  # Azure: once all are planned
            self._stop(f"{p.failed} of {p.total} mini-batches failed ({100.0 * p.failed / p.total:.1f}%), "
                       f"more than allowed_failed_percent={self.failed_percent_limit:g}")

    def _wall(self, instant: Optional[float]) -> Optional[float]:
        """The wall-clock time of an instant of the scheduler's clock (for records people read);
        the scheduler times everything on its monotonic clock, so a clock step never times a
        batch out."""
        return None if instant is None else round(time.time() - (self.clock() - instant), 3)

    def _stop(self, reason: str, detail: str = "") -> None:
        if self.stop_reason is None:
            self.stop_reason, self.stop_detail = reason, detail
            log.warning("stopping: %s", reason)

    # -- retiring ---------------------------------------------------------

    def _retire_all(self, graceful: bool) -> None:
        """Let each worker run shutdown() (bounded), then end the processes."""
        if not graceful:
            return
        # Starting workers whose instance has a node are included: actor calls run
        # in order, so stop() follows their init(). One waiting for a lost node is not.
        placed = self.transport.placed_instances()
        self._stop_workers([s for s in self.slots
                            if s.actor is not None and (s.ready or (s.start_ref is not None and s.instance in placed))])

    def _stop_workers(self, slots: list[Slot]) -> None:
        """Let each of ``slots``' workers run shutdown(), STOP_TIMEOUT seconds at most in all."""
        refs = {self.transport.call(s.actor, "stop"): s for s in slots}
        done = self.transport.ended(refs)
        deadline = self.clock() + STOP_TIMEOUT
        while len(done) < len(refs) and self.clock() < deadline:
            self.transport.wait([r for r in refs if r not in done], deadline - self.clock())
            done = self.transport.ended(refs)
        for ref in done:
            try:
                error = self.transport.get(ref)
            except (WorkerLost, WorkerRaised):
                continue
            if error:
                log.warning("shutdown() raised on %s:\n%s", refs[ref].label, error)

    def _kill(self, slot: Slot) -> None:
        if slot.actor is not None:
            if slot.start_ref is not None:
                self.starts.pop(slot.start_ref, None)
                slot.start_ref = None
            if slot.flush_ref is not None:
                self.flushes.pop(slot.flush_ref, None)
                slot.flush_ref = None
            for ref in [r for r, (s, _) in self.withdrawals.items() if s is slot]:  # they end with it
                del self.withdrawals[ref]
            self.transport.kill(slot.actor)
            if slot.calls:  # stopped while it ran a batch
                self.worker_time.cut_short(slot, slot.calls[0].started, self.clock())
            self.worker_time.ended(slot, self.clock())
            slot.actor, slot.ready = None, False
            if slot.writer is not None:  # its segments: stored and read (_recorded) or handed back to run again
                self.progress.gone.add(slot.writer)

    def _kill_all(self) -> None:
        for slot in self.slots:
            self._kill(slot)
        self.calls.clear()
        self.starts.clear()
        self.flushes.clear()
        self.withdrawals.clear()


def _spread(slot: Slot) -> tuple:
    """The order slots start in when not all do: each instance's first slot, then each one's second..."""
    return slot.index, slot.instance


def _idles(slot: Slot) -> bool:
    """The slot's worker has nothing to run, store or start (or it has no worker)."""
    return not slot.calls and not slot.unflushed and slot.flush_ref is None and slot.start_ref is None


def _batches(call: Call) -> list[QueuedBatch]:
    """The mini-batches a call carries: its group's, or its own."""
    return [m.batch for m in call.members] if call.members is not None else [call.batch]
