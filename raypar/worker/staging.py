"""Remote output folders, written by the entry script as if they were local.

Azure mounts an output (``rw_mount``) or uploads it at the end (``upload``),
so entry scripts write plain files into the path they are given. For an
output on object storage, each worker gets a local folder in its place and
raypar uploads what changed there after every successful ``run()`` --
before the batch is recorded done, so a done batch's files are stored --
and after ``init()`` and ``shutdown()``. ``mode: direct`` passes the URL.
"""

from __future__ import annotations

import os
import tempfile

from raypar.credentials import open_fs


class StagedOutput:
    """One remote output folder and its local stand-in on this worker."""

    def __init__(self, url: str, storage: dict):
        self.url = url.rstrip("/")
        self.fs, self.path = open_fs(self.url, storage)
        self.local = tempfile.mkdtemp(prefix="raypar-output-")
        self.sent: dict[str, tuple[int, int]] = {}  # relative name -> (size, mtime_ns) uploaded

    def upload_changes(self) -> int:
        """Upload files that are new or changed since the last call; returns how many."""
        count = 0
        for folder, _, names in os.walk(self.local):
            for name in names:
                local = os.path.join(folder, name)
                rel = os.path.relpath(local, self.local).replace(os.sep, "/")
                stat = os.stat(local)
                if self.sent.get(rel) == (stat.st_size, stat.st_mtime_ns):
                    continue
                self.fs.put_file(local, f"{self.path}/{rel}")
                self.sent[rel] = (stat.st_size, stat.st_mtime_ns)
                count += 1
        return count


def stage_outputs(argv: list[str], outputs: list[str], storage: dict) -> tuple[list[str], list[StagedOutput]]:
    """argv with each staged output URL replaced by its local folder, and the staged outputs."""
    staged = [StagedOutput(url, storage) for url in outputs]
    out = []
    for arg in argv:
        for s in staged:
            if _names(arg, s.url):
                arg = s.local + arg[len(s.url):]
            elif "=" in arg and _names(arg.split("=", 1)[1], s.url):  # --out=az://...
                flag, value = arg.split("=", 1)
                arg = f"{flag}={s.local}{value[len(s.url):]}"
        out.append(arg)
    return out, staged


def _names(value: str, url: str) -> bool:
    """``value`` is the output URL or a path inside it (az://c/out2 is not inside az://c/out)."""
    return value == url or value.startswith(url + "/")
