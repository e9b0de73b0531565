"""Noticing job files: the inbox directory is the queue; watcher events are only hints.

watchfiles wakes us within milliseconds of a change, but it drops the kernel's overflow signal
without a word and reports a file while its writer is still writing. So every event (and a
timer, every ``rescan_s``) triggers a full scan of the inbox, and a file is taken only once it
is complete:

* renamed in after being written (its ctime is later than its mtime): at once;
* a ``.json`` file whose bytes already parse as JSON: at once (JSON cannot be cut short and
  still parse);
* anything else: once it has not been written for ``settle_s``.

The watch is off while the intake claims a pass of many files (``InboxWatch``): each file a
claim moves out of a watched inbox wakes the watcher's thread. The intake looks again once
the watch is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import time
from pathlib import Path

import msgspec
import watchfiles

from . import log
from .config import Config
from .jobs import is_job_name


class Scan(msgspec.Struct):
    ready: list[Path]
    next_check_s: float | None  # when an unsettled file will be worth another look


class InboxScanner:
    def __init__(self, inbox: Path, settle_s: float, max_bytes: int) -> None:
        self.inbox, self.settle_s, self.max_bytes = inbox, settle_s, max_bytes
        self._warned: set[str] = set()

    def scan(self) -> Scan:
        """Every complete job file in the inbox, oldest first."""
        ready: list[tuple[int, Path]] = []
        wait: float | None = None
        now_ns = time.time_ns()
        with os.scandir(self.inbox) as entries:
            for entry in entries:
                if not is_job_name(entry.name):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    self._warn_once(entry.name, "intake.ignored_directory")
                    continue
                quiet_s = (now_ns - st.st_mtime_ns) / 1e9
                if stat.S_ISLNK(st.st_mode) or self._complete(entry.path, st, quiet_s):
                    ready.append((st.st_mtime_ns, Path(entry.path)))
                else:
                    remaining = max(0.01, self.settle_s - quiet_s)
                    wait = remaining if wait is None else min(wait, remaining)
        ready.sort()
        return Scan(ready=[p for _, p in ready], next_check_s=wait)

    def _complete(self, path: str, st: os.stat_result, quiet_s: float) -> bool:
        if quiet_s >= self.settle_s or st.st_ctime_ns > st.st_mtime_ns:
            return True
        if path.endswith(".json") and 0 < st.st_size <= self.max_bytes:
            try:
                with open(path, "rb") as f:
                    msgspec.json.decode(f.read())
            except (OSError, msgspec.DecodeError):
                return False
            return True
        return False

    def _warn_once(self, name: str, event: str) -> None:
        if name not in self._warned:
            self._warned.add(name)
            log.get().warning(event, name=name)


async def pump(
    inbox: Path, wake: asyncio.Event, stop: asyncio.Event, *, rescan_s: float, step_ms: int,
    idle_step_ms: int, busy_s: float, force_polling: bool, poll_delay_ms: int,
) -> None:
    """Set ``wake`` whenever the inbox may have changed, and at least every ``rescan_s``.

    watchfiles looks for changes every ``step`` and reports a batch once a step adds nothing,
    so its latency is about 1.5 steps and each step wakes a thread even when nothing happens.
    The pump therefore watches with ``step_ms`` while files arrive and for ``busy_s`` after
    the last one, and with ``idle_step_ms`` when the inbox is quiet: fast pickup when it
    matters, little CPU when idle. Switching restarts the watch; the rescan that follows
    every restart covers a file that landed in between.
    """

    def relevant(change: watchfiles.Change, path: str) -> bool:
        # A file leaving the inbox (our own claims, mostly) is never work: it neither
        # wakes the intake nor keeps the watch on its fast step.
        return change != watchfiles.Change.deleted and is_job_name(os.path.basename(path))

    busy = False
    while not stop.is_set():
        step = step_ms if busy else idle_step_ms
        watch = watchfiles.awatch(
            inbox,
            watch_filter=relevant,
            recursive=False,
            # Idle: report the first change one step after it is seen, even while more
            # arrive (a burst landing in a quiet inbox is claimed while it lands; the busy
            # watch that follows groups the rest). Busy: group for up to 200 ms.
            debounce=max(200, step * 4) if busy else 1,
            step=step,
            # Busy: time out after busy_s without a change and slow down. Idle: the empty
            # yield on timeout is the periodic rescan.
            rust_timeout=int((busy_s if busy else rescan_s) * 1000),
            yield_on_timeout=True,
            stop_event=stop,
            force_polling=force_polling,
            poll_delay_ms=poll_delay_ms,
        )
        async with contextlib.aclosing(watch):  # the old watch ends before the next starts
            async for changes in watch:
                wake.set()
                if bool(changes) != busy:
                    busy = not busy
                    break


WATCH_SETUP_S = 0.05  # time for a started watch to be in place before the intake looks again


class InboxWatch:
    """The pump's task for the daemon, started and stopped by the intake.

    On only while the intake waits for files: during a big pass every claim's move out of
    the inbox is an inotify event that wakes the watcher's thread (on a virtual machine an
    interrupt to the other core, paid by the claiming thread: 7% of its samples in a
    10,000-file backlog, and 10,000 claims in one process took 12-25% longer with the
    daemon's watch on the inbox). A file that lands meanwhile is found by the intake's look
    once the watch is back."""

    def __init__(self, inbox: Path, wake: asyncio.Event, config: Config) -> None:
        self.inbox, self.wake, self.config = inbox, wake, config
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def on(self) -> bool:
        return self._task is not None

    def start(self, group: asyncio.TaskGroup) -> None:
        if self._task is None:
            self._stop, c = asyncio.Event(), self.config
            self._task = group.create_task(pump(
                self.inbox, self.wake, self._stop, rescan_s=c.rescan_s,
                step_ms=c.watch_step_ms, idle_step_ms=c.watch_idle_step_ms,
                busy_s=c.watch_busy_s, force_polling=c.poll, poll_delay_ms=c.poll_delay_ms))

    def stop(self, *, cancel: bool = False) -> None:
        """The watch ends within one of its steps (the caller need not wait), or at once
        with ``cancel`` (shutdown)."""
        if self._task is not None:
            self._stop.set()
            if cancel:
                self._task.cancel()
            self._task = None
