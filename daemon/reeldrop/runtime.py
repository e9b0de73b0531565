"""The process around the event loop: the garbage collector's settings, the loop itself, and
the process's new start after a reload (SIGHUP).

The first two are chosen once, before the loop starts (``Daemon.run``); tests drive
``serve()`` directly and keep their own.
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn, TypeVar

from .errors import ConfigError

T = TypeVar("T")

GC_YOUNG_THRESHOLD = 10_000  # allocations between young collections (Python's default: 700)


def tune_gc() -> None:
    """Make the cyclic garbage collector cheap for a long-running process (before the loop).

    Everything imported by now lives as long as the process: frozen, full collections no
    longer walk it. And each HTTP request allocates hundreds of short-lived containers, so at
    Python's default young threshold a collection ran every few requests: in the makespan
    benchmark about 180 of them, 0.2-0.4 s of the daemon's 6 s of CPU; at 10,000, five.
    Garbage cycles still go, only later (the idle and makespan runs' peak RSS did not move).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


def event_loop_runner(choice: str) -> Callable[[Coroutine[Any, Any, T]], T]:
    """``asyncio.run``, or uvloop's: its loop and transports are C, which took about a tenth
    off the CPU per job in the makespan benchmark. ``auto`` takes uvloop when it is installed
    (it is a dependency wherever it builds); ``uvloop`` insists on it."""
    if choice != "asyncio":
        try:
            import uvloop  # noqa: PLC0415 - optional: absent on Windows
        except ImportError:
            if choice == "uvloop":
                raise ConfigError("event_loop = 'uvloop', but uvloop is not installed.") from None
        else:
            return uvloop.run
    return asyncio.run


def start_again() -> NoReturn:
    """SIGHUP's second half: the daemon stopped cleanly, and this process becomes a new one
    with the same command line (same PID: systemd and the sd_notify socket keep it, and it
    reads the configuration afresh)."""
    sys.stdout.flush()  # exec drops what is still buffered
    sys.stderr.flush()
    # S606: no shell is wanted; it is our own interpreter and our own command line.
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])  # noqa: S606
