"""Jobs written with Azure ML's Python SDKs: v2 `parallel_run_function` and v1 `ParallelRunStep`,
their YAML (`.dump()`, `raypar convert`) and the v1 → v2 conversion semantics."""

import shutil

import pytest
import yaml
from conftest import ENTRY_DIR, quiet, write_files
from test_cli import assert_one_line_error, cli

import raypar
from raypar import (
    AssetTypes,
    Input,
    InputOutputModes,
    Output,
    ParallelRunConfig,
    ParallelRunStep,
    RetrySettings,
    RunFunction,
    parallel_run_function,
)
from raypar.azureml import JobResourceConfiguration
from raypar.azureml.v1 import Dataset, PipelineData, PipelineParameter
from raypar.errors import SpecError
from raypar.jobdir.state import JobState
from raypar.spec.binding import bind, fill_output_paths
from raypar.spec.loading import spec_from_yaml
from raypar.spec.models import JobSpec

FILES = {f"f{i}.txt": f"value {i}" for i in range(8)}
ROWS = [f"{name} {text.upper()}" for name, text in sorted(FILES.items())]
ON_CLUSTER = {"worker": {"num_cpus": 0.5}, "placement_timeout": 30}


@pytest.fixture
def project(tmp_path, monkeypatch):
    """tmp_path as the working directory, with code/ (tests/entry) and data/ (FILES)."""
    shutil.copytree(ENTRY_DIR, tmp_path / "code")
    write_files(tmp_path / "data", FILES)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def v1_config(**overrides) -> ParallelRunConfig:
    settings = dict(source_directory="code", entry_script="score.py", error_threshold=10,
                    output_action="append_row", node_count=2)
    settings.update(overrides)
    return ParallelRunConfig(**settings)


def v1_step(config=None, **overrides) -> ParallelRunStep:
    settings = dict(name="score-files", parallel_run_config=config or v1_config(), inputs=["data"], output="out")
    settings.update(overrides)
    return ParallelRunStep(**settings)


# -- v1 → v2 conversion -----------------------------------------------------------------------


def test_v1_defaults_convert_to_azures_v2_values(project):
    data = v1_step().to_dict()

    assert data["retry_settings"] == {"max_retries": 2, "timeout": 60}  # run_max_try 3 tries = 2 retries
    assert data["resources"] == {"instance_count": 2}
    assert (data["error_threshold"], data["logging_level"], data["is_deterministic"]) == (10, "INFO", True)
    assert "mini_batch_error_threshold" not in data and "max_concurrency_per_instance" not in data
    assert data["task"] == {"type": "run_function", "code": str(project / "code"), "entry_script": "score.py",
                            "append_row_to": "${{outputs.output}}"}
    assert data["inputs"] == {"input_data": {"type": "uri_folder", "path": str(project / "data")}}
    assert data["input_data"] == "${{inputs.input_data}}"
    spec = JobSpec.model_validate(data)
    assert (spec.max_tries, spec.failed_percent_limit(), spec.mini_batch_error_threshold) == (3, 100, -1)
    assert spec.max_concurrency_per_instance == 1 and spec.batch_size().value == 10
    assert bind(spec).append_row_path == str(project / "out" / "parallel_run_step.txt")


def test_v1_settings_map_to_v2_keys(project):
    config = v1_config(run_max_try=5, run_invocation_timeout=30, process_count_per_node=4, allowed_failed_count=3,
                       allowed_failed_percent=12.5, logging_level="DEBUG", mini_batch_size=PipelineParameter("b", 4),
                       environment_variables={"A": "1"}, description="scores", environment=object(),
                       compute_target="cpu-cluster")
    step = v1_step(config, allow_reuse=False, arguments=["--verbose", 2, "--label", "a b"])

    data = step.to_dict()
    assert data["retry_settings"] == {"max_retries": 4, "timeout": 30}
    assert data["max_concurrency_per_instance"] == 4 and data["mini_batch_error_threshold"] == 3
    assert (data["mini_batch_size"], data["logging_level"], data["description"]) == ("4", "DEBUG", "scores")
    assert data["environment_variables"] == {"A": "1"} and data["is_deterministic"] is False
    assert data["task"]["program_arguments"] == "--verbose 2 --label 'a b' --allowed_failed_percent 12.5"
    assert "compute" not in data and "environment" not in data  # accepted, ignored
    assert step.to_spec().failed_percent_limit() == 12.5
    no_folder = v1_step(v1_config(source_directory=None, entry_script="code/score.py")).to_dict()["task"]
    assert (no_folder["code"], no_folder["entry_script"]) == (str(project / "code"), "score.py")


def test_summary_only_has_no_append_row_and_needs_no_output(project):
    data = v1_step(v1_config(output_action="summary_only"), output=None).to_dict()
    assert "append_row_to" not in data["task"] and "outputs" not in data
    with pytest.raises(ValueError, match="specify output"):
        v1_step(output=None)


def test_append_row_file_name_is_a_file_output_inside_the_output_folder(project):
    spec = v1_step(v1_config(append_row_file_name="results.txt")).to_spec()
    assert spec.outputs["output"].type == "uri_folder"  # still the folder the script may write to
    assert bind(spec).append_row_path == str(project / "out" / "results.txt")
    # PipelineData has no path until the job starts: the folder goes under the job dir, the file name in the spec
    spec = fill_output_paths(v1_step(v1_config(append_row_file_name="results.txt"),
                                     output=PipelineData("scores")).to_spec(), "/jobs/j/outputs")
    assert spec.outputs["scores"].type == "uri_folder" and spec.raypar.append_row_file_name == "results.txt"
    assert bind(spec).append_row_path == "/jobs/j/outputs/scores/results.txt"


def test_partition_keys_as_a_json_string_as_pipeline_parameters_give_them(project):
    keys = PipelineParameter("keys", '["store", "day"]')
    assert v1_step(v1_config(partition_keys=keys)).to_dict()["partition_keys"] == ["store", "day"]
    with pytest.raises(ValueError, match="JSON list"):
        v1_config(partition_keys="store")
    with pytest.raises(ValueError, match="cannot be used together"):
        v1_config(partition_keys=["store"], mini_batch_size=2)


@pytest.mark.parametrize("make, error, match", [
    (lambda: v1_step(arguments=["--run_max_try", "5"]), ValueError, "'run_max_try' is a reserved argument"),
    (lambda: v1_step(arguments=["--x", "1", "--output=o"]), ValueError, "'output' is a reserved argument"),
    (lambda: v1_step(arguments=["positional"]), ValueError, "you can only use keyword argument"),
    (lambda: v1_step(name="Bad_Name"), ValueError, "step name"),
    (lambda: v1_step(inputs=["data", "data"]), ValueError, "one input"),
    (lambda: v1_config(run_max_try=0), ValueError, "run_max_try"),
    (lambda: v1_config(output_action="rows"), ValueError, "summary_only or append_row"),
    (lambda: v1_config(append_row_file_name="a/b.txt"), ValueError, "valid UNIX file name"),
    (lambda: ParallelRunConfig(entry_script="score.py", output_action="append_row"), TypeError,
     "missing required argument.*error_threshold, node_count"),
    (lambda: v1_config(node_cuont=2), TypeError, "node_cuont"),
    (lambda: parallel_run_function(name="x", instance_cuont=2), TypeError, "instance_cuont"),
    (lambda: RunFunction(code=".", entry_script="s.py", bogus=1), TypeError, "bogus"),
    (lambda: Input(type="uri_folder", default=3), ValueError, "no default value"),
])
def test_v1_and_v2_refuse_what_azure_refuses(project, make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_datasets_and_parameters_in_arguments_become_bindings(project):
    model = Dataset.File.from_files("data/f0.txt").as_named_input("model")
    extra = Dataset.File.from_files("code")  # not among the inputs: becomes one, as in v1
    step = v1_step(inputs=[Dataset.File.from_files("data").as_named_input("docs").as_download()],
                   output=PipelineData("scores"), side_inputs=[model],
                   arguments=["--model", model.as_mount(), "--n", PipelineParameter("n", 7), "--extra", extra,
                              "--out", "${{outputs.scores}}"])
    data = step.to_dict()
    assert data["inputs"]["docs"] == {"type": "uri_folder", "path": str(project / "data"), "mode": "download"}
    assert data["inputs"]["model"] == {"type": "uri_file", "path": str(project / "data" / "f0.txt")}
    assert data["inputs"]["argument_input_5"]["path"] == str(project / "code")
    assert data["outputs"] == {"scores": {"type": "uri_folder"}}
    assert data["task"]["program_arguments"] == \
        "--model ${{inputs.model}} --n 7 --extra ${{inputs.argument_input_5}} --out ${{outputs.scores}}"
    spec = step.to_spec()
    assert spec.input_data == "${{inputs.docs}}"


def test_tabular_dataset_reads_the_input_as_a_table(project):
    step = v1_step(inputs=[Dataset.Tabular.from_delimited_files("data")])
    assert step.to_spec().raypar.input_format == "csv"


# -- v2 shape ----------------------------------------------------------------------------------


def test_v2_component_binds_inputs_when_called_and_keeps_azures_defaults(project):
    score = parallel_run_function(
        name="score", inputs={"docs": Input(type=AssetTypes.MLTABLE, description="to split"),
                              "model": Input(type=AssetTypes.CUSTOM_MODEL),
                              "n": Input(type="integer", default="3"), "label": "x"},
        outputs={"out": Output(type=AssetTypes.URI_FOLDER, mode=InputOutputModes.MOUNT)},
        input_data="${{inputs.docs}}",
        task=RunFunction(code="code", entry_script="score.py",
                         program_arguments="--model ${{inputs.model}} --n ${{inputs.n}}"))
    with pytest.raises(SpecError, match=r"inputs.docs has no path: bind it"):
        score.to_dict()
    with pytest.raises(TypeError, match="unexpected input 'bogus'"):
        score(bogus="data")
    with pytest.raises(TypeError, match="is data"):
        score(docs=3)

    job = score(docs=Input(path="data", type=AssetTypes.URI_FOLDER), model="code/score.py", n=5)
    job.inputs.docs.mode = InputOutputModes.EVAL_MOUNT  # Azure's attribute style
    assert score.inputs.docs.path is None  # the component is unchanged
    data = job.to_dict()
    assert data["inputs"] == {
        "docs": {"type": "uri_folder", "path": str(project / "data"), "mode": "eval_mount", "description": "to split"},
        "model": {"type": "uri_folder", "path": str(project / "code" / "score.py")},  # a model: a path to raypar
        "n": 5, "label": "x"}
    assert data["outputs"] == {"out": {"type": "uri_folder", "mode": "rw_mount"}}
    spec = job.to_spec()
    defaults = JobSpec.model_fields
    assert spec.retry_settings.max_retries == 2 and spec.retry_settings.timeout == 60
    assert (spec.resources.instance_count, spec.max_concurrency_per_instance) == (1, 1)
    assert spec.error_threshold == defaults["error_threshold"].default == -1
    assert spec.task.append_row_to is None and spec.logging_level == "INFO"


def test_v2_dump_writes_paths_relative_to_the_yaml(project):
    job = parallel_run_function(
        name="score", inputs={"docs": Input(path="data")}, outputs={"out": Output(path="/elsewhere/out")},
        input_data="${{inputs.docs}}", task=RunFunction(code="code", entry_script="score.py"),
        retry_settings=RetrySettings(max_retries=0))
    (project / "specs").mkdir()
    job.dump("specs/job.yml")
    data = yaml.safe_load((project / "specs" / "job.yml").read_text())
    assert data["inputs"]["docs"]["path"] == str(project / "data")  # outside specs/: absolute
    assert data["outputs"]["out"]["path"] == "/elsewhere/out"
    job.dump("job.yml")
    data = yaml.safe_load((project / "job.yml").read_text())
    assert (data["inputs"]["docs"]["path"], data["task"]["code"]) == ("./data", "./code")
    assert data["retry_settings"] == {"max_retries": 0}


# -- on the cluster -----------------------------------------------------------------------------


def rows(path):
    return path.read_text().splitlines()


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_v2_job_runs_and_its_dump_runs_from_the_cli_with_the_same_rows(ray_cluster, project):
    score = parallel_run_function(
        name="v2-score", inputs={"docs": Input(type=AssetTypes.URI_FOLDER)},
        outputs={"out": Output(type=AssetTypes.URI_FOLDER, path="py_out")}, input_data="${{inputs.docs}}",
        mini_batch_size="2", instance_count=2, raypar=ON_CLUSTER,
        retry_settings=RetrySettings(max_retries=1, timeout=60),
        task=RunFunction(code="code", entry_script="score.py", append_row_to="${{outputs.out}}"))
    job = score(docs=Input(path="data"))

    outcome = raypar.run(job, job_dir=str(project / "job"), echo=quiet).wait()

    assert outcome.state is JobState.SUCCEEDED and outcome.total == 4
    assert rows(project / "py_out" / "parallel_run_step.txt") == ROWS
    job.outputs.out.path = "cli_out"
    job.dump("job.yml")
    result = cli("run", "job.yml", "--job-dir", "cli_job", "--address", ray_cluster.address, cwd=project)
    assert result.returncode == 0, result.stderr
    assert (project / "cli_out" / "parallel_run_step.txt").read_bytes() == \
        (project / "py_out" / "parallel_run_step.txt").read_bytes()


V1_YAML = """\
parallel_run_config:
  source_directory: code
  entry_script: score.py
  mini_batch_size: "2"
  error_threshold: 5
  allowed_failed_percent: 50
  output_action: append_row
  append_row_file_name: results.txt
  node_count: 1
  process_count_per_node: 2
  run_max_try: 1
  compute_target_name: cpu-cluster
name: score-v1
inputs: [{name: docs, path: data}]
output: {name: scores, path: yaml_out}
arguments: [--exec-log, "${{outputs.scores}}"]
raypar: {worker: {num_cpus: 0.5}, placement_timeout: 30}
"""


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_v1_step_and_its_converted_yaml_give_byte_identical_outputs(ray_cluster, project):
    write_files(project / "data", {"f5.txt": "bad value"})  # its batch fails once: 1 of 4 is within 50%
    config = ParallelRunConfig(source_directory="code", entry_script="score.py", mini_batch_size="2",
                               error_threshold=5, allowed_failed_percent=50, output_action="append_row",
                               append_row_file_name="results.txt", node_count=1, process_count_per_node=2,
                               run_max_try=1, compute_target="cpu-cluster")
    scores = Output(path="py_out")
    step = ParallelRunStep(name="score-v1", parallel_run_config=config,
                           inputs=[Dataset.File.from_files("data").as_named_input("docs")],
                           output=scores, arguments=["--exec-log", scores], raypar=ON_CLUSTER)

    outcome = raypar.run(step, job_dir=str(project / "job"), echo=quiet).wait()

    assert outcome.state is JobState.SUCCEEDED and (outcome.completed, outcome.failed) == (3, 1)
    expected = [r for r in ROWS if not r.startswith(("f4", "f5"))]
    assert rows(project / "py_out" / "results.txt") == expected
    (project / "v1.yml").write_text(V1_YAML)
    converted = cli("convert", "v1.yml", "-o", "v2.yml", cwd=project)
    assert converted.returncode == 0, converted.stderr
    outcome = raypar.run("v2.yml", job_dir=str(project / "yaml_job"), echo=quiet).wait()  # as `raypar run` reads it
    assert outcome.state is JobState.SUCCEEDED and (outcome.completed, outcome.failed) == (3, 1)
    assert (project / "yaml_out" / "results.txt").read_bytes() == (project / "py_out" / "results.txt").read_bytes()


# -- raypar convert -----------------------------------------------------------------------------


def test_convert_yaml_prints_the_v2_spec(project):
    (project / "v1.yml").write_text(V1_YAML)
    result = cli("convert", "v1.yml", cwd=project)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("# Converted by raypar")
    spec = spec_from_yaml(result.stdout)
    assert spec.task.program_arguments == "--exec-log ${{outputs.scores}} --allowed_failed_percent 50"
    assert (spec.retry_settings.max_retries, spec.max_concurrency_per_instance, spec.error_threshold) == (0, 2, 5)
    assert spec.inputs["docs"].path == str(project / "data")
    assert bind(spec).append_row_path == str(project / "yaml_out" / "results.txt")


STEPS_PY = """\
from raypar import ParallelRunConfig, ParallelRunStep
from raypar.azureml.v1 import Dataset, PipelineData

config = ParallelRunConfig(source_directory="code", entry_script="score.py", error_threshold=-1,
                           output_action="append_row", node_count=1)
first = ParallelRunStep("first-step", config, [Dataset.File.from_files("data")], output=PipelineData("scores"))
{second}
if __name__ == "__main__":
    raise SystemExit("submitting to Azure")
"""


def test_convert_python_runs_the_file_and_takes_its_step(project):
    (project / "one.py").write_text(STEPS_PY.format(second=""))
    (project / "two.py").write_text(STEPS_PY.format(second='second = ParallelRunStep("second", config, ["data"], '
                                                           'output="o")'))
    result = cli("convert", str(project / "one.py"), cwd=project.parent)  # its paths are relative to the file
    assert result.returncode == 0, result.stderr
    spec = spec_from_yaml(result.stdout)
    assert (spec.name, spec.data_input.path, spec.task.code) == ("first-step", str(project / "data"),
                                                                 str(project / "code"))
    assert_one_line_error(cli("convert", "two.py", cwd=project), 2, "several ParallelRunSteps (first, second)",
                          "--step")
    picked = cli("convert", "two.py", "--step", "second", cwd=project)
    assert picked.returncode == 0 and spec_from_yaml(picked.stdout).name == "second"
    assert_one_line_error(cli("convert", "missing.py", cwd=project), 2, "missing.py: file not found")


@pytest.mark.parametrize("name, text, fragments", [
    ("v1.yml", V1_YAML.replace("node_count: 1", "node_count: 1\n  bogus: 1"),
     ["v1.yml", "unknown key 'parallel_run_config.bogus'"]),
    ("v1.yml", V1_YAML.replace("[--exec-log", "[--run_max_try, '2', --exec-log"), ["'run_max_try' is a reserved"]),
    ("v1.yml", "name: x\n", ["parallel_run_config: mapping"]),
    ("v1.yml", V1_YAML.replace("run_max_try: 1", "run_invocation_timeout: 999999"),
     ["retry_settings.timeout"]),
    ("bad.py", "raise RuntimeError('no workspace')\n", ["bad.py: RuntimeError: no workspace"]),
    ("empty.py", "x = 1\n", ["defines no ParallelRunStep"]),
    ("v1.txt", "x", ["give a v1 config as .yml"]),
])
def test_convert_errors_are_one_line_exit_2(project, name, text, fragments):
    (project / name).write_text(text)
    assert_one_line_error(cli("convert", name, cwd=project), 2, *fragments)


def test_v2_resources_with_max_instance_count_make_an_elastic_job(project):
    job = parallel_run_function(
        name="score", inputs={"docs": Input(path="data")}, input_data="${{inputs.docs}}",
        task=RunFunction(code="code", entry_script="score.py"),
        resources=JobResourceConfiguration(instance_count=2, max_instance_count=6))

    assert job.to_dict()["resources"] == {"instance_count": 2, "max_instance_count": 6}
    spec = job.to_spec()
    assert (spec.resources.instance_count, spec.resources.max_instance_count, spec.resources.elastic) == (2, 6, True)
