"""Azure ML SDK shapes that build raypar jobs.

- :mod:`raypar.azureml.v2`: ``parallel_run_function``, ``RunFunction``, ``Input``, ``Output``,
  ``RetrySettings``, ``AssetTypes``, ``InputOutputModes`` (``azure.ai.ml``'s names).
- :mod:`raypar.azureml.v1`: ``ParallelRunConfig``, ``ParallelRunStep`` (``azureml.pipeline.steps``'),
  converted to v2 with Azure's mapping; :mod:`raypar.azureml.v1_data`: stand-ins for v1 datasets.
- :mod:`raypar.azureml.dsl`: ``@pipeline`` (``dsl.pipeline``); :mod:`raypar.azureml.components`:
  ``load_component``, ``command`` (command and parallel components as ``@pipeline`` nodes);
  :mod:`raypar.azureml.client`: ``MLClient``.
- :mod:`raypar.azureml.convert`: ``raypar convert``.
- :mod:`raypar.azureml.compat`: what entry scripts written for Azure expect around them inside a
  worker (``EntryScript``, ``Model.get_model_path``, Azure's program arguments).

See docs/azureml-sdk.md.
"""

import importlib

# Each name from its module, imported on first use: a worker importing raypar.azureml.compat
# loads none of the SDK shapes (and none of pydantic or the pipeline machinery behind them).
_HOME = {
    "dsl": "raypar.azureml.dsl",
    "MLClient": "raypar.azureml.client",
    **dict.fromkeys(("Component", "command", "load_component"), "raypar.azureml.components"),
    **dict.fromkeys(("PipelineJob", "pipeline"), "raypar.azureml.dsl"),
    **dict.fromkeys(("ParallelRunConfig", "ParallelRunStep"), "raypar.azureml.v1"),
    **dict.fromkeys(("Dataset", "DatasetConsumptionConfig", "OutputFileDatasetConfig", "PipelineData",
                     "PipelineParameter"), "raypar.azureml.v1_data"),
    **dict.fromkeys(("DataPath", "Datastore"), "raypar.azureml.v1_paths"),
    **dict.fromkeys(("AssetTypes", "BatchRetrySettings", "Environment", "Input", "InputOutputModes",
                     "JobResourceConfiguration", "Output", "ParallelJob", "RetrySettings", "RunFunction",
                     "parallel_run_function"), "raypar.azureml.v2"),
}


def __getattr__(name):
    if name not in _HOME:
        raise AttributeError(f"module 'raypar.azureml' has no attribute {name!r}")
    module = importlib.import_module(_HOME[name])
    return module if name == "dsl" else getattr(module, name)


__all__ = sorted(_HOME)
