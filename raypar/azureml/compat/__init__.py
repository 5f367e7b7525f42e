"""Azure ML's semantics that a spec and an entry script rely on, below the spec and the worker.

- ``arguments``: Azure's predefined program arguments (``--allowed_failed_percent``,
  ``--first_task_creation_timeout``, ...): read on the driver side, pure.
- ``models``: the model mapping behind ``Model.get_model_path``: merged by the spec,
  resolved inside workers by the shim (raypar/worker/shim/azureml/core/model.py).

Inside a worker, the folders and variables Azure's runtime provides and the
``azureml_user`` / ``azureml.core`` shim live in ``raypar.worker`` (azure_env.py, shim/).
See docs/entry-scripts.md.
"""
