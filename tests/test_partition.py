"""File partitioning: plan_batches / materialize on real folders (no Ray)."""

import os
from pathlib import Path

import pytest

from raypar.errors import SpecError
from raypar.inputs import BatchReader, MiniBatch, check_input, plan_batches
from raypar.spec.loading import spec_from_dict


def make_files(root: Path, names) -> Path:
    """Create ``names`` (relative, may contain folders) under ``root``, each holding its own name."""
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(name)
    return root


def numbered(count: int) -> list[str]:
    return [f"f{i:03d}.txt" for i in range(count)]


def file_spec(path: Path, input_type: str = "uri_folder", size=None):
    data = {
        "type": "parallel",
        "inputs": {"data": {"type": input_type, "path": str(path)}},
        "input_data": "${{inputs.data}}",
        "task": {"code": str(path.parent), "entry_script": "score.py"},
    }
    if size is not None:
        data["mini_batch_size"] = size
    return spec_from_dict(data)


def plan(path: Path, input_type: str = "uri_folder", size=None) -> list[MiniBatch]:
    return plan_spec(file_spec(path, input_type, size))


def plan_spec(spec) -> list[MiniBatch]:
    return list(plan_batches(spec, check_input(spec)))


def materialize(batch: MiniBatch, spec):
    return BatchReader(check_input(spec)).read(batch)[0]


def all_files(batches: list[MiniBatch]) -> list[str]:
    return [name for b in batches for name in b.payload["files"]]


# -- folders --------------------------------------------------------------------


def test_every_file_below_the_folder_once_in_sorted_order(tmp_path):
    names = ["b.txt", "a.txt", "a/1.txt", "a/2/deep.txt", "z/y/x.bin", ".hidden", "A.txt", "a b.txt"]
    root = make_files(tmp_path / "data", names)
    batches = plan(root, size=3)

    assert all_files(batches) == sorted(names)
    assert len(set(all_files(batches))) == len(names)


def test_order_does_not_depend_on_creation_order(tmp_path):
    names = numbered(12)
    first = plan(make_files(tmp_path / "one", names), size=5)
    second = plan(make_files(tmp_path / "two", list(reversed(names))), size=5)
    assert [b.payload for b in first] == [b.payload for b in second]


def test_batch_sizes_and_last_partial_batch(tmp_path):
    batches = plan(make_files(tmp_path / "data", numbered(23)), size=5)

    assert [b.item_count for b in batches] == [5, 5, 5, 5, 3]
    assert [len(b.payload["files"]) for b in batches] == [5, 5, 5, 5, 3]
    assert batches[-1].payload == {"files": ["f020.txt", "f021.txt", "f022.txt"]}


def test_exact_multiple_has_no_empty_batch(tmp_path):
    batches = plan(make_files(tmp_path / "data", numbered(10)), size="5")
    assert [b.item_count for b in batches] == [5, 5]


def test_default_is_ten_files_per_batch(tmp_path):
    batches = plan(make_files(tmp_path / "data", numbered(25)))
    assert [b.item_count for b in batches] == [10, 10, 5]


def test_batch_bigger_than_input(tmp_path):
    batches = plan(make_files(tmp_path / "data", numbered(3)), size=100)
    assert [b.payload for b in batches] == [{"files": numbered(3)}]


def test_stable_ids_and_ordinals(tmp_path):
    batches = plan(make_files(tmp_path / "data", numbered(7)), size=2)

    assert [b.id for b in batches] == ["mb-0000000", "mb-0000001", "mb-0000002", "mb-0000003"]
    assert [b.ordinal for b in batches] == [0, 1, 2, 3]
    assert {b.kind for b in batches} == {"files"}


def test_second_plan_is_identical(tmp_path):
    root = make_files(tmp_path / "data", ["x/1.txt", "x/2.txt", "y.txt", "z/3.txt", "z/4.txt"])
    spec = file_spec(root, size=2)
    first = plan_spec(spec)
    second = plan_spec(spec)
    assert first == second
    assert [b.to_json() for b in first] == [b.to_json() for b in second]


# -- single files ---------------------------------------------------------------


def test_uri_file_is_one_batch_of_one_file(tmp_path):
    make_files(tmp_path / "data", ["only.csv", "other.csv"])
    batches = plan(tmp_path / "data" / "only.csv", input_type="uri_file", size=10)

    assert len(batches) == 1
    assert batches[0].id == "mb-0000000"
    assert batches[0].item_count == 1
    assert batches[0].payload == {"files": ["only.csv"]}


# -- errors -----------------------------------------------------------------------


def assert_plan_error(path: Path, input_type: str = "uri_folder", size=None, *fragments: str) -> None:
    with pytest.raises(SpecError) as info:
        plan(path, input_type, size)
    assert "\n" not in info.value.headline
    for fragment in fragments:
        assert fragment in info.value.headline


def test_missing_input_path(tmp_path):
    missing = tmp_path / "nope"
    assert_plan_error(missing, "uri_folder", None, str(missing), "not found")
    assert_plan_error(missing, "uri_file", None, str(missing), "not found")


def test_uri_file_pointing_at_a_folder(tmp_path):
    root = make_files(tmp_path / "data", ["a.txt", "b.txt"])
    assert_plan_error(root, "uri_file", None, str(root), "folder")


def test_uri_file_pointing_at_an_empty_folder(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    assert_plan_error(root, "uri_file", None, str(root), "folder")


def test_uri_file_pointing_at_a_folder_with_one_file(tmp_path):
    root = make_files(tmp_path / "data", ["a.txt"])
    assert_plan_error(root, "uri_file", None, str(root), "folder")


def test_uri_folder_pointing_at_a_file(tmp_path):
    make_files(tmp_path / "data", ["a.txt"])
    target = tmp_path / "data" / "a.txt"
    assert_plan_error(target, "uri_folder", None, str(target), "file")


@pytest.mark.parametrize("input_type", ["uri_folder", "uri_file"])
def test_byte_size_on_files_that_are_not_tables(tmp_path, input_type):
    # A byte size reads the input as a table; text files are not one: a clear error, naming the file.
    make_files(tmp_path / "data", ["a.txt"])
    path = tmp_path / "data" if input_type == "uri_folder" else tmp_path / "data" / "a.txt"
    spec = file_spec(path, input_type, "10kb")
    with pytest.raises(SpecError) as info:
        plan_spec(spec)
    assert "a.txt: not a table file" in info.value.headline
    assert "a byte size for mini_batch_size reads the input as tables" in info.value.headline


# -- the manifest line and the worker side ---------------------------------------


def test_minibatch_json_round_trip(tmp_path):
    batches = plan(make_files(tmp_path / "data", ["a.txt", "sub/b.txt", "ü.txt"]), size=2)
    for batch in batches:
        line = batch.to_json()
        assert "\n" not in line
        assert MiniBatch.from_json(line) == batch
        assert MiniBatch.from_json(line).id == batch.id


def test_minibatch_from_json_rejects_mismatched_id():
    line = MiniBatch(ordinal=3, kind="files", payload={"files": ["a"]}, item_count=1).to_json()
    tampered = line.replace("mb-0000003", "mb-0000004")
    with pytest.raises(ValueError):
        MiniBatch.from_json(tampered)


def test_materialize_gives_absolute_local_paths(tmp_path):
    names = ["a.txt", "sub/b.txt", "sub/deeper/c.txt"]
    root = make_files(tmp_path / "data", names)
    spec = file_spec(root, size=2)
    batches = plan_spec(spec)

    paths = [p for b in batches for p in materialize(b, spec)]

    assert paths == [str(root.resolve() / n) for n in sorted(names)]
    assert all(os.path.isabs(p) for p in paths)
    assert [Path(p).read_text() for p in paths] == sorted(names)


def test_materialize_uri_file(tmp_path):
    make_files(tmp_path / "data", ["only.csv", "other.csv"])
    target = tmp_path / "data" / "only.csv"
    spec = file_spec(target, "uri_file")
    (batch,) = plan_spec(spec)
    assert materialize(batch, spec) == [str(target.resolve())]


def test_materialize_unknown_kind(tmp_path):
    spec = file_spec(make_files(tmp_path / "data", ["a.txt"]))
    with pytest.raises(ValueError, match="tables"):
        materialize(MiniBatch(ordinal=0, kind="tables", payload={}), spec)
