"""Calls the driver takes back from a worker before they begin.

A call queued behind a batch that runs long would wait for it while another
worker idles. The driver asks the worker, on a thread beside its ordered calls,
to withdraw such calls; the worker answers at once which of them it withdrew,
and a withdrawn call, when its turn comes, answers ``{"withdrawn": True}``
without running. Withdrawing and beginning take one lock, so a call is either
withdrawn (it never runs: the driver queues its batches for another worker)
or begun (it runs and answers as usual): never both, never neither. That is
what lets the driver move a batch without running it twice, which Ray's own
cancel cannot promise: it confirms a queued actor call only when the call's
turn comes, and fails one that had begun with TaskCancelledError after it ran.

A call is named by its first mini-batch and that batch's attempt number: the
driver numbers each batch's attempts, so no two calls share a name.
"""

from __future__ import annotations

import collections
import threading

BEGUN_KEPT = 4096  # names of the last calls begun: a withdrawal asks about queued calls only


def call_name(batch_id: str, attempt: int) -> str:
    return f"{batch_id}~{attempt}"


def batch_of(name: str) -> str:
    """The batch a call name names (its first, for a group)."""
    return name.rsplit("~", 1)[0]


class Withdrawals:
    def __init__(self):
        self.lock = threading.Lock()
        self.withdrawn: set[str] = set()  # withdrawn, their turn not come yet
        self.begun: collections.OrderedDict[str, None] = collections.OrderedDict()

    def begin(self, name: str) -> bool:
        """The call ``name`` has its turn: True to run it, False when it was withdrawn."""
        with self.lock:
            if name in self.withdrawn:
                self.withdrawn.discard(name)
                return False
            self.begun[name] = None
            if len(self.begun) > BEGUN_KEPT:
                self.begun.popitem(last=False)
            return True

    def withdraw(self, names: list[str]) -> list[str]:
        """Withdraw the calls of ``names`` that have not begun; returns those withdrawn."""
        with self.lock:
            taken = [name for name in names if name not in self.begun]
            self.withdrawn.update(taken)
            return taken
