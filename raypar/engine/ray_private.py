"""Every use of Ray's private API, in one place, each with what raypar needs it for.

Ray is pinned to one minor version (pyproject.toml: ``ray[default]>=2.60,<2.61``) and
tests/test_ray_private.py checks that each name used here still exists, so a Ray upgrade
that moves one fails that test by name instead of a job at run time.
"""

from __future__ import annotations

import logging
import os

import ray

# Ray's notices about token auth that would stand beside raypar's own line as a second one.
TOKEN_SETUP_LOGGER = "ray._private.authentication.authentication_token_setup"  # "generated a new token"
HTTP_TOKEN_LOGGER = "ray._private.authentication.http_token_authentication"  # "no token was found"
NODE_IP_ARGUMENT = "_node_ip_address"  # ray.init's private argument: the address the local node binds


def quiet(logger_name: str) -> None:
    """Hide one of Ray's loggers above (errors still show)."""
    logging.getLogger(logger_name).setLevel(logging.ERROR)


def bind_loopback_only() -> None:
    """Make this process and every Ray process it spawns bind to 127.0.0.1 only.

    Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, when ``ray`` is imported, into
    ``ray_constants.ENABLE_RAY_CLUSTER``; ``ray`` is already imported here, so the constant
    is set too (the spawned processes read the variable). tests/test_cli.py checks the
    listening sockets as well.
    """
    from ray._private import ray_constants  # noqa: PLC0415 - lazy: Ray's private API, only to start a Ray

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def detected_cpus() -> int:
    """The CPUs Ray would detect by itself (container CPU limits included)."""
    from ray._private.utils import get_num_cpus  # noqa: PLC0415 - lazy: Ray's private API, only to start a Ray

    return int(get_num_cpus())


def init_on_loopback(**kwargs) -> None:
    """``ray.init`` of a new local Ray whose node listens on 127.0.0.1."""
    ray.init(address="local", **{NODE_IP_ARGUMENT: "127.0.0.1"}, **kwargs)
