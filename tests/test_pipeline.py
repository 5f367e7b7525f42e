"""Azure YAML beyond one job: a parallel component bound with --set, and pipelines of command and
parallel steps wired by ${{parent...}}, run in dependency order and re-run without redoing finished steps."""

import json
import shutil
import sys
from pathlib import Path

import pytest
from conftest import ENTRY_DIR, imports_ray, write_files

from raypar.cli import main
from raypar.errors import UsageError
from raypar.spec.components import job_from_file

pytestmark = pytest.mark.timeout(120)

# The shape of Azure's parallel_component.yml samples: inputs declared (type, description, optional,
# default), outputs by type only, Azure-only keys (version, environment, instance_type) accepted.
COMPONENT = """\
$schema: https://azuremlschemas.azureedge.net/latest/parallelComponent.schema.json
type: parallel
name: score_files
version: 1
display_name: Score text files
inputs:
  job_data_path:
    type: uri_folder
    description: the files to score
  exec_log:
    type: string
    optional: true
  label:
    type: string
    default: plain
outputs:
  job_output_path:
    type: uri_folder
input_data: ${{inputs.job_data_path}}
mini_batch_size: "2"
resources:
  instance_count: 1
  instance_type: Standard_D2_v2
max_concurrency_per_instance: 2
mini_batch_error_threshold: 0
logging_level: DEBUG
retry_settings:
  max_retries: 1
  timeout: 60
task:
  type: run_function
  code: ./code
  entry_script: score.py
  program_arguments: >-
    $[[--exec-log ${{inputs.exec_log}}]]
  append_row_to: ${{outputs.job_output_path}}
  environment:
    image: mcr.microsoft.com/azureml/openmpi4.1.0-ubuntu20.04
raypar:
  worker: {num_cpus: 0.5}
"""

PREP = """\
import os, sys
count, out, log = int(sys.argv[1]), sys.argv[2], sys.argv[3]
for i in range(count):
    with open(os.path.join(out, f"doc{i}.txt"), "w") as f:
        f.write(f"text {i}")
with open(log, "a") as f:
    f.write("prep\\n")
print(f"prep wrote {count} files")
"""

REPORT = """\
import os, sys
scored, out, log = sys.argv[1], sys.argv[2], sys.argv[3]
rows = sorted(open(os.path.join(scored, "parallel_run_step.txt")).read().splitlines())
with open(os.path.join(out, "final.txt"), "w") as f:
    f.write("\\n".join(rows) + "\\n")
with open(log, "a") as f:
    f.write("report\\n")
"""

# Steps written consumer first: the order comes from the ${{parent.jobs...}} references, not the YAML.
PIPELINE = """\
$schema: https://azuremlschemas.azureedge.net/latest/pipelineJob.schema.json
type: pipeline
display_name: score-pipeline
settings:
  default_compute: azureml:cpu-cluster
inputs:
  count: 5
  exec_log: EXEC
outputs:
  final:
    mode: rw_mount
jobs:
  report:
    type: command
    code: ./scripts
    command: PY report.py ${{inputs.scored}} ${{outputs.result}} ${{inputs.log}}
    environment: azureml:AzureML-sklearn-1.0-ubuntu20.04-py38-cpu:1
    inputs:
      scored: ${{parent.jobs.score.outputs.job_output_path}}
      log: STEPLOG
    outputs:
      result: ${{parent.outputs.final}}
  score:
    type: parallel
    component: file:./component.yml
    inputs:
      job_data_path: ${{parent.jobs.prep.outputs.docs}}
      exec_log: ${{parent.inputs.exec_log}}
  prep:
    type: command
    code: ./scripts
    command: PY prep.py ${{inputs.count}} ${{outputs.docs}} STEPLOG
    inputs:
      count: ${{parent.inputs.count}}
    outputs:
      docs:
        type: uri_folder
"""


def run(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def project(tmp_path: Path) -> Path:
    """A folder as Azure samples lay it out: the component YAML beside its code and the scripts."""
    shutil.copytree(ENTRY_DIR, tmp_path / "code")
    write_files(tmp_path / "scripts", {"prep.py": PREP, "report.py": REPORT})
    (tmp_path / "component.yml").write_text(COMPONENT)
    (tmp_path / "exec").mkdir()
    return tmp_path


def write_pipeline(tmp_path: Path, text: str = PIPELINE, name: str = "pipeline.yml") -> Path:
    path = tmp_path / name
    path.write_text(text.replace("PY", sys.executable).replace("EXEC", str(tmp_path / "exec"))
                    .replace("STEPLOG", str(tmp_path / "steps.log")))
    return path


def executions(tmp_path: Path) -> list[str]:
    """Every run() call of the parallel steps (one file each) and every command step run, in order."""
    steps = (tmp_path / "steps.log").read_text().split() if (tmp_path / "steps.log").exists() else []
    return sorted(p.read_text() for p in (tmp_path / "exec").iterdir()) + steps


def started(out: str) -> list[str]:
    return [line.split()[2] for line in out.splitlines() if line.startswith("raypar: step ") and "started" in line]


def assert_one_line_error(code, err, *fragments):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0]


def test_component_yaml_bound_with_set_gives_exact_rows(ray_cluster, tmp_path, capsys, monkeypatch):
    project(tmp_path)
    write_files(tmp_path / "data", {f"f{i}.txt": f"hello {i}" for i in range(5)})
    monkeypatch.chdir(tmp_path)  # --set paths are relative to the current directory

    code, out, err = run(capsys, "run", "component.yml", "--set", "inputs.job_data_path=data",
                         "--set", f"inputs.exec_log={tmp_path / 'exec'}", "--set", "outputs.job_output_path=out",
                         "--job-dir", "job")

    assert code == 0, err
    rows = (tmp_path / "out" / "parallel_run_step.txt").read_text().splitlines()
    assert sorted(rows) == [f"f{i}.txt HELLO {i}" for i in range(5)]
    assert len(executions(tmp_path)) == 3  # the $[[--exec-log ...]] block was kept: its input is bound
    spec = json.loads((tmp_path / "job" / "job.json").read_text())["spec"]
    assert spec["inputs"]["label"] == "plain"  # a default applies
    assert spec["inputs"]["job_data_path"] == {"type": "uri_folder", "path": str(tmp_path / "data"),
                                               "mode": "ro_mount"}


def test_a_job_file_that_uses_the_component_binds_like_set(tmp_path, monkeypatch):
    project(tmp_path)
    write_files(tmp_path / "data", {"a.txt": "a"})
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "job.yml").write_text(
        "type: parallel\ncomponent: file:../component.yml\nmini_batch_size: '1'\n"
        "inputs:\n  job_data_path: {type: uri_folder, path: ../data}\n  label: fancy\n"
        "outputs:\n  job_output_path: {type: uri_folder, path: ../out}\n")
    monkeypatch.chdir(tmp_path)

    used = job_from_file(tmp_path / "jobs" / "job.yml")
    bound = job_from_file("component.yml", ["inputs.job_data_path=data", "inputs.label=fancy",
                                            "outputs.job_output_path=out"])

    assert used.to_dict() == {**bound.to_dict(), "mini_batch_size": "1"}  # the job file's keys lie over the component's
    assert used.task.program_arguments == ""  # the optional exec_log is unbound: its $[[...]] block is left out
    assert used.task.code == str(tmp_path / "code")  # the component's paths stay relative to the component


def test_set_takes_azure_cli_path_keys_and_datastore_urls_for_a_component(tmp_path, monkeypatch):
    project(tmp_path)
    write_files(tmp_path / "data", {"a.txt": "a"})
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAYPAR_DATASTORES", '{"default": "./blob"}')  # relative to the working directory

    job = job_from_file("component.yml", ["inputs.job_data_path.path=data",
                                          "outputs.job_output_path.path=azureml://datastores/${{default_datastore}}"
                                          "/paths/${{name}}/out"])

    assert job.inputs["job_data_path"].path == str(tmp_path / "data")
    assert job.outputs["job_output_path"].path == str(tmp_path / "blob" / "score_files" / "out")  # the component's name
    with pytest.raises(UsageError, match=r"--set jobs.score...: .*component.yml is a single job, not a pipeline"):
        job_from_file("component.yml", ["inputs.job_data_path=data", "jobs.score.outputs.x=y"])


def test_pipeline_runs_in_dependency_order_and_a_rerun_runs_nothing(ray_cluster, tmp_path, capsys):
    project(tmp_path)
    pipeline = write_pipeline(tmp_path)
    final = tmp_path / "final"
    pdir = tmp_path / "pdir"

    code, out, err = run(capsys, "run", pipeline, "--job-dir", pdir, "--set", f"outputs.final={final}")

    assert code == 0, err
    assert started(out) == ["prep", "score", "report"]  # YAML order: report, score, prep
    assert "ignored (Azure-only, no meaning here): settings.default_compute, jobs.report.environment" in out
    assert "[prep] prep wrote 5 files" in out
    assert (final / "final.txt").read_text() == "".join(f"doc{i}.txt TEXT {i}\n" for i in range(5))
    assert sorted((pdir / "prep" / "outputs" / "docs").iterdir()) == \
        [pdir / "prep" / "outputs" / "docs" / f"doc{i}.txt" for i in range(5)]
    assert (pdir / "score" / "job.json").exists()  # the parallel step's own job dir
    before = executions(tmp_path)
    assert len(before) == 3 + 2  # 3 mini-batches of 2 files, then prep and report

    code, out, err = run(capsys, "run", pipeline, "--job-dir", pdir, "--set", f"outputs.final={final}")
    assert code == 0, err
    assert started(out) == [] and out.count("already succeeded in this pipeline dir, skipped") == 3

    (pdir / "score" / "step.json").unlink()  # as if the driver died right after the job finished
    code, out, err = run(capsys, "resume", pdir)  # re-runs from the recorded YAML and --set bindings
    assert code == 0, err
    assert started(out) == ["score"] and "already holds this job: resuming it" in out
    assert executions(tmp_path) == before  # nothing ran again

    code, out, _ = run(capsys, "status", pdir)
    assert code == 0
    assert "state:     succeeded" in out
    assert "step:      score (parallel) succeeded" in out and f"output:    final: {final}" in out


def test_failing_command_step_stops_the_pipeline_and_a_rerun_continues_from_it(tmp_path, capsys):
    steps_log = tmp_path / "steps.log"
    flag = tmp_path / "fixed"
    pipeline = write_pipeline(tmp_path, f"""\
type: pipeline
jobs:
  first:
    type: command
    command: echo first >> {steps_log}
    outputs: {{out: {{type: uri_folder}}}}
  second:
    type: command
    command: echo second >> {steps_log}; test -f {flag} || exit 3
    inputs: {{x: "${{{{parent.jobs.first.outputs.out}}}}"}}
    outputs: {{out: {{type: uri_folder}}}}
  third:
    type: command
    command: echo third >> {steps_log}
    inputs: {{x: "${{{{parent.jobs.second.outputs.out}}}}"}}
""")
    pdir = tmp_path / "pdir"

    code, out, err = run(capsys, "run", pipeline, "--job-dir", pdir)

    assert code == 3
    assert "pipeline failed at step second (exit code 3); not run: third" in err
    assert steps_log.read_text().split() == ["first", "second"]
    _, status, _ = run(capsys, "status", pdir)
    assert "state:     failed" in status and "step:      third (command) not started" in status
    assert not imports_ray("status", pdir)  # it reads the pipeline dir: no Ray to start

    flag.touch()
    code, out, err = run(capsys, "run", pipeline, "--job-dir", pdir)
    assert code == 0, err
    assert steps_log.read_text().split() == ["first", "second", "second", "third"]  # first is not run again

    changed = write_pipeline(tmp_path, pipeline.read_text().replace("echo third", "echo 3rd"), "changed.yml")
    code, _, err = run(capsys, "run", changed, "--job-dir", pdir)
    assert_one_line_error(code, err, "holds a different pipeline (changed: jobs.third.command)")


# case: (text of PIPELINE, what replaces it, what the one-line error says)
BROKEN = {
    "cycle": ("${{parent.inputs.count}}", "${{parent.jobs.report.outputs.result}}",
              "jobs.report.inputs.scored: a cycle: report -> prep -> score -> report"),
    "unknown step": ("parent.jobs.prep.outputs", "parent.jobs.prepare.outputs",
                     "jobs.score.inputs.job_data_path: ${{parent.jobs.prepare.outputs.docs}}: no step 'prepare'"),
    "unknown output": ("prep.outputs.docs", "prep.outputs.files", "step 'prep' has no output 'files' (outputs: docs)"),
    "unknown pipeline input": ("parent.inputs.count", "parent.inputs.n",
                               "jobs.prep.inputs.count: ${{parent.inputs.n}}: the pipeline has no input 'n'"),
    "missing component input": ("      job_data_path: ${{parent.jobs.prep.outputs.docs}}\n", "",
                                "jobs.score.inputs.job_data_path: missing required input 'job_data_path'"),
    "missing pipeline input": ("  count: 5", "  count: {type: integer}",
                               "inputs.count: missing required input 'count' (bind it: --set inputs.count=VALUE)"),
    "unsupported step": ("type: command\n    code: ./scripts\n    command: PY prep",
                         "type: sweep\n    code: ./scripts\n    command: PY prep",
                         "jobs.prep.type: 'sweep' steps are not supported"),
    "bad binding": ("${{parent.inputs.count}}", "n-${{parent.inputs.count}}",
                    "jobs.prep.inputs.count: 'n-${{parent.inputs.count}}': a binding is one whole"),
    # The YAML's shape (pydantic models of Azure's pipeline and command step schemas)
    "unknown pipeline key": ("settings:", "setting:", "unknown key 'setting'"),
    "raypar key of a step": ("settings:", "raypar: {placement_timeout: 5}\nsettings:",
                             "unknown key 'placement_timeout' at raypar.placement_timeout (a pipeline's raypar: "
                             "block holds datastores; other raypar settings go in each step)"),
    "no steps": ("jobs:\n", "jobs: {}\nnot_jobs:\n", "jobs: Dictionary should have at least 1 item"),
    "unknown command key": ("    environment: azureml", "    environ: azureml", "jobs.report: unknown key 'environ'"),
    "blank command": ("command: PY prep.py ${{inputs.count}} ${{outputs.docs}} STEPLOG", "command: ' '",
                      "jobs.prep: command: is empty (a command step needs a command)"),
    "input declaration": ("  count: 5", "  count: {type: int, default: 5}",
                          "inputs.count: type: Input should be 'boolean', 'custom_model', 'integer'"),
    "output declaration": ("    mode: rw_mount", "    mode: rw_mount\n    colour: blue",
                           "outputs.final: unknown key 'colour'"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_broken_pipeline_is_one_line_error_exit_2_and_runs_nothing(tmp_path, capsys, case):
    project(tmp_path)
    old, new, fragment = BROKEN[case]
    assert old in PIPELINE
    pipeline = write_pipeline(tmp_path, PIPELINE.replace(old, new))

    code, out, err = run(capsys, "run", pipeline, "--job-dir", tmp_path / "pdir")

    assert_one_line_error(code, err, "pipeline.yml: ", fragment)
    assert not (tmp_path / "pdir").exists() and executions(tmp_path) == []


@pytest.mark.parametrize("sets, fragment", [
    (["inputs.label=x"], "inputs.job_data_path: missing required input 'job_data_path' "
                         "(bind it: --set inputs.job_data_path=PATH)"),
    (["inputs.job_data_path=data", "inputs.nope=1"], "inputs.nope: no such input (declared: job_data_path, "
                                                     "exec_log, label)"),
    (["inputs.job_data_path=data", "mini_batch_size=3"], "--set mini_batch_size=3: expected inputs.NAME=VALUE"),
])
def test_bad_component_binding_is_one_line_error_exit_2(tmp_path, capsys, monkeypatch, sets, fragment):
    project(tmp_path)
    monkeypatch.chdir(tmp_path)

    code, _, err = run(capsys, "run", "component.yml", "--job-dir", "job", *[a for s in sets for a in ("--set", s)])

    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "job").exists()


# The shape of azureml-examples' CLI pipelines: data and outputs on datastores, ${{name}} in paths,
# 2 instances; the datastores mapped once, at the top of the pipeline.
DATASTORE_PIPELINE = """\
type: pipeline
display_name: Iris batch prediction
raypar:
  datastores: {workspaceblobstore: STORE, default: workspaceblobstore}
outputs:
  pipeline_job_output:
    type: uri_file
    mode: rw_mount
    path: azureml://datastores/${{default_datastore}}/paths/${{name}}/predictions.csv
jobs:
  score:
    type: parallel
    inputs:
      job_data_path:
        type: uri_folder
        path: azureml://datastores/workspaceblobstore/paths/input
        mode: ro_mount
    outputs:
      job_output_file: ${{parent.outputs.pipeline_job_output}}
      side:
        type: uri_folder
        path: azureml://datastores/${{default_datastore}}/paths/${{name}}/side
    input_data: ${{inputs.job_data_path}}
    mini_batch_size: "2"
    resources: {instance_count: 2}
    max_concurrency_per_instance: 1
    task:
      type: run_function
      code: ./code
      entry_script: score.py
      append_row_to: ${{outputs.job_output_file}}
    raypar: {worker: {num_cpus: 0.5}}
"""


def test_datastore_urls_resolve_through_the_mapping_and_set_overrides_a_step_output(ray_cluster, tmp_path, capsys,
                                                                                    monkeypatch):
    project(tmp_path)
    write_files(tmp_path / "blob" / "input", {f"f{i}.txt": f"iris {i}" for i in range(5)})
    pipeline = write_pipeline(tmp_path, DATASTORE_PIPELINE.replace("STORE", "./blob"))
    monkeypatch.chdir(tmp_path)  # the pipeline dir goes under ./raypar-jobs, named from display_name

    code, out, err = run(capsys, "run", pipeline)

    assert code == 0, err
    rows = [f"f{i}.txt IRIS {i}" for i in range(5)]
    # ${{name}}: the pipeline's (slugged) name for its own output, the step's name for the step's
    predictions = tmp_path / "blob" / "Iris-batch-prediction" / "predictions.csv"
    assert predictions.read_text().splitlines() == rows
    assert (tmp_path / "blob" / "score" / "side").is_dir()
    [pdir] = (tmp_path / "raypar-jobs").iterdir()
    assert pdir.name.startswith("Iris-batch-prediction-") and " " not in pdir.name
    assert f"raypar: output pipeline_job_output: {predictions}" in out

    code, out, err = run(capsys, "run", pipeline, "--job-dir", "pdir",
                         "--set", "jobs.score.outputs.job_output_file.path=elsewhere/out.csv")
    assert code == 0, err
    assert (tmp_path / "elsewhere" / "out.csv").read_text().splitlines() == rows
    assert f"raypar: output pipeline_job_output: {tmp_path / 'elsewhere' / 'out.csv'}" in out

    code, _, err = run(capsys, "run", pipeline, "--job-dir", "pdir2", "--set", "jobs.scor.outputs.x=a")
    assert_one_line_error(code, err, "--set jobs.scor...: no step 'scor' in jobs (steps: score)")


def test_datastore_mapped_to_azure_blob_gives_exact_rows(ray_cluster, azurite, tmp_path, capsys, monkeypatch):
    import fsspec

    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite.connection_string)
    container = azurite.new_container()
    fs = fsspec.filesystem("az", connection_string=azurite.connection_string, use_listings_cache=False)
    for i in range(5):
        fs.pipe_file(f"{container}/prefix/input/f{i}.txt", f"iris {i}".encode())
    project(tmp_path)
    pipeline = write_pipeline(tmp_path, DATASTORE_PIPELINE.replace("STORE", f"az://{container}/prefix"))

    code, out, err = run(capsys, "run", pipeline, "--job-dir", tmp_path / "pdir")

    assert code == 0, err
    text = fs.cat_file(f"{container}/prefix/Iris-batch-prediction/predictions.csv").decode()
    assert text.splitlines() == [f"f{i}.txt IRIS {i}" for i in range(5)]


@pytest.mark.parametrize("mapping, fragment", [
    ("{}", "outputs.pipeline_job_output: azureml://datastores/${{default_datastore}}/paths/${{name}}/predictions.csv: "
           "the default datastore is not mapped (mapped: none); map it once: raypar.datastores: "
           "{default: az://container/folder} (or workspaceblobstore, Azure's default) in the spec, or "
           "RAYPAR_DATASTORES='{\"default\": \"/local/folder\"}'"),
    ("{default: ./blob}", "jobs.score: azureml://datastores/workspaceblobstore/paths/input: datastore "
                          "'workspaceblobstore' is not mapped (mapped: default); map it once: raypar.datastores: "
                          "{workspaceblobstore: az://container/folder} in the spec, or "
                          "RAYPAR_DATASTORES='{\"workspaceblobstore\": \"/local/folder\"}'"),
])
def test_an_unmapped_datastore_is_one_line_naming_it_and_how_to_map_it(tmp_path, capsys, monkeypatch, mapping,
                                                                       fragment):
    project(tmp_path)
    monkeypatch.delenv("RAYPAR_DATASTORES", raising=False)
    pipeline = write_pipeline(tmp_path, DATASTORE_PIPELINE.replace(
        "{workspaceblobstore: STORE, default: workspaceblobstore}", mapping))

    code, _, err = run(capsys, "run", pipeline, "--job-dir", tmp_path / "pdir")

    assert_one_line_error(code, err, "pipeline.yml: " + fragment)
    assert not (tmp_path / "pdir").exists()
