"""The poll schedule: how often we look at a running operation.

Polling adapts to the operation's age: the wait before the next look is ``poll_fraction`` of
the time elapsed so far, clamped to [``poll_min_s``, ``poll_max_s``], with jitter so that
thousands of jobs do not poll in lockstep. The lag between an operation finishing and the
daemon noticing is then at most about ``poll_fraction`` of its generation time.

That rule alone costs about ``ln(T / poll_initial_s) / poll_fraction`` polls for a job of
``T`` seconds. ``FirstLook`` saves most of them: operations of one kind (model, resolution,
duration) take similar times, so the first look at a new one is put off to the time by which
nearly every recent one of its kind was still running (see ``FirstLook``).

The same likeness cuts the lag. An operation found running looks again (once or twice) where
the last ones of its kind finished, if that comes before its own next look
(``FirstLook.follow_s``): where their times are alike, those looks close in on the kind's
time, and a job is noticed soon after it finishes, not up to an interval late. And an
operation found done calls in every older one of its kind that is waiting for its next look
(``Siblings``), and the first of a cold kind also the slightly younger ones. Those have run
about as long as it needed or longer, so most are done too; a batch of jobs is then noticed
at the first look that finds any of them done, not each at its own next look.

Likeness also works the other way while a kind is still cold (nothing learned yet): an older
operation just seen running says the younger ones are most likely running too. A younger one
then skips its look, at most ``poll_cold_skips`` times in a row (``Siblings.vouched``), so a
cold batch of N jobs does not poll N times as often as one job would, and one that finishes
before an older sibling is still noticed within ``poll_cold_skips + 1`` of its intervals.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import itertools
import random
import time
from collections.abc import Hashable
from pathlib import Path
from typing import Annotated, Any

import msgspec

from . import log
from .config import Config
from .files import atomic_write


def poll_interval(elapsed_s: float, config: Config) -> float:
    """The schedule's interval, before jitter, for an operation that has run ``elapsed_s``."""
    return min(config.poll_max_s, max(config.poll_min_s, elapsed_s * config.poll_fraction))


def poll_delay(elapsed_s: float, config: Config, rng: random.Random | None = None) -> float:
    """Seconds to wait before the next poll of an operation that has run ``elapsed_s``."""
    spread = (rng or random).uniform(-config.poll_jitter, config.poll_jitter)
    return max(0.0, poll_interval(elapsed_s, config) * (1 + spread))


def kind_of(model: str, parameters: dict[str, Any]) -> Hashable:
    """What makes generation times comparable: the model and the size of the video."""
    return (model, parameters.get("resolution"), parameters.get("duration_seconds"))


class FirstLook:
    """When to first look at a new operation, learned from the last ones of its kind.

    Each finished operation leaves an estimate of its generation time: the middle between its
    age at the last look that found it running and its age at the look that found it done
    (found done at its first look: as if a look one interval earlier had found it running).
    The first look at a new operation comes at the ``QUANTILE`` of the last ``WINDOW``
    estimates of its kind (never before ``poll_initial_s``), less up to half a poll interval
    to spread the looks. When jobs of one kind take about ``T``, each then costs about two
    polls instead of dozens. A job faster than most recent ones is noticed late, by at most
    the learned wait, and pulls the next first looks earlier: the learned wait settles where
    about ``QUANTILE`` of the jobs finish before it.

    (Recording the last running age alone, 0 for a job done at its first look, biased the
    estimate low by up to an interval: jobs of one length took three polls, and when lengths
    varied by a third the zeros dragged the first look back to ``poll_initial_s``.)
    """

    WINDOW = 32
    QUANTILE = 0.1
    FOLLOW_FROM = 8  # how many of a kind's last finishes ``follow_s`` takes
    FOLLOW_SIDE = 4  # past the top (bottom) quarter of the ages found running (done)
    PROBE_OVER = 0.5  # of an interval: a wider gap between the two gets a look in between
    FOLLOWS = 2  # looks at those ages an operation may take

    def __init__(self) -> None:
        self._times: dict[Hashable, collections.deque[float]] = {}
        # Not saved (a cache): the ages at which the last ones of a kind were found done, and
        # found running for the last time before that (``follow_s``).
        self._done_ages: dict[Hashable, collections.deque[float]] = {}
        self._running_ages: dict[Hashable, collections.deque[float]] = {}
        self.changed = False  # since the last dump()

    def dump(self) -> bytes:
        """What was learned, as JSON (the daemon keeps it across restarts)."""
        self.changed = False
        return msgspec.json.encode([
            _Learned(model=k[0], resolution=k[1], duration_seconds=k[2], bounds=list(b))
            for k, b in self._times.items() if isinstance(k, tuple) and len(k) == 3])

    def load(self, data: bytes) -> None:
        """Take up what an earlier ``dump()`` saved (``msgspec.DecodeError`` if unreadable)."""
        for item in _decode_learned(data):
            kind = (item.model, item.resolution, item.duration_seconds)
            self._times[kind] = collections.deque(item.bounds, maxlen=self.WINDOW)

    def wait_s(self, kind: Hashable, config: Config, rng: random.Random | None = None) -> float:
        """Age at which to take the first look at an operation of ``kind``."""
        target = config.poll_initial_s
        times = self._times.get(kind)
        if times:
            ordered = sorted(times)
            target = max(target, ordered[int(self.QUANTILE * (len(ordered) - 1))])
        # Up to half a poll interval earlier, at random: looks do not bunch up, a look before
        # the usual time costs at most one extra poll, and the lag after an operation
        # finishes does not hang on where its time falls on one fixed grid of looks.
        spread = poll_delay(target, config, rng) / 2
        return max(0.0, target - (rng or random).uniform(0, spread))

    def finished(self, kind: Hashable, *, running_at_s: float | None, done_at_s: float,
                 interval_s: float) -> None:
        """An operation of ``kind`` was found done at age ``done_at_s``, last seen running at
        ``running_at_s`` (None: done at its first look), ``interval_s`` its poll interval."""
        since = done_at_s - interval_s if running_at_s is None else running_at_s
        estimate = max(0.0, (since + done_at_s) / 2)
        self._times.setdefault(kind, collections.deque(maxlen=self.WINDOW)).append(estimate)
        self._done_ages.setdefault(
            kind, collections.deque(maxlen=self.FOLLOW_FROM)).append(done_at_s)
        if running_at_s is not None:
            self._running_ages.setdefault(
                kind, collections.deque(maxlen=self.FOLLOW_FROM)).append(running_at_s)
        self.changed = True

    def follow_s(self, kind: Hashable, config: Config) -> tuple[float, ...]:
        """The ages at which an operation of ``kind`` still running short of them looks again
        (``Generation.wait``, at most ``FOLLOWS`` such looks), from the last ``FOLLOW_FROM``
        of its kind; none if none finished yet. Its first look comes a little before its
        kind's usual time (``wait_s``), so where jobs of a kind all take about as long, that
        look finds it running, and its next one, an interval on, would notice it half an
        interval to an interval late; and the youngest of a batch that finishes together
        have no younger sibling to call them in.

        Each finished operation brackets its kind's time: it was running at the last look
        that found it running and done at the next. Where a kind's times are alike, the
        brackets agree: the ages found running stay below the ages found done. Then the look
        comes at a low age found done (just past the lowest quarter, ``FOLLOW_SIDE``: the
        second-lowest of eight), just after the kind's time; while the gap down to a high
        age found running (as far from the top) is over ``PROBE_OVER`` of an interval, a
        look in its middle comes first. A probe that finds the operation done narrows the
        gap from above; one that finds it running narrows it from below, costs a poll, and
        the look at the low done age follows. So the looks close in on the kind's time.
        Without probes, jobs of one length were each noticed as late as the first few of
        their kind found done were, whose cold looks were an interval apart (at the median
        done age, until 2026-11-27: 2.4-5.2% of 15 s jobs dropped one at a time in five lag
        runs; at the low one without probes, 1.4 and 3.1% in two; with them 0.1-1.1% in
        three, for 0.1-0.3 polls a job more in the makespan benchmark). Not the extremes:
        ages count from when the daemon learned an operation's name, a little late under
        load.

        Where times vary, the brackets do not agree (the ones found running late are above
        the ones found done early): the look comes at the median done age, where about half
        are done."""
        done = sorted(self._done_ages.get(kind, ()))
        if not done:
            return ()
        running = sorted(self._running_ages.get(kind, ()))
        if running:
            below = running[-1 - (len(running) - 1) // self.FOLLOW_SIDE]
            above = done[(len(done) - 1) // self.FOLLOW_SIDE]
            if below < above - self.PROBE_OVER * poll_interval(above, config):
                return ((below + above) / 2, above)
            if below < above:
                return (above,)
        return (done[len(done) // 2],)

    def knows(self, kind: Hashable) -> bool:
        """Whether anything was learned about ``kind`` (else it is cold)."""
        return kind in self._times


LEARNED_FILE = "first-looks.json"  # in the state dir: when operations of each kind finish


class LearnedFile:
    """What a ``FirstLook`` learned, kept across restarts: read at start, saved every
    ``SAVE_EVERY_S`` and at shutdown. Only a cache: an unreadable file is started afresh,
    and it is not fsynced (losing it costs a few extra polls, nothing else)."""

    SAVE_EVERY_S = 60.0

    def __init__(self, first_look: FirstLook, path: Path, mode: int) -> None:
        self.first_look, self.path, self.mode = first_look, path, mode

    def load(self) -> None:
        """Start from what an earlier run learned, if it left anything (blocking)."""
        try:
            self.first_look.load(self.path.read_bytes())
        except FileNotFoundError:
            return
        except (OSError, msgspec.DecodeError) as e:
            log.get().warning("pacing.learned_unreadable", path=str(self.path), error=str(e))

    async def save(self) -> None:
        if not self.first_look.changed:
            return
        data = self.first_look.dump()  # here, in the loop that updates it
        try:
            await asyncio.to_thread(atomic_write, self.path, data, self.mode, durable=False)
        except OSError as e:
            log.get().warning("pacing.learned_not_saved", error=e.strerror)

    async def keep(self) -> None:
        """Save every ``SAVE_EVERY_S`` until cancelled."""
        while True:
            await asyncio.sleep(self.SAVE_EVERY_S)
            await self.save()


class Siblings:
    """Operations waiting for their next look, by kind, so that one found done can call in
    the older ones of its kind at once (``poll_siblings``).

    When durations vary, a called-in operation may still be running: it then waits its own
    next look before it can be called in again, so call-ins at most double its polls.

    It also keeps, per kind, the oldest operation lately seen running (the lead), which
    vouches for the younger ones while the kind is cold (``vouched``).

    The waiting ones of a kind are kept in the order they started, so that a finish calls in
    the ones it reaches without walking the others (with a job in every slot, each finish
    walked every waiting job).
    """

    def __init__(self) -> None:
        # kind: (born, a tie-breaker, the waiter), sorted: the oldest first
        self._waiting: dict[Hashable, list[tuple[float, int, asyncio.Future[bool]]]] = {}
        self._order = itertools.count()
        self._lead: dict[Hashable, tuple[float, float]] = {}  # kind: (born, seen running at)

    async def sleep(self, kind: Hashable, born: float, seconds: float) -> bool:
        """Wait ``seconds``, or less if an operation of ``kind`` younger than this one
        (``born``: its start on the monotonic clock) is found done meanwhile. True if it was
        called in that way."""
        if seconds <= 0:
            return False
        loop = asyncio.get_running_loop()
        called: asyncio.Future[bool] = loop.create_future()
        waiting = self._waiting.setdefault(kind, [])
        entry = (born, next(self._order), called)
        bisect.insort(waiting, entry)
        timer = loop.call_later(seconds, _wake, called, False)
        try:
            return await called
        finally:
            timer.cancel()
            del waiting[bisect.bisect_left(waiting, entry)]
            if not waiting:
                del self._waiting[kind]

    def finished(self, kind: Hashable, born: float, reach_s: float = 0.0) -> int:
        """An operation of ``kind`` started at ``born`` was found done: call in the waiting
        ones that started before it, or at most ``reach_s`` after it. Returns how many were
        called in.

        The caller passes half the time between its last look that found it running and the
        one that found it done (that gap at most one poll interval): a sibling younger by less
        than that has run longer than the finished one was known to be running, and more
        likely than not longer than it needed (a batch dropped together is then noticed at
        once, not each at its own look). Half, and only for the first of a cold kind (the
        younger ones skipped looks on its word), because one called in too early loses a
        poll and cannot be called in again before its own next look."""
        waiting = self._waiting.get(kind, [])
        reached = bisect.bisect_right(waiting, (born + reach_s, float("inf")))
        for _, _, future in waiting[:reached]:
            _wake(future, True)
        return reached

    def seen_running(self, kind: Hashable, born: float, interval_s: float) -> None:
        """An operation of ``kind`` started at ``born`` was just seen running. It becomes the
        lead if it is older than the lead, or if the lead has not been seen for an interval
        (it finished or failed)."""
        now = time.monotonic()
        lead = self._lead.get(kind)
        if lead is None or born <= lead[0] or lead[1] < now - interval_s:
            self._lead[kind] = (born, now)

    def vouched(self, kind: Hashable, born: float, within_s: float) -> bool:
        """Whether an older operation of ``kind`` was seen running in the last ``within_s``:
        an operation started at ``born`` is then most likely running too. (The caller passes
        two of its own intervals: the older one's looks come at its longer interval, plus
        jitter and the time a poll takes.)"""
        lead = self._lead.get(kind)
        return lead is not None and lead[0] < born and lead[1] >= time.monotonic() - within_s


def _wake(future: asyncio.Future[bool], called_in: bool) -> None:
    if not future.done():
        future.set_result(called_in)


class _Learned(msgspec.Struct, frozen=True, kw_only=True):
    """One kind's generation-time estimates in the saved file, under the field name of
    earlier versions (``bounds``; theirs were a little lower and age out of the window).
    Unknown fields are ignored: a later version may add some."""

    model: str
    resolution: str | None = None
    duration_seconds: int | None = None
    bounds: list[Annotated[float, msgspec.Meta(ge=0)]] = []


_decode_learned = msgspec.json.Decoder(list[_Learned]).decode
