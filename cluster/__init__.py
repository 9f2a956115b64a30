"""Executors behind one protocol (cluster.base). Importing this package registers the built-in ones."""

from cluster import local  # noqa: F401  (registers "local")
from cluster.base import EXECUTORS, Executor, make_executor  # noqa: F401
