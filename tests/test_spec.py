"""Spec parsing, validation, size strings and binding (pure: no Ray, no storage)."""

import copy
from pathlib import Path

import pytest
import yaml

from raypar.errors import SpecError
from raypar.spec.binding import bind, fill_output_paths
from raypar.spec.loading import load_spec, spec_from_dict
from raypar.spec.models import APPEND_ROW_FILE_NAME, BatchSize, parse_bytes, parse_size

FULL_AZURE_YAML = """\
$schema: https://azuremlschemas.azureedge.net/latest/parallelJob.schema.json
type: parallel
name: score-iris
display_name: Score the iris files
description: batch scoring, unchanged from Azure ML
experiment_name: iris-scoring
tags:
  team: ml
compute: azureml:cpu-cluster
environment: azureml:AzureML-sklearn-1.0:1
inputs:
  data:
    type: uri_folder
    path: ./data
    mode: ro_mount
  model:
    type: uri_file
    path: models/model.pkl
  threshold: 0.5
  verbose: true
  label: iris
outputs:
  scores:
    type: uri_folder
    mode: rw_mount
    path: ./out
input_data: ${{inputs.data}}
mini_batch_size: "5"
resources:
  instance_count: 2
  instance_type: Standard_DS3_v2
max_concurrency_per_instance: 4
error_threshold: 10
mini_batch_error_threshold: 3
logging_level: DEBUG
retry_settings:
  max_retries: 3
  timeout: 120
environment_variables:
  OMP_NUM_THREADS: 1
task:
  type: run_function
  code: ./src
  entry_script: score.py
  environment: azureml:AzureML-sklearn-1.0:1
  program_arguments: >-
    --model ${{inputs.model}} --threshold ${{inputs.threshold}}
    --verbose ${{inputs.verbose}} --label ${{inputs.label}}
  append_row_to: ${{outputs.scores}}
"""


def minimal_dict() -> dict:
    """The smallest valid spec, as a dict (relative paths)."""
    return {
        "type": "parallel",
        "inputs": {"data": {"type": "uri_folder", "path": "data"}},
        "outputs": {"out": {"type": "uri_folder", "path": "out"}},
        "input_data": "${{inputs.data}}",
        "task": {"code": "src", "entry_script": "score.py"},
    }


def write_yaml(tmp_path: Path, content, name: str = "job.yml") -> Path:
    """Write ``content`` (YAML text or a dict) to a spec file and return its path."""
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False))
    return path


DELETE = object()


def with_changes(changes: dict) -> dict:
    """The minimal spec with dotted keys set (or removed with DELETE)."""
    data = copy.deepcopy(minimal_dict())
    for dotted, value in changes.items():
        target = data
        *parents, last = dotted.split(".")
        for part in parents:
            target = target.setdefault(part, {})
        if value is DELETE:
            del target[last]
        else:
            target[last] = value
    return data


def spec_error_for(path: Path) -> SpecError:
    with pytest.raises(SpecError) as info:
        load_spec(path)
    return info.value


def assert_headline(error: SpecError, path: Path, *fragments: str) -> None:
    """One line, exit code 2, names the file and every fragment."""
    assert error.exit_code == 2
    assert "\n" not in error.headline
    assert str(path) in error.headline
    for fragment in fragments:
        assert fragment in error.headline


def at(tmp_path: Path, *parts: str) -> str:
    return str(tmp_path.resolve().joinpath(*parts))


# -- a full Azure spec and the defaults --------------------------------------


def test_full_azure_parallel_job_loads(tmp_path):
    spec = load_spec(write_yaml(tmp_path, FULL_AZURE_YAML))

    assert spec.type == "parallel"
    assert spec.name == "score-iris"
    assert spec.data_input_name == "data"
    assert spec.data_input.type == "uri_folder"
    assert spec.inputs["threshold"] == 0.5
    assert spec.inputs["verbose"] is True
    assert spec.inputs["label"] == "iris"
    assert spec.batch_size() == BatchSize(5, is_bytes=False)
    assert spec.resources.instance_count == 2
    assert spec.max_concurrency_per_instance == 4
    assert spec.error_threshold == 10
    assert spec.mini_batch_error_threshold == 3
    assert spec.logging_level == "DEBUG"
    assert spec.retry_settings.max_retries == 3
    assert spec.retry_settings.timeout == 120
    assert spec.max_tries == 4
    assert spec.environment_variables == {"OMP_NUM_THREADS": "1"}
    assert spec.task.entry_script == "score.py"
    assert spec.task.append_row_to == "${{outputs.scores}}"


def test_defaults(tmp_path):
    spec = load_spec(write_yaml(tmp_path, minimal_dict()))

    assert spec.max_concurrency_per_instance == 1
    assert spec.error_threshold == -1
    assert spec.mini_batch_error_threshold == -1
    assert spec.logging_level == "INFO"
    assert spec.retry_settings.max_retries == 2
    assert spec.retry_settings.timeout == 60
    assert spec.max_tries == 3
    assert spec.resources.instance_count == 1
    assert spec.mini_batch_size is None
    assert spec.batch_size() == BatchSize(10, is_bytes=False)
    assert spec.task.type == "run_function"
    assert spec.task.program_arguments is None
    assert spec.task.append_row_to is None


def test_logging_level_is_case_insensitive(tmp_path):
    spec = load_spec(write_yaml(tmp_path, with_changes({"logging_level": "warning"})))
    assert spec.logging_level == "WARNING"


def test_byte_size_mini_batch(tmp_path):
    spec = load_spec(write_yaml(tmp_path, with_changes({"mini_batch_size": "10kb"})))
    assert spec.batch_size() == BatchSize(10240, is_bytes=True)


# -- paths --------------------------------------------------------------------


def test_relative_paths_are_relative_to_the_yaml_folder(tmp_path, monkeypatch):
    spec_dir = tmp_path / "jobs" / "iris"
    spec_dir.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)  # the current directory must not matter
    spec = load_spec(write_yaml(spec_dir, FULL_AZURE_YAML))

    assert spec.inputs["data"].path == at(spec_dir, "data")
    assert spec.inputs["model"].path == at(spec_dir, "models", "model.pkl")
    assert spec.outputs["scores"].path == at(spec_dir, "out")
    assert spec.task.code == at(spec_dir, "src")


def test_parent_relative_path(tmp_path):
    (tmp_path / "jobs").mkdir()
    spec = load_spec(write_yaml(tmp_path / "jobs", with_changes({"inputs.data.path": "../shared/data"})))
    assert spec.inputs["data"].path == at(tmp_path, "shared", "data")


def test_urls_stay_as_they_are(tmp_path):
    changes = {"inputs.data.path": "az://c/x", "outputs.out.path": "abfs://container/out/"}
    spec = load_spec(write_yaml(tmp_path, with_changes(changes)))
    assert spec.inputs["data"].path == "az://c/x"
    assert spec.outputs["out"].path == "abfs://container/out/"


def test_file_url_prefix_is_stripped(tmp_path):
    target = tmp_path / "elsewhere" / "data"
    spec = load_spec(write_yaml(tmp_path, with_changes({"inputs.data.path": f"file://{target}"})))
    assert spec.inputs["data"].path == str(target.resolve())


def test_output_without_path_stays_unset(tmp_path):
    spec = load_spec(write_yaml(tmp_path, with_changes({"outputs.out": {"type": "uri_folder"}})))
    assert spec.outputs["out"].path is None


def test_azureml_asset_reference_is_a_spec_error(tmp_path):
    error = spec_error_for(write_yaml(tmp_path, with_changes({"inputs.data.path": "azureml:foo:1"})))
    assert error.exit_code == 2
    assert "\n" not in error.headline
    assert "azureml:foo:1" in error.headline


def test_azureml_asset_reference_headline_names_the_file(tmp_path):
    path = write_yaml(tmp_path, with_changes({"inputs.data.path": "azureml:foo:1"}))
    assert_headline(spec_error_for(path), path, "azureml:foo:1")


# -- Azure-only keys ----------------------------------------------------------


@pytest.mark.parametrize(
    "key, value",
    [
        ("$schema", "https://azuremlschemas.azureedge.net/latest/parallelJob.schema.json"),
        ("compute", "azureml:cpu-cluster"),
        ("environment", {"image": "mcr.microsoft.com/azureml/openmpi4.1.0-ubuntu20.04"}),
        ("display_name", "A job"),
        ("description", "What it does"),
        ("tags", {"owner": "me"}),
        ("experiment_name", "exp"),
        ("task.environment", "azureml:AzureML-sklearn-1.0:1"),
        ("resources.instance_type", "Standard_DS3_v2"),
    ],
)
def test_azure_only_keys_are_accepted(tmp_path, key, value):
    spec = load_spec(write_yaml(tmp_path, with_changes({key: value})))
    assert spec.data_input_name == "data"


# -- every error is one SpecError line naming the file and the problem --------

ERROR_CASES = [
    pytest.param({"foo": 1}, ["unknown key 'foo'"], id="unknown-top-level-key"),
    pytest.param({"task.foo": 1}, ["'foo'", "task"], id="unknown-task-key"),
    pytest.param({"retry_settings.bogus": 1}, ["'bogus'", "retry_settings"], id="unknown-retry-key"),
    pytest.param({"resources.gpus": 1}, ["'gpus'", "resources"], id="unknown-resources-key"),
    pytest.param({"raypar.worker.cpus": 1}, ["'cpus'", "raypar.worker"], id="unknown-raypar-key"),
    pytest.param({"inputs.data.bogus": 1}, ["'bogus'", "inputs.data"], id="unknown-input-key"),
    pytest.param({"task": DELETE}, ["missing", "'task'"], id="missing-task"),
    pytest.param({"task.entry_script": DELETE}, ["missing", "entry_script"], id="missing-entry-script"),
    pytest.param({"input_data": DELETE}, ["missing", "'input_data'"], id="missing-input-data"),
    pytest.param({"type": "command"}, ["type", "'command'"], id="type-command"),
    pytest.param({"type": DELETE}, ["type", "parallel"], id="type-missing"),
    pytest.param({"input_data": "data"}, ["input_data", "'data'"], id="input-data-not-binding"),
    pytest.param({"input_data": "${{inputs.nope}}"}, ["input_data", "inputs.nope"], id="input-data-unknown"),
    pytest.param({"input_data": "${{outputs.out}}"}, ["input_data", "outputs.out"], id="input-data-output"),
    pytest.param({"inputs.n": 3, "input_data": "${{inputs.n}}"}, ["input_data", "inputs.n", "literal"],
                 id="input-data-literal"),
    pytest.param({"task.program_arguments": "--x ${{inputs.nope}}"},
                 ["task.program_arguments", "inputs.nope"], id="program-arguments-unknown-input"),
    pytest.param({"task.program_arguments": "--x ${{outputs.nope}}"},
                 ["task.program_arguments", "outputs.nope"], id="program-arguments-unknown-output"),
    pytest.param({"task.append_row_to": "${{inputs.data}}"}, ["task.append_row_to", "outputs"],
                 id="append-row-to-input"),
    pytest.param({"task.append_row_to": "out.txt"}, ["task.append_row_to", "out.txt"],
                 id="append-row-to-plain-path"),
    pytest.param({"task.append_row_to": "${{outputs.nope}}"}, ["task.append_row_to", "outputs.nope"],
                 id="append-row-to-unknown-output"),
    pytest.param({"mini_batch_size": "ten"}, ["mini_batch_size", "'ten'"], id="mini-batch-ten"),
    pytest.param({"mini_batch_size": 0}, ["mini_batch_size", "at least 1"], id="mini-batch-zero"),
    pytest.param({"mini_batch_size": "0kb"}, ["mini_batch_size", "at least 1"], id="mini-batch-zero-kb"),
    pytest.param({"mini_batch_size": "5tb"}, ["mini_batch_size", "'5tb'"], id="mini-batch-5tb"),
    pytest.param({"mini_batch_size": -3}, ["mini_batch_size"], id="mini-batch-negative"),
    pytest.param(
        {"mini_batch_size": True}, ["mini_batch_size"], id="mini-batch-true"
    ),
    pytest.param({"partition_keys": ["region"], "mini_batch_size": 5}, ["partition_keys", "mini_batch_size"],
                 id="partition-keys-and-size"),
    pytest.param({"retry_settings.timeout": 0}, ["retry_settings.timeout"], id="timeout-zero"),
    pytest.param({"retry_settings.timeout": 259201}, ["retry_settings.timeout", "259200"], id="timeout-too-big"),
    pytest.param({"retry_settings.max_retries": -1}, ["retry_settings.max_retries"], id="negative-retries"),
    pytest.param({"error_threshold": -2}, ["error_threshold"], id="error-threshold-minus-two"),
    pytest.param({"mini_batch_error_threshold": -2}, ["mini_batch_error_threshold"],
                 id="mini-batch-error-threshold-minus-two"),
    pytest.param({"max_concurrency_per_instance": 0}, ["max_concurrency_per_instance"], id="concurrency-zero"),
    pytest.param({"resources.instance_count": 0}, ["resources.instance_count"], id="instance-count-zero"),
    pytest.param({"resources.instance_count": "2-8"}, ["resources", "'2-8'", "'2..8'"], id="instance-range-typo"),
    pytest.param({"resources.instance_count": "8..2"}, ["resources", "max_instance_count 2 is below instance_count 8"],
                 id="instance-range-backwards"),
    pytest.param({"resources.instance_count": "1..4", "resources.max_instance_count": 4},
                 ["resources", "give one of them"], id="instance-range-and-max"),
    pytest.param({"resources.max_instance_count": 0}, ["resources.max_instance_count"], id="max-instances-zero"),
    pytest.param({"logging_level": "LOUD"}, ["logging_level", "INFO"], id="bad-logging-level"),
    pytest.param({"task.entry_script": "score.sh"}, ["entry_script", ".py", "score.sh"], id="entry-script-not-py"),
    pytest.param({"task.type": "command"}, ["task.type"], id="task-type"),
    pytest.param({"inputs.data.type": "folder"}, ["inputs.data.type"], id="input-type"),
    pytest.param({"raypar.worker": {"num_cpus": 0}}, ["raypar.worker", "reserve"], id="worker-reserves-nothing"),
    pytest.param({"raypar.worker": {"num_cpus": 0, "memory": "lots"}}, ["raypar.worker.memory"],
                 id="worker-bad-memory"),
    pytest.param(
        {"task.program_arguments": '--label "unclosed'}, ["task.program_arguments"], id="unbalanced-quote"
    ),
]


@pytest.mark.parametrize("changes, fragments", ERROR_CASES)
def test_invalid_spec_gives_one_line_spec_error(tmp_path, changes, fragments):
    path = write_yaml(tmp_path, with_changes(changes))
    assert_headline(spec_error_for(path), path, *fragments)


def test_invalid_yaml_names_the_line(tmp_path):
    path = write_yaml(tmp_path, "type: parallel\nname: a\n  bad: indent\n")
    assert_headline(spec_error_for(path), path, "line 3", "not valid YAML")


def test_yaml_list_is_not_a_spec(tmp_path):
    path = write_yaml(tmp_path, "- type: parallel\n- name: a\n")
    assert_headline(spec_error_for(path), path, "mapping", "list")


def test_empty_yaml_is_not_a_spec(tmp_path):
    path = write_yaml(tmp_path, "")
    assert_headline(spec_error_for(path), path, "mapping")


def test_missing_spec_file(tmp_path):
    path = tmp_path / "nope.yml"
    assert_headline(spec_error_for(path), path, "not found")


def test_spec_from_dict_errors_name_the_source():
    with pytest.raises(SpecError) as info:
        spec_from_dict(with_changes({"foo": 1}), base_dir="/x", source="inline-spec")
    assert info.value.headline == "inline-spec: unknown key 'foo'"


# -- size strings ---------------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [
        ("10", BatchSize(10, is_bytes=False)),
        (" 7 ", BatchSize(7, is_bytes=False)),
        (10, BatchSize(10, is_bytes=False)),
        (1, BatchSize(1, is_bytes=False)),
        ("10kb", BatchSize(10 * 1024, is_bytes=True)),
        ("10KB", BatchSize(10 * 1024, is_bytes=True)),
        ("1mb", BatchSize(1024**2, is_bytes=True)),
        ("1 MB", BatchSize(1024**2, is_bytes=True)),
        ("100 mb", BatchSize(100 * 1024**2, is_bytes=True)),
        ("1gb", BatchSize(1024**3, is_bytes=True)),
    ],
)
def test_parse_size(value, expected):
    assert parse_size(value) == expected


@pytest.mark.parametrize("value", ["ten", "", "5tb", "1.5mb", "-1", "0", "0kb", 0, -1, True, False])
def test_parse_size_rejects(value):
    with pytest.raises(ValueError):
        parse_size(value)


# -- binding ----------------------------------------------------------------------


def binding_spec(tmp_path: Path, out_type: str = "uri_folder", out_path: str = "out",
                 program_arguments: str = "") -> dict:
    data = minimal_dict()
    data["inputs"].update({
        "model": {"type": "uri_file", "path": "models/m.pkl"},
        "threshold": 0.5, "verbose": True, "quiet": False, "count": 3, "label": "iris",
    })
    data["outputs"] = {"scores": {"type": out_type, "path": out_path}}
    data["task"].update({"program_arguments": program_arguments, "append_row_to": "${{outputs.scores}}"})
    return data


def test_bind_substitutes_inputs_and_outputs(tmp_path):
    args = ("--data ${{inputs.data}} --model ${{ inputs.model }} --t ${{inputs.threshold}} "
            "--v ${{inputs.verbose}} --q ${{inputs.quiet}} --n ${{inputs.count}} "
            "--label=${{inputs.label}} --out ${{outputs.scores}} 'two words'")
    spec = load_spec(write_yaml(tmp_path, binding_spec(tmp_path, program_arguments=args)))
    bound = bind(spec)

    entry = at(tmp_path, "src", "score.py")
    assert bound.entry_script_path == entry
    assert bound.argv == [
        entry,
        "--data", at(tmp_path, "data"),
        "--model", at(tmp_path, "models", "m.pkl"),
        "--t", "0.5",
        "--v", "true",
        "--q", "false",
        "--n", "3",
        "--label=iris",
        "--out", at(tmp_path, "out"),
        "two words",
    ]


def test_bind_without_program_arguments(tmp_path):
    spec = load_spec(write_yaml(tmp_path, minimal_dict()))
    bound = bind(spec)
    assert bound.argv == [at(tmp_path, "src", "score.py")]
    assert bound.append_row_path is None


def test_bind_keeps_a_path_with_spaces_as_one_argument(tmp_path):
    data = with_changes({"inputs.data.path": "my data", "task.program_arguments": "--data ${{inputs.data}}"})
    spec = load_spec(write_yaml(tmp_path, data))
    assert bind(spec).argv[1:] == ["--data", at(tmp_path, "my data")]


def test_append_row_to_folder_output(tmp_path):
    spec = load_spec(write_yaml(tmp_path, binding_spec(tmp_path, "uri_folder", "out")))
    assert bind(spec).append_row_path == f"{at(tmp_path, 'out')}/{APPEND_ROW_FILE_NAME}"
    assert APPEND_ROW_FILE_NAME == "parallel_run_step.txt"


def test_append_row_to_file_output(tmp_path):
    spec = load_spec(write_yaml(tmp_path, binding_spec(tmp_path, "uri_file", "out/rows.txt")))
    assert bind(spec).append_row_path == at(tmp_path, "out", "rows.txt")


def test_append_row_to_url_folder_output(tmp_path):
    spec = load_spec(write_yaml(tmp_path, binding_spec(tmp_path, "uri_folder", "az://c/out/")))
    assert bind(spec).append_row_path == "az://c/out/parallel_run_step.txt"


def test_fill_output_paths(tmp_path):
    data = binding_spec(tmp_path)
    data["outputs"] = {"scores": {"type": "uri_folder"}, "kept": {"type": "uri_folder", "path": "kept"}}
    spec = load_spec(write_yaml(tmp_path, data))

    filled = fill_output_paths(spec, "/jobs/j1/outputs/")

    assert filled.outputs["scores"].path == "/jobs/j1/outputs/scores"
    assert filled.outputs["kept"].path == at(tmp_path, "kept")
    assert spec.outputs["scores"].path is None  # the original is not modified
    assert bind(filled).append_row_path == "/jobs/j1/outputs/scores/parallel_run_step.txt"


def test_bind_output_without_path_is_a_spec_error(tmp_path):
    data = binding_spec(tmp_path)
    data["outputs"] = {"scores": {"type": "uri_folder"}}
    spec = load_spec(write_yaml(tmp_path, data))
    with pytest.raises(SpecError, match="outputs.scores"):
        bind(spec)


# -- round trip -------------------------------------------------------------------


def test_to_yaml_round_trips_the_full_spec(tmp_path):
    spec = load_spec(write_yaml(tmp_path, FULL_AZURE_YAML))
    again = spec_from_dict(yaml.safe_load(spec.to_yaml()))
    assert again.to_dict() == spec.to_dict()
    assert again == spec


def test_to_yaml_round_trips_raypar_block(tmp_path):
    data = with_changes({
        "raypar": {"worker": {"num_cpus": 0.5, "num_gpus": 1, "memory": "2gb", "resources": {"ssd": 1}},
                   "placement_timeout": 5},
        "mini_batch_size": "1mb",
        "inputs.flag": False,
        "inputs.digits": "007",
        "outputs.out": {"type": "uri_folder"},
    })
    spec = load_spec(write_yaml(tmp_path, data))
    again = spec_from_dict(yaml.safe_load(spec.to_yaml()))
    assert again.to_dict() == spec.to_dict()
    assert again.inputs["digits"] == "007"
    assert again.raypar.worker.memory_bytes() == 2 * 1024**3


def test_to_dict_uses_azure_key_names(tmp_path):
    spec = load_spec(write_yaml(tmp_path, FULL_AZURE_YAML))
    dumped = spec.to_dict()
    assert dumped["$schema"].endswith("parallelJob.schema.json")
    assert "schema_" not in dumped


def test_allowed_failed_percent_from_field_program_argument_and_binding(tmp_path):
    base = minimal_dict()
    assert spec_from_dict(base, base_dir=tmp_path).failed_percent_limit() == 100
    assert spec_from_dict({**base, "allowed_failed_percent": 5}, base_dir=tmp_path).failed_percent_limit() == 5
    bound = {**base, "inputs": {**base["inputs"], "pct": 12.5}}
    bound["task"] = {**base["task"], "program_arguments": "--x 1 --allowed_failed_percent ${{inputs.pct}}"}
    assert spec_from_dict(bound, base_dir=tmp_path).failed_percent_limit() == 12.5
    bound["task"]["program_arguments"] = "--allowed_failed_percent=150"
    with pytest.raises(SpecError, match=r"--allowed_failed_percent 150 is not in \[0, 100\]"):
        spec_from_dict(bound, base_dir=tmp_path)


@pytest.mark.parametrize("changes", [
    {"allowed_failed_percent": True},
    {"raypar": {"worker": {"num_cpus": True}}},
    {"raypar": {"placement_timeout": False}},
])
def test_yaml_booleans_are_not_numbers(tmp_path, changes):
    with pytest.raises(SpecError, match="expected a number, got"):
        spec_from_dict({**minimal_dict(), **changes}, base_dir=tmp_path)


def test_relocate_code_moves_paths_inside_task_code_only(tmp_path):
    from raypar.spec.loading import relocate_code, spec_from_dict

    code = tmp_path / "proj"
    spec = spec_from_dict({
        "type": "parallel", "input_data": "${{inputs.data}}",
        "inputs": {"data": {"type": "uri_folder", "path": str(code / "data")},
                   "other": {"type": "uri_folder", "path": "az://c/other"},
                   "far": {"type": "uri_folder", "path": str(tmp_path / "proj2")}},
        "outputs": {"out": {"type": "uri_folder", "path": str(tmp_path / "out")}},
        "task": {"code": str(code), "entry_script": "score.py"},
        "environment": {"conda_file": str(code / "conda.yml")},
    })
    moved = relocate_code(spec, str(tmp_path / "copy"))
    assert moved.environment["conda_file"] == str(tmp_path / "copy" / "conda.yml")
    assert moved.task.code == str(tmp_path / "copy")
    assert moved.inputs["data"].path == str(tmp_path / "copy" / "data")
    assert moved.inputs["other"].path == "az://c/other"
    assert moved.inputs["far"].path == str(tmp_path / "proj2")  # a sibling whose name starts alike stays
    assert moved.outputs["out"].path == str(tmp_path / "out")


def test_spec_from_an_environment_variable(tmp_path, monkeypatch):
    from raypar.spec.loading import load_spec

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("THE_SPEC", "type: parallel\ninput_data: ${{inputs.d}}\n"
                                   "inputs: {d: {type: uri_folder, path: ./data}}\n"
                                   "task: {code: ., entry_script: s.py}\n")
    spec = load_spec("env:THE_SPEC")
    assert spec.inputs["d"].path == str(tmp_path / "data")
    with pytest.raises(SpecError, match="env:NOPE: environment variable NOPE is not set"):
        load_spec("env:NOPE")


DATASTORE_JOB = """\
type: parallel
name: score-iris
inputs:
  data: {type: uri_folder, path: azureml://datastores/workspaceblobstore/paths/iris/input}
outputs:
  scores:
    type: uri_file
    path: azureml://datastores/${{default_datastore}}/paths/${{name}}/predictions.csv
  logs:
    type: uri_folder
    path: azureml://subscriptions/s1/resourcegroups/rg/workspaces/ws/datastores/archive/paths/logs
input_data: ${{inputs.data}}
task: {code: ., entry_script: score.py, append_row_to: "${{outputs.scores}}"}
raypar:
  datastores: {archive: ./archive}
"""


def test_datastore_urls_resolve_through_the_spec_and_the_environment_mapping(tmp_path, monkeypatch):
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "job.yml").write_text(DATASTORE_JOB)
    (tmp_path / "config").mkdir()
    # RAYPAR_DATASTORES names a YAML file: its relative folders are relative to that file
    (tmp_path / "config" / "stores.yml").write_text(
        "workspaceblobstore: ../blob\ndefault: workspaceblobstore\narchive: az://ignored/the-spec-wins\n")
    monkeypatch.setenv("RAYPAR_DATASTORES", str(tmp_path / "config" / "stores.yml"))

    spec = load_spec(tmp_path / "jobs" / "job.yml")

    assert spec.inputs["data"].path == str(tmp_path / "blob" / "iris" / "input")
    assert spec.outputs["scores"].path == str(tmp_path / "blob" / "score-iris" / "predictions.csv")
    assert spec.outputs["logs"].path == str(tmp_path / "jobs" / "archive" / "logs")  # relative to the job YAML

    monkeypatch.setenv("RAYPAR_DATASTORES", '{"default": "az://container/prefix/"}')  # inline JSON
    data = yaml.safe_load(DATASTORE_JOB)
    data["inputs"]["data"]["path"] = str(tmp_path)
    spec = spec_from_dict(data, base_dir=tmp_path)
    assert spec.outputs["scores"].path == "az://container/prefix/score-iris/predictions.csv"

    monkeypatch.setenv("RAYPAR_DATASTORES", "{not json")
    with pytest.raises(SpecError, match="RAYPAR_DATASTORES: expected a mapping of datastore name -> folder or URL"):
        spec_from_dict(data, base_dir=tmp_path)


@pytest.mark.parametrize("text, expected", [
    (3, 3), ("4096", 4096), ("2gb", 2 * 1024**3), ("2GB", 2 * 1024**3), ("2Gi", 2 * 1024**3), ("2GiB", 2 * 1024**3),
    ("512Mi", 512 * 1024**2), ("1.5gb", 3 * 1024**3 // 2), ("100kb", 102400), ("2G", 2 * 1024**3), ("1Ti", 1024**4),
])
def test_memory_sizes_read_as_azure_and_kubernetes_write_them(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["lots", "2 bananas", "-1gb", "0", "0.1b", "1e9", True, 1.5])
def test_a_memory_size_that_is_not_one_is_refused(text):
    with pytest.raises(ValueError):
        parse_bytes(text)


@pytest.mark.parametrize("resources", [{"instance_count": "2..8"}, {"instance_count": 2, "max_instance_count": 8}])
def test_elastic_instances_as_a_range_or_azures_max_instance_count(resources):
    spec = spec_from_dict({**minimal_dict(), "resources": resources})

    assert (spec.resources.instance_count, spec.resources.max_instance_count, spec.resources.elastic) == (2, 8, True)
    again = spec_from_dict(spec.model_dump(exclude_none=True))  # as the job dir keeps it
    assert (again.resources.instance_count, again.resources.max_instance_count) == (2, 8)
    assert not spec_from_dict(minimal_dict()).resources.elastic
