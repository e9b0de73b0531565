"""The retry policy: the only module that imports ``backoff``.

Exponential backoff with full jitter, capped, bounded by tries; the service's own hint
(``Retry-After`` or ``RetryInfo.retryDelay``, carried as ``retry_after_s`` on the error) is a
floor under the jittered wait. To swap ``backoff`` for another library, change this file only.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Awaitable, Callable, Generator
from typing import Any, TypeVar

import backoff

from . import log
from .errors import ReeldropError

T = TypeVar("T")


def _waits(base_s: float, cap_s: float) -> Generator[float, Any, None]:
    """Full-jitter exponential waits; a hint on the error that caused the retry wins if longer."""
    exc = yield 0.0  # primed by backoff with send(None)
    attempt = 0
    while True:
        wait = random.uniform(0, min(cap_s, base_s * 2**attempt))  # noqa: S311 - jitter, not crypto
        hint = getattr(exc, "retry_after_s", None)
        if hint is not None:
            wait = max(wait, hint)
        attempt += 1
        exc = yield wait


def is_retryable(exc: Exception) -> bool:
    return isinstance(exc, ReeldropError) and exc.retryable


async def call(
    fn: Callable[[], Awaitable[T]],
    *,
    tries: int,
    base_s: float,
    cap_s: float,
    phase: str,
    before_try: Callable[[], Awaitable[None]] | None = None,
) -> T:
    """Await ``fn()`` until it succeeds, a non-retryable error, or ``tries`` are spent.

    ``before_try`` runs before every attempt (the caller bumps and persists its try counter
    there, so a crash mid-attempt still counts the attempt).
    """
    result: T = await _policy(tries, base_s, cap_s, phase)(fn, before_try)
    return result


async def _attempt(fn: Callable[[], Awaitable[T]],
                   before_try: Callable[[], Awaitable[None]] | None) -> T:
    if before_try is not None:
        await before_try()
    return await fn()


@functools.lru_cache(maxsize=32)
def _policy(tries: int, base_s: float, cap_s: float,
            phase: str) -> Callable[..., Awaitable[Any]]:
    """The retrying wrapper for one set of settings, built once (a poll goes through here
    every few seconds per job; building backoff's decorator each time was a tenth of the
    daemon's CPU per poll)."""

    def on_backoff(details: Any) -> None:
        exc = details.get("exception")
        log.get().warning(
            "api.retry_scheduled",
            phase=phase,
            tries=details["tries"],
            wait_s=round(details["wait"], 3),
            status=getattr(exc, "status", None),
            error=getattr(exc, "message", repr(exc)),
        )

    retrying: Callable[..., Awaitable[Any]] = backoff.on_exception(
        _waits,
        ReeldropError,
        max_tries=tries,
        giveup=lambda e: not is_retryable(e),
        jitter=None,
        on_backoff=on_backoff,
        logger=None,  # our own api.retry_scheduled line replaces backoff's
        base_s=base_s,
        cap_s=cap_s,
    )(_attempt)
    return retrying
