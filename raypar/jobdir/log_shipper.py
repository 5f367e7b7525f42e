"""A worker's log in a job dir on object storage: written locally, stored piece by piece.

An object cannot be appended to, so the worker tees its stdout and stderr into a local spool
file (as it tees them into ``logs/<writer>.log`` of a local job dir) and stores what is new
as ``logs/<writer>~NNNNNN.log`` every SHIP_SECONDS (a thread), whenever the driver asks it to
store its finished batches (an idle worker, a stopping job), when it stops, and when init()
fails. `raypar logs` joins the pieces in order (raypar.jobdir.ledger.Ledger.worker_logs). A worker killed outright
loses at most the last SHIP_SECONDS of its log (Ray's own worker log still has it).
"""

from __future__ import annotations

import os
import tempfile
import threading
from typing import Optional

from raypar.jobdir.layout import log_piece_name

# Not flush_seconds: the log grows with every batch (raypar's markers), and a piece a second per
# worker would be 3,600 objects per worker-hour; one per 30 s is 120, for a log people read.
SHIP_SECONDS = 30.0


class LogShipper:
    def __init__(self, store, writer: str, seconds: float = SHIP_SECONDS):
        self.store, self.writer, self.seconds = store, writer, seconds
        folder = os.path.join(tempfile.gettempdir(), "raypar-logs")
        os.makedirs(folder, exist_ok=True)
        self.spool = os.path.join(folder, f"{writer}.log")
        self.shipped = 0
        self.seq = 0
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread: Optional[threading.Thread] = None
        if 0 < seconds < float("inf"):
            self.thread = threading.Thread(target=self._loop, name="raypar-log-shipper", daemon=True)
            self.thread.start()

    def _loop(self) -> None:
        while not self.stopped.wait(self.seconds):
            try:
                self.ship()
            except Exception:  # noqa: BLE001 - a log is for people: the next try ships it
                pass

    def ship(self) -> None:
        """Store what the spool gained since the last piece (nothing when it gained nothing)."""
        with self.lock:
            try:
                with open(self.spool, "rb") as f:
                    f.seek(self.shipped)
                    data = f.read()
            except FileNotFoundError:
                return
            if not data:
                return
            self.store.write_once(data, "logs", log_piece_name(self.writer, self.seq))
            self.seq += 1
            self.shipped += len(data)

    def close(self) -> None:
        """Ship the rest and remove the spool."""
        self.stopped.set()
        try:
            self.ship()
        finally:
            try:
                os.unlink(self.spool)
            except FileNotFoundError:
                pass
