"""One driver session: claim the job dir, plan, run what is pending, assemble.

``run_job`` creates a job dir from a spec (or continues one that holds the
same spec); ``resume_job`` needs nothing but the job dir. Both end in
``_drive``, which is the only place that moves a job between states.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import shutil
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from raypar.credentials import describe_error, open_fs, options_for, redact, refused_credentials, resolve_storage
from raypar.engine import cluster, signals
from raypar.engine.console_relay import ConsoleRelay
from raypar.engine.planning import PlanFeed
from raypar.engine.progress import ProgressDisplay
from raypar.engine.ray_transport import Placement, RayTransport
from raypar.engine.replan import append_added, check_input_files, refuse_gone, replan
from raypar.engine.replan import names as replan_names
from raypar.engine.retry_items import plan_item_retries
from raypar.engine.scheduler import Progress, Scheduler
from raypar.engine.session_lease import Heartbeat, StopSignal, claim_lease
from raypar.engine.upkeep import (
    Compactor,
    Reporter,
    compact,
    final_view,
    give_memory_back,
    record_lost_session,
    record_session_time,
    write_session_reports,
)
from raypar.engine.worker_plan import worker_plan
from raypar.engine.worker_time import TimeSplit
from raypar.errors import CorruptPartsError, OutputSchemaError, RayparError, SpecError, StorageError, UsageError
from raypar.held_upload import look_at_bucket
from raypar.inputs import check_input, plan_batches
from raypar.inputs.base import ordinal_of
from raypar.inputs.source import open_source
from raypar.jobdir.layout import default_job_dir
from raypar.jobdir.ledger import Ledger, new_run_id
from raypar.jobdir.state import JobState
from raypar.outputs.assembly import assemble
from raypar.outputs.live import LiveAssembly
from raypar.polling import poll
from raypar.spec.binding import bind, fill_output_paths
from raypar.spec.loading import as_spec, changed_keys, relocate_code
from raypar.spec.models import JobSpec
from raypar.spec.runtime_env import ENVIRONMENT_WARNED, pip_packages, worker_runtime_env
from raypar.storage import is_url, normalize_path
from raypar.worker.actor import code_copies_dir

log = logging.getLogger("raypar")

Echo = Callable[[str], None]
Show = Callable[..., None]  # show(snapshot, final=False): where progress goes
MAX_ASSEMBLY_ROUNDS = 3


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
    # What this session's workers spent their time on (worker_time.TimeSplit.fields()); None: none started.
    worker_time: Optional[dict] = None

    @property
    def exit_code(self) -> int:
        return {JobState.SUCCEEDED: 0, JobState.CANCELED: 130}.get(self.state, 1)


@dataclass
class _Session:
    """What one driver session works with: the spec, the input description, credentials."""

    spec: JobSpec
    desc: dict
    storage: dict  # resolved credentials: memory only, never written
    runtime_env: Optional[dict] = None  # of the worker actors (resolved env vars: memory only)
    show: Optional[Show] = None
    retry_failed_items: bool = False  # raypar resume --retry-failed-items
    grow_input: bool = False  # the same spec run again: input files added since are planned too
    worker_time: TimeSplit = field(default_factory=TimeSplit)  # this session's, over its rounds

    def plan(self):
        return plan_batches(self.spec, self.desc, self.storage)


def check_files(spec: JobSpec) -> _Session:
    """Fail before anything is written when the code or the input is missing or unusable."""
    if is_url(spec.task.code):
        raise SpecError(f"task.code: {spec.task.code}: must be a local folder (workers import the entry script "
                        f"from the same path on every node)")
    entry = bind(spec).entry_script_path
    if not os.path.isfile(entry):
        raise SpecError(f"task.entry_script: {entry} not found")
    storage = resolve_storage(spec.raypar.storage_options)
    runtime_env = worker_runtime_env(spec)
    _check_output_bucket(spec, storage)
    return _Session(spec, check_input(spec, storage), storage, runtime_env)


def _check_output_bucket(spec: JobSpec, storage: dict) -> None:
    """An append_row_to file in a bucket or container that does not exist, or whose storage
    refuses the credentials, fails now, not after the last mini-batch (where its upload would be
    refused). Any other answer is not judged: a role may write objects without the right to look
    at their bucket, and the upload then says what is wrong."""
    target = bind(spec).append_row_path
    if not target or not is_url(target):
        return
    fs, path = open_fs(target, storage)
    try:
        look_at_bucket(fs, path)
    except FileNotFoundError:
        bucket = path.split("/", 1)[0]
        raise SpecError(f"task.append_row_to: {redact(target)}: the bucket or container {bucket!r} "
                        f"does not exist") from None
    except Exception as exc:  # noqa: BLE001 - judged below
        if refused_credentials(exc):
            raise StorageError(f"task.append_row_to: {redact(target)}: cannot access "
                               f"({describe_error(exc, storage)})") from None
        log.debug("raypar: could not look at the bucket of %s: %s", redact(target), exc)


def _primed(batches):
    """The planner with its first batch already computed: an input that cannot be read
    fails here, before the job dir exists."""
    first = next(batches, None)
    if first is None:
        return iter(())
    return itertools.chain([first], batches)


def run_job(spec, job_dir: Optional[str] = None, address: Optional[str] = None,
            echo: Echo = print, progress: Optional[Show] = None, code_dir: Optional[str] = None) -> Outcome:
    """Run a spec. A job dir that already holds this same spec is resumed, not restarted.

    Args:
        spec: a path to the YAML, a dict in the YAML's shape, or a JobSpec.
        job_dir: where the ledger lives (local path or fsspec URL); default
            ``./raypar-jobs/<name>-<time>-<id>``.
        address: a Ray cluster address; default ``RAY_ADDRESS`` or an
            embedded local Ray bound to 127.0.0.1.
        echo: where messages go.
        progress: ``progress(snapshot, final=False)`` gets progress snapshots
            (default: plain lines through ``echo`` every few seconds).
        code_dir: where ``task.code`` is in this process (a submitted job runs
            Ray's copy of it); the job dir keeps the spec as given.
    """
    spec = as_spec(spec)
    job_dir = normalize_path(job_dir) if job_dir else default_job_dir(spec.name)
    spec = fill_output_paths(spec, f"{job_dir}/outputs")
    session = _open_session(spec, code_dir, echo, progress)
    ledger = Ledger(job_dir, options_for(job_dir, session.storage))
    if ledger.exists():
        frozen = _with_todays_defaults(ledger.load_job()["spec"])
        if frozen != spec.to_dict():
            changed = ", ".join(changed_keys(frozen, spec.to_dict())[:3])
            raise UsageError(f"{job_dir}: holds a different job (changed: {changed}); use a new --job-dir, "
                             f"or `raypar resume {job_dir}`")
        announce = f"raypar: {job_dir} already holds this job: resuming it"
        session.grow_input = True
        planned = None
    else:
        planned = _primed(session.plan())
        ledger.create(spec.to_dict(), spec.to_yaml())
        announce = f"raypar: job dir {job_dir}"
    return _drive(ledger, session, address, echo, announce, planned)


def resume_job(job_dir: str, address: Optional[str] = None, echo: Echo = print,
               progress: Optional[Show] = None, code_dir: Optional[str] = None,
               retry_failed_items: bool = False) -> Outcome:
    """Run exactly the mini-batches of ``job_dir`` that are not done, then assemble.

    ``retry_failed_items``: also run again the items run() reported failed in done batches
    (raypar/engine/retry_items.py). ``echo``, ``progress`` and ``code_dir`` are as for :func:`run_job`.
    """
    job_dir = normalize_path(job_dir)
    ledger = Ledger(job_dir, options_for(job_dir, resolve_storage({})))
    spec = JobSpec.model_validate(ledger.load_job()["spec"])
    session = _open_session(spec, code_dir, echo, progress)
    session.retry_failed_items = retry_failed_items
    ledger = Ledger(job_dir, options_for(job_dir, session.storage))
    return _drive(ledger, session, address, echo, f"raypar: resuming {job_dir}")


def _with_todays_defaults(frozen: dict) -> dict:
    """A frozen spec with this raypar's defaults for keys added since it was written, so that
    running the same spec again after an upgrade resumes the job instead of refusing it."""
    try:
        return as_spec(frozen).to_dict()
    except SpecError:
        return frozen  # the comparison names what differs


def _open_session(spec: JobSpec, code_dir: Optional[str], echo: Echo, progress: Optional[Show]) -> _Session:
    """Check the spec's files, with task.code where this process has it; say what of its environment is unused."""
    session = check_files(relocate_code(spec, code_dir) if code_dir else spec)
    _, warning = pip_packages(session.spec)
    if warning and not os.environ.get(ENVIRONMENT_WARNED):  # a submitter already said it
        echo(f"raypar: warning: {warning}")
    session.show = progress or ProgressDisplay(echo=echo).update
    return session


def cancel_job(job_dir: str, wait: float = 60.0, echo: Echo = print) -> JobState:
    """Stop the job in ``job_dir`` and wait (bounded) until its driver has stopped.

    A live driver is asked through the job dir and stops within about a
    second; a job whose driver is gone is marked ``canceled`` directly.
    """
    job_dir = normalize_path(job_dir)
    ledger = Ledger(job_dir, options_for(job_dir, resolve_storage({})))
    job = ledger.load_job()
    lease = ledger.lease.read()
    if not ledger.lease.is_live(lease):
        state = JobState(ledger.read_state()["state"])
        if state.is_terminal():
            echo(f"raypar: nothing to cancel: the job is {state.value}")
            return state
        run = new_run_id()
        # Another host's silent lease is taken only after a TTL without a sign of life.
        claim_lease(ledger, run, echo, JobSpec.model_validate(job["spec"]).raypar.lease_ttl)
        try:
            _set_state(ledger, JobState.CANCELED, run, "canceled by `raypar cancel` (no driver was running)")
        finally:
            ledger.lease.release(run)
        echo(f"raypar: canceled (no driver was running); continue it with: raypar resume {ledger.url}")
        return JobState.CANCELED
    ledger.request_cancel(lease["run"])

    def ended() -> Optional[JobState]:  # the state the driver of that run wrote as it stopped
        saved = ledger.read_state()
        if saved.get("run") == lease["run"] and JobState(saved["state"]).is_terminal():
            return JobState(saved["state"])
        return None

    state = poll(ended, wait, 0.2)
    if state is not None:
        echo(f"raypar: job {state.value}; continue it with: raypar resume {ledger.url}")
        return state
    raise RayparError(f"{ledger.url}: cancel requested, but the driver (pid {lease.get('pid')} on "
                      f"{lease.get('host')}) has not stopped within {wait:.0f}s")


def _drive(ledger: Ledger, session: _Session, address: Optional[str], echo: Echo, announce: str,
           planned=None) -> Outcome:
    spec = session.spec
    run = new_run_id()
    signals.forget()
    session.worker_time = TimeSplit()
    ttl = spec.raypar.lease_ttl
    claim_lease(ledger, run, echo, ttl)
    ledger.upgrade_format()  # an older raypar refuses the job dir from now on
    record_lost_session(ledger)
    echo(announce)
    beat = Heartbeat(ledger, run, ttl)
    beat.start()
    state, reason, detail = JobState.FAILED, "", ""
    manifest = view = feed = None
    try:
        # A job whose last session succeeded has its output: a resume with nothing to run keeps it.
        assembled = ledger.read_state()["state"] == JobState.SUCCEEDED.value
        _set_state(ledger, JobState.RUNNING, run)
        _make_output_folders(spec)
        manifest = ledger.read_manifest()
        if manifest is not None:
            manifest = _replan_changed_inputs(ledger, session, manifest, echo)
        if manifest is not None and session.retry_failed_items:
            manifest = _retry_failed_items(ledger, manifest, echo)
        if manifest is None:  # planning never finished: plan (again) while running
            prefix = ledger.read_manifest_prefix()
            done = ledger.view(prefix, lean=True, failed=False).done if len(prefix) else frozenset()
            feed = PlanFeed(ledger, planned if planned is not None else session.plan(), done, prefix,
                            first_release=spec.resources.instance_count * spec.max_concurrency_per_instance)
            feed.start()
        stop = StopSignal(ledger, run, beat)
        reason, detail, view = _run_and_assemble(ledger, session, run, manifest, feed, address, echo, stop,
                                                 assembled)
        if not beat.held():  # lost while assembling: the output is whole, but this session is not the holder
            reason = reason or beat.lost
        state = JobState.CANCELED if stop.canceled else JobState.FAILED if reason else JobState.SUCCEEDED
        failed = view.failed_ordinals() if view is not None else ()  # (not a million batch IDs to count them)
        if len(failed) and not reason:
            echo(f"raypar: {len(failed)} mini-batch(es) failed and were skipped (thresholds allow it); "
                 f"`raypar resume {ledger.url}` retries them")
    except KeyboardInterrupt as exc:
        # Workers are gone with the scheduler; finished batches are in the ledger.
        state, reason = JobState.CANCELED, signals.interrupt_reason(exc)
    except RayparError as exc:  # a placement error, an input file gone: named, as the CLI prints it
        state, reason = JobState.FAILED, exc.headline
        raise
    except BaseException as exc:
        state, reason = JobState.FAILED, f"driver error: {redact(str(exc), session.storage)}"
        raise
    finally:
        if feed is not None:
            feed.stop()
        # The assembly's view, when it holds every record, is the final one: the workers are gone,
        # and nothing but compaction (which changes no outcome) writes after it.
        view = view if view is not None and not view.lean else None
        counts = None
        try:
            if beat.held():  # only the lease holder may write; the heartbeat goes on meanwhile
                _set_state(ledger, state, run, redact(reason if not detail else f"{reason}\n{detail}",
                                                      session.storage))
                view = view or final_view(ledger)
                record_session_time(ledger, run, state, session.worker_time)
                write_session_reports(ledger, spec, state, reason, view, session.worker_time)
                counts, view = view.counts(), None  # not held while compaction reads (a million records)
                compact(ledger, run, beat.held, session_over=True)
        finally:
            beat.stopped.set()
            beat.join(timeout=5)
            if beat.held():
                ledger.lease.release(run)
    counts = counts or (view or final_view(ledger)).counts()
    spent = session.worker_time
    if spent.workers:
        echo(f"raypar: worker time {spent.describe()}")
    return Outcome(state=state, job_dir=ledger.url, output=bind(spec).append_row_path, reason=reason,
                   worker_time=spent.fields() if spent.workers else None, **counts)


def _retry_failed_items(ledger: Ledger, manifest, echo: Echo):
    """The manifest after planning again the items run() reported failed (--retry-failed-items)."""
    batches, items = plan_item_retries(ledger, manifest)
    if not batches:
        echo("raypar: no item was reported failed in a done mini-batch: nothing to retry item by item")
        return manifest
    echo(f"raypar: {items} item(s) reported failed in {batches} done mini-batch(es) run again "
         f"(their rows follow their batch's in the output)")
    return ledger.read_manifest()


def _replan_changed_inputs(ledger: Ledger, session: _Session, manifest, echo: Echo):
    """The manifest after planning again the batches of input files that changed since they were
    planned (see raypar/engine/replan.py); SpecError if a planned file is gone."""
    spec = session.spec
    changes = check_input_files(ledger, spec, session.desc, session.storage)
    if changes is None:
        return manifest
    source = open_source(session.desc, session.storage)
    grow = session.grow_input and not spec.partition_keys
    if changes.added and not grow:
        how = "partitioned jobs plan their combinations once: run them as a new job" if spec.partition_keys \
            else f"run the same spec again (raypar run SPEC --job-dir {ledger.url}) to add them"
        echo(f"raypar: {len(changes.added)} input file(s) added after this job was planned are not part of it "
             f"({replan_names(changes.added, source)}); {how}")
    if changes:
        refuse_gone(changes, source, f"inputs.{spec.data_input_name}")
        retired = replan(ledger, spec, session.desc, session.storage, manifest, changes)
        echo(f"raypar: {len(changes.changed)} input file(s) changed since they were planned "
             f"({replan_names(changes.changed, source)}): their {retired} mini-batch(es) are planned again "
             f"from the new content")
        manifest = ledger.read_manifest()
    if changes.added and grow:
        added, batches = append_added(ledger, spec, session.desc, session.storage, manifest, changes)
        if added:
            echo(f"raypar: {len(added)} input file(s) added since the job was planned "
                 f"({replan_names(added, source)}): {batches} new mini-batch(es), after the others")
        manifest = ledger.read_manifest()
    return manifest


def _run_and_assemble(ledger, session, run, manifest, feed, address, echo, interrupt, assembled=False):
    """Run what is pending, then assemble; batches whose parts fail verification run again.
    ``assembled``: the last session succeeded, so its output holds every done batch's rows;
    with nothing to run, that output is kept as it is (unless it was removed)."""
    spec = session.spec
    target = bind(spec).append_row_path
    # Lean: which batches are done, not where their rows are (a bit per batch, see DoneSet). No
    # failed records: what runs is every batch not done, and a failed batch is one of them (the
    # view that reports failures is read after the run, or is this one when nothing is pending,
    # and then no batch is failed).
    view = ledger.view(manifest, lean=True, failed=False) if manifest is not None else None
    live = None  # the output written while the batches run (outputs/live.py)
    voided: dict[str, int] = {}  # batch -> the attempt whose rows failed verification this session
    try:
        for _ in range(MAX_ASSEMBLY_ROUNDS):
            # After a round whose rows failed verification, only those batches run again (not those
            # that failed for good: their tries are spent for this session).
            among = np.array([ordinal_of(b) for b in voided], dtype=np.int64) if voided else None
            pending = view.pending(among) if view is not None else []
            give_memory_back()  # what reading the records and queuing took, before the run's own memory
            if pending or feed is not None:
                assembled = False  # this session adds rows: the output is written again
                total = len(manifest) if manifest is not None else "?"
                echo(f"raypar: {len(pending)} of {total} mini-batch(es) to run" if feed is None
                     else "raypar: planning mini-batches while running them")
                before = view if view is not None else ledger.view(feed.prefix, lean=True, failed=False)
                live = _live_assembly(ledger, session, target, before)
                reason, detail = _execute(ledger, session, run, before, pending, address, echo, interrupt, feed,
                                          live, attempts_before=voided)
                if feed is not None:
                    feed.join()
                    manifest, feed = ledger.read_manifest(), None
                    if manifest is not None and not reason:
                        echo(f"raypar: planned {len(manifest)} mini-batch(es)")
                view = ledger.view(manifest, lean=not target) if manifest is not None else None
                if reason:
                    return reason, detail, view
                if manifest is None:
                    return "planning did not finish", "", view  # (a planning error is the scheduler's reason)
            if not target:
                return "", "", view
            if assembled and _exists(target, session.storage):
                echo(f"raypar: nothing to run; {target} is the last session's, kept as it is")
                return "", "", view
            if view.lean:
                view = ledger.view(manifest)  # the records: where each batch's rows are
            if live is not None:
                written, live = live.finish(view), None
                if written is not None:
                    return "", "", view
            try:
                assemble(ledger, view, target, spec.raypar.append_row_format, options_for(target, session.storage))
                return "", "", view
            except OutputSchemaError as exc:  # rows of different batches cannot form one table
                return f"append_row_to: {exc}", "", view
            except CorruptPartsError as exc:
                for record in exc.records:
                    ledger.void(record, "output part does not match its checksum")
                echo(f"raypar: {len(exc.records)} output part(s) failed verification; running those batches again")
                view = ledger.view(manifest, lean=True)
                voided.update(_last_attempts(view, run, exc.records))
        return "output parts keep failing verification (storage corrupting data?)", "", view
    finally:
        if live is not None:  # no output this session: its temporary file goes
            live.abandon()


def _last_attempts(view, run: str, records) -> dict[str, int]:
    """The highest try number each batch of ``records`` had in this session, done or failed: its
    rerun takes the next one, as a (run, try) names one record (a void marker voids that one)."""
    last = {}
    for record in records:
        tries = [r.attempt for r in view.failed.get(record.batch, []) if r.run == run]
        last[record.batch] = max([record.attempt if record.run == run else 0, *tries])
    return last


def _live_assembly(ledger, session, target, before) -> Optional[LiveAssembly]:
    """A LiveAssembly for the session, or None. A resume's (batches done before it) reads where their
    rows are itself, in the output order its manifest gives. A resume whose first session never
    finished planning starts from the chunks it wrote (``before.manifest``): only their batches
    can be done, in ordinal order (a revision needs a whole plan)."""
    spec = session.spec
    if not target or not spec.raypar.assemble_while_running:
        return None
    order = getattr(before.manifest, "output_order", None)
    return LiveAssembly(ledger, target, spec.raypar.append_row_format, options_for(target, session.storage),
                        resumed=before.manifest if len(before.done) else None, order=order() if order else None)


def _exists(target: str, storage: dict) -> bool:
    try:
        fs, path = open_fs(target, storage)
        return fs.exists(path)
    except Exception:  # noqa: BLE001 - cannot tell: assemble again, which is always right
        return False


def _set_state(ledger: Ledger, new: JobState, run: str, reason: str = "") -> None:
    JobState(ledger.read_state()["state"]).check_transition(new)
    ledger.write_state(new, run, reason)


def _make_output_folders(spec: JobSpec) -> None:
    """Folder outputs exist before init() runs, as Azure's mounted outputs do."""
    for output in spec.outputs.values():
        if output.type in ("uri_folder", "mltable") and output.path and not is_url(output.path):
            os.makedirs(output.path, exist_ok=True)


def _execute(ledger, session, run, view, pending, address, echo, interrupt, feed=None, live=None,
             attempts_before: Optional[dict[str, int]] = None) -> tuple[str, str]:
    """Run the pending batches on Ray; returns (stop reason, detail), empty when all ran."""

    spec = session.spec
    logs = ledger.store.local_path("logs")  # worker logs the driver can tail, or None (object stores)
    owned = cluster.connect(address, min_cpus=cluster.cpus_for(spec), relay_output=logs is not None)
    relay = ConsoleRelay(logs, run, echo) if cluster.output_relayed() else None
    reporter = None
    try:
        total = len(view.manifest)
        progress = Progress(total=total, done=len(view.done), done_before=len(view.done))
        plan = worker_plan(spec, session.desc, session.storage)
        # Failed batches of earlier sessions run again now: only done batches' item failures carry over.
        progress.failed_items = progress.unreturned_items = view.done.failed_items()
        progress.planning = feed is not None
        reporter = Compactor(ledger, run, Reporter(session.show), may_write=interrupt.lease_held)
        interrupt.beat.progress = progress.for_status  # each lease renewal carries them for `raypar status`
        ledger.gather_failures(run)  # stored a segment at a time, not a file or object each
        placement = Placement(spec, ledger.url, run, owned_cluster=owned, plan=plan,
                              runtime_env=session.runtime_env, echo=echo)
        scheduler = Scheduler(ledger, spec, run, pending, RayTransport(placement), progress, reporter, interrupt,
                              feed, may_write=interrupt.lease_held, output=live, attempts_before=attempts_before)
        with relay or contextlib.nullcontext():  # drained after the scheduler stopped every worker
            try:
                reason = scheduler.run()
            finally:
                session.worker_time = session.worker_time.add(scheduler.worker_time.split(scheduler.clock()))
        reporter(progress, final=True)
        ledger.end_gathering_failures()
        return reason or "", scheduler.stop_detail
    finally:
        if reporter is not None:
            reporter.join()  # a compaction still running: the session's last one comes after it
        with contextlib.suppress(Exception):  # after an error: what can still be stored
            ledger.end_gathering_failures()
        # Copies of the code folder left by workers that were killed, not stopped (this node's only)
        shutil.rmtree(code_copies_dir(run), ignore_errors=True)
        if owned:
            cluster.disconnect()
