"""sd_notify: one datagram to ``$NOTIFY_SOCKET`` per message; nothing at all without it.

``READY=1`` after the start-up scan with the watcher live, ``STATUS=`` as counts change,
``WATCHDOG=1`` from the event loop at half of ``WATCHDOG_USEC`` (a stuck loop stops the pats and
systemd restarts the service), ``STOPPING=1`` when shutdown begins.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable, Mapping


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self.address: str | None = None
        if address.startswith("@"):
            self.address = "\0" + address[1:]  # abstract namespace
        elif address.startswith("/"):
            self.address = address
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        ours = not pid or pid == str(os.getpid())
        self.watchdog_s: float | None = (
            int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 and ours else None
        )
        self._sock: socket.socket | None = None
        self._last_status = ""

    def send(self, *lines: str) -> None:
        if self.address is None:
            return
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        with contextlib.suppress(OSError):  # systemd gone or not listening: not our failure
            self._sock.sendto("\n".join(lines).encode(), self.address)

    def status(self, text: str) -> None:
        if text != self._last_status:
            self._last_status = text
            self.send(f"STATUS={text}")

    async def heartbeat(self, summary: Callable[[], str]) -> None:
        """The watchdog's pats and the status line, every 2 s at most, until cancelled (from
        the start: a long first pass is no hang)."""
        interval = min(self.watchdog_s or 2.0, 2.0)
        while True:
            if self.watchdog_s is not None:
                self.send("WATCHDOG=1")
            self.status(summary())
            await asyncio.sleep(interval)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
