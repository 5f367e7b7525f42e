"""Azure ML SDK shapes that build raypar jobs.

- :mod:`raypar.azureml.v2`: ``parallel_run_function``, ``RunFunction``, ``Input``, ``Output``,
  ``RetrySettings``, ``AssetTypes``, ``InputOutputModes`` (``azure.ai.ml``'s names).
- :mod:`raypar.azureml.v1`: ``ParallelRunConfig``, ``ParallelRunStep`` (``azureml.pipeline.steps``'),
  converted to v2 with Azure's mapping; :mod:`raypar.azureml.v1_data`: stand-ins for v1 datasets.
- :mod:`raypar.azureml.convert`: ``raypar convert``.

See docs/azureml-sdk.md.
"""

from .v1 import ParallelRunConfig, ParallelRunStep
from .v1_data import Dataset, OutputFileDatasetConfig, PipelineData, PipelineParameter
from .v2 import (AssetTypes, BatchRetrySettings, Input, InputOutputModes, Output, ParallelJob, RetrySettings,
                 RunFunction, parallel_run_function)

__all__ = ["AssetTypes", "BatchRetrySettings", "Dataset", "Input", "InputOutputModes", "Output",
           "OutputFileDatasetConfig", "ParallelJob", "ParallelRunConfig", "ParallelRunStep", "PipelineData",
           "PipelineParameter", "RetrySettings", "RunFunction", "parallel_run_function"]
