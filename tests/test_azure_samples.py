"""The shapes of Azure ML's own public parallel samples, on small data the tests write: v1
``ParallelRunStep`` with ``PipelineData`` + ``append_row_file_name`` (file MNIST-like, tabular
iris-like), partition per column (``partition_by``, keys last) and per folder
(``partition_format``, ``mini_batch_context.dataset``), ``Model.get_model_path``, and a v2
``@pipeline`` of two ``parallel_run_function`` nodes run by ``MLClient(...).jobs``."""

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import quiet, write_files

from raypar.azureml import (
    AssetTypes,
    DataPath,
    Dataset,
    DatasetConsumptionConfig,
    Datastore,
    Environment,
    Input,
    InputOutputModes,
    MLClient,
    Output,
    ParallelRunConfig,
    ParallelRunStep,
    PipelineData,
    RunFunction,
    dsl,
    parallel_run_function,
    pipeline,
)
from raypar.azureml.compat.models import model_mapping_env, model_path
from raypar.errors import ModelNotFoundError, SpecError
from raypar.spec.loading import spec_from_dict

SAMPLES = Path(__file__).parent / "entry_samples"
ON_CLUSTER = {"worker": {"num_cpus": 0.5}, "placement_timeout": 30}


@pytest.fixture
def project(tmp_path, monkeypatch):
    """tmp_path as the working directory with Code/ (tests/entry_samples) and raypar's cache in it."""
    shutil.copytree(SAMPLES, tmp_path / "Code")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAYPAR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("RAYPAR_MODELS", raising=False)
    return tmp_path


def lines(path) -> list[str]:
    return Path(path).read_text().splitlines()


# -- Model.get_model_path and its mapping (no Ray) ----------------------------------------------


def test_model_mapping_resolves_names_and_versions_and_names_what_is_missing(project, monkeypatch):
    (project / "m").mkdir()
    (project / "m" / "w.bin").write_text("weights")
    env = {"RAYPAR_MODELS": json.dumps({"iris-prs": "m/w.bin", "iris-prs:2": "/models/v2", "other": "/o"})}
    merged = json.loads(model_mapping_env({"other": "/spec/o"}, env)["RAYPAR_MODELS"])
    # relative paths of the driver's variable against its working directory; the spec wins per name
    assert merged == {"iris-prs": str(project / "m" / "w.bin"), "iris-prs:2": "/models/v2", "other": "/spec/o"}
    worker_env = {"RAYPAR_MODELS": json.dumps(merged)}
    assert model_path("iris-prs", environ=worker_env) == str(project / "m" / "w.bin")
    assert model_path("iris-prs", version=2, environ=worker_env) == "/models/v2"
    assert model_path("iris-prs", version=3, environ=worker_env) == str(project / "m" / "w.bin")
    with pytest.raises(ModelNotFoundError) as caught:
        model_path("mnist-prs", environ=worker_env)
    assert "\n" not in caught.value.headline
    assert "'mnist-prs' is not mapped" in caught.value.headline and "raypar.models" in caught.value.headline \
        and "RAYPAR_MODELS" in caught.value.headline
    assert model_mapping_env({}, {}) == {}
    with pytest.raises(SpecError, match="RAYPAR_MODELS: expected a JSON object"):
        model_mapping_env({}, {"RAYPAR_MODELS": "iris=/x"})


def test_a_model_at_a_url_is_copied_once_to_a_local_path(project, monkeypatch):
    monkeypatch.setattr("raypar.azureml.compat.models.CACHE_ROOT", str(project / "model-cache"))
    write_files(project / "store" / "mnist", {"offset.txt": "3"})
    env = {"RAYPAR_MODELS": json.dumps({"mnist-prs": f"file://{project}/store/mnist"})}
    local = model_path("mnist-prs", environ=env)
    assert local.startswith(str(project / "model-cache")) and (Path(local) / "offset.txt").read_text() == "3"
    (project / "store" / "mnist" / "offset.txt").write_text("4")
    assert model_path("mnist-prs", environ=env) == local  # a cached copy, not a second download


def test_spec_models_are_absolute_and_reach_the_workers_environment(project, monkeypatch):
    monkeypatch.setenv("RAYPAR_MODELS", json.dumps({"a": "/env/a", "b": "/env/b"}))
    spec = spec_from_dict({"type": "parallel", "inputs": {"d": {"type": "uri_folder", "path": "."}},
                           "input_data": "${{inputs.d}}", "task": {"code": "Code", "entry_script": "digits.py"},
                           "raypar": {"models": {"b": "models/b"}}}, base_dir=project)
    assert spec.raypar.models == {"b": str(project / "models" / "b")}
    from raypar.engine.worker_plan import worker_plan

    plan = worker_plan(spec, {}, {})
    assert json.loads(plan.env["RAYPAR_MODELS"]) == {"a": "/env/a", "b": str(project / "models" / "b")}


# -- v1 data objects (no Ray) -------------------------------------------------------------------


def test_file_dataset_keeps_partition_format_and_takes_globs_and_datastore_pairs(project):
    write_files(project / "store" / "parts", {"u1/winter/disco.wav": "x", "u2/fall/piano.wav": "yy"})
    ds = Dataset.File.from_files(path=(str(project / "store"), "parts/*/*/*.wav"),
                                 partition_format="parts/{user}/{season}/{genres}.wav", validate=False)
    assert ds.partition_keys == ["user", "season", "genres"]
    assert ds.mltable() == {"type": "mltable", "paths": [{"pattern": f"{project}/store/parts/*/*/*.wav"}],
                            "transformations": [{"extract_columns_from_partition_format": {
                                "partition_format": "parts/{user}/{season}/{genres}.wav"}}]}
    entry = ds.as_named_input("wavs").to_input()
    assert entry.type == "mltable" and Path(entry.path).parent == project / "cache" / "datasets"
    # the same dataset is the same input path (a resumed job reads the same MLTable)
    assert Dataset.File.from_files((Datastore(project / "store"), "parts/*/*/*.wav"),
                                   partition_format="parts/{user}/{season}/{genres}.wav").to_input().path == entry.path
    plain = Dataset.File.from_files(DataPath(str(project / "store"), "parts"))
    assert (plain.is_mltable, plain.to_input().type, plain.to_input().path) == \
        (False, "uri_folder", str(project / "store" / "parts"))


def test_tabular_datasets_map_azures_read_options_and_refuse_what_raypar_does_not_apply(project):
    ds = Dataset.Tabular.from_delimited_files(path=[("/data", "a.csv"), "/data/b/*.csv"], separator=";",
                                              header=False, include_path=True, partition_format="{year}/")
    assert ds.mltable()["transformations"] == [
        {"read_delimited": {"include_path_column": True, "delimiter": ";", "header": "no_header"}},
        {"extract_columns_from_partition_format": {"partition_format": "{year}/"}}]
    assert Dataset.Tabular.from_parquet_files("/data/p").is_mltable is False  # one folder: a uri_folder input
    with pytest.raises(ValueError, match="set_column_types is not applied"):
        Dataset.Tabular.from_delimited_files("/data", set_column_types={"a": "int"})
    with pytest.raises(ValueError, match="partition format"):
        Dataset.File.from_files("/data", partition_format="no columns")


def test_dataset_consumption_config_and_modes(project):
    ds = Dataset.File.from_files(str(project))
    assert (ds.as_mount().mode, ds.as_download().mode) == ("ro_mount", "download")
    named = DatasetConsumptionConfig("images", ds)
    assert (named.name, named.mode, named.paths) == ("images", None, ds.paths)  # Azure's "direct": local paths
    assert DatasetConsumptionConfig("images", ds, mode="download").mode == "download"
    with pytest.raises(ValueError, match="mode 'upload'"):
        DatasetConsumptionConfig("images", ds, mode="upload")


OJ = {"oj/a.csv": "WeekStarting,Store,Brand,INCOME,Quantity\n1,1000,tropicana,5,10\n2,1000,dominicks,6,11\n"
                  "3,1001,tropicana,7,12\n",
      "oj/b.csv": "WeekStarting,Store,Brand,INCOME,Quantity\n4,1001,tropicana,8,13\n5,1000,tropicana,9,14\n"}


def test_partition_by_copies_one_folder_per_key_and_puts_the_keys_last(project):
    write_files(project / "store", OJ)
    dataset = Dataset.Tabular.from_delimited_files(path=(str(project / "store"), "oj/*.csv"))
    assert dataset.to_pandas_dataframe()["WeekStarting"].tolist() == [1, 2, 3, 4, 5]
    partitioned = dataset.partition_by(partition_keys=["Store", "Brand"], target=(str(project / "store"), "res"),
                                       name="partitioned_oj_data")
    assert partitioned.partition_keys == ["Store", "Brand"]
    frame = partitioned.to_pandas_dataframe()
    assert list(frame.columns) == ["WeekStarting", "INCOME", "Quantity", "Store", "Brand"]
    assert frame.values.tolist() == [[2, 6, 11, "1000", "dominicks"], [1, 5, 10, "1000", "tropicana"],
                                     [5, 9, 14, "1000", "tropicana"], [3, 7, 12, "1001", "tropicana"],
                                     [4, 8, 13, "1001", "tropicana"]]
    copies = sorted(p.relative_to(project / "store" / "res") for p in (project / "store" / "res").rglob("*.parquet"))
    assert [str(p.parent.relative_to(p.parts[0])) for p in copies] == \
        ["1000/dominicks", "1000/tropicana", "1001/tropicana"]
    again = dataset.partition_by(partition_keys=["Store", "Brand"], target=(str(project / "store"), "res"))
    assert again.paths == partitioned.paths  # the copy is reused


# -- v1 step and v2 shapes (no Ray) -------------------------------------------------------------


def test_pipeline_data_with_append_row_file_name_writes_into_the_jobs_outputs(project):
    config = ParallelRunConfig(source_directory="Code", entry_script="digits.py", mini_batch_size="5",
                               error_threshold=10, output_action="append_row",
                               append_row_file_name="mnist_outputs.txt", node_count=2)
    step = ParallelRunStep(name="predict-digits-mnist", parallel_run_config=config,
                           inputs=[Dataset.File.from_files(str(project)).as_named_input("mnist")],
                           output=PipelineData(name="inferences", datastore=object()))
    data = step.to_dict()
    assert data["outputs"] == {"inferences": {"type": "uri_folder"}}
    assert data["task"]["append_row_to"] == "${{outputs.inferences}}"
    assert data["raypar"] == {"append_row_file_name": "mnist_outputs.txt"}


def test_v2_attribute_style_resources_environment_and_dump(project):
    (project / "env").mkdir()
    (project / "env" / "conda.yml").write_text("dependencies:\n  - pip:\n    - numpy\n")
    score = parallel_run_function(
        name="score", inputs={"data": Input(type=AssetTypes.URI_FOLDER)}, outputs={"out": Output()},
        input_data="${{inputs.data}}",
        task=RunFunction(code="Code", entry_script="digits.py", append_row_to="${{outputs.out}}",
                         environment=Environment(image="mcr.microsoft.com/azureml/base", conda_file="env/conda.yml")))
    node = score(data=Input(path="."))
    assert node.resources.instance_count is None and node.instance_count is None
    node.resources.instance_count = 2
    assert node.instance_count == 2 and node.to_dict()["resources"] == {"instance_count": 2}
    node.instance_count = 3
    assert node.to_dict()["resources"] == {"instance_count": 3}
    node.dump("job.yml")
    written = yaml.safe_load((project / "job.yml").read_text())
    assert written["task"]["environment"] == {"image": "mcr.microsoft.com/azureml/base",
                                              "conda_file": "./env/conda.yml"}


def two_nodes():
    """The migration guide's shape: two parallel_run_function jobs, the second reads the first's output."""
    first = parallel_run_function(
        name="file_batch_score", inputs=dict(job_data_path=Input(type=AssetTypes.MLTABLE)),
        outputs=dict(job_output_path=Output(type=AssetTypes.URI_FOLDER)), input_data="${{inputs.job_data_path}}",
        instance_count=2, mini_batch_size="2", mini_batch_error_threshold=1, max_concurrency_per_instance=1,
        task=RunFunction(code="./Code", entry_script="digits.py", append_row_to="${{outputs.job_output_path}}",
                         environment="azureml:AzureML-sklearn-0.24-ubuntu18.04-py37-cpu:1"))
    second = parallel_run_function(
        name="second_pass", inputs=dict(scored=Input(type=AssetTypes.URI_FOLDER)),
        outputs=dict(job_output_path=Output(type=AssetTypes.URI_FOLDER)), input_data="${{inputs.scored}}",
        instance_count=2, mini_batch_size="1",
        task=RunFunction(code="./Code", entry_script="prefix_lines.py", append_row_to="${{outputs.job_output_path}}"))
    return first, second


def build_pipeline(first, second):
    @pipeline()
    def parallel_in_pipeline(pipeline_job_data_path):
        batch_inference_with_file_data = first(job_data_path=pipeline_job_data_path)
        batch_inference_with_file_data.inputs.job_data_path.mode = InputOutputModes.EVAL_MOUNT
        second_step = second(scored=batch_inference_with_file_data.outputs.job_output_path)
        return {"pipeline_job_out_file": second_step.outputs.job_output_path}

    return parallel_in_pipeline


def test_pipeline_decorator_wires_nodes_by_their_variable_names(project):
    first, second = two_nodes()
    job = build_pipeline(first, second)(pipeline_job_data_path=Input(path="./mnist", type=AssetTypes.URI_FOLDER))
    job.outputs.pipeline_job_out_file.type = AssetTypes.URI_FOLDER
    job.settings.default_compute = "cpu-cluster"
    data = job.to_dict()
    assert list(data["jobs"]) == ["batch_inference_with_file_data", "second_step"]
    assert data["inputs"] == {"pipeline_job_data_path": {"type": "uri_folder", "path": str(project / "mnist")}}
    assert data["outputs"] == {"pipeline_job_out_file": {"type": "uri_folder"}}
    assert data["settings"] == {"default_compute": "cpu-cluster"}
    assert data["jobs"]["batch_inference_with_file_data"]["inputs"] == {"job_data_path": {
        "type": "mltable", "path": "${{parent.inputs.pipeline_job_data_path}}", "mode": "eval_mount"}}
    assert data["jobs"]["second_step"]["inputs"] == {"scored": {
        "type": "uri_folder", "path": "${{parent.jobs.batch_inference_with_file_data.outputs.job_output_path}}"}}
    assert data["jobs"]["second_step"]["outputs"] == {"job_output_path": {"path": "${{parent.outputs.pipeline_job_out_file}}"}}
    assert dsl.pipeline is pipeline

    @pipeline
    def not_a_step_output(x):
        return {"out": Output()}

    with pytest.raises(TypeError, match="output 'out' is not the output of a step"):
        not_a_step_output(x=Input(path="."))


# -- on the cluster -----------------------------------------------------------------------------


def write_mnist_like(folder: Path) -> list[str]:
    """Eight "images" (lists of numbers); with offset 3 each row is "<name>: <(sum + 3) % 10>"."""
    files = {f"img_{i}.txt": " ".join(str(i * k) for k in range(1, 5)) for i in range(8)}
    write_files(folder, files)
    return [f"{name}: {(sum(int(v) for v in text.split()) + 3) % 10}" for name, text in sorted(files.items())]


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_v1_file_step_with_pipeline_data_and_a_mapped_model(ray_cluster, project, monkeypatch):
    expected = write_mnist_like(project / "store" / "mnist")
    write_files(project / "models" / "mnist", {"offset.txt": "3"})
    monkeypatch.setenv("RAYPAR_MODELS", json.dumps({"mnist-prs": "models/mnist"}))  # set once, relative to the cwd
    datastore = str(project / "store")  # was: ws.get_default_datastore()
    input_mnist_ds = Dataset.File.from_files(path=(datastore, "mnist/*.txt"), validate=False)
    output_dir = PipelineData(name="inferences", datastore=datastore)
    config = ParallelRunConfig(source_directory="Code", entry_script="digits.py", mini_batch_size="3",
                               error_threshold=10, output_action="append_row", logging_level="DEBUG",
                               append_row_file_name="mnist_outputs.txt", environment=object(),
                               compute_target="cpu-cluster", node_count=2)
    step = ParallelRunStep(name="predict-digits-mnist", parallel_run_config=config,
                           inputs=[input_mnist_ds.as_named_input("mnist_images")], output=output_dir,
                           allow_reuse=True, raypar=ON_CLUSTER)

    import raypar

    outcome = raypar.run(step, job_dir=str(project / "job"), echo=quiet).wait()

    assert outcome.exit_code == 0, outcome.reason
    assert lines(project / "job" / "outputs" / "inferences" / "mnist_outputs.txt") == expected


IRIS = {"iris/part1.csv": "sepal_length,sepal_width,petal_length,petal_width,variety_true\n"
                          "5.1,3.5,1.4,0.2,Setosa\n4.9,3.0,1.4,0.2,Setosa\n6.3,3.3,6.0,2.5,Virginica\n",
        "iris/part2.csv": "sepal_length,sepal_width,petal_length,petal_width,variety_true\n"
                          "5.8,2.7,5.1,1.9,Virginica\n5.0,3.6,1.4,0.2,Setosa\n"}


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_v1_tabular_step_with_a_glob_pipeline_data_and_a_model_in_the_spec(ray_cluster, project):
    write_files(project / "store", IRIS)
    write_files(project / "models", {"iris_model.json": json.dumps({"petal_cut": 3.0})})
    input_iris_ds = Dataset.Tabular.from_delimited_files(path=(str(project / "store"), "iris/*.csv"), validate=False)
    named_iris_ds = input_iris_ds.register(None, "iris_data", create_new_version=True).as_named_input("iris_data")
    config = ParallelRunConfig(source_directory="Code", entry_script="iris_like.py", mini_batch_size="1KB",
                               error_threshold=5, output_action="append_row", append_row_file_name="iris_outputs.txt",
                               node_count=3, run_invocation_timeout=600)
    step = ParallelRunStep(name="example-iris", inputs=[named_iris_ds], output=PipelineData(name="inferences"),
                           parallel_run_config=config, arguments=["--model_name", "iris-prs"], allow_reuse=True,
                           raypar={**ON_CLUSTER, "models": {"iris-prs": str(project / "models" / "iris_model.json")}})

    import raypar

    outcome = raypar.run(step, job_dir=str(project / "job"), echo=quiet).wait()

    assert outcome.exit_code == 0, outcome.reason
    assert lines(project / "job" / "outputs" / "inferences" / "iris_outputs.txt") == [
        "5.1 3.5 1.4 0.2 setosa", "4.9 3.0 1.4 0.2 setosa", "6.3 3.3 6.0 2.5 virginica",
        "5.8 2.7 5.1 1.9 virginica", "5.0 3.6 1.4 0.2 setosa"]


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_v1_partition_per_column_puts_the_key_columns_last(ray_cluster, project):
    write_files(project / "store", OJ)
    datastore = str(project / "store")
    dataset = Dataset.Tabular.from_delimited_files(path=(datastore, "oj/*.csv"))
    partitioned_dataset = dataset.partition_by(partition_keys=["Store", "Brand"], target=(datastore, "res"),
                                               name="partitioned_oj_data")
    config = ParallelRunConfig(source_directory="Code", entry_script="income.py", partition_keys=["Store", "Brand"],
                               error_threshold=5, output_action="append_row",
                               append_row_file_name="revenue_outputs.txt", node_count=2, run_invocation_timeout=600)
    step = ParallelRunStep(name="summarize-revenue", parallel_run_config=config,
                           inputs=[partitioned_dataset.as_named_input("partitioned_tabular_input")],
                           output=PipelineData(name="inferences", datastore=datastore), allow_reuse=False,
                           raypar=ON_CLUSTER)

    import raypar

    outcome = raypar.run(step, job_dir=str(project / "job"), echo=quiet).wait()

    assert outcome.exit_code == 0, outcome.reason
    # WeekStarting INCOME Quantity, then the keys, then the script's total_income; one batch per key pair
    assert lines(project / "job" / "outputs" / "inferences" / "revenue_outputs.txt") == [
        "2 6 11 1000 dominicks 6", "1 5 10 1000 tropicana 14", "5 9 14 1000 tropicana 14",
        "3 7 12 1001 tropicana 15", "4 8 13 1001 tropicana 15"]


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_v1_partition_per_folder_gives_the_context_its_keys_and_dataset(ray_cluster, project):
    files = {"dataset_partition_test/user1/winter/disco.wav": "a" * 3,
             "dataset_partition_test/user1/fall/orchestra.wav": "b" * 5,
             "dataset_partition_test/user2/summer/piano.wav": "c" * 7,
             "dataset_partition_test/user4/spring/piano.wav": "d" * 11,
             "dataset_partition_test/user4/fall/piano.wav": "e" * 13}
    write_files(project / "store", files)
    datastore = str(project / "store")
    partitioned_file_dataset = Dataset.File.from_files(
        path=(datastore, "dataset_partition_test/*/*/*.wav"),
        partition_format="dataset_partition_test/{user}/{season}/{genres}.wav", validate=False)
    config = ParallelRunConfig(source_directory="Code", entry_script="file_sizes.py", partition_keys=["user", "genres"],
                               error_threshold=5, output_action="append_row",
                               append_row_file_name="file_size_outputs.txt", node_count=2, run_invocation_timeout=600)
    step = ParallelRunStep(name="summarize-file-size",
                           inputs=[partitioned_file_dataset.as_named_input("partitioned_file_input")],
                           output=PipelineData(name="file_dataset_inferences", datastore=datastore),
                           parallel_run_config=config, allow_reuse=False, raypar=ON_CLUSTER)

    import raypar

    outcome = raypar.run(step, job_dir=str(project / "job"), echo=quiet).wait()

    assert outcome.exit_code == 0, outcome.reason
    # one batch per (user, genres); the script sorts its batch's paths (user4/fall before user4/spring)
    assert lines(project / "job" / "outputs" / "file_dataset_inferences" / "file_size_outputs.txt") == [
        "disco.wav,3,user1,disco,partitioned_file_input", "orchestra.wav,5,user1,orchestra,partitioned_file_input",
        "piano.wav,7,user2,piano,partitioned_file_input",
        "piano.wav,13,user4,piano,partitioned_file_input", "piano.wav,11,user4,piano,partitioned_file_input"]


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_v2_pipeline_of_two_parallel_nodes_runs_through_mlclient(ray_cluster, project, monkeypatch, capsys):
    expected = write_mnist_like(project / "mnist")
    write_files(project / "models" / "mnist", {"offset.txt": "3"})
    monkeypatch.setenv("RAYPAR_MODELS", json.dumps({"mnist-prs": str(project / "models" / "mnist")}))
    (project / "mnist" / "MLTable").write_text("paths:\n  - pattern: ./*.txt\n")
    first, second = two_nodes()
    for node in (first, second):
        node.raypar = ON_CLUSTER
    pipeline_job = build_pipeline(first, second)(
        pipeline_job_data_path=Input(path="./mnist/", type=AssetTypes.MLTABLE, mode=InputOutputModes.RO_MOUNT))
    pipeline_job.settings.default_compute = "cpu-cluster"

    ml_client = MLClient(object(), "subscription_id", "resource_group", "workspace_name")
    returned = ml_client.jobs.create_or_update(pipeline_job, experiment_name="pipeline_samples")
    ml_client.jobs.stream(returned.name)

    assert returned.status == "Completed"
    printed = capsys.readouterr().out
    assert "raypar: pipeline succeeded: 2 step(s)" in printed
    output = Path(returned.outputs["pipeline_job_out_file"])
    assert lines(output / "parallel_run_step.txt") == [f"second: {row}" for row in expected]
    assert Path(returned.name).parent == project / "raypar-jobs"
