"""Waiting for a condition by asking again: the one polling loop, on the monotonic clock."""

from __future__ import annotations

import time
from typing import Callable, Optional, TypeVar

T = TypeVar("T")


def poll(check: Callable[[], Optional[T]], timeout: Optional[float], interval: float) -> Optional[T]:
    """``check()``'s first truthy answer, asked every ``interval`` seconds; None once ``timeout``
    seconds (None: no limit) have passed without one. A clock step never shortens the wait."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        answer = check()
        if answer:
            return answer
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            return None
        time.sleep(interval if left is None else min(interval, left))
