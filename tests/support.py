"""Helpers for the tests: a daemon around the simulator, waiting, dropping files, decoding.

Nothing here mocks aiohttp or the filesystem: the simulator is a real HTTP server, the inbox
and outbox are real directories under ``tmp_path``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import struct
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import av

from reeldrop.config import Config, load
from reeldrop.daemon import Daemon
from reeldrop.sidecar import Sidecar, read
from reeldrop.simulator import SimConfig, Simulator

TEST_KEY = "AIzaTEST-reeldrop-0123456789abcdefghij"
FAST: dict[str, Any] = {
    "poll_initial_s": 0.05, "poll_min_s": 0.05, "poll_max_s": 0.2, "settle_s": 0.3,
    "retry_base_s": 0.05, "retry_cap_s": 0.5, "rescan_s": 5, "concurrency": 8,
    "submissions_per_minute": 60000, "submit_burst": 50, "shutdown_grace_s": 5,
}


class NamesAppearing:
    """The names linked or renamed into one directory, in order, from the kernel's inotify
    (through libc: real events, so no version of a file is missed between two reads)."""

    IN_MOVED_TO, IN_CREATE = 0x80, 0x100

    def __init__(self, directory: Path) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0 or libc.inotify_add_watch(
                self.fd, os.fsencode(directory), self.IN_CREATE | self.IN_MOVED_TO) < 0:
            raise OSError(ctypes.get_errno(), "inotify")
        self.names: list[str] = []

    def read(self) -> list[str]:
        """Every name that appeared so far."""
        with contextlib.suppress(BlockingIOError):
            while data := os.read(self.fd, 1 << 16):
                at = 0
                while at < len(data):
                    _wd, _mask, _cookie, size = struct.unpack_from("iIII", data, at)
                    name = data[at + 16:at + 16 + size].rstrip(b"\0")
                    self.names.append(os.fsdecode(name))
                    at += 16 + size
        return self.names

    def close(self) -> None:
        os.close(self.fd)


def make_config(tmp_path: Path, base_url: str, **overrides: Any) -> Config:
    flags = {"inbox": str(tmp_path / "inbox"), "outbox": str(tmp_path / "outbox"),
             "base_url": base_url, "api_key": TEST_KEY, **FAST, **overrides}
    return load(environ={}, flags=flags)


@contextlib.asynccontextmanager
async def running(config: Config | Daemon) -> AsyncIterator[Daemon]:
    """A daemon serving in this event loop until the block ends (given built, when a test
    must reach into it before it starts)."""
    daemon = config if isinstance(config, Daemon) else Daemon(config)
    task = asyncio.create_task(daemon.serve())
    try:
        await asyncio.wait_for(daemon.ready.wait(), 10)
        yield daemon
    finally:
        daemon.should_exit.set()
        await asyncio.wait_for(task, 30)


async def until(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.02)


def sidecars(outbox: Path) -> dict[str, Sidecar]:
    found = {}
    for p in outbox.glob("*.json"):
        if not p.name.endswith(".batch.json") and (sc := read(p)) is not None:
            found[sc.output] = sc
    return found


def kept(area: Path) -> dict[str, Path]:
    """The job files kept in a spool area (``done/`` or ``failed/``), by their original name."""
    return {p.name.partition(".")[2]: p for p in area.glob("*.*")
            if p.name.endswith((".prompt", ".json"))}


def finished(outbox: Path, count: int) -> Callable[[], bool]:
    return lambda: sum(sc.done for sc in sidecars(outbox).values()) >= count


def drop(inbox: Path, name: str, data: str | bytes) -> Path:
    """Write a job the recommended way: a hidden temp file, then a rename into the inbox."""
    inbox.mkdir(parents=True, exist_ok=True)
    tmp = inbox / f".{name}.tmp"
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    final = inbox / name
    os.replace(tmp, final)
    return final


def playable_frames(path: Path) -> int:
    """Decode every video frame with a real demuxer and decoder (PyAV/FFmpeg)."""
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


REELDROP = [sys.executable, "-m", "reeldrop"]


def daemon_args(tmp_path: Path, base_url: str, *extra: str) -> list[str]:
    """`reeldrop run` with fast test settings, as a subprocess would be started."""
    args = [*REELDROP, "run", "--inbox", str(tmp_path / "inbox"),
            "--outbox", str(tmp_path / "outbox"), "--base-url", base_url, "--log-format", "json"]
    for name, value in FAST.items():
        args += ["--" + name.replace("_", "-"), str(value)]
    return [*args, *extra]


LOGS: dict[int, Path] = {}  # pid → the log file a spawned daemon writes to


async def spawn(args: list[str], env: dict[str, str], log: Path) -> asyncio.subprocess.Process:
    with log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            *args, env=env, stdout=out, stderr=asyncio.subprocess.STDOUT,
            stdin=asyncio.subprocess.DEVNULL)
    LOGS[proc.pid] = log
    return proc


async def wait_exit(proc: asyncio.subprocess.Process, timeout: float = 30) -> int:
    """The exit code; a daemon that outlives ``timeout`` is aborted (with PYTHONFAULTHANDLER
    set it prints every thread's stack) and the failure shows the end of its log."""
    try:
        return await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        proc.send_signal(signal.SIGABRT)
        await proc.wait()
        log = LOGS.get(proc.pid)
        tail = log.read_text(errors="replace")[-6000:] if log and log.exists() else ""
        raise AssertionError(f"the daemon did not exit within {timeout} s; its log ends:\n"
                             f"{tail}") from None


async def wait_ready(log: Path, before: int, timeout: float = 20) -> None:
    """Wait for one more `daemon.ready` line in a subprocess's JSON log than ``before``."""
    def ready_count() -> int:
        return log.read_bytes().count(b'"daemon.ready"') if log.exists() else 0

    await until(lambda: ready_count() > before, timeout, what="daemon.ready")


async def batch_through(tmp_path: Path, sim_config: SimConfig, count: int, *,
                        timeout: float = 120, **settings: Any
                        ) -> tuple[Simulator, dict[str, Sidecar]]:
    """``count`` jobs (``prompt 0``, …) through an in-process daemon against a fresh
    simulator; returns the simulator (its counters) and the finished sidecars."""
    sim = Simulator(sim_config)
    await sim.start()
    try:
        async with running(make_config(tmp_path, sim.base_url, **settings)):
            for i in range(count):
                drop(tmp_path / "inbox", f"j{i:03d}.prompt", f"prompt {i}")
            await until(finished(tmp_path / "outbox", count), timeout=timeout)
    finally:
        await sim.stop()
    return sim, sidecars(tmp_path / "outbox")


async def finish_in_new_daemon(tmp_path: Path, base_url: str, env: dict[str, str],
                               count: int) -> None:
    """Start a daemon, wait until ``count`` sidecars are final, stop it; it must exit 0."""
    log = tmp_path / "log"
    before = log.read_bytes().count(b'"daemon.ready"') if log.exists() else 0
    proc = await spawn(daemon_args(tmp_path, base_url), env, log)
    try:
        await wait_ready(log, before)
        await until(finished(tmp_path / "outbox", count), timeout=90)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc) == 0
