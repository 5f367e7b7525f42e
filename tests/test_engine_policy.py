"""The scheduling policy on a simulated cluster and a simulated clock (no Ray): each transition
of a batch and of a worker, with the records it leaves in a real ledger."""

from __future__ import annotations

import collections
import json
import threading

import pytest

from raypar.engine.scheduler import Progress, Scheduler
from raypar.engine.simulated import Outcome, SimulatedCluster
from raypar.inputs.base import MiniBatch
from raypar.jobdir.ledger import Ledger
from raypar.spec.loading import spec_from_dict


def ordinal(batch_json: str) -> int:
    return json.loads(batch_json)["ordinal"]


def run(tmp_path, behaviour, batches=6, slots=2, nodes=None, store=False, progress=None, pending=None, by_slot=False,
        withdraw_seconds=0.0, on_progress=lambda p: None, start_error=None, placed=None, **spec_keys):
    """Run ``batches`` on ``slots`` simulated workers; returns (stop reason, scheduler, cluster, ledger).
    ``nodes``: (first instances, timeline of joins and leaves) for an elastic cluster; ``behaviour``
    then gets (batch, attempt, instance, now). ``store``: the workers store done records in the ledger.
    ``pending``: the batches, when not ``batches`` one-file ones. ``by_slot``: ``behaviour`` gets
    the worker's slot index instead of its worker id. ``withdraw_seconds``: how long a request to take
    calls back takes to reach a worker, and its answer to come back. ``start_error(slot)``: init()'s
    traceback on that slot's worker, or None when it starts. ``placed``: the instances whose node is
    up, for a fixed (not elastic) job whose nodes may go (a start on one that went never ends)."""
    ledger = Ledger(str(tmp_path / "job"))
    pending = pending or [MiniBatch(ordinal=i, kind="files", payload={"files": [f"f{i}"]}, item_count=1)
                          for i in range(batches)]
    batches = len(pending)
    ledger.write_manifest(pending)
    spec = {"type": "parallel", "name": "policy", "inputs": {"data": {"type": "uri_folder", "path": str(tmp_path)}},
            "input_data": "${{inputs.data}}", "resources": {"instance_count": 1},
            "max_concurrency_per_instance": slots, "retry_settings": {"max_retries": 1, "timeout": 100},
            "task": {"code": str(tmp_path), "entry_script": "score.py"}}
    for key, value in spec_keys.items():
        target = spec
        *path, last = key.split(".")
        for part in path:
            target = target.setdefault(part, {})
        target[last] = value
    cluster = SimulatedCluster(behaviour, start_seconds=1.0, record=True, ledger=ledger if store else None,
                               withdraw_seconds=withdraw_seconds)
    if nodes is not None:
        cluster.with_nodes(*nodes)
        cluster.behaviour = lambda b, a, w: behaviour(b, a, cluster.workers[w].slot.instance, cluster.now)
    elif by_slot:
        cluster.behaviour = lambda b, a, w: behaviour(b, a, cluster.workers[w].slot.index)
    if start_error is not None:
        cluster.start_error = start_error
    if placed is not None:
        cluster.instances = placed
    scheduler = Scheduler(ledger, spec_from_dict(spec), "r1", pending, cluster, progress or Progress(total=batches),
                          on_progress)
    return scheduler.run(), scheduler, cluster, ledger


def history(ledger: Ledger, batch: int) -> list:
    return [(r.kind, r.final) for r in ledger.view().failed.get(f"mb-{batch:07d}", [])]


def test_every_batch_runs_once_on_healthy_workers(tmp_path):
    seen = []

    def behaviour(batch, attempt, worker):
        seen.append((ordinal(batch), attempt))
        return Outcome(10.0)

    reason, scheduler, cluster, ledger = run(tmp_path, behaviour)

    assert reason is None and (scheduler.progress.done, scheduler.progress.failed) == (6, 0)
    assert sorted(seen) == [(i, 1) for i in range(6)]
    assert cluster.now == pytest.approx(1.0 + 30.0)  # 2 workers, 3 batches of 10 s each, after a 1 s start
    assert ledger.view().failed == {}


@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_a_worker_is_told_to_read_each_queued_batch_before_its_turn(tmp_path, prefetch):
    reason, scheduler, cluster, ledger = run(tmp_path, lambda b, a, w: Outcome(1.0), batches=30,
                                             **{"raypar.prefetch": prefetch})

    assert reason is None and scheduler.progress.done == 30
    hinted = [ordinal(b) for b, _ in cluster.asides]
    assert all(waiting for _, waiting in cluster.asides)  # each hint came while its batch waited its turn
    assert len(hinted) == len(set(hinted))  # once each
    if prefetch == 0:
        assert hinted == []
    else:  # every batch that waited behind another call was read ahead
        assert sorted(hinted) == sorted(ordinal(b) for b in cluster.queued) and len(hinted) >= 20


# -- batches of milliseconds go several to a call (groups) -----------------------------------


def test_batches_of_milliseconds_go_several_to_a_call_each_answered_as_its_own(tmp_path):
    seen = []

    def behaviour(batch, attempt, worker):
        seen.append((ordinal(batch), attempt))
        return Outcome(0.002)

    reason, scheduler, cluster, ledger = run(tmp_path, behaviour, batches=400)

    assert reason is None and (scheduler.progress.done, scheduler.progress.failed) == (400, 0)
    assert sorted(seen) == [(i, 1) for i in range(400)]  # each batch once
    calls = cluster.stats["groups"] + cluster.stats["run_batch"] - cluster.stats["grouped"]  # Ray calls made
    assert cluster.stats["grouped"] > 300 and calls < 100  # most batches went several to a call
    assert ledger.view().failed == {}


def test_a_user_error_inside_a_group_is_charged_to_its_batch_alone(tmp_path):
    reason, scheduler, cluster, ledger = run(
        tmp_path, lambda b, a, w: Outcome(0.002, "user", "ValueError: bad") if (ordinal(b), a) == (300, 1)
        else Outcome(0.002), batches=400)

    assert reason is None and (scheduler.progress.done, scheduler.progress.failed) == (400, 0)
    assert cluster.stats["groups"] >= 10
    assert {b: history(ledger, int(b[3:])) for b in ledger.view().failed} == {"mb-0000300": [("user", False)]}


def test_a_worker_that_dies_in_a_group_charges_no_batch_until_the_culprit_runs_alone(tmp_path):
    # Batch 300 kills its worker every time: the group it is in is lost with no batch charged,
    # its batches run again one to a call, and only 300 is charged, as a system failure.
    reason, scheduler, cluster, ledger = run(
        tmp_path, lambda b, a, w: Outcome(0.002, "lost") if ordinal(b) == 300 else Outcome(0.002), batches=400,
        **{"retry_settings.max_retries": 0})

    assert reason is None and (scheduler.progress.done, scheduler.progress.failed) == (399, 1)
    assert cluster.stats["groups"] >= 10
    failed = ledger.view().failed
    assert set(failed) == {"mb-0000300"}
    assert history(ledger, 300)[-1] == ("system", True) and all(k == "system" for k, _ in history(ledger, 300))


def test_batches_a_lost_worker_stored_in_calls_it_never_answered_are_done_not_run_again(tmp_path):
    # The worker dies in batch 300; Ray also fails the call it answered just before (its answer
    # was lost with it). What the worker stored in either call is done: the ledger says so.
    ran = []

    def behaviour(batch, attempt, worker):
        ran.append(ordinal(batch))
        if (ordinal(batch), attempt) == (300, 1):
            return Outcome(0.002, "lost", loses_answer_before=True)
        return Outcome(0.002)

    reason, scheduler, cluster, ledger = run(tmp_path, behaviour, batches=400, slots=1, store=True,
                                             **{"retry_settings.max_retries": 0})

    assert reason is None and (scheduler.progress.done, scheduler.progress.failed) == (400, 0)
    assert sorted(set(ran)) == list(range(400)) and len(ran) == 401  # only 300 twice
    assert cluster.stats["groups"] >= 10


def test_a_group_past_the_timeout_charges_no_try_and_the_hanging_batch_times_out_alone(tmp_path):
    reason, scheduler, cluster, ledger = run(
        tmp_path, lambda b, a, w: Outcome(1000.0) if ordinal(b) == 300 else Outcome(0.002), batches=400)

    assert reason is None and (scheduler.progress.done, scheduler.progress.failed) == (399, 1)
    assert set(ledger.view().failed) == {"mb-0000300"}
    assert history(ledger, 300) == [("timeout", False), ("timeout", True)]  # its own two tries, alone


def test_a_user_error_is_retried_then_the_batch_fails(tmp_path):
    reason, scheduler, cluster, ledger = run(
        tmp_path, lambda b, a, w: Outcome(1.0, "user", "ValueError: bad row") if ordinal(b) == 2 else Outcome(1.0))

    assert reason is None and (scheduler.progress.done, scheduler.progress.failed) == (5, 1)
    assert history(ledger, 2) == [("user", False), ("user", True)]  # max_retries 1: two tries


def test_a_lost_worker_costs_no_try_and_is_replaced(tmp_path):
    lost, gone = [], []  # the worker that died; the writers gone at each step the driver shows

    def behaviour(batch, attempt, worker):
        if (ordinal(batch), attempt) == (3, 1):
            lost.append(f"w{worker}")
            return Outcome(5.0, "lost")
        return Outcome(1.0)

    reason, scheduler, cluster, ledger = run(tmp_path, behaviour, on_progress=lambda p: gone.append(set(p.gone)),
                                             **{"retry_settings.max_retries": 0})

    assert reason is None and (scheduler.progress.done, scheduler.progress.failed) == (6, 0)
    assert history(ledger, 3) == [("system", False)]
    assert cluster.stats["run_batch"] == 7 and cluster.stats["workers"] == 3  # one worker replaced
    # While the others ran on, the lost one's writer was gone (a compaction may close its folders).
    assert gone[0] == set() and set(lost) in gone and len(scheduler.progress.gone) == 3


def test_an_answer_given_just_before_the_worker_died_counts(tmp_path):
    # The worker answers batch 0, then dies in batch 2 queued behind it: 0 is done, 2 runs again.
    ran = []

    def behaviour(batch, attempt, worker):
        ran.append(ordinal(batch))
        return Outcome(2.0, "lost") if (ordinal(batch), attempt) == (2, 1) else Outcome(2.0)

    reason, scheduler, cluster, ledger = run(tmp_path, behaviour, slots=1, **{"retry_settings.max_retries": 0})

    assert reason is None and scheduler.progress.done == 6
    assert ran.count(0) == 1 and ran.count(2) == 2
    assert history(ledger, 0) == [] and history(ledger, 2) == [("system", False)]


def test_a_timeout_kills_the_worker_and_spends_a_try(tmp_path):
    reason, scheduler, cluster, ledger = run(
        tmp_path, lambda b, a, w: Outcome(500.0) if (ordinal(b), a) == (1, 1) else Outcome(1.0))

    assert reason is None and (scheduler.progress.done, scheduler.progress.failed) == (6, 0)
    assert history(ledger, 1) == [("timeout", False)]
    assert cluster.stats["killed"] >= 1


def test_raypar_raising_in_a_worker_is_its_own_kind(tmp_path):
    reason, scheduler, cluster, ledger = run(
        tmp_path, lambda b, a, w: Outcome(1.0, "raised", "OSError: disk full") if (ordinal(b), a) == (4, 1)
        else Outcome(1.0), **{"retry_settings.max_retries": 0})

    assert reason is None and scheduler.progress.done == 6
    assert history(ledger, 4) == [("raypar", False)]


def test_a_job_dir_failing_on_every_worker_stops_the_job(tmp_path):
    reason, scheduler, cluster, ledger = run(tmp_path, lambda b, a, w: Outcome(1.0, "raised", "OSError: gone"))

    assert reason.startswith("raypar error in the worker: OSError: gone")
    assert scheduler.progress.failed == 0  # no batch spent a try on it


def test_crossing_the_failed_batch_threshold_stops_the_job(tmp_path):
    reason, scheduler, cluster, ledger = run(
        tmp_path, lambda b, a, w: Outcome(1.0, "user") if ordinal(b) in (0, 1) else Outcome(1.0),
        batches=10, slots=1, **{"retry_settings.max_retries": 0, "mini_batch_error_threshold": 1})

    assert reason == "2 mini-batch(es) failed, more than mini_batch_error_threshold=1"
    assert scheduler.progress.done < 8  # stopped before the rest ran


def test_a_script_that_fails_every_batch_stops_the_job_after_a_few_instead_of_spending_every_try(tmp_path):
    sent = []

    def behaviour(batch, attempt, worker):
        sent.append((ordinal(batch), attempt))
        return Outcome(1.0, "user", "ModuleNotFoundError: No module named 'torch'")

    reason, scheduler, cluster, ledger = run(tmp_path, behaviour, batches=1000, slots=2)

    assert reason.startswith("11 mini-batch(es) failed and none has succeeded")  # Azure's thresholds are -1 here
    assert "raypar.failures_before_first_success=10; -1 turns this off" in reason
    # The other worker's batch, running when the job stopped, may end as a 12th; queued ones are tried once.
    assert scheduler.progress.failed in (11, 12) and len({b for b, _ in sent}) < 20  # of 1,000
    final = [b for b, records in ledger.view().failed.items() if records[-1].final]
    assert len(final) == scheduler.progress.failed and all(len(ledger.view().failed[b]) == 2 for b in final)


def test_without_the_limit_a_script_that_fails_every_batch_spends_every_try_as_on_azure(tmp_path):
    reason, scheduler, cluster, ledger = run(tmp_path, lambda b, a, w: Outcome(1.0, "user"), batches=30,
                                             **{"raypar.failures_before_first_success": -1})

    assert reason is None and scheduler.progress.failed == 30  # every batch tried twice and skipped
    assert len(ledger.view().failed) == 30


def test_once_a_batch_succeeded_failures_count_only_against_the_thresholds(tmp_path):
    reason, scheduler, cluster, ledger = run(
        tmp_path, lambda b, a, w: Outcome(1.0) if ordinal(b) == 0 else Outcome(1.0, "user"), batches=30, slots=1)

    assert reason is None and (scheduler.progress.done, scheduler.progress.failed) == (1, 29)


def test_a_resume_whose_remaining_batches_all_fail_runs_them_all(tmp_path):
    # Done batches of an earlier session count as successes: a job with a few bad inputs retried on
    # resume ends as it did, every bad batch tried and skipped.
    reason, scheduler, cluster, ledger = run(tmp_path, lambda b, a, w: Outcome(1.0, "user"), batches=20,
                                             progress=Progress(total=120, done=100, done_before=100))

    assert reason is None and scheduler.progress.failed == 20


def test_a_batch_stored_for_good_leaves_nothing_behind_in_the_scheduler_and_retries_count_on(tmp_path):
    # A million-batch job must not end holding an entry per batch: once a worker reports a batch
    # stored, its attempt count goes; a batch that failed first is sent again as attempt 2.
    sent = []

    def behaviour(batch, attempt, worker):
        sent.append((ordinal(batch), attempt))
        return Outcome(1.0, "user") if (ordinal(batch), attempt) == (2, 1) else Outcome(1.0)

    reason, scheduler, cluster, ledger = run(tmp_path, behaviour, store=True)

    assert reason is None and (scheduler.progress.done, scheduler.progress.failed) == (6, 0)
    assert sorted(sent) == [(0, 1), (1, 1), (2, 1), (2, 2), (3, 1), (4, 1), (5, 1)]
    assert dict(scheduler.attempts) == {}


def test_a_straggler_gets_a_second_attempt_and_the_first_to_finish_wins(tmp_path):
    sent = []

    def behaviour(batch, attempt, worker):
        sent.append((ordinal(batch), attempt))
        return Outcome(60.0) if (ordinal(batch), attempt) == (5, 1) else Outcome(1.0)

    reason, scheduler, cluster, ledger = run(
        tmp_path, behaviour, **{"raypar.speculation": {"enabled": True, "multiple": 4, "min_seconds": 0}})

    assert reason is None and (scheduler.progress.done, scheduler.progress.failed) == (6, 0)
    assert sorted(sent) == [(0, 1), (1, 1), (2, 1), (3, 1), (4, 1), (5, 1), (5, 2)]
    assert cluster.now < 20.0  # not the 60 s of the first attempt
    assert cluster.stats["done"] == 6  # counted once


def test_without_speculation_the_job_waits_for_its_straggler(tmp_path):
    reason, scheduler, cluster, ledger = run(
        tmp_path, lambda b, a, w: Outcome(60.0) if ordinal(b) == 5 else Outcome(1.0))

    assert reason is None and cluster.stats["run_batch"] == 6 and cluster.now > 60.0


def straggler_at_the_front(tmp_path, seconds, **keys):
    """Two workers, ten batches of 1 s but batch 0, which takes ``seconds``: batch 2 is queued behind
    it at the start, and the other worker runs out of work at 9 s. Returns (scheduler, cluster,
    ledger, runs): runs maps each batch to its (attempt, slot) of every run."""
    runs = {}

    def behaviour(batch, attempt, slot):
        runs.setdefault(ordinal(batch), []).append((attempt, slot))
        return Outcome(seconds) if ordinal(batch) == 0 else Outcome(1.0)

    reason, scheduler, cluster, ledger = run(tmp_path, behaviour, batches=10, by_slot=True, **keys)
    assert reason is None and (scheduler.progress.done, scheduler.progress.failed) == (10, 0)
    assert ledger.view().failed == {}  # taking a call back spends no try
    return scheduler, cluster, ledger, runs


def test_a_batch_queued_behind_a_straggler_is_taken_back_by_an_idle_worker_and_runs_once(tmp_path):
    scheduler, cluster, ledger, runs = straggler_at_the_front(tmp_path, 100.0)

    assert [ordinal(b) for b in cluster.withdrawn] == [2]
    assert runs[2] == [(2, 1)]  # run once, on the idle worker, under the next attempt number
    assert {b: r for b, r in runs.items() if b != 2} == {b: [(1, 0 if b == 0 else 1)] for b in range(10) if b != 2}
    two = next(b for b in cluster.run_starts if ordinal(b) == 2)
    assert cluster.run_starts[two] == pytest.approx(9.0)  # when the idle worker ran out, not after batch 0
    assert cluster.now == pytest.approx(101.0)  # the straggler's end: nothing waited for it


@pytest.mark.parametrize("trip, attempt, slot, taken", [
    (1.0, 2, 1, True),  # withdrawn at 10 s, answered at 11 s: run on the idle worker then
    (3.0, 2, 0, True),  # withdrawn at 12 s; its turn at 13 s answers "withdrawn" before the answer (15 s)
    (5.0, 1, 0, False),  # the request reaches the worker at 14 s: batch 2 began at 13 s, and runs there
])
def test_a_call_is_taken_back_only_if_its_worker_withdrew_it_before_it_began(tmp_path, trip, attempt, slot, taken):
    # Batch 0 runs from 1 s to 13 s; the other worker asks for batch 2 back at 9 s.
    scheduler, cluster, ledger, runs = straggler_at_the_front(tmp_path, 12.0, withdraw_seconds=trip)

    assert runs[2] == [(attempt, slot)]  # once, whatever the race
    assert [ordinal(b) for b in cluster.withdrawn] == ([2] if taken else [])
    assert sorted(runs) == list(range(10)) and all(len(r) == 1 for r in runs.values())


def test_groups_queued_behind_a_straggler_are_taken_back_and_each_batch_runs_once(tmp_path):
    # Batches of 10 ms go several to a call, up to 4 calls a worker; batch 150 takes 30 s.
    runs = []

    def behaviour(batch, attempt, slot):
        runs.append((ordinal(batch), slot))
        return Outcome(30.0) if ordinal(batch) == 150 else Outcome(0.01)

    reason, scheduler, cluster, ledger = run(tmp_path, behaviour, batches=400, by_slot=True)

    assert reason is None and (scheduler.progress.done, scheduler.progress.failed) == (400, 0)
    assert sorted(b for b, _ in runs) == list(range(400))  # each once
    taken = [ordinal(b) for b in cluster.withdrawn]
    assert len(taken) > 1 and cluster.stats["groups"] >= 10
    straggler = next(slot for b, slot in runs if b == 150)
    assert all(slot != straggler for b, slot in runs if b in taken)
    assert ledger.view().failed == {}


def test_batches_taken_back_in_any_race_each_run_once(tmp_path):
    # 12 jobs of random durations (a few stragglers), 4 workers, requests to take calls back that take
    # up to 2 s each way: whatever the interleaving, every batch runs exactly once and no try is spent.
    import random

    taken = 0
    for seed in range(12):
        rng = random.Random(seed)
        durations = [rng.choice([50.0, 20.0]) if rng.random() < 0.1 else rng.lognormvariate(0, 1) for _ in range(60)]
        runs = collections.Counter()

        def behaviour(batch, attempt, slot, durations=durations, runs=runs):
            runs[ordinal(batch)] += 1
            return Outcome(durations[ordinal(batch)])

        (tmp_path / str(seed)).mkdir()
        reason, scheduler, cluster, ledger = run(tmp_path / str(seed), behaviour, batches=60, slots=4, by_slot=True,
                                                 withdraw_seconds=rng.uniform(0, 2))

        assert reason is None and (scheduler.progress.done, scheduler.progress.failed) == (60, 0), seed
        assert runs == {b: 1 for b in range(60)}, seed
        assert ledger.view().failed == {}, seed
        taken += len(cluster.withdrawn)
    assert taken >= 5  # the races were run: calls were taken back in most jobs


def test_an_idle_worker_takes_back_calls_queued_behind_a_long_batch(tmp_path):
    # Fast batches let a worker queue up to 4 calls; the long one holds the rest behind it.
    def behaviour(batch, attempt, worker):
        return Outcome(50.0) if ordinal(batch) == 8 else Outcome(0.1)

    reason, scheduler, cluster, ledger = run(tmp_path, behaviour, batches=12)

    assert reason is None and scheduler.progress.done == 12
    assert cluster.now < 55.0  # the batches queued behind batch 8 ran elsewhere meanwhile


def test_a_stopped_job_does_not_wait_for_a_running_batch_when_nothing_is_unstored(tmp_path):
    # Every simulated worker stores each batch as it ends (as on local disk): when a threshold stops
    # the job, nothing is left to store, so the 1000 s batch still running is not waited for.
    reason, scheduler, cluster, ledger = run(
        tmp_path, lambda b, a, w: Outcome(1000.0) if ordinal(b) == 0 else Outcome(1.0, "user"),
        batches=4, slots=2, **{"retry_settings.max_retries": 0, "mini_batch_error_threshold": 1})

    assert reason == "2 mini-batch(es) failed, more than mini_batch_error_threshold=1"
    assert cluster.now < 1.0 + 10.0  # stopped at the second failure, not after the long batch (or 30 s)
    assert "mb-0000000" not in ledger.view().done


# -- slices of a cut parquet row group: kept for the worker that decodes it ------------------


def slices(row_groups: int, per_group: int) -> list[MiniBatch]:
    """``per_group`` slices of each of ``row_groups`` row groups, as the planner writes them."""
    return [MiniBatch(ordinal=g * per_group + k, kind="table", item_count=100,
                      payload={"pieces": [{"file": f"t{g}.parquet", "row_group": 0, "rows": [100 * k, 100 * k + 100]}]})
            for g in range(row_groups) for k in range(per_group)]


def workers_by_row_group(ran: list, per_group: int) -> dict[int, set]:
    out: dict[int, set] = {}
    for batch, worker in ran:
        out.setdefault(batch // per_group, set()).add(worker)
    return out


def test_the_slices_of_a_row_group_run_on_the_worker_that_took_its_first(tmp_path):
    ran = []

    def behaviour(batch, attempt, worker):
        ran.append((ordinal(batch), worker))
        return Outcome(1.0)

    reason, scheduler, cluster, ledger = run(tmp_path, behaviour, pending=slices(4, 10))

    assert reason is None and (scheduler.progress.done, scheduler.progress.failed) == (40, 0)
    assert sorted(b for b, _ in ran) == list(range(40))  # each slice once
    assert all(len(w) == 1 for w in workers_by_row_group(ran, 10).values())  # each row group decoded once
    assert cluster.now == pytest.approx(1.0 + 20.0)  # and both workers busy to the end
    assert scheduler.reserved == 0


def test_an_idle_worker_takes_half_of_what_is_kept_for_a_slower_one(tmp_path):
    # One row group of 40 slices; the first worker takes 3 s a slice, the other 1 s. Kept for the
    # slow one alone, its share would end at 61 s; the fast one takes half of it whenever it idles.
    ran, first = [], []

    def behaviour(batch, attempt, worker):
        first.append(worker) if not first else None
        ran.append((ordinal(batch), worker))
        return Outcome(3.0 if worker == first[0] else 1.0)

    reason, scheduler, cluster, ledger = run(tmp_path, behaviour, pending=slices(1, 40))

    assert reason is None and scheduler.progress.done == 40
    assert sorted(b for b, _ in ran) == list(range(40))
    assert cluster.now == pytest.approx(1.0 + 30.0)  # 40 slices at 4/3 a second, as one-file batches
    assert scheduler.reserved == 0


def test_a_lost_worker_hands_back_the_slices_kept_for_it(tmp_path, caplog):
    ran = []

    def behaviour(batch, attempt, worker):
        ran.append((ordinal(batch), attempt))
        return Outcome(1.0, "lost") if (ordinal(batch), attempt) == (3, 1) else Outcome(1.0)

    with caplog.at_level("WARNING", logger="raypar"):
        reason, scheduler, cluster, ledger = run(tmp_path, behaviour, pending=slices(2, 10), store=True,
                                                 **{"retry_settings.max_retries": 0})

    assert reason is None and (scheduler.progress.done, scheduler.progress.failed) == (20, 0)
    assert sorted(b for b, _ in ran) == sorted([*range(20), 3])  # only the lost one twice
    assert history(ledger, 3) == [("system", False)]
    assert scheduler.reserved == 0
    # Its queued call (slice 4) and the slices kept for it (5 to 9) went back to the queue at once.
    assert [r.getMessage().rsplit("; ", 1)[-1] for r in caplog.records if "handed back" in r.getMessage()] == \
        ["6 queued batch(es) handed back"]


def test_a_slot_given_up_hands_the_slices_kept_for_it_to_the_others(tmp_path):
    # Slot 0's worker dies in every batch it gets (a broken node) until the slot is given up; what
    # was kept for it runs on slot 1, and the job ends (a reservation left behind would hang it).
    ran = []

    def behaviour(batch, attempt, slot):
        ran.append((ordinal(batch), slot))
        return Outcome(1.0, "lost") if slot == 0 else Outcome(1.0)

    reason, scheduler, cluster, ledger = run(tmp_path, behaviour, pending=slices(2, 30), by_slot=True)

    assert reason is None and (scheduler.progress.done, scheduler.progress.failed) == (60, 0)
    assert sorted(b for b, s in ran if s == 1) == list(range(60))  # each done once, all on slot 1
    assert scheduler.slots[0].retired and scheduler.reserved == 0


def test_whole_row_groups_and_files_are_dealt_out_as_before(tmp_path):
    ran = []

    def behaviour(batch, attempt, worker):
        ran.append((ordinal(batch), worker))
        return Outcome(1.0)

    whole = [MiniBatch(ordinal=i, kind="table", item_count=100,
                       payload={"pieces": [{"file": "t.parquet", "rows": [100 * i, 100 * i + 100]}]}) for i in range(10)]
    reason, scheduler, cluster, ledger = run(tmp_path, behaviour, pending=whole)

    assert reason is None and scheduler.progress.done == 10
    assert [w for _, w in sorted(ran)[:2]] != [ran[0][1]] * 2  # the first two went to both workers
    assert scheduler.reserved == 0 and cluster.now == pytest.approx(1.0 + 5.0)


# -- elastic instances: nodes join and leave mid-job -----------------------------------------


def run_elastic(tmp_path, batches, first, timeline, **spec_keys):
    """An elastic job, one worker per instance, batches of 2 s; returns (reason, scheduler, ledger,
    calls), calls being (ordinal, attempt, instance, when) of each batch sent to a worker."""
    calls = []

    def behaviour(batch, attempt, instance, now):
        calls.append((ordinal(batch), attempt, instance, now))
        return Outcome(2.0)

    reason, scheduler, _, ledger = run(tmp_path, behaviour, batches=batches, slots=1, nodes=(first, timeline),
                                       **{"resources.max_instance_count": 4, **spec_keys})
    return reason, scheduler, ledger, calls


def test_slices_kept_for_a_worker_go_to_instances_that_join_and_come_back_from_one_that_leaves(tmp_path):
    # One row group of 30 slices, all kept for instance 0's worker; instance 1 joins at 5 s and
    # takes half of what is left; instance 0 leaves at 10 s mid-slice: its slices run on 1.
    calls = []

    def behaviour(batch, attempt, instance, now):
        calls.append((ordinal(batch), instance, now))
        return Outcome(2.0)

    reason, scheduler, _, ledger = run(tmp_path, behaviour, pending=slices(1, 30), slots=1,
                                       nodes=([0], [(5.0, "join", 1), (10.0, "leave", 0)]),
                                       **{"resources.max_instance_count": 4})

    assert reason is None and (scheduler.progress.done, scheduler.progress.failed) == (30, 0)
    assert {b for b, *_ in calls} == set(range(30))
    assert any(i == 1 and when < 10.0 for _, i, when in calls)  # the joined instance got work at once
    assert all(when < 10.0 for _, i, when in calls if i == 0)
    assert len(calls) == 31 and scheduler.reserved == 0  # only the slice running as 0 left, twice


def test_an_instance_joins_with_its_node_and_one_leaves_with_its_node_and_every_batch_runs_once(tmp_path):
    # Instance 0 from the start, 1 joins at 5 s, 0 leaves at 10 s (mid-batch): 2 joins at 15 s.
    reason, scheduler, ledger, calls = run_elastic(
        tmp_path, 20, [0], [(5.0, "join", 1), (10.0, "leave", 0), (15.0, "join", 2)])

    assert reason is None and (scheduler.progress.done, scheduler.progress.failed) == (20, 0)
    ran = {b for b, *_ in calls}
    assert ran == set(range(20))
    assert {i for _, _, i, _ in calls} == {0, 1, 2}
    assert all(when < 10.0 for _, _, i, when in calls if i == 0)  # nothing sent to the left instance after
    assert all(when >= 5.0 for _, _, i, when in calls if i == 1)
    lost = [b for b in ledger.view().failed]  # the batch instance 0 ran when its node left
    assert len(lost) == 1 and history(ledger, int(lost[0][3:])) == [("system", False)]  # no try spent
    assert [b for b, *_ in calls].count(int(lost[0][3:])) == 2  # and it ran again elsewhere
    assert {s.instance: s.left for s in scheduler.slots} == {0: True, 1: False, 2: False}
    assert scheduler.progress.workers == 3  # the compactions' pace counts every worker that had a folder


def test_a_job_whose_every_node_left_waits_for_one_to_join(tmp_path):
    reason, scheduler, ledger, calls = run_elastic(
        tmp_path, 10, [0], [(5.0, "leave", 0), (40.0, "join", 1)], **{"raypar.placement_timeout": 60})

    assert reason is None and scheduler.progress.done == 10
    assert {b for b, _, i, _ in calls if i == 1} >= set(range(3, 10))  # the rest ran on the newcomer


def test_a_job_whose_every_node_left_stops_after_the_placement_timeout_resumable(tmp_path):
    reason, scheduler, ledger, calls = run_elastic(
        tmp_path, 10, [0], [(5.0, "leave", 0), (100.0, "join", 1)], **{"raypar.placement_timeout": 30})

    assert reason == "every instance's node left the cluster and none joined within raypar.placement_timeout=30s"
    assert scheduler.progress.done == 2 and scheduler.progress.failed == 0  # the rest is left for a resume
    assert not any(i == 1 for _, _, i, _ in calls)


def test_an_elastic_job_whose_workers_all_crash_stops_as_any_job_does_without_waiting_for_nodes(tmp_path):
    reason, scheduler, _, _ = run(tmp_path, lambda b, a, instance, now: Outcome(1.0, "lost"), slots=1,
                                  nodes=([0], []), **{"resources.max_instance_count": 2,
                                                      "raypar.placement_timeout": 600})

    assert reason == "every worker slot was given up after repeated worker losses"
    assert scheduler.transport.now < 600  # it did not wait out the placement timeout


def test_an_instance_that_joins_after_the_last_batch_was_sent_starts_no_worker(tmp_path):
    reason, scheduler, ledger, calls = run_elastic(tmp_path, 4, [0, 1], [(3.5, "join", 2)])

    assert reason is None and scheduler.progress.done == 4
    joined = [s for s in scheduler.slots if s.instance == 2]
    assert len(joined) == 1 and joined[0].generation == 0  # no worker process was started for it


def run_tail(tmp_path, timeline=(), **spec_keys):
    """An elastic job of 6 batches on instances 0 and 1, one worker each: batch 0's first attempt
    takes 60 s, every other 2 s. Returns (reason, scheduler, cluster, calls as in run_elastic)."""
    calls = []

    def behaviour(batch, attempt, instance, now):
        calls.append((ordinal(batch), attempt, instance, now))
        return Outcome(60.0) if (ordinal(batch), attempt) == (0, 1) else Outcome(2.0)

    reason, scheduler, cluster, _ = run(tmp_path, behaviour, batches=6, slots=1, nodes=([0, 1], list(timeline)),
                                        **{"resources.max_instance_count": 4, **spec_keys})
    assert calls[0][:3] == (0, 1, 0)  # the first slot, instance 0's, takes the long batch
    return reason, scheduler, cluster, calls


def test_at_the_tail_an_instance_with_nothing_left_to_run_is_given_back(tmp_path):
    reason, scheduler, cluster, calls = run_tail(tmp_path)

    assert reason is None and (scheduler.progress.done, scheduler.progress.failed) == (6, 0)
    assert sorted(b for b, *_ in calls) == list(range(6))  # each once
    last_on_1 = max(when for _, _, i, when in calls if i == 1)
    (when, instance), = cluster.given_back
    assert instance == 1 and last_on_1 < when < 20.0  # long before batch 0 ends at 61 s
    assert cluster.wants == [(when, 1)]  # the autoscaler is asked for one instance from then on
    assert cluster.now > 60.0  # batch 0 still ran to its end on instance 0
    assert [s.retired for s in scheduler.slots] == [False, True]


def test_work_that_comes_back_after_the_tail_asks_for_the_nodes_again(tmp_path):
    # Instance 1 is given back at the tail; then instance 0's node leaves mid-batch, and its batch
    # runs on an instance that joins.
    reason, scheduler, cluster, calls = run_tail(tmp_path, [(30.0, "leave", 0), (40.0, "join", 2)],
                                                 **{"raypar.placement_timeout": 60})

    assert reason is None and (scheduler.progress.done, scheduler.progress.failed) == (6, 0)
    assert [(b, a, i) for b, a, i, when in calls if when >= 30.0] == [(0, 2, 2)]
    (tail, counted), (again, wanted) = cluster.wants
    assert counted == 1 and wanted is None and 30.0 <= again < 40.0
    assert [i for _, i in cluster.given_back] == [1, 0]  # at the tail, then with its node


def test_with_give_back_off_every_instance_stays_to_the_end(tmp_path):
    reason, scheduler, cluster, calls = run_tail(tmp_path, **{"raypar.give_back_idle_instances": False})

    assert reason is None and scheduler.progress.done == 6
    assert cluster.given_back == [] and cluster.wants == []
    assert not any(s.retired for s in scheduler.slots)


def test_with_speculation_idle_instances_are_kept_for_second_attempts(tmp_path):
    reason, scheduler, cluster, calls = run_tail(
        tmp_path, **{"raypar.speculation": {"enabled": True, "multiple": 4, "min_seconds": 0}})

    assert reason is None and scheduler.progress.done == 6
    assert cluster.given_back == [] and cluster.wants == []
    assert (0, 2, 1) in [(b, a, i) for b, a, i, _ in calls]  # the idle instance ran the second attempt


# -- fewer batches than worker slots: one worker per batch ---------------------------------------------------


def test_a_session_with_fewer_batches_than_slots_starts_one_worker_per_batch_spread_over_the_instances(tmp_path):
    seen = []
    reason, scheduler, cluster, ledger = run(
        tmp_path, lambda b, a, w: seen.append((ordinal(b), w)) or Outcome(5.0),
        batches=3, slots=4, **{"resources.instance_count": 2})

    assert reason is None and (scheduler.progress.done, scheduler.progress.failed) == (3, 0)
    assert cluster.reserved == 2 and cluster.started == [(0, 0), (1, 0), (0, 1)]  # each instance's first slot first
    assert cluster.reserved_slots == 2 and len(scheduler.slots) == 4  # of 4 each: 3 batches and a spare
    assert sorted(b for b, _ in seen) == [0, 1, 2] and len({w for _, w in seen}) == 3  # one on each
    assert cluster.now == pytest.approx(1.0 + 5.0)  # all three at once, as with every slot started


@pytest.mark.parametrize("max_retries, reserved", [(1, 3), (0, 2)])
def test_a_session_with_fewer_batches_than_instances_reserves_one_instance_per_batch_and_one_for_retries(
        tmp_path, max_retries, reserved):  # each with one worker slot of its two
    reason, scheduler, cluster, ledger = run(tmp_path, lambda b, a, w: Outcome(5.0), batches=2, slots=2,
                                             retry_settings={"max_retries": max_retries, "timeout": 100},
                                             **{"resources.instance_count": 4})

    assert reason is None and scheduler.progress.done == 2
    assert cluster.reserved == reserved and cluster.started == [(0, 0), (1, 0)]
    assert cluster.reserved_slots == 1 and len(scheduler.slots) == reserved


@pytest.mark.parametrize("count, slots, instances, per_instance, line", [
    (3, 1, 4, 8, "raypar: 3 of the 4 instances reserved with 1 of their 8 worker slots each: "
                 "fewer mini-batches to run than worker slots"),
    (4, 6, 4, 8, "raypar: the 4 instances reserved with 6 of their 8 worker slots each: "
                 "fewer mini-batches to run than worker slots"),
    (1, 3, 1, 16, "raypar: the instance reserved with 3 of its 16 worker slots: fewer mini-batches to run than "
                  "worker slots"),
    (3, 2, 4, 2, "raypar: 3 of the 4 instances reserved: fewer mini-batches to run than instances"),
    (4, 8, 4, 8, None),
])
def test_a_session_reserving_fewer_instances_or_slots_says_so_in_one_line(count, slots, instances, per_instance,
                                                                          line):
    from raypar.engine.ray_transport import fewer_reserved

    assert fewer_reserved(count, slots, instances, per_instance) == line


def test_a_retry_of_the_one_batch_of_a_session_goes_to_the_spare_instance(tmp_path):
    seen = []

    def behaviour(batch, attempt, worker):
        seen.append(worker)
        return Outcome(0.5, "user", "RuntimeError: CUDA error") if attempt == 1 else Outcome(1.0)

    reason, scheduler, cluster, ledger = run(tmp_path, behaviour, batches=1, slots=1,
                                             **{"resources.instance_count": 4})

    assert reason is None and (scheduler.progress.done, scheduler.progress.failed) == (1, 0)
    assert cluster.reserved == 2 and cluster.started == [(0, 0), (1, 0)] and len(set(seen)) == 2


def _policy_spec(tmp_path, instances: int, speculation: bool = False):
    return spec_from_dict({"type": "parallel", "name": "policy",
                           "inputs": {"data": {"type": "uri_folder", "path": str(tmp_path)}},
                           "input_data": "${{inputs.data}}", "max_concurrency_per_instance": 2,
                           "resources": {"instance_count": instances},
                           "raypar": {"speculation": {"enabled": speculation}},
                           "task": {"code": str(tmp_path), "entry_script": "score.py"}})


def _file_batches(count: int) -> list[MiniBatch]:
    return [MiniBatch(ordinal=i, kind="files", payload={"files": [f"f{i}"]}, item_count=1) for i in range(count)]


@pytest.mark.parametrize("why", ["slow listing", "speculation"])
def test_while_the_input_is_planned_or_with_speculation_every_instance_is_reserved(tmp_path, monkeypatch, why):
    from raypar.engine import scheduler as scheduler_module
    from raypar.engine.planning import PlanFeed

    ledger = Ledger(str(tmp_path / "job"))
    batches = _file_batches(2)
    spec = _policy_spec(tmp_path, 3, speculation=why == "speculation")
    ran = threading.Event()
    cluster = SimulatedCluster(lambda b, a, w: ran.set() or Outcome(1.0), start_seconds=1.0, record=True)
    if why == "slow listing":  # two batches in the end, but the count is not known when the workers start
        monkeypatch.setattr(scheduler_module, "SIZING_WAIT", 0.05)

        def listing():  # lists its second batch only once the first ran: slower than the sizing wait
            yield batches[0]
            assert ran.wait(30)
            yield batches[1]

        feed = PlanFeed(ledger, listing(), first_release=6)
        feed.start()
        scheduler = Scheduler(ledger, spec, "r1", [], cluster, Progress(total=0), feed=feed)
    else:
        ledger.write_manifest(batches)
        scheduler = Scheduler(ledger, spec, "r1", batches, cluster, Progress(total=2))

    assert scheduler.run() is None and scheduler.progress.done == 2
    assert cluster.reserved == 3 and sorted(cluster.started) == [(i, s) for i in range(3) for s in range(2)]


def test_a_fresh_job_waits_for_its_planner_and_is_sized_to_its_batches(tmp_path):
    from raypar.engine.planning import PlanFeed

    ledger = Ledger(str(tmp_path / "job"))
    feed = PlanFeed(ledger, iter(_file_batches(2)), first_release=8)
    feed.start()  # the scheduler starts at once: whether the planner finished first is not left to chance
    cluster = SimulatedCluster(lambda b, a, w: Outcome(1.0), start_seconds=1.0, record=True)
    scheduler = Scheduler(ledger, _policy_spec(tmp_path, 4), "r1", [], cluster, Progress(total=0), feed=feed)

    assert scheduler.run() is None and (scheduler.progress.done, scheduler.progress.total) == (2, 2)
    assert cluster.reserved == 3 and cluster.reserved_slots == 1 and cluster.started == [(0, 0), (1, 0)]


def test_a_fresh_job_with_a_batch_for_every_slot_starts_them_all_while_its_listing_goes_on(tmp_path, monkeypatch):
    from raypar.engine import scheduler as scheduler_module
    from raypar.engine.planning import PlanFeed

    monkeypatch.setattr(scheduler_module, "SIZING_WAIT", 60.0)  # were the batches held, the job would wait
    ledger = Ledger(str(tmp_path / "job"))
    batches = _file_batches(8)
    ran = threading.Event()
    listed_after_a_batch_ran = []

    def listing():  # the first 6 batches at once, the rest only once a batch ran
        yield from batches[:6]
        listed_after_a_batch_ran.append(ran.wait(30))
        yield from batches[6:]

    feed = PlanFeed(ledger, listing(), first_release=6)
    feed.start()
    cluster = SimulatedCluster(lambda b, a, w: ran.set() or Outcome(1.0), start_seconds=1.0, record=True)
    scheduler = Scheduler(ledger, _policy_spec(tmp_path, 3), "r1", [], cluster, Progress(total=0), feed=feed)

    assert scheduler.run() is None and (scheduler.progress.done, scheduler.progress.total) == (8, 8)
    assert listed_after_a_batch_ran == [True]
    assert cluster.reserved == 3 and sorted(cluster.started) == [(i, s) for i in range(3) for s in range(2)]


def test_with_as_many_batches_as_slots_every_worker_starts(tmp_path):
    reason, scheduler, cluster, ledger = run(tmp_path, lambda b, a, w: Outcome(5.0), batches=8, slots=4,
                                             **{"resources.instance_count": 2})

    assert reason is None and scheduler.progress.done == 8
    assert sorted(cluster.started) == [(i, s) for i in range(2) for s in range(4)]
    assert cluster.reserved == 2 and cluster.reserved_slots == 4


def test_a_retry_that_no_idle_worker_may_take_starts_another_worker(tmp_path):
    # Batch 0 fails once on the first worker; batch 1 keeps the second busy for a long time. The
    # retry goes to a third worker, started for it, not to the one it failed on, nor after batch 1.
    ran = []

    def behaviour(batch, attempt, worker):
        ran.append((ordinal(batch), attempt, worker, batch))
        if ordinal(batch) == 1:
            return Outcome(100.0)
        return Outcome(0.5, "user", "RuntimeError: CUDA error") if attempt == 1 else Outcome(2.0)

    reason, scheduler, cluster, ledger = run(tmp_path, behaviour, batches=2, slots=4,
                                             retry_settings={"max_retries": 1, "timeout": 1000})

    assert reason is None and (scheduler.progress.done, scheduler.progress.failed) == (2, 0)
    assert len(cluster.started) == 3
    (_, _, first, _), (_, _, third, retried), (_, _, busy, _) = sorted(ran, key=lambda r: (r[0], r[1]))
    assert len({first, busy, third}) == 3 and cluster.run_starts[retried] < 10.0  # a fresh worker, at once
    assert history(ledger, 0) == [("user", False)]


def test_init_failing_on_the_workers_started_for_a_few_batches_stops_the_job_without_trying_the_rest(tmp_path):
    reason, scheduler, cluster, ledger = run(tmp_path, lambda b, a, w: Outcome(1.0), batches=2, slots=8,
                                             start_error=lambda slot: "Traceback ...\nRuntimeError: no model")

    assert reason == "no worker could start: init() failed on every worker"
    assert sorted(cluster.started) == [(0, 0)] * 3 + [(0, 1)] * 3  # two slots, three tries each
    assert ledger.view().failed == {}


def test_init_failing_on_one_node_only_starts_a_spare_on_another_instance(tmp_path):
    # A broken GPU on instance 0's node: the one batch runs on the spare instance's worker.
    reason, scheduler, cluster, ledger = run(
        tmp_path, lambda b, a, w: Outcome(1.0), batches=1, slots=1, **{"resources.instance_count": 4},
        start_error=lambda slot: "RuntimeError: CUDA unavailable" if slot.instance == 0 else None)

    assert reason is None and (scheduler.progress.done, scheduler.progress.failed) == (1, 0)
    assert cluster.reserved == 2 and (1, 0) in cluster.started and ledger.view().failed == {}


def test_a_batch_whose_node_died_runs_on_the_spare_instance_instead_of_waiting_for_the_node(tmp_path):
    # A fixed job: instance 0's node dies in the batch and no node takes its place (the restart
    # of its worker waits for Ray forever). The batch runs on the spare instance, no try spent.
    placed, ran = {0, 1, 2, 3}, []

    def behaviour(batch, attempt, worker):
        ran.append(worker)
        if len(ran) == 1:
            placed.discard(0)
            return Outcome(2.0, "lost")
        return Outcome(1.0)

    reason, scheduler, cluster, ledger = run(tmp_path, behaviour, batches=1, slots=1, placed=placed,
                                             **{"resources.instance_count": 4})

    assert reason is None and (scheduler.progress.done, scheduler.progress.failed) == (1, 0)
    assert cluster.started == [(0, 0), (0, 0), (1, 0)] and len(set(ran)) == 2
    assert history(ledger, 0) == [("system", False)]


# -- a retry goes to another worker --------------------------------------------------------------------------


def test_a_retry_does_not_wait_for_a_worker_whose_node_is_gone(tmp_path):
    # Two instances: batch 0 fails once on instance 0's worker; instance 1's node dies in batch 1,
    # and its worker's restart waits for a node that never comes. The retry of batch 0 must not
    # wait for that worker: instance 0's worker, the only one left, takes it.
    placed = {0, 1}

    def behaviour(batch, attempt, worker):
        if ordinal(batch) == 1 and 1 in placed:
            placed.discard(1)
            return Outcome(2.0, "lost")
        return Outcome(0.5, "user", "ValueError: bad") if (ordinal(batch), attempt) == (0, 1) else Outcome(1.0)

    reason, scheduler, cluster, ledger = run(tmp_path, behaviour, batches=2, slots=1, placed=placed,
                                             **{"resources.instance_count": 2})

    assert reason is None and (scheduler.progress.done, scheduler.progress.failed) == (2, 0)
    assert history(ledger, 0) == [("user", False)] and history(ledger, 1) == [("system", False)]


def test_a_batch_that_failed_on_a_worker_is_retried_on_another(tmp_path):
    # Slot 0's worker is broken (a dead GPU): everything it runs fails, at once. With one retry
    # per batch, each batch it failed succeeds on slot 1; none is lost to the broken worker twice.
    ran = []
    ledger = Ledger(str(tmp_path / "job"))
    pending = [MiniBatch(ordinal=i, kind="files", payload={"files": [f"f{i}"]}, item_count=1) for i in range(12)]
    ledger.write_manifest(pending)
    spec = spec_from_dict({"type": "parallel", "name": "policy",
                           "inputs": {"data": {"type": "uri_folder", "path": str(tmp_path)}},
                           "input_data": "${{inputs.data}}", "max_concurrency_per_instance": 2,
                           "retry_settings": {"max_retries": 1, "timeout": 100},
                           "task": {"code": str(tmp_path), "entry_script": "score.py"}})

    def behaviour(batch, attempt, worker):
        slot = cluster.workers[worker].slot.index
        ran.append((ordinal(batch), slot))
        return Outcome(0.5, "user", "RuntimeError: CUDA error") if slot == 0 else Outcome(5.0)

    cluster = SimulatedCluster(behaviour, start_seconds=1.0)
    scheduler = Scheduler(ledger, spec, "r1", pending, cluster, Progress(total=12))

    assert scheduler.run() is None
    assert (scheduler.progress.done, scheduler.progress.failed) == (12, 0)
    failed_on_0 = {b for b, slot in ran if slot == 0}
    assert failed_on_0  # the broken worker did get work...
    assert all(ran.count((b, 0)) == 1 for b in failed_on_0)  # ...but never the same batch twice
    assert {b for b, slot in ran if slot == 1} == set(range(12))
    assert all(history(ledger, b) == [("user", False)] for b in failed_on_0)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("seconds", [0.002, 1.0])
def test_retries_that_failed_on_every_busy_worker_still_reach_an_idle_one(tmp_path, seconds):
    # Half the batches fail on every try. A retry is kept from the worker it failed on; a worker
    # that found only such retries in the queue went idle and was never looked at again (nothing
    # it ran changed), while the retries waited for it: the driver spun at full CPU for ever.
    reason, scheduler, cluster, ledger = run(
        tmp_path, lambda b, a, w: Outcome(seconds, "user", "ValueError: bad") if ordinal(b) % 2 == 0
        else Outcome(seconds), batches=40, **{"retry_settings.max_retries": 2})

    assert reason is None and (scheduler.progress.done, scheduler.progress.failed) == (20, 20)
    assert all(history(ledger, b) == [("user", False), ("user", False), ("user", True)] for b in range(0, 40, 2))


def test_with_one_worker_left_a_retry_runs_where_it_failed(tmp_path):
    reason, scheduler, cluster, ledger = run(
        tmp_path, lambda b, a, w: Outcome(1.0, "user", "ValueError: bad") if (ordinal(b), a) == (2, 1)
        else Outcome(1.0), slots=1)

    assert reason is None and (scheduler.progress.done, scheduler.progress.failed) == (6, 0)
    assert history(ledger, 2) == [("user", False)]
