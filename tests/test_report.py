"""The job's report page: one self-contained HTML file, opened in a real browser (headless
Chromium from npm, as the README's test command installs it): it draws, with no console error
and no network request, a timeline with a bar per attempt, and names the failures."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_spec

import raypar
from raypar.engine import report_html
from raypar.jobdir.state import JobState
from raypar.jobdir.tables import FailedRecords

REPO = Path(__file__).resolve().parent.parent
CHECK = Path(__file__).with_name("browser") / "check_page.mjs"
pytestmark = pytest.mark.timeout(240)


def open_in_browser(page: Path, tmp_path: Path) -> dict:
    if not (REPO / "node_modules" / "@sparticuz" / "chromium").exists() or not shutil.which("node"):
        pytest.fail("headless Chromium not installed: run the README's test command (.ci/run), whose npm "
                    "install brings @sparticuz/chromium and puppeteer-core into node_modules/", pytrace=False)
    out = subprocess.run(["node", str(CHECK), str(page), str(tmp_path / "shot.png")], capture_output=True,
                         text=True, timeout=180, cwd=REPO)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def cli(*args):
    return subprocess.run([sys.executable, "-m", "raypar", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.ray
def test_the_report_of_a_job_with_failures_draws_in_a_browser(ray_cluster, tmp_path):
    files = {f"f{i:02d}.txt": ("bad " if i == 5 else "") + f"value {i}" for i in range(12)}
    spec = make_spec(tmp_path, files, **{"retry_settings.max_retries": 1, "mini_batch_error_threshold": -1})
    job = str(tmp_path / "job")
    said = []
    outcome = raypar.run(spec, job_dir=job, echo=said.append).wait()
    assert outcome.state is JobState.SUCCEEDED and outcome.failed == 1
    assert f"raypar: 1 mini-batch(es) failed and were skipped (thresholds allow it); `raypar resume {job}` " \
           "retries them" in said

    status = json.loads(cli("status", job, "--json").stdout)
    assert status["report"] == f"{job}/reports/report.html"  # written by the session, named by status
    written = cli("report", job, "-o", str(tmp_path / "report.html"))
    assert written.returncode == 0, written.stderr

    page = open_in_browser(tmp_path / "report.html", tmp_path)

    assert page["errors"] == [] and page["requests"] == []  # self-contained: nothing fetched
    svgs = {s["id"]: s["rects"] for s in page["svgs"]}
    assert svgs["timeline"] == 5 + 2  # a bar per attempt: 5 done batches, 2 tries of the failed one
    assert svgs["throughput"] >= 1
    assert page["pixels"]["nonWhite"] > 0.02 and page["pixels"]["colours"] >= 5  # not blank: drawn
    assert (tmp_path / "shot.png").stat().st_size > 10_000
    html = (tmp_path / "report.html").read_text()
    assert "ValueError: cannot score f05.txt: bad record" in html and "mb-0000002" in html
    assert "mini_batch_size" in html  # the settings
    # The page the session wrote also says what its workers' time went to (`raypar report` cannot know).
    own = (tmp_path / "job" / "reports" / "report.html").read_text()
    assert "<h2>Worker time (this session)</h2>" in own and "<h2>Worker time" not in html
    assert re.search(r"<tr><td>run\(\)</td><td>\d+\.\d</td><td>\d+%</td></tr>", own)
    assert f"{outcome.worker_time['workers']} worker process(es)" in own


def test_a_large_job_is_drawn_in_time_slices_with_a_page_of_bounded_size(monkeypatch):
    class Record:
        def __init__(self, i):
            self.batch, self.node, self.worker = f"mb-{i:07d}", "n" * 56, f"instance0-slot{i % 8}"
            self.started, self.seconds = 1000.0 + i * 0.01, 0.08

    class View:
        failed = FailedRecords()

        def __init__(self, count):
            self.done = type("D", (), {"values": lambda _: (Record(i) for i in range(count))})()

        def counts(self):
            return {"completed": 0, "failed": 0, "pending": 0, "total": 0}

    small = report_html.render(View(1000), [], "name: x", "succeeded", "", "job")
    assert small.count("<rect class=bar") == 1000  # a bar each, with a tooltip
    binned = report_html.render(View(20_000), [], "name: x", "succeeded", "", "job")
    larger = report_html.render(View(200_000), [], "name: x", "succeeded", "", "job")
    for page in (binned, larger):  # binned: at most a slice per worker and time bin
        assert 0 < page.count("<rect class=bar") <= 8 * report_html.TIME_BINS
    assert len(larger) < 1.2 * len(binned)  # ten times the attempts, about the same page


def test_a_batch_with_two_stored_results_shows_the_one_not_chosen_as_a_spare(tmp_path):
    from raypar.inputs.base import MiniBatch
    from raypar.jobdir.ledger import Ledger
    from raypar.jobdir.records import DoneRecord

    ledger = Ledger(str(tmp_path / "job"))
    ledger.write_manifest([MiniBatch(ordinal=i, kind="files", payload={"files": [f"f{i}"]}, item_count=1)
                           for i in range(2)])
    out = ledger.done_writer("r1~w1")
    for batch, attempt, started in (("mb-0000000", 1, 100.0), ("mb-0000001", 1, 101.0), ("mb-0000000", 2, 102.0)):
        out.write(DoneRecord(batch=batch, run="r1", attempt=attempt, items=1, returned=1, part=None,
                             worker="instance0-slot0", node="n" * 56, started=started, seconds=0.5), b"row\n")
    view = ledger.view()
    assert [(r.batch, r.attempt) for r in view.done.without(np.array([1])).spare_records()] == [("mb-0000000", 2)]

    page = report_html.html_report(ledger, view, "succeeded", "")

    assert "mb-0000000 spare 0.50s" in page and page.count("<rect class=bar") == 3


def test_failures_by_error_keep_the_most_frequent_and_sum_the_rest_in_one_row(tmp_path):
    from raypar.inputs.base import MiniBatch
    from raypar.jobdir.ledger import Ledger
    from raypar.jobdir.records import FailedRecord

    batches = report_html.FAILURE_GROUPS + 30
    ledger = Ledger(str(tmp_path / "job"))
    ledger.write_manifest([MiniBatch(ordinal=i, kind="files", payload={"files": [f"f{i}"]}, item_count=1)
                           for i in range(batches)])
    for i in range(batches):  # an error line naming its file: a group each, but for the first three batches
        error = "OSError: disk full" if i < 3 else f"ValueError: cannot parse f{i}"
        ledger.record_failed(FailedRecord(batch=f"mb-{i:07d}", run="r1", attempt=1, error=f"Traceback\n{error}",
                                          kind="user", final=True, worker="instance0-slot0", node="n" * 56,
                                          started=100.0 + i))

    page = report_html.html_report(ledger, ledger.view(), "failed", "")

    table = page[page.index("<table id=failures>"):]
    table = table[:table.index("</table>")]
    rows = table.split("<tr>")[2:]  # the header row left out
    assert len(rows) == report_html.FAILURE_GROUPS + 1
    assert "OSError: disk full" in rows[0] and rows[0].startswith("<td>3</td>")  # the most frequent first
    assert f"<td>{batches - 3 - (report_html.FAILURE_GROUPS - 1)}</td>" in rows[-1]  # attempts of the rest
    assert f"{batches - 3 - (report_html.FAILURE_GROUPS - 1)} other errors" in rows[-1]
    assert table.count("ValueError: cannot parse") == report_html.FAILURE_GROUPS - 1  # not a row per line


def test_the_error_line_of_each_traceback_is_its_last_non_blank_line_as_python_splits_lines():
    """The reports group failures by each traceback's last line, worked out by Arrow in place (a
    Python string per distinct traceback was gigabytes where each names its item): the same line
    str.splitlines() and str.strip() give, whatever breaks and spaces a message holds."""
    import random

    import pyarrow as pa

    from raypar.engine.reports import last_line, last_lines

    pieces = ["a", "Error: x", " ", "\n", "\r", "\r\n", "\t", "\x0b", "\x0c", "\x1c", "\x85", "\xa0", "\u2028", "\u3000",
              "é"]
    rnd = random.Random(16)
    texts = ["Traceback (most recent call last):\n  File \"s.py\", line 3\nValueError: bad row\n\n", "", " \n "]
    texts += ["".join(rnd.choice(pieces) for _ in range(rnd.randint(0, 10))) for _ in range(5000)]
    errors = pa.array(texts + texts[:100], pa.large_string()).dictionary_encode()  # repeats share a line

    assert last_lines(errors).to_pylist() == [last_line(text) for text in texts + texts[:100]]
    assert last_lines(errors)[0].as_py() == "ValueError: bad row"
