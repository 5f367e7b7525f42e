"""Partitioners: turn a job's input into a deterministic stream of mini-batches.

``check_input(spec)`` describes the input as plain values and checks it;
``plan_batches(spec, desc)`` is the planning side (driver); ``BatchReader`` is
the worker side that turns a batch's payload into what ``run()`` receives.
Files (source.py lists them), file lists (files.py), tables (tabular.py),
partition keys (partitioned.py) and MLTable files (mltable.py) each have a module.
"""

from raypar.inputs.base import BatchReader, MiniBatch, MiniBatchContext, check_input, plan_batches

__all__ = ["BatchReader", "MiniBatch", "MiniBatchContext", "check_input", "plan_batches"]
