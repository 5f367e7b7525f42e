"""What a worker is told at start: the one contract between the driver and its workers.

Plain values only (strings, lists, dicts of JSON values): a worker never imports the pydantic
spec, and a plan crosses to the worker as Ray pickles the actor's arguments. ``storage`` holds
resolved credentials, so a plan lives in memory only and is never written to the job dir.
Built by the engine (raypar/engine/worker_plan.py) from the validated spec.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass(frozen=True)
class WorkerPlan:
    code: str  # task.code: the folder the entry script lives in (copied per worker when small)
    entry_script: str  # task.entry_script, as the spec names it
    entry_path: str  # the entry script's absolute path inside ``code``
    argv: list[str]  # sys.argv of the entry script: the script, then program_arguments bound
    env: dict[str, str]  # environment_variables and RAYPAR_MODELS, set before the script is imported
    logging_level: str  # task's logging_level: the level of the script's root logger
    with_rows: bool  # append_row_to is set: run()'s rows are kept, not only counted
    append_row_format: str  # text (Azure's), csv, jsonl or parquet
    input: dict[str, Any]  # the input's description (raypar.inputs.check_input), no secrets
    storage: dict[str, dict]  # resolved credentials per protocol: memory only
    ledger: Optional[dict] = None  # raypar.ledger flush settings (object-store job dirs)
    profiling_module: Optional[str] = None  # Azure's --profiling_module: profile each run()
    staged_outputs: list[str] = field(default_factory=list)  # remote folder outputs written locally
    prefetch: int = 1  # raypar.prefetch: how many queued batches the driver has this worker read ahead
    mount_cache_bytes: Optional[int] = None  # raypar.mount_cache.max_size: the ro_mount cache's limit
