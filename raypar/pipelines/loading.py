"""Azure ML pipeline jobs (``type: pipeline``) resolved into a plan of parallel and command steps.

``load_pipeline`` reads the YAML and resolves everything before anything runs:
pipeline inputs (``--set`` bindings, defaults), every step's outputs (bound to
``${{parent.outputs.Z}}``, a path, or a folder in the pipeline dir), every
step's inputs (``${{parent.inputs.X}}``, ``${{parent.jobs.S.outputs.Y}}``), the
order (a topological sort; YAML order breaks ties), each parallel step's
validated job spec and each command step's command line. Datastore URLs and
``${{name}}`` in paths are resolved here too (:mod:`raypar.datastores`: the
pipeline's ``raypar.datastores`` over ``RAYPAR_DATASTORES``; ``${{name}}`` is the
pipeline's name for its own inputs and outputs, the step's for a step's), and
``--set jobs.STEP.outputs.NAME=PATH`` moves a step's output. Every error is one
line naming the step and the key. :mod:`raypar.pipelines.run` runs the plan.

Reads YAML files and checks that code folders and entry scripts exist; writes nothing.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from raypar.errors import SpecError, UsageError
from raypar.jobdir.layout import default_job_dir
from raypar.pipelines.shapes import (
    COMMAND_HINTS,
    COMMAND_IGNORED,
    HINTS,
    PIPELINE_IGNORED,
    CommandStepShape,
    PipelineRaypar,
    PipelineShape,
)
from raypar.spec import datastores
from raypar.spec.binding import bind
from raypar.spec.components import (
    bind_inputs,
    bind_outputs,
    component_job,
    drop_optional_blocks,
    is_component,
    job_from_file,
    load_component,
    local_or_url,
    parse_sets,
    read_yaml,
    use_component,
)
from raypar.spec.loading import check_shape, spec_from_dict
from raypar.spec.models import BINDING_RE, JobSpec
from raypar.storage import is_url

STEP_TYPES = ("parallel", "command")

_PARENT_RE = re.compile(r"^\s*\$\{\{\s*parent\.([^}]*?)\s*\}\}\s*$")
_ANY_PARENT_RE = re.compile(r"\$\{\{\s*parent\.")
_STEP_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


@dataclass
class Step:
    """One resolved step: what it runs, where its outputs go, which steps it needs."""

    name: str
    kind: str  # "parallel" or "command"
    needs: list[str]
    outputs: dict[str, dict]  # output name -> {type, path, ...}
    job: Optional[JobSpec] = None  # parallel
    command: Optional[str] = None  # command: the command line, bound
    cwd: Optional[str] = None
    env: dict[str, str] = field(default_factory=dict)

    def plan(self) -> dict:
        """The step as ``pipeline.json`` freezes it."""
        frozen = {"name": self.name, "kind": self.kind, "needs": self.needs, "outputs": self.outputs}
        if self.job is not None:
            frozen["spec"] = self.job.to_dict()
        else:
            frozen.update(command=self.command, cwd=self.cwd, env=self.env)
        return frozen


@dataclass
class Pipeline:
    """A pipeline YAML resolved against one pipeline dir: steps in run order."""

    name: str
    job_dir: str
    source: str
    sets: list[str]
    set_base: str  # the folder --set paths are relative to (the cwd of the first run)
    steps: list[Step]
    outputs: dict[str, str]  # pipeline output -> path
    ignored: list[str]

    def plan(self) -> dict:
        return {"steps": [s.plan() for s in self.steps], "outputs": self.outputs}

    def step_dir(self, step: Step) -> Path:
        return Path(self.job_dir, step.name)


# -- what `raypar run FILE` runs --------------------------------------------


def prepare_run(path: str, sets: Sequence[str] = (), job_dir: Optional[str] = None,
                code_dir: Optional[str] = None) -> Union[str, JobSpec, Pipeline]:
    """What ``raypar run FILE`` runs: ``path`` itself (a plain job), a bound JobSpec, or a Pipeline.

    A plain parallel job without ``--set`` is returned untouched, so the job path is the one it always was.
    """
    try:
        data = read_yaml(path)[0]
    except SpecError:
        data = None  # the job loader names the problem, as before
    if isinstance(data, dict) and data.get("type") == "pipeline":
        if code_dir:
            raise UsageError("--code-dir applies to a single job, not to a pipeline")
        return load_pipeline(path, sets, job_dir)
    if sets or is_component(data):

        return job_from_file(path, sets)
    return path


# -- loading ---------------------------------------------------------------


def load_pipeline(path: str, sets: Sequence[str] = (), job_dir: Optional[str] = None,
                  set_base: Optional[str] = None) -> Pipeline:
    """Read a pipeline YAML and resolve it for ``job_dir`` (default ``./raypar-jobs/<name>-<time>-<id>``).

    Raises:
        SpecError: one line naming the file, the step and the key (unknown
            reference, cycle, missing required input, invalid step).
    """
    data, base, source = read_yaml(path)
    if not isinstance(data, dict) or data.get("type") != "pipeline":
        raise SpecError(f"{source}: not a pipeline (type: pipeline)")
    name = str(data.get("name") or data.get("display_name") or Path(source.partition("env:")[2] or source).stem)
    if job_dir is None:

        job_dir = default_job_dir(slug(name))
    if is_url(job_dir):
        raise UsageError(f"{job_dir}: a pipeline dir must be a local folder (its command steps run here); "
                         f"a step's outputs may still be URLs")
    job_dir = str(Path(job_dir).expanduser().resolve())
    set_base = set_base or os.getcwd()
    try:
        steps, outputs, ignored = _resolve(data, base, parse_sets(sets), Path(set_base), job_dir, slug(name))
    except SpecError as exc:
        raise SpecError(f"{source}: {exc.headline}") from None
    if not source.startswith("env:"):
        source = str(Path(source).resolve())
    return Pipeline(name, job_dir, source, list(sets), set_base, steps, outputs, ignored)


def slug(name: str) -> str:
    """A name fit for a folder and a path segment: display names have spaces ("Score files" -> "Score-files")."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "pipeline"


@dataclass
class _Draft:
    """A step while it is being resolved."""

    name: str
    kind: str
    definition: dict  # the inline step, or the component with the step's other keys laid over it
    base: Path  # relative paths of the definition are relative to this folder
    pipeline_base: Path  # the pipeline YAML's folder: relative paths of the step's bindings
    uses_component: bool
    bindings_in: dict  # a component step's `inputs:` (an inline step's inputs are its definition's)
    bindings_out: dict  # a component step's `outputs:`
    outputs: dict = field(default_factory=dict)
    needs: dict = field(default_factory=dict)  # upstream step -> the key that references it


def _resolve(data: dict, base: Path, sets: dict, set_base: Path, job_dir: str, name: str):
    shape = check_shape(PipelineShape, data, "", HINTS)
    own_stores = _pipeline_datastores(shape.raypar, base)
    stores = datastores.merged(own_stores)
    ignored = [k for k in PIPELINE_IGNORED if data.get(k) is not None]
    ignored += [f"settings.{k}" for k in shape.settings or {}]
    jobs = shape.jobs
    declared_inputs = data.get("inputs") or {}
    # The pipeline's own paths get its name for ${{name}}; each step's, the step's name.
    inputs = _resolve_paths(bind_inputs(declared_inputs, [(sets["inputs"], set_base)], "", base), name, stores,
                            "inputs")
    pipeline_outputs = _resolve_paths(bind_outputs(data.get("outputs"), [(sets["outputs"], set_base)], "", base),
                                      name, stores, "outputs")
    unknown_steps = sorted(set(sets["jobs"]) - set(jobs))
    if unknown_steps:
        raise UsageError(f"--set jobs.{unknown_steps[0]}...: no step '{unknown_steps[0]}' in jobs "
                         f"(steps: {', '.join(map(str, jobs))})")
    drafts = {step: _draft(step, definition, base, ignored) for step, definition in jobs.items()}
    claimed: dict[str, tuple[str, str]] = {}  # pipeline output -> (step, output)
    for draft in drafts.values():
        step_sets = [(sets["jobs"].get(draft.name, {}).get("outputs"), set_base)]
        draft.outputs = _resolve_paths(_step_outputs(draft, pipeline_outputs, claimed, base, job_dir, step_sets),
                                       draft.name, stores, f"jobs.{draft.name}.outputs")
    produced = {step: d.outputs for step, d in drafts.items()}
    for draft in drafts.values():
        _wire_inputs(draft, declared_inputs, inputs, produced)
    order = _order(drafts)
    steps = [_finish(drafts[step], job_dir, own_stores, stores) for step in order]
    outputs = {z: produced[step][out]["path"] for z, (step, out) in claimed.items()}
    return steps, outputs, ignored


def _pipeline_datastores(block: Optional[PipelineRaypar], base: Path) -> dict[str, str]:
    """``raypar: {datastores: {...}}`` at the top of a pipeline: the mapping of every step's paths."""
    if block is None:
        return {}
    return datastores.absolute(datastores.check(block.datastores or {}, "raypar.datastores"), base)


def _resolve_paths(items: dict, name: str, stores: dict, where: str) -> dict:
    """Data items (``{type, path, ...}``) with ``${{name}}`` filled and datastore URLs mapped; literals kept."""
    resolved = {}
    for key, item in items.items():
        if isinstance(item, dict) and isinstance(item.get("path"), str):
            try:
                item = {**item, "path": datastores.resolve(item["path"], name, stores)}
            except SpecError as exc:
                raise SpecError(f"{where}.{key}: {exc.headline}") from None
        resolved[key] = item
    return resolved


def _draft(name: Any, step: Any, base: Path, ignored: list) -> _Draft:
    where = f"jobs.{name}"
    if not isinstance(name, str) or not _STEP_NAME_RE.match(name):
        raise SpecError(f"{where}: a step name is letters, digits, '_' and '-', starting with a letter or '_'")
    if not isinstance(step, dict):
        raise SpecError(f"{where}: must be a mapping (an inline job, or component: FILE with inputs and outputs)")
    definition, folder, uses = step, base, step.get("component") is not None
    if uses:
        component, folder = load_component(step["component"], base, where)
        if step.get("type") not in (None, component.get("type")):
            raise SpecError(f"{where}.type: {step['type']!r}, but its component is {component.get('type')!r}")
        definition = use_component(component, step)
    kind = definition.get("type")
    if kind not in STEP_TYPES:
        raise SpecError(f"{where}.type: {kind!r} steps are not supported (raypar runs parallel and command steps)")
    if kind == "command":
        check_shape(CommandStepShape, definition, where, COMMAND_HINTS)
        ignored += [f"{where}.{k}" for k in sorted(set(COMMAND_IGNORED) & set(definition))]
    elif definition.get("compute") is not None:
        ignored.append(f"{where}.compute")
    if uses:
        return _Draft(name, kind, definition, folder, base, True, step.get("inputs") or {}, step.get("outputs") or {})
    return _Draft(name, kind, definition, folder, base, False, {}, {})


def _parent_ref(value: Any) -> Optional[str]:
    """``inputs.X`` / ``jobs.S.outputs.Y`` / ``outputs.Z`` of a ``${{parent...}}`` value (or its ``path``)."""
    text = value.get("path") if isinstance(value, dict) else value
    if not isinstance(text, str):
        return None
    match = _PARENT_RE.match(text)
    if match:
        return match.group(1)
    if _ANY_PARENT_RE.search(text):  # ${{name}} and ${{default_datastore}} are filled in paths later
        raise SpecError(f"{text!r}: a binding is one whole ${{{{parent.inputs.NAME}}}} or "
                        f"${{{{parent.jobs.STEP.outputs.NAME}}}} expression")
    return None


def _step_outputs(draft: _Draft, pipeline_outputs: dict, claimed: dict, base: Path, job_dir: str,
                  step_sets: list) -> dict:
    """The step's outputs: bound to a pipeline output, to a path, or a folder under its step folder;
    ``--set jobs.STEP.outputs.NAME=PATH`` (``step_sets``) wins over all of them."""
    where = f"jobs.{draft.name}."
    uses = draft.uses_component
    written = draft.bindings_out if uses else (draft.definition.get("outputs") or {})
    declared = dict(draft.definition.get("outputs") or {}) if uses else {}
    if not isinstance(written, dict) or not isinstance(declared, dict):
        raise SpecError(f"{where}outputs: must be a mapping")
    paths: dict[str, str] = {}
    for out, value in written.items():
        key = f"{where}outputs.{out}"
        if uses and out not in declared:
            raise SpecError(f"{key}: no such output (declared: {', '.join(declared) or 'none'})")
        try:
            ref = _parent_ref(value)
        except SpecError as exc:
            raise SpecError(f"{key}: {exc.headline}") from None
        decl = dict(value) if isinstance(value, dict) else {}
        if ref is not None:
            kind, _, target = ref.partition(".")
            if kind != "outputs" or target not in pipeline_outputs:
                raise SpecError(f"{key}: ${{{{parent.{ref}}}}}: an output binds to ${{{{parent.outputs.NAME}}}} "
                                f"(pipeline outputs: {', '.join(pipeline_outputs) or 'none'})")
            if target in claimed:
                raise SpecError(f"{key}: pipeline output '{target}' is already bound by "
                                f"jobs.{claimed[target][0]}.outputs.{claimed[target][1]}")
            claimed[target] = (draft.name, out)
            decl.pop("path", None)
            decl.setdefault("type", pipeline_outputs[target]["type"])
            if pipeline_outputs[target].get("path"):
                paths[out] = pipeline_outputs[target]["path"]
        elif uses and isinstance(value, (str, dict)) and (value.get("path") if isinstance(value, dict) else value):
            paths[out] = value["path"] if isinstance(value, dict) else value
        if not uses:
            declared[out] = decl if ref is not None else value
        elif "type" in decl and not (declared[out] or {}).get("type"):
            declared[out] = {**(declared[out] or {}), "type": decl["type"]}
    return bind_outputs(declared, [(paths, base), *step_sets], where, draft.base, f"{job_dir}/{draft.name}/outputs")


def _wire_inputs(draft: _Draft, declared_inputs: dict, inputs: dict, produced: dict) -> None:
    """Replace ``${{parent...}}`` input values by what they name; note the steps they need."""
    where = f"jobs.{draft.name}."
    holder = draft.bindings_in if draft.uses_component else (draft.definition.get("inputs") or {})
    if not isinstance(holder, dict):
        raise SpecError(f"{where}inputs: must be a mapping")
    wired = {}
    for name, value in holder.items():
        key = f"{where}inputs.{name}"
        try:
            ref = _parent_ref(value)
        except SpecError as exc:
            raise SpecError(f"{key}: {exc.headline}") from None
        if ref is None:
            wired[name] = value
            continue
        found = _lookup(ref, key, declared_inputs, inputs, produced)
        if found is not None and ref.startswith("jobs."):
            draft.needs.setdefault(ref.split(".")[1], key)
        if isinstance(value, dict) and found is not None:  # {type, path: ${{...}}, mode}: the path is wired
            if not isinstance(found, dict):
                raise SpecError(f"{key}: ${{{{parent.{ref}}}}} is a value, not data with a path")
            found = {"type": found.get("type", "uri_folder"), **value, "path": found["path"]}
        if found is not None or draft.uses_component:
            wired[name] = found  # None: left unbound (an optional pipeline input without a value)
    if draft.uses_component:
        draft.bindings_in = wired
    else:
        draft.definition = {**draft.definition, "inputs": wired}


def _lookup(ref: str, key: str, declared_inputs: dict, inputs: dict, produced: dict):
    parts = ref.split(".")
    if parts[0] == "inputs" and len(parts) == 2:
        if parts[1] not in declared_inputs:
            raise SpecError(f"{key}: ${{{{parent.{ref}}}}}: the pipeline has no input '{parts[1]}' "
                            f"(inputs: {', '.join(declared_inputs) or 'none'})")
        return inputs.get(parts[1])
    if parts[0] == "jobs" and len(parts) == 4 and parts[2] == "outputs":
        step, out = parts[1], parts[3]
        if step not in produced:
            raise SpecError(f"{key}: ${{{{parent.{ref}}}}}: no step '{step}' in jobs")
        if out not in produced[step]:
            raise SpecError(f"{key}: ${{{{parent.{ref}}}}}: step '{step}' has no output '{out}' "
                            f"(outputs: {', '.join(produced[step]) or 'none'})")
        source = produced[step][out]
        return {"type": source["type"], "path": source["path"]}
    raise SpecError(f"{key}: ${{{{parent.{ref}}}}}: an input binds to ${{{{parent.inputs.NAME}}}} "
                    f"or ${{{{parent.jobs.STEP.outputs.NAME}}}}")


def _order(drafts: dict[str, _Draft]) -> list[str]:
    """Steps in dependency order (Kahn's algorithm; among ready steps, YAML order)."""
    waiting = {name: set(d.needs) for name, d in drafts.items()}
    order: list[str] = []
    while waiting:
        ready = [name for name, needs in waiting.items() if not needs - set(order)]
        if not ready:
            raise SpecError(_cycle(drafts, waiting))
        order.append(ready[0])
        del waiting[ready[0]]
    return order


def _cycle(drafts: dict[str, _Draft], waiting: dict[str, set]) -> str:
    """A message naming one cycle among the steps left: the key that closes it and the loop."""
    path = [next(iter(waiting))]
    while True:
        nxt = sorted(n for n in drafts[path[-1]].needs if n in waiting)[0]
        if nxt in path:
            loop = path[path.index(nxt):] + [nxt]
            break
        path.append(nxt)
    first = loop[0]
    key = drafts[first].needs[loop[1]]
    return f"{key}: a cycle: {' -> '.join(reversed(loop))} (each step needs the output of the one before)"


def _finish(draft: _Draft, job_dir: str, own_stores: dict, stores: dict) -> Step:
    where = f"jobs.{draft.name}."
    layers = [(draft.bindings_in, draft.pipeline_base)] if draft.uses_component else []
    needs = list(draft.needs)
    if draft.kind == "parallel":
        definition = {k: v for k, v in draft.definition.items() if k != "component"}
        definition.setdefault("name", draft.name)
        if own_stores:  # the step's own raypar.datastores win over the pipeline's
            raypar = definition.get("raypar") if isinstance(definition.get("raypar"), dict) else {}
            step_stores = raypar.get("datastores") if isinstance(raypar.get("datastores"), dict) else {}
            definition["raypar"] = {**raypar, "datastores": {**own_stores, **step_stores}}
        job = spec_from_dict(component_job(definition, layers, draft.outputs, where, draft.base),
                             base_dir=draft.base, source=f"jobs.{draft.name}")
        entry = bind(job).entry_script_path  # found now, not after the steps before it ran
        if not is_url(job.task.code) and not os.path.isfile(entry):
            raise SpecError(f"{where}task.entry_script: {entry} not found")
        return Step(draft.name, "parallel", needs, draft.outputs, job=job)
    definition = draft.definition
    inputs = _resolve_paths(bind_inputs(definition.get("inputs") or {}, layers, where, draft.base), draft.name, stores,
                            f"{where}inputs")
    command = drop_optional_blocks(definition["command"], set(inputs), f"{where}command")
    code = definition.get("code")
    cwd = local_or_url(code, draft.base, f"{where}code") if code else str(draft.base)
    if is_url(cwd) or not os.path.isdir(cwd):
        raise SpecError(f"{where}code: {cwd}: must be a local folder (the command runs in it)")
    env = definition.get("environment_variables") or {}  # a mapping: CommandStepShape
    command = _bind_command(command, inputs, draft.outputs, f"{where}command")
    return Step(draft.name, "command", needs, draft.outputs, command=command, cwd=cwd,
                env={str(k): str(v) for k, v in env.items()})


def _bind_command(command: str, inputs: dict, outputs: dict, where: str) -> str:
    """``${{inputs.x}}`` / ``${{outputs.y}}`` replaced by paths and values, quoted for the shell when needed."""
    def value(match) -> str:
        kind, _, name = match.group(1).partition(".")
        table = {"inputs": inputs, "outputs": outputs}.get(kind)
        if table is None or name not in table:
            raise SpecError(f"{where}: ${{{{{match.group(1)}}}}} does not name an input or output of the step")
        item = table[name]
        text = item["path"] if isinstance(item, dict) else str(item).lower() if isinstance(item, bool) else str(item)
        return shlex.quote(text)

    return BINDING_RE.sub(value, command)
