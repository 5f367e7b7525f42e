"""The worker actor: one per slot, runs the user's entry script.

A worker loads the entry script from ``task.code``, sets ``sys.argv`` from
``program_arguments`` and what Azure's runtime gives entry scripts
(``EntryScript``, ``AZUREML_BI_OUTPUT_PATH``...: see raypar/azureml/compat/),
calls ``init()`` once, ``run(mini_batch)`` per batch and ``shutdown()`` when
retired. For each successful batch it writes the output part and then the done
record itself, before answering the driver: a driver killed at any instant
loses no finished work.

User errors never escape as exceptions: ``start`` and ``run_batch`` return a
dict, so the driver can tell "run() raised" (an answer) from "the worker
process died" (a Ray error).
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import os
import shutil
import sys
import tempfile
import time
import traceback
import uuid
from typing import Any, Optional

from raypar.credentials import describe_error, options_for, redact
from raypar.errors import ResultError
from raypar.inputs.base import BatchReader, MiniBatch
from raypar.inputs.files import cleanup
from raypar.jobdir.ledger import Ledger
from raypar.jobdir.log_shipper import LogShipper
from raypar.jobdir.records import DoneRecord
from raypar.outputs.rows import count_and_serialize
from raypar.worker import items as failed_items
from raypar.worker.azure_env import EntryEnvironment
from raypar.worker.plan import WorkerPlan
from raypar.worker.read_ahead import ReadAhead
from raypar.worker.staging import stage_outputs
from raypar.worker.time_spent import TimeSpent
from raypar.worker.withdrawals import Withdrawals, batch_of, call_name

log = logging.getLogger("raypar")


# Code folders up to this size are copied per worker; bigger ones (models kept beside the script)
# run in place rather than cost every worker a copy.
WORKING_COPY_LIMIT = 64 << 20
_RAYPAR_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep  # the raypar package
_RAY_DIR = list(importlib.util.find_spec("ray").submodule_search_locations)[0] + os.sep


def _not_users(filename: str) -> bool:
    """A frame of raypar, Ray or the import machinery: noise above the user's own frames."""
    return filename.startswith((_RAYPAR_DIR, _RAY_DIR, "<frozen "))


def code_copies_dir(run: str) -> str:
    """Where a run's workers copy the code folder on each node (the driver clears its node's at the end)."""
    return os.path.join(tempfile.gettempdir(), "raypar-code", run)


def _user_traceback(exc: BaseException) -> str:
    """The traceback from the user's first frame down (Ray's and importlib's frames above it and
    raypar's anywhere left out)."""
    frames = traceback.extract_tb(exc.__traceback__)
    first = next((i for i, f in enumerate(frames) if not _not_users(f.filename)), 0)
    keep = [f for f in frames[first:] if not f.filename.startswith(_RAYPAR_DIR)] or frames
    return "".join(["Traceback (most recent call last):\n", *traceback.format_list(keep),
                    *traceback.format_exception_only(type(exc), exc)])


class Worker:
    """Body of the Ray actor (wrapped with ``ray.remote`` by the scheduler)."""

    def __init__(self, job_url: str, plan: WorkerPlan, run: str, instance: int, slot: int):
        self.plan = plan
        # A name no other process uses: this worker's segments and log are its alone.
        self.writer = f"{run}~i{instance}s{slot}-{uuid.uuid4().hex[:8]}"
        self.ledger = Ledger(job_url, options_for(job_url, plan.storage))
        self.done = self.ledger.done_writer(self.writer, plan.ledger)
        self.run_id = run
        self.instance, self.slot = instance, slot
        self.with_rows = plan.with_rows
        self.module: Any = None
        self.entry_env: Optional[EntryEnvironment] = None
        self.copy_dir: Optional[str] = None  # holds code_copy, this worker's copy of the code folder
        self.shipper: Optional[LogShipper] = None  # stores the log of an object-store job dir
        self.code_copy = ""
        self.started = False  # init() succeeded: only then does shutdown() run
        self.context_as: Optional[str] = None  # how run() takes mini_batch_context (_context_argument)
        self.reader: Optional[BatchReader] = None  # made once the entry script has loaded
        self.ahead: Optional[ReadAhead] = None  # batches read while run() works (raypar.prefetch)
        self.withdrawals = Withdrawals()  # queued calls the driver took back (withdrawals.py)
        self.spent = TimeSpent()  # its batches' time: reading, run(), storing (its answers carry it)
        self.staged: list = []  # remote output folders written locally (staging.py)
        self.log = None  # this worker's log stream, once its output is captured
        self.name = f"instance{instance}-slot{slot}"
        self.node = self._node_id()
        # Set here, not in a per-actor runtime_env: that would keep Ray from
        # reusing its prestarted worker processes and slow every start.
        os.environ.update({"RAYPAR_JOB_DIR": job_url, "RAYPAR_RUN": run,
                           "RAYPAR_INSTANCE": str(instance), "RAYPAR_SLOT": str(slot)})

    @staticmethod
    def _node_id() -> Optional[str]:
        import ray  # noqa: PLC0415 - lazy: Ray is loaded by the actor's process, not by importing this module

        if not ray.is_initialized():  # not inside Ray (unit tests)
            return None
        return ray.get_runtime_context().get_node_id()

    @staticmethod
    def _gpu_ids() -> list:
        import ray  # noqa: PLC0415 - lazy: Ray is loaded by the actor's process, not by importing this module

        return list(ray.get_gpu_ids()) if ray.is_initialized() else []

    def start(self) -> dict:
        """Import the entry script and call its ``init()``; report the outcome."""
        began = time.perf_counter()
        info = {"node": self.node, "pid": os.getpid(), "worker": self.name, "writer": self.writer}
        stage = "loading the entry script"
        try:
            self._load_entry_script()
            if not callable(getattr(self.module, "run", None)):
                raise AttributeError(f"{self.plan.entry_script} has no run(mini_batch) function")
            self.context_as = _context_argument(self.module.run)
            self.reader = BatchReader(self.plan.input, self.plan.storage, self.plan.mount_cache_bytes)
            self.ahead = ReadAhead(self.reader, self.plan.prefetch)
            init = getattr(self.module, "init", None)
            if init is not None:
                stage = "init()"
                init()
            stage = "uploading the outputs init() wrote"
            self._upload_outputs()
        except BaseException as exc:  # noqa: BLE001 - user code may raise anything, even SystemExit
            error = self._error_text(exc)
            self._remove_copy()  # the scheduler kills this actor next
            self._close_log()
            return {**info, "ok": False, "stage": stage, "error": error, "init": time.perf_counter() - began}
        self.started = True
        return {**info, "ok": True, "init": time.perf_counter() - began}

    def _load_entry_script(self) -> None:
        code, entry_path = self._working_copy(self.plan.code, self.plan.entry_path)
        os.environ.update(self.plan.env)
        self._capture_user_output()
        logging.basicConfig(level=self.plan.logging_level, force=True, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger("azure").setLevel(logging.WARNING)  # the SDK logs every HTTP request at INFO
        # What Azure's runtime gives entry scripts: EntryScript's folders, AZUREML_BI_OUTPUT_PATH,
        # the GPU count, `import azureml_user`, --profiling_module.
        self.entry_env = EntryEnvironment(self.ledger, self.writer, self.name, self.plan.storage,
                                          self._gpu_ids(), self.plan.profiling_module)
        if code not in sys.path:
            sys.path.insert(0, code)
        os.chdir(code)  # sibling files of the entry script open with relative paths (as on Azure)
        sys.argv, self.staged = stage_outputs(list(self.plan.argv), self.plan.staged_outputs,
                                              self.plan.storage)
        self.staged += self.entry_env.staged  # EntryScript's folders of a job dir on object storage
        name = os.path.splitext(os.path.basename(self.plan.entry_script))[0]
        loader_spec = importlib.util.spec_from_file_location(name, entry_path)
        if loader_spec is None or loader_spec.loader is None:
            raise ImportError(f"cannot load entry script {self.plan.entry_path}")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = module
        loader_spec.loader.exec_module(module)
        self.module = module

    def _working_copy(self, code: str, entry_path: str) -> tuple[str, str]:
        """The code folder copied for this worker, as Azure runs scripts in a snapshot: what the
        script writes beside itself (mlruns/, downloads, caches) never lands in the user's folder.
        A folder too big to copy per worker runs in place."""
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(code) for f in files)
        if size > WORKING_COPY_LIMIT:
            log.warning("task.code %s holds %d MiB: the entry script runs in it, not in a copy, so what "
                        "it writes there stays", code, size >> 20)
            return code, entry_path
        parent = code_copies_dir(self.run_id)
        os.makedirs(parent, exist_ok=True)
        self.copy_dir = tempfile.mkdtemp(prefix=f"{self.name}-", dir=parent)
        copy = os.path.join(self.copy_dir, os.path.basename(os.path.normpath(code)) or "code")
        shutil.copytree(code, copy, symlinks=True, ignore=shutil.ignore_patterns("__pycache__", ".git"))
        self.code_copy = copy
        return copy, os.path.join(copy, os.path.relpath(entry_path, code))

    def _capture_user_output(self) -> None:
        """Tee the entry script's stdout/stderr (and so its logging) into the job dir's log."""
        path = self.ledger.log_path(self.writer)
        if path is None:  # object storage: a local spool, stored piece by piece
            self.shipper = LogShipper(self.ledger.store, self.writer)
            path = self.shipper.spool
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.log = open(path, "a", buffering=1)
        self.log.write(f"[raypar] worker {self.name} pid {os.getpid()} node {self.node}\n")
        sys.stdout = _Tee(sys.stdout, self.log)
        sys.stderr = _Tee(sys.stderr, self.log)

    @staticmethod
    def _flush_log() -> None:
        for stream in (sys.stdout, sys.stderr):  # the tees: a last print without a newline reaches the log
            stream.flush()

    def _close_log(self) -> None:
        """Flush the log and store what is not stored yet."""
        self._flush_log()
        if self.shipper is not None:
            try:
                self.shipper.close()
            except Exception as exc:  # noqa: BLE001 - a lost log tail must not fail the job
                log.warning("could not store the end of this worker's log: %s", exc)
            self.shipper = None

    def _mark(self, text: str) -> None:
        if self.log is not None:
            self.log.write(f"[raypar] {text}\n")

    def run_batch(self, batch_json: str, attempt: int) -> dict:
        """Run one mini-batch; on success its part and done record are durable before returning."""
        batch = MiniBatch.from_json(batch_json)
        if not self.withdrawals.begin(call_name(batch.id, attempt)):
            return {"withdrawn": True}
        return self._run_batch(batch, attempt)

    def _run_batch(self, batch: MiniBatch, attempt: int) -> dict:
        self.spent.to("reading")
        try:
            answer = self._run_and_store(batch, attempt)
        finally:
            self.spent.to(None)
        answer["spent"] = self.spent.answer()
        return answer

    def _run_and_store(self, batch: MiniBatch, attempt: int) -> dict:
        started = time.time()
        base = {"batch": batch.id, "attempt": attempt, "node": self.node, "worker": self.name,
                "started": started}
        self._mark(f"begin {batch.id} attempt {attempt}")
        temp = None
        items = None  # a table batch cut by bytes knows its rows only once read
        try:
            mini_batch, context, temp = self.ahead.read(batch)
            items = len(mini_batch) if batch.kind == "table" else batch.item_count
            failed = failed_items.collect(batch.kind, mini_batch)
            self.spent.to("run()")
            try:
                result = self.entry_env.call(self._call_run, mini_batch, context)
            finally:
                failed_items.stop()
                self.spent.to("storing")
            returned, rows = count_and_serialize(result, self.with_rows, self.plan.append_row_format)
            self._upload_outputs()  # files run() wrote are stored before the batch counts as done
        except ResultError as exc:
            self._mark(f"end {batch.id} attempt {attempt}: failed")
            error = redact(f"ResultError: {exc}", self.plan.storage)
            return {**base, **self.flushed(), "ok": False, "items": items, "error": error}
        except BaseException as exc:  # noqa: BLE001 - user code may raise anything, even SystemExit
            self._mark(f"end {batch.id} attempt {attempt}: failed")
            if items is None:  # the input could not be read: its items failed, so thresholds hold
                items = self.reader.items_of_unreadable(batch)
            return {**base, **self.flushed(), "ok": False, "items": items, "error": self._error_text(exc)}
        finally:
            cleanup(temp)
        record = DoneRecord(
            batch=batch.id, run=self.run_id, attempt=attempt, items=items, returned=returned,
            part=None, node=self.node, worker=self.name, seconds=round(time.time() - started, 6),
            started=round(started, 3), **failed.record_fields(),
        )
        try:
            record = self.done.write(record, rows)  # stored now, or with this worker's next flush
        except Exception as exc:  # noqa: BLE001 - the job dir, not run(): never one of the user's tries
            self._mark(f"end {batch.id} attempt {attempt}: not stored")
            return {**base, **self.flushed(), "ok": False, "storage": True, "items": items,
                    "error": f"raypar could not store {batch.id} in the job dir: "
                             f"{describe_error(exc, self.plan.storage)}"}
        self._mark(f"end {batch.id} attempt {attempt}: done")
        return {**base, **self.flushed(), "ok": True, "items": items, "returned": returned,
                "reported": record.reported, "seconds": record.seconds, "index": self.done.written,
                "part": [record.part, record.part_offset, record.part_bytes, record.part_sha256, record.part_crc32]
                if record.part else None}

    def run_batches(self, items: list) -> dict:
        """Several mini-batches that take milliseconds, in one call (the driver groups them to save
        Ray round trips): each runs and is recorded as by run_batch, and answers as its own. The
        group stops after a batch raypar could not store, or at raypar's own error."""
        parts: list[dict] = []
        batches = [(MiniBatch.from_json(batch_json), attempt) for batch_json, attempt in items]
        if not self.withdrawals.begin(call_name(batches[0][0].id, batches[0][1])):
            return {"withdrawn": True}
        for batch, attempt in batches:
            try:
                part = self._run_batch(batch, attempt)
            except Exception as exc:  # noqa: BLE001 - raypar's own error: the driver replaces this worker
                return {"parts": parts, "raised": describe_error(exc, self.plan.storage)}
            parts.append(part)
            if part.get("storage"):
                break
        return {"parts": parts}

    def prefetch(self, batch_json: str) -> None:
        """Read a queued mini-batch while run() works on the one before: called on the actor's
        "aside" thread, beside the ordered calls (raypar/worker/read_ahead.py)."""
        if self.ahead is not None:  # not before init() succeeded
            self.ahead.prefetch(MiniBatch.from_json(batch_json))

    def withdraw(self, names: list[str]) -> dict:
        """Take back queued calls that have not begun (raypar/worker/withdrawals.py): called on the
        actor's "store" thread, so a read ahead never holds it up. What was read ahead for them is
        dropped."""
        withdrawn = self.withdrawals.withdraw(names)
        if self.ahead is not None:
            for name in withdrawn:
                self.ahead.drop(batch_of(name))
        return {"withdrawn": withdrawn}

    def flush(self) -> dict:
        """Store the buffered done records, and the log so far (the driver asks an idle worker,
        and a stopping job before it kills the workers)."""
        self.done.flush()
        self._flush_log()
        if self.shipper is not None:
            self.shipper.ship()
        return self.flushed()

    def store_finished(self) -> dict:
        """Store the buffered done records now, beside the batch that runs and any read ahead: called
        on the actor's "store" thread by an interrupted driver (Ctrl-C, SIGTERM), which kills the
        workers next without waiting for running batches. The writer's own clock thread stores the
        same way."""
        self.done.flush()
        return self.flushed()

    def flushed(self) -> dict:
        """How many of this worker's done batches are stored, and where later ones would be."""
        durable, position = self.done.progress()
        return {"durable": durable, "position": position}

    def _call_run(self, mini_batch, context):
        if self.context_as == "positional":
            return self.module.run(mini_batch, context)
        if self.context_as == "keyword":
            return self.module.run(mini_batch, mini_batch_context=context)
        return self.module.run(mini_batch)

    def _error_text(self, exc: BaseException) -> str:
        text = _user_traceback(exc)
        if self.copy_dir:  # the user's own paths, not this worker's copy of them
            text = text.replace(self.code_copy, os.path.normpath(self.plan.code))
        return redact(text, self.plan.storage)

    def stop(self) -> Optional[str]:
        """Call the entry script's ``shutdown()``; returns its traceback if it raised."""
        try:
            return self._shutdown()
        finally:
            self.done.flush()  # the driver flushed before stopping; this only covers a bug there
            self._close_log()
            if self.entry_env is not None:
                self.entry_env.close()
            if self.ahead is not None:
                self.ahead.close()
            if self.reader is not None:
                self.reader.close()
            self._remove_copy()

    def _remove_copy(self) -> None:
        if self.copy_dir:
            shutil.rmtree(self.copy_dir, ignore_errors=True)
            self.copy_dir = None

    def _shutdown(self) -> Optional[str]:
        shutdown = getattr(self.module, "shutdown", None)
        if shutdown is None or not self.started:  # never after a failed init()
            return None
        try:
            shutdown()
            self._upload_outputs()
        except BaseException as exc:  # noqa: BLE001 - user code may raise anything, even SystemExit
            return self._error_text(exc)
        return None

    def _upload_outputs(self) -> None:
        for output in self.staged:
            output.upload_changes()


def _context_argument(run) -> Optional[str]:
    """How run() takes mini_batch_context: "positional", "keyword" (keyword-only), or None (as in Azure,
    run(mini_batch) alone does not get it)."""
    try:
        params = list(inspect.signature(run).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) >= 2:  # an optional second argument gets it only if it is named for it
        second = positional[1]
        return "positional" if second.default is second.empty or "context" in second.name else None
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return "positional"
    if any(p.kind is p.KEYWORD_ONLY and p.name == "mini_batch_context" for p in params):
        return "keyword"
    return None


class _Tee:
    """A text stream that writes to several streams (Ray's worker log and the job dir's)."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()

    def __getattr__(self, name):  # fileno, isatty, encoding...: the first stream's
        return getattr(self.streams[0], name)
