"""Progress of a job: a bar redrawn in place on a terminal, plain periodic lines in a log.

The plain line has one fixed shape, so ``raypar submit --wait`` can read the
remote driver's log and draw the same bar on the submitter's terminal.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional, TextIO

_LINE_RE = re.compile(r"^raypar: (\d+)/(\d+)(\+?) done, (\d+) failed, ([\d.]+) mini-batches/s, ETA (\S+)\s*$")
BAR_WIDTH = 24
REDRAW_EVERY = 0.1  # seconds between two redraws of the bar
QUIET_LINE_EVERY = 60.0  # a log's line when nothing changed


@dataclass(frozen=True)
class Snapshot:
    done: int
    failed: int
    total: int
    planning: bool  # the input is still being listed: total grows
    rate: float  # mini-batches done per second in this session

    @property
    def eta(self) -> Optional[float]:
        left = self.total - self.done - self.failed
        if self.planning or self.rate <= 0 or left < 0:
            return None
        return left / self.rate

    def line(self) -> str:
        """The plain line, as logs show it (and ``parse_line`` reads it)."""
        return (f"raypar: {self.done}/{self.total}{'+' if self.planning else ''} done, {self.failed} failed, "
                f"{self.rate:.2f} mini-batches/s, ETA {_clock(self.eta)}")

    def bar(self) -> str:
        filled = int(BAR_WIDTH * (self.done + self.failed) / self.total) if self.total else 0
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        total = f"{self.total}{'+' if self.planning else ''}"
        return (f"[{bar}] {self.done}/{total} done, {self.failed} failed, "
                f"{self.rate:.1f}/s, ETA {_clock(self.eta)}")


def _counts(s: Snapshot) -> tuple:
    return s.done, s.failed, s.total, s.planning


def _clock(seconds: Optional[float]) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def parse_line(line: str) -> Optional[Snapshot]:
    """The snapshot a plain progress line describes, or None for any other line."""
    match = _LINE_RE.match(line.strip())
    if not match:
        return None
    done, total, plus, failed, rate, _ = match.groups()
    return Snapshot(done=int(done), failed=int(failed), total=int(total), planning=bool(plus), rate=float(rate))


def plain_interval() -> float:
    """Seconds between plain lines; ``raypar submit`` asks its remote driver for more frequent ones."""
    try:
        return max(float(os.environ.get("RAYPAR_PROGRESS_INTERVAL", "5")), 0.1)
    except ValueError:
        return 5.0


class ProgressDisplay:
    """Shows snapshots on ``stream``; other output goes through ``echo`` so it never tears the bar.

    Given ``echo`` (a line printer), it shows plain lines through it and never draws a bar.
    """

    def __init__(self, stream: Optional[TextIO] = None, tty: Optional[bool] = None,
                 every: Optional[float] = None, echo: Optional[Callable[[str], None]] = None):
        self.stream = stream or sys.stdout
        self.print_line = echo
        self.tty = False if echo is not None else self.stream.isatty() if tty is None else tty
        self.every = REDRAW_EVERY if self.tty else (plain_interval() if every is None else every)
        self.last_at = 0.0
        self.last: Optional[Snapshot] = None
        self.shown: Optional[Snapshot] = None
        self.drawn = False  # a bar sits on the current terminal line
        self.lock = threading.RLock()  # workers' output is echoed from the console relay's thread

    def update(self, snapshot: Snapshot, final: bool = False) -> None:
        with self.lock:
            self._update(snapshot, final)

    def _update(self, snapshot: Snapshot, final: bool) -> None:
        self.last = snapshot
        now = time.monotonic()
        if not final and now - self.last_at < self.every:
            return
        if not self.tty and not final and self.shown is not None and _counts(snapshot) == _counts(self.shown) \
                and now - self.last_at < QUIET_LINE_EVERY:
            return  # nothing new: a log gets a line only now and then to show the job lives
        self.last_at, self.shown = now, snapshot
        if self.tty:
            self.stream.write("\r\033[K" + snapshot.bar())
            self.drawn = True
            if final:
                self._end_bar()
        elif self.print_line is not None:
            self.print_line(snapshot.line())
            return
        else:
            self.stream.write(snapshot.line() + "\n")
        self.stream.flush()

    def echo(self, line: str) -> None:
        with self.lock:
            self._echo(line)

    def _echo(self, line: str) -> None:
        if self.print_line is not None:
            self.print_line(line)
            return
        if self.drawn:
            self.stream.write("\r\033[K")
        self.stream.write(line + "\n")
        if self.drawn and self.last is not None:
            self.stream.write(self.last.bar())
        self.stream.flush()

    def close(self) -> None:
        with self.lock:
            self._close()

    def _close(self) -> None:
        if self.drawn:
            self._end_bar()
            self.stream.flush()

    def _end_bar(self) -> None:
        self.stream.write("\n")
        self.drawn = False
