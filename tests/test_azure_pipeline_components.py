"""Azure's "upgrade parallel run step to SDK v2" pipeline (azureml-examples
``1g_pipeline_with_parallel_nodes``): a ``prepare_data`` command component from
``load_component``, two ``parallel_run_function`` nodes (file and tabular data),
the guide's ``@pipeline`` function as written, run by ``MLClient(...).jobs``;
and ``command(...)`` nodes."""

import json
from pathlib import Path

import pytest
from conftest import write_files

from raypar.azureml import (
    AssetTypes,
    Environment,
    Input,
    InputOutputModes,
    MLClient,
    Output,
    RunFunction,
    command,
    load_component,
    parallel_run_function,
    pipeline,
)
from raypar.errors import SpecError

ON_CLUSTER = {"worker": {"num_cpus": 0.5}, "placement_timeout": 30}

IRIS = ("sepal_length,sepal_width,petal_length,petal_width,variety_true\n"
        "5.1,3.5,1.4,0.2,Setosa\n4.9,3.0,1.4,0.2,Setosa\n6.3,3.3,6.0,2.5,Virginica\n"
        "5.8,2.7,5.1,1.9,Virginica\n5.0,3.6,1.4,0.2,Setosa\n")

# The sample's src/prepare_data.yml, as published.
PREPARE_DATA_YML = """\
$schema: https://azuremlschemas.azureedge.net/latest/commandComponent.schema.json

type: command

name: prepare_file_tabular_data
display_name: Prepare File Tabular Data
version: 1

inputs:
  input_data:
    type: uri_folder

outputs:
  file_output_data:
    type: mltable
  tabular_output_data:
    type: mltable

code: ./

environment: azureml:AzureML-sklearn-1.0-ubuntu20.04-py38-cpu:1

command: >-
  python prepare_data.py
  --input_data ${{inputs.input_data}}
  --file_output_data ${{outputs.file_output_data}}
  --tabular_output_data ${{outputs.tabular_output_data}}
"""

# Splits the CSVs of --input_data into one text file per row (file data) and one CSV (tabular data),
# each folder with its MLTable. Standard library only: it runs on whatever `python` the shell finds.
PREPARE_DATA_PY = '''\
import argparse
import csv
from pathlib import Path

parser = argparse.ArgumentParser()
parser.add_argument("--input_data")
parser.add_argument("--file_output_data")
parser.add_argument("--tabular_output_data")
args = parser.parse_args()

rows, header = [], None
for path in sorted(Path(args.input_data).glob("*.csv")):
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows += list(reader)

files, table = Path(args.file_output_data), Path(args.tabular_output_data)
for i, row in enumerate(rows):
    (files / f"row_{i}.txt").write_text(" ".join(row))
(files / "MLTable").write_text("paths:\\n  - pattern: ./*.txt\\n")
with open(table / "iris.csv", "w", newline="") as f:
    csv.writer(f).writerows([header, *rows])
(table / "MLTable").write_text("paths:\\n  - file: ./iris.csv\\n"
                               "transformations:\\n  - read_delimited:\\n      delimiter: ','\\n")
print(f"prepared {len(rows)} rows")
'''

# The sample's src/file_batch_inference.py, its comments and prints left out.
FILE_BATCH_INFERENCE_PY = '''\
import argparse
from pathlib import Path


def init():
    global OUTPUT_PATH
    parser = argparse.ArgumentParser(allow_abbrev=False, description="ParallelRunStep Agent")
    parser.add_argument("--job_output_path", type=str, default=0)
    args, _ = parser.parse_known_args()
    OUTPUT_PATH = args.job_output_path
    Path(OUTPUT_PATH).mkdir(parents=True, exist_ok=True)


def run(mini_batch):
    for file_path in mini_batch:
        file = Path(file_path)
        assert file.exists()
        output_dir = Path(OUTPUT_PATH)
        output_dir.mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / file.name).write_text(file_path)
    return mini_batch
'''

# The sample's src/tabular_batch_inference.py with its mlflow model swapped for a threshold in a JSON file.
TABULAR_BATCH_INFERENCE_PY = '''\
import argparse
import json

MODEL_NAME = "iris_model"


def init():
    parser = argparse.ArgumentParser(allow_abbrev=False, description="ParallelRunStep Agent")
    parser.add_argument("--model", type=str, default=0)
    args, _ = parser.parse_known_args()
    model_path = args.model + "/" + MODEL_NAME
    global petal_cut
    with open(model_path + "/model.json") as f:
        petal_cut = json.load(f)["petal_cut"]


def run(input_data):
    result = input_data.drop(input_data.columns[4:], axis=1)
    result["variety"] = ["setosa" if x < petal_cut else "virginica" for x in input_data["petal_length"]]
    return result
'''


@pytest.fixture
def sample(tmp_path, monkeypatch):
    """The sample's folder: src/ (components and entry scripts), dataset/, model/; raypar's cache inside."""
    write_files(tmp_path / "src", {"prepare_data.yml": PREPARE_DATA_YML, "prepare_data.py": PREPARE_DATA_PY,
                                   "file_batch_inference.py": FILE_BATCH_INFERENCE_PY,
                                   "tabular_batch_inference.py": TABULAR_BATCH_INFERENCE_PY,
                                   "environment_parallel.yml": "name: prs-env\ndependencies:\n  - python=3.8\n"})
    write_files(tmp_path / "dataset", {"iris.csv": IRIS, "MLTable": "paths:\n  - file: ./iris.csv\n"
                                       "transformations:\n  - read_delimited:\n      delimiter: ','\n"})
    write_files(tmp_path / "model" / "iris_model", {"model.json": json.dumps({"petal_cut": 3.0})})
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAYPAR_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


def parallel_functions():
    """The guide's and the sample's two parallel_run_function jobs, as written."""
    # parallel job to process file data
    file_batch_inference = parallel_run_function(
        name="file_batch_score",
        display_name="Batch Score with File Dataset",
        description="parallel component for batch score",
        inputs=dict(
            job_data_path=Input(
                type=AssetTypes.MLTABLE,
                description="The data to be split and scored in parallel",
            )
        ),
        outputs=dict(job_output_path=Output(type=AssetTypes.MLTABLE)),
        input_data="${{inputs.job_data_path}}",
        instance_count=2,
        mini_batch_size="1",
        mini_batch_error_threshold=1,
        max_concurrency_per_instance=1,
        task=RunFunction(
            code="./src",
            entry_script="file_batch_inference.py",
            program_arguments="--job_output_path ${{outputs.job_output_path}}",
            environment="azureml:AzureML-sklearn-0.24-ubuntu18.04-py37-cpu:1",
        ),
    )
    # parallel task to process tabular data
    tabular_batch_inference = parallel_run_function(
        name="batch_score_with_tabular_input",
        display_name="Batch Score with Tabular Dataset",
        description="parallel component for batch score",
        inputs=dict(
            job_data_path=Input(
                type=AssetTypes.MLTABLE,
                description="The data to be split and scored in parallel",
            ),
            score_model=Input(
                type=AssetTypes.URI_FOLDER, description="The model for batch score."
            ),
        ),
        outputs=dict(job_output_path=Output(type=AssetTypes.MLTABLE)),
        input_data="${{inputs.job_data_path}}",
        instance_count=2,
        max_concurrency_per_instance=2,
        mini_batch_size="100",
        mini_batch_error_threshold=5,
        logging_level="DEBUG",
        retry_settings=dict(max_retries=2, timeout=60),
        task=RunFunction(
            code="./src",
            entry_script="tabular_batch_inference.py",
            environment=Environment(
                image="mcr.microsoft.com/azureml/openmpi5.0-ubuntu24.04:latest",
                conda_file="./src/environment_parallel.yml",
            ),
            program_arguments="--model ${{inputs.score_model}} "
            "--job_output_path ${{outputs.job_output_path}} "
            "--error_threshold 5 "
            "--allowed_failed_percent 30 "
            "--task_overhead_timeout 1200 "
            "--progress_update_timeout 600 "
            "--first_task_creation_timeout 600 "
            "--copy_logs_to_parent True "
            "--resource_monitor_interva 20 ",
            append_row_to="${{outputs.job_output_path}}",
        ),
    )
    return file_batch_inference, tabular_batch_inference


def build_guide_pipeline(prepare_data, file_batch_inference, tabular_batch_inference):
    """The guide's @pipeline function and the lines that build and configure the job, verbatim."""

    @pipeline()
    def parallel_in_pipeline(pipeline_job_data_path, pipeline_score_model):

        prepare_file_tabular_data = prepare_data(input_data=pipeline_job_data_path)
        # output of file & tabular data should be type MLTable
        prepare_file_tabular_data.outputs.file_output_data.type = AssetTypes.MLTABLE
        prepare_file_tabular_data.outputs.tabular_output_data.type = AssetTypes.MLTABLE

        batch_inference_with_file_data = file_batch_inference(
            job_data_path=prepare_file_tabular_data.outputs.file_output_data
        )
        # use eval_mount mode to handle file data
        batch_inference_with_file_data.inputs.job_data_path.mode = (
            InputOutputModes.EVAL_MOUNT
        )
        batch_inference_with_file_data.outputs.job_output_path.type = AssetTypes.MLTABLE

        batch_inference_with_tabular_data = tabular_batch_inference(
            job_data_path=prepare_file_tabular_data.outputs.tabular_output_data,
            score_model=pipeline_score_model,
        )
        # use direct mode to handle tabular data
        batch_inference_with_tabular_data.inputs.job_data_path.mode = (
            InputOutputModes.DIRECT
        )

        return {
            "pipeline_job_out_file": batch_inference_with_file_data.outputs.job_output_path,
            "pipeline_job_out_tabular": batch_inference_with_tabular_data.outputs.job_output_path,
        }

    pipeline_job_data_path = Input(
        path="./dataset/", type=AssetTypes.MLTABLE, mode=InputOutputModes.RO_MOUNT
    )
    pipeline_score_model = Input(
        path="./model/", type=AssetTypes.URI_FOLDER, mode=InputOutputModes.DOWNLOAD
    )
    # create a pipeline
    pipeline_job = parallel_in_pipeline(
        pipeline_job_data_path=pipeline_job_data_path,
        pipeline_score_model=pipeline_score_model,
    )
    pipeline_job.outputs.pipeline_job_out_tabular.type = AssetTypes.URI_FILE

    # set pipeline level compute
    pipeline_job.settings.default_compute = "cpu-cluster"
    return pipeline_job


# -- the pipeline as YAML (no Ray) ---------------------------------------------------------------


def test_load_component_nodes_wire_into_parallel_nodes(sample):
    prepare_data = load_component(source="./src/prepare_data.yml")
    assert prepare_data.name == "prepare_file_tabular_data" and prepare_data.type == "command"
    assert list(prepare_data.inputs) == ["input_data"] and list(prepare_data.outputs) == [
        "file_output_data", "tabular_output_data"]
    pipeline_job = build_guide_pipeline(prepare_data, *parallel_functions())

    data = pipeline_job.to_dict()
    assert list(data["jobs"]) == ["prepare_file_tabular_data", "batch_inference_with_file_data",
                                  "batch_inference_with_tabular_data"]
    assert data["settings"] == {"default_compute": "cpu-cluster"}
    assert data["outputs"] == {"pipeline_job_out_file": {"type": "mltable"},
                               "pipeline_job_out_tabular": {"type": "uri_file"}}
    assert data["jobs"]["prepare_file_tabular_data"] == {
        "component": str(sample / "src" / "prepare_data.yml"),
        "inputs": {"input_data": {"type": "uri_folder", "path": "${{parent.inputs.pipeline_job_data_path}}"}},
        "outputs": {"file_output_data": {"type": "mltable"}, "tabular_output_data": {"type": "mltable"}}}
    described = "The data to be split and scored in parallel"
    assert data["jobs"]["batch_inference_with_file_data"]["inputs"] == {"job_data_path": {
        "type": "mltable", "path": "${{parent.jobs.prepare_file_tabular_data.outputs.file_output_data}}",
        "mode": "eval_mount", "description": described}}
    assert data["jobs"]["batch_inference_with_tabular_data"]["inputs"]["job_data_path"] == {
        "type": "mltable", "path": "${{parent.jobs.prepare_file_tabular_data.outputs.tabular_output_data}}",
        "mode": "direct", "description": described}

    from raypar.pipelines.loading import load_pipeline

    path = pipeline_job.dump(sample / "pipeline.yml")
    plan = load_pipeline(path, job_dir=str(sample / "run"))
    prepare, files, table = plan.steps
    assert (prepare.kind, files.kind, table.kind) == ("command", "parallel", "parallel")
    assert prepare.cwd == str(sample / "src")
    out = sample / "run" / "prepare_file_tabular_data" / "outputs"
    assert prepare.command == (f"python prepare_data.py --input_data {sample / 'dataset'} --file_output_data "
                               f"{out / 'file_output_data'} --tabular_output_data {out / 'tabular_output_data'}")
    assert files.needs == table.needs == ["prepare_file_tabular_data"]
    assert "jobs.prepare_file_tabular_data.environment" in plan.ignored and "settings.default_compute" in plan.ignored
    assert plan.outputs["pipeline_job_out_tabular"] == str(
        sample / "run" / "batch_inference_with_tabular_data" / "outputs" / "job_output_path")


def test_command_nodes_declare_their_inputs_from_what_they_are_given_and_run_without_ray(sample, capsys):
    @pipeline()
    def two_commands(rows, data):
        count = command(command="echo ${{inputs.rows}} > ${{outputs.out}}/n.txt", inputs={"rows": rows},
                        outputs={"out": Output(type=AssetTypes.URI_FOLDER)}, environment="azureml:env:1",
                        compute="cpu-cluster")
        joined = command(name="join", command="cat ${{inputs.src}}/n.txt ${{inputs.data}}/iris.csv "
                                              "> ${{outputs.out}}/all.txt && echo ${{inputs.flag}}",
                         inputs={"src": count.outputs.out, "data": data, "flag": True}, outputs={"out": Output()})
        return {"final": joined.outputs.out}

    pipeline_job = two_commands(rows=5, data=Input(path="./dataset", type=AssetTypes.URI_FOLDER))
    data = pipeline_job.to_dict()

    assert list(data["jobs"]) == ["count", "joined"]
    count = data["jobs"]["count"]
    assert count["component"]["inputs"] == {"rows": {"type": "integer"}}
    assert count["component"]["code"] == str(sample)
    assert count["inputs"] == {"rows": "${{parent.inputs.rows}}"}
    assert count["environment"] == "azureml:env:1" and count["compute"] == "cpu-cluster"
    joined = data["jobs"]["joined"]
    assert joined["component"]["inputs"] == {"src": {"type": "uri_folder"}, "data": {"type": "uri_folder"},
                                             "flag": {"type": "boolean"}}
    assert joined["inputs"] == {"src": {"type": "uri_folder", "path": "${{parent.jobs.count.outputs.out}}"},
                                "data": {"type": "uri_folder", "path": "${{parent.inputs.data}}"}, "flag": True}
    assert joined["outputs"] == {"out": {"path": "${{parent.outputs.final}}"}}

    # command steps only: the pipeline runs here, without Ray; a node alone runs as a one-step pipeline
    ml_client = MLClient()
    returned = ml_client.jobs.create_or_update(pipeline_job, experiment_name="commands")
    ml_client.jobs.stream(returned)
    assert returned.status == "Completed"
    assert (Path(returned.outputs["final"]) / "all.txt").read_text() == "5\n" + IRIS
    assert "[joined] true" in capsys.readouterr().out
    alone = ml_client.jobs.create_or_update(command(command="echo hi > ${{outputs.out}}/x.txt",
                                                    outputs={"out": Output()}))
    ml_client.jobs.stream(alone.name)
    assert (Path(alone.outputs["out"]) / "x.txt").read_text() == "hi\n"


def test_a_parallel_component_yaml_is_a_node_too(sample):
    write_files(sample / "src", {"score.yml": """\
$schema: https://azuremlschemas.azureedge.net/latest/parallelComponent.schema.json
type: parallel
name: score_files
inputs:
  job_data_path: {type: mltable}
  offset: {type: integer, default: 3}
outputs:
  job_output_path: {type: uri_folder}
input_data: ${{inputs.job_data_path}}
mini_batch_size: "2"
resources: {instance_count: 1}
task:
  type: run_function
  code: ./
  entry_script: file_batch_inference.py
  program_arguments: --job_output_path ${{outputs.job_output_path}} --offset ${{inputs.offset}}
"""})
    prepare_data = load_component(source="./src/prepare_data.yml")
    score = load_component(source="./src/score.yml")

    @pipeline()
    def prepare_and_score(raw):
        prepared = prepare_data(input_data=raw)
        scored = score(job_data_path=prepared.outputs.file_output_data, offset=4)
        scored.resources.instance_count = 2
        scored.mini_batch_size = "1"
        return {"scores": scored.outputs.job_output_path}

    pipeline_job = prepare_and_score(raw=Input(path="./dataset"))
    step = pipeline_job.to_dict()["jobs"]["scored"]
    assert step["resources"] == {"instance_count": 2} and step["mini_batch_size"] == "1"

    from raypar.pipelines.loading import load_pipeline

    plan = load_pipeline(pipeline_job.dump(sample / "pipeline.yml"), job_dir=str(sample / "run"))
    job = plan.steps[1].job
    assert job.inputs["job_data_path"].path == str(sample / "run" / "prepared" / "outputs" / "file_output_data")
    assert (job.resources.instance_count, job.mini_batch_size, job.name) == (2, "1", "score_files")
    assert job.inputs["offset"] == 4


def test_unsupported_components_are_one_line(sample):
    write_files(sample, {"sweep.yml": "type: sweep\nname: s\n", "list.yml": "- a\n"})
    cases = [("./sweep.yml", "type 'sweep': raypar loads command and parallel components"),
             ("azureml:prepare_data:1", "registered azureml: components are not supported"),
             ("./nope.yml", "file not found"), ("./list.yml", "a component must be a YAML mapping")]
    for source, message in cases:
        with pytest.raises(SpecError, match=message) as caught:
            load_component(source=source)
        assert "\n" not in caught.value.headline
    prepare_data = load_component(source="./src/prepare_data.yml")
    with pytest.raises(TypeError, match=r"got an unexpected input 'data' \(its inputs: input_data\)"):
        prepare_data(data="./dataset")
    with pytest.raises(SpecError, match="command\\(\\): give command="):
        command(inputs={"x": 1})


# -- on the cluster -----------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_the_guides_pipeline_runs_through_mlclient(ray_cluster, sample, capsys):
    prepare_data = load_component(source="./src/prepare_data.yml")
    file_batch_inference, tabular_batch_inference = parallel_functions()
    for node in (file_batch_inference, tabular_batch_inference):
        node.raypar = ON_CLUSTER
    pipeline_job = build_guide_pipeline(prepare_data, file_batch_inference, tabular_batch_inference)

    ml_client = MLClient(object(), "subscription_id", "resource_group", "workspace_name")
    # run pipeline job
    pipeline_job = ml_client.jobs.create_or_update(
        pipeline_job, experiment_name="pipeline_samples"
    )
    ml_client.jobs.stream(pipeline_job.name)

    assert pipeline_job.status == "Completed" and pipeline_job.experiment_name == "pipeline_samples"
    printed = capsys.readouterr().out
    assert "[prepare_file_tabular_data] prepared 5 rows" in printed
    assert "raypar: pipeline succeeded: 3 step(s)" in printed
    # file data: the entry script wrote, for each row file, the path it was given
    out_file = Path(pipeline_job.outputs["pipeline_job_out_file"])
    written = {p.name: Path(p.read_text()).read_text() for p in out_file.iterdir()}
    rows = [line.replace(",", " ") for line in IRIS.splitlines()[1:]]
    assert written == {f"row_{i}.txt": row for i, row in enumerate(rows)}
    # tabular data: append_row_to a uri_file pipeline output is that file
    out_tabular = Path(pipeline_job.outputs["pipeline_job_out_tabular"])
    assert out_tabular.read_text().splitlines() == [
        "5.1 3.5 1.4 0.2 setosa", "4.9 3.0 1.4 0.2 setosa", "6.3 3.3 6.0 2.5 virginica",
        "5.8 2.7 5.1 1.9 virginica", "5.0 3.6 1.4 0.2 setosa"]
