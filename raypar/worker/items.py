"""Items run() reports failed, with ``raypar.item_failed(item, error)``.

While ``run()`` works on a mini-batch, the worker holds a :class:`FailedItems` for it; what
run() reports lands there and goes into the batch's done record (``reported``, ``failed``),
stored with the batch, exactly once. An item is named by what run() got: for a batch of
files, one of its paths (or its place in the list); for a table batch, rows by their place in
the batch (an int, a list of ints, or a slice of the DataFrame run() got: its index).

A leaf (stdlib only): user code imports it from inside run().
"""

from __future__ import annotations

import json
import operator
import threading
from typing import Optional

MAX_ERROR_CHARS = 1000  # one item's error text, as stored

_current: Optional["FailedItems"] = None
_lock = threading.Lock()  # run() may report from threads of its own


class FailedItems:
    """The failed items of one mini-batch while run() works on it."""

    def __init__(self, kind: str, mini_batch):
        self.kind = kind
        self.size = len(mini_batch)
        # Files: where each path run() got sits in the batch.
        self.places = {str(p): i for i, p in enumerate(mini_batch)} if kind == "files" else {}
        self.errors: dict[int, str] = {}

    def add(self, item, error) -> None:
        text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        text = text[:MAX_ERROR_CHARS]
        for place in self._places_of(item):
            self.errors[place] = text

    def _places_of(self, item) -> list[int]:
        if self.kind == "files" and (isinstance(item, str) or hasattr(item, "__fspath__")):
            place = self.places.get(str(item))
            if place is None:
                raise ValueError(f"raypar.item_failed: {item!r} is not one of this mini-batch's files")
            return [place]
        if hasattr(item, "index") and not isinstance(item, (list, tuple, range)):
            item = list(item.index)  # a slice of the DataFrame run() got
        places = []
        for place in ([item] if not hasattr(item, "__iter__") else item):
            try:
                place = operator.index(place)  # ints, numpy ints; not floats, not bools' meaning
            except TypeError:
                place = None
            if place is None or not 0 <= place < self.size:
                raise ValueError(f"raypar.item_failed: {item!r} names no item of this mini-batch "
                                 f"({self.size} {'files' if self.kind == 'files' else 'rows'}: "
                                 f"{'a path run() got, or ' if self.kind == 'files' else ''}a place 0 to {self.size - 1})")
            places.append(place)
        return places

    def record_fields(self) -> dict:
        """``reported`` and ``failed`` for the done record ({} when nothing was reported)."""
        if not self.errors:
            return {}
        by_error: dict[str, list[int]] = {}
        for place, text in sorted(self.errors.items()):
            by_error.setdefault(text, []).append(place)
        return {"reported": len(self.errors), "failed": json.dumps(by_error, sort_keys=True)}


def collect(kind: str, mini_batch) -> FailedItems:
    """Start collecting for the mini-batch run() is about to get."""
    global _current
    with _lock:
        _current = FailedItems(kind, mini_batch)
        return _current


def stop() -> None:
    global _current
    with _lock:
        _current = None


def report(item, error) -> None:
    with _lock:
        if _current is None:
            raise RuntimeError("raypar.item_failed() reports an item of the mini-batch run() is working on; "
                               "call it from run() in a raypar worker")
        _current.add(item, error)
