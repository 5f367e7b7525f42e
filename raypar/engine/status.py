"""What a job dir says about its job: state and mini-batch counts (no Ray needed)."""

from __future__ import annotations

from typing import Optional

from raypar.credentials import resolve_storage
from raypar.engine.replan import check_input_files
from raypar.engine.worker_time import job_total
from raypar.errors import RayparError
from raypar.inputs import check_input
from raypar.inputs.base import batch_id
from raypar.jobdir.layout import REPORT_HTML as REPORT
from raypar.jobdir.ledger import Ledger
from raypar.jobdir.state import JobState
from raypar.spec.binding import bind
from raypar.spec.models import JobSpec


def job_status(job_dir: str, errors: int = 3, exact: bool = False) -> dict:
    """State, counts of mini-batches, output path and the first errors of ``job_dir``.

    ``state`` is ``interrupted`` when the last driver said "running" but no
    live driver holds the lease any more (it was killed): resume it.

    While a driver runs the job, the counts are that driver's, as its lease's last heartbeat
    carried them (``counted_by: "driver"``, ``counted_at``: its wall clock): one small read however
    large the job. ``exact`` (or no live driver) counts from the ledger: what is stored
    (``counted_by: "ledger"``), which on an object store lists every worker's open folder.
    """
    ledger = Ledger(job_dir)
    job = ledger.load_job()
    spec = JobSpec.model_validate(job["spec"])
    saved = ledger.read_state()
    state = JobState(saved["state"])
    lease = ledger.lease.read()
    driver_alive = ledger.lease.is_live(lease)
    if saved.get("epoch", 0) < ledger.lease.current_epoch():  # written by a driver fenced off since
        state = JobState.RUNNING if driver_alive else JobState.INTERRUPTED
        saved["reason"] = "" if driver_alive else "the last state was written by a driver that had lost the lease"
    if state is JobState.RUNNING and not driver_alive:
        state = JobState.INTERRUPTED
    counted = (lease or {}).get("progress") if driver_alive and not exact else None
    try:
        counts = {**_driver_counts(counted, errors), "counted_at": lease.get("heartbeat")} if counted else None
    except (KeyError, TypeError, AttributeError):  # not as this raypar writes it: count what is stored
        counts = None
    counts = counts or _ledger_counts(ledger, errors)
    planned = counts["planning_complete"]
    return {
        "job_dir": ledger.url,
        "name": spec.name,
        "job_id": job["job_id"],
        "state": state.value,
        "reason": saved.get("reason") or "",
        **counts,
        "output": bind(spec).append_row_path,
        "driver": {k: v for k, v in lease.items() if k != "progress"} if driver_alive else None,
        "input_changes": _input_changes(ledger, spec) if planned and not driver_alive else None,
        "last_added": ledger.last_added() if planned else None,
        "report": _report_of(ledger, state),
        # The recorded sessions' worker time (a killed driver's from its last heartbeat), once none runs.
        "job_worker_time": None if driver_alive else job_total(ledger.worker_times()),
    }


def _ledger_counts(ledger: Ledger, errors: int) -> dict:
    """The counts of what the ledger holds: done and failed records stored."""
    manifest = ledger.read_manifest()
    planned = manifest is not None
    # Counts so far while planning; lean: which batches are done, not where their rows are.
    view = ledger.view(manifest if planned else ledger.read_manifest_prefix(), lean=True, errors_of=errors)
    last = view.failed.last_rows(view.failed_ordinals()[:errors]).to_pylist()
    return {**view.counts(), "planning_complete": planned, "failed_items": view.failed_items(),
            "unreturned_items": view.unreturned_items(), "counted_by": "ledger", "counted_at": None,
            "worker_time": None,  # only a running driver counts it (the last session's: job_result.txt)
            "errors": [{"batch": batch_id(r["ordinal"]), "kind": r["kind"], "error": r["error"]} for r in last]}


def _driver_counts(progress: dict, errors: int) -> dict:
    """The counts a running driver carried in its lease (Progress.for_status): its batches done
    include those not stored yet (a worker stores them within ``flush_seconds``)."""
    total, done, failed = progress["total"], progress["completed"], progress["failed"]
    return {"total": total, "completed": done, "failed": failed, "pending": max(total - done - failed, 0),
            "planning_complete": not progress["planning"], "failed_items": progress["failed_items"],
            "unreturned_items": progress["unreturned_items"], "counted_by": "driver",
            "errors": progress["errors"][:errors], "worker_time": progress.get("worker_time")}


def _report_of(ledger: Ledger, state: JobState) -> Optional[str]:
    """The HTML report a finished session wrote (see raypar/engine/report_html.py), if any."""
    if not state.is_terminal() and state is not JobState.INTERRUPTED:
        return None
    try:
        ledger.store.size(ledger.store.path("reports", REPORT))
    except FileNotFoundError:
        return None
    return f"{ledger.url}/reports/{REPORT}"


def _input_changes(ledger: Ledger, spec: JobSpec) -> Optional[dict]:
    """Input files that changed, are gone, or were added since planning (what a resume will do
    about them), or None when the job dir predates input versions. Never fails the status."""

    try:
        storage = resolve_storage(spec.raypar.storage_options)
        changes = check_input_files(ledger, spec, check_input(spec, storage), storage)
    except RayparError as exc:
        return {"error": exc.headline}
    except Exception as exc:  # noqa: BLE001 - storage, auth: named, the rest of the status stands
        return {"error": f"{type(exc).__name__}: {exc}"}
    if changes is None:
        return None
    return {"changed": changes.changed, "gone": changes.gone, "added": changes.added}


def failed_items_text(failed: int, unreturned: int) -> str:
    """Failed items, split as Azure counts them: items of failed mini-batches, and items of done
    mini-batches that run() returned no result for (a script that returns [] on purpose, such as
    many-models training, has every item counted here)."""
    if failed == 0:
        return "0 failed"
    if unreturned == failed:
        return f"{failed} failed, all of them not returned by run() of done mini-batches"
    return (f"{failed} failed: {failed - unreturned} in failed mini-batches, "
            f"{unreturned} not returned by run() of done ones")
