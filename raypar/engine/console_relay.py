"""Workers' prints on the driver's console, each line exactly once, read from the job dir's logs.

On the embedded Ray, Ray's own forwarding (``log_to_driver``) loses lines of short jobs: its log
monitor polls worker log files and the driver stops Ray before the last poll (an ``init()`` print
of a four-batch job went missing one run in three). Every worker already tees its stdout and
stderr into ``logs/<run>~<worker>.log`` in a local job dir, so the driver shows those files instead,
and drains them after the workers have stopped: nothing printed is missing, nothing is shown twice
(Ray also folds repeated lines of different workers into one "[repeated Nx]" line; this does not).
"""

from __future__ import annotations

import os
import threading
from typing import Callable

MARK = "[raypar] "  # the worker's own markers in its log (batch begin/end), not the user's output
POLL_SECONDS = 0.2
CHUNK = 1 << 20  # read per file per pass: a worker printing gigabytes does not fill the driver's memory


class ConsoleRelay:
    """Tails ``folder/<run>~*.log`` and echoes each complete new line as ``(worker) line``."""

    def __init__(self, folder: str, run: str, echo: Callable[[str], None]):
        self.folder, self.prefix, self.echo = folder, f"{run}~", echo
        self.offsets: dict[str, int] = {}
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="raypar-console-relay", daemon=True)

    def __enter__(self) -> "ConsoleRelay":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop tailing and show what is left, a last line without its newline included."""
        self.stopping.set()
        self.thread.join()
        self._drain(final=True)

    def _loop(self) -> None:
        while not self.stopping.wait(POLL_SECONDS):
            self._drain(final=False)

    def _drain(self, final: bool) -> None:
        try:
            names = sorted(n for n in os.listdir(self.folder) if n.startswith(self.prefix) and n.endswith(".log"))
        except FileNotFoundError:  # no worker has started yet
            return
        for name in names:
            while self._relay(name, final) == CHUNK:
                pass

    def _relay(self, name: str, final: bool) -> int:
        """Show the next complete lines of one log (all of it when final); returns bytes read."""
        path = os.path.join(self.folder, name)
        try:
            with open(path, "rb") as f:  # bytes: a character cut by the writer is completed next time
                f.seek(self.offsets.get(name, 0))
                data = f.read(CHUNK)
        except OSError:
            return 0
        # A line still being written waits for its newline, unless it alone fills a chunk.
        end = len(data) if final or b"\n" not in data and len(data) == CHUNK else data.rfind(b"\n") + 1
        self.offsets[name] = self.offsets.get(name, 0) + end
        text = data[:end].decode("utf-8", errors="replace")
        lines = text[:-1].split("\n") if text.endswith("\n") else text.split("\n") if text else []
        worker = name[len(self.prefix):-len(".log")].rsplit("-", 1)[0]  # i0s1-ab12cd34 -> i0s1
        shown = [f"({worker}) {line}" for line in lines if not line.startswith(MARK)]
        if shown:
            self.echo("\n".join(shown))
        return len(data)
