"""Durable state writes in groups: members whose states change together share their flushes
(group commit).

Two writes of a member's state must survive a power cut before anything follows them: the
operation's name once the create call answered (a restart polls it, never submits again), and
the final state (record, public sidecar, and for a job's last member the job file's move out
of ``jobs/``; ``Spool.settle``). Alone they cost two and four fsyncs, and on ext4 without a
journal each fsync also flushes the device: on a fresh ext4 a final write cost 0.7-1.2 ms of
its thread's CPU and 1.5-3.6 ms of the machine's (the loop device flushing its image), more
than any other step of a job (benchmarks/README.md).

So these writes queue here, and one thread hop at a time takes every write queued by then
(``write_group``): each step for every member, then one flush of the filesystem for all. A
group costs at most three flushes however large it is. Nothing waits for a group to fill: a
write asked for while none is under way starts at once, and groups form only where writes
come faster than they land, as when a round of jobs finishes together (and the next round's
create calls are answered). Below ``GROUP_SYNC_FROM`` members a group is written member by
member, as before: there, flushing the whole filesystem saves too little.

Finished downloads queue the same way on a queue of their own (``publish``): a video's bytes
must be durable before its name, and its name before the sidecar that announces it
(``writer.publish_videos``).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

from . import blocking
from .errors import OutputError
from .files import GROUP_SYNC_FROM, syncfs
from .sidecar import Sidecar
from .spool import JobRun, Spool, record_error
from .writer import Staged, publish_videos

Settled = Path | OutputError | None  # where the job was archived, or why nothing was stored
Settling = asyncio.Future[Settled]
Write = tuple[JobRun, Sidecar]  # a final write if the state is terminal


Item = TypeVar("Item")
Outcome = TypeVar("Outcome")


class _Groups(Generic[Item, Outcome]):
    """A queue whose items are written in groups by ``write`` (blocking), one group at a
    time, off the loop: each hop takes every item queued by then."""

    def __init__(self, write: Callable[[list[Item]], list[Outcome]]) -> None:
        self._write = write
        self._queued: list[tuple[Item, asyncio.Future[Outcome]]] = []
        self._writing = False

    def queue(self, item: Item) -> asyncio.Future[Outcome]:
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._queued.append((item, future))
        if not self._writing:
            self._start()
        return future

    def _start(self) -> None:
        group, self._queued = self._queued, []
        self._writing = True
        # In an empty context: the group's own log lines belong to no single job.
        hop = contextvars.Context().run(blocking.run, self._write, [i for i, _ in group])
        hop.add_done_callback(functools.partial(self._landed, group))

    def _landed(self, group: list[tuple[Item, asyncio.Future[Outcome]]],
                hop: asyncio.Future[list[Outcome]]) -> None:
        self._writing = False
        error = hop.exception()
        if error is not None:  # a bug: every waiter gets it
            for _, future in group:
                if not future.done():
                    future.set_exception(error)
        else:
            for (_, future), outcome in zip(group, hop.result(), strict=True):
                if not future.done():
                    future.set_result(outcome)
        if self._queued:
            self._start()


class DurableWrites:
    """The queues of durable writes: members' states, and finished downloads' videos."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self._states: _Groups[Write, Settled] = _Groups(self._write_states)
        self._videos: _Groups[list[Staged], OutputError | None] = _Groups(publish_videos)

    def _write_states(self, writes: list[Write]) -> list[Settled]:
        return write_group(self.spool, writes)

    async def record(self, run: JobRun, member: Sidecar) -> None:
        """Record a member's intermediate state durably, then publish its sidecar; raises
        OutputError if it could not be stored."""
        outcome = await self._states.queue((run, member))
        if isinstance(outcome, OutputError):
            raise outcome

    def settle(self, run: JobRun, member: Sidecar) -> Settling:
        """Queue a member's final write; a future of its outcome (see ``write_group``).

        It fails only for a bug. Once queued, the write lands even if whoever waits for it
        is cancelled (as long as the loop runs: shutdown waits for it).
        """
        assert member.done
        return self._states.queue((run, member))

    async def publish(self, videos: list[Staged]) -> None:
        """Give a member's staged videos their public names, durably; raises the OutputError
        that kept them from it. Once queued, this lands even if the caller is cancelled."""
        outcome = await self._videos.queue(videos)
        if outcome is not None:
            raise outcome


def write_group(spool: Spool, writes: list[Write]) -> list[Settled]:
    """Persist members' states together (blocking): each step for every member, then one
    flush of the filesystem that holds it.

    Each member's order is the one ``Spool.record`` and ``Spool.settle`` keep: its record is
    durable before its sidecar is replaced, and a final sidecar before its job file leaves
    ``jobs/``. Returns, per member, where its job was archived (None: not by this write), or
    the OutputError that kept its state from being stored (the job stays claimed; a restart
    takes it up again).
    """
    if len(writes) < GROUP_SYNC_FROM:
        return [_write_one(spool, run, member) for run, member in writes]
    group = _Group(spool, writes)
    runs = {run.job_id: run for run, _ in writes}
    with contextlib.ExitStack() as locked:
        for job_id in sorted(runs):  # the same order in every group: no deadlock
            locked.enter_context(runs[job_id].lock)
        try:
            group.store()
            if group.finals:
                group.archive()
        except OSError as e:  # a flush failed: nothing the group wrote can be trusted
            error = OutputError(f"Cannot make the jobs' states durable: {e.strerror}.")
            return [o if isinstance(o, OutputError) else error for o in group.outcomes]
    return group.outcomes


def _write_one(spool: Spool, run: JobRun, member: Sidecar) -> Settled:
    try:
        if member.done:
            return spool.settle(run, member)
        spool.record(run, member)
    except OutputError as e:
        return e
    return None


class _Group:
    """One group's steps (see ``write_group``), and each member's outcome."""

    def __init__(self, spool: Spool, writes: list[Write]) -> None:
        self.spool, self.writes = spool, writes
        self.outcomes: list[Settled] = [None] * len(writes)
        self.broken: set[str] = set()  # jobs with a member whose state was not stored
        # Per job with final writes here, the last of them: its job's files are written once.
        self.finals = {run.job_id: i for i, (run, member) in enumerate(writes) if member.done}

    def failed(self, i: int, error: OutputError) -> None:
        self.outcomes[i] = error
        self.broken.add(self.writes[i][0].job_id)

    def store(self) -> None:
        """The records, one flush; then the sidecars, and the batch files of array jobs
        (intermediate sidecars need no flush: the records are their durable copy)."""
        spool = self.spool
        for i, (run, member) in enumerate(self.writes):
            run.members[member.index - 1] = member
            try:
                spool.append(run, member, durable=False)
            except OSError as e:
                self.failed(i, record_error(run, e))
        syncfs(spool.root)
        for i, (run, member) in enumerate(self.writes):
            if self.outcomes[i] is None:
                run.linked.add(member.index)  # the flush made the record's name durable too
                try:
                    spool.publish(member, durable=False)
                except OutputError as e:
                    self.failed(i, e)
        for job_id, i in self.finals.items():
            if job_id not in self.broken:
                try:
                    spool.write_batch(self.writes[i][0], durable=False)
                except OSError as e:
                    self.failed(i, OutputError(
                        f"Cannot write the batch file into {spool.outbox}: {e.strerror}."))

    def archive(self) -> None:
        """Once the final sidecars are flushed: finished jobs' files leave jobs/, one flush,
        and their records follow (see ``Spool.follow_records``)."""
        syncfs(self.spool.outbox)
        moved: list[tuple[int, JobRun, Path]] = []
        for job_id, i in self.finals.items():
            run = self.writes[i][0]
            if job_id not in self.broken and not run.archived and run.all_done:
                try:
                    moved.append((i, run, self.spool.move_job_file(run)))
                except OSError as e:
                    self.failed(i, OutputError(f"Cannot archive the job {job_id}: "
                                               f"{e.strerror}."))
        if moved:
            syncfs(self.spool.root)
        for i, run, target in moved:
            self.outcomes[i] = self.spool.follow_records(run, target)
