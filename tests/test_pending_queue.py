"""The scheduler's queue of pending batches: packed, yet every batch comes out as planned, in order."""

import collections
import random

import pytest

from raypar.inputs import pending
from raypar.inputs.base import MiniBatch, QueuedBatch
from raypar.inputs.pending import PendingQueue


def planned(first: int, count: int) -> list[QueuedBatch]:
    return [QueuedBatch.of(MiniBatch(i, "files", {"files": [f"dir é/part {i}.txt", "x\"y"]}, 2))
            for i in range(first, first + count)]


def test_many_packs_of_batches_come_out_in_order_with_their_lines():
    # Many packs and a tail: a million hold the same way (their memory is measured by
    # bench_ledger_scale.py and bench_engine_simulation.py); a million here took 11 s of the suite.
    count = 25 * pending.PACK_SIZE + 123
    batches = planned(0, count)
    queue = PendingQueue(batches)
    assert len(queue) == count
    assert len(queue.packs) == count // pending.PACK_SIZE  # held packed, not as objects
    out = [queue.popleft() for _ in range(len(batches))]
    assert out == batches
    assert not queue
    with pytest.raises(IndexError):
        queue.first()


def test_put_back_batches_run_first_and_planning_appends_after_all(monkeypatch):
    monkeypatch.setattr(pending, "PACK_SIZE", 3)
    queue = PendingQueue(planned(0, 7))  # two packs and a tail of one
    first = queue.popleft()
    queue.extend(planned(7, 4))  # released by the planner later
    queue.appendleft(first)  # a retry
    queue.extendleft(reversed(planned(100, 2)))  # a lost worker's two batches, in their order
    expected = [100, 101, 0, *range(1, 11)]
    assert [b.ordinal for b in queue] == expected  # iterating takes nothing
    assert queue.first().ordinal == 100
    assert [queue.popleft().ordinal for _ in range(len(queue))] == expected


def test_lines_queued_as_bytes_come_out_after_what_was_queued_before(monkeypatch):
    monkeypatch.setattr(pending, "PACK_SIZE", 3)
    queue = PendingQueue(planned(0, 2))  # a tail not packed yet
    later = planned(2, 7)
    queue.extend_lines([b.ordinal for b in later], [b.line.encode() for b in later])
    queue.extend(planned(9, 1))
    assert len(queue) == 10
    assert [queue.popleft() for _ in range(10)] == planned(0, 10)


def test_matches_a_deque_under_any_mix_of_operations(monkeypatch):
    monkeypatch.setattr(pending, "PACK_SIZE", 4)
    rng = random.Random(7)
    queue, model = PendingQueue(), collections.deque()
    planned_next = 0
    for _ in range(5_000):
        op = rng.random()
        if op < 0.35:
            new = planned(planned_next, rng.randint(0, 9))
            planned_next += len(new)
            if op < 0.1:  # as a resume queues them: ordinals and lines
                queue.extend_lines([b.ordinal for b in new], [b.line.encode() for b in new])
            else:
                queue.extend(new)
            model.extend(new)
        elif op < 0.5 and model:
            back = [model.popleft() for _ in range(min(len(model), rng.randint(1, 3)))]
            for batch in back:
                assert queue.popleft() == batch
            queue.extendleft(reversed(back))
            model.extendleft(reversed(back))
        elif model:
            assert queue.first() == model[0]
            assert queue.popleft() == model.popleft()
        assert len(queue) == len(model)
    assert list(queue) == list(model)
