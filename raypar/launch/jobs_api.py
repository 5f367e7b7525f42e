"""A Ray Jobs API client that finds the address and token as Ray does and fails in one line.

Ray's own client answers a wrong token with a page of advice and an
unreachable cluster with nested HTTP errors; every call here turns those into
a :class:`~raypar.errors.RayparError` whose headline names the address and
the cause.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from pathlib import Path
from typing import Iterator, Optional

from raypar.engine import ray_private
from raypar.errors import RayparError, UsageError
from raypar.polling import poll

TOKEN_FILE = Path("~/.ray/auth_token")
AGENT_WAIT_SECONDS = 60
QUIET_SECONDS = 0.5  # a log stream this quiet: has the job ended?
SHORTCUT_LOG_CHARS = 8 << 20  # past this much log, wait for Ray to close the stream (no whole-log read)


class JobsApiError(RayparError):
    """The Jobs API could not be reached, refused us, or does not know the job."""

    def __init__(self, headline: str, exit_code: int = 1):
        super().__init__(headline)
        self.exit_code = exit_code  # 2 when the user must fix something: the token, the job ID


def resolve_address(address: Optional[str]) -> str:
    """``--address``, else ``RAY_API_SERVER_ADDRESS``, else ``RAY_ADDRESS``, as ``http(s)://host:port``."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise UsageError("no Ray cluster given: use --address http://HEAD:8265 (or set RAY_ADDRESS)")
    if address.startswith("ray://"):
        raise UsageError(f"{address} is the Ray Client port; the Jobs API is the dashboard's, "
                         f"e.g. http://HEAD:8265")
    if "://" not in address:
        address = f"http://{address}"
    return address.rstrip("/")


def find_token() -> tuple[Optional[str], str]:
    """The cluster token and where it came from, searched the way Ray searches."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        try:
            return Path(path).expanduser().read_text().strip(), f"RAY_AUTH_TOKEN_PATH ({path})"
        except OSError as exc:
            raise UsageError(f"RAY_AUTH_TOKEN_PATH: cannot read {path}: {exc.strerror or exc}") from None
    default = TOKEN_FILE.expanduser()
    if default.is_file():
        return default.read_text().strip(), str(TOKEN_FILE)
    return None, ""


def parse_headers(pairs: Optional[list[str]]) -> dict[str, str]:
    """``Name: value`` pairs (``--header``), after the JSON object in ``RAY_JOB_HEADERS``."""
    headers: dict[str, str] = {}
    if os.environ.get("RAY_JOB_HEADERS"):
        try:
            headers.update(json.loads(os.environ["RAY_JOB_HEADERS"]))
        except (ValueError, TypeError):
            raise UsageError("RAY_JOB_HEADERS must be a JSON object of header names and values") from None
    for pair in pairs or []:
        name, sep, value = pair.partition(":")
        if not sep or not name.strip():
            raise UsageError(f"--header {pair!r}: expected 'Name: value'")
        headers[name.strip()] = value.strip()
    return headers


class JobsApi:
    """The Jobs API of one cluster."""

    def __init__(self, address: Optional[str] = None, headers: Optional[dict] = None):
        from ray.job_submission import JobSubmissionClient  # noqa: PLC0415 - lazy: the Jobs API client is only for submit/follow

        # Its "no token was found" warning would be a second line beside ours.
        ray_private.quiet(ray_private.HTTP_TOKEN_LOGGER)
        self.address = resolve_address(address)
        self.headers = dict(headers or {})
        self.token_source = "an Authorization header"
        if not any(k.lower() == "authorization" for k in self.headers):
            token, self.token_source = find_token()
            if token:
                self.headers["Authorization"] = f"Bearer {token}"
        with self.calling("connect"):
            self.client = JobSubmissionClient(self.address, headers=self.headers)

    @contextlib.contextmanager
    def calling(self, what: str, job: Optional[str] = None) -> Iterator[None]:
        """Turn the SDK's errors into one line naming the address (and job)."""
        from ray.exceptions import AuthenticationError  # noqa: PLC0415 - lazy: the Jobs API client is only for submit/follow

        where = f"Ray Jobs API at {self.address}"
        try:
            yield
        except AuthenticationError as exc:
            if "401" in str(exc) or "Missing" in str(exc) or "required" in str(exc).lower():
                raise JobsApiError(
                    f"{where}: the cluster requires a token and none was sent; set RAY_AUTH_TOKEN or "
                    f"RAY_AUTH_TOKEN_PATH, or put it in {TOKEN_FILE} (`ray get-auth-token` on the head prints it)",
                    exit_code=2) from None
            raise JobsApiError(f"{where}: the cluster rejected the token from {self.token_source} "
                               f"(403 Forbidden); check that it is this cluster's token", exit_code=2) from None
        except ConnectionError as exc:
            raise JobsApiError(f"{where}: cannot connect ({_first_line(exc)}); is the head's dashboard "
                               f"reachable (e.g. kubectl port-forward ... 8265:8265)?") from None
        except RuntimeError as exc:
            text = str(exc)
            if job and "404" in text:
                raise JobsApiError(f"{where}: no job {job} on this cluster", exit_code=2) from None
            raise JobsApiError(f"{where}: {what} failed: {_first_line(exc)}") from None
        except OSError as exc:  # requests' network errors
            raise JobsApiError(f"{where}: {what} failed: {_first_line(exc)}") from None

    def info(self, submission_id: str):
        with self.calling("get job", submission_id):
            return self.client.get_job_info(submission_id)

    def logs(self, submission_id: str) -> str:
        with self.calling("get logs", submission_id):
            return self.client.get_job_logs(submission_id)

    def stop(self, submission_id: str) -> bool:
        with self.calling("stop job", submission_id):
            return self.client.stop_job(submission_id)

    def jobs(self) -> list:
        with self.calling("list jobs"):
            return self.client.list_jobs()

    def submit(self, **kwargs) -> str:
        """Submit; Ray answers 500 "No available agent" while the head's agent (re)registers: retry."""
        busy: list[JobsApiError] = []

        def attempt() -> Optional[str]:
            try:
                with self.calling("submit"):
                    return self.client.submit_job(**kwargs)
            except JobsApiError as exc:
                if "No available agent" not in exc.headline:
                    raise
                busy.append(exc)
                return None

        submission_id = poll(attempt, timeout=AGENT_WAIT_SECONDS, interval=2)
        if submission_id is None:
            raise busy[-1]
        return submission_id

    def tail(self, submission_id: str) -> Iterator[str]:
        """The job's log as it is written, in chunks, until the job ends.

        Ray's server closes the stream only after a pause past the job's end (it looks for
        late lines again); once the job has ended and the stream is quiet, the rest of the log
        is read at once instead, so a `--wait` returns when the job does. Ray reads logs only
        whole: a log past SHORTCUT_LOG_CHARS waits for the stream's close instead."""
        loop = asyncio.new_event_loop()
        stream = self.client.tail_job_logs(submission_id)
        sent, next_chunk = 0, None
        try:
            while True:
                with self.calling("follow logs", submission_id):
                    if next_chunk is None:
                        next_chunk = asyncio.ensure_future(stream.__anext__(), loop=loop)
                    loop.run_until_complete(asyncio.wait({next_chunk}, timeout=QUIET_SECONDS))
                    if next_chunk.done():
                        try:
                            chunk, next_chunk, ended = next_chunk.result(), None, False
                        except StopAsyncIteration:
                            return
                    elif sent <= SHORTCUT_LOG_CHARS and self.client.get_job_status(submission_id).is_terminal():
                        chunk, ended = self.client.get_job_logs(submission_id)[sent:], True
                    else:
                        continue
                if chunk:
                    sent += len(chunk)
                    yield chunk
                if ended:
                    return
        finally:
            if next_chunk is not None and not next_chunk.done():
                next_chunk.cancel()
                loop.run_until_complete(asyncio.wait({next_chunk}))
            with contextlib.suppress(Exception):  # a stream cut short: nothing left to close cleanly
                loop.run_until_complete(stream.aclose())
            loop.close()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
