"""Processes a sweep starts that must not outlive it."""

from __future__ import annotations

import signal
import sys


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Linux: this process gets `sig` when its parent dies, even by SIGKILL (prctl PR_SET_PDEATHSIG), so a rerun
    never finds an orphan of the dead driver (a server still writing the store, a worker still holding a trial's
    lock). Elsewhere: nothing."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, sig)
