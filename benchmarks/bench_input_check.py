"""What checking the input for changes adds to a resume, and how it grows with the input.

A resume of a finished plan lists the input once and compares each file's version with the
one the plan recorded (docs/resume.md#when-the-input-changed). This builds an input folder of
--files one-line files (default 100,000, in folders of 1,000) and plans it into a job dir
through the real planner and ledger (one file per mini-batch, as ``mini_batch_size: "1"``
does), then times, each in a fresh interpreter, side by side:

- baseline: what a resume did before the check: read the manifest and the ledger, compute pending;
- check: read the recorded input versions, list the input again, compare.

It prints seconds, peak memory (VmHWM) and the ratio check / baseline. No Ray is needed.

    python benchmarks/bench_input_check.py [--files N] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import print_load, tear_down  # noqa: E402

BASELINE = r"""
import json, sys, time
from raypar.jobdir.ledger import Ledger
started = time.perf_counter()
ledger = Ledger(sys.argv[1])
pending = ledger.view(ledger.read_manifest()).pending()
seconds = time.perf_counter() - started
rss = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
print(json.dumps({"seconds": seconds, "rss_mib": rss, "n": len(pending)}))
"""

CHECK = r"""
import json, sys, time
from raypar.inputs import check_input
from raypar.jobdir.ledger import Ledger
from raypar.engine.replan import check_input_files
from raypar.spec.loading import spec_from_dict
spec = spec_from_dict(json.loads(sys.argv[2]))
started = time.perf_counter()
changes = check_input_files(Ledger(sys.argv[1]), spec, check_input(spec, {}), {})
seconds = time.perf_counter() - started
rss = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
print(json.dumps({"seconds": seconds, "rss_mib": rss, "n": len(changes.changed) + len(changes.gone)}))
"""


def spec_dict(data: str, code: str) -> dict:
    return {"type": "parallel", "inputs": {"data": {"type": "uri_folder", "path": data}},
            "input_data": "${{inputs.data}}", "mini_batch_size": "1",
            "task": {"code": code, "entry_script": "score.py"}}


def build(root: str, files: int) -> tuple[str, dict]:
    from raypar.inputs import check_input, plan_batches
    from raypar.jobdir.ledger import Ledger
    from raypar.spec.loading import spec_from_dict

    data, code, job = (os.path.join(root, d) for d in ("data", "code", "job"))
    os.makedirs(code)
    with open(os.path.join(code, "score.py"), "w") as f:
        f.write("def run(mini_batch):\n    return mini_batch\n")
    for i in range(files):
        folder = os.path.join(data, f"d{i // 1000:04d}")
        if i % 1000 == 0:
            os.makedirs(folder)
        with open(os.path.join(folder, f"f{i:07d}.txt"), "w") as f:
            f.write(f"{i}\n")
    data_spec = spec_dict(data, code)
    spec = spec_from_dict(data_spec)
    Ledger(job).write_manifest(plan_batches(spec, check_input(spec, {}), {}))
    return job, data_spec


def measure(script: str, *args: str, runs: int = 3) -> dict:
    results = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout))
    return {"seconds": min(r["seconds"] for r in results), "rss_mib": max(r["rss_mib"] for r in results),
            "n": results[0]["n"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="raypar-bench-inputs-")
    try:
        started = time.perf_counter()
        job, data_spec = build(root, args.files)
        print(f"built and planned {args.files:,} files in {time.perf_counter() - started:.0f}s")
        base = measure(BASELINE, job)
        check = measure(CHECK, job, json.dumps(data_spec))
        assert base["n"] == args.files and check["n"] == 0, (base, check)
        print(f"baseline (manifest, ledger, pending): {base['seconds']:.2f}s, peak {base['rss_mib']:.0f} MiB")
        print(f"input check (versions, listing, compare): {check['seconds']:.2f}s, peak {check['rss_mib']:.0f} MiB")
        print(f"check / baseline: {check['seconds'] / base['seconds']:.2f}x; "
              f"per file: {check['seconds'] / args.files * 1e6:.1f} us")
        print_load()
    finally:
        tear_down(root, args.keep)


if __name__ == "__main__":
    main()
