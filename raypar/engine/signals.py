"""SIGTERM stops a driver the way Ctrl-C does: the job ends canceled, its lease released."""

from __future__ import annotations

import signal
import threading
from typing import Optional

from raypar.errors import Stopped

_STOPPED = "stopped by SIGTERM (ray job stop, raypar cancel, or the pod was deleted)"
_received: Optional[str] = None


def stop_on_sigterm() -> None:
    """Turn SIGTERM into :class:`Stopped` in the main thread.

    Ray's job supervisor sends SIGTERM on `ray job stop` and Kubernetes on pod
    deletion. Python's default (and the handler ``ray.init`` installs) would end
    the process before the job dir says the job stopped; call this again after
    ``ray.init``.
    """
    def handler(signum, frame):
        global _received
        _received = _STOPPED
        raise Stopped(_STOPPED)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def forget() -> None:
    """A new driver session starts: a SIGTERM an earlier session of this process got is not its reason."""
    global _received
    _received = None


def interrupt_reason(exc: BaseException) -> str:
    """Why the driver was interrupted: Ray may re-raise a signal's exception as a bare KeyboardInterrupt."""
    return _received or str(exc) or "interrupted (Ctrl-C)"
