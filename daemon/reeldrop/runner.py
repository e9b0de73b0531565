"""One member's life: submit → poll → download → succeeded (or failed, with a reason).

Each step is persisted before the next begins, so a restart resumes where the crash left off:
a member with an operation name is polled, never submitted again. The only ambiguous moment is
a crash after the create call was sent and before its answer was stored (state ``submitting``
with no ``operation``); ``resubmit_unconfirmed`` decides whether such a member is submitted
again (default, logged as ``job.resubmit_unconfirmed``) or failed with an explanation.

A life has two stages, so that a download never holds a generation slot: ``generate``
(submit, then poll until done) and ``deliver`` (download, then the final write). The daemon
bounds each stage on its own (``concurrency``, ``download_concurrency``); a slot at the
service is free again the moment its operation is done, as an oracle's would be.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from . import blocking, log
from .config import Config
from .durable_writes import DurableWrites, Settling
from .errors import GenerationFailed, OutputError, ReeldropError, describe
from .files import PARTIAL_DIR
from .generation import Generation
from .jobs import Member
from .polling import kind_of
from .scheduler import SubmitGate
from .sidecar import Sidecar, VideoFile, now
from .spool import JobRun, Spool
from .veo import VeoClient
from .writer import Staged

PROGRESS_EVERY_S = 1.0


class BriefState:
    """A passing state (submitting, downloading) published only once it has lasted
    ``brief_state_s``, and its newer versions (a download's progress), one write at a time.

    Against the service such a state lasts a second or more and is always shown. Where it
    is over in milliseconds no watcher could act on it, and each sidecar version costs a
    file: on ext4 without a journal every replace frees an inode that the next file creation
    must step over (see benchmarks/README.md). ``settle()`` before the next state's write
    keeps the versions in order. A failed write is logged, not raised: the next state's
    write reports the outbox's trouble, and it may be the answer of a create call (or a
    downloaded video) that must be stored.
    """

    def __init__(self, spool: Spool, member: Sidecar, after_s: float) -> None:
        self.spool, self.member = spool, member
        self.writing: asyncio.Future[None] | None = None
        self._timer = asyncio.get_running_loop().call_later(after_s, self._show)

    def _show(self) -> None:
        self.writing = blocking.run(self.spool.publish, self.member)
        self.writing.add_done_callback(_log_unshown)

    @property
    def busy(self) -> bool:
        """A write is under way (another version must not start beside it)."""
        return self.writing is not None and not self.writing.done()

    def show_now(self, member: Sidecar) -> None:
        """Publish a newer version at once (call it only when not ``busy``)."""
        assert not self.busy
        self._timer.cancel()
        self.member = member
        self._show()

    def cancel(self) -> None:
        """Not shown unless already under way (a write that started lands regardless)."""
        self._timer.cancel()

    async def settle(self) -> None:
        """Cancel the show, or wait until the last write landed: the next version must land
        after it."""
        self._timer.cancel()
        if self.writing is not None:
            with contextlib.suppress(OutputError):  # logged by _log_unshown
                await asyncio.shield(self.writing)


def _log_unshown(write: asyncio.Future[None]) -> None:
    """A passing state's failed write, logged in the job's context (the callback's)."""
    error = None if write.cancelled() else write.exception()
    if isinstance(error, OutputError):
        log.get().warning("sidecar.brief_state_not_shown", error=error.message)
    elif error is not None:
        log.get().error("sidecar.brief_state_error", error=describe(error).message)


@dataclass(frozen=True)
class Generated:
    """A member whose operation is done: what its download stage needs."""

    member: Sidecar
    uris: list[str]
    started: float  # monotonic time its worker took it (for the summary line)


def _age_s(stamp: str | None) -> float:
    if stamp is None:
        return 0.0
    return max(0.0, time.time() - datetime.fromisoformat(stamp).timestamp())


class Runner:
    def __init__(self, config: Config, client: VeoClient, spool: Spool, gate: SubmitGate,
                 on_settled: Callable[[Sidecar], None] | None = None):
        self.config, self.spool = config, spool
        self.generation = Generation(client, gate, config)
        self.on_settled = on_settled or (lambda _member: None)
        self.critical: set[asyncio.Task[Any]] = set()  # tasks in a step shutdown lets finish
        self.durable_writes = DurableWrites(spool)  # shared by jobs whose states change together
        self.settling: set[Settling] = set()  # final writes queued or under way

    @contextlib.contextmanager
    def _critical(self) -> Iterator[None]:
        """Mark a step that shutdown should let finish (a create call, a download)."""
        task = asyncio.current_task()
        assert task is not None
        self.critical.add(task)
        try:
            yield
        finally:
            self.critical.discard(task)

    async def generate(self, run: JobRun, index: int) -> Generated | Settling:
        """Submit a member (unless it has an operation) and wait until its operation is done.

        Returns what the download stage needs, or, if the member failed, its final write,
        still under way (see ``_settle_later``). Once it returns, the member's generation slot
        is free: the download holds none. Cancellation keeps the member resumable.
        """
        member = run.members[index - 1]
        logger = log.get()
        started = time.monotonic()
        try:
            if member.operation is None:
                member = await self._submit(run, member, logger)
            return Generated(member, await self._await_done(member), started)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - a bug must fail this job, not the daemon
            return self._settle_later(run, self._failed(run, index, e), started)

    async def deliver(self, run: JobRun, generated: Generated) -> Settling:
        """Download a generated member's videos; return its final write, still under way.

        The final write (record, sidecar, archive) goes with the others of the moment
        (``DurableWrites``) and, once queued, lands even if everything else is cancelled.
        Cancellation before it keeps the member resumable: a restart polls the operation
        (done) and downloads again, resuming from the partial file.
        """
        # Shown, not recorded: after a crash the operation is polled again (it is done).
        member = generated.member.moved("downloading")
        shown = BriefState(self.spool, member, self.config.brief_state_s)
        try:
            videos = await self._download(run, member, generated.uris, shown)
            member = member.moved("succeeded", videos=videos, error=None, bytes_done=None,
                                  bytes_total=None)
        except asyncio.CancelledError:
            shown.cancel()
            raise
        except Exception as e:  # noqa: BLE001 - a bug must fail this job, not the daemon
            member = self._failed(run, member.index, e)
        await shown.settle()
        return self._settle_later(run, member, generated.started)

    @staticmethod
    def _failed(run: JobRun, index: int, error: Exception) -> Sidecar:
        """The member as failed by ``error``, from its last recorded state (call it in the
        ``except`` block: a bug's traceback is logged)."""
        if not isinstance(error, ReeldropError):
            log.get().exception("job.internal_error")
        info = error.info() if isinstance(error, ReeldropError) else describe(error)
        return run.members[index - 1].moved("failed", error=info)

    def _settle_later(self, run: JobRun, member: Sidecar, started: float) -> Settling:
        """Queue the member's final write (``DurableWrites``); report it once it landed."""
        settling = self.durable_writes.settle(run, member)
        self.settling.add(settling)
        settling.add_done_callback(self.settling.discard)
        settling.add_done_callback(lambda done: self._finished(done, run, member, started))
        return settling

    def _finished(self, settling: Settling, run: JobRun, member: Sidecar,
                  started: float) -> None:
        """Once the member's final write landed (in the job's log context): ``on_settled``,
        then the job's summary line."""
        error = None if settling.cancelled() else settling.exception()
        archived: Path | None = None
        if error is not None:  # write_group reports OutputError; anything else is a bug
            log.get().error("job.final_write_error", error=describe(error).message)
        elif isinstance(outcome := settling.result(), OutputError):
            # Kept claimed: a restart picks the member up again.
            log.get().error("job.state_write_failed", job_id=run.job_id, error=outcome.message)
            self.on_settled(member)
        else:
            archived = outcome
            self.on_settled(member)
        log.get().info(
            "job.finished", state=member.state, attempts=member.attempts,
            seconds=round(time.monotonic() - started, 3),
            bytes=sum(v.bytes for v in member.videos), operation=member.operation,
            error=member.error.message if member.error else None,
            archived=archived.parent.name if archived else None,  # the job's last member
        )

    async def _submit(self, run: JobRun, member: Sidecar, logger: log.Logger) -> Sidecar:
        if member.state == "submitting":
            if not self.config.resubmit_unconfirmed:
                raise GenerationFailed(
                    "The daemon stopped while this job's create call was in flight, so the "
                    "service may or may not have started it; drop the file again to retry.")
            logger.warning("job.resubmit_unconfirmed", attempts=member.attempts)
        remaining = self.config.create_tries - member.attempts
        if remaining <= 0:  # the budget holds across restarts: a job never retries forever
            raise GenerationFailed(
                f"Gave up after {member.attempts} create attempts (create_tries) without an "
                "operation from the service; drop the file again to retry.")
        current = member
        shown: BriefState | None = None  # the current try's submitting state
        request = Member(prompt=member.prompt, model=member.model,
                         parameters=member.parameters, output=member.output)

        async def before_try() -> None:
            nonlocal current, shown
            if shown is not None:
                await shown.settle()
            current = current.moved("submitting", attempts=current.attempts + 1)
            # The try counts even if we crash in it. Only a power cut can lose an unsynced
            # record, and then the member is submitted again, which is what
            # resubmit_unconfirmed (the default) would do anyway; without it the record must
            # survive the power cut to stop that second submission.
            await self.spool.update(run, current, durable=not self.config.resubmit_unconfirmed,
                                    public=False)
            shown = BriefState(self.spool, current, self.config.brief_state_s)

        async def persist(state: Sidecar) -> None:
            if shown is not None:
                await shown.settle()
            await self.durable_writes.record(run, state)

        async def store(operation: str) -> None:
            nonlocal current
            current = current.moved("generating", operation=operation, submitted_at=now())
            # Durable before anything else happens: a restart polls it, never resubmits.
            await asyncio.shield(persist(current))

        try:
            await self.generation.create(request, tries=remaining, before_try=before_try,
                                         on_created=store, guard=self._critical)
        except Exception:
            if shown is not None:  # the failed state is written next: after this one
                await shown.settle()
            raise
        finally:
            if shown is not None:
                shown.cancel()
        assert current.operation is not None
        logger.info("job.submitted", operation=current.operation, attempts=current.attempts)
        return current

    async def _await_done(self, member: Sidecar) -> list[str]:
        assert member.operation is not None
        return await self.generation.wait(member.operation,
                                          age_s=_age_s(member.submitted_at),
                                          kind=kind_of(member.model, member.parameters))

    async def _download(self, run: JobRun, member: Sidecar, uris: list[str],
                        shown: BriefState) -> list[VideoFile]:
        outbox = self.spool.outbox
        partial_dir = outbox / PARTIAL_DIR
        videos: list[VideoFile] = []
        last = time.monotonic()

        def progress(done: int, total: int | None) -> None:
            """Show bytes in the sidecar about once a second, never two writes at a time."""
            nonlocal last
            if time.monotonic() - last < PROGRESS_EVERY_S or shown.busy:
                return
            last = time.monotonic()
            shown.show_now(member.moved("downloading", bytes_done=done, bytes_total=total))

        staged: list[Staged] = []
        for i, uri in enumerate(uris, start=1):
            name = f"{member.output}.mp4" if len(uris) == 1 else f"{member.output}-{i}.mp4"
            partial = partial_dir / f"{member.output}.{run.job_id}.{i}.mp4.part"
            with self._critical():
                videos.append(await self.generation.download(
                    uri, partial, outbox / name, progress=progress, make_partial_dir=True,
                    publish=False))
            staged.append(Staged(partial, outbox / name))
        with self._critical():  # with the videos of downloads that end together
            await self.durable_writes.publish(staged)
        return videos  # (the caller's shown.settle(): no progress lands after the final state)
