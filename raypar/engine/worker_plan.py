"""The worker plan, built from a validated spec: what every worker of a session is told at start."""

from __future__ import annotations

import logging

from raypar.azureml.compat.models import model_mapping_env
from raypar.spec.binding import bind
from raypar.spec.models import JobSpec
from raypar.storage import is_url
from raypar.worker.plan import WorkerPlan

log = logging.getLogger("raypar")


def worker_plan(spec: JobSpec, input_desc: dict, storage: dict) -> WorkerPlan:
    """What each worker is told at start (see raypar/worker/plan.py), once per session."""
    bound = bind(spec)
    note = spec.program_arguments_note()
    if note:  # here, not per worker: the driver calls this once as the workers start
        log.warning(note)
    return WorkerPlan(
        code=spec.task.code,
        entry_script=spec.task.entry_script,
        entry_path=bound.entry_script_path,
        argv=bound.argv,
        # RAYPAR_MODELS (raypar.models over the driver's RAYPAR_MODELS) for azureml.core's Model.get_model_path
        env={**model_mapping_env(spec.raypar.models), **spec.environment_variables},
        logging_level=spec.logging_level,
        with_rows=bound.append_row_path is not None,
        append_row_format=spec.raypar.append_row_format,
        profiling_module=spec.predefined_arguments().profiling_module,  # --profiling_module: profile each run()
        input={**input_desc, "batch_format": spec.raypar.batch_format},  # table batches as pandas or pyarrow
        storage=storage,
        ledger=spec.raypar.ledger.plan(),
        mount_cache_bytes=spec.raypar.mount_cache.max_bytes(),
        prefetch=spec.raypar.prefetch,
        # Remote folder outputs the entry script writes as local folders (see staging.py).
        staged_outputs=[o.path.rstrip("/") for o in spec.outputs.values()
                        if o.path and is_url(o.path) and o.type != "uri_file" and o.mode != "direct"],
    )
