"""Azure ML SDK shapes that build raypar jobs.

- :mod:`raypar.azureml.v2`: ``parallel_run_function``, ``RunFunction``, ``Input``, ``Output``,
  ``RetrySettings``, ``AssetTypes``, ``InputOutputModes`` (``azure.ai.ml``'s names).
- :mod:`raypar.azureml.v1`: ``ParallelRunConfig``, ``ParallelRunStep`` (``azureml.pipeline.steps``'),
  converted to v2 with Azure's mapping; :mod:`raypar.azureml.v1_data`: stand-ins for v1 datasets.
- :mod:`raypar.azureml.dsl`: ``@pipeline`` (``dsl.pipeline``); :mod:`raypar.azureml.components`:
  ``load_component``, ``command`` (command and parallel components as ``@pipeline`` nodes);
  :mod:`raypar.azureml.client`: ``MLClient``.
- :mod:`raypar.azureml.convert`: ``raypar convert``.

See docs/azureml-sdk.md.
"""

from . import dsl
from .client import MLClient
from .components import Component, command, load_component
from .dsl import PipelineJob, pipeline
from .v1 import ParallelRunConfig, ParallelRunStep
from .v1_data import Dataset, DatasetConsumptionConfig, OutputFileDatasetConfig, PipelineData, PipelineParameter
from .v1_paths import DataPath, Datastore
from .v2 import (AssetTypes, BatchRetrySettings, Environment, Input, InputOutputModes, JobResourceConfiguration,
                 Output, ParallelJob, RetrySettings, RunFunction, parallel_run_function)

__all__ = ["AssetTypes", "BatchRetrySettings", "Component", "DataPath", "Dataset", "DatasetConsumptionConfig",
           "Datastore", "Environment", "Input", "InputOutputModes", "JobResourceConfiguration", "MLClient", "Output",
           "OutputFileDatasetConfig", "ParallelJob", "ParallelRunConfig", "ParallelRunStep", "PipelineData",
           "PipelineJob", "PipelineParameter", "RetrySettings", "RunFunction", "command", "dsl", "load_component",
           "parallel_run_function", "pipeline"]
