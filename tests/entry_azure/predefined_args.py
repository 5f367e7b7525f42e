"""Reads Azure's predefined program arguments with parse_known_args, as scripts may; uses
EntryScript's folders and AZUREML_BI_OUTPUT_PATH.

Arguments: --model_name NAME, plus Azure's --first_task_creation_timeout, --resource_monitor_interval,
--copy_logs_to_parent and --profiling_module (read to show the script sees them).
"""
import argparse
import os

from azureml_user.parallel_run import EntryScript

args = None


def init():
    global args
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--model_name", type=str, required=True)
    parser.add_argument("--first_task_creation_timeout", type=int)
    parser.add_argument("--resource_monitor_interval", type=int)
    parser.add_argument("--copy_logs_to_parent", type=str)
    parser.add_argument("--profiling_module", type=str)
    args, _ = parser.parse_known_args()

    entry_script = EntryScript()
    assert entry_script is EntryScript(), "EntryScript is a per-process singleton"
    assert os.environ["AZUREML_BI_OUTPUT_PATH"] == entry_script.output_dir
    for folder in (entry_script.log_dir, entry_script.output_dir, entry_script.working_dir):
        assert os.path.isdir(folder), folder
    # A model "downloaded" to the worker's own scratch folder.
    with open(os.path.join(entry_script.working_dir, "model.txt"), "w") as f:
        f.write(args.model_name)
    entry_script.logger.info("init: working_dir %s", entry_script.working_dir)


def run(mini_batch):
    entry_script = EntryScript()
    with open(os.path.join(entry_script.working_dir, "model.txt")) as f:
        model = f.read()
    names = [os.path.basename(path) for path in mini_batch]
    with open(os.path.join(os.environ["AZUREML_BI_OUTPUT_PATH"], "scored.txt"), "a") as f:
        f.writelines(name + "\n" for name in names)
    with open(os.path.join(entry_script.log_dir, "batches.txt"), "a") as f:
        f.write(" ".join(names) + "\n")
    return ["{} {} {} {} {} {}".format(name, model, args.first_task_creation_timeout, args.resource_monitor_interval,
                                       args.copy_logs_to_parent, args.profiling_module) for name in names]
