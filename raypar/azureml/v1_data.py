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

from raypar.azureml import v1_paths
from raypar.azureml.v1_partition import partition_by, read_dataset
from raypar.azureml.v2 import AssetTypes, Input, Output, is_url
from raypar.errors import SpecError
from raypar.inputs.mltable import PartitionFormat


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
    """One folder, file or URL (an output's destination)."""
    paths = v1_paths.resolve(path)
    if len(paths) != 1 or v1_paths.is_glob(paths[0]):
        raise ValueError(f"path {path!r}: an output is one folder or URL, not a list or a glob")
    return paths[0]


# Azure's v1 ``header`` values (True / False or PromoteHeadersBehavior's names) as MLTable's.
_HEADERS = {True: "all_files_same_headers", False: "no_header", "all_files_have_same_headers": "all_files_same_headers",
            "no_headers": "no_header", "only_first_file_has_headers": "from_first_file",
            "combine_all_files_headers": "all_files_different_headers"}
_READ_STEPS = {"csv": "read_delimited", "parquet": "read_parquet", "json_lines": "read_json_lines"}
# Azure's v1 consumption modes as raypar's: "direct" is Azure's default and gives a script local
# paths too (ParallelRunStep mounts file datasets itself), so it stays raypar's default.
_MODES = {"direct": None, "mount": "ro_mount", "download": "download"}


class DatasetInput:
    """A v1 dataset: ``Dataset.File.from_files(...)`` or ``Dataset.Tabular.from_*_files(...)``.

    One folder, file or URL is a ``uri_folder`` / ``uri_file`` input (a tabular one
    read with ``raypar.input_format``). Globs, several paths, a ``partition_format`` or
    read options that differ from the defaults make it an MLTable (see
    :mod:`raypar.azureml.v1_paths`), whose partition columns come after the data's
    columns, as in Azure.
    """

    def __init__(self, path, table_format: Optional[str] = None, name: Optional[str] = None,
                 mode: Optional[str] = None, type: Optional[str] = None, *,
                 partition_format: Optional[str] = None, read_options: Optional[dict] = None):
        self.paths = v1_paths.resolve(path)
        self.table_format = table_format  # csv, parquet, json_lines: a tabular dataset
        self.partition_format = partition_format
        self.read_options = dict(read_options or {})  # MLTable read_* options that differ from the defaults
        self.name = name
        self.mode = mode
        self.type = type
        if partition_format is not None:

            try:
                PartitionFormat(partition_format)
            except SpecError as exc:
                raise ValueError(exc.headline) from None

    @property
    def path(self) -> Optional[str]:
        """The one folder, file or URL (None for several paths)."""
        return self.paths[0] if len(self.paths) == 1 else None

    @property
    def partition_keys(self) -> list[str]:
        """The columns ``partition_format`` names (Azure's ``dataset.partition_keys``)."""
        if self.partition_format is None:
            return []

        return list(PartitionFormat(self.partition_format).columns)

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

    def register(self, workspace=None, name: Optional[str] = None, description=None, tags=None,
                 create_new_version: bool = False) -> "DatasetInput":
        """Accepted and ignored (there is no workspace): the same dataset."""
        return self

    def partition_by(self, partition_keys: list, target, name: Optional[str] = None, show_progress: bool = True,
                     partition_as_file_dataset: bool = False) -> "DatasetInput":
        """The data copied to ``target`` in one folder per key combination, as Azure does.

        Returns a tabular dataset whose ``partition_keys`` are these keys (their columns come last).
        """

        return partition_by(self, partition_keys, target)

    def to_pandas_dataframe(self):
        """The whole tabular dataset as a DataFrame, read as a job's workers read it."""

        return read_dataset(self).to_pandas()

    @property
    def is_mltable(self) -> bool:
        return (len(self.paths) > 1 or any(v1_paths.is_glob(p) for p in self.paths)
                or self.partition_format is not None or bool(self.read_options))

    def mltable(self) -> dict:
        """The MLTable document this dataset is."""
        steps: list = []
        if self.table_format is not None:
            steps.append({_READ_STEPS[self.table_format]: dict(self.read_options)})
        if self.partition_format is not None:
            steps.append({"extract_columns_from_partition_format": {"partition_format": self.partition_format}})
        doc = {"type": "mltable", "paths": [v1_paths.path_entry(p) for p in self.paths]}
        if steps:
            doc["transformations"] = steps
        return doc

    def to_input(self) -> Input:
        if self.is_mltable:
            return Input(type=AssetTypes.MLTABLE, path=v1_paths.write_mltable(self.mltable()), mode=self.mode)
        kind = self.type
        if kind is None:
            local_file = not is_url(self.path) and os.path.isfile(self.path)
            kind = AssetTypes.URI_FILE if local_file else AssetTypes.URI_FOLDER
        return Input(type=kind, path=self.path, mode=self.mode)

    def __repr__(self) -> str:
        return f"DatasetInput(paths={self.paths!r}, name={self.name!r})"


class DatasetConsumptionConfig(DatasetInput):
    """``azureml.data.dataset_consumption_config.DatasetConsumptionConfig``: a dataset named for a step.

    ``mode`` ``"direct"`` (Azure's default) and ``"mount"`` give the script local paths,
    ``"download"`` local copies; ``path_on_compute`` is accepted and not used.
    """

    def __init__(self, name: str, dataset: DatasetInput, mode: str = "direct", path_on_compute=None):
        if not isinstance(dataset, DatasetInput):
            raise ValueError(f"DatasetConsumptionConfig({name!r}): dataset must be a Dataset, "
                             f"not {type(dataset).__name__}")
        if mode not in _MODES:
            raise ValueError(f"DatasetConsumptionConfig({name!r}): mode {mode!r} is not one of "
                             f"{', '.join(_MODES)}")
        vars(self).update(vars(dataset))
        self.name = name
        self.mode = _MODES[mode] if mode != "direct" else dataset.mode


def _read_options(**given) -> dict:
    """MLTable read options from v1 arguments: only those that differ from Azure's defaults."""
    defaults = {"include_path_column": False, "delimiter": ",", "header": "all_files_same_headers",
                "support_multi_line": False, "empty_as_string": False, "encoding": "utf8", "infer_column_types": True,
                "invalid_lines": "error"}
    return {k: v for k, v in given.items() if v != defaults[k]}


def _refuse_column_types(set_column_types) -> None:
    if set_column_types:
        raise ValueError("set_column_types is not applied by raypar: convert the column types in run()")


class _FileDatasetFactory:
    @staticmethod
    def from_files(path, validate: bool = True, partition_format: Optional[str] = None,
                   is_file: bool = False) -> DatasetInput:
        """Files (folders, files, URLs, globs, ``(datastore, path)`` pairs); ``run()`` gets lists of paths.

        ``partition_format`` names path parts as keys, for ``ParallelRunConfig(partition_keys=...)``.
        """
        return DatasetInput(path, partition_format=partition_format)


def _header(header) -> str:
    key = getattr(header, "name", header)  # a PromoteHeadersBehavior member
    key = key.lower() if isinstance(key, str) else key
    if key in _HEADERS:
        return _HEADERS[key]
    if key in _HEADERS.values():
        return key
    raise ValueError(f"header {header!r}: give True, False or a PromoteHeadersBehavior")


class _TabularDatasetFactory:
    @staticmethod
    def from_delimited_files(path, validate: bool = True, include_path: bool = False, infer_column_types: bool = True,
                             set_column_types=None, separator: str = ",", header: Any = True,
                             partition_format: Optional[str] = None, support_multi_line: bool = False,
                             empty_as_string: bool = False, encoding: str = "utf8") -> DatasetInput:
        """CSV files; ``run()`` gets DataFrames of about ``mini_batch_size`` bytes."""
        _refuse_column_types(set_column_types)
        options = _read_options(include_path_column=include_path, infer_column_types=infer_column_types,
                                delimiter=separator, header=_header(header), support_multi_line=support_multi_line,
                                empty_as_string=empty_as_string, encoding=encoding)
        return DatasetInput(path, table_format="csv", partition_format=partition_format, read_options=options)

    @staticmethod
    def from_parquet_files(path, validate: bool = True, include_path: bool = False, set_column_types=None,
                           partition_format: Optional[str] = None) -> DatasetInput:
        _refuse_column_types(set_column_types)
        options = _read_options(include_path_column=include_path)
        return DatasetInput(path, table_format="parquet", partition_format=partition_format, read_options=options)

    @staticmethod
    def from_json_lines_files(path, validate: bool = True, include_path: bool = False, set_column_types=None,
                              partition_format: Optional[str] = None, invalid_lines: str = "error",
                              encoding: str = "utf8") -> DatasetInput:
        _refuse_column_types(set_column_types)
        options = _read_options(include_path_column=include_path, invalid_lines=invalid_lines, encoding=encoding)
        return DatasetInput(path, table_format="json_lines", partition_format=partition_format, read_options=options)


class Dataset:
    """``Dataset.File.from_files(path)`` and ``Dataset.Tabular.from_delimited_files(path)`` (also
    ``from_parquet_files``, ``from_json_lines_files``), with azureml-core's parameters."""

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
