"""Entry scripts written as Azure ML's samples write them run unchanged on the 3-node loopback cluster:
``from azureml_user.parallel_run import EntryScript``, argparse ``parse_known_args`` in ``init()``,
list and DataFrame returns, ``run(mini_batch, mini_batch_context)`` with partition keys, Azure's
predefined program arguments, ``AZUREML_BI_OUTPUT_PATH`` and a GPU per worker."""

import importlib.util
import os
import pstats
import shutil
from pathlib import Path

import fsspec
import pytest
from conftest import make_spec, quiet

import raypar
from raypar.errors import SpecError
from raypar.jobdir.ledger import Ledger
from raypar.jobdir.state import JobState
from raypar.spec.loading import spec_from_dict

pytestmark = pytest.mark.timeout(120)
AZURE_ENTRY = Path(__file__).parent / "entry_azure"
ALL_WORKERS = {f"instance{i}-slot{s}" for i in range(3) for s in range(2)}
NOTE = "accepted but not used on Ray"


def azure_spec(tmp_path, files, script, **overrides):
    """make_spec with tests/entry_azure as task.code."""
    shutil.copytree(AZURE_ENTRY, tmp_path / "code")
    return make_spec(tmp_path, files, **{"task.entry_script": script, **overrides})


def texts(n):
    return {f"f{i:03d}.txt": "word " * (i + 1) for i in range(n)}


def output_lines(tmp_path):
    return (tmp_path / "out" / "parallel_run_step.txt").read_text().splitlines()


def entry_script_lines(job: Path) -> dict[str, list[str]]:
    """{worker log file: the messages EntryScript().logger wrote there}."""
    return {p.name: [line.split(" INFO EntryScript: ", 1)[1] for line in p.read_text().splitlines()
                     if " INFO EntryScript: " in line]
            for p in sorted((job / "logs").glob("*.log"))}


def notes(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if NOTE in r.getMessage()]


# -- on the cluster ------------------------------------------------------------------------


@pytest.mark.ray
def test_v1_style_script_logs_to_the_job_dir_once_per_record_with_distinct_agent_names(
        ray_cluster, tmp_path, caplog):
    files = texts(12)
    spec = azure_spec(tmp_path, files, "batch_scoring.py", **{"max_concurrency_per_instance": 2, 
        "task.program_arguments": "--model_label resnet --resource_monitor_interval 0 --copy_logs_to_parent True"})
    job = tmp_path / "job"

    with caplog.at_level("WARNING", logger="raypar"):
        outcome = raypar.run(spec, job_dir=str(job), echo=quiet).wait()

    assert outcome.state is JobState.SUCCEEDED, outcome.reason
    assert output_lines(tmp_path) == [f"f{i:03d}.txt: {i + 1} words (resnet)" for i in range(12)]
    assert notes(caplog) == [  # one line for the job, not one per worker
        "task.program_arguments: accepted but not used on Ray (still passed to the entry script): "
        "--resource_monitor_interval (no resource monitor; the Ray dashboard shows usage); "
        "--copy_logs_to_parent (no parent pipeline job; logs stay in the job dir)"]
    logged = entry_script_lines(job)
    inits = {name: [m for m in messages if m.startswith("init:")] for name, messages in logged.items()}
    assert all(len(m) == 1 for m in inits.values()), inits  # each record once: no second handler
    agents = [m[0].removeprefix("init: agent ").removesuffix(", model resnet") for m in inits.values()]
    assert sorted(agents) == sorted(ALL_WORKERS)  # one per worker process, all distinct
    runs = [m for messages in logged.values() for m in messages if m.startswith("run:")]
    assert runs == ["run: 2 file(s)"] * 6


@pytest.mark.ray
def test_v2_style_tabular_script_returns_a_dataframe(ray_cluster, tmp_path):
    shutil.copytree(AZURE_ENTRY, tmp_path / "code")
    csvs = {"a.csv": "id,x\n" + "".join(f"{i},{i / 10}\n" for i in range(10)),
            "b.csv": "id,x\n" + "".join(f"{i},{(i - 10) / 10}\n" for i in range(10, 20))}
    spec = make_spec(tmp_path, csvs, mini_batch_size="1kb", **{
        "task.entry_script": "tabular_score.py", "task.program_arguments": "--threshold 0.7",
        "raypar.input_format": "csv", "resources.instance_count": 1})

    outcome = raypar.run(spec, job_dir=str(tmp_path / "job"), echo=quiet).wait()

    assert outcome.state is JobState.SUCCEEDED, outcome.reason
    labels = ["low"] * 7 + ["high"] * 3
    assert output_lines(tmp_path) == [f"{i} {label}" for i, label in enumerate(labels + labels)]
    runs = sorted(m for ms in entry_script_lines(tmp_path / "job").values() for m in ms if m.startswith("run:"))
    assert runs == ["run: 10 row(s)"] * 2
    # The folders of EntryScript nothing was written to are gone with their workers.
    assert not (tmp_path / "job" / "worker_outputs").exists() and not (tmp_path / "job" / "logs" / "user").exists()


@pytest.mark.ray
def test_partition_keys_reach_run_in_mini_batch_context(ray_cluster, tmp_path):
    files = {"region=east/year=2023/a.txt": "aa", "region=east/year=2023/b.txt": "bbbb",
             "region=east/year=2024/c.txt": "c", "region=west/year=2023/d.txt": "ddd"}
    spec = azure_spec(tmp_path, files, "partition_sizes.py", partition_keys=["region", "year"],
                      **{"resources.instance_count": 1})
    del spec["mini_batch_size"]

    outcome = raypar.run(spec, job_dir=str(tmp_path / "job"), echo=quiet).wait()

    assert outcome.state is JobState.SUCCEEDED, outcome.reason
    assert output_lines(tmp_path) == ["east 2023 a.txt 2", "east 2023 b.txt 4", "east 2024 c.txt 1",
                                      "west 2023 d.txt 3"]
    runs = sorted(m for ms in entry_script_lines(tmp_path / "job").values() for m in ms if m.startswith("run:"))
    assert runs == ["run: partition {'region': 'east', 'year': '2023'}, 2 file(s)",
                    "run: partition {'region': 'east', 'year': '2024'}, 1 file(s)",
                    "run: partition {'region': 'west', 'year': '2023'}, 1 file(s)"]


@pytest.mark.ray
def test_predefined_arguments_are_honoured_or_named_and_the_script_sees_them(ray_cluster, tmp_path, caplog):
    files = texts(12)
    spec = azure_spec(tmp_path, files, "predefined_args.py", **{"max_concurrency_per_instance": 2, "task.program_arguments": (
        "--model_name m1 --first_task_creation_timeout 45 --resource_monitor_interval 0 "
        "--copy_logs_to_parent True --profiling_module cProfile")})
    del spec["raypar"]["placement_timeout"]  # so --first_task_creation_timeout sets it
    job = tmp_path / "job"

    with caplog.at_level("WARNING", logger="raypar"):
        outcome = raypar.run(spec, job_dir=str(job), echo=quiet).wait()

    assert outcome.state is JobState.SUCCEEDED, outcome.reason
    assert output_lines(tmp_path) == [f"f{i:03d}.txt m1 45 0 True cProfile" for i in range(12)]
    assert Ledger(str(job)).load_job()["spec"]["raypar"]["placement_timeout"] == 45  # honoured
    [note] = notes(caplog)
    assert "--resource_monitor_interval" in note and "--copy_logs_to_parent" in note
    assert "first_task_creation_timeout" not in note and "profiling_module" not in note

    # output_dir (= AZUREML_BI_OUTPUT_PATH) and log_dir are kept in the job dir, one folder per
    # worker process; those of workers that wrote nothing are gone.
    outputs = sorted((job / "worker_outputs").iterdir())
    assert outputs and all((d / "scored.txt").exists() for d in outputs)
    assert sorted(n for d in outputs for n in (d / "scored.txt").read_text().split()) == sorted(files)
    log_dirs = sorted((job / "logs" / "user").iterdir())
    assert [d.name for d in log_dirs] == [d.name for d in outputs]  # <run>~<worker>, as the worker logs
    assert {f"{d.name}.log" for d in log_dirs} <= {p.name for p in (job / "logs").glob("*.log")}
    batches = [line for d in log_dirs for line in (d / "batches.txt").read_text().splitlines()]
    assert len(batches) == 6
    # --profiling_module: the run() calls of each worker, in its log_dir.
    stats = pstats.Stats(*(str(d / "profile.pstats") for d in log_dirs))
    assert any(fn[0].endswith("predefined_args.py") and fn[2] == "run" for fn in stats.stats)
    # working_dir: scratch, removed when the worker ends.
    scratch = [m.removeprefix("init: working_dir ") for ms in entry_script_lines(job).values() for m in ms]
    assert len(scratch) == 6 and not any(Path(p).exists() for p in scratch)


@pytest.mark.ray
def test_on_an_object_store_job_dir_log_dir_and_output_dir_are_uploaded(ray_cluster, azurite, tmp_path,
                                                                         monkeypatch):
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite.connection_string)
    container = azurite.new_container()
    fs = fsspec.filesystem("az", connection_string=azurite.connection_string, use_listings_cache=False)
    files = texts(4)
    spec = azure_spec(tmp_path, files, "predefined_args.py", **{
        "task.program_arguments": "--model_name m2", "resources.instance_count": 1})

    outcome = raypar.run(spec, job_dir=f"az://{container}/job", echo=quiet).wait()

    assert outcome.state is JobState.SUCCEEDED, outcome.reason
    assert output_lines(tmp_path) == [f"f{i:03d}.txt m2 None None None None" for i in range(4)]
    scored = fs.glob(f"{container}/job/worker_outputs/*/scored.txt")
    assert sorted(n for p in scored for n in fs.cat_file(p).decode().split()) == sorted(files)
    batches = fs.glob(f"{container}/job/logs/user/*/batches.txt")
    assert sum(len(fs.cat_file(p).decode().splitlines()) for p in batches) == 2


@pytest.mark.ray
def test_each_gpu_worker_sees_its_own_cuda_device(ray_cluster, tmp_path):
    gpu_node = ray_cluster.add_node(num_cpus=1, num_gpus=2)  # Ray takes the GPUs' word for it
    ray_cluster.wait_for_nodes()
    try:
        spec = azure_spec(tmp_path, texts(4), "gpu_device.py", **{
            "resources.instance_count": 1, "max_concurrency_per_instance": 2,
            "raypar.worker": {"num_cpus": 0.1, "num_gpus": 1}})
        outcome = raypar.run(spec, job_dir=str(tmp_path / "job"), echo=quiet).wait()
    finally:
        ray_cluster.remove_node(gpu_node)

    assert outcome.state is JobState.SUCCEEDED, outcome.reason
    seen = dict(m.removeprefix("gpu: ").split(" ", 1) for ms in entry_script_lines(tmp_path / "job").values()
                for m in ms)
    assert sorted(seen) == ["instance0-slot0", "instance0-slot1"]
    assert sorted(seen.values()) == ["CUDA_VISIBLE_DEVICES=0 AZ_BATCHAI_GPU_COUNT_FOUND=1",
                                     "CUDA_VISIBLE_DEVICES=1 AZ_BATCHAI_GPU_COUNT_FOUND=1"]


# -- without Ray ---------------------------------------------------------------------------


def spec_with(tmp_path, program_arguments, **changes):
    data = make_spec(tmp_path, {"a.txt": "a"}, **{"task.program_arguments": program_arguments, **changes})
    return spec_from_dict(data)


@pytest.mark.parametrize("args, message", [
    ("--first_task_creation_timeout soon", "--first_task_creation_timeout must be a number of seconds in "
                                           "(0, 259200], got 'soon'"),
    ("--first_task_creation_timeout 0", "--first_task_creation_timeout must be a number of seconds in "
                                        "(0, 259200], got 0"),
    ("--profiling_module yappi", "--profiling_module must be cProfile or profile, got 'yappi'"),
    ("--x 1 --profiling_module", "--profiling_module must be cProfile or profile, got nothing"),
    ("--allowed_failed_percent --x 1", "--allowed_failed_percent must be a number, got nothing"),
])
def test_invalid_values_of_honoured_flags_name_program_arguments(tmp_path, args, message):
    with pytest.raises(SpecError) as caught:
        spec_with(tmp_path, args)
    assert caught.value.headline == f"spec: task.program_arguments: {message}"


def test_first_task_creation_timeout_yields_to_an_explicit_placement_timeout(tmp_path):
    explicit = spec_with(tmp_path, "--first_task_creation_timeout=600 --metrics_name_prefix x")
    assert explicit.raypar.placement_timeout == 30  # make_spec sets it
    assert explicit.program_arguments_note() == (
        "task.program_arguments: accepted but not used on Ray (still passed to the entry script): "
        "--metrics_name_prefix (Ray metrics are named raypar_* and tagged with the job's name); "
        "--first_task_creation_timeout (raypar.placement_timeout=30 is set and wins)")
    data = make_spec(tmp_path, {}, **{"task.program_arguments": "--first_task_creation_timeout 600"})
    del data["raypar"]["placement_timeout"]
    honoured = spec_from_dict(data)
    assert honoured.raypar.placement_timeout == 600 and honoured.program_arguments_note() is None
    assert spec_from_dict(honoured.to_dict()) == honoured  # the job dir's copy reads back the same
    assert honoured.predefined_arguments().profiling_module is None


def test_azureml_user_exists_only_inside_workers_and_ships_with_raypar():
    from setuptools import find_packages

    assert importlib.util.find_spec("azureml_user") is None  # never on this process's path
    root = Path(raypar.__file__).parent.parent
    assert "raypar.worker.shim.azureml_user" in find_packages(str(root), include=["raypar*"])


def test_scratch_folders_of_dead_workers_on_this_host_are_removed(tmp_path, monkeypatch):
    import socket
    import subprocess

    from raypar.worker import azure_env as worker_env

    monkeypatch.setattr(worker_env, "SCRATCH_ROOT", str(tmp_path))
    host = socket.gethostname()
    dead = subprocess.Popen(["true"])
    dead.wait()
    orphan = tmp_path / f"{dead.pid}@{host}~instance0-slot0~abc"
    live = tmp_path / f"{os.getpid()}@{host}~instance0-slot1~def"
    elsewhere = tmp_path / f"{dead.pid}@not-{host}~instance0-slot0~ghi"  # another host's process IDs
    for folder in (orphan, live, elsewhere):
        (folder / "model.bin").parent.mkdir()
        (folder / "model.bin").write_text("weights")

    new = worker_env._scratch_folder("instance1-slot0")

    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, elsewhere.name, Path(new).name])
    assert Path(new).name.startswith(f"{os.getpid()}@{host}~instance1-slot0~")
