"""Executors behind one protocol (cluster.base). Importing this package registers the built-in ones."""

from cluster import local, ray_tune, slurm  # noqa: F401  (registers "local", "ray", "slurm")
from cluster.base import EXECUTORS, Executor, make_executor  # noqa: F401
