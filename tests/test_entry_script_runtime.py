"""How an entry script is run and judged. It runs in a copy of its folder, as Azure runs it in a
snapshot: what it writes beside itself (mlruns/, downloads) never lands in the user's source folder,
while its sibling files still open with relative paths. Its errors start at the user's own frame.
Items it returns nothing for are counted as Azure counts them, and named as such."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_spec, quiet

import raypar
from raypar.engine.status import job_status
from raypar.spec.loading import spec_from_dict

pytestmark = [pytest.mark.ray, pytest.mark.timeout(180)]

TRACKING_SCRIPT = '''
import os

def init():
    global labels
    with open("labels.txt") as f:                      # a sibling, opened relative to the folder
        labels = f.read().split()
    os.makedirs("mlruns/0", exist_ok=True)             # what mlflow's autolog does
    with open("mlruns/0/meta.yaml", "w") as f:
        f.write("run: 1\\n")
    with open(os.path.join(os.path.dirname(__file__), "downloaded.bin"), "wb") as f:
        f.write(b"weights")

def run(mini_batch):
    return [f"{os.path.basename(p)} {labels[int(open(p).read()) % len(labels)]}" for p in mini_batch]
'''


def tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_what_the_script_writes_beside_itself_stays_out_of_the_source_folder(ray_cluster, tmp_path):
    data = make_spec(tmp_path, {f"f{i}.txt": str(i) for i in range(6)}, **{"task.entry_script": "track.py"})
    code = Path(data["task"]["code"])
    (code / "track.py").write_text(TRACKING_SCRIPT)
    (code / "labels.txt").write_text("cat dog bird")
    before = tree(code)

    outcome = raypar.run(spec_from_dict(data), job_dir=str(tmp_path / "job"), echo=quiet).wait()

    assert outcome.exit_code == 0, outcome.reason
    rows = sorted((tmp_path / "out" / "parallel_run_step.txt").read_text().splitlines())
    assert rows == sorted(f"f{i}.txt {['cat', 'dog', 'bird'][i % 3]}" for i in range(6))
    assert tree(code) == before  # no mlruns/, no downloaded.bin, no __pycache__


def test_an_import_error_names_the_users_line_first(ray_cluster, tmp_path):
    data = make_spec(tmp_path, {"f0.txt": "0"}, **{"task.entry_script": "broken.py"})
    (Path(data["task"]["code"]) / "broken.py").write_text("import os\nimport not_installed_anywhere\n\n"
                                                          "def run(mini_batch):\n    return mini_batch\n")

    outcome = raypar.run(spec_from_dict(data), job_dir=str(tmp_path / "job"), echo=quiet).wait()

    assert outcome.exit_code == 1
    reason = job_status(str(tmp_path / "job"))["reason"]
    trace = reason[reason.index("Traceback (most recent call last):"):].splitlines()
    assert trace[1].strip() == f'File "{Path(data["task"]["code"]) / "broken.py"}", line 2, in <module>', reason
    assert [line.strip() for line in trace[2:]] == [
        "import not_installed_anywhere", "ModuleNotFoundError: No module named 'not_installed_anywhere'"]


def test_a_script_that_returns_nothing_on_purpose_is_told_apart_from_failures(ray_cluster, tmp_path):
    """Many-models training returns [] for every partition: Azure counts each item as failed
    (error_threshold -1 ignores them); status says which failed items these are."""
    data = make_spec(tmp_path, {f"f{i}.txt": str(i) for i in range(5)}, error_threshold=-1,
                     **{"task.entry_script": "train.py"})
    del data["task"]["append_row_to"]  # summary only
    (Path(data["task"]["code"]) / "train.py").write_text(
        "def run(mini_batch):\n    if any(p.endswith('f4.txt') for p in mini_batch):\n"
        "        raise ValueError('bad file')\n    return []\n")
    data["retry_settings"]["max_retries"] = 0
    outcome = raypar.run(spec_from_dict(data), job_dir=str(tmp_path / "job"), echo=quiet).wait()
    assert outcome.exit_code == 0, outcome.reason

    status = job_status(str(tmp_path / "job"))
    assert (status["failed_items"], status["unreturned_items"]) == (5, 4)
    shown = subprocess.run([sys.executable, "-m", "raypar.cli", "status", str(tmp_path / "job")],
                           capture_output=True, text=True, timeout=60).stdout
    assert ("items:     5 failed: 1 in failed mini-batches, 4 not returned by run() of done ones "
            "(error_threshold counts both, as on Azure)") in shown.splitlines(), shown
    result = (tmp_path / "job" / "reports" / "job_result.txt").read_text().splitlines()
    assert "failed items: 5 failed: 1 in failed mini-batches, 4 not returned by run() of done ones" in result
