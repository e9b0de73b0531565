"""Intake: complete files only, every file once, links refused, two daemons on one inbox."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import msgspec
import pytest

from reeldrop import watcher
from reeldrop.daemon import INTAKE_BATCH, Daemon
from reeldrop.intake import BATCH_SYNC_FROM, Intake, Taken
from reeldrop.simulator import SimConfig, Simulator
from reeldrop.spool import Spool
from reeldrop.watcher import InboxScanner

from .support import drop, finished, kept, make_config, running, sidecars, until


def test_a_file_still_being_written_in_place_is_not_taken(tmp_path: Path) -> None:
    """An in-place write is taken only once quiet for settle_s; a renamed-in file at once."""
    scanner = InboxScanner(tmp_path, settle_s=60, max_bytes=1 << 20)
    (tmp_path / "half.json").write_text('{"prompt": "a ca')
    (tmp_path / "text.prompt").write_text("a prompt written in place")
    drop(tmp_path, "renamed.prompt", "written elsewhere, renamed in")
    os.utime(tmp_path / "renamed.prompt", ns=(0, 0))  # renamed after its last write
    (tmp_path / "whole.json").write_text('{"prompt": "complete"}')
    scan = scanner.scan()
    assert sorted(p.name for p in scan.ready) == ["renamed.prompt", "whole.json"]
    assert scan.next_check_s is not None and scan.next_check_s <= 60
    assert InboxScanner(tmp_path, settle_s=0, max_bytes=1 << 20).scan().ready


def test_hidden_temporary_and_other_names_are_left_alone(tmp_path: Path) -> None:
    """Dotfiles, *.tmp, *.part, *~, directories and foreign names are never picked up."""
    for name in (".x.prompt", "a.prompt.tmp", "b.part", "c.json~", "notes.txt", "v.mp4"):
        (tmp_path / name).write_text("x")
    (tmp_path / "dir.json").mkdir()
    assert InboxScanner(tmp_path, settle_s=0, max_bytes=1 << 20).scan().ready == []



def test_batches_sharing_a_listing_know_the_names_the_earlier_ones_took(
        tmp_path: Path) -> None:
    """A pass's big batches share one listing of the outbox for a second
    (``LISTING_FRESH_S``), with the sidecars they publish added: a valid file in the second
    batch takes over the name of an invalid one the first batch failed (no video: the name
    is free again), as it does across passes, instead of moving on to NAME.2."""
    config = make_config(tmp_path, "http://127.0.0.1:9/v1beta")
    inbox, outbox = config.require_dirs()
    spool = Spool(config.spool, inbox, outbox, config.file_mode, config.dir_mode)
    spool.prepare()
    intake = Intake(config, spool)

    def batch(prefix: str, last: str, data: str) -> list[Path]:
        return ([drop(inbox, f"{prefix}{i:02d}.prompt", "a prompt")
                 for i in range(BATCH_SYNC_FROM - 1)] + [drop(inbox, last, data)])

    first = intake.take(batch("a", "clip.json", '{"prompt": "x", "colour": 1}'))
    assert not first.durable  # a big batch: names looked up in a listing
    assert sidecars(outbox)["clip"].state == "failed"
    intake.take(batch("b", "clip.prompt", "a valid clip"))
    docs = sidecars(outbox)
    assert docs["clip"].prompt == "a valid clip"
    assert docs["clip"].state == "queued"
    assert "clip.2" not in docs

async def test_a_burst_into_a_quiet_inbox_is_reported_while_it_lands(tmp_path: Path) -> None:
    """In a quiet inbox (watched with the idle step, here 200 ms) a stream of new files is
    reported within two steps of the first, though files keep arriving: a burst is claimed
    while it lands, not once it stops or once watchfiles' debounce (here 800 ms) runs out."""
    wake, stop = asyncio.Event(), asyncio.Event()
    pump = asyncio.create_task(watcher.pump(
        tmp_path, wake, stop, rescan_s=60, step_ms=5, idle_step_ms=200, busy_s=10,
        force_polling=False, poll_delay_ms=1000))

    async def stream() -> None:
        for i in range(600):  # for 3 s or more, longer than any wait below
            (tmp_path / f"job-{i}.prompt").write_text("a prompt")
            await asyncio.sleep(0.005)

    try:
        await asyncio.sleep(0.5)  # the watch is set up
        wake.clear()
        started = time.monotonic()
        files = asyncio.create_task(stream())
        await asyncio.wait_for(wake.wait(), 5)
        took = time.monotonic() - started
        assert not files.done(), "the stream ended first: the test proves nothing"
        files.cancel()
    finally:
        stop.set()
        await asyncio.wait_for(pump, 5)
    assert took < 0.6


async def test_files_leaving_the_inbox_do_not_wake_the_intake(tmp_path: Path) -> None:
    """A job file moved out of the inbox (what every claim does) is no work: it does not
    wake the intake (nor keep the watch on its fast step, which costs about 12 ms of CPU a
    second); a file moved in afterwards still does, within a few steps."""
    inbox, elsewhere = tmp_path / "inbox", tmp_path / "claimed"
    inbox.mkdir()
    elsewhere.mkdir()
    for i in range(50):
        (inbox / f"job-{i}.prompt").write_text("a prompt")
    wake, stop = asyncio.Event(), asyncio.Event()
    pump = asyncio.create_task(watcher.pump(
        inbox, wake, stop, rescan_s=60, step_ms=5, idle_step_ms=20, busy_s=10,
        force_polling=False, poll_delay_ms=1000))
    try:
        await asyncio.sleep(0.5)  # the watch is set up
        wake.clear()
        for path in list(inbox.iterdir()):
            path.rename(elsewhere / path.name)
        await asyncio.sleep(0.5)  # 25 idle steps
        woken_by_leaving = wake.is_set()
        drop(inbox, "arrived.prompt", "a new job")
        await asyncio.wait_for(wake.wait(), 2)
    finally:
        stop.set()
        await asyncio.wait_for(pump, 5)
    assert not woken_by_leaving


@pytest.fixture
def sim_config() -> SimConfig:
    return SimConfig(latency_s=0.05, latency_jitter_s=0.05, seed=4)


async def test_a_symlink_is_refused_not_followed(tmp_path: Path, sim: Simulator) -> None:
    """A link in the inbox fails with a message; the file it points to is neither read nor moved."""
    secret = tmp_path / "secret.prompt"
    secret.write_text("do not read me")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "link.prompt").symlink_to(secret)
    async with running(make_config(tmp_path, sim.base_url)):
        await until(finished(tmp_path / "outbox", 1))
    doc = sidecars(tmp_path / "outbox")["link"]
    assert doc.state == "failed"
    assert doc.error is not None
    assert doc.error.message.startswith("link.prompt is a symbolic link")  # its own name
    assert secret.read_text() == "do not read me"
    assert sim.stats["submissions"] == 0


async def test_a_named_pipe_is_refused_without_blocking_the_daemon(
        tmp_path: Path, sim: Simulator) -> None:
    """A FIFO named like a job fails with "not a regular file" instead of hanging the
    intake on an open or read that waits for a writer, and is kept in failed/; a good job
    dropped after it still succeeds."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    os.mkfifo(inbox / "pipe.prompt")
    async with running(make_config(tmp_path, sim.base_url)):
        drop(inbox, "good.prompt", "a good prompt")
        await until(finished(tmp_path / "outbox", 2))
    docs = sidecars(tmp_path / "outbox")
    assert docs["good"].state == "succeeded"
    assert docs["pipe"].state == "failed" and docs["pipe"].error is not None
    assert docs["pipe"].error.message == "pipe.prompt is not a regular file."
    assert "pipe.prompt" in kept(inbox / ".reeldrop" / "failed")
    assert sim.stats["submissions"] == 1


async def test_a_big_pass_runs_unwatched_and_files_landing_meanwhile_are_taken_after_it(
        tmp_path: Path, sim: Simulator, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pass of many files runs with the inbox watch off (each claim would wake the
    watcher's thread), and the watch is back after it. Files that land while it is off are
    found by the look that follows the pass, not at the next rescan an hour later."""
    inbox, outbox, staging = tmp_path / "inbox", tmp_path / "outbox", tmp_path / "staging"
    # Alone at start, and empty: it fails at once, so no worker takes a job and wakes the
    # intake (as any does) before the backlog's pass.
    os.utime(drop(inbox, "first.prompt", ""), ns=(0, 0))
    staging.mkdir()
    for i in range(INTAKE_BATCH + 50):  # complete files (written, then renamed in)
        (staging / f"b{i:03d}.prompt").write_text(f"backlog {i}")
        os.utime(staging / f"b{i:03d}.prompt", ns=(0, i))
    daemon = Daemon(make_config(tmp_path, sim.base_url, rescan_s=3600))
    take = daemon.intake.take
    watched: dict[str, list[bool]] = {"first": [], "b": [], "late": [], "next": []}

    def take_and_drop(paths: list[Path]) -> Taken:  # in the intake thread
        states = watched[paths[0].stem.rstrip("0123456789")]  # one kind of file a pass
        states.append(daemon.inbox_watch.on)
        if states is watched["first"]:  # the first pass: a backlog lands, unwatched
            for path in staging.iterdir():
                path.rename(inbox / path.name)
        if states is watched["b"] and len(states) == 2:  # in the backlog's pass: one more
            drop(inbox, "late.prompt", "landed while the pass ran")
        return take(paths)

    monkeypatch.setattr(daemon.intake, "take", take_and_drop)
    async with running(daemon):
        await until((outbox / "late.json").exists, timeout=15, what="late.json")
        await until(lambda: daemon.inbox_watch.on, timeout=5, what="the watch back")
        drop(inbox, "next.prompt", "after the pass")
        await until((outbox / "next.json").exists, timeout=5, what="next.json")
    assert watched["first"] == [False]  # no watch before the first pass
    assert len(watched["b"]) > 2 and not any(watched["b"])  # the watch off in a big pass
    assert watched["late"] == watched["next"] == [True]  # and back after it
    assert len(sidecars(outbox)) == INTAKE_BATCH + 53


async def test_a_pass_cut_short_by_queue_max_does_not_scan_the_inbox_again_at_once(
        tmp_path: Path, sim: Simulator, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a big pass that queue_max cut short, the intake does not look at the inbox
    again at once, as it does after a big pass that took everything: the files left behind
    are taken when a worker makes room, and an inbox of 100,000 files would be read twice
    per refill. The workers here stay busy (hour-long operations), so nothing makes room."""
    sim.config = msgspec.structs.replace(sim.config, latency_s=3600.0)
    inbox = tmp_path / "inbox"
    for i in range(2 * INTAKE_BATCH):
        os.utime(drop(inbox, f"b{i:03d}.prompt", f"backlog {i}"), ns=(0, i))
    daemon = Daemon(make_config(tmp_path, sim.base_url, queue_max=INTAKE_BATCH, rescan_s=3600))
    scan, scans = daemon.scanner.scan, 0

    def counted_scan() -> watcher.Scan:
        nonlocal scans
        scans += 1
        return scan()

    monkeypatch.setattr(daemon.scanner, "scan", counted_scan)
    async with running(daemon):
        await until(lambda: daemon.inbox_watch.on, timeout=10, what="the watch on")
        await asyncio.sleep(0.5)
        assert scans == 1
        assert sum(p.suffix == ".prompt" for p in inbox.iterdir()) == INTAKE_BATCH


async def test_a_burst_of_files_is_taken_completely(tmp_path: Path, sim: Simulator) -> None:
    """1,000 files renamed in at once while the daemon runs: every one is claimed, once."""
    async with running(make_config(tmp_path, sim.base_url, concurrency=50)):
        inbox = tmp_path / "inbox"
        staging = tmp_path / "staging"
        staging.mkdir()
        for i in range(1000):
            (staging / f"j{i:04d}.prompt").write_text(f"prompt {i}")
        for i in range(1000):
            os.rename(staging / f"j{i:04d}.prompt", inbox / f"j{i:04d}.prompt")
        await until(finished(tmp_path / "outbox", 1000), timeout=240)
    docs = sidecars(tmp_path / "outbox")
    assert len(docs) == 1000
    assert {d.state for d in docs.values()} == {"succeeded"}
    assert sorted(sim.submissions.values()) == [1] * 1000


async def test_two_daemons_sharing_an_inbox_take_each_file_once(
        tmp_path: Path, sim: Simulator) -> None:
    """Claims are atomic renames: two daemons on one inbox and outbox never share a job."""
    first = make_config(tmp_path, sim.base_url)
    second = make_config(tmp_path, sim.base_url, state_dir=str(tmp_path / "inbox" / ".second"))
    async with running(first), running(second):
        for i in range(100):
            drop(tmp_path / "inbox", f"j{i}.prompt", f"prompt {i}")
        await until(finished(tmp_path / "outbox", 100), timeout=60)
        await asyncio.sleep(0.2)
    docs = sidecars(tmp_path / "outbox")
    assert len(docs) == 100 and {d.state for d in docs.values()} == {"succeeded"}
    assert sorted(sim.submissions.values()) == [1] * 100
    one = set(kept(tmp_path / "inbox" / ".reeldrop" / "done"))
    two = set(kept(tmp_path / "inbox" / ".second" / "done"))
    assert len(one) + len(two) == 100
    assert one and two, "one daemon took everything; the test proved nothing"
