"""A pipeline dir's files, and its status read from them alone: no Ray, so `raypar status` is quick.

``pipeline.json`` is the plan, written once; ``pipeline.lock`` keeps one raypar per
pipeline dir; each step's ``step.json`` says how it went (see :mod:`raypar.pipelines.run`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from filelock import FileLock, Timeout

from raypar.errors import RayparError
from raypar.storage import is_url

PLAN_FILE = "pipeline.json"
STEP_FILE = "step.json"
LOCK_FILE = "pipeline.lock"


def read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        raise RayparError(f"{path}: corrupted (not JSON)") from None


def write_json(path: Path, data: dict) -> None:
    """Whole or not at all: a crash never leaves half a marker."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def is_locked(folder: Path) -> bool:
    if not (folder / LOCK_FILE).exists():
        return False
    probe = FileLock(folder / LOCK_FILE)
    try:
        probe.acquire(timeout=0)
    except Timeout:
        return True
    probe.release()
    return False


def is_pipeline_dir(target: str) -> bool:
    return not is_url(target) and Path(target, PLAN_FILE).is_file()


def pipeline_status(target: str) -> dict:
    """State of the pipeline and of each step, from the pipeline dir alone (no Ray)."""
    folder = Path(target).resolve()
    frozen = read_json(folder / PLAN_FILE) or {}
    running = is_locked(folder)
    steps = []
    for planned in frozen.get("plan", {}).get("steps", []):
        step_dir = folder / planned["name"]
        marker = read_json(step_dir / STEP_FILE) or {}
        state = marker.get("state", "not started")
        if state == "running" and not running:
            state = "interrupted"
        entry = {"name": planned["name"], "kind": planned["kind"], "state": state, "dir": str(step_dir)}
        for key in ("exit_code", "reason"):
            if marker.get(key) not in (None, ""):
                entry[key] = marker[key]
        steps.append(entry)
    states = {s["state"] for s in steps}
    overall = "running" if running else "succeeded" if states == {"succeeded"} else \
        next((s for s in ("failed", "canceled", "interrupted") if s in states), "incomplete")
    return {"pipeline_dir": str(folder), "name": frozen.get("name"), "source": frozen.get("source"),
            "state": overall, "steps": steps, "outputs": frozen.get("plan", {}).get("outputs", {})}


def print_pipeline_status(target: str, as_json: bool = False) -> int:
    status = pipeline_status(target)
    if as_json:
        print(json.dumps(status, indent=2))
        return 0
    print(f"pipeline:  {status['name']} ({status['pipeline_dir']})")
    print(f"state:     {status['state']}")
    for step in status["steps"]:
        extra = f": {step['reason']}" if step.get("reason") and step["state"] != "succeeded" else ""
        print(f"step:      {step['name']} ({step['kind']}) {step['state']}{extra}")
    for name, path in status["outputs"].items():
        print(f"output:    {name}: {path}")
    return 0
