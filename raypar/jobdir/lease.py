"""Which driver owns a job dir: ``lease.json``, claimed by one driver and kept alive by its heartbeat."""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Optional

from ..errors import LeaseHeldError
from .store import Store

LEASE_TTL = 30.0
NAME = "lease.json"


class Lease:
    """The lease of one job dir (``url`` names it in errors)."""

    def __init__(self, store: Store, url: str):
        self.store, self.url = store, url

    def read(self) -> Optional[dict]:
        try:
            return json.loads(self.store.read_bytes(NAME))
        except FileNotFoundError:
            return None
        except ValueError:
            return None  # torn lease: its writer died mid-write

    def is_live(self, lease: Optional[dict], now: Optional[float] = None) -> bool:
        if not lease:
            return False
        now = time.time() if now is None else now
        if now - lease.get("heartbeat", 0) > lease.get("ttl", LEASE_TTL):
            return False
        if lease.get("host") == socket.gethostname():
            return _process_alive(lease.get("pid"), lease.get("pid_started"))
        return True

    def acquire(self, run: str, ttl: float = LEASE_TTL) -> None:
        """Claim the job dir for this driver, or raise LeaseHeldError naming the owner.

        A free job dir is claimed with an exclusive create; a stale lease is
        overwritten and read back. Should two drivers still both take a stale
        lease, the loser's next heartbeat finds the lease is not its own and
        stops that driver (see :meth:`heartbeat`).
        """
        if self.store.write_new(_body(run, ttl), NAME):
            return
        current = self.read()
        if current and current.get("run") != run and self.is_live(current):
            age = time.time() - current.get("heartbeat", 0)
            raise LeaseHeldError(
                f"{self.url}: another raypar driver is running this job "
                f"(pid {current.get('pid')} on {current.get('host')}, heartbeat {age:.0f}s ago); "
                f"wait for it to finish, or stop that process"
            )
        self.store.write_atomic(_body(run, ttl), NAME)
        confirmed = self.read()
        if not confirmed or confirmed.get("run") != run:
            raise LeaseHeldError(f"{self.url}: another raypar driver claimed this job at the same moment")

    def heartbeat(self, run: str, ttl: float = LEASE_TTL) -> None:
        """Refresh our lease; raise LeaseHeldError if another driver has taken it over."""
        current = self.read()
        if current is not None and current.get("run") != run:
            raise LeaseHeldError(f"{self.url}: the lease was taken over by run {current.get('run')}")
        self.store.write_atomic(_body(run, ttl), NAME)

    def release(self, run: str) -> None:
        current = self.read()
        if current and current.get("run") == run:
            self.store.remove(NAME)


def _body(run: str, ttl: float) -> bytes:
    return json.dumps({
        "run": run, "host": socket.gethostname(), "pid": os.getpid(),
        "pid_started": _process_start(os.getpid()), "heartbeat": time.time(), "ttl": ttl,
    }).encode()


def _process_start(pid: int) -> Optional[float]:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:  # psutil missing or process gone: no start time to compare
        return None


def _process_alive(pid: Optional[int], started: Optional[float]) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A recycled pid belongs to a process that started later.
    now_started = _process_start(pid)
    return started is None or now_started is None or abs(now_started - started) < 1.0
