"""Entry script for table inputs (tests): run() gets a DataFrame and its context.

Options (parse_known_args, as Azure requires):
  --exec-log DIR   write DIR/<mini-batch id> holding the number of rows, per run() call
  --fail-id N      run() raises for the batch holding row id N
  --side-dir DIR   run() also writes DIR/<mini-batch id>.csv with the ids it got (an output folder)
  --arrow          run() must get a pyarrow Table (raypar.batch_format: pyarrow), and returns one
  --report-every N rows whose id % N == 7 are reported failed (raypar.item_failed), no row
  --barrier DIR N  a worker's first run() writes DIR/<pid> and waits until N workers did
  --hold-id N DIR  the first run() given row id N writes DIR/fault ("<pid> <node id>") and waits
                   to be killed; later tries of that batch go on
Returns one row per input row: id, double (= 2 * x), and the partition key values.
"""

import argparse
import os
import time

import pandas as pd


def init():
    global args
    parser = argparse.ArgumentParser()
    parser.add_argument("--exec-log")
    parser.add_argument("--fail-id", type=int)
    parser.add_argument("--side-dir")
    parser.add_argument("--arrow", action="store_true")
    parser.add_argument("--report-every", type=int)
    parser.add_argument("--barrier", nargs=2)
    parser.add_argument("--hold-id", nargs=2)
    args, _ = parser.parse_known_args()


def run(mini_batch, mini_batch_context):
    if args.barrier:  # every worker holds a batch before any batch finishes
        folder, count = args.barrier[0], int(args.barrier[1])
        mark = os.path.join(folder, str(os.getpid()))
        if not os.path.exists(mark):
            open(mark, "w").close()
            deadline = time.time() + 120
            while len(os.listdir(folder)) < count and time.time() < deadline:
                time.sleep(0.05)
    if args.arrow:
        import pyarrow as pa
        import pyarrow.compute as pc

        assert isinstance(mini_batch, pa.Table), type(mini_batch)
        return pa.table({"id": mini_batch["id"], "double": pc.multiply(mini_batch["x"], 2)})
    assert isinstance(mini_batch, pd.DataFrame), type(mini_batch)
    if args.hold_id and (mini_batch["id"] == int(args.hold_id[0])).any():
        marker = os.path.join(args.hold_id[1], "fault")
        if not os.path.exists(marker):
            import ray

            with open(marker + ".tmp", "w") as f:
                f.write(f"{os.getpid()} {ray.get_runtime_context().get_node_id()}")
            os.replace(marker + ".tmp", marker)
            deadline = time.time() + 600
            while time.time() < deadline:  # killed by the test
                time.sleep(0.05)
    if args.exec_log:
        with open(os.path.join(args.exec_log, f"{mini_batch_context.mini_batch_id}-{os.getpid()}"), "w") as f:
            f.write(str(len(mini_batch)))
    if args.fail_id is not None and (mini_batch["id"] == args.fail_id).any():
        raise ValueError(f"row {args.fail_id} is bad")
    if args.report_every:  # rows whose id % N == 7 fail alone; the others are scored
        import raypar

        flaky = mini_batch[mini_batch["id"] % args.report_every == 7]
        if len(flaky):
            raypar.item_failed(flaky, "ValueError: flaky row")
        mini_batch = mini_batch.drop(flaky.index)
    if args.side_dir:
        mini_batch[["id"]].to_csv(os.path.join(args.side_dir, f"{mini_batch_context.mini_batch_id}.csv"), index=False)
    out = pd.DataFrame({"id": mini_batch["id"].to_numpy(), "double": (mini_batch["x"] * 2).to_numpy()})
    for key, value in mini_batch_context.partition_key_value.items():
        out[f"key_{key}"] = value
    return out
