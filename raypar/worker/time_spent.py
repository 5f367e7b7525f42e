"""What a worker's batches spend their time on, as running totals.

Each answer of the worker carries the totals so far (``answer()``), so the
driver keeps only the last one per worker whatever the grouping of calls,
and a lost answer loses nothing but its own batch. The driver adds them up
for the session (raypar/engine/worker_time.py).
"""

from __future__ import annotations

import time
from typing import Optional

PARTS = ("reading", "run()", "storing")  # the input waited for, run(), the results stored


class TimeSpent:
    """Seconds spent in each of PARTS: ``to(part)`` ends the part that was timing and starts ``part``."""

    def __init__(self):
        self.seconds = dict.fromkeys(PARTS, 0.0)
        self.part: Optional[str] = None
        self.since = 0.0

    def to(self, part: Optional[str]) -> None:
        now = time.perf_counter()
        if self.part is not None:
            self.seconds[self.part] += now - self.since
        self.part, self.since = part, now

    def answer(self) -> list[float]:
        return [round(self.seconds[part], 6) for part in PARTS]
