"""Reading mini-batches ahead (raypar/worker/read_ahead.py) with a reader that counts its reads:
a read ahead is taken once, a failed or late one is read by the batch's call, and reads that no
call took leave nothing on disk. And calls taken back (raypar/worker/withdrawals.py): each is
withdrawn or begun, never both."""

from __future__ import annotations

import threading

import pytest

from raypar.inputs.base import MiniBatch
from raypar.worker.read_ahead import ReadAhead
from raypar.worker.withdrawals import Withdrawals, call_name


def batch(i: int) -> MiniBatch:
    return MiniBatch(ordinal=i, kind="files", payload={"files": [f"f{i}"]}, item_count=1)


class Reader:
    """Reads a batch as (its files, None, a temp folder made for it), or raises for ``failing``."""

    def __init__(self, tmp_path, failing=()):
        self.tmp_path, self.failing, self.reads = tmp_path, set(failing), []
        self.gate = threading.Event()  # a read waits for it: a read that takes a while
        self.gate.set()
        self.started = threading.Event()

    def read(self, b: MiniBatch):
        self.started.set()
        assert self.gate.wait(timeout=30)
        self.reads.append(b.ordinal)
        if b.ordinal in self.failing:
            self.failing.discard(b.ordinal)  # fails once: a second read works
            raise OSError(f"read {b.ordinal} failed")
        folder = self.tmp_path / f"temp-{b.ordinal}-{len(self.reads)}"
        folder.mkdir()
        return b.payload["files"], None, str(folder)


def test_a_batch_read_ahead_is_not_read_again(tmp_path):
    reader = Reader(tmp_path)
    ahead = ReadAhead(reader, keep=1)
    ahead.prefetch(batch(1))
    assert ahead.read(batch(1))[0] == ["f1"]
    assert reader.reads == [1]


def reading_batch_1(tmp_path, keep):
    """(reader, read ahead, its aside thread) with the aside thread reading batch 1, held by the gate."""
    reader = Reader(tmp_path)
    ahead = ReadAhead(reader, keep=keep)
    reader.gate.clear()
    aside = threading.Thread(target=ahead.prefetch, args=(batch(1),))
    aside.start()
    assert reader.started.wait(timeout=30)
    return reader, ahead, aside


def test_the_call_waits_for_a_read_ahead_still_running(tmp_path):
    reader, ahead, aside = reading_batch_1(tmp_path, keep=1)
    got = []
    call = threading.Thread(target=lambda: got.append(ahead.read(batch(1))))
    call.start()
    reader.gate.set()
    aside.join()
    call.join()
    assert got[0][0] == ["f1"] and reader.reads == [1]  # one read, taken by the call


def test_a_failed_read_ahead_is_read_again_by_the_call_whose_error_is_its_own(tmp_path):
    reader = Reader(tmp_path, failing={1})
    ahead = ReadAhead(reader, keep=1)
    ahead.prefetch(batch(1))  # fails on the aside thread: nothing raised there
    assert ahead.read(batch(1))[0] == ["f1"]
    assert reader.reads == [1, 1]

    reader.failing = {2}
    with pytest.raises(OSError, match="read 2 failed"):  # without a read ahead, the call's read raises
        ahead.read(batch(2))


def test_a_hint_that_comes_after_its_call_began_reads_nothing(tmp_path):
    reader = Reader(tmp_path)
    ahead = ReadAhead(reader, keep=1)
    ahead.read(batch(1))
    ahead.prefetch(batch(1))
    assert reader.reads == [1]


def test_reads_no_call_took_are_bounded_and_leave_no_temp_folder(tmp_path):
    reader = Reader(tmp_path)
    ahead = ReadAhead(reader, keep=1)
    for i in range(5):  # the driver took these calls back (speculation): their reads are never taken
        ahead.prefetch(batch(i))
    assert len(ahead.reads) <= 2
    assert len(list(tmp_path.glob("temp-*"))) <= 2
    ahead.close()
    assert list(tmp_path.glob("temp-*")) == []


def test_a_read_whose_call_was_taken_back_is_freed_at_once(tmp_path):
    reader = Reader(tmp_path)
    ahead = ReadAhead(reader, keep=2)
    ahead.prefetch(batch(1))
    ahead.prefetch(batch(2))
    ahead.drop(batch(1).id)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["temp-2-2"]  # batch 1's folder removed
    assert ahead.read(batch(2))[0] == ["f2"]
    assert ahead.read(batch(1))[0] == ["f1"] and reader.reads == [1, 2, 1]  # sent again: read again


def test_a_read_still_in_progress_when_its_call_is_taken_back_frees_what_it_read_as_it_ends(tmp_path):
    reader, ahead, aside = reading_batch_1(tmp_path, keep=2)
    ahead.drop(batch(1).id)
    reader.gate.set()
    aside.join()
    assert reader.reads == [1] and list(tmp_path.iterdir()) == []  # read, then its folder removed
    assert ahead.read(batch(1))[0] == ["f1"] and reader.reads == [1, 1]  # sent again: read again


def test_a_call_is_withdrawn_or_begun_never_both():
    withdrawals = Withdrawals()
    assert withdrawals.begin(call_name("mb-0000001", 1))
    assert withdrawals.withdraw([call_name("mb-0000001", 1), call_name("mb-0000002", 1)]) == ["mb-0000002~1"]
    assert not withdrawals.begin(call_name("mb-0000002", 1))  # its turn: it does not run
    assert withdrawals.begin(call_name("mb-0000002", 2))  # the batch sent again, under its next attempt
    assert withdrawals.withdraw([call_name("mb-0000002", 2)]) == []
    assert withdrawals.withdrawn == set()


def test_begin_and_withdraw_racing_from_two_threads_agree_on_every_call():
    withdrawals = Withdrawals()
    names = [call_name(f"mb-{i:07d}", 1) for i in range(2000)]
    ran, taken = [], []
    runner = threading.Thread(target=lambda: ran.extend(n for n in names if withdrawals.begin(n)))
    runner.start()
    for start in range(0, len(names), 50):
        taken.extend(withdrawals.withdraw(names[start:start + 50]))
    runner.join()
    assert sorted(ran + taken) == sorted(names)  # each either ran or was taken back
    assert not set(ran) & set(taken)
