"""Azure ML ``MLTable`` data assets: the ``MLTable`` YAML file parsed into a plain description.

An MLTable is a folder holding a YAML file named ``MLTable``: ``paths`` (each a ``file``,
``folder`` or glob ``pattern``) and ``transformations`` (at most one ``read_*`` step plus
column steps). Key names, allowed values and defaults follow Azure's own sources: the
"CLI (v2) MLtable YAML schema" reference page, the JSON schema shipped in the ``mltable``
package (``mltable/schema/MLTable.json``), the defaults of ``mltable.from_delimited_files``,
``from_parquet_files`` and ``from_json_lines_files``, the docstring of
``MLTable.extract_columns_from_partition_format``, and ``mltable._utils._make_all_paths_absolute``
(relative paths are relative to the MLTable's folder; URLs are kept as given).

Top-level ``$schema``, ``type`` (must be ``mltable``), ``metadata`` and ``traits`` are accepted
and ignored; any other key is an error, as in Azure's schema. A transformation is a one-key
mapping or, as the schema also allows, a bare name (``- read_parquet``) meaning "defaults".
Azure steps raypar cannot honour (``take``, ``filter``, ``convert_column_types``,
``read_delta_lake``, ...) are errors, never silently skipped.

Pure: yaml, stdlib and fsspec only (this also runs on workers, where pydantic is not imported).
"""

from __future__ import annotations

import datetime as _dt
import os
import posixpath
import re
from dataclasses import dataclass, field
from typing import Optional

from fsspec.implementations.local import LocalFileSystem

from raypar import yamlfile
from raypar.errors import SpecError
from raypar.storage import is_url

PATH_KINDS = ("file", "folder", "pattern")
HEADERS = ("no_header", "from_first_file", "all_files_different_headers", "all_files_same_headers")
ENCODINGS = ("utf8", "iso88591", "latin1", "ascii", "utf16", "utf32", "utf8bom", "windows1252")
# Other spellings Azure's JSON schema accepts, normalized to the documented names.
_ENCODING_ALIASES = {"utf-8": "utf8", "utf8 bom": "utf8bom", "iso-8859-1": "iso88591",
                     "latin-1": "latin1", "utf-16": "utf16", "windows-1252": "windows1252"}
PYTHON_CODECS = {"utf8": "utf-8", "iso88591": "iso-8859-1", "latin1": "latin-1", "ascii": "ascii",
                 "utf16": "utf-16", "utf32": "utf-32", "utf8bom": "utf-8-sig", "windows1252": "cp1252"}

# Azure's defaults per read step ("Path" is the column name Azure's docs show for include_path_column).
_READ_DEFAULTS = {
    "read_delimited": {"delimiter": ",", "header": "all_files_same_headers", "encoding": "utf8",
                       "empty_as_string": False, "include_path_column": False, "path_column": "Path",
                       "support_multi_line": False, "infer_column_types": True, "partition_size": None},
    "read_parquet": {"include_path_column": False, "path_column": "Path"},
    "read_json_lines": {"encoding": "utf8", "invalid_lines": "error", "include_path_column": False,
                        "path_column": "Path", "partition_size": None},
}
_READ_FORMATS = {"read_delimited": "delimited", "read_parquet": "parquet", "read_json_lines": "json_lines"}
SUPPORTED = (*_READ_DEFAULTS, "extract_columns_from_partition_format", "keep_columns", "drop_columns")
_AZURE_ONLY = ("read_delta_lake", "take", "take_random_sample", "skip", "filter", "convert_column_types",
               "select_partitions", "sample")
_TOP_LEVEL = ("$schema", "type", "metadata", "traits", "paths", "transformations")


@dataclass(frozen=True)
class PathEntry:
    """One ``paths`` entry: ``kind`` is file, folder or pattern; ``value`` is resolved."""

    kind: str
    value: str


@dataclass(frozen=True)
class MLTableDef:
    """What an MLTable says: where the data is, how to read it, which columns to add or keep."""

    source: str
    paths: tuple[PathEntry, ...]
    read_format: Optional[str]
    read_options: dict = field(hash=False)
    partition_format: Optional[str]
    keep_columns: Optional[tuple[str, ...]] = None
    drop_columns: Optional[tuple[str, ...]] = None


_CHOICES = {"header": HEADERS, "encoding": ENCODINGS, "invalid_lines": ("error", "drop")}
_IS_BOOL = (lambda v: isinstance(v, bool), "true or false")
_KINDS = {  # option: (is the value valid, what Azure's schema expects)
    # Azure allows 2 characters; raypar's CSV reader (pyarrow) takes one.
    "delimiter": (lambda v: isinstance(v, str) and len(v) == 1, "one character (raypar does not read 2)"),
    "empty_as_string": _IS_BOOL, "include_path_column": _IS_BOOL, "support_multi_line": _IS_BOOL,
    # {sample_size, column_type_overrides} is not applied by raypar: refused, never silently skipped.
    "infer_column_types": (lambda v: isinstance(v, bool), "true or false (raypar does not apply "
                           "sample_size or column_type_overrides: convert types in run())"),
    "path_column": (lambda v: isinstance(v, str) and v != "", "a column name"),
    "partition_size": (lambda v: type(v) is int and v > 0, "a positive integer"),
}


def _option(step: str, name: str, value, source: str):
    where = f"{source}: {step}.{name}"
    if name in _CHOICES:
        key = value.lower() if isinstance(value, str) else value  # Azure parses these case-insensitively
        key = _ENCODING_ALIASES.get(key, key)
        if key not in _CHOICES[name]:
            raise SpecError(f"{where}: {value!r} is not supported (Azure allows: {', '.join(_CHOICES[name])})")
        return key
    valid, expected = _KINDS[name]
    if not valid(value):
        raise SpecError(f"{where}: expected {expected}, got {value!r}")
    return value


def _read_options(step: str, arg, source: str) -> dict:
    options = dict(_READ_DEFAULTS[step])
    if arg is None:
        return options
    if not isinstance(arg, dict):
        raise SpecError(f"{source}: {step}: expected a mapping of options, got {arg!r}")
    for name, value in arg.items():
        if name not in options:
            raise SpecError(f"{source}: {step}: unknown option {name!r} (Azure's options: {', '.join(options)})")
        options[name] = _option(step, name, value, source)
    return options


def _partition_format(arg, source: str) -> str:
    where = f"{source}: extract_columns_from_partition_format"
    if isinstance(arg, dict) and set(arg) == {"partition_format"}:  # what mltable's save() writes
        arg = arg["partition_format"]
    elif isinstance(arg, dict) and len(arg) == 1 and None in arg.values():
        # Azure's docs write `extract_columns_from_partition_format: {timestamp:yyyy/MM/dd}` unquoted,
        # which YAML reads as the mapping {"timestamp:yyyy/MM/dd": None}: put the braces back.
        arg = "{" + str(next(iter(arg))) + "}"
    if not isinstance(arg, str):
        raise SpecError(f"{where}: expected a format string such as '{{year}}/{{month}}/', got {arg!r}")
    try:
        PartitionFormat(arg)
    except SpecError as exc:
        raise SpecError(f"{where}: {exc.headline}") from None
    return arg


def _columns(step: str, arg, source: str) -> tuple[str, ...]:
    if isinstance(arg, dict):
        raise SpecError(f"{source}: {step}: column patterns are not supported by raypar; list the column names")
    names = [arg] if isinstance(arg, str) else arg
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise SpecError(f"{source}: {step}: expected a column name or a list of column names, got {arg!r}")
    if len(set(names)) != len(names):
        raise SpecError(f"{source}: {step}: a column is listed twice in {names}")
    if step == "keep_columns" and not names:
        raise SpecError(f"{source}: keep_columns: an empty list would keep no column")
    return tuple(names)


def _resolve(value: str, base: str) -> str:
    """``value`` as an absolute local path or URL; relative paths hang off ``base``."""
    if is_url(value):
        return value
    if value.startswith("/"):
        return posixpath.normpath(value)
    if is_url(base):
        scheme, rest = base.split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(rest, value))}"
    return posixpath.normpath(posixpath.join(base, value))


def _paths(raw, base: str, source: str) -> tuple[PathEntry, ...]:
    if not isinstance(raw, list) or not raw:
        problem = "is missing" if raw is None else f"must be a non-empty list, got {raw!r}"
        raise SpecError(f"{source}: 'paths' {problem}: list at least one file, folder or pattern")
    entries = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict) or len(entry) != 1:
            raise SpecError(f"{source}: paths[{i}]: expected one 'file:', 'folder:' or 'pattern:' key, got {entry!r}")
        (kind, value), = entry.items()
        if kind not in PATH_KINDS:
            raise SpecError(f"{source}: paths[{i}]: unknown path kind {kind!r} (expected file, folder or pattern)")
        if not isinstance(value, str) or not value.strip():
            raise SpecError(f"{source}: paths[{i}].{kind}: expected a path, got {value!r}")
        entries.append(PathEntry(kind, _resolve(value.strip(), base)))
    return tuple(entries)


def parse_mltable(text: str, base: str, source: str) -> MLTableDef:
    """Parse the text of an ``MLTable`` file.

    Args:
        text: The YAML text.
        base: The folder relative paths are relative to (a local absolute path or a URL).
        source: Where the text came from; every error message starts with it.

    Returns:
        The parsed, normalized MLTableDef.

    Raises:
        SpecError: One line naming ``source`` and the problem.
    """
    doc = yamlfile.parse(text, source)
    if not isinstance(doc, dict):
        raise SpecError(f"{source}: expected a YAML mapping with 'paths', got {type(doc).__name__}")
    for key in doc:
        if key not in _TOP_LEVEL:
            raise SpecError(f"{source}: unknown key {key!r} (an MLTable has: {', '.join(_TOP_LEVEL)})")
    if doc.get("type", "mltable") != "mltable":
        raise SpecError(f"{source}: type must be 'mltable', got {doc['type']!r}")
    paths = _paths(doc.get("paths"), base, source)
    steps = doc.get("transformations") or []
    if not isinstance(steps, list):
        raise SpecError(f"{source}: 'transformations' must be a list, got {type(steps).__name__}")
    read_step, found = None, {}
    for i, step in enumerate(steps):
        if isinstance(step, str):
            name, arg = step, None
        elif isinstance(step, dict) and len(step) == 1:
            (name, arg), = step.items()
        else:
            raise SpecError(f"{source}: transformations[{i}]: expected a name or a one-key mapping, got {step!r}")
        if name in _READ_DEFAULTS and read_step:
            raise SpecError(f"{source}: two read steps ({read_step} and {name}); an MLTable reads one format")
        if name in found:
            raise SpecError(f"{source}: transformation {name!r} appears twice; raypar applies each step once")
        if name in _READ_DEFAULTS:
            read_step, found[name] = name, _read_options(name, arg, source)
        elif name == "extract_columns_from_partition_format":
            found[name] = _partition_format(arg, source)
        elif name in ("keep_columns", "drop_columns"):
            found[name] = _columns(name, arg, source)
        else:
            problem = "is not supported by raypar" if name in _AZURE_ONLY else "is unknown"
            raise SpecError(f"{source}: transformation {name!r} {problem} (supported: {', '.join(SUPPORTED)})")
    return MLTableDef(
        source=source, paths=paths, read_format=_READ_FORMATS.get(read_step),
        read_options=found.get(read_step, {}), partition_format=found.get("extract_columns_from_partition_format"),
        keep_columns=found.get("keep_columns"), drop_columns=found.get("drop_columns"),
    )


def load_mltable(folder: str, fs) -> MLTableDef:
    """Read and parse ``<folder>/MLTable`` through an fsspec filesystem.

    Args:
        folder: The fs-internal path of the MLTable's folder ('/data/x' locally, 'container/x'
            for adlfs), or of the ``MLTable`` file itself. A remote store also takes a URL in one
            of ``fs``'s protocols, whose spelling the resolved paths then keep.
        fs: The fsspec filesystem holding it.

    Returns:
        The parsed MLTableDef; relative paths become absolute local paths (local fs) or URLs.

    Raises:
        SpecError: The file is absent, not UTF-8 or not a valid MLTable.
    """
    local = isinstance(fs, LocalFileSystem)
    path = os.path.abspath(folder) if local else (folder.rstrip("/") or "/")
    if posixpath.basename(path) != "MLTable" or not fs.isfile(path):
        path = posixpath.join(path, "MLTable")
    where = path if local else fs.unstrip_protocol(path)
    try:
        data = fs.cat_file(path)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise SpecError(f"{where}: not found (an mltable input is a folder holding a file named MLTable)") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SpecError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    parent = posixpath.dirname(path)
    return parse_mltable(text, parent if local else fs.unstrip_protocol(parent), where)


_FIELD = re.compile(r"\{([^{}]*)\}|(\*\*)|(\*)|([{}])")
_DATE_PARTS = {"yyyy": ("year", r"(\d{4})"), "MM": ("month", r"(\d{2})"), "dd": ("day", r"(\d{2})"),
               "HH": ("hour", r"(\d{2})"), "mm": ("minute", r"(\d{2})"), "ss": ("second", r"(\d{2})")}
_DATE_TOKEN = re.compile(r"([A-Za-z])\1*|[^A-Za-z]+")  # runs of one letter (yyyy, MM, ...) or separators


class PartitionFormat:
    """A compiled ``extract_columns_from_partition_format`` string.

    ``{col}`` captures text within one folder name as a string; ``{col:yyyy/MM/dd}`` (Azure's
    .NET-style parts yyyy, MM, dd, HH, mm, ss; yyyy required) captures a ``datetime``; ``*``
    matches within one name and ``**`` across folders. As in Azure's examples ('/{Country}/...'
    against '../USA/2019/...'), the format may start at any folder boundary (the first that
    fits) and may stop at one, leaving the rest of the path (the file name) unmatched.
    """

    def __init__(self, fmt: str):
        self.format = fmt
        self._groups: list[tuple[str, Optional[str]]] = []  # (column, date part or None) per regex group
        columns, pattern, body, pos = [], [], fmt.lstrip("/"), 0
        for m in _FIELD.finditer(body):
            pattern.append(re.escape(body[pos:m.start()]))
            pos = m.end()
            spec, globstar, star, stray = m.groups()
            if stray:
                raise SpecError(f"partition format {fmt!r}: unbalanced {stray!r}")
            if globstar or star:
                pattern.append(".*" if globstar else "[^/]*")
                continue
            name, _, date = (part.strip() for part in spec.partition(":"))
            if not name or name in columns:
                problem = f"column {name!r} appears twice" if name else "empty {}"
                raise SpecError(f"partition format {fmt!r}: {problem}")
            columns.append(name)
            pattern.append(self._date(fmt, name, date) if date else "([^/]+)")
            if not date:
                self._groups.append((name, None))
        pattern.append(re.escape(body[pos:]))
        if not columns:
            raise SpecError(f"partition format {fmt!r} names no {{column}}")
        self.columns = tuple(columns)
        tail = ".*" if body.endswith("/") else "(?:/.*)?"
        self._regex = re.compile("(?:.*?/)??" + "".join(pattern) + tail, re.DOTALL)

    def _date(self, fmt: str, name: str, date: str) -> str:
        out, parts = [], set()
        for token in (m.group() for m in _DATE_TOKEN.finditer(date)):
            if token in _DATE_PARTS:
                part, regex = _DATE_PARTS[token]
                parts.add(part)
                self._groups.append((name, part))
                out.append(regex)
            elif token[0].isalpha():
                raise SpecError(f"partition format {fmt!r}: {{{name}:{date}}} has {token!r}; "
                                f"datetime parts are yyyy, MM, dd, HH, mm, ss")
            else:
                out.append(re.escape(token))
        if "year" not in parts:
            raise SpecError(f"partition format {fmt!r}: {{{name}:{date}}} needs a yyyy part")
        return "".join(out)

    def extract(self, relative_path: str) -> Optional[dict[str, object]]:
        """Column values for one file path relative to the input root, or None if it does not match."""
        m = self._regex.fullmatch(relative_path.lstrip("/"))
        if m is None:
            return None
        values: dict[str, object] = {}
        dates: dict[str, dict[str, int]] = {}
        for (column, part), text in zip(self._groups, m.groups(), strict=True):
            if part is None:
                values[column] = text
            else:
                dates.setdefault(column, {"month": 1, "day": 1})[part] = int(text)
        for column, parts in dates.items():
            try:
                values[column] = _dt.datetime(**parts)
            except ValueError:  # 2019/13/01 is not a date: the path does not fit the format
                return None
        return {column: values[column] for column in self.columns}
