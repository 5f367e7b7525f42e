"""One driver session: claim the job dir, plan, run what is pending, assemble.

``run_job`` creates a job dir from a spec (or continues one that holds the
same spec); ``resume_job`` needs nothing but the job dir. Both end in
``_drive``, which is the only place that moves a job between states.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

from .errors import LeaseHeldError, PlacementError, RayparError, SpecError, UsageError
from .inputs import check_input, plan_batches
from .ledger import LEASE_TTL, Ledger, new_run_id
from .outputs import CorruptPartsError, assemble
from .reports import write_reports
from .spec import JobSpec, bind, fill_output_paths, is_url, load_spec, spec_from_dict
from .state import JobState

log = logging.getLogger("raypar")

Echo = Callable[[str], None]
MAX_ASSEMBLY_ROUNDS = 3
COMPACT_EVERY = 50_000


@dataclass
class Outcome:
    """How a driver session ended; ``exit_code`` follows the CLI's convention."""

    state: JobState
    job_dir: str
    total: int
    completed: int
    failed: int
    pending: int
    output: Optional[str]
    reason: str = ""

    @property
    def exit_code(self) -> int:
        return {JobState.SUCCEEDED: 0, JobState.CANCELED: 130}.get(self.state, 1)


def default_job_dir(spec: JobSpec) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = (spec.name or "job").replace("/", "-")
    return str(Path("raypar-jobs", f"{name}-{stamp}-{uuid.uuid4().hex[:4]}").resolve())


def _as_spec(spec: Union[str, os.PathLike, dict, JobSpec]) -> JobSpec:
    if isinstance(spec, JobSpec):
        return spec
    if isinstance(spec, dict):
        return spec_from_dict(spec)
    return load_spec(spec)


def _normalize_dir(job_dir: str) -> str:
    return job_dir if is_url(job_dir) else str(Path(job_dir).expanduser().resolve())


def check_files(spec: JobSpec) -> None:
    """Fail before anything is written when the code or the input is missing or unusable."""
    entry = bind(spec).entry_script_path
    if not is_url(entry) and not os.path.isfile(entry):
        raise SpecError(f"task.entry_script: {entry} not found")
    check_input(spec)


def run_job(spec, job_dir: Optional[str] = None, address: Optional[str] = None,
            echo: Echo = print) -> Outcome:
    """Run a spec. A job dir that already holds this same spec is resumed, not restarted.

    Args:
        spec: a path to the YAML, a dict in the YAML's shape, or a JobSpec.
        job_dir: where the ledger lives (local path or fsspec URL); default
            ``./raypar-jobs/<name>-<time>-<id>``.
        address: a Ray cluster address; default ``RAY_ADDRESS`` or an
            embedded local Ray bound to 127.0.0.1.
        echo: where progress lines go.
    """
    spec = _as_spec(spec)
    job_dir = _normalize_dir(job_dir) if job_dir else default_job_dir(spec)
    spec = fill_output_paths(spec, f"{job_dir}/outputs")
    check_files(spec)
    ledger = Ledger(job_dir)
    if ledger.exists():
        frozen = ledger.load_job()["spec"]
        if frozen != spec.to_dict():
            raise UsageError(f"{job_dir}: holds a different job; use a new --job-dir, or `raypar resume {job_dir}`")
        announce = f"raypar: {job_dir} already holds this job: resuming it"
        planned = None
    else:
        planned = list(plan_batches(spec))  # before anything is written: a listing error leaves no job dir
        ledger.create(spec.to_dict(), spec.to_yaml())
        announce = f"raypar: job dir {job_dir}"
    return _drive(ledger, spec, address, echo, announce, planned)


def resume_job(job_dir: str, address: Optional[str] = None, echo: Echo = print) -> Outcome:
    """Run exactly the mini-batches of ``job_dir`` that are not done, then assemble."""
    job_dir = _normalize_dir(job_dir)
    ledger = Ledger(job_dir)
    spec = JobSpec.model_validate(ledger.load_job()["spec"])
    check_files(spec)
    return _drive(ledger, spec, address, echo, f"raypar: resuming {job_dir}")


def cancel_job(job_dir: str, wait: float = 30.0, echo: Echo = print) -> JobState:
    """Stop the job in ``job_dir`` and wait (bounded) until its driver has stopped.

    A live driver is asked through the job dir and stops within about a
    second; a job whose driver is gone is marked ``canceled`` directly.
    """
    ledger = Ledger(_normalize_dir(job_dir))
    ledger.load_job()
    lease = ledger.read_lease()
    if not ledger.lease_is_live(lease):
        state = JobState(ledger.read_state()["state"])
        if state.is_terminal():
            echo(f"raypar: nothing to cancel: the job is {state.value}")
            return state
        run = new_run_id()
        ledger.acquire_lease(run)
        try:
            _set_state(ledger, JobState.CANCELED, run, "canceled by `raypar cancel` (no driver was running)")
        finally:
            ledger.release_lease(run)
        echo(f"raypar: canceled (no driver was running); continue it with: raypar resume {ledger.url}")
        return JobState.CANCELED
    ledger.request_cancel(lease["run"])
    deadline = time.time() + wait
    while time.time() < deadline:
        saved = ledger.read_state()
        if saved.get("run") == lease["run"] and JobState(saved["state"]).is_terminal():
            echo(f"raypar: job {saved['state']}; continue it with: raypar resume {ledger.url}")
            return JobState(saved["state"])
        time.sleep(0.2)
    raise RayparError(f"{ledger.url}: cancel requested, but the driver (pid {lease.get('pid')} on "
                      f"{lease.get('host')}) has not stopped within {wait:.0f}s")


class _Heartbeat(threading.Thread):
    """Keeps the lease fresh while the driver lives; notices when it was taken over."""

    def __init__(self, ledger: Ledger, run: str):
        super().__init__(daemon=True, name="raypar-lease")
        self.ledger, self.run_id, self.stopped = ledger, run, threading.Event()
        self.lost: Optional[str] = None

    def run(self) -> None:
        while not self.stopped.wait(LEASE_TTL / 3):
            try:
                self.ledger.heartbeat(self.run_id)
            except LeaseHeldError as exc:
                self.lost = exc.headline  # another driver owns the job now: stop ours
                return
            except Exception as exc:  # storage hiccup: try again next beat
                log.warning("lease heartbeat failed: %s", exc)


def _drive(ledger: Ledger, spec: JobSpec, address: Optional[str], echo: Echo, announce: str,
           planned: Optional[list] = None) -> Outcome:
    run = new_run_id()
    ledger.acquire_lease(run)
    echo(announce)
    beat = _Heartbeat(ledger, run)
    beat.start()
    state, reason, detail = JobState.FAILED, "", ""
    manifest = view = None
    try:
        _set_state(ledger, JobState.RUNNING, run)
        _make_output_folders(spec)
        manifest = ledger.read_manifest()
        if manifest is None:
            manifest = planned if planned is not None else list(plan_batches(spec))
            ledger.write_manifest(manifest)
            echo(f"raypar: planned {len(manifest)} mini-batch(es)")
        view = ledger.view(manifest)
        stop = _StopSignal(ledger, run, beat)
        reason, detail, view = _run_and_assemble(ledger, spec, run, manifest, view, address, echo, stop)
        state = JobState.CANCELED if stop.canceled else JobState.FAILED if reason else JobState.SUCCEEDED
        failed = view.failed_batches()
        if failed and not reason:
            echo(f"raypar: {len(failed)} mini-batch(es) failed and were skipped (thresholds allow it); "
                 f"`raypar resume {ledger.url}` retries them")
    except KeyboardInterrupt:
        # Workers are gone with the scheduler; finished batches are in the ledger.
        state, reason = JobState.CANCELED, "interrupted (Ctrl-C)"
    except PlacementError as exc:
        state, reason = JobState.FAILED, exc.headline
        raise
    except BaseException as exc:
        state, reason = JobState.FAILED, f"driver error: {exc}"
        raise
    finally:
        beat.stopped.set()
        beat.join(timeout=5)
        if beat.lost is None:  # only the lease holder may write the state
            try:
                _set_state(ledger, state, run, reason if not detail else f"{reason}\n{detail}")
                _compact(ledger, run)
                _write_reports(ledger, spec, state, reason)
            finally:
                ledger.release_lease(run)
    if state is JobState.CANCELED or view is None:  # stopped part-way: count what the ledger holds
        view = ledger.view(manifest)
    return Outcome(state=state, job_dir=ledger.url, output=bind(spec).append_row_path, reason=reason,
                   **view.counts())


def _run_and_assemble(ledger, spec, run, manifest, view, address, echo, interrupt):
    """Run what is pending, then assemble; batches whose parts fail verification run again."""
    target = bind(spec).append_row_path
    for _ in range(MAX_ASSEMBLY_ROUNDS):
        pending = view.pending()
        if pending:
            echo(f"raypar: {len(pending)} of {len(manifest)} mini-batch(es) to run")
            reason, detail = _execute(ledger, spec, run, view, pending, address, echo, interrupt)
            view = ledger.view(manifest)
            if reason:
                return reason, detail, view
        if not target:
            return "", "", view
        try:
            assemble(ledger, view, target, spec.raypar.append_row_format)
            return "", "", view
        except CorruptPartsError as exc:
            for record in exc.records:
                ledger.void(record, "output part does not match its sha256")
            echo(f"raypar: {len(exc.records)} output part(s) failed verification; running those batches again")
            view = ledger.view(manifest)
    return "output parts keep failing verification (storage corrupting data?)", "", view


class _StopSignal:
    """Why the driver must stop now: its lease was taken over, or `raypar cancel` asked."""

    def __init__(self, ledger: Ledger, run: str, beat: _Heartbeat, every: float = 0.5):
        self.ledger, self.run_id, self.beat, self.every = ledger, run, beat, every
        self.canceled, self.checked = False, 0.0

    def __call__(self) -> Optional[str]:
        if self.beat.lost:
            return self.beat.lost
        now = time.time()
        if not self.canceled and now - self.checked >= self.every:  # one cheap look per interval
            self.checked = now
            self.canceled = self.ledger.cancel_requested(self.run_id)
        return "canceled by `raypar cancel`" if self.canceled else None


def _compact(ledger: Ledger, run: str) -> None:
    """The next resume reads one file instead of every record; never fail a job over it."""
    try:
        ledger.compact(run)
    except Exception as exc:
        log.warning("could not compact the ledger: %s", exc)


def _write_reports(ledger: Ledger, spec: JobSpec, state: JobState, reason: str) -> None:
    """Reports are a convenience derived from the ledger: never let them fail a job."""
    try:
        write_reports(ledger, ledger.view(), state.value, reason, bind(spec).append_row_path)
    except Exception as exc:
        log.warning("could not write reports: %s", exc)


def _set_state(ledger: Ledger, new: JobState, run: str, reason: str = "") -> None:
    JobState(ledger.read_state()["state"]).check_transition(new)
    ledger.write_state(new, run, reason)


def _make_output_folders(spec: JobSpec) -> None:
    """Folder outputs exist before init() runs, as Azure's mounted outputs do."""
    for output in spec.outputs.values():
        if output.type in ("uri_folder", "mltable") and output.path and not is_url(output.path):
            os.makedirs(output.path, exist_ok=True)


def _execute(ledger, spec, run, view, pending, address, echo, interrupt) -> tuple[str, str]:
    """Run the pending batches on Ray; returns (stop reason, detail), empty when all ran."""
    from . import cluster
    from .scheduler import Placement, Progress, Scheduler

    w = spec.raypar.worker
    owned = cluster.connect(address, min_cpus=w.num_cpus * spec.max_concurrency_per_instance)
    try:
        total = len(view.manifest)
        progress = Progress(total=total, done=len(view.done), done_before=len(view.done))
        # Failed batches of earlier sessions run again now: only done batches' item failures carry over.
        progress.failed_items = view.done.failed_items()
        reporter = _Compactor(ledger, run, _Reporter(echo))
        placement = Placement(spec, ledger.url, run, owned_cluster=owned)
        scheduler = Scheduler(ledger, spec, run, pending, placement, progress, reporter, interrupt)
        reason = scheduler.run()
        reporter(progress, final=True)
        return reason or "", scheduler.stop_detail
    finally:
        if owned:
            cluster.disconnect()


class _Compactor:
    """Folds done records into a compact file every COMPACT_EVERY batches, so a resume after a
    crash reads at most that many records one by one (see Ledger.compact)."""

    def __init__(self, ledger: Ledger, run: str, then: Callable):
        self.ledger, self.run_id, self.then, self.at = ledger, run, then, None

    def __call__(self, p, final: bool = False) -> None:
        if self.at is None:
            self.at = p.done
        if p.done - self.at >= COMPACT_EVERY:
            _compact(self.ledger, self.run_id)
            self.at = p.done
        self.then(p, final=final)


class _Reporter:
    """Plain progress lines, at most every few seconds."""

    def __init__(self, echo: Echo, every: float = 5.0):
        self.echo, self.every, self.last = echo, every, time.time()

    def __call__(self, p, final: bool = False) -> None:
        now = time.time()
        if not final and now - self.last < self.every:
            return
        self.last = now
        self.echo(f"raypar: {p.done}/{p.total} done, {p.failed} failed ({p.rate(now):.1f} mini-batches/s)")
