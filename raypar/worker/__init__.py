"""The worker process: one Ray actor per slot runs the user's entry script.

- ``actor``: ``Worker`` (init(), run() per mini-batch, done records, shutdown()) and its plan.
- ``time_spent``: the running totals of a worker's batches' time (reading, run(), storing) its answers carry.
- ``staging``: ``uri_folder`` outputs of ``direct``/``upload`` mode staged locally and uploaded.
- ``azure_env``: the folders, variables and import path Azure's runtime gives entry scripts;
  ``shim/`` holds ``azureml_user.parallel_run.EntryScript`` and ``azureml.core.Model``, the only
  folder of raypar put on a worker's ``sys.path`` (appended last: an installed azureml wins).

The worker imports the job dir, the inputs' reader side, ``raypar.outputs.rows`` and the Azure
semantics below the spec (``raypar.azureml.compat``: program arguments, model mapping); never the engine, the front ends, or pydantic.
"""
