"""A driver session's hold on its job dir: taking the lease (waiting out a silent one from
another host), keeping it with a heartbeat, fencing itself when it cannot, and the stop signal
the scheduler polls (the lease lost, or `raypar cancel`). The lease's format and its
compare-and-swap are in raypar/jobdir/lease.py."""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Callable, Optional

from raypar.credentials import describe_error
from raypar.errors import LeaseHeldError
from raypar.jobdir.lease import FENCE_FRACTION, LEASE_TTL
from raypar.jobdir.ledger import Ledger
from raypar.polling import poll

log = logging.getLogger("raypar")
Echo = Callable[[str], None]


class Heartbeat(threading.Thread):
    """Keeps the lease fresh while the driver lives; notices when it was taken over, and fences
    the driver when it could not renew for FENCE_FRACTION of the TTL (a waiter may take the job
    once a whole TTL passed without a new generation)."""

    def __init__(self, ledger: Ledger, run: str, ttl: float = LEASE_TTL):
        super().__init__(daemon=True, name="raypar-lease")
        self.ledger, self.run_id, self.ttl, self.stopped = ledger, run, ttl, threading.Event()
        self.renewed = time.monotonic()  # the lease was taken just before this thread
        self.lost: Optional[str] = None
        self.error: Optional[str] = None  # the last renewal's failure, if it failed
        # The counts each renewal carries for `raypar status` (set once the session schedules).
        self.progress: Optional[Callable[[], dict]] = None

    def run(self) -> None:
        while not self.stopped.wait(self.ttl / 3 if self.error is None else min(self.ttl / 10, 1.0)):
            if not self.held():
                return
            try:
                self.ledger.lease.heartbeat(self.run_id, self.ttl, self._progress())
                self.renewed, self.error = time.monotonic(), None
            except LeaseHeldError as exc:
                self.lost = exc.headline  # another driver owns the job now: stop ours
                return
            except Exception as exc:  # noqa: BLE001 - storage hiccup: try again soon, until the fence
                self.error = describe_error(exc)
                log.warning("lease heartbeat failed: %s", self.error)

    def _progress(self) -> Optional[dict]:
        try:
            return self.progress() if self.progress else None
        except Exception as exc:  # noqa: BLE001 - the lease matters; a status then reads the ledger
            log.debug("no progress for the heartbeat: %s", exc)
            return None

    def held(self) -> bool:
        """Whether this driver may still write as the lease holder (checked on its own clock, so
        a driver thawed after SIGSTOP knows before its heartbeat thread runs)."""
        if self.lost is None and time.monotonic() - self.renewed > self.ttl * FENCE_FRACTION:
            self.lost = (f"{self.ledger.url}: the lease could not be renewed for "
                         f"{time.monotonic() - self.renewed:.0f}s ({self.error or 'the driver was paused'}); "
                         f"stopped so that no two drivers run the job")
        return self.lost is None


def claim_lease(ledger: Ledger, run: str, echo: Echo, ttl: float = LEASE_TTL) -> None:
    """Take the job dir's lease, waiting out one whose holder has gone silent.

    A driver lost with its machine (a KubeRay retry on a fresh cluster, a killed VM)
    leaves a lease nobody releases. A driver on another host cannot be asked whether it
    lives, and its clock is not ours: we watch its lease for a whole TTL of our own
    monotonic clock. If it never moves, its holder has fenced itself (see Heartbeat)
    and the lease is ours; if it moves, that driver is alive and we refuse at once.
    """
    try:
        ledger.lease.acquire(run, ttl)
        return
    except LeaseHeldError:
        held = ledger.lease.read()
        if not held or held.get("host") == socket.gethostname():
            raise  # on this host the lease holder's pid already answered
    wait = held.get("ttl", LEASE_TTL)
    echo(f"raypar: {ledger.url} is leased by pid {held.get('pid')} on {held.get('host')}; "
         f"waiting {wait:.0f}s for a sign of life from that driver")
    def sign_of_life() -> Optional[str]:
        current = ledger.lease.read()
        if current is None:
            return "released"  # the holder finished
        if (current.get("run"), current.get("generation"), current.get("heartbeat")) != \
                (held.get("run"), held.get("generation"), held.get("heartbeat")):
            return "alive"
        return None

    if poll(sign_of_life, timeout=wait, interval=min(1.0, wait / 10)) == "alive":  # a read a second at most
        ledger.lease.acquire(run, ttl)  # raises LeaseHeldError naming the live driver
        return
    ledger.lease.acquire(run, ttl, silent=True)


class StopSignal:
    """Why the driver must stop now: its lease was taken over, or `raypar cancel` asked.

    The cancel marker is looked for on a thread of its own: on an object store each look is a
    request, which must not stall the scheduler loop that calls this every step."""

    def __init__(self, ledger: Ledger, run: str, beat: Heartbeat, every: float = 0.5):
        self.ledger, self.run_id, self.beat, self.every = ledger, run, beat, every
        self.requested = False  # the marker was seen (set by the watcher thread)
        self.canceled = False  # the scheduler was told: only then is the session canceled
        threading.Thread(target=self._watch, daemon=True, name="raypar-cancel-watch").start()

    def _watch(self) -> None:
        while not self.beat.stopped.wait(self.every):
            try:
                if self.ledger.cancel_requested(self.run_id):
                    self.requested = True
                    return
            except Exception as exc:  # noqa: BLE001 - a storage hiccup: look again; the lease fences real loss
                log.debug("looking for a cancel request failed: %s", describe_error(exc))

    def __call__(self) -> Optional[str]:
        if not self.beat.held():
            return self.beat.lost
        self.canceled = self.canceled or self.requested
        return "canceled by `raypar cancel`" if self.canceled else None

    def lease_held(self) -> bool:
        return self.beat.held()
