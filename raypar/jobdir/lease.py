"""Which driver owns a job dir: a fenced lease of numbered generations.

The lease is a sequence of write-once files, ``lease/<generation>.json``. Taking the lease
and every heartbeat create the *next* generation with the store's exclusive create, which is
the compare-and-swap: of two drivers writing generation n+1, exactly one succeeds, on local
disk (an exclusive hard link) and on object stores (a conditional PUT) alike, and the loser
knows at once. A holder removes the generation before the one it just wrote, so ``lease/``
holds one or two files.

- The **epoch** (the generation a driver took the lease at) is its fencing token: the driver
  stamps it on what it writes as the lease holder (``state.json``), and a reader trusts a
  state only from the current epoch.
- **No clock is compared between hosts.** Another host's lease is stale only once its
  generation has not moved for a whole TTL of the waiter's own monotonic clock
  (:func:`raypar.engine.session_lease.claim_lease`); on the same host, once its process is gone.
- **The holder fences itself**: it assumes the lease lost once it could not renew it for
  FENCE_FRACTION of the TTL (its own monotonic clock), before a waiter may take over.

Job dirs leased by raypar before generations hold ``lease.json``; it is honoured while live
and removed when a driver takes the lease.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Optional

import psutil

from raypar.errors import LeaseHeldError
from raypar.jobdir.store import Store

LEASE_TTL = 30.0
FENCE_FRACTION = 2 / 3  # a holder that could not renew for this part of the TTL stops writing
FOLDER = "lease"
LEGACY = "lease.json"


def _name(generation: int) -> str:
    return f"{generation:012d}.json"


class Lease:
    """The lease of one job dir, as seen (and, once acquired, held) by one driver session."""

    def __init__(self, store: Store, url: str):
        self.store, self.url = store, url
        self.generation = 0  # the newest generation this session wrote
        self.epoch = 0  # the generation it took the lease at: its fencing token
        self.taken_over: Optional[dict] = None  # the dead holder's last lease, when acquire took it over

    # -- reading ------------------------------------------------------------

    def read(self) -> Optional[dict]:
        """The current lease (its body, with ``generation``), or None when the job dir is free."""
        return self._look()[1]

    def _look(self) -> tuple[int, Optional[dict]]:
        """(the newest generation, the lease it holds or None): one listing, so a caller that
        writes the next generation writes the one after what it judged, never a later one."""
        newest = self._newest()
        if newest == 0:
            return 0, self._legacy()
        try:
            body = json.loads(self.store.read_bytes(FOLDER, _name(newest)))
        except FileNotFoundError:  # its holder moved on between the listing and the read
            return self._look()
        except ValueError:
            body = {"corrupt": True}
        body["generation"] = newest
        return newest, (None if body.get("released") else body)

    def current_epoch(self) -> int:
        """The epoch of the newest generation, released or not (0 when none): a state stamped
        with an older epoch was written by a session that no longer held the lease."""
        newest = self._newest()
        if newest == 0:
            return 0
        try:
            return int(json.loads(self.store.read_bytes(FOLDER, _name(newest))).get("epoch", 0))
        except (FileNotFoundError, ValueError, TypeError):
            return 0

    def _newest(self) -> int:
        names = (os.path.basename(p) for p in self.store.list_files(FOLDER))
        return max((int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit()), default=0)

    def _legacy(self) -> Optional[dict]:
        try:
            body = json.loads(self.store.read_bytes(LEGACY))
        except FileNotFoundError:
            return None
        except ValueError:
            return None  # torn: its writer died mid-write
        return {**body, "generation": 0, "legacy": True}

    def is_live(self, lease: Optional[dict], now: Optional[float] = None) -> bool:
        """Whether ``lease`` looks held: on this host, its process lives; from another host, its
        heartbeat (that host's wall clock) is within the TTL. For display (`raypar status`); the
        decision to take a lease over never compares clocks (see :meth:`acquire`)."""
        if not lease or lease.get("corrupt"):
            return False
        if lease.get("host") == socket.gethostname():
            return _process_alive(lease.get("pid"), lease.get("pid_started"))
        now = time.time() if now is None else now
        return now - lease.get("heartbeat", 0) <= lease.get("ttl", LEASE_TTL)

    # -- holding ------------------------------------------------------------

    def acquire(self, run: str, ttl: float = LEASE_TTL, silent: bool = False) -> None:
        """Take the job dir for ``run``, or raise LeaseHeldError naming the owner.

        A lease of another run is taken over only when it is known dead: on this host its
        process is gone; from another host the caller watched it stay ``silent`` for a whole
        TTL. Of two drivers taking the same lease, the exclusive create lets one win.
        """
        generation, current = self._look()
        if current is not None and current.get("run") != run and not current.get("corrupt"):
            same_host = current.get("host") == socket.gethostname()
            alive = _process_alive(current.get("pid"), current.get("pid_started")) if same_host else not silent
            if alive:
                age = time.time() - current.get("heartbeat", 0)
                raise LeaseHeldError(
                    f"{self.url}: another raypar driver is running this job "
                    f"(pid {current.get('pid')} on {current.get('host')}, heartbeat {age:.0f}s ago); "
                    f"wait for it to finish, or stop that process")
        if not self.store.write_new(_body(run, ttl, generation + 1), FOLDER, _name(generation + 1)):
            raise LeaseHeldError(f"{self.url}: another raypar driver claimed this job at the same moment")
        self.generation = self.epoch = generation + 1
        self.taken_over = current if current is not None and current.get("run") != run else None
        self._forget(self.generation)
        if current is not None and current.get("legacy"):
            self.store.remove(LEGACY)

    def heartbeat(self, run: str, ttl: float = LEASE_TTL, progress: Optional[dict] = None) -> None:
        """Renew the lease (the next generation); raise LeaseHeldError if another driver wrote it.
        ``progress``: the counts `raypar status` shows while this driver runs, carried along."""
        following = self.generation + 1
        if not self.store.write_new(_body(run, ttl, self.epoch, progress), FOLDER, _name(following)):
            now = self.read()
            # Our own write, whose reply was lost (a timeout after the store took it): still ours.
            if not now or now.get("run") != run or now.get("generation", 0) < following:
                raise LeaseHeldError(f"{self.url}: the lease was taken over by run "
                                     f"{(now or {}).get('run', '(unknown)')}")
            following = now["generation"]
        self.generation = following
        self._forget(following)

    def release(self, run: str) -> None:
        """Give the job dir up (a released generation), if ``run`` holds it."""
        current = self.read()
        if current is None or current.get("run") != run:
            return
        body = json.dumps({"run": run, "released": True, "epoch": current.get("epoch", 0)}).encode()
        following = current["generation"] + 1
        if self.store.write_new(body, FOLDER, _name(following)):
            self._forget(following)
        if current.get("legacy"):
            self.store.remove(LEGACY)
        self.epoch = 0

    def _forget(self, newest: int) -> None:
        """Remove the generations before the one before ``newest`` (a reader that listed just
        before ``newest`` was written still finds that one). A leftover costs a listing entry,
        never correctness."""
        for path in self.store.list_files(FOLDER):
            name = os.path.basename(path)
            if name.endswith(".json") and name[:-5].isdigit() and int(name[:-5]) < newest - 1:
                try:
                    self.store.remove(FOLDER, name)
                except OSError:
                    pass


def _body(run: str, ttl: float, epoch: int, progress: Optional[dict] = None) -> bytes:
    body = {"run": run, "host": socket.gethostname(), "pid": os.getpid(),
            "pid_started": _process_start(os.getpid()), "heartbeat": time.time(), "ttl": ttl, "epoch": epoch}
    if progress is not None:
        body["progress"] = progress
    return json.dumps(body).encode()


def _process_start(pid: int) -> Optional[float]:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:  # the process is gone or hidden: no start time to compare
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
