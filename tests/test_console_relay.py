"""Workers' output on the driver's console: every line exactly once, even for a job of seconds."""

import os
import re
import subprocess
import sys
import textwrap

import pytest
import yaml
from conftest import make_spec

from raypar.engine.console_relay import ConsoleRelay

CLI = [sys.executable, "-m", "raypar.cli"]


def test_relay_shows_complete_lines_once_skips_markers_and_other_runs(tmp_path):
    shown = []
    relay = ConsoleRelay(str(tmp_path), "r2", shown.append)
    mine = tmp_path / "r2~i0s1-ab12cd34.log"
    mine.write_text("[raypar] worker w pid 1 node n\nhello\npart")
    (tmp_path / "r1~i0s0-00000000.log").write_text("from an earlier run\n")
    relay._drain(final=False)
    assert shown == ["(i0s1) hello"]  # "part" has no newline yet: it is still being written
    with open(mine, "a") as f:
        f.write("ial ünïcode\n[raypar] begin b1 attempt 0\nbye")
    relay._drain(final=False)
    relay._drain(final=True)
    assert shown == ["(i0s1) hello", "(i0s1) partial ünïcode", "(i0s1) bye"]
    relay._drain(final=True)
    assert len(shown) == 3  # nothing shown twice


@pytest.mark.timeout(180)
def test_every_print_of_a_short_job_reaches_the_console_exactly_once(tmp_path):
    files = {f"f{i}.txt": f"v{i}" for i in range(8)}
    spec = make_spec(tmp_path, files, **{"max_concurrency_per_instance": 2, "resources.instance_count": 2, "mini_batch_size": "1"})
    (tmp_path / "code" / "talk.py").write_text(textwrap.dedent("""
        import os, sys

        def init():
            print(f"init pid {os.getpid()}")
            print("the same line from every worker")  # Ray folds these into "[repeated Nx]"

        def run(mini_batch):
            for path in mini_batch:
                print(f"scored {os.path.basename(path)}")
            print(f"to stderr {len(mini_batch)}", file=sys.stderr)
            return [os.path.basename(p) for p in mini_batch]

        def shutdown():
            print(f"shutdown pid {os.getpid()}", end="")  # no newline: still shown
    """))
    spec["task"]["entry_script"] = "talk.py"
    (tmp_path / "job.yml").write_text(yaml.safe_dump(spec))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run([*CLI, "run", str(tmp_path / "job.yml"), "--job-dir", str(tmp_path / "job")],
                            capture_output=True, text=True, env=env, timeout=150)
    assert result.returncode == 0, result.stderr
    printed = [re.sub(r"^\(i\ds\d\) ", "", line) for line in result.stdout.splitlines()
               if re.match(r"^\(i\ds\d\) ", line)]
    for name in files:
        assert printed.count(f"scored {name}") == 1, result.stdout
    pids = {line.split()[-1] for line in printed if line.startswith("init pid")}
    assert len(pids) == 4, result.stdout  # 2 instances x 2 processes, each printed once
    assert printed.count("the same line from every worker") == 4
    assert sorted(line.split()[-1] for line in printed if line.startswith("shutdown pid")) == sorted(pids)
    assert printed.count("to stderr 1") == 8
    assert "[raypar]" not in result.stdout.replace("raypar:", "")
    assert "repeated" not in result.stdout
