"""pytest plugin: real S3 and GCS endpoints on 127.0.0.1 (moto's S3 server, gcp-storage-emulator).

Like ``azurite``, each fixture starts one server per test session on a free port, keeps
nothing on disk, and hands tests a fresh bucket each from ``new_bucket()``. ``env`` is what a
user sets to reach it: raypar takes S3 and GCS credentials from those standard variables.

The packages come with the test extra (``pip install -e ".[test]"``); without them the
fixtures fail (they do not skip): CI must run the S3 and GCS tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

START_TIMEOUT = 60.0


@dataclass
class ObjectStoreServer:
    """A running S3 or GCS emulator."""

    protocol: str  # "s3" or "gs"
    endpoint: str  # http://127.0.0.1:<port>
    env: dict  # the standard variables that point a client at it
    options: dict  # the fsspec options those variables amount to
    pid: int = 0
    _fs: object = field(default=None, repr=False)

    def new_bucket(self) -> str:
        """Create a bucket nobody else uses; returns its name."""
        name = f"raypar-{uuid.uuid4().hex[:16]}"
        self._fs.mkdir(name)
        return name

    def filesystem(self):
        """A client of its own (no listings cache): what another process would see."""
        import fsspec

        return fsspec.filesystem(self.protocol, **self.options, use_listings_cache=False, skip_instance_cache=True)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serve(command: list[str], server: ObjectStoreServer, log_path):
    """Start ``command``, poll a real request until it answers; yields the server, stops it after."""
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server.pid = proc.pid
    try:
        server._fs = server.filesystem()
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                server._fs.ls("")
                break
            except Exception as exc:  # noqa: BLE001 - any answer but success means "not yet"
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"{' '.join(command[1:3])} does not answer ({exc}):\n{log_path.read_text(errors='replace')}",
                                pytrace=False)
            time.sleep(0.1)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's S3 server for the session, on 127.0.0.1; its keys are moto's test keys (not secrets)."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret",
           "AWS_DEFAULT_REGION": "eu-west-1", "AWS_ENDPOINT_URL": endpoint}
    options = {"key": "testing", "secret": "testing-secret", "endpoint_url": endpoint,
               "client_kwargs": {"region_name": "eu-west-1"}}
    server = ObjectStoreServer("s3", endpoint, env, options)
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    # moto with its conditional writes made atomic (see s3_emulator.py): a lease race has one winner.
    command = [sys.executable, str(Path(__file__).with_name("s3_emulator.py")), "-H", "127.0.0.1", "-p", str(port)]
    yield from _serve(command, server, log)


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
    """gcp-storage-emulator for the session, on 127.0.0.1, in memory (no auth, as emulators go)."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"STORAGE_EMULATOR_HOST": endpoint}
    server = ObjectStoreServer("gs", endpoint, env, {"endpoint_url": endpoint, "token": "anon"})
    log = tmp_path_factory.mktemp("gcs") / "gcs.log"
    # The emulator with GCS's ifGenerationMatch=0 precondition, which it lacks (see gcs_emulator.py).
    command = [sys.executable, str(Path(__file__).with_name("gcs_emulator.py")), "127.0.0.1", str(port)]
    yield from _serve(command, server, log)


# gcsfs asks a gRPC endpoint whether a bucket is "zonal" before most calls; an emulator has
# none, and each question waits 60 s. Off for the tests' processes and the Ray they start.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
