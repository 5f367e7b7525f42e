"""Test entry script: upper-cases each file's text, one row per file.

Arguments (parse_known_args, as Azure scripts do):
  --exec-log DIR    write one file per run() call listing the batch's files
  --fixed-flag F    files whose text contains "bad" raise unless F exists
  --report-flaky    files whose text contains "flaky" are reported failed (raypar.item_failed),
                    no row, unless the --fixed-flag file exists; the batch goes on
  --with-node       append "<instance> <ray node id>" to every row
  --gate DIR        init() writes DIR/started-<pid> and waits for DIR/release
  --barrier DIR N   a worker's first run() writes DIR/<pid> and waits until N workers did
                    (every worker holds a batch before any batch finishes)
  --slow-slot S N   the worker in slot S waits in run() until N batches are in --exec-log
  --broken-slot S   the worker in slot S raises on every batch (a broken GPU)
  --shutdown-log D  shutdown() writes D/<pid>
  --dataframe       return a DataFrame (name, text) instead of a list
  --hold-after N D  once more than N batches are in --exec-log, run() writes D/holding and
                    waits for D/release (a batch caught mid-run)
  --init-log D      init() writes D/<pid>
  --hold-from NAME D  run() given a file named NAME or later (sorted) writes D/holding-<pid>
                    (holding its Ray node id) and waits for D/release (a job stopped with work
                    in flight)
  --step D          run() writes D/ran-<first file>-<attempt> (holding its Ray node id) and waits
                    for D/go-<first file> or D/free (a test paces the job batch by batch)
  --fault NAME MODE D  the first run() given file NAME writes D/fault ("<pid> <node id>"), then:
                    hang (sleep for an hour), segfault, or hold (wait to be killed);
                    segfault-always crashes every attempt (a crash loop); raypar-once makes
                    raypar's own worker code raise once, after run() returns; jobdir-once and
                    jobdir-always make raypar's own store of the batch fail (a folder takes the
                    name of this worker's segment file), unless D/off exists
"""

import argparse
import logging
import os
import sys
import time
import uuid

args = None


def init():
    global args
    parser = argparse.ArgumentParser()
    parser.add_argument("--exec-log")
    parser.add_argument("--fixed-flag")
    parser.add_argument("--with-node", action="store_true")
    parser.add_argument("--gate")
    parser.add_argument("--barrier", nargs=2)
    parser.add_argument("--slow-slot", nargs=2, type=int)
    parser.add_argument("--broken-slot", type=int)
    parser.add_argument("--shutdown-log")
    parser.add_argument("--dataframe", action="store_true")
    parser.add_argument("--hold-after", nargs=2)
    parser.add_argument("--init-log")
    parser.add_argument("--fault", nargs=3)
    parser.add_argument("--report-flaky", action="store_true")
    parser.add_argument("--hold-from", nargs=2)
    parser.add_argument("--step")
    args, _ = parser.parse_known_args()
    if args.init_log:
        open(os.path.join(args.init_log, str(os.getpid())), "w").close()

    if args.gate:
        open(os.path.join(args.gate, f"started-{os.getpid()}"), "w").close()
        _wait(lambda: os.path.exists(os.path.join(args.gate, "release")))


def _inject_fault(name, mode, folder):
    marker = os.path.join(folder, "fault")
    if mode.startswith("jobdir-") and not os.path.exists(os.path.join(folder, "off")):
        if mode == "jobdir-always" or not os.path.exists(marker):
            open(marker, "w").close()
            log_dir = os.environ["RAYPAR_LOG_DIR"]  # <job dir>/logs/user/<run>~<worker>
            job = os.path.dirname(os.path.dirname(os.path.dirname(log_dir)))
            os.makedirs(os.path.join(job, "parts", os.path.basename(log_dir) + ".data"), exist_ok=True)
        return
    if mode == "raypar-once":  # raypar's own worker code raises once, after this run() returns
        if not os.path.exists(marker):
            open(marker, "w").close()
            actor = sys.modules["raypar.worker.actor"]
            done_record = actor.DoneRecord

            def broken(*args, **kwargs):
                actor.DoneRecord = done_record
                raise RuntimeError("injected: a bug in raypar's worker code")

            actor.DoneRecord = broken
        return
    if mode == "segfault-always":
        import ctypes

        ctypes.string_at(0)
    if os.path.exists(marker):
        return  # only the first attempt is faulty
    import ray

    with open(marker + ".tmp", "w") as f:
        f.write(f"{os.getpid()} {ray.get_runtime_context().get_node_id()}")
    os.replace(marker + ".tmp", marker)
    if mode == "hang":
        time.sleep(3600)
    elif mode == "segfault":
        import ctypes

        ctypes.string_at(0)
    elif mode == "hold":
        _wait(lambda: False, timeout=600)


def _wait(condition, timeout=120):
    deadline = time.time() + timeout
    while not condition() and time.time() < deadline:
        time.sleep(0.05)


def run(mini_batch):
    names = [os.path.basename(p) for p in mini_batch]
    print(f"scoring {' '.join(names)}")  # the job dir's worker log must catch both
    logging.getLogger("score").info("batch of %d files", len(names))
    if args.barrier:
        folder, count = args.barrier[0], int(args.barrier[1])
        mark = os.path.join(folder, str(os.getpid()))
        if not os.path.exists(mark):
            open(mark, "w").close()
            _wait(lambda: len(os.listdir(folder)) >= count)
    if args.broken_slot is not None and int(os.environ["RAYPAR_SLOT"]) == args.broken_slot:
        raise RuntimeError(f"CUDA error on slot {args.broken_slot}")
    if args.slow_slot and int(os.environ["RAYPAR_SLOT"]) == args.slow_slot[0]:
        _wait(lambda: len(os.listdir(args.exec_log)) >= args.slow_slot[1])
    if args.exec_log:
        with open(os.path.join(args.exec_log, uuid.uuid4().hex), "w") as f:
            f.write(" ".join(names))
    if args.hold_after and len(os.listdir(args.exec_log)) > int(args.hold_after[0]):
        gate = args.hold_after[1]
        if not os.path.exists(os.path.join(gate, "release")):
            open(os.path.join(gate, "holding"), "w").close()
            _wait(lambda: os.path.exists(os.path.join(gate, "release")), timeout=600)
    if args.hold_from and max(names) >= args.hold_from[0]:
        gate = args.hold_from[1]
        import ray

        with open(os.path.join(gate, f"holding-{os.getpid()}"), "w") as f:
            f.write(ray.get_runtime_context().get_node_id())
        _wait(lambda: os.path.exists(os.path.join(gate, "release")), timeout=600)
    if args.step:
        import ray

        attempt = len([n for n in os.listdir(args.step) if n.startswith(f"ran-{names[0]}-")]) + 1
        with open(os.path.join(args.step, f"ran-{names[0]}-{attempt}"), "w") as f:
            f.write(ray.get_runtime_context().get_node_id())
        _wait(lambda: os.path.exists(os.path.join(args.step, f"go-{names[0]}"))
              or os.path.exists(os.path.join(args.step, "free")), timeout=600)
    if args.fault and args.fault[0] in names:
        _inject_fault(*args.fault)
    fixed = args.fixed_flag and os.path.exists(args.fixed_flag)
    rows = []
    for path, name in zip(mini_batch, names, strict=True):
        with open(path) as f:
            text = f.read().strip()
        if "flaky" in text and args.report_flaky and not fixed:  # this item fails; the batch goes on
            import raypar

            raypar.item_failed(path, ValueError(f"cannot score {name}: flaky record"))
            continue
        if "bad" in text and not fixed:
            raise ValueError(f"cannot score {name}: bad record")
        row = f"{name} {text.upper()}"
        if args.with_node:
            import ray

            row += f" {os.environ['RAYPAR_INSTANCE']} {ray.get_runtime_context().get_node_id()}"
        rows.append(row)
    if args.dataframe:
        import pandas as pd

        return pd.DataFrame({"name": names, "text": [r.split(" ", 1)[1] for r in rows]})
    return rows


def shutdown():
    if args.shutdown_log:
        open(os.path.join(args.shutdown_log, str(os.getpid())), "w").close()
