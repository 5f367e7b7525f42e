"""Binding a validated spec to what a run needs: argv, the append-row file, the worker's plan."""

from __future__ import annotations

import logging
import re
import shlex
from dataclasses import dataclass
from typing import Optional

from raypar.errors import SpecError
from raypar.spec.models import APPEND_ROW_FILE_NAME, BINDING_RE, InputSpec, JobSpec, OutputSpec, single_binding

log = logging.getLogger("raypar")


@dataclass(frozen=True)
class BoundJob:
    """Concrete values derived from a spec whose outputs all have paths."""

    argv: list[str]
    append_row_path: Optional[str]
    entry_script_path: str


def fill_output_paths(spec: JobSpec, default_root: str) -> JobSpec:
    """Give outputs without a path one under ``default_root`` (Azure generates one too)."""
    outputs = {}
    for name, out in spec.outputs.items():
        if out.path is None:
            out = out.model_copy(update={"path": f"{default_root.rstrip('/')}/{name}"})
        outputs[name] = out
    return spec.model_copy(update={"outputs": outputs})


def bind(spec: JobSpec) -> BoundJob:
    """Substitute ``${{inputs.x}}`` / ``${{outputs.y}}`` and derive argv and the append-row file."""

    def value_of(ref: str) -> str:
        item = spec._lookup(ref, "binding")
        if isinstance(item, (InputSpec, OutputSpec)):
            if item.path is None:
                raise SpecError(f"${{{{{ref}}}}} has no path yet")
            return item.path
        return str(item).lower() if isinstance(item, bool) else str(item)

    # Split first, then substitute, so a path with spaces stays one argument;
    # bindings become space-free placeholders for the split (``${{ inputs.x }}`` has spaces).
    refs: list[str] = []

    def placeholder(match) -> str:
        refs.append(match.group(1))
        return f"@@raypar-binding-{len(refs) - 1}@@"

    tokens = shlex.split(BINDING_RE.sub(placeholder, spec.task.program_arguments or ""))
    args = [re.sub(r"@@raypar-binding-(\d+)@@", lambda m: value_of(refs[int(m.group(1))]), t) for t in tokens]
    append_row_path = None
    if spec.task.append_row_to:
        output = spec._lookup(single_binding(spec.task.append_row_to, "append_row_to"), "append_row_to")
        path = value_of(single_binding(spec.task.append_row_to, "append_row_to"))
        name = APPEND_ROW_FILE_NAME if spec.raypar.append_row_format == "text" else \
            f"parallel_run_step.{spec.raypar.append_row_format}"  # a table format gets its own extension
        name = spec.raypar.append_row_file_name or name
        append_row_path = path if output.type == "uri_file" else f"{path.rstrip('/')}/{name}"
    entry = f"{spec.task.code.rstrip('/')}/{spec.task.entry_script}"
    return BoundJob(argv=[entry, *args], append_row_path=append_row_path, entry_script_path=entry)
