"""MLTable parsing (raypar.inputs.mltable): pure, no Ray."""

import datetime
import textwrap

import fsspec
import pytest

from raypar.errors import SpecError
from raypar.inputs.mltable import MLTableDef, PartitionFormat, PathEntry, load_mltable, parse_mltable

SRC = "/data/t/MLTable"
PATHS = "paths:\n  - file: ./a.csv\n"


def parse(text: str, base: str = "/data/t") -> MLTableDef:
    return parse_mltable(textwrap.dedent(text), base, SRC)


def with_steps(steps: str) -> MLTableDef:
    return parse(PATHS + "transformations:\n" + textwrap.indent(textwrap.dedent(steps), "  "))


def error(text: str, base: str = "/data/t") -> str:
    with pytest.raises(SpecError) as info:
        parse(text, base)
    message = info.value.headline
    assert "\n" not in message and message.startswith(SRC + ": ")
    return message


DELIMITED_DEFAULTS = {
    "delimiter": ",", "header": "all_files_same_headers", "encoding": "utf8", "empty_as_string": False,
    "include_path_column": False, "path_column": "Path", "support_multi_line": False,
    "infer_column_types": True, "partition_size": None,
}


# -- transformations ------------------------------------------------------


def test_no_transformations_is_a_list_of_files():
    table = parse(PATHS)
    assert table == MLTableDef(source=SRC, paths=(PathEntry("file", "/data/t/a.csv"),), read_format=None,
                               read_options={}, partition_format=None)
    assert parse(PATHS + "transformations:\n").read_format is None


@pytest.mark.parametrize("step", ["- read_delimited", "- read_delimited:", "- read_delimited: {}"])
def test_read_delimited_defaults(step):
    table = with_steps(step)
    assert table.read_format == "delimited"
    assert table.read_options == DELIMITED_DEFAULTS


def test_read_delimited_explicit_options():
    table = with_steps("""\
        - read_delimited:
            delimiter: ";"
            header: From_First_File
            encoding: utf-8
            empty_as_string: true
            include_path_column: true
            path_column: source
            support_multi_line: true
            infer_column_types: false
            partition_size: 1048576
        """)
    assert table.read_options == {
        "delimiter": ";", "header": "from_first_file", "encoding": "utf8", "empty_as_string": True,
        "include_path_column": True, "path_column": "source", "support_multi_line": True,
        "infer_column_types": False, "partition_size": 1048576,
    }


def test_read_delimited_infer_column_types_mapping_is_refused_not_ignored():
    # raypar does not apply sample_size / column_type_overrides: say so rather than skip them
    with pytest.raises(SpecError, match="infer_column_types: expected true or false .raypar does not apply"):
        with_steps("- read_delimited: {infer_column_types: {sample_size: 50}}")


@pytest.mark.parametrize("header", ["no_header", "from_first_file", "all_files_different_headers",
                                    "all_files_same_headers"])
def test_every_azure_header_value(header):
    assert with_steps(f"- read_delimited: {{header: {header}}}").read_options["header"] == header


@pytest.mark.parametrize("encoding", ["utf8", "iso88591", "latin1", "ascii", "utf16", "utf32", "utf8bom",
                                      "windows1252"])
def test_every_azure_encoding(encoding):
    assert with_steps(f"- read_json_lines: {{encoding: {encoding}}}").read_options["encoding"] == encoding


@pytest.mark.parametrize("alias, name", [("UTF-8", "utf8"), ("utf8 bom", "utf8bom"), ("iso-8859-1", "iso88591"),
                                         ("latin-1", "latin1"), ("utf-16", "utf16"), ("windows-1252", "windows1252")])
def test_encoding_spellings_from_azure_schema(alias, name):
    assert with_steps(f"- read_delimited: {{encoding: '{alias}'}}").read_options["encoding"] == name


def test_read_parquet_defaults_and_options():
    for step in ("- read_parquet", "- read_parquet:"):
        table = with_steps(step)
        assert (table.read_format, table.read_options) == (
            "parquet", {"include_path_column": False, "path_column": "Path"})
    table = with_steps("- read_parquet:\n    include_path_column: true")
    assert table.read_options == {"include_path_column": True, "path_column": "Path"}


def test_read_json_lines_defaults_and_options():
    table = with_steps("- read_json_lines")
    assert table.read_format == "json_lines"
    assert table.read_options == {"encoding": "utf8", "invalid_lines": "error", "include_path_column": False,
                                  "path_column": "Path", "partition_size": None}
    table = with_steps("""\
        - read_json_lines:
            encoding: ascii
            invalid_lines: drop
            include_path_column: true
        """)
    assert table.read_options == {"encoding": "ascii", "invalid_lines": "drop", "include_path_column": True,
                                  "path_column": "Path", "partition_size": None}


@pytest.mark.parametrize("step", [
    "- extract_columns_from_partition_format: '{Store}/{Date:yyyy/MM/dd}/'",
    "- extract_columns_from_partition_format:\n    partition_format: '{Store}/{Date:yyyy/MM/dd}/'",
])
def test_partition_format_string_or_mapping(step):
    assert with_steps(step).partition_format == "{Store}/{Date:yyyy/MM/dd}/"


def test_partition_format_written_unquoted_as_in_azure_docs():
    # YAML reads {timestamp:yyyy/MM/dd} as a one-key flow mapping; the braces come back.
    table = with_steps("- extract_columns_from_partition_format: {timestamp:yyyy/MM/dd}")
    assert table.partition_format == "{timestamp:yyyy/MM/dd}"


def test_keep_and_drop_columns():
    table = with_steps("""\
        - read_parquet
        - keep_columns: [a, b, c]
        - drop_columns: c
        """)
    assert table.keep_columns == ("a", "b", "c") and table.drop_columns == ("c",)
    assert with_steps("- drop_columns: []").drop_columns == ()
    assert with_steps("- read_parquet").keep_columns is None


def test_azure_allowed_top_level_keys_are_ignored():
    table = parse("""\
        $schema: https://azuremlschemas.azureedge.net/latest/MLTable.schema.json
        type: mltable
        metadata: {owner: me}
        traits: {index_columns: [id], timestamp_column: ts}
        paths:
          - folder: .
        transformations:
          - read_parquet:
              include_path_column: false
        """)
    assert table.paths == (PathEntry("folder", "/data/t"),)


# -- paths ----------------------------------------------------------------


@pytest.mark.parametrize("given, resolved", [
    ("./a.csv", "/data/t/a.csv"),
    ("a.csv", "/data/t/a.csv"),
    ("sub/dir/", "/data/t/sub/dir"),
    ("../other/b.csv", "/data/other/b.csv"),
    (".", "/data/t"),
    ("/abs/c.csv", "/abs/c.csv"),
    ("az://c/p/x.csv", "az://c/p/x.csv"),
    ("abfss://fs@acct.dfs.core.windows.net/p/", "abfss://fs@acct.dfs.core.windows.net/p/"),
    ("https://host/data/iris.csv", "https://host/data/iris.csv"),
    ("file:///tmp/x.csv", "file:///tmp/x.csv"),
])
def test_path_resolution_against_a_local_folder(given, resolved):
    assert parse(f"paths:\n  - file: '{given}'\n").paths == (PathEntry("file", resolved),)


@pytest.mark.parametrize("given, resolved", [
    ("./a.csv", "az://cont/tables/t/a.csv"),
    ("../shared/*.csv", "az://cont/tables/shared/*.csv"),
    ("/abs/c.csv", "/abs/c.csv"),
    ("https://host/x.csv", "https://host/x.csv"),
])
def test_path_resolution_against_a_url(given, resolved):
    table = parse(f"paths:\n  - pattern: '{given}'\n", base="az://cont/tables/t")
    assert table.paths == (PathEntry("pattern", resolved),)


def test_all_path_kinds_keep_their_order():
    table = parse("paths:\n  - file: a.csv\n  - folder: ./b\n  - pattern: 'c/**/*.csv'\n")
    assert table.paths == (PathEntry("file", "/data/t/a.csv"), PathEntry("folder", "/data/t/b"),
                           PathEntry("pattern", "/data/t/c/**/*.csv"))


# -- load_mltable ---------------------------------------------------------


MLTABLE = "paths:\n  - pattern: ./*.csv\ntransformations:\n  - read_delimited:\n      delimiter: '|'\n"


def test_load_from_a_local_folder_or_the_file_itself(tmp_path):
    (tmp_path / "MLTable").write_text(MLTABLE)
    fs = fsspec.filesystem("file")
    for target in (tmp_path, tmp_path / "MLTable"):
        table = load_mltable(str(target), fs)
        assert table.source == str(tmp_path / "MLTable")
        assert table.paths == (PathEntry("pattern", f"{tmp_path}/*.csv"),)
        assert table.read_options["delimiter"] == "|"


def test_load_through_memory_filesystem_gives_urls():
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/tables/t1/MLTable", b"\xef\xbb\xbf" + MLTABLE.encode())  # a BOM is fine
    try:
        table = load_mltable("/tables/t1/", fs)
    finally:
        fs.rm("/tables", recursive=True)
    assert table.source == "memory:///tables/t1/MLTable"
    assert table.paths == (PathEntry("pattern", "memory:///tables/t1/*.csv"),)


def test_load_given_a_url_keeps_its_spelling():
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/tables/t2/MLTable", MLTABLE.encode())
    try:
        table = load_mltable("memory://tables/t2", fs)
    finally:
        fs.rm("/tables", recursive=True)
    assert table.source == "memory://tables/t2/MLTable"
    assert table.paths == (PathEntry("pattern", "memory://tables/t2/*.csv"),)


def test_load_missing_mltable_names_the_file(tmp_path):
    fs = fsspec.filesystem("file")
    for target in (tmp_path, tmp_path / "nowhere"):
        with pytest.raises(SpecError, match=rf"^{target}/MLTable: not found"):
            load_mltable(str(target), fs)


def test_load_errors_name_the_file(tmp_path):
    (tmp_path / "MLTable").write_text("transformations: []\n")
    with pytest.raises(SpecError, match=rf"^{tmp_path}/MLTable: 'paths' is missing"):
        load_mltable(str(tmp_path), fsspec.filesystem("file"))
    (tmp_path / "MLTable").write_bytes(b"paths: \xff\n")
    with pytest.raises(SpecError, match=rf"^{tmp_path}/MLTable: not UTF-8 text"):
        load_mltable(str(tmp_path), fsspec.filesystem("file"))


# -- errors ---------------------------------------------------------------


def test_unsupported_transformation():
    message = error(PATHS + "transformations:\n  - take_random_sample: {probability: 0.1}\n")
    assert message == (f"{SRC}: transformation 'take_random_sample' is not supported by raypar (supported: "
                       "read_delimited, read_parquet, read_json_lines, extract_columns_from_partition_format, "
                       "keep_columns, drop_columns)")
    for name in ("read_delta_lake", "convert_column_types", "filter", "take", "skip"):
        assert f"'{name}' is not supported by raypar" in error(PATHS + f"transformations:\n  - {name}: 1\n")
    assert "'frobnicate' is unknown" in error(PATHS + "transformations:\n  - frobnicate\n")


@pytest.mark.parametrize("text, expected", [
    ("transformations: []\n", "'paths' is missing"),
    ("paths: []\n", "'paths' must be a non-empty list"),
    ("paths:\n  - url: http://x\n", "paths[0]: unknown path kind 'url'"),
    ("paths:\n  - file: a\n    folder: b\n", "paths[0]: expected one 'file:', 'folder:' or 'pattern:' key"),
    ("paths:\n  - file: ''\n", "paths[0].file: expected a path"),
    ("paths:\n  - folder: [a]\n", "paths[0].folder: expected a path"),
    ("- a\n- b\n", "expected a YAML mapping with 'paths', got list"),
    (PATHS + "colour: blue\n", "unknown key 'colour'"),
    (PATHS + "type: uri_folder\n", "type must be 'mltable', got 'uri_folder'"),
    (PATHS + "transformations: read_parquet\n", "'transformations' must be a list"),
    (PATHS + "transformations:\n  - {read_parquet: {}, keep_columns: [a]}\n", "transformations[0]: expected a name"),
])
def test_structure_errors(text, expected):
    assert expected in error(text)


def test_bad_yaml_names_the_line():
    message = error("paths:\n  - file: a.csv\n  - file: [unclosed\n")
    assert "not valid YAML at line 4" in message
    assert "line 2" in error("paths:\n\t- file: a.csv\n")


@pytest.mark.parametrize("step, expected", [
    ("- read_delimited: {separator: ','}", "read_delimited: unknown option 'separator' (Azure's options: delimiter,"),
    ("- read_parquet: {invalid_lines: drop}", "read_parquet: unknown option 'invalid_lines'"),
    ("- read_json_lines: {header: no_header}", "read_json_lines: unknown option 'header'"),
    ("- read_delimited: {header: true}", "read_delimited.header: True is not supported (Azure allows: no_header,"),
    ("- read_delimited: {header: first_row}", "read_delimited.header: 'first_row' is not supported"),
    ("- read_delimited: {encoding: utf-7}",
     ("read_delimited.encoding: 'utf-7' is not supported (Azure allows: utf8, iso88591, latin1, ascii, utf16, "
      "utf32, utf8bom, windows1252)")),
    ("- read_json_lines: {encoding: cp1251}", "read_json_lines.encoding: 'cp1251' is not supported"),
    ("- read_json_lines: {invalid_lines: skip}", "read_json_lines.invalid_lines: 'skip' is not supported"),
    ("- read_delimited: {delimiter: ''}", "read_delimited.delimiter: expected one character"),
    ("- read_delimited: {include_path_column: 'maybe'}", "read_delimited.include_path_column: expected true or false"),
    ("- read_delimited: {infer_column_types: {guess: 1}}", "read_delimited.infer_column_types: expected true or false"),
    ("- read_delimited: {partition_size: -1}", "read_delimited.partition_size: expected a positive integer"),
    ("- read_delimited: [a]", "read_delimited: expected a mapping of options"),
    ("- read_delimited\n- read_parquet", "two read steps (read_delimited and read_parquet)"),
    ("- read_parquet\n- read_parquet", "two read steps (read_parquet and read_parquet)"),
    ("- keep_columns: [a]\n- keep_columns: [b]", "transformation 'keep_columns' appears twice"),
    ("- keep_columns: {pattern: 'a.*'}", "keep_columns: column patterns are not supported by raypar"),
    ("- drop_columns: [a, 1]", "drop_columns: expected a column name or a list of column names"),
    ("- drop_columns", "drop_columns: expected a column name or a list of column names"),
    ("- keep_columns: [a, a]", "keep_columns: a column is listed twice"),
    ("- keep_columns: []", "keep_columns: an empty list would keep no column"),
    ("- extract_columns_from_partition_format: 'data/*.csv'",
     "extract_columns_from_partition_format: partition format 'data/*.csv' names no {column}"),
    ("- extract_columns_from_partition_format", "extract_columns_from_partition_format: expected a format string"),
    ("- extract_columns_from_partition_format: '{d:yyyy/MMM}'", "'MMM'; datetime parts are yyyy, MM, dd, HH, mm, ss"),
    ("- extract_columns_from_partition_format\n- extract_columns_from_partition_format: '{a}'",
     "extract_columns_from_partition_format: expected a format string"),
    ("- extract_columns_from_partition_format: '{a}/'\n- extract_columns_from_partition_format: '{b}/'",
     "'extract_columns_from_partition_format' appears twice"),
])
def test_transformation_errors(step, expected):
    assert expected in error(PATHS + "transformations:\n" + textwrap.indent(step, "  ") + "\n")


# -- PartitionFormat ------------------------------------------------------


def test_plain_columns():
    fmt = PartitionFormat("{account}/{container}/{label}")
    assert fmt.columns == ("account", "container", "label")
    assert fmt.extract("acct/data/cat/0.jpg") == {"account": "acct", "container": "data", "label": "cat"}
    assert fmt.extract("acct/data/cat") == {"account": "acct", "container": "data", "label": "cat"}


def test_columns_inside_folder_names():
    fmt = PartitionFormat("/puYear={year}/puMonth={month}")
    assert fmt.extract("puYear=2015/puMonth=1/part-0.parquet") == {"year": "2015", "month": "1"}
    # As in Azure's '../USA/2019/...' example, the format may start below the root.
    assert fmt.extract("green/puYear=2015/puMonth=12/x.parquet") == {"year": "2015", "month": "12"}


def test_datetime_parts():
    fmt = PartitionFormat("{Store}/{Brand}/{PartitionDate:yyyy/MM/dd}/*.csv")
    assert fmt.columns == ("Store", "Brand", "PartitionDate")
    assert fmt.extract("s1/acme/2019/01/05/sales.csv") == {
        "Store": "s1", "Brand": "acme", "PartitionDate": datetime.datetime(2019, 1, 5)}
    full = PartitionFormat("{t:yyyy/MM/dd/HH/mm/ss}/")
    assert full.extract("2020/02/29/23/59/58/f.json") == {"t": datetime.datetime(2020, 2, 29, 23, 59, 58)}
    assert PartitionFormat("{t:yyyy-MM}/").extract("2021-07/x") == {"t": datetime.datetime(2021, 7, 1)}


def test_leading_slash_and_trailing_folder():
    fmt = PartitionFormat("/{country}/{year}/")
    assert fmt.extract("USA/2019/data.csv") == {"country": "USA", "year": "2019"}
    assert fmt.extract("/USA/2019/deeper/data.csv") == {"country": "USA", "year": "2019"}
    assert PartitionFormat("{country}/{year}/").extract("USA/2019/data.csv") == {"country": "USA", "year": "2019"}


def test_wildcard_tail():
    fmt = PartitionFormat("{Country}/{D:yyyy/MM/dd}/data*.csv")
    assert fmt.extract("USA/2019/01/01/data-1.csv") == {"Country": "USA", "D": datetime.datetime(2019, 1, 1)}
    assert fmt.extract("USA/2019/01/01/other.csv") is None
    assert PartitionFormat("{c}/**/*.csv").extract("x/a/b/c.csv") == {"c": "x"}


@pytest.mark.parametrize("fmt, path", [
    ("{country}/{year}/", "data.csv"),                        # no folders at all
    ("{a}/{d:yyyy/MM/dd}/", "x/2019/1/5/f.csv"),              # MM and dd take two digits
    ("{a}/{d:yyyy/MM/dd}/", "x/2019/13/01/f.csv"),            # not a date
    ("{d:yyyy}/*.csv", "2019/f.parquet"),                     # file pattern does not fit
    ("/puYear={year}/", "puMonth=1/f.parquet"),
])
def test_non_matching_paths(fmt, path):
    assert PartitionFormat(fmt).extract(path) is None


@pytest.mark.parametrize("fmt, expected", [
    ("data/*.csv", "names no {column}"),
    ("{a}/{a}", "column 'a' appears twice"),
    ("{}/x", "empty {}"),
    ("{a/x", "unbalanced '{'"),
    ("{d:MM/dd}", "needs a yyyy part"),
    ("{d:yyyy/Q}", "has 'Q'"),
])
def test_bad_partition_formats(fmt, expected):
    with pytest.raises(SpecError, match=r"^partition format ") as info:
        PartitionFormat(fmt)
    assert expected in info.value.headline
