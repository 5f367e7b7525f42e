"""The job spec: Azure ML CLI v2 ``type: parallel`` YAML as pydantic models.

Pure: nothing here touches storage or Ray. ``JobSpec`` validates a whole spec;
``BatchSize``/``parse_size``/``parse_bytes`` read Azure's size strings;
``BINDING_RE`` is the ``${{...}}`` expression every binding uses.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from raypar.azureml.compat.arguments import Predefined, ignored_note
from raypar.azureml.compat.arguments import parse as parse_predefined
from raypar.credentials import SECRET_WORDS, env_reference

# Azure's default file name inside a uri_folder output used by append_row_to.
APPEND_ROW_FILE_NAME = "parallel_run_step.txt"
DEFAULT_FILES_PER_BATCH = 10
DEFAULT_BYTES_PER_BATCH = 1024 * 1024

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmg]b)?\s*$", re.IGNORECASE)
_UNITS = {None: 1, "kb": 1024, "mb": 1024**2, "gb": 1024**3}
_BYTES_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([kmgt])i?)?b?\s*$", re.IGNORECASE)
BINDING_RE = re.compile(r"\$\{\{\s*([^}]*?)\s*\}\}")


@dataclass(frozen=True)
class BatchSize:
    """``mini_batch_size`` parsed: a file count, or a byte size for tables."""

    value: int
    is_bytes: bool


def parse_size(value: Union[int, str], field: str = "mini_batch_size") -> BatchSize:
    """Parse ``10``, ``"10"``, ``"10kb"``, ``"100 MB"`` (units are x1024, as in Azure)."""
    if isinstance(value, bool):
        raise ValueError(f"{field} must be a count or a size like '10kb', not {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"{field} must be at least 1, got {value}")
        return BatchSize(value, is_bytes=False)
    match = _SIZE_RE.match(str(value))
    if not match:
        raise ValueError(f"{field} {value!r} is not a count (e.g. '10') or a size (e.g. '10kb', '1mb', '1gb')")
    number, unit = int(match.group(1)), (match.group(2) or "").lower() or None
    if number < 1:
        raise ValueError(f"{field} must be at least 1, got {value!r}")
    return BatchSize(number * _UNITS[unit], is_bytes=unit is not None)


def parse_bytes(value: Union[int, str], field: str = "memory") -> int:
    """An amount of memory or data: bytes as an int, or a size as Azure and Kubernetes write one.

    ``"2gb"`` (Azure), ``"2Gi"`` / ``"512Mi"`` (Kubernetes), ``"2G"``, ``"1.5gb"``: every unit is
    a power of 1024, as ``mini_batch_size``'s are (a Kubernetes ``2G`` is 7% less: reserving
    the larger is the safe side).
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{field} must be a byte count or a size like '2gb' or '512Mi', not {value!r}")
    match = _BYTES_RE.match(str(value))
    if not match:
        raise ValueError(f"{field} {value!r} is not a size (e.g. '2gb', '512Mi', '1.5Gi' or a byte count)")
    amount = int(float(match.group(1)) * 1024 ** " kmgt".index((match.group(2) or " ").lower()))
    if amount < 1:
        raise ValueError(f"{field} must be at least 1 byte, got {value!r}")
    return amount


class _Model(BaseModel):
    # Unknown keys are errors: a typo must never be silently ignored.
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def _string_values(value):
    """Environment values are strings; YAML turns `OMP_NUM_THREADS: 1` into an int."""
    if isinstance(value, dict):
        return {k: v if isinstance(v, str) else str(v) for k, v in value.items()}
    return value


def _no_bool(value):
    """YAML `true` is not a number (pydantic would read it as 1)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {str(value).lower()}")
    return value


def _byte_sizes(*fields: str):
    """A validator: ``fields`` hold byte sizes as parse_bytes reads them (an int or "32mb"), or None."""
    def check(cls, value, info):
        if value is not None:
            parse_bytes(value, info.field_name)
        return value
    return field_validator(*fields)(classmethod(check))


class InputSpec(_Model):
    type: Literal["uri_folder", "uri_file", "mltable"]
    path: str
    mode: Literal["ro_mount", "download", "direct", "eval_mount", "eval_download"] = "ro_mount"
    description: Optional[str] = None


class OutputSpec(_Model):
    type: Literal["uri_folder", "uri_file", "mltable"] = "uri_folder"
    # None: raypar puts the output under the job dir (Azure generates a datastore path).
    path: Optional[str] = None
    mode: Literal["rw_mount", "upload", "direct"] = "rw_mount"
    description: Optional[str] = None


_RANGE_RE = re.compile(r"^\s*(\d+)\s*\.\.\s*(\d+)\s*$")


class ResourcesSpec(_Model):
    instance_count: StrictInt = Field(1, ge=1)
    # Elastic instances: up to this many, one per node as nodes join; instance_count is the least
    # the job starts with (Azure's key for elastic training). ``instance_count: "2..8"`` says the same.
    max_instance_count: Optional[StrictInt] = Field(None, ge=1)
    # Azure compute knobs: accepted so Azure YAML loads, meaningless on Ray.
    instance_type: Any = None
    shm_size: Any = None
    docker_args: Any = None
    properties: Any = None
    locations: Any = None

    @model_validator(mode="before")
    @classmethod
    def _range(cls, data: Any) -> Any:
        """``instance_count: "2..8"``: at least 2 instances, up to 8 as nodes join."""
        count = data.get("instance_count") if isinstance(data, dict) else None
        if not isinstance(count, str):
            return data
        match = _RANGE_RE.match(count)
        if not match:
            raise ValueError(f"instance_count {count!r} is not a count (e.g. 2) or a range (e.g. '2..8')")
        if data.get("max_instance_count") is not None:
            raise ValueError("instance_count is a range and max_instance_count is set: give one of them")
        return {**data, "instance_count": int(match.group(1)), "max_instance_count": int(match.group(2))}

    @model_validator(mode="after")
    def _max_not_below_min(self) -> "ResourcesSpec":
        if self.max_instance_count is not None and self.max_instance_count < self.instance_count:
            raise ValueError(f"max_instance_count {self.max_instance_count} is below instance_count "
                             f"{self.instance_count}")
        return self

    @property
    def elastic(self) -> bool:
        """Instances join and leave with nodes, between instance_count and max_instance_count."""
        return self.max_instance_count is not None


class RetrySettings(_Model):
    # v2 counts *retries*: a mini-batch is tried max_retries + 1 times.
    max_retries: StrictInt = Field(2, ge=0)
    timeout: StrictInt = Field(60, gt=0, le=259200)


class TaskSpec(_Model):
    type: Literal["run_function"] = "run_function"
    code: str
    entry_script: str
    program_arguments: Optional[str] = None
    append_row_to: Optional[str] = None
    environment: Any = None  # Azure environment: ignored, Ray's own environment is used

    @field_validator("entry_script")
    @classmethod
    def _python_file(cls, value: str) -> str:
        if not value.endswith(".py"):
            raise ValueError(f"entry_script must be a .py file, got {value!r}")
        return value


class WorkerResources(_Model):
    """Ray resources reserved for each worker actor (raypar extension)."""

    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    memory: Optional[Union[StrictInt, str]] = None
    resources: dict[str, float] = Field(default_factory=dict)

    _numbers = field_validator("num_cpus", "num_gpus", "resources", mode="before")(
        classmethod(lambda cls, v: {k: _no_bool(x) for k, x in v.items()} if isinstance(v, dict) else _no_bool(v)))

    _sizes = _byte_sizes("memory")

    @model_validator(mode="after")
    def _reserve_something(self):
        if self.num_cpus == 0 and self.num_gpus == 0 and not self.resources and self.memory is None:
            raise ValueError("a worker must reserve some resource (num_cpus, num_gpus, memory or resources)")
        return self

    def memory_bytes(self) -> Optional[int]:
        return None if self.memory is None else parse_bytes(self.memory)


def _refuse_literal_secrets(where: str, options: dict) -> None:
    # The spec is copied into the job dir: a secret written here would sit there in clear text.
    for key, item in options.items():
        secret = any(word in key.lower() for word in SECRET_WORDS)
        if secret and not (isinstance(item, str) and env_reference(item)):
            raise ValueError(
                f"{where}{key}: secrets are not written in specs (the job dir keeps a copy); "
                f"put it in an environment variable and write {key}: ${{MY_VAR}}")


class RuntimeEnvSpec(_Model):
    """Software for the job's Ray processes (driver and workers), as a Ray runtime env."""

    # Requirement strings, or the path of a requirements file (relative to the YAML).
    pip: Optional[Union[list[str], str]] = None
    # Set in every worker (and the driver of a submitted job); secrets only as $VAR references.
    env_vars: dict[str, str] = Field(default_factory=dict)

    _strings = field_validator("env_vars", mode="before")(classmethod(lambda cls, v: _string_values(v)))

    @field_validator("env_vars")
    @classmethod
    def _no_literal_secrets(cls, value: dict) -> dict:
        _refuse_literal_secrets("runtime_env.env_vars.", value)
        return value


class LedgerSettings(_Model):
    """How workers write done records and rows to a job dir on object storage (raypar extension).

    Each worker buffers its finished mini-batches and writes them as one segment object when
    any limit is reached (and when it idles or stops); a batch counts as done once its segment
    is stored, and a crash costs at most the unwritten tail, which runs again. Local job dirs
    append every batch at once and ignore these.
    """

    flush_batches: StrictInt = Field(10_000, ge=1)  # finished mini-batches per segment at most
    flush_seconds: float = Field(1.0, ge=0)  # oldest unwritten batch's age before a flush
    flush_bytes: Union[StrictInt, str] = "32mb"  # buffered output rows before a flush

    _numbers = field_validator("flush_seconds", mode="before")(classmethod(lambda cls, v: _no_bool(v)))
    _sizes = _byte_sizes("flush_bytes")

    def plan(self) -> dict:
        return {"flush_batches": self.flush_batches, "flush_seconds": self.flush_seconds,
                "flush_bytes": parse_bytes(self.flush_bytes, "flush_bytes")}


class MountCacheSettings(_Model):
    """The node-local cache of ``ro_mount`` inputs (raypar extension; see raypar/inputs/files.py).

    Files fetched for ``run()`` stay in ``$RAYPAR_CACHE_DIR`` (default: the temp folder's
    ``raypar-cache``) for later batches, retries and jobs; past ``max_size`` bytes the least
    recently used go first. Files of batches still running stay readable either way.
    """

    max_size: Union[StrictInt, str] = "10gb"
    _sizes = _byte_sizes("max_size")

    def max_bytes(self) -> int:
        return parse_bytes(self.max_size, "max_size")


class SpeculationSettings(_Model):
    """Second attempts of straggling mini-batches (raypar extension).

    Once nothing is left to dispatch and a worker idles, a mini-batch that has run longer than
    ``multiple`` times the median mini-batch (and at least ``min_seconds``) gets a second attempt
    on the idle worker. The first attempt to finish wins; the other's worker is stopped. The
    output holds the batch's rows once either way. Off by default: the second attempt costs
    compute and repeats run()'s side effects (calls to paid services, files it writes).
    """

    enabled: bool = False
    multiple: float = Field(4.0, gt=1)
    min_seconds: float = Field(10.0, ge=0)

    _numbers = field_validator("multiple", "min_seconds", mode="before")(
        classmethod(lambda cls, v: _no_bool(v)))


class RayparSpec(_Model):
    """The ``raypar:`` block: settings Azure does not have."""

    worker: WorkerResources = Field(default_factory=WorkerResources)
    # Segment flushes of a job dir on object storage.
    ledger: LedgerSettings = Field(default_factory=LedgerSettings)
    # Second attempts of straggling mini-batches at the end of a job.
    speculation: SpeculationSettings = Field(default_factory=SpeculationSettings)
    mount_cache: MountCacheSettings = Field(default_factory=MountCacheSettings)
    # Queued mini-batches each worker reads (fetches, decodes) while run() works on the one before.
    prefetch: StrictInt = Field(1, ge=0, le=8)
    # What run() gets for a table mini-batch: a pandas DataFrame (Azure's), or a pyarrow Table.
    batch_format: Literal["pandas", "pyarrow"] = "pandas"
    # How long to wait for the cluster to offer instance_count nodes.
    placement_timeout: float = Field(60.0, ge=0)
    # Elastic jobs: at the tail, give back each instance with nothing left to run (its node, and its
    # share of the autoscaler's request); false keeps every instance until the job ends.
    give_back_idle_instances: bool = True
    # Failed mini-batches allowed while no mini-batch of the job has succeeded; more stops the job (failed,
    # resumable): a script or cluster that fails everything stops within a few tries. -1: no limit.
    failures_before_first_success: StrictInt = Field(10, ge=-1)
    # Seconds a driver's lease on the job dir outlives its last heartbeat (renewed every third of it;
    # a driver that cannot renew for two thirds of it stops; another driver may take over after all of it).
    lease_ttl: float = Field(30.0, ge=3)
    # Format of the assembled append_row_to file: Azure's space-separated text, or a real table format.
    append_row_format: Literal["text", "csv", "jsonl", "parquet"] = "text"
    # Write the append_row_to file while batches run (only its tail is left after the last batch);
    # false: after the last batch, as Azure does.
    assemble_while_running: bool = True
    # Read a uri_folder / uri_file as a table in this format (default: from the file extensions).
    input_format: Optional[Literal["parquet", "csv", "json_lines"]] = None
    # fsspec options per protocol (az, abfs, s3, gs, ...); secrets only as $ENV_VAR references.
    storage_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # pip packages and environment variables for the job's Ray processes.
    runtime_env: RuntimeEnvSpec = Field(default_factory=RuntimeEnvSpec)
    # The append_row_to file's name inside a uri_folder output (Azure v1's append_row_file_name).
    append_row_file_name: Optional[str] = None
    # Model name (or "name:version") -> local path or URL: azureml.core's Model.get_model_path in workers.
    models: dict[str, str] = Field(default_factory=dict)
    # Azure datastore name -> local folder or URL: azureml://datastores/<name>/paths/... (see datastores.py).
    datastores: dict[str, str] = Field(default_factory=dict)

    @field_validator("datastores")
    @classmethod
    def _plain_names(cls, value: dict) -> dict:
        for name, target in value.items():
            if not name or "/" in name or not target:
                raise ValueError(f"{name!r}: a datastore name (no '/') maps to a folder or URL")
        return value

    @field_validator("append_row_file_name")
    @classmethod
    def _plain_file_name(cls, value):
        if value is not None and (not value.strip() or re.search(r'[~"#%&*:<>?/\\{|}]', value)):
            raise ValueError(f"{value!r} must be a plain file name (no folders, no ~\"#%&*:<>?/\\{{|}})")
        return value

    @field_validator("storage_options")
    @classmethod
    def _no_literal_secrets(cls, value: dict) -> dict:
        for protocol, options in value.items():
            _refuse_literal_secrets(f"{protocol}.", options)
        return value

    _numbers = field_validator("placement_timeout", "lease_ttl", mode="before")(
        classmethod(lambda cls, v: _no_bool(v)))


class JobSpec(_Model):
    """A parallel job, as written in Azure ML v2 YAML (plus the ``raypar:`` block)."""

    type: Literal["parallel"]
    name: Optional[str] = None
    inputs: dict[str, Union[InputSpec, bool, int, float, str]] = Field(default_factory=dict)
    outputs: dict[str, OutputSpec] = Field(default_factory=dict)
    input_data: str
    mini_batch_size: Optional[Union[StrictInt, str]] = None
    partition_keys: Optional[list[str]] = None
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    max_concurrency_per_instance: StrictInt = Field(1, ge=1)
    error_threshold: StrictInt = Field(-1, ge=-1)
    mini_batch_error_threshold: StrictInt = Field(-1, ge=-1)
    # Azure v1's allowed_failed_percent; v2 passes it as --allowed_failed_percent in program_arguments.
    allowed_failed_percent: float = Field(100.0, ge=0, le=100)
    logging_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    retry_settings: RetrySettings = Field(default_factory=RetrySettings)
    environment_variables: dict[str, str] = Field(default_factory=dict)
    task: TaskSpec
    raypar: RayparSpec = Field(default_factory=RayparSpec)

    # Azure-only keys: accepted and ignored.
    schema_: Optional[str] = Field(None, alias="$schema")
    compute: Any = None
    environment: Any = None
    display_name: Optional[str] = None
    description: Optional[str] = None
    tags: Any = None
    experiment_name: Optional[str] = None
    identity: Any = None
    is_deterministic: Any = None
    properties: Any = None

    _numbers = field_validator("allowed_failed_percent", mode="before")(classmethod(lambda cls, v: _no_bool(v)))

    @field_validator("logging_level", mode="before")
    @classmethod
    def _upper(cls, value):
        return value.upper() if isinstance(value, str) else value

    _env_strings = field_validator("environment_variables", mode="before")(
        classmethod(lambda cls, v: _string_values(v)))

    @field_validator("mini_batch_size")
    @classmethod
    def _size(cls, value):
        if value is not None:
            parse_size(value)
        return value

    @model_validator(mode="after")
    def _cross_checks(self):
        name = single_binding(self.input_data, "input_data")
        kind, _, key = name.partition(".")
        if kind != "inputs" or key not in self.inputs:
            raise ValueError(f"input_data {self.input_data!r} must be ${{{{inputs.NAME}}}} naming one of the inputs")
        if not isinstance(self.inputs[key], InputSpec):
            raise ValueError(f"input_data names inputs.{key}, which is a literal value, not data")
        if self.partition_keys is not None and self.mini_batch_size is not None:
            raise ValueError("partition_keys and mini_batch_size cannot be used together: choose one way to split")
        try:
            shlex.split(self.task.program_arguments or "")
        except ValueError as exc:
            raise ValueError(f"task.program_arguments cannot be split into arguments: {exc}") from None
        timeout = self.predefined_arguments().first_task_creation_timeout  # raises for values raypar cannot honour
        if timeout is not None and "placement_timeout" not in self.raypar.model_fields_set:
            # Azure's wait for the first mini-batch; the nearest thing here is the wait for the nodes.
            self.raypar.placement_timeout = timeout
        for field, text in (("task.program_arguments", self.task.program_arguments),
                            ("task.append_row_to", self.task.append_row_to)):
            for ref in BINDING_RE.findall(text or ""):
                self._lookup(ref, field)
        if self.task.append_row_to is not None:
            ref = single_binding(self.task.append_row_to, "task.append_row_to")
            if not ref.startswith("outputs."):
                raise ValueError("task.append_row_to must be ${{outputs.NAME}}")
        return self

    def _lookup(self, ref: str, field: str):
        kind, _, key = ref.partition(".")
        table = {"inputs": self.inputs, "outputs": self.outputs}.get(kind)
        if table is None or key not in table:
            raise ValueError(f"{field}: ${{{{{ref}}}}} does not name a declared input or output")
        return table[key]

    # -- derived values -------------------------------------------------

    @property
    def data_input_name(self) -> str:
        return single_binding(self.input_data, "input_data").partition(".")[2]

    @property
    def data_input(self) -> InputSpec:
        return self.inputs[self.data_input_name]  # type: ignore[return-value]

    def batch_size(self) -> BatchSize:
        if self.mini_batch_size is not None:
            return parse_size(self.mini_batch_size)
        return BatchSize(DEFAULT_FILES_PER_BATCH, is_bytes=False)

    def table_batch_bytes(self) -> int:
        """Bytes of a table input per mini-batch: ``mini_batch_size``, or Azure's default of 1 MB."""
        return self.batch_size().value if self.mini_batch_size is not None else DEFAULT_BYTES_PER_BATCH

    def predefined_arguments(self) -> Predefined:
        """Azure's predefined flags in program_arguments, with literal inputs bound (data inputs are no values)."""
        def literal(match) -> str:
            item = self.inputs.get(match.group(1).partition(".")[2]) if match.group(1).startswith("inputs.") else None
            return str(item) if isinstance(item, (int, float, str)) and not isinstance(item, bool) else "x"

        return parse_predefined(shlex.split(BINDING_RE.sub(literal, self.task.program_arguments or "")))

    def failed_percent_limit(self) -> float:
        """allowed_failed_percent, overridden by ``--allowed_failed_percent N`` in program_arguments."""
        percent = self.predefined_arguments().allowed_failed_percent
        return self.allowed_failed_percent if percent is None else percent

    def program_arguments_note(self) -> Optional[str]:
        """One line naming the predefined flags that are accepted but not used, and why (None: none)."""
        predefined = self.predefined_arguments()
        ignored = dict(predefined.ignored)
        timeout = predefined.first_task_creation_timeout
        if timeout is not None and timeout != self.raypar.placement_timeout:
            ignored["first_task_creation_timeout"] = \
                f"raypar.placement_timeout={self.raypar.placement_timeout:g} is set and wins"
        return ignored_note(ignored)

    @property
    def max_tries(self) -> int:
        return self.retry_settings.max_retries + 1

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def to_dict(self) -> dict:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def single_binding(text: str, field: str) -> str:
    match = BINDING_RE.fullmatch(text.strip())
    if not match:
        raise ValueError(f"{field} must be a single ${{{{...}}}} expression, got {text!r}")
    return match.group(1)
