"""Pacing of submissions: how fast we submit, and when downloads step aside for them.

Submissions pass one global gate, a token bucket: ``submissions_per_minute`` tokens a minute,
at most ``submit_burst`` saved up. When the service answers 429, every submitter waits out
the service's delay (not only the one that got it), the bucket is emptied, and the rate
halves; each accepted submission then raises it by 5% (plus one a minute) up to the
configured rate. A 429 storm therefore settles near a pace the service accepts instead of
repeating at every window, and a single 429 costs only a few slower submissions.

How often a running operation is looked at is ``polling``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from . import log

MIN_RATE_PER_MIN = 1.0
RECOVERY = 1.05  # per accepted submission: back to full pace after a halving in ~15 calls


class SubmitGate:
    def __init__(self, per_minute: float, burst: int = 1) -> None:
        self.limit = float(per_minute)
        self.rate = self.limit  # current submissions per minute
        self.burst = float(burst)
        self.tokens = self.burst
        self.paused_until = 0.0
        self._stamp = time.monotonic()
        self._lock = asyncio.Lock()

    def _refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + (now - self._stamp) * self.rate / 60)
        self._stamp = now

    async def wait_turn(self) -> None:
        """Return when one submission may go out, and take its token."""
        async with self._lock:  # one waiter at a time keeps the order fair (FIFO)
            while True:
                now = time.monotonic()
                self._refill(now)
                wait = max(self.paused_until - now, (1 - self.tokens) * 60 / self.rate)
                if wait <= 0:
                    self.tokens -= 1
                    return
                await asyncio.sleep(wait)

    def throttled(self, retry_after_s: float | None) -> None:
        """The service said 429: pause everyone, empty the bucket, halve the pace."""
        delay = retry_after_s if retry_after_s is not None else 5.0
        now = time.monotonic()
        self._refill(now)
        self.paused_until = max(self.paused_until, now + delay)
        self.tokens = 0.0
        self.rate = max(MIN_RATE_PER_MIN, self.rate / 2)
        log.get().warning("api.throttled", pause_s=round(delay, 3),
                          per_minute=round(self.rate, 1))

    def accepted(self) -> None:
        self.rate = min(self.limit, self.rate * RECOVERY + 1)


class Lull:
    """Whether the workers have stopped taking jobs for a moment.

    When a round of jobs finishes together, every freed slot takes the next job and sends
    its create call, and every finished one wants its download and final writes: some 5 ms
    of the loop each, so the loop is saturated for a while. A create call starts the
    service's clock and a download only ends a job, so downloads wait (``wait``) until no
    job was taken for ``quiet_s``: the round's create calls go first. Against the real
    service, jobs finish minutes apart and a download rarely waits at all.
    """

    def __init__(self, quiet_s: float) -> None:
        self.quiet_s = quiet_s
        self._quiet = asyncio.Event()
        self._quiet.set()
        self._last_take = 0.0
        self._timer: asyncio.TimerHandle | None = None  # at most one, re-armed when it fires

    def took(self) -> None:
        """A worker took a job: the lull is over until ``quiet_s`` from now."""
        loop = asyncio.get_running_loop()
        self._last_take = loop.time()
        self._quiet.clear()
        if self._timer is None:
            self._timer = loop.call_at(self._last_take + self.quiet_s, self._check)

    def _check(self) -> None:
        loop = asyncio.get_running_loop()
        due = self._last_take + self.quiet_s
        if due > loop.time():
            self._timer = loop.call_at(due, self._check)
        else:
            self._timer = None
            self._quiet.set()

    async def wait(self, max_s: float) -> None:
        """Return at the next lull, or after ``max_s`` (a steady stream of takes; 0: at
        once)."""
        if max_s > 0 and not self._quiet.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max_s):
                    await self._quiet.wait()
