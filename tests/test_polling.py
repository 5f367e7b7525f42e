"""raypar.polling.poll: the one loop that waits for a condition by asking again."""

from raypar.polling import poll


def test_the_first_truthy_answer_is_returned_and_nothing_is_asked_after_it():
    answers = iter([None, 0, False, "done", "never asked"])
    asked = []

    def check():
        asked.append(1)
        return next(answers)

    assert poll(check, timeout=None, interval=0) == "done"
    assert len(asked) == 4


def test_a_condition_never_met_gives_none_once_the_time_is_up():
    asked = []
    assert poll(lambda: asked.append(1), timeout=0, interval=10) is None  # never sleeps past the deadline
    assert len(asked) == 1
