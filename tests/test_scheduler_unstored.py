"""The driver's record of done batches a worker has not stored yet (object-store job dirs)."""

from raypar.engine.scheduler import Call, Unstored
from raypar.inputs.base import MiniBatch


def call(ordinal: int) -> Call:
    batch = MiniBatch(ordinal=ordinal, kind="files", payload={"files": [f"f{ordinal}.txt"]}, item_count=1)
    return Call(ref=None, batch=batch, attempt=1, started=None)


def test_answers_handled_out_of_order_are_confirmed_by_the_worker_s_stored_count():
    unstored = Unstored()
    a, b, c = call(0), call(1), call(2)
    unstored.add(b, 2, 0)  # the answer for the worker's 2nd record is handled first
    unstored.confirm(0)
    assert len(unstored) == 1
    unstored.add(a, 1, 1)
    unstored.add(c, 3, 0)
    unstored.confirm(2)  # the worker stored its first 2 records: a and b
    assert [(x.batch.ordinal, items) for x, items in unstored.take_all()] == [(2, 0)]
    assert len(unstored) == 0 and not unstored


def test_a_lost_worker_s_unstored_batches_come_back_in_the_order_it_wrote_them():
    unstored = Unstored()
    for index, ordinal in ((3, 7), (1, 5), (2, 6)):
        unstored.add(call(ordinal), index, 0)
    assert [x.batch.ordinal for x, _ in unstored.take_all()] == [5, 6, 7]
