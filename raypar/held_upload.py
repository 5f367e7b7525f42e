"""Remote write handles that upload while written and publish only when committed.

fsspec's transaction protocol: ``open(path, "wb", autocommit=False)``, write, ``close()``, then
``commit()`` makes the object appear whole, ``discard()`` drops what was uploaded. s3fs (a
multipart upload) and gcsfs (a resumable upload) keep it; adlfs commits its blocks on close
whatever ``autocommit`` says, so Azure gets a handle of its own here (staged blocks, one block
list committed at the end). A thread of each handle (``Uploading``) sends the parts, so the
writer goes on while one uploads. An output of many GB is then uploaded while the job runs,
never staged on the driver's disk, and a failure publishes nothing.

What a crash leaves is never visible: an S3 multipart upload (aborted by the next write of the
same object, see ``abort_stale``), GCS upload sessions and Azure uncommitted blocks (dropped by
the services after a week, Azure's also by the next commit).
"""

from __future__ import annotations

import collections
import logging
import threading
import uuid
from typing import Optional

from fsspec.asyn import sync
from fsspec.spec import AbstractBufferedFile

log = logging.getLogger("raypar")

# Bytes sent per part, block or chunk: the driver holds up to three (one waiting for the thread,
# one in the handle's buffer, one being sent). S3 allows 10,000 parts
# (640 GiB at this size, as much as s3fs's own uploads); Azure 50,000 blocks; GCS wants a
# multiple of 256 KiB.
PART_BYTES = 64 << 20


def open_held(fs, path: str) -> Optional[Uploading]:
    """A write handle for ``path`` that publishes on commit() only; None where the backend
    cannot hold an upload back (the caller stages the file and uploads it at the end)."""
    backend = _backend(fs)
    if backend == "s3":
        abort_stale(fs, path)
    if backend in ("s3", "gs"):
        return Uploading(fs.open(path, "wb", autocommit=False, block_size=PART_BYTES))
    if backend == "az":
        return Uploading(AzureHeldBlob(fs, path, block_size=PART_BYTES))
    return None


def look_at_bucket(fs, path: str) -> None:
    """Ask the service about the bucket or container of ``path``: FileNotFoundError when it
    answers that it does not exist; the service's own error for anything else (a wrong key, a
    role without the right to look)."""
    backend = _backend(fs)
    bucket = path.split("/", 1)[0]
    if backend == "s3":
        fs.call_s3("head_bucket", Bucket=bucket)  # s3fs: a 404 is FileNotFoundError, a 403 PermissionError
    elif backend == "gs":
        fs.call("GET", "b/{}", bucket, json_out=True)  # gcsfs: a 404 is FileNotFoundError
    elif backend == "az":
        from azure.core.exceptions import ResourceNotFoundError  # noqa: PLC0415 - lazy: raypar[azure] only

        try:
            sync(fs.loop, fs.service_client.get_container_client(bucket).get_container_properties)
        except ResourceNotFoundError:
            raise FileNotFoundError(bucket) from None


_BACKENDS = {"s3": "s3", "s3a": "s3", "gs": "gs", "gcs": "gs", "az": "az", "abfs": "az", "abfss": "az"}


def _backend(fs) -> Optional[str]:
    """Which of s3fs ("s3"), gcsfs ("gs") and adlfs ("az") ``fs`` is; None for any other filesystem."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    backend = next((_BACKENDS[p] for p in protocols if p in _BACKENDS), None)
    return None if backend == "az" and not hasattr(fs, "service_client") else backend


def abort_stale(fs, path: str) -> None:
    """Abort the multipart uploads a killed writer left on this S3 object (the job's lease makes
    this writer the only one): S3 bills their parts until they are aborted."""
    bucket, key, _ = fs.split_path(path)
    try:
        listing = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key)
        for upload in listing.get("Uploads", []):
            if upload["Key"] == key:
                fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload["UploadId"])
    except Exception as exc:  # noqa: BLE001 - a role without s3:ListBucketMultipartUploads still writes
        log.debug("raypar: stale uploads of %s were not looked for: %s", path, exc)


class AzureHeldBlob(AbstractBufferedFile):
    """A block blob written as staged blocks; commit() commits the block list (the blob appears
    whole), discard() leaves the blocks uncommitted (never visible)."""

    def __init__(self, fs, path: str, block_size: int):
        super().__init__(fs, path, mode="wb", block_size=block_size, autocommit=False)
        container, blob, _ = fs.split_path(path)
        self.client = fs.service_client.get_blob_client(container=container, blob=blob)
        self.blocks: list[str] = []

    def _initiate_upload(self) -> None:
        pass

    def _upload_chunk(self, final: bool = False) -> bool:
        data = self.buffer.getvalue()
        if data:
            block = uuid.uuid4().hex  # the length adlfs uses: a blob's block ids must all be one length
            sync(self.fs.loop, self.client.stage_block, block, data)
            self.blocks.append(block)
        return True

    def commit(self) -> None:
        from azure.storage.blob import BlobBlock  # noqa: PLC0415 - lazy: adlfs's SDK, installed with raypar[azure] only

        sync(self.fs.loop, self.client.commit_block_list, [BlobBlock(b) for b in self.blocks])

    def discard(self) -> None:
        self.blocks = []  # left uncommitted: the service drops them


class Uploading:
    """A held handle whose parts a thread of its own sends: the writer (the output's assembly)
    goes on encoding while a part uploads, instead of waiting for each one. At most ``limit``
    bytes wait for the thread; an upload's error is raised by the next write() or close()."""

    def __init__(self, handle: AbstractBufferedFile, limit: Optional[int] = None):
        self.handle, self.limit = handle, limit if limit is not None else PART_BYTES
        self.waiting: collections.deque = collections.deque()
        self.waiting_bytes = self.size = 0
        self.ending = False  # no more writes: the thread sends what waits, then stops
        self.error: Optional[BaseException] = None
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._send, name="raypar-output-upload", daemon=True)
        self.thread.start()

    closed = property(lambda self: self.ending)

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        data = bytes(data)  # a copy: pyarrow reuses its buffer once write() returns
        with self.cond:
            while self.waiting_bytes and self.waiting_bytes + len(data) > self.limit and self.error is None:
                self.cond.wait()
            self._raise_error()
            self.waiting.append(data)
            self.waiting_bytes += len(data)
            self.cond.notify_all()
        self.size += len(data)
        return len(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        pass

    def close(self) -> None:
        """Send what waits and the last part; the object is not visible until commit()."""
        self._stop()
        self._raise_error()
        self.handle.close()

    def commit(self) -> None:
        self.handle.commit()

    def discard(self) -> None:
        """Drop what waits, let a part being sent finish, and drop what was uploaded."""
        self._stop(drop=True)
        self.handle.discard()

    def _stop(self, drop: bool = False) -> None:
        with self.cond:
            if drop:
                self.waiting.clear()
            self.ending = True
            self.cond.notify_all()
        self.thread.join()

    def _raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def _send(self) -> None:
        while True:
            with self.cond:
                while not self.waiting and not self.ending:
                    self.cond.wait()
                if not self.waiting or self.error is not None:
                    return
                data = self.waiting.popleft()
            try:
                self.handle.write(data)  # uploads a part each time the handle holds PART_BYTES
            except BaseException as exc:  # noqa: BLE001 - raised in the writer's thread
                with self.cond:
                    self.error = exc
                    self.waiting.clear()
                    self.cond.notify_all()
                return
            with self.cond:
                self.waiting_bytes -= len(data)
                self.cond.notify_all()
