"""Connecting to Ray: an existing cluster, or an embedded one on 127.0.0.1 only."""

from __future__ import annotations

import logging
import math
import os
from typing import Optional

import ray

from raypar.engine import ray_private
from raypar.engine.signals import stop_on_sigterm
from raypar.errors import RayparError

# True while the Ray this process is connected to is the embedded one raypar started: a
# pipeline starts it once and its steps' drivers find it running (and must know what it is).
_embedded = False
# True when the embedded Ray forwards no worker output: drivers show it from the job dir's logs
# instead (raypar.console_relay), where Ray's forwarding loses the last lines of short jobs.
_relayed = False


def connect(address: Optional[str] = None, min_cpus: float = 0, relay_output: bool = False) -> bool:
    """Connect to ``address`` / ``RAY_ADDRESS``, or start an embedded local Ray.

    Returns True when raypar started the Ray instance (and must stop it).
    The embedded Ray offers at least ``min_cpus`` logical CPUs (see
    :func:`cpus_for`), so every instance of the job fits on a small laptop
    (Azure oversubscribes processes per node the same way).
    ``relay_output``: the caller shows the workers' output itself (local job dirs); an embedded
    Ray then forwards none of it, so no line shows twice.
    The embedded Ray listens on loopback only: a Ray reachable from the
    network runs anyone's code (ShadowRay, CVE-2023-48022).
    """
    global _embedded, _relayed
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    try:
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
            stop_on_sigterm()  # ray.init installed its own, which exits without cleaning up
            return False
        ray_private.bind_loopback_only()
        ray_private.quiet(ray_private.TOKEN_SETUP_LOGGER)  # our own loopback cluster: its new token is no news
        ray_private.init_on_loopback(include_dashboard=False, logging_level=logging.WARNING,
                                     num_cpus=max(_detected_cpus(), math.ceil(min_cpus)),
                                     log_to_driver=not relay_output)
        stop_on_sigterm()
        _embedded, _relayed = True, relay_output
        return True
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = address or "an embedded local Ray"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RayparError(f"cannot connect to Ray at {where}: {first}") from None


def _detected_cpus() -> int:
    """The CPUs Ray would detect by itself (container CPU limits included)."""
    try:
        return ray_private.detected_cpus()
    except Exception:  # noqa: BLE001 - a Ray without that helper: the plain count
        return os.cpu_count() or 1


def is_embedded() -> bool:
    """True when this process runs on the embedded Ray raypar started (one node, this machine's)."""
    return _embedded and ray.is_initialized()


def output_relayed() -> bool:
    """True when workers' output reaches this driver only if it relays it (see :func:`connect`)."""
    return is_embedded() and _relayed


def cpus_for(spec) -> float:
    """The logical CPUs all instances of ``spec`` take together: an embedded Ray offers at least
    that many, so ``instance_count`` instances packed onto its one node fit."""
    w = spec.raypar.worker
    return w.num_cpus * spec.max_concurrency_per_instance * spec.resources.instance_count


def disconnect() -> None:
    global _embedded, _relayed
    _embedded = _relayed = False
    ray.shutdown()
