"""The worker process: one Ray actor per slot runs the user's entry script.

- ``actor``: ``Worker`` (init(), run() per mini-batch, done records, shutdown()) and its plan.
- ``staging``: ``uri_folder`` outputs of ``direct``/``upload`` mode staged locally and uploaded.

The worker imports the job dir, the inputs' reader side, ``raypar.outputs.rows`` and the Azure
compatibility (``raypar.azureml.compat``); never the engine, the front ends, or pydantic.
"""
