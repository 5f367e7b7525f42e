"""Where a session's worker time went: what a user pays for, split so they can see what to change.

A worker's life runs from the driver's request for it to its end (killed,
lost, or the session over), on the driver's clock. It is split into:

- starting: Ray placing it and starting its process, raypar's modules loading;
- init(): the entry script loaded and its init() run (the worker's own count);
- reading: its batches waiting for their input (what reading ahead did not hide);
- run(): the entry script's run();
- storing: the results counted and serialized, run()'s output files uploaded,
  the done records written;
- cut short: batches that never answered: timed out, lost with their worker,
  or running when the session stopped (their time is spent again on a retry);
- idle: the rest: waiting for work (planning, the tail of the job, a driver
  busy elsewhere), Ray's calls there and back, shutdown();
- running: while the session runs (`raypar status`), the batches running
  now, from their start as the driver saw it: split into the parts above
  when they answer.

The worker's parts come with its answers as running totals (worker/time_spent.py),
so this costs a few assignments per answer and a record per live worker.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from raypar.worker.time_spent import PARTS as WORKER_PARTS

PARTS = ("starting", "init()", *WORKER_PARTS, "cut short", "idle", "running")
_NOTHING = (0.0,) * len(WORKER_PARTS)


@dataclass
class _Life:
    born: float
    ready: Optional[float] = None  # when its start answered
    init: float = 0.0
    spent: Sequence[float] = _NOTHING  # the worker's running totals of WORKER_PARTS, as last answered
    cut: float = 0.0


@dataclass
class TimeSplit:
    """Seconds of worker time by PARTS, over ``workers`` worker processes."""

    workers: int = 0
    seconds: dict = field(default_factory=lambda: dict.fromkeys(PARTS, 0.0))

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    def add(self, other: "TimeSplit") -> "TimeSplit":
        return TimeSplit(self.workers + other.workers,
                         {part: self.seconds[part] + other.seconds[part] for part in PARTS})

    def describe(self) -> str:
        """``12.4 s over 2 worker(s): run() 71%, idle 12%, ...``: the parts by share, largest first."""
        total = self.total
        if not self.workers or total <= 0:
            return "no worker started"
        shares = sorted(((seconds / total, part) for part, seconds in self.seconds.items() if seconds > 0),
                        key=lambda share: -share[0])
        parts = ", ".join(f"{part} {_percent(share)}" for share, part in shares)
        return f"{_duration(total)} over {self.workers} worker(s): {parts}"

    def fields(self) -> dict:
        """As the Python API gives it (``Outcome.worker_time``): seconds by part, and the workers."""
        return {"workers": self.workers, **{part: round(s, 3) for part, s in self.seconds.items()}}

    @classmethod
    def of(cls, fields: dict) -> "TimeSplit":
        """The split ``fields()`` gave."""
        return cls(fields["workers"], {part: fields.get(part, 0.0) for part in PARTS})


class WorkerTime:
    """The session's worker lives: told of each start, answer and end by the scheduler, keyed by
    the worker's slot (one live worker each)."""

    def __init__(self):
        self.lives: dict[Any, _Life] = {}
        self.ended_split = TimeSplit()

    def born(self, key: Any, now: float) -> None:
        self.lives[key] = _Life(born=now)

    def started(self, key: Any, now: float, init: Optional[float]) -> None:
        life = self.lives.get(key)
        if life is not None:
            life.ready, life.init = now, init or 0.0

    def spent(self, key: Any, totals: Optional[Sequence[float]]) -> None:
        life = self.lives.get(key)
        if life is not None and totals and sum(totals) >= sum(life.spent):  # answers may come out of order
            life.spent = totals

    def cut_short(self, key: Any, since: Optional[float], now: float) -> None:
        """The worker's running batch since ``since`` (the driver's clock) ends without an answer."""
        life = self.lives.get(key)
        if life is not None and since is not None:
            life.cut += max(now - since, 0.0)

    def ended(self, key: Any, now: float) -> None:
        life = self.lives.pop(key, None)
        if life is not None:
            self.ended_split = self.ended_split.add(TimeSplit(1, _parts(life, now)))

    def split(self, now: float, running: Optional[dict] = None) -> TimeSplit:
        """Every worker's time so far: those ended, and the live ones up to ``now``; ``running``:
        {key: since when its worker runs the batch it has not answered yet}. Also called from the
        lease's heartbeat thread: the lives are copied in one step (no Python code runs between a
        dict's items as list() takes them, so the scheduler cannot change it meanwhile)."""
        total = dict(self.ended_split.seconds)
        running = running or {}
        lives = list(self.lives.items())
        for key, life in lives:
            for part, seconds in _parts(life, now, running.get(key)).items():
                total[part] += seconds
        return TimeSplit(self.ended_split.workers + len(lives), total)


def _parts(life: _Life, now: float, running_since: Optional[float] = None) -> dict:
    """One worker's seconds by part, its life ending (or looked at) at ``now``."""
    alive = max(now - life.born, 0.0)
    ready = life.ready if life.ready is not None else now
    seconds = {"starting": max(ready - life.born - life.init, 0.0), "init()": life.init,
               **dict(zip(WORKER_PARTS, life.spent, strict=True)), "cut short": life.cut,
               "running": max(now - running_since, 0.0) if running_since is not None else 0.0}
    # The driver's clock and the worker's differ by Ray's latency: the rest is never negative.
    seconds["idle"] = max(alive - sum(seconds.values()), 0.0)
    return seconds


def job_total(records: list[dict]) -> Optional[dict]:
    """The job's worker time over its recorded sessions (Ledger.worker_times): ``sessions``,
    ``lost`` (those whose driver was killed: counted from its last heartbeat) and the split's
    fields; None when no session recorded any."""
    records = [r for r in records if (r.get("worker_time") or {}).get("workers")]
    if not records:
        return None
    total = TimeSplit()
    for record in records:
        total = total.add(TimeSplit.of(record["worker_time"]))
    return {"sessions": len(records), "lost": sum(r.get("ended") == "lost" for r in records), **total.fields()}


def sessions_text(total: dict) -> str:
    """``its 3 sessions (1 lost with its driver)``: which sessions a job total counts."""
    lost = f" ({total['lost']} lost with its driver)" if total["lost"] else ""
    return f"its {total['sessions']} session(s){lost}"


def from_lost_heartbeat(split: dict) -> dict:
    """A killed driver's split as its last heartbeat carried it: the batches it was running are
    cut short (they run again)."""
    return {**split, "cut short": split.get("cut short", 0.0) + split.get("running", 0.0), "running": 0.0}


def _percent(share: float) -> str:
    return f"{share:.0%}" if share >= 0.005 else "<1%"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"
