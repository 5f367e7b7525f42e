"""Ray's private API that raypar uses (raypar/engine/ray_private.py) still exists in the installed Ray.

A Ray upgrade that moves one of these fails here, by name, instead of in a job."""

import importlib
import inspect

import ray

from raypar.engine import ray_private


def test_the_token_loggers_raypar_quiets_are_rays_modules():
    for name in (ray_private.TOKEN_SETUP_LOGGER, ray_private.HTTP_TOKEN_LOGGER):
        assert importlib.import_module(name).__name__ == name


def test_ray_init_takes_the_node_address_argument():
    # A keyword ray.init pops from its **kwargs (not in its signature): read where it does.
    source = inspect.getsource(inspect.unwrap(ray.init))
    assert f'kwargs.pop("{ray_private.NODE_IP_ARGUMENT}"' in source


def test_the_loopback_switch_is_the_constant_ray_reads(monkeypatch):
    from ray._private import ray_constants

    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "1")
    ray_private.bind_loopback_only()
    assert ray_constants.ENABLE_RAY_CLUSTER is False
    assert ray_private.os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"


def test_the_detected_cpus_are_a_positive_count():
    assert ray_private.detected_cpus() >= 1
