"""Pacing: how fast we submit, and how often we look at a running operation.

Submissions pass one global gate: at most ``submissions_per_minute`` in any 60-second window,
and when the service answers 429 every submitter waits out the service's delay, not only the
one that got it. The effective limit then halves and climbs back by one per accepted
submission (additive increase, multiplicative decrease), so a 429 storm settles instead of
repeating.

Polling adapts to the operation's age: the wait before the next look is ``poll_fraction`` of
the time elapsed so far, clamped to [``poll_min_s``, ``poll_max_s``], with jitter so that
thousands of jobs do not poll in lockstep. The lag between an operation finishing and the
daemon noticing is then at most about ``poll_fraction`` of its generation time.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque

from . import log
from .config import Config

WINDOW_S = 60.0


class SubmitGate:
    def __init__(self, per_minute: int) -> None:
        self.limit = per_minute
        self.effective = float(per_minute)
        self.paused_until = 0.0
        self._sent: deque[float] = deque()
        self._lock = asyncio.Lock()

    async def wait_turn(self) -> None:
        """Return when one submission may go out; counts it against the window."""
        async with self._lock:  # one waiter at a time keeps the order fair (FIFO)
            while True:
                now = time.monotonic()
                while self._sent and now - self._sent[0] >= WINDOW_S:
                    self._sent.popleft()
                wait = self.paused_until - now
                if len(self._sent) >= max(1, int(self.effective)):
                    wait = max(wait, self._sent[0] + WINDOW_S - now)
                if wait <= 0:
                    self._sent.append(now)
                    return
                await asyncio.sleep(wait)

    def throttled(self, retry_after_s: float | None) -> None:
        """The service said 429: pause everyone, and halve the pace."""
        delay = retry_after_s if retry_after_s is not None else 5.0
        self.paused_until = max(self.paused_until, time.monotonic() + delay)
        self.effective = max(1.0, self.effective / 2)
        log.get().warning("api.throttled", pause_s=round(delay, 3),
                          per_minute=int(self.effective))

    def accepted(self) -> None:
        self.effective = min(float(self.limit), self.effective + 1)


def poll_delay(elapsed_s: float, config: Config, rng: random.Random | None = None) -> float:
    """Seconds to wait before the next poll of an operation that has run ``elapsed_s``."""
    base = min(config.poll_max_s, max(config.poll_min_s, elapsed_s * config.poll_fraction))
    spread = (rng or random).uniform(-config.poll_jitter, config.poll_jitter)
    return max(0.0, base * (1 + spread))
