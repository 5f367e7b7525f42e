"""Tables, MLTable read steps, partition keys and remote input modes, driven without Ray.

Every test plans an input on the "driver" (check_input + plan_batches) and reads each
mini-batch on the "worker" (BatchReader), then checks what run() would receive: the
exact rows (by an id column, and whole frames), how big batches are, which files they
mix, and the key values of partitioned batches.
"""

from __future__ import annotations

import datetime
import json
import os
import random
import uuid
import weakref
from pathlib import Path

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from raypar.errors import SpecError
from raypar.inputs import BatchReader, check_input, plan_batches
from raypar.inputs import files as input_files
from raypar.inputs.source import open_source
from raypar.spec.loading import spec_from_dict
from raypar.spec.models import parse_size

KB = 1024

# Values that trip CSV writers and readers: commas, quotes, semicolons, non-ASCII, emoji.
TRICKY = ["héllo, wörld", "日本語のテキスト", "emoji 😀, ok", 'say "hi", then go', "Ünïcödé;semi", "plain"]


# -- building data ------------------------------------------------------------------------


def make_rows(n: int, start: int = 0, seed: int = 0, text_len: int = 40) -> pd.DataFrame:
    """``n`` rows with a unique ``id`` (start, start+1, ...) and incompressible text."""
    rng = random.Random(seed * 7919 + start)
    hexes = rng.randbytes(n * text_len).hex()  # letters and digits, so never read as a number
    return pd.DataFrame({
        "id": list(range(start, start + n)),
        "name": [f"{TRICKY[i % len(TRICKY)]} #{i}" for i in range(start, start + n)],
        "value": [i * 0.25 + 0.5 for i in range(start, start + n)],
        "text": ["t" + hexes[k * text_len:(k + 1) * text_len - 1] for k in range(n)],
    })


def write_parquet(path: Path, df: pd.DataFrame, row_group_size: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path,
                   row_group_size=row_group_size or max(len(df), 1))
    return path


def csv_lines(df: pd.DataFrame, sep: str = ",") -> list[str]:
    """The data lines pandas writes for ``df`` (one per row, newline included)."""
    return df.to_csv(index=False, header=False, sep=sep, lineterminator="\n").splitlines(keepends=True)


def write_csv(path: Path, df: pd.DataFrame, header: bool = True, sep: str = ",", encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(df.to_csv(index=False, header=header, sep=sep, lineterminator="\n").encode(encoding))
    return path


def jsonl_lines(df: pd.DataFrame) -> list[str]:
    return [json.dumps(row, ensure_ascii=False) + "\n" for row in df.to_dict(orient="records")]


def write_jsonl(path: Path, df: pd.DataFrame) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(jsonl_lines(df)), encoding="utf-8")
    return path


def row_bytes(df: pd.DataFrame, fmt: str, path: Path | None = None) -> dict[int, float]:
    """How many bytes of its file each row takes (parquet: the file's compressed average)."""
    if fmt == "csv":
        return {i: len(line.encode()) for i, line in zip(df["id"], csv_lines(df), strict=True)}
    if fmt == "json_lines":
        return {i: len(line.encode()) for i, line in zip(df["id"], jsonl_lines(df), strict=True)}
    per_row = _parquet_data_bytes(path) / len(df)
    return dict.fromkeys(df["id"].tolist(), per_row)


def _parquet_data_bytes(path: Path) -> int:
    meta = pq.read_metadata(path)
    return sum(meta.row_group(g).column(c).total_compressed_size
               for g in range(meta.num_row_groups) for c in range(meta.num_columns))


def write_mltable(folder: Path, paths: list[dict], steps: list | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    doc: dict = {"type": "mltable", "paths": paths}
    if steps is not None:
        doc["transformations"] = steps
    (folder / "MLTable").write_text(yaml.safe_dump(doc, sort_keys=False))
    return folder


# -- driving raypar -------------------------------------------------------------------------


def job(path, *, input_type: str = "uri_folder", size=None, keys=None, fmt=None, mode=None):
    data_input = {"type": input_type, "path": str(path)}
    if mode:
        data_input["mode"] = mode
    data = {
        "type": "parallel",
        "inputs": {"data": data_input},
        "input_data": "${{inputs.data}}",
        "task": {"code": "/tmp", "entry_script": "score.py"},
    }
    if size is not None:
        data["mini_batch_size"] = size
    if keys is not None:
        data["partition_keys"] = keys
    if fmt is not None:
        data["raypar"] = {"input_format": fmt}
    return spec_from_dict(data)


def plan(spec):
    return list(plan_batches(spec, check_input(spec)))


def manifest(spec) -> list[str]:
    return [b.to_json() for b in plan(spec)]


def run_all(spec):
    """(batches, [(what run() receives, context)]) for every planned batch."""
    desc = check_input(spec)
    batches = list(plan_batches(spec, desc))
    reader = BatchReader(desc)
    out = []
    for batch in batches:
        mini_batch, context, temp = reader.read(batch)
        assert context.mini_batch_id == batch.id
        out.append((mini_batch, context))
    return batches, out


def frames_of(spec) -> list[pd.DataFrame]:
    return [frame for frame, _ in run_all(spec)[1]]


def normalized(df: pd.DataFrame, by: str = "id") -> pd.DataFrame:
    return df.sort_values(by, kind="stable").reset_index(drop=True)


def assert_same_rows(frames: list[pd.DataFrame], expected: pd.DataFrame, by: str = "id") -> None:
    """Every expected row exactly once across ``frames``, and no other row; no frame empty."""
    assert frames, "no mini-batch planned"
    assert all(len(f) > 0 for f in frames), [len(f) for f in frames]
    got = pd.concat(frames, ignore_index=True)
    assert got[by].is_unique, got[by][got[by].duplicated()].tolist()[:10]
    assert sorted(got[by].tolist()) == sorted(expected[by].tolist())
    pd.testing.assert_frame_equal(normalized(got[list(expected.columns)], by), normalized(expected, by),
                                  check_dtype=False)


# -- 1. exact row coverage and batch sizes -----------------------------------------------------

SIZES = ["1kb", "10kb", "1mb"]
FORMATS = ["parquet_row_groups", "parquet_one_row_group", "csv", "json_lines"]


def _big_file(folder: Path, kind: str, size: int, start: int = 0, seed: int = 0):
    """A file about 4x ``size``; returns (path, rows, format, bytes per row id)."""
    n = max(4 * size // 100, 60)  # ~100 bytes a row in every format
    df = make_rows(n, start=start, seed=seed)
    if kind.startswith("parquet"):
        rg = max(n // 23, 1) if kind == "parquet_row_groups" else n  # 23+ row groups, or one huge one
        path = write_parquet(folder / f"big-{start}.parquet", df, row_group_size=rg)
        return path, df, "parquet", row_bytes(df, "parquet", path)
    if kind == "csv":
        path = write_csv(folder / f"big-{start}.csv", df)
        return path, df, "csv", row_bytes(df, "csv")
    path = write_jsonl(folder / f"big-{start}.jsonl", df)
    return path, df, "json_lines", row_bytes(df, "json_lines")


def check_batch_sizes(frames, sizes: dict[int, float], size: int, last_of_file: set[int]) -> None:
    """A batch is at most 2x the size (rows larger than the size aside), and only the last
    batch of a file may be much smaller than the size."""
    for i, frame in enumerate(frames):
        nbytes = [sizes[x] for x in frame["id"]]
        small = sum(b for b in nbytes if b <= size)
        assert small <= 2 * size, f"batch {i}: {sum(nbytes)} bytes for a {size}-byte mini_batch_size"
        if i not in last_of_file:
            assert sum(nbytes) >= size / 3, f"batch {i}: only {sum(nbytes)} bytes for {size}"


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("kind", FORMATS)
def test_big_file_rows_once_in_batches_of_about_the_size(tmp_path, kind, size):
    nbytes = parse_size(size).value
    path, df, fmt, sizes = _big_file(tmp_path / "data", kind, nbytes)
    spec = job(tmp_path / "data", size=size)
    frames = frames_of(spec)

    assert_same_rows(frames, df)
    # In file order, row after row: concatenating the batches gives the file back.
    assert pd.concat(frames, ignore_index=True)["id"].tolist() == df["id"].tolist()
    check_batch_sizes(frames, sizes, nbytes, last_of_file={len(frames) - 1})
    assert len(frames) >= os.path.getsize(path) // (2 * nbytes)
    assert manifest(spec) == manifest(job(tmp_path / "data", size=size))


@pytest.mark.parametrize("kind", FORMATS)
def test_big_file_as_uri_file(tmp_path, kind):
    path, df, fmt, sizes = _big_file(tmp_path / "data", kind, 2 * KB)
    frames = frames_of(job(path, input_type="uri_file", size="2kb"))
    assert len(frames) >= os.path.getsize(path) // (4 * KB)
    assert_same_rows(frames, df)


@pytest.mark.parametrize("size", ["1kb", "10kb"])
def test_folder_of_mixed_files_never_mixes_files_in_a_batch(tmp_path, size):
    """Big and small files of every format: a batch holds rows of one file, except small
    parquet files of one schema, which may share a batch (never with another schema)."""
    nbytes = parse_size(size).value
    data = tmp_path / "data"
    expected, file_of, schema_of, sizes = [], {}, {}, {}

    def add(path, df, schema, fmt):
        expected.append(df)
        sizes.update(row_bytes(df, fmt, path))
        for i in df["id"]:
            file_of[i] = path.name
        schema_of[path.name] = schema

    start = 0
    for kind in FORMATS:
        path, df, fmt, _ = _big_file(data, kind, nbytes, start=start, seed=1)
        add(path, df, kind, fmt)
        start += len(df)
    for i in range(6):  # small parquet files: schemas A, A, B, A, A, B
        df = make_rows(5, start=start)
        schema = "B" if i % 3 == 2 else "A"
        if schema == "B":
            df = df.assign(extra=[1.5] * len(df))
        add(write_parquet(data / f"small-{i}.parquet", df), df, schema, "parquet")
        start += len(df)
    for i, (kind, write) in enumerate([("csv", write_csv), ("json_lines", write_jsonl)] * 2):
        df = make_rows(3, start=start)
        add(write(data / f"tiny-{i}.{'csv' if kind == 'csv' else 'jsonl'}", df), df, kind, kind)
        start += len(df)
    expected_df = pd.concat(expected, ignore_index=True)

    spec = job(data, size=size)
    frames = frames_of(spec)
    every = pd.concat(frames, ignore_index=True)
    assert_same_rows(frames, expected_df.drop(columns="extra"))
    assert sorted(every["id"][every["extra"].notna()]) == sorted(i for i in file_of if schema_of[file_of[i]] == "B")

    combined = 0
    for frame in frames:
        names = {file_of[i] for i in frame["id"]}
        if len(names) > 1:
            combined += 1
            assert all(n.endswith(".parquet") for n in names), names
            assert len({schema_of[n] for n in names}) == 1, names
            # Whole files only: a combined batch holds every row of each of its files.
            assert sorted(frame["id"]) == sorted(i for i in file_of if file_of[i] in names)
    pair = sum(_parquet_data_bytes(data / f"small-{i}.parquet") for i in (0, 1))
    if pair <= nbytes:  # small-0 and small-1 (schema A, neighbours) fit in one batch
        assert combined >= 1
    last_of_file = {k for k, f in enumerate(frames)
                    if k == len(frames) - 1 or file_of[f["id"].iloc[-1]] != file_of[frames[k + 1]["id"].iloc[0]]}
    check_batch_sizes(frames, sizes, nbytes, last_of_file)
    assert manifest(spec) == manifest(job(data, size=size))


def test_small_parquet_files_of_one_schema_share_batches(tmp_path):
    data = tmp_path / "data"
    dfs = [make_rows(4, start=10 * i) for i in range(20)]
    data_bytes = {}
    for i, df in enumerate(dfs):
        path = write_parquet(data / f"part-{i:02d}.parquet", df)
        data_bytes.update(dict.fromkeys(df["id"].tolist(), _parquet_data_bytes(path) / len(df)))
    frames = frames_of(job(data, size="4kb"))
    assert len(frames) < len(dfs)
    assert_same_rows(frames, pd.concat(dfs, ignore_index=True))
    for frame in frames:  # whole files, in listing order, up to the size (of data, not footers)
        assert len(frame) % 4 == 0
        assert sum(data_bytes[i] for i in frame["id"]) <= 4 * KB
    assert pd.concat(frames)["id"].tolist() == pd.concat(dfs)["id"].tolist()


def test_parquet_files_with_other_schemas_are_not_combined(tmp_path):
    data = tmp_path / "data"
    dfs = []
    for i in range(8):
        df = make_rows(4, start=10 * i)
        if i % 2:
            df = df.rename(columns={"text": "other"})  # same width, another schema
        dfs.append(df)
        write_parquet(data / f"part-{i}.parquet", df)
    frames = frames_of(job(data, size="1mb"))
    assert len(frames) == len(dfs)  # alternating schemas: no two neighbours can share a batch
    for frame, df in zip(frames, dfs, strict=True):
        assert frame["id"].tolist() == df["id"].tolist()
        assert list(frame.columns) == list(df.columns)


@pytest.mark.parametrize("kind", FORMATS)
def test_row_larger_than_the_size_is_whole_in_one_batch(tmp_path, kind):
    df = make_rows(200)
    df.loc[77, "text"] = "x" * (5 * KB)  # one row 5x the batch size
    data = tmp_path / "data"
    if kind.startswith("parquet"):
        path = write_parquet(data / "t.parquet", df, row_group_size=50 if kind == "parquet_row_groups" else None)
    elif kind == "csv":
        path = write_csv(data / "t.csv", df)
    else:
        path = write_jsonl(data / "t.jsonl", df)
    frames = frames_of(job(data, size="1kb"))
    assert_same_rows(frames, df)
    holder = [f for f in frames if 77 in set(f["id"])]
    assert len(holder) == 1 and holder[0].set_index("id").loc[77, "text"] == "x" * (5 * KB)
    if kind.startswith("parquet"):  # about what a row takes in the file
        sizes = {i: len(t) + len(n.encode()) + 24 for i, t, n in zip(df["id"], df["text"], df["name"], strict=True)}
    else:
        sizes = row_bytes(df, "csv" if kind == "csv" else "json_lines")
    assert sizes[77] > KB
    check_batch_sizes(frames, sizes, KB, last_of_file={len(frames) - 1})
    assert len(frames) >= (os.path.getsize(path) - 5 * KB) // (2 * KB)  # the big row aside


def test_plain_number_is_bytes_for_tables(tmp_path):
    # Azure: for tabular input mini_batch_size is an approximate data size, "1024" being bytes.
    df = make_rows(200)
    write_csv(tmp_path / "data" / "t.csv", df)
    by_number = job(tmp_path / "data", size=2048, fmt="csv")
    assert manifest(by_number) == manifest(job(tmp_path / "data", size="2kb", fmt="csv"))
    frames = frames_of(by_number)
    assert len(frames) >= os.path.getsize(tmp_path / "data" / "t.csv") // (4 * KB)
    assert_same_rows(frames, df)


def test_csv_tricky_values_round_trip(tmp_path):
    df = pd.DataFrame({
        "id": range(12),
        "name": TRICKY * 2,
        "note": ['a ""quoted"" word', "trailing space ", " leading", "tab\tinside", "semi;colon", "ß∂ƒ"] * 2,
    })
    write_csv(tmp_path / "data" / "t.csv", df)
    frames = frames_of(job(tmp_path / "data", size="1kb"))
    assert_same_rows(frames, df)


def test_plan_is_deterministic_regardless_of_creation_order(tmp_path):
    dfs = [make_rows(30, start=100 * i) for i in range(6)]
    names = [f"p{i}.parquet" if i % 3 == 0 else f"c{i}.csv" if i % 3 == 1 else f"j{i}.jsonl" for i in range(6)]
    for order, folder in ((range(6), "one"), (reversed(range(6)), "two")):
        for i in order:
            path = tmp_path / folder / names[i]
            {"p": write_parquet, "c": write_csv, "j": write_jsonl}[names[i][0]](path, dfs[i])
    one = manifest(job(tmp_path / "one", size="1kb"))
    assert one == manifest(job(tmp_path / "one", size="1kb"))
    assert one == manifest(job(tmp_path / "two", size="1kb"))


def test_empty_files_give_no_empty_batch(tmp_path):
    data = tmp_path / "data"
    df = make_rows(20)
    write_csv(data / "a.csv", df)
    write_csv(data / "b.csv", df.iloc[:0])  # header only
    (data / "c.csv").write_bytes(b"")
    (data / "d.jsonl").write_bytes(b"")
    write_parquet(data / "e.parquet", df.iloc[:0])
    frames = frames_of(job(data, size="1kb"))
    assert_same_rows(frames, df)


@pytest.mark.parametrize("ext", ["csv", "jsonl"])
def test_trailing_blank_lines_give_no_empty_batch(tmp_path, ext):
    # 64-byte lines: a 1kb batch is 17 lines (it ends at the end of the line the 1024th byte
    # starts), so 51 lines end a batch exactly where the file's trailing blank lines begin.
    ids = list(range(10_000, 10_051))
    if ext == "csv":
        text = "id,text\n" + "".join(f"{i},{'x' * 57}\n" for i in ids)
    else:
        text = "".join(json.dumps({"id": i, "text": "x" * 38}) + "\n" for i in ids)
        assert len(text) == 64 * len(ids)
    data = tmp_path / "data"
    data.mkdir()
    (data / f"t.{ext}").write_text(text + "\n\n")
    frames = frames_of(job(data, size="1kb"))
    assert_same_rows(frames, pd.DataFrame({"id": ids, "text": ["x" * (57 if ext == "csv" else 38)] * len(ids)}))


# -- 2. a single large parquet file gives many mini-batches ----------------------------------------


def test_one_large_parquet_file_gives_many_batches(tmp_path):
    df = make_rows(30_000, text_len=100)  # ~3.5 MB, written as a single row group
    path = write_parquet(tmp_path / "data" / "big.parquet", df)
    assert pq.read_metadata(path).num_row_groups == 1
    file_bytes = os.path.getsize(path)

    # The default byte size (no mini_batch_size, raypar.input_format parquet) cuts it too.
    default = frames_of(job(path, input_type="uri_file", fmt="parquet"))
    assert len(default) >= file_bytes // (1024 * KB)
    assert_same_rows(default, df)

    frames = frames_of(job(path, input_type="uri_file", size="256kb"))
    assert len(frames) >= file_bytes // (256 * KB)
    assert_same_rows(frames, df)
    check_batch_sizes(frames, row_bytes(df, "parquet", path), 256 * KB, {len(frames) - 1})


def test_a_row_group_up_to_twice_the_size_is_one_batch_so_it_is_decoded_once(tmp_path):
    from raypar.inputs.tabular import _rg_bytes

    df = make_rows(6000, text_len=100)  # one row group
    path = write_parquet(tmp_path / "data" / "rg.parquet", df)
    rg_bytes = _rg_bytes(pq.read_metadata(path).row_group(0))
    size = int(rg_bytes / 1.6) // 1024 * 1024

    frames = frames_of(job(path, input_type="uri_file", size=f"{size // 1024}kb"))

    assert len(frames) == 1  # not two slices that would each decode the whole row group
    assert_same_rows(frames, df)
    smaller = frames_of(job(path, input_type="uri_file", size=f"{rg_bytes // 3 // 1024}kb"))
    assert len(smaller) >= 3  # more than twice the size: cut, as before
    assert_same_rows(smaller, df)


def _count_decodes(monkeypatch) -> list:
    """Every real ``read_row_groups`` call (the row groups it decodes), recorded."""
    calls, real = [], pq.ParquetFile.read_row_groups

    def counted(self, row_groups, *args, **kwargs):
        calls.append(tuple(row_groups))
        return real(self, row_groups, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", counted)
    return calls


def test_the_slices_of_a_cut_row_group_decode_it_once_per_worker(tmp_path, monkeypatch):
    df = make_rows(30_000, text_len=100)  # one row group of ~3.5 MB, cut into 14 slices of 256kb
    path = write_parquet(tmp_path / "data" / "big.parquet", df)
    spec = job(path, input_type="uri_file", size="256kb")
    batches = plan(spec)
    assert len(batches) > 8
    decodes = _count_decodes(monkeypatch)

    frames = frames_of(spec)  # one reader: one worker reading the slices in order

    assert_same_rows(frames, df)
    assert [len(f) for f in frames] == [b.payload["pieces"][0]["rows"][1] - b.payload["pieces"][0]["rows"][0]
                                        for b in batches]
    assert decodes == [(0,)]

    # Two workers taking turns (the driver's waves): each decodes the row group once.
    decodes.clear()
    desc = check_input(spec)
    workers = [BatchReader(desc), BatchReader(desc)]
    turns = [workers[i % 2].read(batch)[0] for i, batch in enumerate(batches)]
    assert_same_rows(turns, df)
    assert [f["id"].iloc[0] for f in turns] == [f["id"].iloc[0] for f in frames]
    assert decodes == [(0,), (0,)]


def test_planning_says_once_which_row_groups_are_cut_and_the_size_that_keeps_them_whole(tmp_path, caplog):
    for name in ("a", "b"):
        write_parquet(tmp_path / "data" / f"{name}.parquet", make_rows(30_000, text_len=100))  # ~3 MiB row groups
    caplog.set_level("WARNING", logger="raypar")

    assert len(plan(job(tmp_path / "data", size="256kb"))) > 20

    cut = [r.getMessage() for r in caplog.records if "row groups" in r.getMessage()]
    assert len(cut) == 1, cut
    assert "a.parquet" in cut[0] and "(0.25 MiB)" in cut[0] and "at least 2 MiB" in cut[0]
    caplog.clear()
    assert len(plan(job(tmp_path / "data", size="2mb"))) == 2  # each row group whole: nothing to say
    assert not [r for r in caplog.records if "row groups" in r.getMessage()]


def test_a_cut_row_group_is_decoded_again_only_when_a_worker_moved_on(tmp_path, monkeypatch):
    a = write_parquet(tmp_path / "data" / "a.parquet", make_rows(20_000, text_len=100))
    b = write_parquet(tmp_path / "data" / "b.parquet", make_rows(20_000, start=100_000, text_len=100))
    whole = write_parquet(tmp_path / "data" / "c.parquet", make_rows(50, start=200_000))  # a small file: one batch
    batches = plan(job(tmp_path / "data", size="256kb"))
    of = {name: [x for x in batches if x.payload["pieces"][0]["file"].endswith(name)] for name in
          ("a.parquet", "b.parquet", "c.parquet")}
    assert len(of["a.parquet"]) > 3 and len(of["b.parquet"]) > 3 and len(of["c.parquet"]) == 1
    reader = BatchReader(check_input(job(tmp_path / "data", size="256kb")))
    decodes = _count_decodes(monkeypatch)

    # Interleaved files, a slice out of order, a whole file between slices: every read right.
    order = [of["a.parquet"][0], of["b.parquet"][0], of["a.parquet"][2], of["a.parquet"][1],
             of["c.parquet"][0], of["a.parquet"][3], *of["b.parquet"][1:]]
    frames = [reader.read(x)[0] for x in order]

    expected = pd.concat([pd.read_parquet(p) for p in (a, b, whole)], ignore_index=True)
    for frame, x in zip(frames, order, strict=True):  # each slice is exactly its planned rows
        start, end = x.payload["pieces"][0]["rows"]
        source = pd.read_parquet(tmp_path / "data" / x.payload["pieces"][0]["file"].rsplit("/", 1)[-1])
        pd.testing.assert_frame_equal(frame.reset_index(drop=True), source.iloc[start:end].reset_index(drop=True))
    assert sorted(pd.concat(frames)["id"]) == sorted(expected[expected["id"].isin(pd.concat(frames)["id"])]["id"])
    # a0, b0, a2 (a again), a1 (cached), c (whole: not kept), a3 (a again), the rest of b (b again, then cached)
    assert len(decodes) == 6

def test_a_worker_lets_its_last_row_group_go_before_decoding_another(tmp_path, monkeypatch):
    for name, start in (("a", 0), ("b", 100_000)):
        write_parquet(tmp_path / "data" / f"{name}.parquet", make_rows(20_000, start=start, text_len=100))
    spec = job(tmp_path / "data", size="256kb")
    batches = plan(spec)
    first_of_b = next(x for x in batches if x.payload["pieces"][0]["file"].endswith("b.parquet"))
    reader = BatchReader(check_input(spec))
    decoded, alive_at_decode, real = [], [], pq.ParquetFile.read_row_groups

    def measured(self, row_groups, *args, **kwargs):
        alive_at_decode.append([ref() is not None for ref in decoded])  # row groups still held
        table = real(self, row_groups, *args, **kwargs)
        decoded.append(weakref.ref(table))
        return table

    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", measured)
    frame = reader.read(batches[0])[0]  # a DataFrame, so only the worker's cache can hold the table
    kept = decoded[0]() is not None
    frame_b = reader.read(first_of_b)[0]

    # The process-wide Arrow allocation counter is no measure here: other threads of the process
    # and the parquet reader's own buffering move it (it read 7.6 MB alive where 2.9 MB was decoded).
    assert kept  # a's row group, kept for its next slice
    assert alive_at_decode == [[], [False]]  # ... and let go before b's was decoded
    assert len(frame) and len(frame_b) and frame_b["id"].iloc[0] == 100_000


@pytest.mark.xfail(strict=True, reason="BUG: a row group larger than the batch is cut into equal row counts, "
                   "so a skewed row group (long rows first) gives batches many times the size")
def test_skewed_row_group_is_cut_by_bytes_not_row_counts(tmp_path):
    rng = random.Random(1)
    # One row group: 20 rows of 900 bytes (each smaller than the 1kb size), then 400 rows of 10 bytes.
    texts = [rng.randbytes(450).hex() for _ in range(20)] + [rng.randbytes(5).hex() for _ in range(400)]
    df = pd.DataFrame({"id": range(len(texts)), "text": texts})
    write_parquet(tmp_path / "data" / "skewed.parquet", df)
    frames = frames_of(job(tmp_path / "data", size="1kb"))
    assert_same_rows(frames, df)
    for frame in frames:  # no row is larger than the size, so no batch may be twice the size
        assert frame["text"].str.len().sum() <= 2 * KB


# -- 3. CSV options via MLTable ----------------------------------------------------------------------


def delimited(folder: Path, size=None, keys=None, paths=None, **options):
    """An MLTable over ``folder/*.csv`` (or ``paths``) read with read_delimited ``options``."""
    steps = [{"read_delimited": options}]
    for column_step in ("keep_columns", "drop_columns", "extract_columns_from_partition_format"):
        if column_step in options:
            steps.append({column_step: options.pop(column_step)})
    write_mltable(folder, paths or [{"pattern": "./*.csv"}], steps)
    return job(folder, input_type="mltable", size=size, keys=keys)


def test_header_no_header_names_columns_column1_to_n(tmp_path):
    dfs = [make_rows(40, start=100 * i) for i in range(3)]
    for i, df in enumerate(dfs):
        write_csv(tmp_path / "t" / f"f{i}.csv", df, header=False)
    frames = frames_of(delimited(tmp_path / "t", size="1kb", header="no_header"))
    assert all(list(f.columns) == ["Column1", "Column2", "Column3", "Column4"] for f in frames)
    expected = pd.concat(dfs, ignore_index=True).set_axis(["Column1", "Column2", "Column3", "Column4"], axis=1)
    assert_same_rows(frames, expected, by="Column1")


def test_header_all_files_same_headers_reads_each_files_header(tmp_path):
    dfs = [make_rows(40, start=100 * i) for i in range(3)]
    for i, df in enumerate(dfs):
        write_csv(tmp_path / "t" / f"f{i}.csv", df)
    frames = frames_of(delimited(tmp_path / "t", size="1kb", header="all_files_same_headers"))
    assert len(frames) > 3  # the files are cut: pieces after the first still know the header
    assert all(list(f.columns) == list(dfs[0].columns) for f in frames)
    assert_same_rows(frames, pd.concat(dfs, ignore_index=True))


def test_header_all_files_different_headers(tmp_path):
    a = make_rows(30)
    b = make_rows(30, start=100).rename(columns={"text": "comment"})
    write_csv(tmp_path / "t" / "a.csv", a)
    write_csv(tmp_path / "t" / "b.csv", b)
    frames = frames_of(delimited(tmp_path / "t", size="1kb", header="all_files_different_headers"))
    every = pd.concat(frames, ignore_index=True)
    assert_same_rows(frames, pd.concat([a, b], ignore_index=True)[["id", "name", "value"]])
    assert normalized(every[every["id"] < 100])["text"].tolist() == a["text"].tolist()
    assert normalized(every[every["id"] >= 100])["comment"].tolist() == b["comment"].tolist()


def test_header_from_first_file_reads_other_files_first_line_as_data(tmp_path):
    dfs = [make_rows(40, start=100 * i) for i in range(3)]
    write_csv(tmp_path / "t" / "a.csv", dfs[0], header=True)
    write_csv(tmp_path / "t" / "b.csv", dfs[1], header=False)
    write_csv(tmp_path / "t" / "c.csv", dfs[2], header=False)
    spec = delimited(tmp_path / "t", size="1kb", header="from_first_file")
    frames = frames_of(spec)
    assert all(list(f.columns) == list(dfs[0].columns) for f in frames)
    assert_same_rows(frames, pd.concat(dfs, ignore_index=True))  # ids 100 and 200 are not lost
    assert manifest(spec) == manifest(spec)


def test_header_from_first_file_with_partition_keys_uses_the_first_listed_file(tmp_path):
    t = tmp_path / "t"
    east, west = make_rows(5), make_rows(5, start=100)
    # Listing order: "us-east/a.csv" < "us/b.csv" ("-" sorts before "/"); key order: "us" < "us-east".
    write_csv(t / "us-east" / "a.csv", east, header=True)
    write_csv(t / "us" / "b.csv", west, header=False)
    steps = [{"read_delimited": {"header": "from_first_file"}},
             {"extract_columns_from_partition_format": "{region}/*.csv"}]
    write_mltable(t, [{"pattern": "./*/*.csv"}], steps)
    batches, out = run_all(job(t, input_type="mltable", keys=["region"]))
    assert {ctx.partition_key_value["region"] for _, ctx in out} == {"us", "us-east"}
    for frame, ctx in out:
        expected = east if ctx.partition_key_value["region"] == "us-east" else west
        assert_same_rows([frame], expected.assign(region=ctx.partition_key_value["region"]))


@pytest.mark.parametrize("delimiter", [";", "\t"])
def test_delimiter(tmp_path, delimiter):
    df = make_rows(60)
    df["name"] = [f"a,b {i}" for i in range(60)]  # commas are plain text with another delimiter
    write_csv(tmp_path / "t" / "data.csv", df, sep=delimiter)
    frames = frames_of(delimited(tmp_path / "t", size="1kb", delimiter=delimiter))
    assert len(frames) > 1
    assert_same_rows(frames, df)


def test_tsv_extension_is_tab_separated_without_mltable(tmp_path):
    df = make_rows(30)
    write_csv(tmp_path / "data" / "data.tsv", df, sep="\t")
    assert_same_rows(frames_of(job(tmp_path / "data", size="1kb")), df)


NON_ASCII = ["café", "naïve", "Zürich", "façade, très", "Ærø", "señor"]


def test_encoding_latin1(tmp_path):
    df = pd.DataFrame({"id": range(120), "city": [NON_ASCII[i % 6] for i in range(120)]})
    path = write_csv(tmp_path / "t" / "data.csv", df, encoding="latin-1")
    with pytest.raises(UnicodeDecodeError):
        path.read_bytes().decode("utf-8")  # really latin-1 bytes
    frames = frames_of(delimited(tmp_path / "t", size="1kb", encoding="latin1"))
    assert len(frames) > 1
    assert_same_rows(frames, df)


@pytest.mark.parametrize("header", ["all_files_same_headers", "no_header"])
def test_encoding_utf8bom(tmp_path, header):
    df = pd.DataFrame({"id": range(120), "city": [NON_ASCII[i % 6] + " 日本" for i in range(120)]})
    path = write_csv(tmp_path / "t" / "data.csv", df, encoding="utf-8-sig", header=header != "no_header")
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    frames = frames_of(delimited(tmp_path / "t", size="1kb", encoding="utf8bom", header=header))
    if header == "no_header":
        df = df.set_axis(["Column1", "Column2"], axis=1)
    assert all(list(f.columns) == list(df.columns) for f in frames)  # no "\ufeffid"
    assert_same_rows(frames, df, by=df.columns[0])


def test_encoding_utf8bom_from_first_file_with_a_bom_in_every_file(tmp_path):
    # Excel writes a BOM at the start of every file; with from_first_file the others have no header.
    a, b = make_rows(20), make_rows(20, start=100)
    write_csv(tmp_path / "t" / "a.csv", a, encoding="utf-8-sig")
    write_csv(tmp_path / "t" / "b.csv", b, encoding="utf-8-sig", header=False)
    frames = frames_of(delimited(tmp_path / "t", encoding="utf8bom", header="from_first_file"))
    assert_same_rows(frames, pd.concat([a, b], ignore_index=True))


EMPTIES = b'id,name,note\n1,,x\n2,"",y\n3,z,\n4,w,""\n'


def test_empty_as_string_true_reads_empty_fields_as_empty_strings(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "e.csv").write_bytes(EMPTIES)
    [frame] = frames_of(delimited(tmp_path / "t", empty_as_string=True))
    assert frame["name"].tolist() == ["", "", "z", "w"]
    assert frame["note"].tolist() == ["x", "y", "", ""]


def test_empty_as_string_false_reads_empty_fields_as_null(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "e.csv").write_bytes(EMPTIES)
    [frame] = frames_of(delimited(tmp_path / "t", empty_as_string=False))
    assert frame["name"].isna().tolist() == [True, True, False, False]
    assert frame["note"].isna().tolist() == [False, False, True, True]
    assert frame["name"].dropna().tolist() == ["z", "w"]


def test_keep_columns(tmp_path):
    df = make_rows(50)
    write_csv(tmp_path / "t" / "data.csv", df)
    frames = frames_of(delimited(tmp_path / "t", size="1kb", keep_columns=["text", "id"]))
    assert all(list(f.columns) == ["text", "id"] for f in frames)
    assert_same_rows(frames, df[["text", "id"]])


def test_drop_columns(tmp_path):
    df = make_rows(50)
    write_csv(tmp_path / "t" / "data.csv", df)
    frames = frames_of(delimited(tmp_path / "t", size="1kb", drop_columns=["text", "value"]))
    assert all(list(f.columns) == ["id", "name"] for f in frames)
    assert_same_rows(frames, df[["id", "name"]])


@pytest.mark.parametrize("column", [None, "source_file"])
def test_include_path_column(tmp_path, column):
    dfs = [make_rows(30, start=100 * i) for i in range(3)]
    paths = [write_csv(tmp_path / "t" / f"f{i}.csv", df) for i, df in enumerate(dfs)]
    options = {"include_path_column": True} if column is None else {"include_path_column": True,
                                                                      "path_column": column}
    frames = frames_of(delimited(tmp_path / "t", size="1kb", **options))
    every = pd.concat(frames, ignore_index=True)
    column = column or "Path"
    for path, df in zip(paths, dfs, strict=True):
        mine = every[every["id"].isin(df["id"])]
        assert set(mine[column]) == {str(path)}
    assert_same_rows(frames, pd.concat(dfs, ignore_index=True))


def test_support_multi_line_keeps_quoted_newlines_in_one_row(tmp_path):
    df = make_rows(80)
    df["text"] = [f"line one {i}\nline two, {i}" for i in range(80)]  # a newline inside a quoted value
    write_csv(tmp_path / "t" / "data.csv", df)
    frames = frames_of(delimited(tmp_path / "t", size="1kb", support_multi_line=True))
    assert_same_rows(frames, df)


def test_infer_column_types_false_reads_text(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "data.csv").write_text("id,zip,price\n1,01234,1.50\n2,98765,2\n")
    [frame] = frames_of(delimited(tmp_path / "t", infer_column_types=False))
    assert frame.to_dict("list") == {"id": ["1", "2"], "zip": ["01234", "98765"], "price": ["1.50", "2"]}


@pytest.mark.parametrize("invalid_lines", ["error", "drop"])
def test_json_lines_invalid_lines(tmp_path, invalid_lines):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "data.jsonl").write_text('{"id": 1, "v": "a"}\nnot json\n{"id": 2, "v": "b"}\n')
    write_mltable(tmp_path / "t", [{"file": "./data.jsonl"}], [{"read_json_lines": {"invalid_lines": invalid_lines}}])
    spec = job(tmp_path / "t", input_type="mltable")
    if invalid_lines == "drop":
        [frame] = frames_of(spec)
        assert frame.to_dict("list") == {"id": [1, 2], "v": ["a", "b"]}
    else:
        with pytest.raises(ValueError, match="data.jsonl"):
            frames_of(spec)


# -- 4. read_parquet and read_json_lines MLTables ----------------------------------------------------------


@pytest.mark.parametrize("kind", ["file", "folder", "pattern"])
@pytest.mark.parametrize("fmt", ["parquet", "json_lines"])
def test_mltable_read_step_and_path_kinds(tmp_path, fmt, kind):
    ext, write = ("parquet", write_parquet) if fmt == "parquet" else ("jsonl", write_jsonl)
    dfs = [make_rows(40, start=100 * i) for i in range(3)]
    for i, df in enumerate(dfs):
        write(tmp_path / "t" / "data" / f"part-{i}.{ext}", df)
    (tmp_path / "t" / "data" / "README.txt").write_text("not data")  # a pattern or file entry skips it
    if kind == "file":
        paths, expected = [{"file": f"./data/part-2.{ext}"}, {"file": f"./data/part-0.{ext}"}], [dfs[2], dfs[0]]
    elif kind == "folder":
        (tmp_path / "t" / "data" / "README.txt").unlink()
        paths, expected = [{"folder": "./data"}], dfs
    else:
        paths, expected = [{"pattern": f"./data/*.{ext}"}], dfs
    write_mltable(tmp_path / "t", paths, [f"read_{fmt}"])
    spec = job(tmp_path / "t", input_type="mltable", size="1kb")
    frames = frames_of(spec)
    assert_same_rows(frames, pd.concat(expected, ignore_index=True))
    # Files in the MLTable's order (file entries as listed, folders and patterns sorted).
    assert pd.concat(frames)["id"].tolist() == pd.concat(expected)["id"].tolist()
    assert manifest(spec) == manifest(job(tmp_path / "t", input_type="mltable", size="1kb"))


def test_mltable_path_to_the_mltable_file_itself(tmp_path):
    df = make_rows(10)
    write_parquet(tmp_path / "t" / "a.parquet", df)
    write_mltable(tmp_path / "t", [{"file": "./a.parquet"}], ["read_parquet"])
    assert_same_rows(frames_of(job(tmp_path / "t" / "MLTable", input_type="mltable")), df)


@pytest.mark.parametrize("step", [{"take": 10}, {"filter": "col('id') > 3"}, "read_delta_lake",
                                  {"convert_column_types": [{"columns": "id", "column_type": "int"}]}])
def test_mltable_unsupported_transformation_names_it(tmp_path, step):
    write_parquet(tmp_path / "t" / "a.parquet", make_rows(5))
    write_mltable(tmp_path / "t", [{"file": "./a.parquet"}], ["read_parquet", step])
    name = step if isinstance(step, str) else next(iter(step))
    with pytest.raises(SpecError, match=name):
        check_input(job(tmp_path / "t", input_type="mltable"))


def test_mltable_missing_file_is_a_clear_error(tmp_path):
    write_parquet(tmp_path / "t" / "a.parquet", make_rows(5))  # a folder of data, but no MLTable
    with pytest.raises(SpecError, match="MLTable") as info:
        check_input(job(tmp_path / "t", input_type="mltable"))
    assert str(tmp_path / "t") in info.value.headline


def test_mltable_input_folder_missing_is_a_clear_error(tmp_path):
    with pytest.raises(SpecError, match="not found"):
        check_input(job(tmp_path / "nowhere", input_type="mltable"))


def test_mltable_path_entry_that_matches_nothing_is_a_clear_error(tmp_path):
    write_parquet(tmp_path / "t" / "a.parquet", make_rows(5))
    write_mltable(tmp_path / "t", [{"pattern": "./*.csv"}], ["read_delimited"])
    spec = job(tmp_path / "t", input_type="mltable")
    with pytest.raises(SpecError, match=r"\*\.csv"):
        plan(spec)


# -- 5. partition_keys ---------------------------------------------------------------------------------------


def hive_tree(root: Path) -> dict[tuple[str, str], list[pd.DataFrame]]:
    """store=S/brand=B/part-K.parquet files; returns the frames per (store, brand)."""
    layout = {("1", "x"): 2, ("1", "y"): 1, ("10", "x"): 1, ("2", "x"): 3, ("2", "z z"): 1}
    out, start = {}, 0
    for (store, brand), count in layout.items():
        for k in range(count):
            df = make_rows(7, start=start)
            start += 100
            write_parquet(root / f"store={store}" / f"brand={brand}" / f"part-{k}.parquet", df)
            out.setdefault((store, brand), []).append(df)
    return out


def test_partition_hive_folders_as_tables(tmp_path):
    parts = hive_tree(tmp_path / "data")
    spec = job(tmp_path / "data", keys=["store", "brand"], fmt="parquet")
    batches, out = run_all(spec)

    keys = [(ctx.partition_key_value["store"], ctx.partition_key_value["brand"]) for _, ctx in out]
    assert sorted(keys) == sorted(parts) and len(keys) == len(parts)  # one batch per combination
    for (frame, ctx), key in zip(out, keys, strict=True):
        assert ctx.partition_key_value == {"store": key[0], "brand": key[1]}
        assert list(ctx.partition_key_value) == ["store", "brand"]  # in partition_keys' order
        expected = pd.concat(parts[key], ignore_index=True)
        assert_same_rows([frame], expected)
    assert manifest(spec) == manifest(spec)


def test_partition_hive_folders_as_files(tmp_path):
    parts = hive_tree(tmp_path / "data")
    batches, out = run_all(job(tmp_path / "data", keys=["store", "brand"]))
    assert len(out) == len(parts)
    for paths, ctx in out:
        key = (ctx.partition_key_value["store"], ctx.partition_key_value["brand"])
        folder = tmp_path / "data" / f"store={key[0]}" / f"brand={key[1]}"
        assert paths == [str(p) for p in sorted(folder.iterdir())]
        assert pd.concat([pd.read_parquet(p) for p in paths], ignore_index=True).equals(
            pd.concat(parts[key], ignore_index=True))


def keyed_rows(n: int, start: int, seed: int) -> pd.DataFrame:
    """Rows whose (store, brand) keys repeat across files; store is null in some rows."""
    rng = random.Random(seed)
    df = make_rows(n, start=start, seed=seed)
    df.insert(1, "store", [rng.choice([1, 2, 3, None]) for _ in range(n)])
    df.insert(2, "brand", [rng.choice(["x", "y"]) for _ in range(n)])
    df["store"] = df["store"].astype("Int64")
    return df


def _check_data_partitions(out, expected: pd.DataFrame, keys=("store", "brand")):
    combos = expected[list(keys)].astype(object).where(expected[list(keys)].notna(), None)
    distinct = {tuple(r) for r in combos.itertuples(index=False)}
    seen = [tuple(ctx.partition_key_value[k] for k in keys) for _, ctx in out]
    assert len(seen) == len(set(seen)) and set(seen) == distinct  # one batch per combination
    for frame, ctx in out:
        value = ctx.partition_key_value
        mine = expected
        for k in keys:
            mine = mine[mine[k].isna()] if value[k] is None else mine[mine[k] == value[k]]
        assert_same_rows([frame], mine)
    assert_same_rows([f for f, _ in out], expected)


@pytest.mark.parametrize("how", ["input_format", "mltable"])
@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_partition_keys_inside_the_data(tmp_path, fmt, how):
    data = tmp_path / "data"
    dfs = [keyed_rows(40, start=1000 * i, seed=i) for i in range(4)]
    for i, df in enumerate(dfs):
        if fmt == "parquet":
            write_parquet(data / f"f{i}.parquet", df)
        else:
            write_csv(data / f"f{i}.csv", df)  # a null store is an empty field
    expected = pd.concat(dfs, ignore_index=True)
    assert expected["store"].isna().any()
    if fmt == "csv":  # CSV key columns are read as text (one type across files): the values are strings
        expected["store"] = pd.Series([None if pd.isna(v) else str(int(v)) for v in expected["store"]], dtype=object)
    if how == "mltable":
        write_mltable(data, [{"pattern": f"./*.{fmt}"}], ["read_parquet" if fmt == "parquet" else "read_delimited"])
        spec = job(data, input_type="mltable", keys=["store", "brand"])
    else:
        spec = job(data, keys=["store", "brand"], fmt=fmt)
    batches, out = run_all(spec)
    _check_data_partitions(out, expected)
    assert manifest(spec) == manifest(spec)


def test_partition_key_from_folder_and_key_from_data(tmp_path):
    data = tmp_path / "data"
    frames_by_store = {}
    for store in ("a", "b"):
        for i in range(2):
            df = keyed_rows(20, start=len(frames_by_store) * 1000 + i * 100, seed=i).drop(columns="store")
            write_parquet(data / f"store={store}" / f"f{i}.parquet", df)
            frames_by_store.setdefault(store, []).append(df.assign(store=store))
    expected = pd.concat([df for dfs in frames_by_store.values() for df in dfs], ignore_index=True)
    batches, out = run_all(job(data, keys=["store", "brand"], fmt="parquet"))
    _check_data_partitions([(f.assign(store=ctx.partition_key_value["store"]), ctx) for f, ctx in out], expected)


KEY_VALUES = {  # column: (value 0, value 1, how the context shows them); value 2 is null
    "day": (datetime.date(2024, 1, 1), datetime.date(2024, 2, 29), ["2024-01-01", "2024-02-29"]),
    "moment": (datetime.datetime(2024, 1, 1, 10), datetime.datetime(2024, 1, 1, 10, 0, 0, 500000),
               ["2024-01-01T10:00:00", "2024-01-01T10:00:00.500000"]),
    "flag": (True, False, [True, False]),
    "ratio": (1.5, -0.25, [1.5, -0.25]),
    "code": ("a", "b", ["a", "b"]),
}


@pytest.mark.parametrize("column", list(KEY_VALUES))
def test_partition_key_types_in_parquet(tmp_path, column):
    first, second, shown = KEY_VALUES[column]
    n = 24
    table = pa.table({"id": list(range(n)), column: [[first, second, None][i % 3] for i in range(n)]})
    (tmp_path / "data").mkdir()
    for i in range(3):  # every value in every file
        pq.write_table(table.slice(i * 8, 8), tmp_path / "data" / f"f{i}.parquet")
    batches, out = run_all(job(tmp_path / "data", keys=[column], fmt="parquet"))
    got = {json.dumps(ctx.partition_key_value[column]): sorted(f["id"]) for f, ctx in out}
    assert got == {json.dumps(value): [i for i in range(n) if i % 3 == k] for k, value in enumerate([*shown, None])}


def test_partition_key_column_with_numbers_in_one_file_and_text_in_another(tmp_path):
    data = tmp_path / "data"
    a = pd.DataFrame({"id": [1, 2, 3], "region": ["1", "2", "1"]})  # read as int64
    b = pd.DataFrame({"id": [4, 5, 6], "region": ["eu", "1", "us"]})  # read as text
    write_csv(data / "a.csv", a)
    write_csv(data / "b.csv", b)
    batches, out = run_all(job(data, keys=["region"], fmt="csv"))
    every = pd.concat([f for f, _ in out], ignore_index=True)
    assert sorted(every["id"]) == [1, 2, 3, 4, 5, 6]
    # One batch per distinct value as written in the files ("1" once, not once per file).
    assert sorted(str(ctx.partition_key_value["region"]) for _, ctx in out) == ["1", "2", "eu", "us"]
    for frame, ctx in out:
        assert {str(v) for v in frame["region"]} == {str(ctx.partition_key_value["region"])}


@pytest.mark.parametrize("with_keys", [True, False])
def test_mltable_partition_format_columns_in_frame_and_context(tmp_path, with_keys):
    t = tmp_path / "t"
    parts, start = {}, 0
    for store, brand, count in (("s1", "x", 2), ("s1", "y", 1), ("s2", "x", 1)):
        for k in range(count):
            df = make_rows(6, start=start)
            start += 100
            write_csv(t / store / brand / f"part-{k}.csv", df)
            parts.setdefault((store, brand), []).append(df)
    steps = ["read_delimited", {"extract_columns_from_partition_format": "{store}/{brand}/*.csv"}]
    write_mltable(t, [{"pattern": "./*/*/*.csv"}], steps)
    spec = job(t, input_type="mltable", keys=["store", "brand"] if with_keys else None)
    batches, out = run_all(spec)
    expected = pd.concat([df.assign(store=s, brand=b) for (s, b), dfs in parts.items() for df in dfs],
                         ignore_index=True)
    assert_same_rows([f for f, _ in out], expected)
    if with_keys:
        assert len(out) == len(parts)
        for frame, ctx in out:
            key = (ctx.partition_key_value["store"], ctx.partition_key_value["brand"])
            assert ctx.partition_key_value == {"store": key[0], "brand": key[1]}
            assert_same_rows([frame], pd.concat(parts[key]).assign(store=key[0], brand=key[1]))
    else:
        assert all(ctx.partition_key_value == {} for _, ctx in out)


@pytest.mark.parametrize("fmt", [None, "parquet"])
def test_partition_key_nowhere_is_a_spec_error_naming_it(tmp_path, fmt):
    hive_tree(tmp_path / "data")
    with pytest.raises(SpecError, match="'colour'"):
        plan(job(tmp_path / "data", keys=["store", "colour"], fmt=fmt))


def test_partition_keys_with_mini_batch_size_is_a_spec_error(tmp_path):
    hive_tree(tmp_path / "data")
    with pytest.raises(SpecError, match="partition_keys and mini_batch_size"):
        job(tmp_path / "data", keys=["store"], size="10kb")


@pytest.mark.parametrize("keys", [[], ["store", "store"]])
def test_partition_keys_empty_or_repeated_is_a_spec_error(tmp_path, keys):
    hive_tree(tmp_path / "data")
    with pytest.raises(SpecError, match="partition_keys"):
        check_input(job(tmp_path / "data", keys=keys))


# -- 6. input modes on a non-local filesystem ------------------------------------------------------------------


@pytest.fixture
def memory_root():
    """A fresh ``memory://`` folder (fsspec's in-process filesystem), removed afterwards."""
    fs = fsspec.filesystem("memory")
    bucket = f"/raypar-{uuid.uuid4().hex[:12]}"
    yield fs, f"memory://{bucket}/data", f"{bucket}/data"
    if fs.exists(bucket):
        fs.rm(bucket, recursive=True)


MEMORY_FILES = {"a.txt": b"alpha", "sub/b.txt": b"beta", "sub/deeper/c.bin": bytes(range(256)), "d e.txt": b"space"}


def _fill(fs, root: str, files: dict) -> None:
    for name, content in files.items():
        fs.pipe(f"{root}/{name}", content)


def test_memory_direct_mode_gives_uris(memory_root):
    fs, url, root = memory_root
    _fill(fs, root, MEMORY_FILES)
    batches, out = run_all(job(url, size=2, mode="direct"))
    uris = [u for paths, _ in out for u in paths]
    assert len(uris) == len(MEMORY_FILES)
    assert all(u.startswith("memory://") for u in uris)
    with_content = {}
    for u in uris:
        with fsspec.open(u, "rb") as f:
            with_content[u.split("/data/", 1)[1]] = f.read()
    assert with_content == MEMORY_FILES


def test_memory_download_mode_gives_local_copies_in_a_temp_folder(memory_root, tmp_path):
    fs, url, root = memory_root
    _fill(fs, root, MEMORY_FILES)
    spec = job(url, size=3, mode="download")
    desc = check_input(spec)
    reader = BatchReader(desc)
    seen = {}
    for batch in plan_batches(spec, desc):
        paths, _, temp = reader.read(batch)
        assert temp is not None and os.path.isdir(temp)
        for p in paths:
            assert os.path.isabs(p) and p.startswith(temp + os.sep)
            seen[os.path.relpath(p, temp)] = Path(p).read_bytes()
        input_files.cleanup(temp)
        assert not os.path.exists(temp)
    assert seen == MEMORY_FILES


def _one_ro_mount_batch(memory_root, tmp_path, monkeypatch):
    """MEMORY_FILES in one ro_mount mini-batch, cached under tmp_path/cache: (fs, root, cache, desc, batch)."""
    fs, url, root = memory_root
    cache = tmp_path / "cache"
    monkeypatch.setenv("RAYPAR_CACHE_DIR", str(cache))
    _fill(fs, root, MEMORY_FILES)
    spec = job(url, size=10, mode="ro_mount")
    desc = check_input(spec)
    [batch] = list(plan_batches(spec, desc))
    return fs, root, cache, desc, batch


def test_memory_ro_mount_caches_files_reuses_them_and_refetches_changed_ones(memory_root, tmp_path, monkeypatch):
    fs, root, cache, desc, batch = _one_ro_mount_batch(memory_root, tmp_path, monkeypatch)
    paths, _, temp = BatchReader(desc).read(batch)
    # run() gets the batch's own hard links to the cached files, in a folder removed after run()
    assert temp is not None and temp.startswith(str(cache) + os.sep)
    assert all(p.startswith(temp + os.sep) for p in paths)
    assert sorted(Path(p).read_bytes() for p in paths) == sorted(MEMORY_FILES.values())

    fetched = sorted(os.stat(p).st_ino for p in paths)
    input_files.cleanup(temp)
    again, _, temp = BatchReader(desc).read(batch)  # a retry, another worker: the cached copies, not fetched again
    assert sorted(os.stat(p).st_ino for p in again) == fetched
    # Held open, the old copies keep their inodes: a new file cannot be given one of their numbers.
    held = [open(p, "rb") for p in again]
    input_files.cleanup(temp)

    try:
        for name in MEMORY_FILES:  # the remote changed (a later job): never the stale copy
            fs.pipe(f"{root}/{name}", b"changed")
        changed, _, _ = BatchReader(desc).read(batch)
        assert [Path(p).read_bytes() for p in changed] == [b"changed"] * len(paths)
        assert not set(os.stat(p).st_ino for p in changed) & set(fetched)  # new files, not rewritten in place
        assert sorted(f.read() for f in held) == sorted(MEMORY_FILES.values())
    finally:
        for f in held:
            f.close()


def _cached_files(cache: Path) -> dict:
    """Cached file name -> size, the cache's own bookkeeping left out."""
    [root] = cache.iterdir()
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*")
            if p.is_file() and p.relative_to(root).parts[0] not in (".versions", ".batches", ".lock")}


def test_memory_ro_mount_cache_keeps_the_most_recently_used_files_within_its_limit(memory_root, tmp_path,
                                                                                    monkeypatch):
    fs, url, root = memory_root
    cache = tmp_path / "cache"
    monkeypatch.setenv("RAYPAR_CACHE_DIR", str(cache))
    files = {f"f{i:02d}.bin": bytes([i]) * 100 for i in range(12)}
    _fill(fs, root, files)
    spec = job(url, size=2, mode="ro_mount")
    desc = check_input(spec)
    reader = BatchReader(desc, cache_bytes=450)
    for batch in plan_batches(spec, desc):
        paths, _, temp = reader.read(batch)
        assert [Path(p).read_bytes() for p in paths] == [files[os.path.basename(p)] for p in paths]
        input_files.cleanup(temp)
        assert sum(_cached_files(cache).values()) <= 450 + 200  # one batch fetched past the last look
    kept = _cached_files(cache)
    assert set(kept) >= {"f10.bin", "f11.bin"}  # the last batch's files were used last
    assert "f00.bin" not in kept and len(kept) < len(files)
    assert not list((cache / next(cache.iterdir()).name / ".batches").iterdir())  # every batch folder removed


def test_memory_ro_mount_files_stay_readable_while_another_worker_evicts_them(memory_root, tmp_path, monkeypatch):
    fs, root, cache, desc, batch = _one_ro_mount_batch(memory_root, tmp_path, monkeypatch)
    paths, _, temp = BatchReader(desc).read(batch)  # run() holds these
    other = input_files.FileFetcher(open_source(desc, {}), max_bytes=0)  # another worker, a tiny limit
    other.evict()
    assert _cached_files(cache) == {}
    assert sorted(Path(p).read_bytes() for p in paths) == sorted(MEMORY_FILES.values())
    input_files.cleanup(temp)


def test_memory_ro_mount_file_evicted_between_its_fetch_and_its_link_is_fetched_again(memory_root, tmp_path,
                                                                                       monkeypatch):
    # Another worker with a tiny cache prunes right after each of this worker's fetches.
    fs, root, cache, desc, batch = _one_ro_mount_batch(memory_root, tmp_path, monkeypatch)
    other = input_files.FileFetcher(open_source(desc, {}), max_bytes=0)
    fetch = input_files.FileFetcher._cached

    def fetch_then_other_evicts(self, name):
        path = fetch(self, name)
        other.evict()
        return path

    monkeypatch.setattr(input_files.FileFetcher, "_cached", fetch_then_other_evicts)
    paths, _, temp = BatchReader(desc).read(batch)
    assert sorted(Path(p).read_bytes() for p in paths) == sorted(MEMORY_FILES.values())
    input_files.cleanup(temp)


def test_memory_ro_mount_removes_batch_folders_of_workers_that_died(memory_root, tmp_path, monkeypatch):
    fs, root, cache, desc, batch = _one_ro_mount_batch(memory_root, tmp_path, monkeypatch)
    _, _, mine = BatchReader(desc).read(batch)
    dead = Path(mine).parent / "999999999-deadbeef"  # no such process: a worker killed mid-batch
    (dead / "sub").mkdir(parents=True)
    (dead / "sub" / "b.txt").write_bytes(b"beta")
    BatchReader(desc).read(batch)  # a new worker looks at the cache with its first batch
    assert not dead.exists() and Path(mine).exists()  # a live worker's folder stays


def test_default_mode_is_ro_mount(memory_root, tmp_path, monkeypatch):
    fs, url, root = memory_root
    monkeypatch.setenv("RAYPAR_CACHE_DIR", str(tmp_path / "cache"))
    _fill(fs, root, MEMORY_FILES)
    [(paths, _)] = run_all(job(url, size=10))[1]
    assert all(p.startswith(str(tmp_path / "cache")) for p in paths)


@pytest.mark.parametrize("ext", ["parquet", "csv", "jsonl"])
def test_memory_tables_read_straight_from_the_filesystem(memory_root, tmp_path, ext):
    fs, url, root = memory_root
    dfs = [make_rows(50, start=100 * i) for i in range(3)]
    for i, df in enumerate(dfs):
        local = {"parquet": write_parquet, "csv": write_csv, "jsonl": write_jsonl}[ext](
            tmp_path / f"f{i}.{ext}", df, **({"row_group_size": 10} if ext == "parquet" else {}))
        fs.pipe(f"{root}/part/f{i}.{ext}", local.read_bytes())
    spec = job(url, size="1kb")
    frames = frames_of(spec)
    assert len(frames) > 3
    assert_same_rows(frames, pd.concat(dfs, ignore_index=True))
    assert manifest(spec) == manifest(job(url, size="1kb"))


def test_memory_mltable_with_partition_keys(memory_root, tmp_path):
    fs, url, root = memory_root
    dfs = [keyed_rows(30, start=1000 * i, seed=i) for i in range(3)]
    for i, df in enumerate(dfs):
        fs.pipe(f"{root}/f{i}.csv", write_csv(tmp_path / f"f{i}.csv", df).read_bytes())
    fs.pipe(f"{root}/MLTable", yaml.safe_dump({"paths": [{"pattern": "./*.csv"}],
                                               "transformations": ["read_delimited"]}).encode())
    batches, out = run_all(job(url, input_type="mltable", keys=["store", "brand"]))
    expected = pd.concat(dfs, ignore_index=True)
    expected["store"] = pd.Series([None if pd.isna(v) else str(int(v)) for v in expected["store"]], dtype=object)  # CSV keys: text
    _check_data_partitions(out, expected)


# -- 7. listing order ----------------------------------------------------------------------------------


TRICKY_TREE = ["a.txt", "a/b", "a/x", "a-b/c", "A", "10", "9", "a!x", "a0", "a/b.c/d", "a/b-c", "ß", "Z/z"]


def test_listing_is_sorted_full_path_order_local(tmp_path):
    root = tmp_path / "data"
    for name in TRICKY_TREE:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(name)
    listed = list(open_source(check_input(job(root)), {}).files())
    assert listed == sorted(TRICKY_TREE)
    assert listed.index("a.txt") < listed.index("a/x")  # "." sorts before "/"


def test_a_local_folder_s_first_file_comes_back_before_every_file_is_looked_at(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    for i in range(50):
        (root / f"f{i:02d}.txt").write_text(f"{i:02d}")
    source = open_source(check_input(job(root)), {})

    listing = source.files()

    assert next(listing) == "f00.txt"
    assert list(source.versions) == ["f00.txt"]  # the others' sizes and times are read as the walk reaches them
    assert [*listing] == [f"f{i:02d}.txt" for i in range(1, 50)]
    assert source.versions["f49.txt"] == source._info_version(str(root / "f49.txt"))  # as a resume reads it


def test_a_broken_link_in_a_local_folder_is_named_as_the_file(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "a.txt").write_text("a")
    (root / "b.txt").symlink_to(tmp_path / "gone.txt")

    with pytest.raises(SpecError, match=r"data/b.txt: input file not found \(a broken link, or removed while listed\)$"):
        list(open_source(check_input(job(root)), {}).files())


def test_listing_is_sorted_full_path_order_remote(memory_root):
    fs, url, root = memory_root
    _fill(fs, root, {name: name.encode() for name in TRICKY_TREE})
    assert list(open_source(check_input(job(url)), {}).files()) == sorted(TRICKY_TREE)
    # and the batches follow it
    assert [n for b in plan(job(url, size=4)) for n in b.payload["files"]] == sorted(TRICKY_TREE)


# -- edge cases found while documenting ----------------------------------------------------------


def test_keep_columns_with_a_partition_key_inside_the_data(tmp_path):
    df = make_rows(30)
    df["region"] = ["north" if i % 3 else "south" for i in range(30)]
    write_csv(tmp_path / "t" / "a.csv", df)
    batches, out = run_all(delimited(tmp_path / "t", keys=["region"], keep_columns=["id"]))
    for frame, ctx in out:
        assert list(frame.columns) == ["id"]  # the key column filtered the rows, then was dropped
        expected = df[df["region"] == ctx.partition_key_value["region"]]["id"].tolist()
        assert frame["id"].tolist() == expected


@pytest.mark.parametrize("encoding, codec", [("utf16", "utf-16"), ("utf32", "utf-32")])
def test_utf16_and_utf32_csv_are_read_whole_with_their_header(tmp_path, encoding, codec):
    df = make_rows(200)
    write_csv(tmp_path / "t" / "a.csv", df, encoding=codec)
    frames = frames_of(delimited(tmp_path / "t", size="1kb", encoding=encoding))
    assert len(frames) == 1  # a newline is not one byte: never cut
    assert_same_rows(frames, df)
    text = frames_of(delimited(tmp_path / "t", encoding=encoding, infer_column_types=False))[0]
    assert text["id"].tolist() == [str(i) for i in range(200)]
