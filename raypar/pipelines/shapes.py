"""The YAML shapes of a pipeline job and of its command steps, as pydantic models.

Only the shape (which keys, mappings where mappings belong) is checked here;
what the values mean (bindings, step order, paths) is resolved in
:mod:`raypar.pipelines.loading`. Keys that Azure has and Ray gives no meaning
to are accepted and reported as ignored.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Azure compute and identity: no meaning on Ray (settings: each key).
PIPELINE_IGNORED = ("compute", "identity")
COMMAND_IGNORED = ("environment", "compute", "resources", "distribution", "limits", "identity", "services",
                   "queue_settings")

HINTS = {
    "jobs": "a pipeline needs a mapping of steps: step name -> job",
    "raypar": "a pipeline's raypar: block holds datastores; other raypar settings go in each step",
}
COMMAND_HINTS = {"command": "a command step needs a command"}


class _Shape(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class PipelineRaypar(_Shape):
    datastores: Optional[dict[str, Any]] = None  # checked by raypar.spec.datastores


class PipelineShape(_Shape):
    """``type: pipeline``: Azure's pipeline job, with raypar's datastores mapping."""

    schema_: Any = Field(None, alias="$schema")
    type: Literal["pipeline"]
    name: Any = None
    display_name: Any = None
    description: Any = None
    tags: Any = None
    experiment_name: Any = None
    properties: Any = None
    compute: Any = None
    identity: Any = None
    settings: Optional[dict[str, Any]] = None
    inputs: Optional[dict[str, Any]] = None
    outputs: Optional[dict[str, Any]] = None
    jobs: dict[str, Any] = Field(min_length=1)
    raypar: Optional[PipelineRaypar] = None


class CommandStepShape(_Shape):
    """A ``type: command`` step (inline, or a command component with the step's keys laid over it)."""

    type: Literal["command"]
    command: str
    component: Any = None
    code: Optional[str] = None
    inputs: Optional[dict[str, Any]] = None
    outputs: Optional[dict[str, Any]] = None
    environment_variables: Optional[dict[str, Any]] = None
    schema_: Any = Field(None, alias="$schema")
    name: Any = None
    version: Any = None
    display_name: Any = None
    description: Any = None
    tags: Any = None
    is_deterministic: Any = None
    experiment_name: Any = None
    properties: Any = None
    # Accepted and ignored: Azure's environment, compute and limits have no meaning here.
    environment: Any = None
    compute: Any = None
    resources: Any = None
    distribution: Any = None
    limits: Any = None
    identity: Any = None
    services: Any = None
    queue_settings: Any = None

    @field_validator("command")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("is empty")
        return value
