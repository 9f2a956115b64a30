"""Ports for what a sweep starts on this machine (the MLflow server, a trial's process group, a local Slurm)."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def is_loopback(host: str) -> bool:
    """Whether a listen address is reachable from this machine only."""
    return host in ("localhost", "::1") or host.startswith("127.")
