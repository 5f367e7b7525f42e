"""Azure ML v2 parallel job style, tabular input: a DataFrame in, a DataFrame back.

Arguments: --threshold X  rows whose x is at least X are labelled "high".
"""
import argparse

import pandas as pd
from azureml_user.parallel_run import EntryScript


def init():
    global threshold, logger
    parser = argparse.ArgumentParser(allow_abbrev=False, description="Label rows")
    parser.add_argument("--threshold", type=float, default=0.5)
    args, unknown_args = parser.parse_known_args()
    threshold = args.threshold
    logger = EntryScript().logger
    logger.info("init: threshold %s, %d other argument(s)", threshold, len(unknown_args))


def run(mini_batch):
    logger.info("run: %d row(s)", len(mini_batch))
    result = pd.DataFrame({
        "id": mini_batch["id"],
        "label": ["high" if x >= threshold else "low" for x in mini_batch["x"]],
    })
    return result
