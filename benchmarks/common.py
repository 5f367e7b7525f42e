"""Helpers shared by the benchmark scripts (run them as `python benchmarks/<script>.py`)."""

from __future__ import annotations

import os
import shutil
import time

import ray

import raypar


def run_raypar(spec: dict, job_dir: str, verbose: bool):
    echo = (lambda line: print(f"    {line}", flush=True)) if verbose else (lambda line: None)
    return raypar.run(spec, job_dir=job_dir, echo=echo).wait()


def wait_for_free_cpus(want: float, timeout: float = 60.0) -> None:
    """Finished actors and tasks give their CPUs back asynchronously: start each phase on an idle cluster."""
    deadline = time.time() + timeout
    while ray.available_resources().get("CPU", 0) < want:
        if time.time() > deadline:
            raise RuntimeError(f"CPUs not released after {timeout:.0f}s: {ray.available_resources()}")
        time.sleep(0.05)


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def print_load() -> None:
    print(f"load average (1/5/15 min) at the end: {load_average()} on {os.cpu_count()} CPUs "
          f"(anything else running makes these numbers noisy)")


def tear_down(root: str, keep: bool) -> None:
    """Stop Ray and remove the benchmark's folder (unless --keep)."""
    if ray.is_initialized():
        ray.shutdown()
    if keep:
        print(f"kept {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
