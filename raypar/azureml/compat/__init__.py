"""What entry scripts written for Azure ML expect around them, on Ray.

- ``arguments``: Azure's predefined program arguments (``--allowed_failed_percent``,
  ``--first_task_creation_timeout``, ...): read on the driver side, pure.
- ``worker_env``: inside a worker, the folders and environment variables Azure's
  runtime provides (``AZUREML_BI_OUTPUT_PATH``, ``AZ_BATCHAI_GPU_COUNT_FOUND``),
  ``--profiling_module``, and the import path of the shim below.
- ``shim/azureml_user/parallel_run.py``: ``from azureml_user.parallel_run import
  EntryScript``. Only ``shim/`` is put on a worker's ``sys.path``, so the name
  ``azureml_user`` exists inside raypar workers and nowhere else.

See docs/entry-scripts.md.
"""
