"""Fixtures of the reliability suite."""

import pytest


@pytest.fixture
def no_ray_left():
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()
