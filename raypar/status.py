"""What a job dir says about its job: state and mini-batch counts (no Ray needed)."""

from __future__ import annotations

from .ledger import Ledger
from .spec import JobSpec, bind
from .state import JobState


def job_status(job_dir: str, errors: int = 3) -> dict:
    """State, counts of mini-batches, output path and the last errors of ``job_dir``.

    ``state`` is ``interrupted`` when the last driver said "running" but no
    live driver holds the lease any more (it was killed): resume it.
    """
    ledger = Ledger(job_dir)
    job = ledger.load_job()
    spec = JobSpec.model_validate(job["spec"])
    saved = ledger.read_state()
    state = JobState(saved["state"])
    lease = ledger.read_lease()
    driver_alive = ledger.lease_is_live(lease)
    if state is JobState.RUNNING and not driver_alive:
        state = JobState.INTERRUPTED
    manifest = ledger.read_manifest()
    planned = manifest is not None
    view = ledger.view(manifest if planned else ledger.read_manifest_prefix())  # counts so far while planning
    last_errors = []
    for batch in sorted(view.failed_batches())[:errors]:
        record = view.failed[batch][-1]
        last_errors.append({"batch": batch, "kind": record.kind, "error": record.error})
    reason = saved.get("reason") or ""
    return {
        "job_dir": ledger.url,
        "name": spec.name,
        "job_id": job["job_id"],
        "state": state.value,
        "reason": reason,
        **view.counts(),
        "planning_complete": planned,
        "failed_items": view.failed_items(),
        "output": bind(spec).append_row_path,
        "driver": lease if driver_alive else None,
        "errors": last_errors,
    }
