"""An input folder on an object store is listed flat, a page at a time, in the order raypar plans
files: on Azurite, moto's S3 server and the GCS emulator, the same names and file versions as the
walk folder by folder that planned earlier jobs (a resume compares versions with them), the first
names back after the first page, and a store that lists out of order refused by name."""

from __future__ import annotations

import fsspec
import pytest

from raypar.errors import SpecError, StorageError
from raypar.inputs import check_input, flat_listing
from raypar.inputs.source import file_version, open_source
from raypar.spec.loading import as_spec

# Names whose order tells a flat key listing from a careless walk: "." and "-" sort before "/",
# digits and capitals before lower case, a folder next to a file of the same stem, a folder marker.
TREE = ["a.txt", "a/b", "a/x", "a-b/c", "A", "10", "9", "a!x", "a0", "a/b.c/d", "a/b-c", "ß", "Z/z",
        "deep/1/2/3/4.txt", "sub/one.txt", "sub/two.txt"]
PAGE = 3  # names per request here: the tree takes six pages


@pytest.fixture(params=["azure", "s3", "gcs"])
def store(request):
    """(protocol, bucket, fsspec options, a filesystem of its own) on a fresh container or bucket."""
    if request.param == "azure":
        azurite = request.getfixturevalue("azurite")
        protocol, bucket, options = "az", azurite.new_container(), {"connection_string": azurite.connection_string}
    else:
        server = request.getfixturevalue({"s3": "s3_server", "gcs": "gcs_server"}[request.param])
        protocol, bucket, options = server.protocol, server.new_bucket(), server.options
    return protocol, bucket, options, fsspec.filesystem(protocol, **options, skip_instance_cache=True,
                                                        use_listings_cache=False)


def input_source(store, folder: str):
    protocol, bucket, options, _ = store
    spec = as_spec({"type": "parallel", "inputs": {"data": {"type": "uri_folder", "path": f"{protocol}://{bucket}/{folder}"}},
                    "input_data": "${{inputs.data}}", "task": {"code": "/tmp", "entry_script": "score.py"}})
    return open_source(check_input(spec, {protocol: options}), {protocol: options})


def fill(store, folder: str, names) -> None:
    _, bucket, _, fs = store
    fs.pipe({f"{bucket}/{folder}/{name}": name.encode() for name in names})


def test_a_folder_is_listed_flat_in_the_walk_s_order_with_the_walk_s_versions(store, monkeypatch):
    monkeypatch.setattr(flat_listing, "PAGE_SIZE", PAGE)
    _, bucket, _, fs = store
    fill(store, "data", TREE)
    fs.pipe({f"{bucket}/other.txt": b"beside the folder", f"{bucket}/data-2/x": b"a sibling with a longer name"})

    flat = input_source(store, "data")
    names = list(flat.files())
    walked = input_source(store, "data")
    by_walk = list(walked._walk(walked.root, ""))

    assert names == sorted(TREE) == by_walk
    assert flat.versions == walked.versions  # what a resume and the workers' cache compare
    assert flat.versions["sub/one.txt"] == file_version(fs.info(f"{bucket}/data/sub/one.txt"))


def test_the_first_names_come_back_after_the_first_page(store, monkeypatch):
    monkeypatch.setattr(flat_listing, "PAGE_SIZE", PAGE)
    fill(store, "data", TREE)
    source = input_source(store, "data")

    listing = source.files()
    first = next(listing)

    assert first == sorted(TREE)[0]
    assert len(source.versions) <= PAGE  # only the first page was asked for
    assert [first, *listing] == sorted(TREE)


def test_folder_markers_are_not_files_and_a_folder_of_markers_lists_nothing(store, monkeypatch):
    monkeypatch.setattr(flat_listing, "PAGE_SIZE", PAGE)
    _, bucket, _, fs = store
    fs.pipe({f"{bucket}/data/kept/": b"", f"{bucket}/data/kept/f.txt": b"f", f"{bucket}/data/empty/": b"",
             f"{bucket}/markers/a/": b"", f"{bucket}/markers/b/": b""})

    assert list(input_source(store, "data").files()) == ["kept/f.txt"]
    assert list(input_source(store, "markers").files()) == []


def test_a_store_listing_out_of_order_is_refused_by_name(store, monkeypatch):
    fill(store, "data", ["a.txt", "b.txt", "c.txt"])
    source = input_source(store, "data")
    protocol, bucket, _, _ = store
    reversed_pages = iter([[(f"{bucket}/data/c.txt", {"etag": "3"})], [(f"{bucket}/data/a.txt", {"etag": "1"})]])
    monkeypatch.setattr(flat_listing, "pages", lambda fs, folder: reversed_pages)  # a store that sorts otherwise

    with pytest.raises(StorageError, match=rf"{protocol}://{bucket}/data: the store listed a.txt after c.txt"):
        list(source.files())


def test_the_first_request_asks_for_a_small_page_and_the_listing_goes_on_from_where_it_ended(store, monkeypatch):
    monkeypatch.setattr(flat_listing, "FIRST_PAGE_SIZE", 2)
    fill(store, "data", TREE)
    source = input_source(store, "data")

    listing = source.files()
    first = next(listing)

    assert len(source.versions) <= 2
    assert [first, *listing] == sorted(TREE)  # the next requests continue from its last name


def test_an_input_gone_since_its_check_is_named_not_found(store):
    protocol, bucket, _, fs = store
    fill(store, "data", ["a.txt", "b.txt"])
    source = input_source(store, "data")  # checked: it exists
    fs.rm(bucket, recursive=True)

    with pytest.raises(SpecError, match=rf"^{protocol}://{bucket}/data: input folder not found$"):
        list(source.files())
