"""Every file below a folder of an object store, in key order, a page at a time.

S3, Azure Blob Storage and Google Cloud Storage list the keys under a prefix in
key order, which is the order raypar plans files in (sorted full paths; see
``Source.files``). One flat listing of the folder's prefix therefore gives
raypar's order as it comes: the first page (100 names, then pages of the
store's maximum: 1,000 on S3 and GCS, 5,000 on Azure) yields the first
mini-batches while the rest is still being listed, and
a tree of many small folders costs a request per page instead of one or more
per folder, one folder after the other (fsspec's ``ls``, which also waits for a
folder's every page before it returns).

``pages`` returns None for any other filesystem (local disk, memory, a
version-aware bucket): the caller walks those folder by folder, as before.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Iterator, Optional

from fsspec.asyn import sync

PAGE_SIZE: Optional[int] = None  # names per request; None: the store's own maximum
# The first request asks for fewer: the driver waits for the first mini-batch before it starts
# anything, and a page of a store's maximum (5,000 on Azure) takes longer to come than the walk's
# first small folder would; the pages after it are listed while the workers start.
FIRST_PAGE_SIZE = 100

Page = list[tuple[str, dict]]  # (fs path, the listing's info of the file: what file_version reads)


def pages(fs: Any, folder: str) -> Optional[Iterator[Page]]:
    """The files below ``folder`` (an fs path), a page at a time, each page in key order;
    None where ``fs`` is not an object store this module lists."""
    listing = _listing_for(fs)
    if listing is None:
        return None
    bucket, _, key = folder.strip("/").partition("/")
    first = min(FIRST_PAGE_SIZE, PAGE_SIZE or FIRST_PAGE_SIZE)
    return _pulled(fs, listing(fs, bucket, f"{key}/" if key else "", first))


def _listing_for(fs: Any):
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    if getattr(fs, "version_aware", False) or getattr(fs, "asynchronous", False):
        return None  # a version-aware bucket lists versions; a filesystem on the caller's own loop cannot sync()
    if "s3" in protocols and hasattr(fs, "_call_s3"):
        return _s3_pages
    if "az" in protocols and hasattr(fs, "service_client"):
        return _azure_pages
    if "gs" in protocols and hasattr(fs, "_call"):
        return _gcs_pages
    return None


def _pulled(fs: Any, listing: AsyncIterator[Page]) -> Iterator[Page]:
    """The async listing as a plain iterator: each page is asked for only when the one before is used."""
    while True:
        try:
            yield sync(fs.loop, listing.__anext__)
        except StopAsyncIteration:
            return


async def _s3_pages(fs: Any, bucket: str, prefix: str, first: int) -> AsyncIterator[Page]:
    request = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": first, **getattr(fs, "req_kw", {})}
    while True:
        out = await fs._call_s3("list_objects_v2", **request)
        yield [(f"{bucket}/{c['Key']}", c) for c in out.get("Contents", []) if not c["Key"].endswith("/")]
        if not out.get("IsTruncated"):
            return
        request["ContinuationToken"] = out["NextContinuationToken"]
        request["MaxKeys"] = PAGE_SIZE or 1000


async def _azure_pages(fs: Any, container: str, prefix: str, first: int) -> AsyncIterator[Page]:
    client = fs.service_client.get_container_client(container)

    def listed(size: Optional[int], token: Optional[str] = None):
        blobs = client.list_blobs(name_starts_with=prefix or None, include=["metadata"], results_per_page=size)
        return blobs.by_page(continuation_token=token)

    from azure.core.exceptions import ResourceNotFoundError  # noqa: PLC0415 - adlfs's dependency, as adlfs loads it

    opening = listed(first)
    try:
        yield await _azure_files(container, await opening.__anext__())
    except ResourceNotFoundError as exc:  # the container: what fsspec calls it
        raise FileNotFoundError(f"{container}: {exc.reason}") from None
    if opening.continuation_token:  # the rest in pages of the store's size, from where the first ended
        async for page in listed(PAGE_SIZE, opening.continuation_token):
            yield await _azure_files(container, page)


async def _azure_files(container: str, page) -> Page:
    files = []
    async for blob in page:
        if not blob.name.endswith("/") and not _azure_folder(blob.metadata or {}):
            files.append((f"{container}/{blob.name}",
                          {"etag": blob.etag, "size": blob.size, "last_modified": blob.last_modified}))
    return files


def _azure_folder(metadata: dict) -> bool:
    """A directory of a hierarchical-namespace account (or a folder marker a tool wrote), as adlfs tells them."""
    flags = {k.lower(): v for k, v in metadata.items()}
    return flags.get("is_directory") == "true" or flags.get("hdi_isfolder") == "true"


async def _gcs_pages(fs: Any, bucket: str, prefix: str, first: int) -> AsyncIterator[Page]:
    request = {"prefix": prefix, "maxResults": first}
    while True:
        out = await fs._call("GET", "b/{}/o", bucket, json_out=True, **request)
        yield [(f"{bucket}/{o['name']}", o) for o in out.get("items", []) if not o["name"].endswith("/")]
        if not out.get("nextPageToken"):
            return
        request["pageToken"] = out["nextPageToken"]
        request["maxResults"] = PAGE_SIZE or 1000
