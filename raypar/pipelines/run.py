"""Running a resolved pipeline (see :mod:`raypar.pipelines.loading`) in its pipeline dir (its files and
status: :mod:`raypar.pipelines.pipeline_dir`).

Steps run one after another in the plan's order: a parallel step through the
driver (``run_job``) with its own job dir ``<pipeline dir>/<step>``, a command
step as a shell command in its code folder. The pipeline dir holds
``pipeline.json`` (the plan, written once: a later run must resolve to the same
plan), ``pipeline.lock`` (one raypar per pipeline dir) and per step a
``step.json`` marker (running, succeeded, failed, canceled, interrupted): a
step whose marker says succeeded is skipped when the pipeline runs again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

from filelock import FileLock, Timeout

from raypar.engine import cluster
from raypar.engine.driver import run_job
from raypar.engine.signals import interrupt_reason
from raypar.errors import LeaseHeldError, RayparError, SpecError, UsageError
from raypar.pipelines.loading import Pipeline, Step, load_pipeline
from raypar.pipelines.pipeline_dir import LOCK_FILE, PLAN_FILE, STEP_FILE, read_json, write_json
from raypar.spec.loading import changed_keys
from raypar.storage import is_url

LOG_FILE = "std_log.txt"  # a command step's stdout and stderr (Azure's name for it)

Echo = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# -- running ---------------------------------------------------------------


class StepError(RayparError):
    """A step could not start (its spec or files are wrong): the step's name, then the problem."""

    def __init__(self, headline: str, exit_code: int):
        super().__init__(headline)
        self.exit_code = exit_code


def run_pipeline(pipeline: Pipeline, address: Optional[str] = None, echo: Echo = print, progress=None,
                 warn: Echo = _stderr) -> int:
    """Run the steps not yet done, one after another; returns 0, or the exit code of the step that failed.

    Args:
        pipeline: from :func:`load_pipeline`.
        address: the Ray cluster of the parallel steps (default: ``RAY_ADDRESS``, else an
            embedded local Ray on 127.0.0.1, started once for the whole pipeline).
        echo: where progress lines go (a command step's output too, prefixed with its name).
        progress: the parallel steps' progress display (see :func:`raypar.engine.driver.run_job`).
        warn: where the failure lines go.
    """
    folder = Path(pipeline.job_dir)
    _claim_dir(folder)
    with _locked(folder):
        _freeze(pipeline)
        echo(f"raypar: pipeline {pipeline.name}: {len(pipeline.steps)} step(s) in {folder}")
        if pipeline.ignored:
            echo(f"raypar: ignored (Azure-only, no meaning here): {', '.join(pipeline.ignored)}")
        owned = False
        try:
            for index, step in enumerate(pipeline.steps):
                step_dir = pipeline.step_dir(step)
                if (read_json(step_dir / STEP_FILE) or {}).get("state") == "succeeded":
                    echo(f"raypar: step {step.name}: already succeeded in this pipeline dir, skipped")
                    continue
                if step.kind == "parallel" and not owned:
                    owned = _connect(pipeline, address)
                echo(f"raypar: step {step.name} ({step.kind}): started")
                started = time.time()
                write_json(step_dir / STEP_FILE, {"state": "running", "started": started})
                try:
                    code, detail = (_run_parallel(step, step_dir, address, echo, progress) if step.kind == "parallel"
                                    else _run_command(step, step_dir, echo))
                except RayparError as exc:
                    write_json(step_dir / STEP_FILE, {"state": "failed", "exit_code": exc.exit_code,
                                                       "reason": exc.headline})
                    raise StepError(f"jobs.{step.name}: {exc.headline}", exc.exit_code) from None
                except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: the step ran, it did not fail
                    write_json(step_dir / STEP_FILE, {"state": "interrupted", "exit_code": 130,
                                                       "reason": interrupt_reason(exc)})
                    raise
                state = "succeeded" if code == 0 else "canceled" if code == 130 else "failed"
                write_json(step_dir / STEP_FILE, {"state": state, "exit_code": code, "reason": detail,
                                                   "started": started, "seconds": round(time.time() - started, 3)})
                if code:
                    rest = [s.name for s in pipeline.steps[index + 1:]]
                    warn(f"raypar: step {step.name}: failed ({detail})")
                    warn(f"raypar: pipeline failed at step {step.name} (exit code {code}); not run: "
                         f"{', '.join(rest) or 'none'}; run it again with --job-dir {folder} to continue")
                    return code
                echo(f"raypar: step {step.name}: succeeded in {time.time() - started:.1f}s")
        finally:
            if owned:

                cluster.disconnect()
        for name, path in pipeline.outputs.items():
            echo(f"raypar: output {name}: {path}")
        echo(f"raypar: pipeline succeeded: {len(pipeline.steps)} step(s)")
        return 0


def _connect(pipeline: Pipeline, address: Optional[str]) -> bool:
    """One Ray for every parallel step (an embedded one is started once, big enough for the largest step,
    all its instances on the one node). Step job dirs are local folders: their drivers relay the
    workers' output from them (see raypar.console_relay)."""

    need = max((cluster.cpus_for(s.job) for s in pipeline.steps if s.job is not None), default=0)
    return cluster.connect(address, min_cpus=need, relay_output=True)


def _run_parallel(step: Step, step_dir: Path, address, echo: Echo, progress) -> tuple[int, str]:

    outcome = run_job(step.job, job_dir=str(step_dir), address=address, echo=echo, progress=progress)
    if outcome.exit_code == 0:
        return 0, ""
    reason = outcome.reason.splitlines()[0] if outcome.reason else outcome.state.value
    return outcome.exit_code, f"job {outcome.state.value}: {reason}; details: raypar status {outcome.job_dir}"


def _run_command(step: Step, step_dir: Path, echo: Echo) -> tuple[int, str]:
    """The command in a shell, in its code folder; its output to ``std_log.txt`` and to ``echo``."""
    for out in step.outputs.values():
        path = out.get("path")
        if path and not is_url(path):
            folder = Path(path) if out["type"] != "uri_file" else Path(path).parent
            folder.mkdir(parents=True, exist_ok=True)
    step_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **step.env}
    proc = subprocess.Popen(step.command, shell=True, cwd=step.cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
    try:
        with open(step_dir / LOG_FILE, "w") as log:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                echo(f"[{step.name}] {line.rstrip()}")
        code = proc.wait()
    except BaseException:  # Ctrl-C or SIGTERM: the command's whole process group goes too
        _kill_group(proc)
        raise
    if code < 0:  # killed by a signal: the shell's convention
        code = 128 - code
    return code, f"exit code {code}; log {step_dir / LOG_FILE}" if code else ""


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# -- the pipeline dir ------------------------------------------------------


def _claim_dir(folder: Path) -> None:
    """A new pipeline dir, or one holding a pipeline; never a job dir or someone's folder."""
    if (folder / PLAN_FILE).exists():
        return
    if (folder / "job.json").exists():
        raise UsageError(f"{folder}: holds a raypar job, not a pipeline; use a new --job-dir")
    if folder.exists() and any(p.name != LOCK_FILE for p in folder.iterdir()):
        raise UsageError(f"{folder}: not empty and holds no pipeline; use a new --job-dir")
    folder.mkdir(parents=True, exist_ok=True)


@contextmanager
def _locked(folder: Path):
    """One raypar per pipeline dir (an OS lock: released when the process ends, however it ends)."""
    lock = FileLock(folder / LOCK_FILE)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise LeaseHeldError(f"{folder}: another raypar is running this pipeline") from None
    try:
        yield
    finally:
        lock.release()


def _freeze(pipeline: Pipeline) -> None:
    """Write ``pipeline.json`` on the first run; later runs must resolve to the same plan."""
    path = Path(pipeline.job_dir, PLAN_FILE)
    plan = json.loads(json.dumps(pipeline.plan()))  # as it reads back (tuples become lists)
    frozen = read_json(path)
    if frozen is None:
        write_json(path, {"format": 1, "kind": "raypar-pipeline", "name": pipeline.name, "source": pipeline.source,
                           "sets": pipeline.sets, "set_base": pipeline.set_base, "plan": plan})
        return
    if frozen.get("plan") != plan:

        changed = ", ".join(changed_keys(_keyed(frozen.get("plan")), _keyed(plan))[:3])
        raise UsageError(f"{pipeline.job_dir}: holds a different pipeline (changed: {changed}); "
                         f"use a new --job-dir")


def _keyed(plan: Optional[dict]) -> dict:
    """Steps by name, so a changed key reads ``jobs.prep.command``."""
    plan = plan or {}
    return {"jobs": {s["name"]: s for s in plan.get("steps", [])}, "outputs": plan.get("outputs")}


# -- resume of a pipeline dir ----------------------------------------------


def resume_pipeline(target: str, address: Optional[str] = None, echo: Echo = print, progress=None) -> int:
    """Run the pipeline of ``target`` again from its YAML (commands come from the YAML, never from the dir).

    The YAML and ``--set`` bindings recorded at the first run must still resolve to the same plan.
    """
    frozen = read_json(Path(target, PLAN_FILE)) or {}
    source = frozen.get("source")
    try:
        pipeline = load_pipeline(source, frozen.get("sets") or [], job_dir=target, set_base=frozen.get("set_base"))
    except SpecError as exc:
        raise UsageError(f"{target}: cannot read its pipeline YAML again ({exc.headline})") from None
    return run_pipeline(pipeline, address=address, echo=echo, progress=progress)
