"""Worker-side plumbing that needs no Ray: staged remote output folders and run()'s signature."""

import fsspec

from raypar.worker.actor import _context_argument
from raypar.worker.staging import stage_outputs


def test_staged_output_replaces_exactly_that_url_and_uploads_only_changes():
    fs = fsspec.filesystem("memory")
    url = "memory://bucket/out"
    argv, (staged,) = stage_outputs(
        ["score.py", "--out", url, f"--file={url}/x.csv", "--other", "memory://bucket/out2", f"--o={url}2"],
        [url], {})
    assert argv == ["score.py", "--out", staged.local, f"--file={staged.local}/x.csv", "--other",
                    "memory://bucket/out2", f"--o={url}2"]  # out2 is not inside out
    with open(f"{staged.local}/a.txt", "w") as f:
        f.write("one")
    assert staged.upload_changes() == 1
    assert staged.upload_changes() == 0  # nothing changed: nothing sent again
    assert fs.cat_file("/bucket/out/a.txt") == b"one"


def test_run_gets_the_context_only_when_it_asks_for_it():
    assert _context_argument(lambda mini_batch, mini_batch_context: None) == "positional"
    assert _context_argument(lambda mini_batch, mini_batch_context=None: None) == "positional"
    assert _context_argument(lambda mini_batch, ctx: None) == "positional"
    assert _context_argument(lambda *args: None) == "positional"
    assert _context_argument(lambda mini_batch, *, mini_batch_context: None) == "keyword"
    assert _context_argument(lambda mini_batch: None) is None
    assert _context_argument(lambda mini_batch, verbose=False: None) is None
