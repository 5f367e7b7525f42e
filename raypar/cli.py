"""The ``raypar`` command.

Exit codes: 0 the job succeeded, 1 the job failed, 2 a bad spec or bad usage,
130 interrupted. Errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Optional

from . import __version__
from .errors import RayparError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raypar", description="Azure-ML-style parallel jobs on Ray, with resume.")
    p.add_argument("--version", action="version", version=f"raypar {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="show raypar's debug log")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a job spec (Azure ML v2 parallel job YAML)")
    run.add_argument("spec", help="path to the job YAML")
    run.add_argument("--job-dir", help="ledger folder or URL (default: ./raypar-jobs/<name>-<time>-<id>); "
                                       "a job dir holding the same spec is resumed")
    run.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else an embedded "
                                       "local Ray on 127.0.0.1)")

    resume = sub.add_parser("resume", help="run the mini-batches of a job dir that are not done")
    resume.add_argument("job_dir")
    resume.add_argument("--address", help="Ray cluster address (as for run)")

    cancel = sub.add_parser("cancel", help="stop a running job (it stays resumable)")
    cancel.add_argument("job_dir")
    cancel.add_argument("--wait", type=float, default=30.0, metavar="SECONDS",
                        help="how long to wait for the driver to stop (default 30)")

    logs = sub.add_parser("logs", help="worker logs of a job dir, or every attempt of one mini-batch")
    logs.add_argument("job_dir")
    logs.add_argument("--batch", metavar="ID", help="a mini-batch ID such as mb-0000012")

    status = sub.add_parser("status", help="state and mini-batch counts of a job dir")
    status.add_argument("job_dir")
    status.add_argument("--json", action="store_true", help="print JSON")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="raypar: %(levelname)s %(message)s")
    logging.getLogger("azure").setLevel(logging.WARNING)  # the SDK logs every HTTP request at INFO
    try:
        return _dispatch(args)
    except RayparError as exc:
        print(f"raypar: error: {exc.headline}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("raypar: interrupted; the job is resumable with `raypar resume JOB_DIR`", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `raypar status --json | head`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:  # storage or network errors, and bugs: one line, the traceback on --verbose
        if args.verbose:
            raise
        from .credentials import describe_error
        print(f"raypar: error: {describe_error(exc)} (--verbose shows the traceback)", file=sys.stderr)
        return 1


def _dispatch(args) -> int:
    if args.command == "status":
        return _status(args)
    if args.command == "logs":
        return _logs(args)
    from .driver import cancel_job, resume_job, run_job

    def echo(line: str) -> None:
        print(line, flush=True)

    if args.command == "cancel":
        cancel_job(args.job_dir, wait=args.wait, echo=echo)
        return 0

    if args.command == "run":
        outcome = run_job(args.spec, job_dir=args.job_dir, address=args.address, echo=echo)
    else:
        outcome = resume_job(args.job_dir, address=args.address, echo=echo)
    if outcome.state.value == "canceled":
        print(f"raypar: job canceled; continue it with: raypar resume {outcome.job_dir}", file=sys.stderr)
    elif outcome.state.value == "succeeded":
        where = f"; output {outcome.output}" if outcome.output else ""
        echo(f"raypar: succeeded: {outcome.completed}/{outcome.total} mini-batches done{where}")
    else:
        headline = outcome.reason.splitlines()[0] if outcome.reason else outcome.state.value
        print(f"raypar: job {outcome.state.value}: {headline}", file=sys.stderr)
        print(f"raypar: details: raypar status {outcome.job_dir}; continue: raypar resume {outcome.job_dir}",
              file=sys.stderr)
    return outcome.exit_code


def _status(args) -> int:
    from .status import job_status

    status = job_status(args.job_dir)
    if args.json:
        print(json.dumps(status, indent=2, default=str))
        return 0
    print(f"job:       {status['name'] or '-'} ({status['job_dir']})")
    print(f"state:     {status['state']}")
    if status["reason"]:
        print("reason:    " + status["reason"].replace("\n", "\n           "))
    total = status["total"] if status["planning_complete"] else f"{status['total']} planned so far"
    print(f"batches:   {status['completed']} done, {status['failed']} failed, "
          f"{status['pending']} pending, {total} total")
    if status["output"]:
        print(f"output:    {status['output']}")
    for err in status["errors"]:
        last = err["error"].strip().splitlines()[-1] if err["error"].strip() else ""
        print(f"error:     {err['batch']} ({err['kind']}): {last}")
    return 0


def _logs(args) -> int:
    from .errors import UsageError
    from .inputs.base import ordinal_of
    from .ledger import Ledger
    from .reports import STATUS_OF_KIND, batch_log_sections

    ledger = Ledger(args.job_dir)
    ledger.load_job()
    if not args.batch:
        files = ledger.log_files()
        if not files:
            print("raypar: no worker logs yet", file=sys.stderr)
        for path in files:
            print(f"==> {path} <==")
            sys.stdout.write(ledger.store.fs.cat_file(path).decode(errors="replace"))
        return 0
    view = ledger.view()
    try:
        known = ordinal_of(args.batch) < (len(view.manifest) if view.manifest is not None else float("inf"))
    except ValueError:
        known = False
    if not known:
        raise UsageError(f"{args.job_dir}: no mini-batch {args.batch} in this job")
    for record in view.failed.get(args.batch, []):
        print(f"=== attempt {record.attempt} (run {record.run}): {STATUS_OF_KIND.get(record.kind, record.kind)} "
              f"on {record.worker or '?'}, node {record.node or '?'}")
        print(record.error.rstrip())
    done = view.done.get(args.batch)
    if done is not None:
        print(f"=== attempt {done.attempt} (run {done.run}): done on {done.worker}, node {done.node}, "
              f"{done.returned}/{done.items} items in {done.seconds:.3f}s")
    for path, text in batch_log_sections(ledger, args.batch):
        print(f"--- log {path}")
        print(text)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
