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
import time
from typing import Optional

from raypar.errors import RayparError
from raypar.version import __version__


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raypar", description="Azure-ML-style parallel jobs on Ray, with resume.")
    p.add_argument("--version", action="version", version=f"raypar {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="show raypar's debug log")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a job spec (Azure ML v2 parallel job YAML), a parallel component "
                                     "or a pipeline from this machine")
    run.add_argument("spec", help="path to the job, component or pipeline YAML (or env:VAR: the YAML is in "
                                  "environment variable VAR)")
    run.add_argument("--job-dir", help="ledger folder or URL (default: ./raypar-jobs/<name>-<time>-<id>); "
                                       "a job dir holding the same spec is resumed; for a pipeline, the "
                                       "(local) pipeline dir, whose finished steps are skipped")
    run.add_argument("--set", action="append", default=[], metavar="inputs.NAME=VALUE",
                     help="bind an input (a path, relative to here, or a value) or an output path "
                          "(outputs.NAME=PATH) of the job, component or pipeline (repeatable)")
    run.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else an embedded "
                                       "local Ray on 127.0.0.1)")
    run.add_argument("--code-dir", help="task.code is here, not at the spec's path (submitted jobs run Ray's "
                                        "copy); the job dir keeps the spec as written")

    submit = sub.add_parser("submit", help="send a job spec to a Ray cluster through its Jobs API")
    submit.add_argument("spec", help="path to the job YAML")
    submit.add_argument("--job-dir", help="ledger URL the cluster can reach (default: $RAYPAR_JOB_ROOT/<name>-...)")
    submit.add_argument("--wait", action="store_true", help="show progress until the job ends; exit with its code")
    _remote_options(submit)

    resume = sub.add_parser("resume", help="run the mini-batches of a job that are not done")
    resume.add_argument("target", metavar="JOB_DIR|SUBMISSION_ID")
    resume.add_argument("--address", help="http(s)://HEAD:8265: submit the resuming driver to that cluster; "
                                          "otherwise the Ray address for a driver on this machine")
    resume.add_argument("--code-dir", help=argparse.SUPPRESS)
    resume.add_argument("--code", metavar="DIR", help="with an http address: the job's task.code folder here "
                                                      "(default: the path in its spec)")
    resume.add_argument("--wait", action="store_true", help="with an http address: follow it until it ends")
    resume.add_argument("--retry-failed-items", action="store_true",
                        help="also run again the items run() reported failed (raypar.item_failed) in done "
                             "mini-batches, just them; their rows follow their batch's in the output")
    _remote_options(resume, address=False)

    cancel = sub.add_parser("cancel", help="stop a running job (it stays resumable)")
    cancel.add_argument("target", metavar="JOB_DIR|SUBMISSION_ID")
    cancel.add_argument("--wait", type=float, default=60.0, metavar="SECONDS",
                        help="how long to wait for the driver to stop (default 60)")
    _remote_options(cancel, submitting=False)

    logs = sub.add_parser("logs", help="worker logs of a job dir, the driver log of a submission, "
                                       "or every attempt of one mini-batch")
    logs.add_argument("target", metavar="JOB_DIR|SUBMISSION_ID")
    logs.add_argument("--batch", metavar="ID", help="a mini-batch ID such as mb-0000012")
    logs.add_argument("--follow", action="store_true", help="with a submission: follow the driver log")
    _remote_options(logs, submitting=False)

    status = sub.add_parser("status", help="state and mini-batch counts of a job")
    status.add_argument("target", metavar="JOB_DIR|SUBMISSION_ID")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.add_argument("--exact", action="store_true",
                        help="count what the ledger has stored, not what the running driver last reported "
                             "(reads every record: slower on a large job)")
    _remote_options(status, submitting=False)

    failed = sub.add_parser("failed", help="the items that failed (reported by run(), or of failed mini-batches), "
                                           "with their error, as a new job's input")
    failed.add_argument("target", metavar="JOB_DIR")
    failed.add_argument("-o", "--output", metavar="FILE|FOLDER",
                        help="where to write them (a path or URL; a folder for mltable); default stdout")
    failed.add_argument("--format", choices=("txt", "csv", "parquet", "mltable"),
                        help="txt: one path per line (files jobs; their default); csv (table jobs' default), "
                             "parquet: the items with raypar_error and raypar_batch columns; mltable: a folder "
                             "that is directly a job's input")

    report = sub.add_parser("report", help="one self-contained HTML page of a job: timeline, throughput, "
                                           "slowest mini-batches, failures, settings")
    report.add_argument("target", metavar="JOB_DIR")
    report.add_argument("-o", "--output", metavar="FILE",
                        help="where to write it (a path or URL); default JOB_DIR/reports/report.html")

    kube = sub.add_parser("kube", help="Kubernetes (KubeRay) manifests for a job")
    kube_sub = kube.add_subparsers(dest="kube_command", required=True, metavar="KUBE_COMMAND")
    render = kube_sub.add_parser("render", help="print a ready KubeRay RayJob (and a ConfigMap with task.code)")
    render.add_argument("spec", help="path to the job YAML")
    render.add_argument("--image", help="image with raypar installed, for every pod (default raypar:VERSION, "
                                        "built from deploy/docker/Dockerfile)")
    render.add_argument("--job-dir", help="ledger URL (default: $RAYPAR_JOB_ROOT/<RayJob name>); every retry "
                                          "resumes it")
    render.add_argument("--name", help="RayJob name (default raypar-<spec name>)")
    render.add_argument("--namespace", help="namespace of the objects (default: kubectl's)")
    render.add_argument("--secret", default="raypar-storage",
                        help="Secret whose keys become the pods' environment: storage credentials, the spec's "
                             "$VARs (default raypar-storage)")
    render.add_argument("--backoff-limit", type=int, metavar="N",
                        help="KubeRay retries on a fresh cluster, each resuming the job dir (default 2)")
    render.add_argument("--cluster", metavar="RAYCLUSTER",
                        help="run on this existing RayCluster (clusterSelector; KubeRay allows no retries then)")
    render.add_argument("--code-in-image", metavar="DIR",
                        help="task.code is baked into the image at DIR (the ConfigMap holds only the spec; for "
                             "code over 1 MiB)")
    render.add_argument("--shared-path", action="append", default=[], metavar="PATH",
                        help="a path every pod mounts (a PVC) that the spec may use (repeatable)")
    render.add_argument("--kind", choices=("RayJob", "RayCluster"), default="RayJob",
                        help="RayJob (default): the job on its own cluster; RayCluster: a standing cluster shaped "
                             "for the spec, for `raypar submit` and RayJobs with --cluster")
    render.add_argument("-o", "--output", metavar="FILE", help="write the manifest here instead of stdout")

    convert = sub.add_parser("convert", help="print the v2 job YAML of an Azure ML SDK v1 ParallelRunStep")
    convert.add_argument("v1config", metavar="V1CONFIG",
                         help="a v1 config (.yml: parallel_run_config: plus the step's keys) or a .py file that "
                              "defines a ParallelRunStep (raypar runs it)")
    convert.add_argument("--step", metavar="NAME", help="the ParallelRunStep of a .py file that defines several "
                                                        "(its variable or step name)")
    convert.add_argument("-o", "--output", metavar="FILE", help="write the YAML here (paths inside its folder "
                                                                "relative to it) instead of stdout")
    return p


def _remote_options(p: argparse.ArgumentParser, address: bool = True, submitting: bool = True) -> None:
    """Options of commands that talk to a cluster's Jobs API."""
    if address:
        p.add_argument("--address", help="the cluster's Jobs API, http(s)://HEAD:8265 "
                                         "(default: RAY_API_SERVER_ADDRESS, else RAY_ADDRESS)")
    p.add_argument("--header", action="append", metavar="'NAME: VALUE'",
                   help="extra HTTP header for a proxy or ingress (repeatable; also RAY_JOB_HEADERS)")
    if submitting:
        p.add_argument("--shared-path", action="append", default=[], metavar="PATH",
                       help="a local path every cluster node mounts at the same place (repeatable)")
        p.add_argument("--env", action="append", metavar="NAME[=VALUE]",
                       help="an extra environment variable for the job's processes (repeatable)")


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="raypar: %(levelname)s %(message)s")
    logging.getLogger("azure").setLevel(logging.WARNING)  # the SDK logs every HTTP request at INFO
    from raypar.engine.signals import stop_on_sigterm

    stop_on_sigterm()  # before Ray starts too: a job stopped while planning ends canceled
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
        from raypar.credentials import describe_error
        print(f"raypar: error: {describe_error(exc)} (--verbose shows the traceback)", file=sys.stderr)
        return 1


def _dispatch(args) -> int:
    if args.command == "convert":
        return _convert(args)
    if args.command == "failed":
        return _failed(args)
    if args.command == "report":
        return _report(args)
    if _is_remote(args):
        return _remote(args)
    if args.command in ("status", "resume"):
        from raypar.pipelines.pipeline_dir import is_pipeline_dir

        if is_pipeline_dir(args.target):
            return _pipeline_dir(args)
    if args.command == "status":
        return _status(args)
    if args.command == "logs":
        return _logs(args)
    if args.command == "submit":
        return _submit(args)
    if args.command == "kube":
        return _kube_render(args)
    from raypar.engine.driver import cancel_job, resume_job, run_job
    from raypar.engine.progress import ProgressDisplay

    if args.command == "cancel":
        cancel_job(args.target, wait=args.wait, echo=_echo)
        return 0
    display = ProgressDisplay()
    try:
        if args.command == "run":
            from raypar.pipelines.loading import Pipeline, prepare_run
            from raypar.pipelines.run import run_pipeline

            target = prepare_run(args.spec, args.set, args.job_dir, code_dir=args.code_dir)
            if isinstance(target, Pipeline):
                return run_pipeline(target, address=args.address, echo=display.echo, progress=display.update)
            outcome = run_job(target, job_dir=args.job_dir, address=args.address, echo=display.echo,
                              progress=display.update, code_dir=args.code_dir)
        else:
            outcome = resume_job(args.target, address=args.address, echo=display.echo,
                                 progress=display.update, code_dir=args.code_dir,
                                 retry_failed_items=args.retry_failed_items)
    finally:
        display.close()
    if outcome.state.value == "canceled":
        print(f"raypar: job canceled ({outcome.reason or 'canceled'}); continue it with: "
              f"raypar resume {outcome.job_dir}", file=sys.stderr)
    elif outcome.state.value == "succeeded":
        where = f"; output {outcome.output}" if outcome.output else ""
        _echo(f"raypar: succeeded: {outcome.completed}/{outcome.total} mini-batches done{where}")
    else:
        headline = outcome.reason.splitlines()[0] if outcome.reason else outcome.state.value
        print(f"raypar: job {outcome.state.value}: {headline}", file=sys.stderr)
        print(f"raypar: details: raypar status {outcome.job_dir}; continue: raypar resume {outcome.job_dir}",
              file=sys.stderr)
    return outcome.exit_code


def _failed(args) -> int:
    """`raypar failed JOB_DIR`: see raypar/engine/failed_export.py."""
    from raypar.credentials import resolve_storage
    from raypar.engine.failed_export import collect, describe, write
    from raypar.storage import normalize_path

    items = collect(normalize_path(args.target))
    fmt = args.format or ("txt" if items.kind == "files" else "csv")
    target = normalize_path(args.output) if args.output else None
    data = write(items, fmt, target, resolve_storage({}))
    if data is not None:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    print(describe(items, target, fmt), file=sys.stderr)
    return 0


def _report(args) -> int:
    """`raypar report JOB_DIR`: see raypar/engine/report_html.py."""
    from raypar.credentials import options_for, resolve_storage
    from raypar.engine.report_html import html_report
    from raypar.engine.upkeep import final_view
    from raypar.jobdir.layout import REPORT_HTML as REPORT
    from raypar.jobdir.ledger import Ledger
    from raypar.storage import atomic_output, normalize_path

    job_dir = normalize_path(args.target)
    storage = resolve_storage({})
    ledger = Ledger(job_dir, options_for(job_dir, storage))
    ledger.load_job()  # a clear error when it is not a job dir
    saved = ledger.read_state()
    page = html_report(ledger, final_view(ledger), saved["state"], saved.get("reason") or "").encode()
    if args.output:
        target = normalize_path(args.output)
        with atomic_output(target, options_for(target, storage)) as f:
            f.write(page)
    else:
        ledger.store.write_atomic(page, "reports", REPORT)
        target = f"{job_dir}/reports/{REPORT}"
    _echo(f"raypar: report written to {target}")
    return 0


def _echo(line: str) -> None:
    print(line, flush=True)


def _pipeline_dir(args) -> int:
    """`raypar status` / `raypar resume` of a pipeline dir (see docs/pipelines.md)."""
    if args.command == "status":
        from raypar.pipelines.pipeline_dir import print_pipeline_status

        return print_pipeline_status(args.target, as_json=args.json)
    from raypar.engine.progress import ProgressDisplay
    from raypar.pipelines.run import resume_pipeline

    display = ProgressDisplay()
    try:
        return resume_pipeline(args.target, address=args.address, echo=display.echo, progress=display.update)
    finally:
        display.close()


def _is_remote(args) -> bool:
    """Talk to a Jobs API: a submission ID where a job dir could be, or `resume --address http(s)://...`."""
    if args.command in ("submit", "run", "kube"):
        return False
    from raypar.storage import is_url

    address = getattr(args, "address", None)
    http = bool(address and address.startswith(("http://", "https://")))
    looks_like_job_dir = is_url(args.target) or os.path.exists(args.target) or os.sep in args.target
    api_from_env = bool(os.environ.get("RAY_API_SERVER_ADDRESS")) or \
        os.environ.get("RAY_ADDRESS", "").startswith(("http://", "https://"))
    if args.command == "resume":  # its --address may also be a Ray address for a driver here
        return http or (not looks_like_job_dir and api_from_env)
    return not looks_like_job_dir and (bool(address) or api_from_env)


def _api(args):
    from raypar.launch.jobs_api import JobsApi, parse_headers

    api = JobsApi(getattr(args, "address", None), parse_headers(args.header))
    # Ray's SDK logs "Uploading package ..." and "WebSocket closed ..." at INFO: noise on a command line.
    for name in ("ray", "ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return api


def _submit(args) -> int:
    from raypar.launch.submission import parse_env, submit_job

    job = submit_job(args.spec, job_dir=args.job_dir, shared_paths=tuple(args.shared_path),
                     env=parse_env(args.env), echo=_echo, api=_api(args))
    return _submitted(job, args.wait)


def _kube_render(args) -> int:
    from raypar.errors import UsageError
    from raypar.launch.kube import dump_yaml, render, render_raycluster

    if args.kind == "RayCluster":
        job_only = {"--job-dir": args.job_dir, "--cluster": args.cluster, "--code-in-image": args.code_in_image,
                    "--backoff-limit": args.backoff_limit is not None, "--shared-path": args.shared_path}
        given = [flag for flag, value in job_only.items() if value]
        if given:
            raise UsageError(f"{', '.join(given)}: options of a RayJob, not of --kind RayCluster")
        cluster = render_raycluster(args.spec, image=args.image, name=args.name or "raypar", namespace=args.namespace,
                                    secret=args.secret)
        _write(f"# Rendered by raypar {__version__}: RayCluster {cluster['metadata']['name']}\n---\n"
               + dump_yaml(cluster), args.output, "")
        return 0
    rendered = render(args.spec, image=args.image, job_dir=args.job_dir, name=args.name, namespace=args.namespace,
                      secret=args.secret, backoff_limit=2 if args.backoff_limit is None else args.backoff_limit,
                      cluster=args.cluster,
                      code_in_image=args.code_in_image, shared_paths=tuple(args.shared_path),
                      echo=lambda line: print(line, file=sys.stderr))
    _write(rendered.to_yaml(args.secret), args.output, f" (job dir {rendered.job_dir})")
    return 0


def _convert(args) -> int:
    from raypar.azureml.convert import convert_file

    relative_to = os.path.dirname(os.path.abspath(args.output)) if args.output else None
    _write(convert_file(args.v1config, step=args.step, relative_to=relative_to), args.output, "")
    return 0


def _write(text: str, output: Optional[str], about: str) -> None:
    if output:
        from raypar.errors import UsageError

        try:
            with open(output, "w") as f:
                f.write(text)
        except OSError as exc:
            raise UsageError(f"-o {output}: cannot write it ({exc.strerror})") from None
        print(f"raypar: wrote {output}{about}", file=sys.stderr)
    else:
        sys.stdout.write(text)


def _submitted(job, wait: bool) -> int:
    from raypar.launch.submission import follow, submitted_exit_line

    _echo(f"raypar: submitted {job.submission_id} to {job.address}")
    _echo(f"raypar: job dir {job.job_dir}")
    if not wait:
        _echo(f"raypar: watch it: raypar status --address {job.address} {job.submission_id}")
        return 0
    try:
        outcome = follow(job, echo=_echo)
    except KeyboardInterrupt:
        print(f"raypar: stopped following; {job.submission_id} goes on running on the cluster "
              f"(stop it: raypar cancel --address {job.address} {job.submission_id})", file=sys.stderr)
        return 130
    line = submitted_exit_line(outcome)
    print(line, file=sys.stdout if outcome.exit_code == 0 else sys.stderr, flush=True)
    if outcome.exit_code != 0:
        print(f"raypar: continue it with: raypar resume --address {job.address} {job.submission_id}",
              file=sys.stderr)
    return outcome.exit_code


def _remote(args) -> int:
    from raypar.launch.submission import SubmittedJob, parse_env, resume_remote

    api = _api(args)
    if args.command == "resume":
        job = resume_remote(args.target, api=api, code_dir=args.code, shared_paths=tuple(args.shared_path),
                            env=parse_env(args.env), echo=_echo, retry_failed_items=args.retry_failed_items)
        return _submitted(job, args.wait)
    job = SubmittedJob(api, args.target)
    if args.command == "status":
        status = job.status(exact=args.exact)
        if args.json:
            print(json.dumps(status, indent=2, default=str))
            return 0
        print(f"submission: {job.submission_id} on {job.address} (Ray: {status['ray_status']})")
        _print_status(status)
        return 0
    if args.command == "cancel":
        outcome = job.cancel(wait=args.wait)
        _echo(f"raypar: {job.submission_id} {outcome.state} (Ray status {outcome.ray_status}); continue it with: "
              f"raypar resume --address {job.address} {job.submission_id}")
        return 0
    if args.batch:
        args.target = job.job_dir
        return _logs(args)
    if args.follow:
        for chunk in api.tail(job.submission_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()
    else:
        sys.stdout.write(job.logs())
    return 0


def _status(args) -> int:
    from raypar.engine.status import job_status
    from raypar.storage import is_url

    # The job dir as resume and logs take it from anywhere: absolute (a URL stays as it is).
    status = job_status(args.target if is_url(args.target) else os.path.abspath(os.path.expanduser(args.target)),
                        exact=args.exact)
    if args.json:
        print(json.dumps(status, indent=2, default=str))
        return 0
    _print_status(status)
    return 0


def _print_status(status: dict) -> None:
    from raypar.engine.status import failed_items_text

    print(f"job:       {status.get('name') or '-'} ({status['job_dir']})")
    print(f"state:     {status['state']}")
    if status.get("reason"):
        print("reason:    " + status["reason"].replace("\n", "\n           "))
    if "total" in status:
        total = status["total"] if status.get("planning_complete") else f"{status['total']} planned so far"
        pending = f"{status['pending']} pending, " if "pending" in status else ""
        print(f"batches:   {status['completed']} done, {status['failed']} failed, {pending}{total} total"
              f"{_counted_by(status)}")
    if status.get("failed_items"):
        print(f"items:     {failed_items_text(status['failed_items'], status.get('unreturned_items', 0))} "
              f"(error_threshold counts both, as on Azure)")
    if status.get("worker_time"):  # a running job's, as its driver counted it
        from raypar.engine.worker_time import TimeSplit

        print(f"workers:   worker time so far {TimeSplit.of(status['worker_time']).describe()}")
    elif status.get("job_worker_time"):  # every recorded session's, once no driver runs
        from raypar.engine.worker_time import TimeSplit, sessions_text

        total = status["job_worker_time"]
        print(f"workers:   worker time of {sessions_text(total)}: {TimeSplit.of(total).describe()}")
    if status.get("source") and status["source"] != "job dir":
        print(f"from:      {status['source']}")
    if status.get("output"):
        print(f"output:    {status['output']}")
    if status.get("report"):
        print(f"report:    {status['report']} (timeline, throughput, slowest, failures)")
    for err in status.get("errors", []):
        last = err["error"].strip().splitlines()[-1] if err["error"].strip() else ""
        print(f"error:     {err['batch']} ({err['kind']}): {last}")
    _print_input_changes(status.get("input_changes"))
    added = status.get("last_added")
    if added:
        from raypar.engine.replan import names

        print(f"added:     {len(added['files'])} input file(s) by the last run that grew the job "
              f"({names(added['files'])}): {added['batches']} mini-batch(es)")


def _counted_by(status: dict) -> str:
    """Where the counts come from, when the running driver reported them (not the ledger)."""
    if status.get("counted_by") != "driver":
        return ""
    age = time.time() - (status.get("counted_at") or time.time())
    return f" (the driver's count {max(age, 0):.0f}s ago; --exact for what is stored)"


def _print_input_changes(changes) -> None:
    """What a resume will do about input files changed, gone or added since planning."""
    from raypar.engine.replan import names

    if not changes:
        return
    if changes.get("error"):
        print(f"inputs:    not checked ({changes['error']})")
    if changes.get("changed"):
        print(f"inputs:    {len(changes['changed'])} changed since planned ({names(changes['changed'])}): "
              f"resume plans their mini-batches again")
    if changes.get("gone"):
        print(f"inputs:    {len(changes['gone'])} gone ({names(changes['gone'])}): resume refuses until restored")
    if changes.get("added"):
        print(f"inputs:    {len(changes['added'])} added after planning ({names(changes['added'])}): "
              f"`raypar run` of the same spec on this job dir adds them; a resume does not")


def _logs(args) -> int:
    from raypar.engine.reports import STATUS_OF_KIND, batch_log_sections
    from raypar.errors import UsageError
    from raypar.inputs.base import ordinal_of
    from raypar.jobdir.ledger import Ledger

    ledger = Ledger(args.target)
    ledger.load_job()
    if not args.batch:
        logs = ledger.worker_logs()
        if not logs:
            print("raypar: no worker logs yet", file=sys.stderr)
        for where, text in logs:
            print(f"==> {where} <==")
            sys.stdout.write(text)
        return 0
    try:
        ordinal_of(args.batch)
    except ValueError:
        raise UsageError(f"{args.target}: no mini-batch {args.batch} in this job") from None
    view = ledger.view(errors_for=[args.batch])  # not every traceback: a million failed attempts are a gigabyte
    if ordinal_of(args.batch) >= (len(view.manifest) if view.manifest is not None else float("inf")):
        raise UsageError(f"{args.target}: no mini-batch {args.batch} in this job")
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
