"""Azure's predefined program arguments: which raypar honours, and why it ignores the rest.

Azure's parallel runtime reads these flags from ``task.program_arguments``
(v1: ``ParallelRunStep(arguments=...)``); the entry script gets them too, in
``sys.argv``, and skips them with ``parse_known_args``. raypar leaves them in
``sys.argv`` as well. Pure: no I/O, no pydantic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

PROFILERS = ("cProfile", "profile")
MAX_TIMEOUT = 259200  # Azure's upper bound for its timeouts, in seconds (3 days)

# Accepted so Azure specs load unchanged; they name machinery raypar does not have.
IGNORED = {
    "task_overhead_timeout": "reading a mini-batch counts toward retry_settings.timeout",
    "progress_update_timeout": "Ray reports a lost worker at once; a hung run() is bounded by retry_settings.timeout",
    "resource_monitor_interval": "no resource monitor; the Ray dashboard shows usage",
    "copy_logs_to_parent": "no parent pipeline job; logs stay in the job dir",
    "push_metrics_to_parent": "no parent pipeline job; metrics go to Ray (raypar_batches_*)",
    "metrics_name_prefix": "Ray metrics are named raypar_* and tagged with the job's name",
}
HONOURED = ("allowed_failed_percent", "first_task_creation_timeout", "profiling_module")


@dataclass(frozen=True)
class Predefined:
    """The predefined flags found in the program arguments (the last one wins, as in argparse)."""

    allowed_failed_percent: Optional[float] = None
    first_task_creation_timeout: Optional[float] = None
    profiling_module: Optional[str] = None
    ignored: dict = field(default_factory=dict)  # flag name -> why raypar does not use it


def _values(args: list[str]) -> dict[str, Optional[str]]:
    """{name: last value} of the predefined flags in ``args``; None: the flag has no value."""
    found: dict[str, Optional[str]] = {}
    for i, arg in enumerate(args):
        name, eq, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if name not in HONOURED and name not in IGNORED:
            continue
        if not eq:
            following = args[i + 1] if i + 1 < len(args) else None
            value = following if following is not None and not following.startswith("--") else None
        found[name] = value
    return found


def _number(name: str, value: Optional[str], what: str) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"task.program_arguments: --{name} must be {what}, got "
                         f"{'nothing' if value is None else repr(value)}") from None


def parse(args: list[str]) -> Predefined:
    """Read and check Azure's predefined flags in ``args`` (program arguments, already split).

    Raises:
        ValueError: naming ``task.program_arguments`` and the flag, for a value raypar cannot honour.
    """
    values = _values(args)
    percent = timeout = None
    if "allowed_failed_percent" in values:
        percent = _number("allowed_failed_percent", values["allowed_failed_percent"], "a number")
        if not 0 <= percent <= 100:
            raise ValueError(f"task.program_arguments: --allowed_failed_percent {percent:g} is not in [0, 100]")
    if "first_task_creation_timeout" in values:
        what = f"a number of seconds in (0, {MAX_TIMEOUT}]"
        timeout = _number("first_task_creation_timeout", values["first_task_creation_timeout"], what)
        if not 0 < timeout <= MAX_TIMEOUT:
            raise ValueError(f"task.program_arguments: --first_task_creation_timeout must be {what}, "
                             f"got {timeout:g}")
    profiler = values.get("profiling_module")
    if "profiling_module" in values and profiler not in PROFILERS:
        raise ValueError(f"task.program_arguments: --profiling_module must be {' or '.join(PROFILERS)}, "
                         f"got {'nothing' if profiler is None else repr(profiler)}")
    return Predefined(percent, timeout, profiler, {name: IGNORED[name] for name in values if name in IGNORED})


def ignored_note(ignored: dict) -> Optional[str]:
    """The one line saying which predefined flags are accepted but not used, and why (None: none)."""
    if not ignored:
        return None
    return ("task.program_arguments: accepted but not used on Ray (still passed to the entry script): "
            + "; ".join(f"--{name} ({why})" for name, why in ignored.items()))
