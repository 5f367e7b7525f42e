"""Partitioners: turn a job's input into a deterministic stream of mini-batches.

``plan_batches(spec)`` is the planning side (driver); ``materialize(batch, data_input)``
is the worker side that turns a batch's payload into what ``run()`` receives.
Each input kind lives in its own module and registers both halves here.
"""

from .base import MiniBatch, check_input, materialize, plan_batches

__all__ = ["MiniBatch", "check_input", "plan_batches", "materialize"]
