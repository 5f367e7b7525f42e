"""Azure ML v1 (ParallelRunStep) style: argparse in init(), EntryScript's logger, a list of strings back.

Arguments: --model_label LABEL  written into every result line.
"""
import argparse
import os

from azureml_user.parallel_run import EntryScript


def init():
    global model_label, logger
    parser = argparse.ArgumentParser(description="Count the words of text files.")
    parser.add_argument("--model_label", type=str, default="none")
    args, _ = parser.parse_known_args()
    model_label = args.model_label

    entry_script = EntryScript()
    logger = entry_script.logger
    logger.info("init: agent %s, model %s", entry_script.agent_name, model_label)


def run(mini_batch):
    logger.info("run: %d file(s)", len(mini_batch))
    resultList = []
    for file_path in mini_batch:
        with open(file_path) as f:
            words = len(f.read().split())
        resultList.append("{}: {} words ({})".format(os.path.basename(file_path), words, model_label))
    return resultList
