"""Executors behind one protocol (cluster.base): local, ray (Ray tasks), slurm (submitit). Importing this package
imports no backend: cluster.base.EXECUTORS loads one when a sweep asks for it."""

from cluster.base import EXECUTORS, Executor, drive, make_executor  # noqa: F401
