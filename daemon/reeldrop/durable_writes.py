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
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
from pathlib import Path

from . import blocking
from .errors import OutputError
from .files import syncfs
from .sidecar import Sidecar
from .spool import JobRun, Spool, record_error

# Measured on a fresh ext4, CPU per final write: 0.7-1.2 ms alone, about the same in groups
# of 2, 0.4 ms in groups of 4, 0.23-0.35 ms from 8 on.
GROUP_SYNC_FROM = 4

Settled = Path | OutputError | None  # where the job was archived, or why nothing was stored
Settling = asyncio.Future[Settled]
Write = tuple[JobRun, Sidecar]  # a final write if the state is terminal


class DurableWrites:
    """The queue of durable state writes; one group is written at a time, off the loop."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self._queued: list[tuple[JobRun, Sidecar, Settling]] = []
        self._writing = False

    async def record(self, run: JobRun, member: Sidecar) -> None:
        """Record a member's intermediate state durably, then publish its sidecar; raises
        OutputError if it could not be stored."""
        outcome = await self._queue(run, member)
        if isinstance(outcome, OutputError):
            raise outcome

    def settle(self, run: JobRun, member: Sidecar) -> Settling:
        """Queue a member's final write; a future of its outcome (see ``write_group``).

        It fails only for a bug. Once queued, the write lands even if whoever waits for it
        is cancelled (as long as the loop runs: shutdown waits for it).
        """
        assert member.done
        return self._queue(run, member)

    def _queue(self, run: JobRun, member: Sidecar) -> Settling:
        future: Settling = asyncio.get_running_loop().create_future()
        self._queued.append((run, member, future))
        if not self._writing:
            self._start()
        return future

    def _start(self) -> None:
        group, self._queued = self._queued, []
        self._writing = True
        writes = [(run, member) for run, member, _ in group]
        # In an empty context: the group's own log lines belong to no single job.
        hop = contextvars.Context().run(blocking.run, write_group, self.spool, writes)
        hop.add_done_callback(functools.partial(self._landed, group))

    def _landed(self, group: list[tuple[JobRun, Sidecar, Settling]],
                hop: asyncio.Future[list[Settled]]) -> None:
        self._writing = False
        error = hop.exception()
        outcomes = hop.result() if error is None else [None] * len(group)
        for (_, _, future), outcome in zip(group, outcomes, strict=True):
            if not future.done():
                if error is None:
                    future.set_result(outcome)
                else:
                    future.set_exception(error)
        if self._queued:
            self._start()


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
