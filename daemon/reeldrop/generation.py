"""One video with the service: create → wait → download, with retries and pacing.

The steps the daemon and the library share (one implementation). Nothing here persists
anything: callers hook in where they need to (the daemon stores each try and the operation
name; the library reports progress).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Hashable
from contextlib import AbstractContextManager
from pathlib import Path

from . import retry
from .config import Config
from .errors import APIError, GenerationFailed, GenerationTimeout
from .jobs import Member
from .polling import FirstLook, Siblings, poll_delay, poll_interval
from .scheduler import SubmitGate
from .sidecar import VideoFile
from .veo import Operation, VeoClient, video_uris
from .writer import Progress, download_video


class Generation:
    def __init__(self, client: VeoClient, gate: SubmitGate, config: Config) -> None:
        self.client, self.gate, self.config = client, gate, config
        self.first_look = FirstLook()
        self.siblings = Siblings()

    async def create(
        self,
        request: Member,
        *,
        tries: int | None = None,
        before_try: Callable[[], Awaitable[None]] | None = None,
        on_created: Callable[[str], Awaitable[None]] | None = None,
        guard: Callable[[], AbstractContextManager[None]] = contextlib.nullcontext,
    ) -> str:
        """Start the generation; returns the operation name.

        Every try first passes the global submission gate, then ``before_try``. ``on_created``
        runs inside ``guard`` together with the call, so the caller can make "call answered"
        and "answer stored" one step that shutdown lets finish.
        """

        async def gated() -> None:
            await self.gate.wait_turn()
            if before_try is not None:
                await before_try()

        async def attempt() -> str:
            with guard():
                try:
                    operation = await self.client.create(request)
                except APIError as e:
                    if e.status == 429:
                        self.gate.throttled(e.retry_after_s)
                    raise
                if on_created is not None:
                    await on_created(operation)
            return operation

        operation = await retry.call(
            attempt, tries=tries or self.config.create_tries, base_s=self.config.retry_base_s,
            cap_s=self.config.retry_cap_s, phase="create", before_try=gated)
        self.gate.accepted()
        return operation

    async def wait(
        self,
        operation: str,
        *,
        age_s: float = 0.0,
        on_poll: Callable[[float], None] | None = None,
        kind: Hashable = None,
    ) -> list[str]:
        """Poll on the adaptive schedule until done; the video URIs, or a typed failure.

        ``age_s`` is the operation's age as the wait begins (it may predate this process);
        by default it is counted from this call. ``kind``
        (``polling.kind_of``) lets the first look come when operations like this one
        usually finish, and lets this one look again, at most twice, where the last ones of
        its kind finished (``FirstLook.follow_s``); with ``poll_siblings`` it also lets a
        younger operation of the kind found done call this one in early
        (``polling.Siblings``), and while the kind is cold, lets an older one just seen
        running stand in for some of this one's looks (``poll_cold_skips``).
        """
        born = time.monotonic() - age_s  # when the operation started, on this clock

        def age() -> float:
            return time.monotonic() - born

        siblings = self.config.poll_siblings and kind is not None
        called_in = False  # the last wait was cut short by a sibling found done
        follows = 0  # looks taken where the last ones finished (follow_s)

        async def sleep(seconds: float) -> None:
            nonlocal called_in
            if siblings and not called_in:  # called in and still running: own time first
                called_in = await self.siblings.sleep(kind, born, seconds)
            else:
                called_in = False
                await asyncio.sleep(max(0.0, seconds))

        deadline_s = self.config.poll_deadline_s
        await sleep(self.first_look.wait_s(kind, self.config) - age())
        running_at: float | None = None  # its age at the last look that found it running
        skipped = 0  # looks skipped in a row on an older sibling's word (cold kinds)
        while True:
            looked_at = age()
            interval = poll_interval(looked_at, self.config)
            if (siblings and not called_in and skipped < self.config.poll_cold_skips
                    and not self.first_look.knows(kind)
                    and self.siblings.vouched(kind, born, 2 * interval)):
                skipped += 1  # an older one of its kind was just seen running: so is this one
            else:
                skipped = 0
                op = await self._look(operation)
                if op.done:
                    cold = not self.first_look.knows(kind)
                    self.first_look.finished(kind, running_at_s=running_at,
                                             done_at_s=looked_at, interval_s=interval)
                    if siblings:  # the older ones of its kind have most likely finished too,
                        # and on a cold kind the younger ones it stood in for (cold skips)
                        since = running_at or 0.0
                        reach = min(looked_at - since, interval) / 2 if cold else 0.0
                        self.siblings.finished(kind, born, reach)
                    return video_uris(op)
                running_at = looked_at
                if siblings:
                    self.siblings.seen_running(kind, born, interval)
                elapsed = age()
                if on_poll is not None:
                    on_poll(elapsed)
                if elapsed > deadline_s:
                    raise GenerationTimeout(
                        f"The operation did not finish within {deadline_s:g} s "
                        f"(poll_deadline_s); it may still finish on the service as {operation}.")
            elapsed = age()
            # Operations started before their kind's time was learned (a cold start's first
            # round) skip ahead to it as soon as it is.
            wait = max(poll_delay(elapsed, self.config),
                       self.first_look.wait_s(kind, self.config) - elapsed)
            if kind is not None and follows < FirstLook.FOLLOWS:  # where the last ones finished
                for usual in self.first_look.follow_s(kind, self.config):
                    if elapsed < usual < elapsed + wait:
                        wait, follows = usual - elapsed, follows + 1
                        break
            await sleep(min(wait, deadline_s - elapsed + 0.01))

    async def _look(self, operation: str) -> Operation:
        """One poll, with retries for transient errors; a 404 means the operation is gone."""
        try:
            return await retry.call(
                lambda: self.client.poll(operation), tries=self.config.poll_error_tries,
                base_s=self.config.retry_base_s, cap_s=self.config.retry_cap_s, phase="poll")
        except APIError as e:
            if e.status == 404:
                raise GenerationFailed(
                    f"The service no longer knows operation {operation} (404); operations "
                    "and their videos are kept for 2 days.") from None
            raise

    async def download(
        self, uri: str, partial: Path, final: Path, *, progress: Progress | None = None,
        make_partial_dir: bool = False, publish: bool = True,
    ) -> VideoFile:
        """Fetch one video to ``final`` via ``partial``, retried as a download (never a
        second generation). ``make_partial_dir``: create ``partial``'s directory if needed;
        without ``publish`` the video stays at ``partial`` (``writer.publish_videos``)."""
        parent_mode = self.config.dir_mode if make_partial_dir else None
        return await retry.call(
            lambda: download_video(self.client, uri, partial, final, self.config.file_mode,
                                   progress=progress, parent_mode=parent_mode,
                                   publish=publish),
            tries=self.config.download_tries, base_s=self.config.retry_base_s,
            cap_s=self.config.retry_cap_s, phase="download")
