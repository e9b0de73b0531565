"""Pacing: the first look is learned per kind, one done calls in the older ones of its kind,
and the watcher slows when quiet."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Hashable
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from reeldrop.config import Config
from reeldrop.generation import Generation
from reeldrop.jobs import Member
from reeldrop.polling import FirstLook, Siblings, kind_of
from reeldrop.scheduler import SubmitGate
from reeldrop.simulator import SimConfig, Simulator
from reeldrop.veo import VeoClient

from .support import drop, finished, make_config, running, sidecars, until


def test_the_first_look_is_learned_per_kind_and_pulled_earlier_by_fast_jobs(
        tmp_path: Path) -> None:
    """With nothing learned the first look is poll_initial_s; after jobs of a kind that ran
    ~60 s it comes near 60 s for that kind only (each job counted at the middle of its last
    running look and the look that found it done); jobs found done at their first look pull
    it earlier. Each time less up to half a poll interval, at random."""
    config = make_config(tmp_path, "http://127.0.0.1:9/v1beta", poll_initial_s=8.0,
                         poll_min_s=0.5, poll_max_s=20.0, poll_fraction=0.06, poll_jitter=0.1)
    first, rng = FirstLook(), random.Random(3)
    slow = kind_of("veo-3.1-generate-preview", {"resolution": "1080p", "duration_seconds": 8})
    other = kind_of("veo-3.1-generate-preview", {"resolution": "720p", "duration_seconds": 4})

    def looks(kind: object) -> list[float]:
        return [first.wait_s(kind, config, rng) for _ in range(200)]

    cold = looks(slow)  # the interval at 8 s is 0.5 s (the floor), ±10%: spread over half
    assert 8.0 - 0.28 <= min(cold) < 7.8 and 7.95 < max(cold) <= 8.0
    for running_at in range(58, 68):  # seen running at N s, done at N + 2 s: about N + 1 s
        first.finished(slow, running_at_s=float(running_at), done_at_s=running_at + 2.0,
                       interval_s=2.0)
    learned = looks(slow)  # the interval at 59 s is 6% of it, ±10%
    assert 59 - 59 * 0.06 * 1.1 / 2 <= min(learned) < 57.8 and 58.7 < max(learned) <= 59
    assert max(looks(other)) <= 8.0
    for _ in range(8):  # faster than the first look: done when first seen at 20 s
        first.finished(slow, running_at_s=None, done_at_s=20.0, interval_s=1.2)
    assert min(looks(slow)) >= 19.4 - 1.2 * 1.1 / 2 and max(looks(slow)) <= 19.4


def test_the_look_again_comes_just_after_a_kinds_time_when_its_times_are_alike(
        tmp_path: Path) -> None:
    """Jobs of one length (about 15 s) bracket their time: the first three were found running
    at 14.2-14.4 s and done a second later. A running one then looks again in the middle of
    that gap (14.8 s) and at the lowest done age (15.2 s), not at the median (15.3 s): the gap
    is over half an interval. Two found done at 14.8 s narrow it to 0.4 s: the look comes at
    the second-lowest done age alone, 14.8 s. Where times vary (some found running after
    others were found done) it is the median done age; with no running age known (all done
    at their first look), the median too."""
    config = make_config(tmp_path, "http://127.0.0.1:9/v1beta", poll_min_s=1.0,
                         poll_max_s=20.0, poll_fraction=0.06)
    first = FirstLook()
    alike, varied, unbracketed = (kind_of("veo", {"resolution": r}) for r in "abc")
    for running_at in (14.3, 14.4, 14.2):
        first.finished(alike, running_at_s=running_at, done_at_s=running_at + 1,
                       interval_s=1.0)
        first.finished(unbracketed, running_at_s=None, done_at_s=running_at + 1,
                       interval_s=1.0)
    assert first.follow_s(alike, config) == pytest.approx((14.8, 15.2))
    assert first.follow_s(unbracketed, config) == pytest.approx((15.3,))
    for _ in range(2):
        first.finished(alike, running_at_s=14.4, done_at_s=14.8, interval_s=1.0)
    assert first.follow_s(alike, config) == pytest.approx((14.8,))
    for running_at in (9.0, 29.0, 11.0, 19.0, 24.0, 14.0):  # done a second after each
        first.finished(varied, running_at_s=running_at, done_at_s=running_at + 1,
                       interval_s=1.0)
    assert first.follow_s(varied, config) == (20.0,)  # of 10, 12, 15, 20, 25, 30
    assert first.follow_s(kind_of("veo", {"resolution": "d"}), config) == ()


@pytest.fixture
def sim_config() -> SimConfig:
    return SimConfig(latency_s=1.0, latency_jitter_s=0.0, seed=4)


async def test_later_jobs_of_a_kind_cost_a_few_polls_not_dozens(
        tmp_path: Path, sim: Simulator) -> None:
    """The first 1-second job is polled every 50 ms (about 20 looks); jobs of the same kind
    dropped after it finished are first looked at near 1 s and need a few looks at most,
    and are still noticed promptly (well under a second after they finish)."""
    config = make_config(tmp_path, sim.base_url, poll_initial_s=0.05, poll_min_s=0.05,
                         poll_fraction=0.05, poll_jitter=0.1)
    async with running(config):
        drop(tmp_path / "inbox", "first.prompt", "the first of its kind")
        await until(finished(tmp_path / "outbox", 1))
        for i in range(3):
            drop(tmp_path / "inbox", f"later{i}.prompt", f"a later one {i}")
        await until(finished(tmp_path / "outbox", 4))
    polls = {op.prompt: op.polls for op in sim.ops.values()}
    assert polls["the first of its kind"] >= 10, polls
    assert all(polls[f"a later one {i}"] <= 6 for i in range(3)), polls
    docs = sidecars(tmp_path / "outbox")
    assert {d.state for d in docs.values()} == {"succeeded"}
    done_at = {op.prompt: op.done_at for op in sim.ops.values()}
    for doc in docs.values():
        op_done_at = done_at[doc.prompt]
        assert doc.finished_at is not None and op_done_at is not None
        lag_s = datetime.fromisoformat(doc.finished_at).timestamp() - op_done_at
        assert lag_s < 1.0, (doc.output, lag_s)


async def test_operations_already_running_skip_ahead_once_their_kind_is_learned(
        tmp_path: Path, sim: Simulator) -> None:
    """A cold start: two 2-second jobs, the second started 1.6 s after the first, before
    anything of their kind is learned; both are polled about every 60 ms. When the first
    finishes, the second (0.4 s old) skips ahead to the learned time instead of polling on
    through it: a handful of looks instead of about 30."""
    config = make_config(tmp_path, sim.base_url, poll_initial_s=0.05, poll_min_s=0.05,
                         poll_fraction=0.05, poll_jitter=0.1)
    async with running(config):
        drop(tmp_path / "inbox", "first.prompt", "the first [latency=2]")
        await until(lambda: len(sim.ops) == 1)
        await asyncio.sleep(1.6)
        drop(tmp_path / "inbox", "second.prompt", "the second [latency=2]")
        await until(finished(tmp_path / "outbox", 2))
    polls = {op.prompt: op.polls for op in sim.ops.values()}
    assert polls["the first [latency=2]"] >= 15, polls  # about 30; fewer on a busy machine
    assert polls["the second [latency=2]"] <= 14, polls
    assert {d.state for d in sidecars(tmp_path / "outbox").values()} == {"succeeded"}


async def test_what_was_learned_survives_a_restart(tmp_path: Path, sim: Simulator) -> None:
    """The first 1-second job of a run is polled about 20 times; the daemon saves what it
    learned at shutdown, and after a restart the next job of the kind needs a few looks."""
    config = make_config(tmp_path, sim.base_url, poll_initial_s=0.05, poll_min_s=0.05,
                         poll_fraction=0.05, poll_jitter=0.1)
    async with running(config):
        drop(tmp_path / "inbox", "before.prompt", "before the restart")
        await until(finished(tmp_path / "outbox", 1))
    assert (config.spool / "first-looks.json").is_file()
    async with running(config):
        drop(tmp_path / "inbox", "after.prompt", "after the restart")
        await until(finished(tmp_path / "outbox", 2))
    polls = {op.prompt: op.polls for op in sim.ops.values()}
    assert polls["before the restart"] >= 10, polls
    assert polls["after the restart"] <= 6, polls


async def test_an_unreadable_learned_file_is_ignored_and_replaced(
        tmp_path: Path, sim: Simulator) -> None:
    """What was learned is only a cache: a damaged file means polling as on a cold start
    (the daemon still starts and finishes the job), and it is written anew at shutdown."""
    config = make_config(tmp_path, sim.base_url, poll_initial_s=0.05, poll_min_s=0.05,
                         poll_fraction=0.05, poll_jitter=0.1)
    config.spool.mkdir(parents=True)
    learned = config.spool / "first-looks.json"
    learned.write_bytes(b'[{"model": "veo", "bounds": [1.0, ')
    async with running(config):
        drop(tmp_path / "inbox", "cold.prompt", "a cold start")
        await until(finished(tmp_path / "outbox", 1))
    [cold] = sim.ops.values()
    assert cold.polls >= 10
    assert msgspec.json.decode(learned.read_bytes())[0]["bounds"]


async def test_a_quiet_inbox_is_still_watched(tmp_path: Path, sim: Simulator) -> None:
    """After watch_busy_s without a file the watcher switches to its slow step and back: a
    file dropped then is still noticed by the watcher, long before the periodic rescan."""
    config = make_config(tmp_path, sim.base_url, watch_busy_s=0.2, watch_idle_step_ms=100,
                         rescan_s=60)
    async with running(config):
        drop(tmp_path / "inbox", "busy.prompt", "while busy")
        await until(finished(tmp_path / "outbox", 1), timeout=5)
        await asyncio.sleep(0.6)  # quiet: the watcher is on its idle step now
        drop(tmp_path / "inbox", "quiet.prompt", "after a quiet spell")
        await until(finished(tmp_path / "outbox", 2), timeout=5)
        await asyncio.sleep(0.6)
        drop(tmp_path / "inbox", "again.prompt", "after another quiet spell")
        await until(finished(tmp_path / "outbox", 3), timeout=5)


async def test_an_operation_found_done_calls_in_the_older_ones_of_its_kind() -> None:
    """A waiter that started before an operation found done is called in at once; a younger
    one, and one of another kind, go on waiting for their own time."""
    siblings = Siblings()
    kind, other = kind_of("m", {"duration_seconds": 8}), kind_of("m", {"duration_seconds": 4})
    older = asyncio.create_task(siblings.sleep(kind, 10.0, 60))
    younger = asyncio.create_task(siblings.sleep(kind, 30.0, 60))
    elsewhere = asyncio.create_task(siblings.sleep(other, 10.0, 60))
    await asyncio.sleep(0)
    assert siblings.finished(kind, 20.0) == 1
    await asyncio.wait_for(older, 1)
    await asyncio.sleep(0.05)
    assert not younger.done() and not elsewhere.done()
    younger.cancel()
    elsewhere.cancel()
    await asyncio.gather(younger, elsewhere, return_exceptions=True)
    assert siblings.finished(kind, 99.0) == 0  # the cancelled waiters left no trace


def long_intervals(tmp_path: Path, sim: Simulator, **overrides: Any) -> Config:
    """A schedule without jitter whose next look at an old operation is far off (poll_fraction
    0.5, up to a minute): a look that comes sooner was called in."""
    return make_config(tmp_path, sim.base_url, poll_initial_s=0.0, poll_min_s=0.05,
                       poll_max_s=60.0, poll_fraction=0.5, poll_jitter=0.0, **overrides)


@pytest.mark.parametrize("call_in", [True, False])
async def test_an_old_operation_is_looked_at_when_a_younger_sibling_finishes(
        tmp_path: Path, sim: Simulator, call_in: bool) -> None:
    """Two operations of one kind finish together. The old one (100 s) would next be looked
    at in a minute (poll_fraction 0.5, capped at poll_max_s); the young one every 50 ms. When
    the young one is found done the old one is looked at too, and both are back within a
    second; with poll_siblings off the old one is still waiting then."""
    config = long_intervals(tmp_path, sim, poll_siblings=call_in)
    kind = kind_of(config.model, {})
    async with aiohttp.ClientSession() as session:
        generation = Generation(VeoClient(session, config), SubmitGate(1000, 10), config)
        ops = [await generation.create(Member(prompt=f"{name} [latency=0.3]", model=config.model,
                                              parameters={}, output=name))
               for name in ("old", "young")]
        old = asyncio.create_task(generation.wait(ops[0], age_s=100.0, kind=kind))
        young = asyncio.create_task(generation.wait(ops[1], kind=kind))
        await asyncio.wait_for(young, 5)
        done, _ = await asyncio.wait([old], timeout=1.0)
        assert bool(done) == call_in
        old.cancel()
    assert sim.ops[ops[0]].polls == (2 if call_in else 1)


async def test_a_called_in_operation_still_running_waits_its_own_time_before_the_next(
        tmp_path: Path, sim: Simulator) -> None:
    """When durations vary, a called-in operation may still be running. It then goes back to
    its own schedule and is not called in again before its own next look: two young siblings
    finishing one after the other cost the old, slow one a single extra poll, not two."""
    config = long_intervals(tmp_path, sim)
    kind = kind_of(config.model, {})
    async with aiohttp.ClientSession() as session:
        generation = Generation(VeoClient(session, config), SubmitGate(1000, 10), config)
        prompts = ("slow [latency=30]", "young [latency=0.2]", "younger [latency=0.6]")
        ops = [await generation.create(Member(prompt=p, model=config.model, parameters={},
                                              output=p.split()[0])) for p in prompts]
        slow = asyncio.create_task(generation.wait(ops[0], age_s=100.0, kind=kind))
        await asyncio.wait_for(asyncio.gather(
            *(generation.wait(op, kind=kind) for op in ops[1:])), 5)
        await asyncio.sleep(0.1)
        slow.cancel()
    assert sim.ops[ops[0]].polls == 2  # its first look, and one call-in


@pytest.mark.parametrize(("done_at_s", "siblings", "back_within_2s", "polls"), [
    (10.6, True, True, 2),  # its kind's usual done age, after it finished: found done there
    (10.6, False, True, 2),  # the same without poll_siblings: what was learned, not a call-in
    (10.2, True, False, 2),  # too soon: one extra look finds it running, then its own time
    (None, True, False, 1),  # nothing learned: it waits its own next look (5 s)
])
async def test_an_operation_looks_again_at_the_age_its_kind_was_lately_found_done(
        tmp_path: Path, sim: Simulator, done_at_s: float | None, siblings: bool,
        back_within_2s: bool, polls: int) -> None:
    """An operation of 10 s found running would next be looked at 5 s later (poll_fraction
    0.5). The last ones of its kind were found done at a little over its own time: it looks
    once more at that age and is back at once, with or without ``poll_siblings`` (jobs
    dropped one at a time have no siblings waiting, and the look needs none). When that age
    comes before it is done, or nothing was learned, it waits its own next look, and a look
    at the usual age costs one poll at most."""
    config = long_intervals(tmp_path, sim, poll_siblings=siblings)
    kind = kind_of(config.model, {})
    async with aiohttp.ClientSession() as session:
        generation = Generation(VeoClient(session, config), SubmitGate(1000, 10), config)
        for _ in range(3 if done_at_s is not None else 0):
            # (an estimate far below 10 s: the first look is not put off past it)
            generation.first_look.finished(kind, running_at_s=0.0, done_at_s=done_at_s or 0.0,
                                           interval_s=0.05)
        op = await generation.create(Member(prompt="young [latency=0.5]", model=config.model,
                                            parameters={}, output="young"))
        waiting = asyncio.create_task(generation.wait(op, age_s=10.0, kind=kind))
        done, _ = await asyncio.wait([waiting], timeout=2.0)
        waiting.cancel()
    assert bool(done) is back_within_2s
    assert sim.ops[op].polls == polls


@pytest.mark.parametrize(("latency_s", "back_within_s", "polls"), [
    (0.8, 2.0, 2),  # done before the probe (at 10.4 s): found there
    (2.0, 3.9, 3),  # done between the probe and the low done age (12.2 s): found at the latter
])
async def test_a_probe_in_the_gap_comes_before_the_look_at_the_low_done_age(
        tmp_path: Path, sim: Simulator, latency_s: float, back_within_s: float,
        polls: int) -> None:
    """The last 8 of a kind were found running at 8.6 s and done at 12.2 s: a gap of 3.6 s,
    over half the interval (6.1 s at 12.2 s, poll_fraction 0.5). An operation of 9 s found
    running looks again in the gap's middle (10.4 s) and, still running there, at 12.2 s,
    instead of waiting its own next look (4.5 s on). Done before the probe, it is back
    after two polls; done after it, after three, the low done age's look following."""
    config = long_intervals(tmp_path, sim)
    kind = kind_of(config.model, {})
    async with aiohttp.ClientSession() as session:
        generation = Generation(VeoClient(session, config), SubmitGate(1000, 10), config)
        for _ in range(20):  # early estimates far below 9 s: the first look is at once
            generation.first_look.finished(kind, running_at_s=0.0, done_at_s=1.0,
                                           interval_s=1.0)
        for _ in range(8):  # the last 8, whose looks the follow-ups come from
            generation.first_look.finished(kind, running_at_s=8.6, done_at_s=12.2,
                                           interval_s=6.1)
        op = await generation.create(Member(prompt=f"probed [latency={latency_s}]",
                                            model=config.model, parameters={},
                                            output="probed"))
        started = time.monotonic()
        await asyncio.wait_for(generation.wait(op, age_s=9.0, kind=kind), 10)
        took = time.monotonic() - started
    assert took < back_within_s, took
    assert sim.ops[op].polls == polls


@pytest.mark.parametrize("skips", [3, 0])
async def test_a_cold_kinds_younger_operations_skip_looks_while_an_older_one_runs(
        tmp_path: Path, sim: Simulator, skips: int) -> None:
    """Nothing learned yet: one operation starts 0.3 s before four others of its kind, all
    taking 1 s, each looked at every 50 ms. With poll_cold_skips 3 the younger ones poll
    less than half as often as the old one (its looks stand in for theirs), and every one is
    still noticed within 0.3 s of finishing; with 0 they poll nearly as often as it does."""
    config = make_config(tmp_path, sim.base_url, poll_initial_s=0.0, poll_min_s=0.05,
                         poll_fraction=0.01, poll_jitter=0.0, poll_cold_skips=skips)
    kind = kind_of(config.model, {})
    async with aiohttp.ClientSession() as session:
        generation = Generation(VeoClient(session, config), SubmitGate(1000, 10), config)

        async def one(name: str) -> tuple[str, float]:
            op = await generation.create(Member(prompt=f"{name} [latency=1]",
                                                model=config.model, parameters={}, output=name))
            await generation.wait(op, kind=kind)
            return op, time.time()

        old = asyncio.create_task(one("old"))
        await asyncio.sleep(0.3)
        noticed = dict(await asyncio.gather(*(one(f"young{i}") for i in range(4))))
        noticed.update([await old])
    polls = {op: sim.ops[op].polls for op in noticed}
    old_polls = polls[next(op for op in noticed if sim.ops[op].prompt.startswith("old"))]
    young = [n for op, n in polls.items() if not sim.ops[op].prompt.startswith("old")]
    if skips:
        assert sum(young) / len(young) <= 0.5 * old_polls, polls
    else:
        assert sum(young) / len(young) >= 0.7 * old_polls, polls
    for op, at in noticed.items():
        done_at = sim.ops[op].done_at
        assert done_at is not None
        assert at - done_at < 0.3, (sim.ops[op].prompt, at - done_at)


async def test_a_cold_operation_finishing_before_an_older_sibling_is_noticed_in_time(
        tmp_path: Path, sim: Simulator) -> None:
    """Likeness can fail: the older operation runs 30 s, a younger one of its kind 0.6 s. The
    younger one skips at most three looks in a row on the older one's word, so it is noticed
    within four of its 50 ms intervals of finishing, not when the older one finishes."""
    config = make_config(tmp_path, sim.base_url, poll_initial_s=0.0, poll_min_s=0.05,
                         poll_fraction=0.01, poll_jitter=0.0, poll_cold_skips=3)
    kind = kind_of(config.model, {})
    async with aiohttp.ClientSession() as session:
        generation = Generation(VeoClient(session, config), SubmitGate(1000, 10), config)
        ops = [await generation.create(Member(prompt=p, model=config.model, parameters={},
                                              output=p.split()[0]))
               for p in ("slow [latency=30]", "quick [latency=0.6]")]
        slow = asyncio.create_task(generation.wait(ops[0], kind=kind))
        await asyncio.sleep(0.2)
        await asyncio.wait_for(generation.wait(ops[1], kind=kind), 5)
        noticed = time.time()
        slow.cancel()
    done_at = sim.ops[ops[1]].done_at
    assert done_at is not None
    assert noticed - done_at < 0.4, noticed - done_at
    assert sim.ops[ops[1]].polls <= 6, sim.ops[ops[1]].polls  # ~12 looks, most skipped


async def test_a_done_operation_also_calls_in_siblings_younger_than_its_last_gap() -> None:
    """Found done 2 s after it was last seen running, an operation calls in the siblings
    started up to 2 s after it (they have run longer than it was known to run), not one
    started 5 s after it."""
    siblings = Siblings()
    kind = kind_of("m", {"duration_seconds": 8})
    older, near, far = (asyncio.create_task(siblings.sleep(kind, born, 60))
                        for born in (10.0, 21.5, 25.0))
    await asyncio.sleep(0)
    assert siblings.finished(kind, 20.0, reach_s=2.0) == 2
    await asyncio.wait_for(asyncio.gather(older, near), 1)
    assert not far.done()
    far.cancel()
    await asyncio.gather(far, return_exceptions=True)


class RecordingSiblings(Siblings):
    """Siblings that also note how far forward each finish reached."""

    def __init__(self) -> None:
        super().__init__()
        self.reaches: list[float] = []

    def finished(self, kind: Hashable, born: float, reach_s: float = 0.0) -> int:
        self.reaches.append(reach_s)
        return super().finished(kind, born, reach_s)


async def test_only_the_first_finish_of_a_cold_kind_reaches_forward(
        tmp_path: Path, sim: Simulator) -> None:
    """The first operation of a kind found done calls in younger siblings too (half the gap
    between its last two looks); once the kind is learned, a finish calls in only older ones
    (reaching forward at every finish cost the makespan run lag)."""
    config = make_config(tmp_path, sim.base_url, poll_initial_s=0.0, poll_min_s=0.05,
                         poll_fraction=0.01, poll_jitter=0.0)
    kind = kind_of(config.model, {})
    async with aiohttp.ClientSession() as session:
        generation = Generation(VeoClient(session, config), SubmitGate(1000, 10), config)
        generation.siblings = recording = RecordingSiblings()
        for name in ("first", "second"):
            op = await generation.create(Member(prompt=f"{name} [latency=0.3]",
                                                model=config.model, parameters={}, output=name))
            await asyncio.wait_for(generation.wait(op, kind=kind), 5)
    first, second = recording.reaches
    assert 0 < first <= 0.05 / 2 + 1e-9, first  # half of one 50 ms interval at most
    assert second == 0.0
