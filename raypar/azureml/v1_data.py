"""Stand-ins for the Azure ML SDK v1 objects a ``ParallelRunStep`` is given.

azureml-core's datasets, pipeline data and pipeline parameters live in a
workspace. These keep only what a raypar job uses: a path (local or a URL), a
name, a mode and, for tabular datasets, the file format. Local paths become
absolute when the object is made, against the working directory of that moment.
"""

from __future__ import annotations

import copy
import os
from typing import Any, Optional

from .v2 import AssetTypes, Input, Output, absolute, is_url


class PipelineParameter:
    """A pipeline parameter: raypar uses its ``default_value``."""

    def __init__(self, name: str, default_value: Any):
        self.name = name
        self.default_value = default_value

    def __repr__(self) -> str:
        return f"PipelineParameter(name={self.name!r}, default_value={self.default_value!r})"


def value_of(item):
    """A setting's value: a PipelineParameter's default, anything else as it is."""
    return item.default_value if isinstance(item, PipelineParameter) else item


def _one_path(path) -> str:
    if isinstance(path, list) and len(path) == 1:
        path = path[0]
    if isinstance(path, tuple):
        raise ValueError(f"dataset path {path!r}: a (datastore, path) pair needs an Azure ML workspace; "
                         f"give a local path or a URL (az://container/path)")
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"dataset path {path!r}: raypar reads one folder, file or URL per dataset")
    return absolute(path)


class DatasetInput:
    """A v1 dataset used as a step input: ``Dataset.File.from_files(path)`` or ``Dataset.Tabular.*``."""

    def __init__(self, path, table_format: Optional[str] = None, name: Optional[str] = None,
                 mode: Optional[str] = None, type: Optional[str] = None):
        self.path = _one_path(path)
        self.table_format = table_format  # raypar.input_format of a tabular dataset
        self.name = name
        self.mode = mode
        self.type = type

    def _with(self, **changes) -> "DatasetInput":
        other = copy.copy(self)
        vars(other).update(changes)
        return other

    def as_named_input(self, name: str) -> "DatasetInput":
        return self._with(name=name)

    def as_mount(self, path_on_compute: Optional[str] = None) -> "DatasetInput":
        return self._with(mode="ro_mount")

    def as_download(self, path_on_compute: Optional[str] = None) -> "DatasetInput":
        return self._with(mode="download")

    def as_direct(self) -> "DatasetInput":
        return self._with(mode="direct")

    def to_input(self) -> Input:
        kind = self.type
        if kind is None:
            local_file = not is_url(self.path) and os.path.isfile(self.path)
            kind = AssetTypes.URI_FILE if local_file else AssetTypes.URI_FOLDER
        return Input(type=kind, path=self.path, mode=self.mode)

    def __repr__(self) -> str:
        return f"DatasetInput(path={self.path!r}, name={self.name!r})"


class _FileDatasetFactory:
    @staticmethod
    def from_files(path, validate: bool = True, partition_format: Optional[str] = None) -> DatasetInput:
        """Every file below ``path`` (a folder, a file or a URL); ``run()`` gets lists of paths."""
        return DatasetInput(path)


class _TabularDatasetFactory:
    @staticmethod
    def from_delimited_files(path, validate: bool = True, header: Any = True) -> DatasetInput:
        """CSV files; ``run()`` gets DataFrames of about ``mini_batch_size`` bytes."""
        return DatasetInput(path, table_format="csv")

    @staticmethod
    def from_parquet_files(path, validate: bool = True) -> DatasetInput:
        return DatasetInput(path, table_format="parquet")

    @staticmethod
    def from_json_lines_files(path, validate: bool = True) -> DatasetInput:
        return DatasetInput(path, table_format="json_lines")


class Dataset:
    """``Dataset.File.from_files(path)`` and ``Dataset.Tabular.from_delimited_files(path)`` (also
    ``from_parquet_files``, ``from_json_lines_files``)."""

    File = _FileDatasetFactory
    Tabular = _TabularDatasetFactory


class OutputFileDatasetConfig:
    """A step output folder: ``destination`` is its path (None: raypar puts it under the job dir)."""

    def __init__(self, name: Optional[str] = None, destination=None, source: Optional[str] = None,
                 partition_format: Optional[str] = None):
        self.name = name
        self.path = None if destination is None else _one_path(destination)

    def to_output(self) -> Output:
        return Output(type=AssetTypes.URI_FOLDER, path=self.path)


class PipelineData(OutputFileDatasetConfig):
    """A step output folder under the job dir (v1 puts it on the default datastore)."""

    def __init__(self, name: str, datastore: Any = None, output_name: Optional[str] = None,
                 output_mode: str = "mount", is_directory: Optional[bool] = None):
        super().__init__(name=name)
