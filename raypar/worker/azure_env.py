"""Inside a worker: the folders, variables and import path Azure's runtime gives entry scripts.

One ``EntryEnvironment`` per worker process, made before the entry script is
imported. ``EntryScript`` (shim/azureml_user/parallel_run.py) reads what it
sets in the environment.

| EntryScript      | local job dir                            | job dir on object storage                      |
|------------------|------------------------------------------|------------------------------------------------|
| ``log_dir``      | ``<job>/logs/user/<run>~<worker>/``      | a local folder, uploaded there (staging.py)    |
| ``output_dir``   | ``<job>/worker_outputs/<run>~<worker>/`` | a local folder, uploaded there (staging.py)    |
| ``working_dir``  | ``$TMPDIR/raypar-work/<pid>@<host>~<agent>~*``, removed at the end | the same              |

Uploads happen when staged outputs are uploaded: after ``init()``, after each
successful ``run()`` (before its done record) and after ``shutdown()``.
"""

from __future__ import annotations

import importlib
import os
import shutil
import socket
import sys
import tempfile
from typing import Any, Callable, Optional

from raypar.worker.staging import StagedOutput

SHIM_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shim")
PROFILE_FILE = "profile.pstats"
SCRATCH_ROOT = os.path.join(tempfile.gettempdir(), "raypar-work")  # working_dir: <pid>@<host>~<agent>~<random>


class EntryEnvironment:
    """Azure's runtime conventions for one worker process (see the module docstring)."""

    def __init__(self, ledger, writer: str, agent_name: str, storage: dict,
                 gpu_ids: list, profiling_module: Optional[str] = None):
        self.staged: list[StagedOutput] = []  # remote job dir: folders uploaded like remote outputs
        self._made: list[str] = []  # folders made in a local job dir: removed at the end if still empty
        self.log_dir = self._kept_folder(ledger, storage, "logs", "user", writer)
        self.output_dir = self._kept_folder(ledger, storage, "worker_outputs", writer)
        self.working_dir = _scratch_folder(agent_name)
        os.environ.update({"RAYPAR_LOG_DIR": self.log_dir, "AZUREML_BI_OUTPUT_PATH": self.output_dir,
                           "RAYPAR_WORKING_DIR": self.working_dir, "RAYPAR_AGENT_NAME": agent_name})
        # Ray already set CUDA_VISIBLE_DEVICES to this worker's GPUs; Azure's samples also read the count.
        if gpu_ids:
            os.environ["AZ_BATCHAI_GPU_COUNT_FOUND"] = str(len(gpu_ids))
        if SHIM_DIR not in sys.path:
            sys.path.append(SHIM_DIR)  # last: an installed or task.code azureml_user wins
        # cProfile or profile (checked by the spec): both have runcall() and dump_stats().
        self.profiler = importlib.import_module(profiling_module).Profile() if profiling_module else None

    def _kept_folder(self, ledger, storage: dict, *parts: str) -> str:
        path = ledger.store.local_path(*parts)
        if path is None:  # an object store cannot be written as a folder: stage it
            staged = StagedOutput(ledger.store.url(*parts), storage)
            self.staged.append(staged)
            return staged.local
        try:
            os.makedirs(path, exist_ok=True)
        except FileNotFoundError:  # a worker that ended removed the empty parent between makedirs' mkdirs
            os.makedirs(path, exist_ok=True)
        self._made.append(path)
        return path

    def call(self, fn: Callable, *args) -> Any:
        """``fn(*args)``, under ``--profiling_module`` when given; the stats (of every call so far)
        are written to ``log_dir/profile.pstats`` after each call."""
        if self.profiler is None:
            return fn(*args)
        try:
            return self.profiler.runcall(fn, *args)
        finally:
            self.profiler.dump_stats(os.path.join(self.log_dir, PROFILE_FILE))

    def close(self) -> None:
        """The worker ends: drop the scratch folder, the local copies of uploaded folders, and the
        kept folders (and their parents, ``logs/user`` and ``worker_outputs``) nothing was written to."""
        shutil.rmtree(self.working_dir, ignore_errors=True)
        for staged in self.staged:
            try:
                staged.upload_changes()  # what shutdown() wrote, if it raised before the worker's upload
            except Exception:  # noqa: BLE001 - keep the local copy: it is the only one
                continue
            shutil.rmtree(staged.local, ignore_errors=True)
        for path in self._made:
            for folder in (path, os.path.dirname(path)):
                try:
                    os.rmdir(folder)  # only if empty
                except OSError:
                    break


def _scratch_folder(agent_name: str) -> str:
    """A new working_dir, after removing those of this host's dead workers: a killed worker
    (timeout, failed or canceled job) never reaches close()."""
    os.makedirs(SCRATCH_ROOT, exist_ok=True)
    host = socket.gethostname()
    for entry in os.scandir(SCRATCH_ROOT):
        pid, _, rest = entry.name.partition("@")
        # Only this host's: another host sharing /tmp has its own process IDs.
        if rest.split("~", 1)[0] == host and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(entry.path, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"{os.getpid()}@{host}~{agent_name}~", dir=SCRATCH_ROOT)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
