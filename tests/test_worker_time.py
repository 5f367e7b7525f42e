"""Where a session's worker time goes (raypar/engine/worker_time.py), on a simulated cluster and a
simulated clock: every second of each worker's life lands in exactly one part."""

from __future__ import annotations

from test_engine_policy import ordinal, run

from raypar.engine.simulated import Outcome
from raypar.engine.worker_time import PARTS, TimeSplit, WorkerTime


def split_of(scheduler) -> dict:
    """The session's split, once it is over (every worker ended)."""
    assert not scheduler.worker_time.lives, "a worker outlived the session"
    return scheduler.worker_time.split(scheduler.clock()).fields()


def seconds(**parts) -> dict:
    """``fields()`` with the parts given and every other part at 0."""
    named = {"init": "init()", "run": "run()", "cut_short": "cut short"}
    out = dict.fromkeys(PARTS, 0.0)
    out.update({named.get(part, part): s for part, s in parts.items() if part != "workers"})
    return {"workers": parts["workers"], **out}


def test_two_workers_busy_to_the_end_spend_their_time_in_init_and_run(tmp_path):
    # init() 1 s each, then 3 batches of 1 s each: 8 worker-seconds, none idle.
    reason, scheduler, _, _ = run(tmp_path, lambda b, a, w: Outcome(1.0), batches=6, slots=2)
    assert reason is None
    assert split_of(scheduler) == seconds(workers=2, init=2.0, run=6.0)


def test_the_tail_shows_as_idle(tmp_path):
    # 3 batches of 2 s on 2 workers: one runs the third while the other waits for the session's end.
    reason, scheduler, _, _ = run(tmp_path, lambda b, a, w: Outcome(2.0), batches=3, slots=2)
    assert reason is None
    assert split_of(scheduler) == seconds(workers=2, init=2.0, run=6.0, idle=2.0)


def test_a_batch_past_the_timeout_is_cut_short_and_its_replacement_starts_again(tmp_path):
    # Batch 0 hangs on its first try: its worker is killed at the timeout (101 s) and replaced.
    def behaviour(batch, attempt, worker):
        return Outcome(1000.0) if (ordinal(batch), attempt) == (0, 1) else Outcome(1.0)

    reason, scheduler, _, _ = run(tmp_path, behaviour, batches=2, slots=2)
    assert reason is None
    split = split_of(scheduler)
    assert split["workers"] == 3  # the killed worker, its replacement, the other
    assert split["cut short"] == 100.0
    assert split["init()"] == 3.0
    assert split["run()"] == 2.0  # batch 1, and batch 0's second try
    # The retry goes to the other worker (idle since 2 s), 101 -> 102 s; the replacement is ready at 102 s
    # and finds nothing left. Lives: 0 -> 101 s, 101 -> 102 s, 0 -> 102 s.
    assert sum(v for k, v in split.items() if k != "workers") == 101 + 1 + 102
    assert split["idle"] == 99.0


def test_a_worker_lost_mid_batch_has_that_batch_cut_short(tmp_path):
    def behaviour(batch, attempt, worker):
        return Outcome(4.0, "lost") if (ordinal(batch), attempt) == (0, 1) else Outcome(1.0)

    reason, scheduler, _, _ = run(tmp_path, behaviour, batches=1, slots=1)
    assert reason is None
    assert split_of(scheduler) == seconds(workers=2, init=2.0, run=1.0, cut_short=4.0)


def test_a_failed_init_counts_as_init(tmp_path):
    failed = []

    def start_error(slot):
        if not failed:
            failed.append(slot)
            return "RuntimeError: no model"
        return None

    reason, scheduler, _, _ = run(tmp_path, lambda b, a, w: Outcome(1.0), batches=2, slots=1, start_error=start_error)
    assert reason is None
    assert split_of(scheduler) == seconds(workers=2, init=2.0, run=2.0)


def test_the_running_totals_of_answers_handled_out_of_order_never_go_back():
    time = WorkerTime()
    time.born("slot", 0.0)
    time.started("slot", 3.0, 2.0)
    time.spent("slot", [1.0, 5.0, 1.0])
    time.spent("slot", [0.5, 4.0, 0.5])  # an earlier answer, handled after
    time.ended("slot", 12.0)
    assert time.split(12.0).fields() == seconds(workers=1, starting=1.0, init=2.0, reading=1.0, run=5.0,
                                                 storing=1.0, idle=2.0)


def test_the_line_names_the_parts_by_share_largest_first():
    split = TimeSplit(2, {**dict.fromkeys(PARTS, 0.0), "run()": 60.0, "idle": 30.0, "init()": 9.9, "storing": 0.1})
    assert split.describe() == "100.0 s over 2 worker(s): run() 60%, idle 30%, init() 10%, storing <1%"
    assert TimeSplit(8, {**split.seconds, "run()": 3 * 3600.0}).describe().startswith("3.0 h over 8 worker(s): run() 100%")
    assert TimeSplit().describe() == "no worker started"


def test_a_running_session_counts_the_batches_running_now_as_running(tmp_path):
    # What `raypar status` shows: the heartbeat asks the progress for the split so far.
    seen = []
    reason, scheduler, cluster, _ = run(tmp_path, lambda b, a, w: Outcome(10.0), batches=2, slots=1,
                                        on_progress=lambda progress: seen.append(progress.worker_time()))
    assert reason is None
    mid = [split for split in seen if split["running"] > 0]
    assert mid, seen  # some look fell inside a batch
    for split in mid:  # one worker, ready at 1 s: its life so far is init(), run() answered, and running
        assert split["workers"] == 1 and split["init()"] == 1.0
        assert split["running"] <= 10.0 and split["idle"] == 0.0
    assert split_of(scheduler)["running"] == 0.0  # at the end every batch has answered


def test_a_job_s_worker_time_adds_up_its_sessions_each_recorded_once(tmp_path):
    from raypar.engine.worker_time import from_lost_heartbeat, job_total, sessions_text
    from raypar.jobdir.ledger import Ledger

    ledger = Ledger(str(tmp_path / "job"))
    first = seconds(workers=2, init=2.0, run=6.0, running=3.0)
    ledger.record_worker_time("r1", "lost", from_lost_heartbeat(first))  # from a killed driver's last heartbeat
    ledger.record_worker_time("r1", "failed", seconds(workers=9, run=99.0))  # not twice: the first record stays
    ledger.record_worker_time("r2", "succeeded", seconds(workers=1, init=1.0, run=4.0, idle=1.0))

    assert [r["run"] for r in ledger.worker_times()] == ["r1", "r2"]
    total = job_total(ledger.worker_times())
    # The killed session's running batches count as cut short: they run again.
    assert total == {"sessions": 2, "lost": 1, **seconds(workers=3, init=3.0, run=10.0, cut_short=3.0, idle=1.0)}
    assert sessions_text(total) == "its 2 session(s) (1 lost with its driver)"
    assert job_total([]) is None


def test_a_lease_taken_over_from_a_dead_driver_keeps_its_last_heartbeat(tmp_path):
    import json
    import subprocess
    import sys

    from raypar.jobdir.ledger import Ledger

    ledger = Ledger(str(tmp_path / "job"))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    ledger.lease.acquire("r1")
    ledger.lease.heartbeat("r1", progress={"worker_time": seconds(workers=1, run=5.0)})
    name = f"{ledger.lease.generation:012d}.json"
    body = json.loads(ledger.store.read_bytes("lease", name))
    ledger.store.write_atomic(json.dumps({**body, "pid": int(dead.stdout)}).encode(), "lease", name)  # gone now

    taker = Ledger(str(tmp_path / "job"))
    taker.lease.acquire("r2")
    assert taker.lease.taken_over["run"] == "r1"
    assert taker.lease.taken_over["progress"]["worker_time"]["run()"] == 5.0
