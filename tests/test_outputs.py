"""Output formats: parts from run()'s results, and their assembly into one file (no Ray)."""

import collections
import datetime
import hashlib
import json
import os
import threading
import uuid
from pathlib import Path

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq
import pytest

from raypar import held_upload
from raypar.errors import CorruptPartsError, OutputSchemaError, ResultError
from raypar.inputs.base import MiniBatch
from raypar.jobdir.ledger import Ledger, LedgerView
from raypar.jobdir.records import DoneRecord, _sealed, part_checksum
from raypar.outputs import ahead
from raypar.outputs import assembly as outputs
from raypar.outputs import formats as output_formats
from raypar.outputs import live as live_assembly
from raypar.outputs.assembly import assemble
from raypar.outputs.live import LiveAssembly
from raypar.outputs.rows import count_and_serialize
from raypar.polling import poll

TABLE_FORMATS = ["csv", "jsonl", "parquet"]


# -- helpers ------------------------------------------------------------------------------------------------


def bid(ordinal: int) -> str:
    return f"mb-{ordinal:07d}"


def job(root, results: dict, fmt: str, order=None, count=None):
    """A ledger whose batches returned ``results`` ({ordinal: result}), written by one worker in ``order``."""
    manifest = [MiniBatch(ordinal=i, kind="files", payload={"files": [f"f{i}"]}, item_count=1)
                for i in range(count if count is not None else max(results, default=-1) + 1)]
    ledger = Ledger(str(root) if "://" in str(root) else str(Path(root) / "job"))
    ledger.write_manifest(manifest)
    writer = ledger.done_writer(f"r1~w{uuid.uuid4().hex[:6]}")
    records = {}
    for ordinal in order if order is not None else sorted(results):
        returned, rows = count_and_serialize(results[ordinal], True, fmt)
        record = DoneRecord(batch=bid(ordinal), run="r1", attempt=1, items=returned, returned=returned, part=None)
        records[ordinal] = writer.write(record, rows)
    return ledger, ledger.view(manifest), records


def read_back(path: Path, fmt: str) -> list[dict]:
    if fmt == "csv":
        return pa_csv.read_csv(path).to_pylist()
    if fmt == "jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return pq.read_table(path).to_pylist()


def flip_byte(ledger: Ledger, record: DoneRecord, at: int) -> None:
    path = Path(ledger.store.path("parts", record.part))
    data = bytearray(path.read_bytes())
    data[record.part_offset + at] ^= 0xFF
    path.write_bytes(bytes(data))


def rows_of(ordinal: int, n: int = 3) -> list[dict]:
    return [{"batch": ordinal, "row": i, "name": f"b{ordinal}-r{i}"} for i in range(n)]


# -- count_and_serialize: results as Arrow parts ------------------------------------------------------------


def part_table(result, fmt="parquet") -> pa.Table:
    count, rows = count_and_serialize(result, True, fmt)
    assert count == len(result)
    return output_formats.decode_part(rows)


def test_dicts_become_columns_with_the_union_of_keys():
    table = part_table([{"a": 1}, {"b": "x", "a": 2.5}])
    assert table.column_names == ["a", "b"]
    assert table.to_pylist() == [{"a": 1.0, "b": None}, {"a": 2.5, "b": "x"}]


def test_values_become_one_value_column():
    assert part_table([1, None, 3]).to_pylist() == [{"value": 1}, {"value": None}, {"value": 3}]
    assert part_table(("x", "y")).to_pylist() == [{"value": "x"}, {"value": "y"}]


def test_lists_and_tuples_become_numbered_columns():
    table = part_table([("a.txt", 0.5), ["b.txt", 1.5, 7]])
    assert table.to_pylist() == [{"c0": "a.txt", "c1": 0.5, "c2": None}, {"c0": "b.txt", "c1": 1.5, "c2": 7}]


def test_namedtuples_name_their_columns():
    Score = collections.namedtuple("Score", "file score")
    assert part_table([Score("a", 1), Score("b", 2)]).column_names == ["file", "score"]


def test_dataframe_keeps_its_columns_not_its_index():
    frame = pd.DataFrame({"file": ["a", "b"], "score": [1, 2.5], "kind": pd.Categorical(["x", "y"])},
                         index=[10, 20])
    table = part_table(frame)
    assert table.to_pylist() == [{"file": "a", "score": 1.0, "kind": "x"}, {"file": "b", "score": 2.5, "kind": "y"}]
    assert table.schema.metadata is None  # no pandas metadata: parts of every batch unify
    assert not pa.types.is_dictionary(table.schema.field("kind").type)


@pytest.mark.parametrize("result", [[], (), pd.DataFrame({"a": pd.Series([], dtype="int64")})])
def test_an_empty_result_is_a_part_with_no_rows(result):
    count, rows = count_and_serialize(result, True, "csv")
    assert count == 0 and rows is not None
    assert output_formats.decode_part(rows).num_rows == 0


def test_without_rows_only_the_count():
    assert count_and_serialize([{"a": 1}] * 3, False, "parquet") == (3, None)


@pytest.mark.parametrize("result, words", [
    ([{"a": 1}, [1, 2]], ["dicts", "lists/tuples"]),
    ([1, {"a": 1}], ["dicts", "values"]),
    ([1, "a"], ["str"]),
    ([{"a": 1}, {"a": "x"}], ["'a'"]),
    ([(1, "a"), ("b", 2)], ["'c0'"]),
    (pd.DataFrame({"mixed": [1, "a"]}), ["mixed"]),
])
def test_rows_that_do_not_make_a_table_are_a_result_error(result, words):
    with pytest.raises(ResultError) as info:
        count_and_serialize(result, True, "jsonl")
    assert all(word in str(info.value) for word in words), str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("result", [None, {"a": 1}, "text", 3])
def test_table_formats_reject_what_text_rejects(result):
    with pytest.raises(ResultError) as info:
        count_and_serialize(result, True, "parquet")
    assert str(info.value) == (f"run() returned {type(result).__name__}; "
                               "it must return a list, a tuple, a pandas DataFrame or a pyarrow Table")


@pytest.mark.parametrize("fmt", ["text", "csv", "jsonl", "parquet"])
def test_a_pyarrow_table_is_written_as_the_same_rows_as_its_dataframe(fmt):
    table = pa.table({"id": [1, 2, 3], "name": ["a", "b c", None], "score": [0.5, 1.25, -2.0]})
    assert count_and_serialize(table, True, fmt) == count_and_serialize(table.to_pandas(), True, fmt)
    assert count_and_serialize(table, False, fmt) == (3, None)


# -- assembly: one file, in mini-batch order ------------------------------------------------------------------


@pytest.mark.parametrize("fmt", TABLE_FORMATS)
def test_parts_written_out_of_order_are_assembled_in_order(tmp_path, fmt):
    results = {i: rows_of(i) for i in range(6)}
    ledger, view, _ = job(tmp_path, results, fmt, order=[4, 1, 5, 0, 3, 2])
    target = tmp_path / "out" / f"rows.{fmt}"

    written = assemble(ledger, view, str(target), fmt)

    assert read_back(target, fmt) == [row for i in range(6) for row in rows_of(i)]
    assert written == target.stat().st_size
    assert os.listdir(tmp_path / "out") == [f"rows.{fmt}"]


@pytest.mark.parametrize("fmt", TABLE_FORMATS)
def test_parts_of_several_workers_and_missing_batches(tmp_path, fmt):
    manifest = [MiniBatch(ordinal=i, kind="files", payload={"files": []}, item_count=1) for i in range(5)]
    ledger = Ledger(str(tmp_path / "job"))
    ledger.write_manifest(manifest)
    for writer, ordinals in (("r1~a", [3, 0]), ("r1~b", [4])):  # batch 1 and 2 never finished
        out = ledger.done_writer(writer)
        for i in ordinals:
            out.write(DoneRecord(batch=bid(i), run="r1", attempt=1, items=1, returned=3, part=None),
                      count_and_serialize(rows_of(i), True, fmt)[1])
    target = tmp_path / f"rows.{fmt}"

    assemble(ledger, ledger.view(manifest), str(target), fmt)

    assert read_back(target, fmt) == rows_of(0) + rows_of(3) + rows_of(4)


def test_a_plain_dict_of_records_is_sorted_by_ordinal(tmp_path):
    ledger, view, records = job(tmp_path, {i: [i] for i in range(12)}, "parquet", order=list(range(11, -1, -1)))
    shuffled = LedgerView(manifest=view.manifest, done={r.batch: r for r in records.values()})
    target = tmp_path / "out.parquet"
    assemble(ledger, shuffled, str(target), "parquet")
    assert pq.read_table(target).column("value").to_pylist() == list(range(12))


def test_schemas_of_parts_are_unified(tmp_path):
    results = {
        0: [{"a": 1, "b": "x"}],
        1: [],  # no columns at all
        2: [{"a": 2.5, "c": None}],  # int64 + double -> double; c null-typed here
        3: pd.DataFrame({"c": pd.Series([], dtype="int64")}),  # no rows, but c's type
        4: [{"b": "y", "c": 7}],
    }
    ledger, view, _ = job(tmp_path, results, "parquet", order=[4, 2, 0, 3, 1])
    target = tmp_path / "out.parquet"

    assemble(ledger, view, str(target), "parquet")

    table = pq.read_table(target)
    assert table.schema.names == ["a", "b", "c"]
    assert [table.schema.field(n).type for n in "abc"] == [pa.float64(), pa.string(), pa.int64()]
    assert table.to_pylist() == [{"a": 1.0, "b": "x", "c": None}, {"a": 2.5, "b": None, "c": None},
                                 {"a": None, "b": "y", "c": 7}]


@pytest.mark.parametrize("fmt", TABLE_FORMATS)
def test_columns_that_cannot_be_unified_fail_naming_column_and_batches(tmp_path, fmt):
    results = {0: [{"id": 1, "x": 1}], 1: [{"id": 2}], 2: [{"id": 3, "x": "three"}]}
    ledger, view, _ = job(tmp_path, results, fmt, order=[2, 1, 0])
    target = tmp_path / "out" / "rows"

    with pytest.raises(OutputSchemaError) as info:
        assemble(ledger, view, str(target), fmt)

    message = str(info.value)
    assert "'x'" in message and bid(0) in message and bid(2) in message and "\n" not in message
    assert not target.exists()


def test_csv_cannot_hold_nested_columns(tmp_path):
    ledger, view, _ = job(tmp_path, {0: [{"embedding": [0.5, 1.5]}]}, "csv")
    with pytest.raises(OutputSchemaError, match="'embedding'.*jsonl or parquet"):
        assemble(ledger, view, str(tmp_path / "out.csv"), "csv")
    assert not (tmp_path / "out.csv").exists()


@pytest.mark.parametrize("fmt", TABLE_FORMATS)
@pytest.mark.parametrize("where", ["body", "schema"])
def test_corrupted_parts_publish_nothing_and_are_all_listed(tmp_path, fmt, where):
    ledger, view, records = job(tmp_path, {i: rows_of(i) for i in range(5)}, fmt, order=[3, 0, 4, 1, 2])
    for ordinal in (1, 3):
        record = records[ordinal]
        flip_byte(ledger, record, at=12 if where == "schema" else record.part_bytes - 20)
    target = tmp_path / "out" / "rows"
    target.parent.mkdir()

    with pytest.raises(CorruptPartsError) as info:
        assemble(ledger, view, str(target), fmt)

    assert sorted(r.batch for r in info.value.records) == [bid(1), bid(3)]
    assert os.listdir(target.parent) == []  # no output, no temp file left behind


def test_a_part_is_checked_by_the_crc32_its_record_holds(tmp_path):
    ledger, view, records = job(tmp_path, {i: [f"row {i}"] for i in range(3)}, "text")
    assert [(r.part_crc32, r.part_sha256) for r in records.values()] == [
        (part_checksum(f"row {i}\n".encode()), None) for i in range(3)]
    flip_byte(ledger, records[1], at=2)

    with pytest.raises(CorruptPartsError) as info:
        assemble(ledger, view, str(tmp_path / "out.txt"), "text")
    assert [r.batch for r in info.value.records] == [bid(1)]


@pytest.mark.parametrize("compacted", [False, True])
def test_parts_of_records_written_before_crc32_are_checked_by_their_sha256(tmp_path, compacted):
    """A job dir of an older raypar: its done records hold each part's sha256, and no part_crc32."""
    manifest = [MiniBatch(ordinal=i, kind="files", payload={"files": []}, item_count=1) for i in range(3)]
    ledger = Ledger(str(tmp_path / "job"))
    ledger.write_manifest(manifest)
    for i in range(3):
        rows = f"row {i}\n".encode()
        record = DoneRecord(batch=bid(i), run="r1", attempt=1, items=1, returned=1, part=f"{bid(i)}~r1~1.part",
                            part_bytes=len(rows), part_sha256=hashlib.sha256(rows).hexdigest())
        old_body = {k: v for k, v in record.__dict__.items() if k != "part_crc32"}
        ledger.store.write_once(rows, "parts", record.part)
        ledger.store.write_once(_sealed(old_body), "done", f"{bid(i)}~r1~1.json")
    if compacted:
        assert ledger.compact("r2")
    view = ledger.view(manifest)
    assemble(ledger, view, str(tmp_path / "out.txt"), "text")
    assert (tmp_path / "out.txt").read_text() == "row 0\nrow 1\nrow 2\n"

    flip_byte(ledger, view.done[bid(2)], at=1)
    with pytest.raises(CorruptPartsError) as info:
        assemble(ledger, ledger.view(manifest), str(tmp_path / "again.txt"), "text")
    assert [r.batch for r in info.value.records] == [bid(2)]


@pytest.mark.parametrize("fmt", TABLE_FORMATS)
def test_every_batch_empty(tmp_path, fmt):
    ledger, view, _ = job(tmp_path, {0: [], 1: ()}, fmt)
    target = tmp_path / f"out.{fmt}"
    assemble(ledger, view, str(target), fmt)
    if fmt == "parquet":
        assert pq.read_table(target).num_rows == 0
    else:
        assert target.read_bytes() == b""


def test_csv_of_empty_dataframes_has_only_the_header(tmp_path):
    frame = pd.DataFrame({"file": pd.Series([], dtype="str"), "score": pd.Series([], dtype="float64")})
    ledger, view, _ = job(tmp_path, {0: frame, 1: []}, "csv")
    target = tmp_path / "out.csv"
    assemble(ledger, view, str(target), "csv")
    assert target.read_text() == '"file","score"\n'


def test_nothing_done_writes_an_empty_table(tmp_path):
    ledger, view, _ = job(tmp_path, {}, "parquet", count=3)
    target = tmp_path / "out.parquet"
    assemble(ledger, view, str(target), "parquet")
    assert pq.read_table(target).num_rows == 0


def test_csv_quotes_what_needs_quoting(tmp_path):
    rows = [{"text": 'say "hi", then\nleave', "n": 1}, {"text": None, "n": 2}]
    ledger, view, _ = job(tmp_path, {0: rows}, "csv")
    target = tmp_path / "out.csv"
    assemble(ledger, view, str(target), "csv")
    assert target.read_text() == '"text","n"\n"say ""hi"", then\nleave",1\n,2\n'  # null: empty


def test_jsonl_is_correct_json(tmp_path):
    utc = datetime.timezone.utc
    rows = [
        {"s": 'quote " backslash \\ newline \n tab \t bell \x07 unicode é 漢 🚀', "f": 1.5, "i": 1, "ok": True,
         "t": datetime.datetime(2024, 5, 6, 7, 8, 9, 123456), "tz": datetime.datetime(2024, 1, 2, tzinfo=utc),
         "d": datetime.date(2024, 5, 6), "l": [1, None, 3], "tags": ["a", 'b"'], "m": {"k": "v", "n": 2}},
        {"s": None, "f": float("nan"), "i": None, "ok": None, "t": None, "tz": None, "d": None, "l": None,
         "tags": [], "m": None},
        {"s": "", "f": float("inf"), "i": -(2**62), "ok": False, "t": None, "tz": None, "d": None, "l": [],
         "tags": None, "m": {"k": None, "n": None}},
    ]
    frame = pd.DataFrame({"f": [1e300, 1 / 3, -0.0], "big": [2**53 + 1, 0, -1]})
    ledger, view, _ = job(tmp_path, {0: rows, 1: frame}, "jsonl")
    target = tmp_path / "out.jsonl"

    assemble(ledger, view, str(target), "jsonl")

    lines = target.read_bytes().decode("utf-8").split("\n")
    assert lines[-1] == "" and len(lines) == 7
    got = [json.loads(line) for line in lines[:-1]]
    assert got[0] == {"s": rows[0]["s"], "f": 1.5, "i": 1, "ok": True, "t": "2024-05-06T07:08:09.123456",
                      "tz": "2024-01-02T00:00:00.000000Z", "d": "2024-05-06", "l": [1, None, 3],
                      "tags": ["a", 'b"'], "m": {"k": "v", "n": 2}, "big": None}
    assert got[1] == {k: None for k in got[0]} | {"tags": []}
    assert got[2]["f"] is None and got[2]["i"] == -(2**62) and got[2]["ok"] is False and got[2]["s"] == ""
    assert got[2]["l"] == [] and got[2]["m"] == {"k": None, "n": None}
    assert [g["f"] for g in got[3:]] == [1e300, 1 / 3, -0.0]
    assert [g["big"] for g in got[3:]] == [2**53 + 1, 0, -1]  # exact, not through a double
    assert pa_json.read_json(target).num_rows == 6


def test_parquet_buffers_small_parts_into_large_row_groups(tmp_path, monkeypatch):
    results = {i: [{"i": i * 10 + j} for j in range(10)] for i in range(50)}
    ledger, view, _ = job(tmp_path, results, "parquet")
    target = tmp_path / "one.parquet"
    assemble(ledger, view, str(target), "parquet")
    assert pq.ParquetFile(target).metadata.num_row_groups == 1

    monkeypatch.setattr(output_formats, "FLUSH_ROWS", 120)
    target = tmp_path / "many.parquet"
    assemble(ledger, view, str(target), "parquet")
    meta = pq.ParquetFile(target).metadata
    assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == [120, 120, 120, 120, 20]
    assert pq.read_table(target).column("i").to_pylist() == list(range(500))


@pytest.mark.parametrize("fmt", ["text"] + TABLE_FORMATS)
def test_object_store_job_dirs_read_parts_in_windows(tmp_path, fmt, monkeypatch):
    monkeypatch.setattr(outputs, "READ_AHEAD", 100)  # many windows
    root = f"memory://raypar-test-{uuid.uuid4().hex}/job"
    results = {i: rows_of(i) for i in range(7)}
    ledger, view, _ = job(root, results, fmt, order=[6, 2, 0, 5, 1, 3, 4])
    assert ledger.store.local_path() is None  # an object store
    target = tmp_path / "out"

    assemble(ledger, view, str(target), fmt)

    if fmt == "text":
        assert target.read_text() == "".join(f"{row}\n" for i in range(7) for row in rows_of(i))
    else:
        assert read_back(target, fmt) == [row for i in range(7) for row in rows_of(i)]


# -- text: Azure's format, unchanged -------------------------------------------------------------------------


def test_text_parts_and_assembly_are_unchanged(tmp_path):
    frame = pd.DataFrame({"file": ["a.txt", "b.txt"], "score": [1, 2.5]}, index=[10, 20])
    results = {0: [1, "a b", 2.5, (1, 2)], 1: frame, 2: [], 3: ("x",)}
    assert count_and_serialize(results[0], True) == (4, b"1\na b\n2.5\n(1, 2)\n")
    assert count_and_serialize(frame, True, "text") == (2, b"a.txt 1.0\nb.txt 2.5\n")
    ledger, view, _ = job(tmp_path, results, "text", order=[3, 1, 0, 2])
    target = tmp_path / "parallel_run_step.txt"

    written = assemble(ledger, view, str(target))

    expected = b"1\na b\n2.5\n(1, 2)\na.txt 1.0\nb.txt 2.5\nx\n"
    assert target.read_bytes() == expected and written == len(expected)


def test_text_corruption_lists_every_bad_part(tmp_path):
    ledger, view, records = job(tmp_path, {i: [f"row {i}"] for i in range(4)}, "text")
    flip_byte(ledger, records[0], at=0)
    flip_byte(ledger, records[2], at=1)
    target = tmp_path / "out.txt"
    with pytest.raises(CorruptPartsError) as info:
        assemble(ledger, view, str(target))
    assert [r.batch for r in info.value.records] == [bid(0), bid(2)]
    assert not target.exists()


def test_an_unknown_format_is_refused(tmp_path):
    with pytest.raises(ValueError, match="xml"):
        count_and_serialize([1], True, "xml")
    ledger, view, _ = job(tmp_path, {0: [1]}, "text")
    with pytest.raises(ValueError, match="xml"):
        assemble(ledger, view, str(tmp_path / "out"), "xml")
    assert not (tmp_path / "out").exists()


def test_promotion_rounds_large_ints_but_an_impossible_cast_names_the_batch(tmp_path):
    ledger, view, _ = job(tmp_path, {0: [{"x": 2**53 + 1}], 1: [{"x": 0.5}]}, "parquet")
    assemble(ledger, view, str(tmp_path / "ok.parquet"), "parquet")
    assert pq.read_table(tmp_path / "ok.parquet").column("x").to_pylist() == [float(2**53), 0.5]

    unsigned = pd.DataFrame({"x": pd.Series([2**64 - 1], dtype="uint64")})
    ledger, view, _ = job(tmp_path / "b", {0: [{"x": -1}], 1: unsigned}, "parquet")  # int64 + uint64 -> int64
    with pytest.raises(OutputSchemaError, match=f"'x' of batch {bid(1)}"):
        assemble(ledger, view, str(tmp_path / "bad.parquet"), "parquet")
    assert not (tmp_path / "bad.parquet").exists()


# -- reading ahead: bounded, and stopped with its consumer ----------------------------------------------------


def fake_parts(count: int, size: int, log: list):
    for i in range(count):
        log.append(i)
        yield DoneRecord(batch=bid(i), run="r1", attempt=1, items=1, returned=1, part="p"), bytes(size)


def test_read_ahead_holds_at_most_its_limit():
    produced, held = [], []
    for record, rows in outputs.ReadAhead(fake_parts(20, 100, produced), limit=250):
        held.append(len(produced) - int(record.batch[3:]))  # parts read but not yet written
        assert rows == bytes(100)
    assert len(held) == 20 and max(held) <= 4  # 2 waiting + 1 being handed over + 1 read, blocked


def test_read_ahead_stops_when_its_consumer_stops_and_passes_on_errors():
    produced = []
    reader = outputs.ReadAhead(fake_parts(1000, 10, produced), limit=100)
    for _ in reader:
        break
    assert not reader.thread.is_alive() and len(produced) < 1000

    def failing():
        yield from fake_parts(2, 10, [])
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        list(outputs.ReadAhead(failing()))


def test_parts_of_interleaved_segments_read_in_windows(tmp_path, monkeypatch):
    monkeypatch.setattr(outputs, "READ_AHEAD", 30)  # a window of 2-3 batches: spans cut across segments
    manifest = [MiniBatch(ordinal=i, kind="files", payload={"files": []}, item_count=1) for i in range(9)]
    ledger = Ledger(str(tmp_path / "job"))
    ledger.write_manifest(manifest)
    writers = [ledger.done_writer(f"r1~w{k}") for k in range(3)]
    for i in range(9):  # batch i in segment i % 3: every read switches files
        writers[i % 3].write(DoneRecord(batch=bid(i), run="r1", attempt=1, items=1, returned=1, part=None),
                             count_and_serialize([i], True, "jsonl")[1])
    target = tmp_path / "out.jsonl"
    assemble(ledger, ledger.view(manifest), str(target), "jsonl")
    assert target.read_text() == "".join(f'{{"value":{i}}}\n' for i in range(9))


@pytest.mark.parametrize("fmt", TABLE_FORMATS)
def test_a_column_that_is_always_null(tmp_path, fmt):
    ledger, view, _ = job(tmp_path, {0: [{"a": 1, "b": None}], 1: [{"a": 2}]}, fmt)
    target = tmp_path / f"out.{fmt}"
    assemble(ledger, view, str(target), fmt)
    if fmt == "csv":
        assert target.read_text() == '"a","b"\n1,\n2,\n'
    else:
        assert read_back(target, fmt) == [{"a": 1, "b": None}, {"a": 2, "b": None}]


def test_a_schema_larger_than_the_head_read_first(tmp_path):
    wide = [{f"column_{k:04d}": k for k in range(300)}]  # a schema message of many KiB
    ledger, view, _ = job(tmp_path, {0: wide, 1: wide}, "parquet")
    _, rows = count_and_serialize(wide, True, "parquet")
    assert output_formats.head_size(rows[:8]) > output_formats.SCHEMA_HEAD
    target = tmp_path / "out.parquet"
    assemble(ledger, view, str(target), "parquet")
    assert pq.read_table(target).to_pylist() == wide + wide


@pytest.mark.parametrize("group_bytes", [1, 1000, 8 << 20])  # parts are 416 bytes
def test_small_parts_are_decoded_in_groups_in_order(tmp_path, monkeypatch, group_bytes):
    def result(i):  # runs of parts with one schema, then another: groups end where the schema changes
        return [{"i": i, "s": f"x{i}"}] if (i // 4) % 2 else [{"i": i, "f": i / 2}, {"i": -i, "f": None}]

    # Arrow parts (parquet's; csv and jsonl parts are text when their columns allow, see below).
    ledger, view, _ = job(tmp_path, {i: result(i) for i in range(30)}, "parquet", order=list(range(29, -1, -1)))
    decoded = []
    decode = output_formats.decode_part
    monkeypatch.setattr(output_formats, "decode_part", lambda data: decoded.append(1) or decode(data))
    monkeypatch.setattr(output_formats, "GROUP_BYTES", group_bytes)
    target = tmp_path / "out.parquet"

    assemble(ledger, view, str(target), "parquet")

    expected = [{"i": row["i"], "s": row.get("s"), "f": row.get("f")} for i in range(30) for row in result(i)]
    assert read_back(target, "parquet") == expected
    assert len(decoded) == {1: 30, 1000: 15, 8 << 20: 8}[group_bytes]  # alone, in 2s, a run of 4 at once


def test_parquet_dictionary_encodes_only_columns_that_repeat(tmp_path):
    rows = [{"id": i, "score": i / 7, "label": ["cat", "dog"][i % 2], "flag": i % 3 == 0} for i in range(1000)]
    ledger, view, _ = job(tmp_path, {0: rows[:500], 1: rows[500:]}, "parquet")
    target = tmp_path / "out.parquet"
    assemble(ledger, view, str(target), "parquet")
    meta = pq.ParquetFile(target).metadata.row_group(0)
    encodings = {meta.column(c).path_in_schema: meta.column(c).encodings for c in range(meta.num_columns)}
    assert "RLE_DICTIONARY" in encodings["label"]
    assert "RLE_DICTIONARY" not in encodings["id"] and "RLE_DICTIONARY" not in encodings["score"]
    assert pq.read_table(target).to_pylist() == rows


# -- csv and jsonl rows encoded by the workers (text parts) ------------------------------------------------


TRICKY = ["plain", "", None, 'quote " inside', "comma, and\nnewline", "NA", "nan", "null", "ünïcødé ✓", "\\back\tslash"]


def tricky_result(i):
    """Rows whose text is easy to get wrong: quotes, separators, newlines, empty vs null, NaN and
    infinities, strings that look like nulls; every fourth batch lacks a column and has ints as floats."""
    rows = []
    for k, text in enumerate(TRICKY):
        row = {"id": i * 100 + k, "text": text, "score": [1.5, float("nan"), float("inf"), -0.0, 1e-310, None][k % 6],
               "ok": [True, False, None][k % 3]}
        if i % 4 == 3:
            del row["ok"]
            row["score"] = k  # an int column here: promoted to double in the output
        rows.append(row)
    return rows


def assembled_bytes(root, results, fmt, text_parts=True, monkeypatch=None):
    if not text_parts:  # what assembly did before workers encoded text: every part an Arrow stream
        monkeypatch.setattr(output_formats, "encode_text_part", lambda table, fmt: output_formats.encode_part(table))
    ledger, view, _ = job(root, results, fmt, order=sorted(results, reverse=True))
    if not text_parts:
        monkeypatch.undo()
    target = Path(root) / f"out.{fmt}"
    assemble(ledger, view, str(target), fmt)
    return target.read_bytes()


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_text_parts_give_the_very_file_arrow_parts_give(tmp_path, monkeypatch, fmt):
    results = {i: tricky_result(i) for i in range(12)}
    expected = assembled_bytes(tmp_path / "arrow", results, fmt, text_parts=False, monkeypatch=monkeypatch)
    read = []
    real_read = output_formats.read_text
    monkeypatch.setattr(output_formats, "read_text", lambda *a: read.append(1) or real_read(*a))

    got = assembled_bytes(tmp_path / "text", results, fmt)

    assert got == expected
    assert len(read) == 3  # only the batches whose schema is not the output's were read back (3, 7, 11)
    assert read_back(tmp_path / "text" / f"out.{fmt}", fmt)[0]["text"] == "plain"


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_text_parts_of_the_outputs_schema_are_copied_not_decoded(tmp_path, monkeypatch, fmt):
    results = {i: [{"id": i, "score": i / 3, "label": f"l{i}"}] for i in range(20)}
    touched = []
    for name in ("read_text", "decode_part"):
        real = getattr(output_formats, name)
        monkeypatch.setattr(output_formats, name, lambda *a, real=real: touched.append(1) or real(*a))

    got = assembled_bytes(tmp_path, results, fmt)

    assert touched == []
    expected = [{"id": i, "score": i / 3, "label": f"l{i}"} for i in range(20)]
    assert read_back(tmp_path / f"out.{fmt}", fmt) == expected and got.count(b"\n") == 20 + (fmt == "csv")


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_text_and_arrow_parts_mix_in_one_file_in_batch_order(tmp_path, fmt):
    # Dates have no exact text form here: those batches stay Arrow parts; the others are text.
    def result(i):
        row = {"id": i, "name": f"n{i}"}
        if i % 3 == 0:
            row["day"] = datetime.date(2026, 1, 1 + i)
        return [row]

    parts = {i: count_and_serialize(result(i), True, fmt)[1] for i in range(9)}
    kinds = [output_formats.text_of(p, output_formats.head_size(p)) is not None for p in parts.values()]
    assert kinds == [i % 3 != 0 for i in range(9)]
    ledger, view, _ = job(tmp_path, {i: result(i) for i in range(9)}, fmt)
    target = tmp_path / f"out.{fmt}"

    assemble(ledger, view, str(target), fmt)

    rows = read_back(target, fmt)
    assert [(r["id"], r["name"]) for r in rows] == [(i, f"n{i}") for i in range(9)]
    assert [r["day"] is not None for r in rows] == [i % 3 == 0 for i in range(9)]



# -- assembly while batches run (outputs/live.py) -----------------------------------------------------------


def part_of(record: DoneRecord):
    """Where a record's rows are, as a worker's answer gives it."""
    return [record.part, record.part_offset, record.part_bytes, record.part_sha256, record.part_crc32] if record.part else None


def live_and_after(root, results, fmt, reported, failed=(), count=None, corrupt=()):
    """LiveAssembly told that ``reported`` batches are stored (in that order) and ``failed`` failed
    for good, finished with the ledger's view (where the batches never reported are found); and
    assemble() from the same view. Returns (live target, assemble()'s target, the LiveAssembly)."""
    ledger, view, records = job(root, results, fmt, order=sorted(results, reverse=True), count=count)
    for ordinal in corrupt:
        flip_byte(ledger, records[ordinal], at=records[ordinal].part_bytes - 20)
    live_target, end_target = Path(root) / "live" / f"out.{fmt}", Path(root) / "end" / f"out.{fmt}"
    live = LiveAssembly(ledger, str(live_target), fmt)
    for ordinal in reported:
        r = records[ordinal]
        live.stored([(r.batch, part_of(r))])
    for ordinal in failed:
        live.failed(bid(ordinal))
    written = live.finish(view)
    assert written is None or written == live_target.stat().st_size
    if not corrupt:
        assemble(ledger, view, str(end_target), fmt)
    return live_target, end_target, live


@pytest.mark.parametrize("fmt", ["text"] + TABLE_FORMATS)
def test_the_file_written_while_running_is_the_file_written_after(tmp_path, fmt):
    results = {i: (rows_of(i) if fmt != "text" else [f"row {i}.{k}" for k in range(3)]) for i in range(12)}
    del results[5]  # failed for good: no record
    results[7] = []  # no rows
    reported = [3, 0, 2, 1, 6, 4, 9, 8, 7]  # 10 and 11 never reported (a lost worker's: found in the ledger)

    live, end, assembly = live_and_after(tmp_path, results, fmt, reported, failed=[5], count=12)

    assert live.read_bytes() == end.read_bytes()
    assert (assembly.written_while_running, assembly.written) == (9, 11)  # 0-9 but 5 were settled in order
    assert os.listdir(live.parent) == [live.name]  # no temp file left


@pytest.mark.parametrize("fmt", TABLE_FORMATS)
def test_tricky_rows_give_the_same_file_live_or_after(tmp_path, fmt):
    results = {i: tricky_result(i) for i in range(3)}  # (batch 3 would promote a column: see below)
    live, end, assembly = live_and_after(tmp_path, results, fmt, reported=[2, 0, 1])
    assert live.read_bytes() == end.read_bytes() and assembly.gave_up is None


@pytest.mark.parametrize("fmt", TABLE_FORMATS)
def test_a_part_that_changes_the_output_schema_leaves_the_output_to_assemble(tmp_path, fmt):
    results = {0: [{"id": 1}], 1: [{"id": 2, "x": 0.5}], 2: [{"id": 3}]}

    live, end, assembly = live_and_after(tmp_path, results, fmt, reported=[0, 1, 2])

    assert assembly.published is None and "schema" in assembly.gave_up
    assert os.listdir(live.parent) == []  # nothing published, no temp file left
    assert read_back(end, fmt) == [{"id": 1, "x": None}, {"id": 2, "x": 0.5}, {"id": 3, "x": None}]


@pytest.mark.parametrize("fmt", ["text", "parquet"])
def test_a_corrupt_part_leaves_the_output_to_assemble_which_names_it(tmp_path, fmt):
    results = {i: rows_of(i) if fmt != "text" else [f"row {i}"] for i in range(4)}

    live, _, assembly = live_and_after(tmp_path, results, fmt, reported=[0, 1, 2, 3], corrupt=[2])

    assert assembly.published is None and "checksum" in assembly.gave_up
    assert os.listdir(live.parent) == []


def test_a_stored_part_the_ledger_does_not_choose_is_never_published(tmp_path):
    """Two attempts of batch 0 stored: the file written while running used the one the view does not hold."""
    manifest = [MiniBatch(ordinal=i, kind="files", payload={"files": []}, item_count=1) for i in range(2)]
    ledger = Ledger(str(tmp_path / "job"))
    ledger.write_manifest(manifest)
    parts = {}
    for writer, attempt in (("r1~a", 1), ("r1~b", 2)):
        r = ledger.done_writer(writer).write(
            DoneRecord(batch=bid(0), run="r1", attempt=attempt, items=1, returned=1, part=None), f"try {attempt}\n".encode())
        parts[attempt] = [r.part, r.part_offset, r.part_bytes, r.part_sha256, r.part_crc32]
    view = ledger.view(manifest)
    chosen = view.done[bid(0)].attempt
    live = LiveAssembly(ledger, str(tmp_path / "out.txt"), "text")
    live.stored([(bid(0), parts[3 - chosen])])  # the other attempt's

    assert live.finish(view) is None and "not the ledger's" in live.gave_up
    assert not (tmp_path / "out.txt").exists()


@pytest.mark.parametrize("fmt", ["text", "parquet"])
def test_too_many_batches_stored_behind_one_that_is_not_stop_the_writing_and_finish_writes_the_rest(
        tmp_path, monkeypatch, fmt):
    """A straggler (a batch waiting for its retry while many small ones finish) must neither hold every
    stored batch behind it in memory nor throw away what was written: the rest comes from the view."""
    monkeypatch.setattr(live_assembly, "MAX_AHEAD", 2)
    results = {i: rows_of(i) if fmt != "text" else [f"row {i}"] for i in range(8)}
    reported = [0, 1, 3, 4, 5, 6, 7]  # 2 is stored last (its retry): the view finds it

    live, end, assembly = live_and_after(tmp_path, results, fmt, reported)

    assert live.read_bytes() == end.read_bytes() and assembly.gave_up is None
    assert assembly.paused == "5 stored mini-batches, up to mb-0000007, waited for mb-0000002"
    assert len(assembly.waiting) == 0 and assembly.waiting.chunks == {}  # what it held is let go
    assert (assembly.written_while_running, assembly.written) == (2, 8)  # 0 and 1 kept, 2-7 at the end


def test_the_batches_stored_ahead_come_back_in_order_as_they_were_stored(monkeypatch):
    monkeypatch.setattr(ahead, "CHUNK", 4)
    waiting = ahead.StoredAhead()
    where = {i: [f"seg-{i // 3}", 10 * i, 10, None, format(i * 2654435761 % (1 << 32), "08x")] for i in range(14)}
    where[5] = ["old", 50, 10, "ab" * 32, None]  # a record of before CRC-32
    for i in (9, 3, 1, 13, 2, 0, 5, 4, 6, 8, 7):  # 10-12 not yet; 11 failed for good, 12 has no rows
        waiting.put(i, where[i])
    waiting.put(11, None)
    waiting.put(12, None)
    waiting.put(8, ["retry", 0, 11, None, "0000abcd"])  # stored again: the later report counts

    taken = []
    while (value := waiting.take_next()) is not ahead.ABSENT:
        taken.append(value)

    expect = {**where, 8: ["retry", 0, 11, None, "0000abcd"]}
    assert taken == [outputs.Part(bid(i), *expect[i]) for i in range(10)]
    assert (waiting.next, len(waiting), waiting.ahead()) == (10, 3, 3)
    assert sorted(waiting.chunks) == [2, 3]  # chunks 0 and 1 (ordinals 0-7) freed as the writing passed them
    waiting.put(4, where[4])  # written already: ignored
    waiting.put(10, where[10])
    assert [waiting.take_next() for _ in range(5)] == [outputs.Part(bid(10), *where[10]), None, None,
                                                       outputs.Part(bid(13), *where[13]), ahead.ABSENT]
    assert (len(waiting), sorted(waiting.chunks)) == (0, [3])


@pytest.mark.parametrize("names", ["dictionary", "strings"])
def test_the_batches_done_before_a_session_are_put_at_once_as_they_would_be_one_by_one(monkeypatch, names):
    monkeypatch.setattr(ahead, "CHUNK", 4)
    rows = {i: [f"seg-{i // 3}", 10 * i, 10, None, format(i * 2654435761 % (1 << 32), "08x")] for i in range(13)}
    rows[5] = ["old", 50, 10, "ab" * 32, None]  # a record of before CRC-32
    rows[6] = None  # no part
    rows[9] = ["odd", 90, 10, None, "00ABCDEF"]  # not as part_checksum() spells it: parsed one by one
    order = [9, 3, 12, 0, 5, 6, 1, 2, 4, 7, 8, 10, 11]
    table = pa.table({"ordinal": pa.array(order, pa.int64()),
                      "part": pa.array([rows[i] and rows[i][0] for i in order]),
                      **{c: pa.array([rows[i] and rows[i][k] for i in order], t) for k, (c, t) in enumerate(
                          [("part_offset", pa.int64()), ("part_bytes", pa.int64()), ("part_sha256", pa.string()),
                           ("part_crc32", pa.string())], start=1)}})
    if names == "dictionary":  # as a DoneIndex holds them
        table = table.set_column(1, "part", table.column("part").dictionary_encode())
    at_once, one_by_one = ahead.StoredAhead(), ahead.StoredAhead()
    at_once.next = one_by_one.next = 1  # 0 was written already

    at_once.put_done(table)
    for i in order:
        one_by_one.put(i, rows[i])

    taken = [[w.take_next() for _ in range(13)] for w in (at_once, one_by_one)]
    spelled = {**rows, 9: ["odd", 90, 10, None, "00abcdef"]}  # (finish() then finds the record differs)
    assert taken[0] == taken[1] == [outputs.Part(bid(i), *spelled[i]) if rows[i] else None
                                    for i in range(1, 13)] + [ahead.ABSENT]
    assert (at_once.count, at_once.ahead(), one_by_one.ahead()) == (0, 0, 0)  # (next passed the highest)


def test_a_batch_stored_ahead_takes_a_few_bytes():
    """A million batches stored behind a straggler must not take a Part each (about 400 bytes)."""
    import tracemalloc

    count = 200_000
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        waiting = ahead.StoredAhead()
        for i in range(1, count + 1):  # a part name per worker flush of 1,000, as workers store them
            waiting.put(i, [f"r1~i0s{i % 16}-{uuid.UUID(int=i // 1000)}", i * 20, 20, None, format(i, "08x")])
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()

    assert len(waiting) == count and held < 40 * count  # 37 here: 4 chunks of 65,536 slots


def test_the_session_end_checks_the_parts_written_against_the_ledger_from_columns():
    """finish() composes the chain of the parts written from the view's columns: the same bytes as the
    live thread hashed part by part, or every live output would be thrown away and assembled again."""
    count = (1 << 16) + 3  # more than one slice
    table = pa.table({"ordinal": pa.array(range(count), pa.int64()),
                      "part": pa.array([f"r1~w{i // 1000}" for i in range(count)]).dictionary_encode(),
                      "part_offset": pa.array([7 * (i % 1000) for i in range(count)], pa.int64()),
                      "part_bytes": pa.array([7] * count, pa.int64()),
                      "part_sha256": pa.array(["ab" * 32 if i == 5 else None for i in range(count)], pa.string()),
                      "part_crc32": pa.array([None if i == 5 else format(i, "08x") for i in range(count)])})
    for rows in (table, table.slice(0, count - 2), table.slice(0, 0)):
        chain = hashlib.sha256()
        for part in outputs.parts_of(rows):
            chain.update(live_assembly._key(part))
        assert live_assembly._chain(rows) == chain.digest()


def test_a_hundred_thousand_batches_stored_behind_a_straggler_wait_for_it_and_are_written_while_running(tmp_path):
    """Batch 0 is stored last, after 100,100 others (more than the 100,000 Parts the live assembly held
    before it gave up): they wait in a few bytes each and are written once it is stored, in order."""
    count = 100_101
    manifest = [MiniBatch(ordinal=i, kind="files", payload={"files": []}, item_count=1) for i in range(count)]
    ledger = Ledger(str(tmp_path / "job"))
    ledger.write_manifest(manifest)
    writer = ledger.done_writer("r1~w1", {"flush_batches": 1000, "flush_bytes": 1 << 30, "flush_seconds": 1e9})
    live = LiveAssembly(ledger, str(tmp_path / "out.txt"), "text")
    order = list(range(1, count)) + [0]
    for start in range(0, count, 1000):  # as a worker's flushes report them
        stored = [writer.write(DoneRecord(batch=bid(i), run="r1", attempt=1, items=1, returned=1, part=None),
                               f"{i}\n".encode()) for i in order[start:start + 1000]]
        writer.flush()
        live.stored([(r.batch, part_of(r)) for r in stored])
        if start == count - 1001:
            assert poll(lambda: len(live.waiting) == count - 1, timeout=60, interval=0.05)
            assert live.written == 0 and live.paused is None and live.waiting.nbytes() <= 2 * (1 << 16) * 25

    assert live.finish(ledger.view(manifest)) is not None and live.gave_up is None and live.paused is None

    assert (tmp_path / "out.txt").read_text() == "".join(f"{i}\n" for i in range(count))
    assert (live.written_while_running, live.written) == (count, count)
    assert len(live.waiting) == 0 and live.waiting.chunks == {}


@pytest.mark.parametrize("ending", ["waited", "paused"])
def test_the_parts_behind_a_straggler_are_read_a_window_of_read_ahead_bytes_at_a_time(tmp_path, monkeypatch, ending):
    """A thousand 64 MB parts stored behind a straggler must not be read into memory at once, when it is
    stored or, past MAX_AHEAD, when finish() writes them."""
    row = "x" * 999
    ledger, view, records = job(tmp_path, {i: [f"{i}{row}"[:1000]] for i in range(10)}, "text")
    monkeypatch.setattr(outputs, "READ_AHEAD", 3000)  # three parts
    if ending == "paused":
        monkeypatch.setattr(live_assembly, "MAX_AHEAD", 5)
    reads, read_ranges = [], ledger.store.read_ranges

    def spy(paths, starts, ends):
        reads.append(sum(e - s for s, e in zip(starts, ends, strict=True)))
        return read_ranges(paths, starts, ends)

    monkeypatch.setattr(ledger.store, "read_ranges", spy)
    live = LiveAssembly(ledger, str(tmp_path / "out.txt"), "text")
    live.stored([(records[0].batch, part_of(records[0]))])
    assert poll(lambda: live.written == 1, timeout=30, interval=0.05)
    live.stored([(records[i].batch, part_of(records[i])) for i in range(2, 10)])
    if ending == "paused":
        assert poll(lambda: live.paused, timeout=30, interval=0.05)
    live.stored([(records[1].batch, part_of(records[1]))])  # the straggler

    assert live.finish(view) is not None and live.gave_up is None
    assert (tmp_path / "out.txt").read_text() == "".join(f"{i}{row}"[:1000] + "\n" for i in range(10))
    assert sum(reads) == 10 * 1001 and max(reads) <= 3 * 1001  # the windows: at most READ_AHEAD and a part
    assert live.written_while_running == (10 if ending == "waited" else 1)


@pytest.mark.parametrize("fmt", ["text", "parquet"])
def test_a_resumed_session_writes_the_batches_done_before_it_while_its_own_run(tmp_path, monkeypatch, fmt):
    """A resume's output begins with rows of batches done in earlier sessions: the thread finds where
    they are in the ledger and writes them, in order with the session's own, before its last batch.
    They are not stored ahead of the writing: batch 9, done before, stops nothing."""
    monkeypatch.setattr(live_assembly, "MAX_AHEAD", 2)
    results = {i: rows_of(i) if fmt != "text" else [f"row {i}"] for i in range(10)}
    results[1] = None  # done before with no part (rows=None): its place is settled too
    manifest = [MiniBatch(ordinal=i, kind="files", payload={"files": [f"f{i}"]}, item_count=1) for i in range(10)]
    ledger = Ledger(str(tmp_path / "job"))
    ledger.write_manifest(manifest)

    def store(writer, ordinals):
        out = ledger.done_writer(writer)
        return {i: out.write(DoneRecord(batch=bid(i), run=writer[:2], attempt=1, items=1, returned=1, part=None),
                             count_and_serialize(results[i], True, fmt)[1] if results[i] is not None else None)
                for i in ordinals}

    store("r1~w1", [0, 1, 2, 4, 5, 8, 9])  # the earlier session; 3, 6 and 7 failed there
    live = LiveAssembly(ledger, str(tmp_path / "out" / f"out.{fmt}"), fmt, resumed=manifest)
    assert poll(lambda: live.written == 2, timeout=30, interval=0.05)  # 0 and 2, before any batch of this session
    records = store("r2~w1", [7, 3, 6])
    live.stored([(records[i].batch, part_of(records[i])) for i in (7, 3)])
    assert poll(lambda: live.written == 5, timeout=30, interval=0.05)  # 3, 4 and 5; 7 waits for 6
    live.stored([(records[6].batch, part_of(records[6]))])
    view = ledger.view(manifest)

    assert live.finish(view) is not None and live.gave_up is None
    assemble(ledger, view, str(tmp_path / f"end.{fmt}"), fmt)
    assert (tmp_path / "out" / f"out.{fmt}").read_bytes() == (tmp_path / f"end.{fmt}").read_bytes()
    assert (live.written_while_running, live.written, live.paused) == (9, 9, None)


def test_what_the_scheduler_says_while_the_thread_catches_up_is_taken_in_as_it_writes(tmp_path, monkeypatch):
    """Writing thousands of batches that waited for a straggler takes a while: what is stored meanwhile
    must not wait in the scheduler's lists (400 bytes a batch) until all are written."""
    count = 3000
    manifest = [MiniBatch(ordinal=i, kind="files", payload={"files": []}, item_count=1) for i in range(count)]
    ledger = Ledger(str(tmp_path / "job"))
    ledger.write_manifest(manifest)
    writer = ledger.done_writer("r1~w1", {"flush_batches": 1000, "flush_bytes": 1 << 30, "flush_seconds": 1e9})
    records = [writer.write(DoneRecord(batch=bid(i), run="r1", attempt=1, items=1, returned=1, part=None),
                            f"{i}\n".encode()) for i in range(count)]
    writer.flush()
    live = LiveAssembly(ledger, str(tmp_path / "out.txt"), "text")
    live.stored([(r.batch, part_of(r)) for r in records[1:-1]])  # batch 0 is the straggler
    assert poll(lambda: len(live.waiting) == count - 2, timeout=30, interval=0.05)
    queued, write = {}, live._write

    def writing(record, data):
        if live.written == 10:  # a batch stored while the thread catches up
            live.stored([(records[-1].batch, part_of(records[-1]))])
        if live.written == 1100:  # past the first window of 1,024
            queued["events"] = len(live.events)
        write(record, data)

    monkeypatch.setattr(live, "_write", writing)
    live.stored([(records[0].batch, part_of(records[0]))])
    assert poll(lambda: queued, timeout=30, interval=0.05)  # (the session ends after its last batch)

    assert queued == {"events": 0}  # taken in with the second window, not after the last part
    assert live.finish(ledger.view(manifest)) is not None
    assert (tmp_path / "out.txt").read_text() == "".join(f"{i}\n" for i in range(count))
    assert (live.written_while_running, live.written) == (count, count)


def test_the_tail_written_after_the_writing_stopped_is_not_synced_part_by_part(tmp_path, monkeypatch):
    """finish() has checked the parts already: the tail after a stop is written as assemble() writes it."""
    monkeypatch.setattr(live_assembly, "SYNC_BYTES", 1)
    monkeypatch.setattr(live_assembly, "MAX_AHEAD", 1)
    synced, real_fdatasync = [], os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: synced.append(os.fstat(fd).st_size) or real_fdatasync(fd))
    ledger, view, records = job(tmp_path, {i: [f"row {i}"] for i in range(5)}, "text")
    live = LiveAssembly(ledger, str(tmp_path / "out.txt"), "text")
    live.stored([(records[0].batch, part_of(records[0]))])
    assert poll(lambda: live.written == 1, timeout=30, interval=0.05)
    live.stored([(records[i].batch, part_of(records[i])) for i in (2, 3, 4)])  # 1 is the straggler
    assert poll(lambda: live.paused, timeout=30, interval=0.05)

    assert live.finish(view) is not None

    assert (tmp_path / "out.txt").read_text() == "".join(f"row {i}\n" for i in range(5))
    assert synced == [6] and (live.written_while_running, live.written) == (1, 5)


def test_a_straggler_before_anything_was_written_leaves_the_output_to_assemble(tmp_path, monkeypatch):
    monkeypatch.setattr(live_assembly, "MAX_AHEAD", 2)
    ledger, view, records = job(tmp_path, {i: [f"row {i}"] for i in range(5)}, "text")
    live = LiveAssembly(ledger, str(tmp_path / "out.txt"), "text")
    live.stored([(records[i].batch, part_of(records[i])) for i in (1, 2, 3, 4)])  # batch 0 is never reported

    assert live.finish(view) is None and "nothing was written" in live.gave_up  # assemble() writes it all
    assert len(live.waiting) == 0 and live.waiting.chunks == {}


@pytest.mark.parametrize("as_url", [False, True], ids=["path", "file-url"])
def test_a_local_output_is_pushed_to_disk_while_batches_run(tmp_path, monkeypatch, as_url):
    """So that publishing it waits for the last parts' bytes only, not for the whole file's."""
    monkeypatch.setattr(live_assembly, "SYNC_BYTES", 1)
    synced_sizes, synced, real_fdatasync = [], threading.Event(), os.fdatasync

    def fdatasync(fd):
        real_fdatasync(fd)
        synced_sizes.append(os.fstat(fd).st_size)
        synced.set()

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    ledger, view, records = job(tmp_path, {i: [f"row {i}"] for i in range(3)}, "text")
    target = (tmp_path / "out.txt").as_uri() if as_url else str(tmp_path / "out.txt")
    live = LiveAssembly(ledger, target, "text")

    live.stored([(records[0].batch, part_of(records[0]))])
    assert synced.wait(30)  # on disk before the session ends
    assert synced_sizes == [len("row 0\n")]
    live.stored([(records[i].batch, part_of(records[i])) for i in (1, 2)])
    assert live.finish(view) is not None

    assert (tmp_path / "out.txt").read_text() == "row 0\nrow 1\nrow 2\n"
    assert synced_sizes == [6, 12, 18]


def test_a_remote_output_is_staged_without_pushing_the_staged_file_to_disk(tmp_path, monkeypatch):
    """The staged copy is uploaded whole when published: syncing it to the local disk gains nothing."""
    monkeypatch.setattr(live_assembly, "SYNC_BYTES", 1)
    calls = []
    monkeypatch.setattr(os, "fdatasync", calls.append)
    ledger, view, records = job(tmp_path, {i: [f"row {i}"] for i in range(3)}, "text")
    target = f"memory://raypar-test-{uuid.uuid4().hex}/out.txt"
    live = LiveAssembly(ledger, target, "text")

    live.stored([(r.batch, part_of(r)) for r in records.values()])
    assert live.finish(view) is not None

    with fsspec.open(target, "rb") as f:
        assert f.read() == b"row 0\nrow 1\nrow 2\n"
    assert calls == []


def s3_uploads(s3_server, bucket: str, key: str) -> list[int]:
    """The sizes of the parts of every unfinished multipart upload of ``key``, as moto holds them."""
    fs = s3_server.filesystem()
    uploads = [u for u in fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key).get("Uploads", [])
               if u["Key"] == key]
    return [p["Size"] for u in uploads
            for p in fs.call_s3("list_parts", Bucket=bucket, Key=key, UploadId=u["UploadId"]).get("Parts", [])]


@pytest.mark.parametrize("ending", ["finish", "abandon", "straggler"])
def test_a_remote_output_is_uploaded_while_batches_run(tmp_path, monkeypatch, s3_server, ending):
    """Not staged on the driver's disk and uploaded after the last batch: only the tail is left
    then. Nothing is visible before the end, and an abandoned session's upload is aborted. Batches
    stored behind a straggler stop the writing, not the upload of what was written before it."""
    monkeypatch.setattr(held_upload, "PART_BYTES", 5 << 20)  # S3's smallest part
    monkeypatch.setattr(live_assembly, "MAX_AHEAD", 1)
    row = "x" * 1021  # a 1 KiB line
    ledger, view, records = job(tmp_path, {i: [f"{i} {row}"] * 3072 for i in range(5)}, "text")  # 3 MiB each
    bucket = s3_server.new_bucket()
    target = f"s3://{bucket}/out/rows.txt"
    live = LiveAssembly(ledger, target, "text", s3_server.options)

    live.stored([(records[i].batch, part_of(records[i])) for i in (0, 1)])
    assert poll(lambda: s3_uploads(s3_server, bucket, "out/rows.txt"), timeout=30, interval=0.05) == [6 << 20]
    assert not s3_server.filesystem().exists(target)
    if ending == "abandon":
        live.abandon()
        assert s3_uploads(s3_server, bucket, "out/rows.txt") == []  # aborted: S3 bills no parts
        assert not s3_server.filesystem().exists(target)
        return
    later = (3, 4) if ending == "straggler" else (2, 3, 4)  # the straggler, 2, is stored after the last
    live.stored([(records[i].batch, part_of(records[i])) for i in later])
    if ending == "straggler":
        assert poll(lambda: live.paused, timeout=30, interval=0.05) == (
            "2 stored mini-batches, up to mb-0000004, waited for mb-0000002")
    assert live.finish(view) == 15 << 20

    with s3_server.filesystem().open(target, "rb") as f:
        assert f.read() == "".join(f"{i} {row}\n" * 3072 for i in range(5)).encode()
    assert s3_uploads(s3_server, bucket, "out/rows.txt") == []
    assert live.written_while_running == (2 if ending == "straggler" else 5)


def test_an_abandoned_session_leaves_no_file(tmp_path):
    ledger, view, records = job(tmp_path, {i: [f"row {i}"] for i in range(3)}, "text")
    out = tmp_path / "out"
    live = LiveAssembly(ledger, str(out / "rows.txt"), "text")
    live.stored([(r.batch, part_of(r)) for r in records.values()])

    live.abandon()

    assert not out.exists() or os.listdir(out) == []


def test_batches_stored_together_are_read_with_one_request_per_segment(tmp_path, monkeypatch):
    """A worker's flush stores many batches in one segment object: the file written while running
    reads them with one ranged GET, never one per batch."""
    root = f"memory://raypar-test-{uuid.uuid4().hex}/job"
    manifest = [MiniBatch(ordinal=i, kind="files", payload={"files": []}, item_count=1) for i in range(50)]
    ledger = Ledger(root)
    ledger.write_manifest(manifest)
    writer = ledger.done_writer("r1~a", {"flush_batches": 1000, "flush_bytes": 1 << 30, "flush_seconds": float("inf")})
    records = [writer.write(DoneRecord(batch=bid(i), run="r1", attempt=1, items=1, returned=1, part=None),
                            f"row {i}\n".encode()) for i in range(50)]
    writer.flush()  # one segment object
    view = ledger.view(manifest)
    reads = []
    read_ranges = ledger.store.read_ranges
    monkeypatch.setattr(ledger.store, "read_ranges", lambda paths, *a: reads.append(len(paths)) or read_ranges(paths, *a))
    live = LiveAssembly(ledger, str(tmp_path / "out.txt"), "text")

    live.stored([(r.batch, part_of(r)) for r in records])  # as the driver hears of one flush
    written = live.finish(view)

    assert written is not None and (tmp_path / "out.txt").read_text() == "".join(f"row {i}\n" for i in range(50))
    assert reads == [1]  # one request, one span of the one segment
