"""Example entry script: the Azure ML parallel job contract (init / run / shutdown).

run() gets a list of local file paths and returns one row per file; raypar
appends every row to the job's output file, once, in mini-batch order.
"""

import argparse
import os

min_length = 0


def init():
    # Called once per worker process before any run(); parse_known_args because
    # the command line may also carry arguments meant for the scheduler.
    global min_length
    parser = argparse.ArgumentParser()
    parser.add_argument("--min_length", type=int, default=0)
    args, _ = parser.parse_known_args()
    min_length = args.min_length


def run(mini_batch):
    rows = []
    for path in mini_batch:
        with open(path) as f:
            words = [w for w in f.read().split() if len(w) >= min_length]
        rows.append(f"{os.path.basename(path)} {len(words)}")
    return rows


def shutdown():
    pass
