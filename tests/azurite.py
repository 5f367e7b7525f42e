"""pytest plugin: a real Azure Blob endpoint (Microsoft's Azurite emulator) on 127.0.0.1.

The ``azurite`` fixture starts one Azurite blob service per test session, on a
free port, with nothing kept on disk. Tests get a fresh container each from
``azurite.new_container()``, so they never see each other's blobs.

Azurite comes from npm: the README's test command installs it into
``node_modules/`` of the repository. Without it the fixture fails (it does not
skip): CI must run the Azure tests.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# The emulator's well-known development account (published in Azurite's README); not a secret.
ACCOUNT_NAME = "devstoreaccount1"
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="

START_TIMEOUT = 60.0
_LISTENING = re.compile(rb"listens on https?://127\.0\.0\.1:(\d+)")


@dataclass
class Azurite:
    """A running Azurite blob service."""

    endpoint: str  # http://127.0.0.1:<port>/devstoreaccount1
    account_name: str = ACCOUNT_NAME
    account_key: str = ACCOUNT_KEY
    pid: int = 0  # the emulator's process: fault tests freeze it (SIGSTOP) and thaw it (SIGCONT)
    _service: object = field(default=None, repr=False)

    @property
    def connection_string(self) -> str:
        return (f"DefaultEndpointsProtocol=http;AccountName={self.account_name};"
                f"AccountKey={self.account_key};BlobEndpoint={self.endpoint};")

    def new_container(self) -> str:
        """Create a container nobody else uses; returns its name."""
        name = f"raypar-{uuid.uuid4().hex[:16]}"
        self._service.create_container(name)
        return name


def find_azurite() -> str:
    """The azurite-blob launcher: the repository's node_modules first, then PATH."""
    local = REPO / "node_modules" / ".bin" / "azurite-blob"
    if local.exists():
        return str(local)
    found = shutil.which("azurite-blob")
    if found:
        return found
    pytest.fail(
        f"azurite-blob not found (looked in {local} and on PATH). The Azure Blob tests need "
        "Microsoft's Azurite emulator: run the test command from the README (.ci/run), whose "
        "first step, npm install ... azurite, installs it into node_modules/.", pytrace=False)


def _options(binary: str, workdir: Path) -> list[str]:
    """Flags this Azurite version understands (older ones lack some; unknown flags abort it)."""
    help_text = subprocess.run([binary, "--help"], check=False, capture_output=True, text=True, timeout=60).stdout
    wanted = ["--silent", "--skipApiVersionCheck", "--loose", "--disableTelemetry"]
    flags = [f for f in wanted if f in help_text]
    # Azurite refuses --inMemoryPersistence together with --location; it runs in the tmp
    # folder either way (its default location is the working directory).
    flags += ["--inMemoryPersistence"] if "--inMemoryPersistence" in help_text else ["--location", str(workdir)]
    return flags


def _port_from_log(proc: subprocess.Popen, log: Path, deadline: float) -> int:
    """Port 0 lets Azurite pick a free port (no race with other processes); it prints the one it took."""
    while time.monotonic() < deadline:
        match = _LISTENING.search(log.read_bytes())
        if match:
            return int(match.group(1))
        if proc.poll() is not None:
            pytest.fail(f"Azurite exited with code {proc.returncode} before listening:\n"
                        f"{log.read_text(errors='replace')}", pytrace=False)
        time.sleep(0.05)
    pytest.fail(f"Azurite did not start listening in {START_TIMEOUT:.0f} s:\n{log.read_text(errors='replace')}",
                pytrace=False)


def _wait_until_serving(service, proc: subprocess.Popen, log: Path, deadline: float) -> None:
    """Poll a real, authenticated request until it succeeds."""
    from azure.core.exceptions import AzureError

    while True:
        try:
            list(service.list_containers(results_per_page=1))
            return
        except AzureError as exc:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"Azurite does not answer ({exc}):\n{log.read_text(errors='replace')}", pytrace=False)
        time.sleep(0.05)


@pytest.fixture(scope="session")
def azurite(tmp_path_factory):
    """One Azurite blob service for the session, on 127.0.0.1; stopped at the end."""
    from azure.storage.blob import BlobServiceClient

    binary = find_azurite()
    workdir = tmp_path_factory.mktemp("azurite")
    log = workdir / "azurite.log"
    command = [binary, "--blobHost", "127.0.0.1", "--blobPort", "0", *_options(binary, workdir)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, cwd=workdir, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    service = None
    try:
        deadline = time.monotonic() + START_TIMEOUT
        port = _port_from_log(proc, log, deadline)
        server = Azurite(endpoint=f"http://127.0.0.1:{port}/{ACCOUNT_NAME}", pid=proc.pid)
        # No retries: a refused connection is answered at once, and the loop polls again.
        service = BlobServiceClient.from_connection_string(server.connection_string, retry_total=0)
        _wait_until_serving(service, proc, log, deadline)
        server._service = service
        yield server
    finally:
        if service is not None:
            service.close()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
