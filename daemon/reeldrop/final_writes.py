"""Final writes in groups: members that finish together share their flushes (group commit).

A member's final write is three durable steps, in order: its record (the truth), its public
sidecar, and for a job's last member the job file's move out of ``jobs/`` (``Spool.settle``).
Alone, that is four fsyncs, and on ext4 without a journal each one also flushes the device:
on a fresh ext4 a final write cost 0.7-0.8 ms of its thread's CPU and 1.5-2 ms of the
machine's (the loop device flushing its image), more than any other step of a job.

So final writes queue here, and one thread hop at a time takes every write queued by then
(``write_group``): each step for every member, then one flush of the filesystem for all. A
group costs three flushes however large it is. Nothing waits for a group to fill: a write
asked for while none is under way starts at once, and groups form only where writes come
faster than they land, as when a round of jobs finishes together. Below ``GROUP_SYNC_FROM``
members a group is written member by member (``Spool.settle``): there, flushing the whole
filesystem saves too little.
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

# Measured on a fresh ext4, CPU per member: 0.7-0.8 ms written alone, about the same in
# groups of 2, 0.4 ms in groups of 4, 0.3 ms from 8 on.
GROUP_SYNC_FROM = 4

Settled = Path | OutputError | None  # where the job was archived, or why nothing was stored
Final = tuple[JobRun, Sidecar]
Settling = asyncio.Future[Settled]


class FinalWrites:
    """The queue of final writes; one group is written at a time, off the event loop."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self._queued: list[tuple[JobRun, Sidecar, Settling]] = []
        self._writing = False

    def write(self, run: JobRun, member: Sidecar) -> Settling:
        """Queue a member's final write; a future of its outcome (see ``write_group``).

        It fails only for a bug. Once queued, the write lands even if whoever waits for it
        is cancelled (as long as the loop runs: shutdown waits for it).
        """
        future: Settling = asyncio.get_running_loop().create_future()
        self._queued.append((run, member, future))
        if not self._writing:
            self._start()
        return future

    def _start(self) -> None:
        group, self._queued = self._queued, []
        self._writing = True
        finals = [(run, member) for run, member, _ in group]
        # In an empty context: the group's own log lines belong to no single job.
        hop = contextvars.Context().run(blocking.run, write_group, self.spool, finals)
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


def write_group(spool: Spool, finals: list[Final]) -> list[Settled]:
    """Persist members' final states together (blocking): each step for every member, then
    one flush of the filesystem that holds it.

    ``Spool.settle``'s order holds for each member: its record is durable before its sidecar
    is replaced, and its sidecar before its job file leaves ``jobs/``. Returns, per member,
    where its job was archived (None: not by this member), or the OutputError that kept its
    final state from being stored (its job stays claimed; a restart takes it up again).
    """
    if len(finals) < GROUP_SYNC_FROM:
        return [_settle_one(spool, run, member) for run, member in finals]
    outcomes: list[Settled] = [None] * len(finals)
    runs = {run.job_id: run for run, _ in finals}
    with contextlib.ExitStack() as locked:
        for job_id in sorted(runs):  # the same order in every group: no deadlock
            locked.enter_context(runs[job_id].lock)
        try:
            _steps(spool, finals, outcomes)
        except OSError as e:  # a flush failed: nothing the group wrote can be trusted
            error = OutputError(f"Cannot make the jobs' final states durable: {e.strerror}.")
            outcomes = [o if isinstance(o, OutputError) else error for o in outcomes]
    return outcomes


def _settle_one(spool: Spool, run: JobRun, member: Sidecar) -> Settled:
    try:
        return spool.settle(run, member)
    except OutputError as e:
        return e


def _steps(spool: Spool, finals: list[Final], outcomes: list[Settled]) -> None:
    broken: set[str] = set()  # jobs with a member whose final state was not stored
    last = {run.job_id: i for i, (run, _) in enumerate(finals)}  # a job's files: once

    def failed(i: int, error: OutputError) -> None:
        outcomes[i] = error
        broken.add(finals[i][0].job_id)

    for i, (run, member) in enumerate(finals):  # 1. the records
        run.members[member.index - 1] = member
        try:
            spool.append(run, member, durable=False)
        except OSError as e:
            failed(i, record_error(run, e))
    syncfs(spool.root)
    for i, (run, member) in enumerate(finals):  # 2. the sidecars, and batch files
        if outcomes[i] is None:
            run.linked.add(member.index)  # the flush made the record's name durable too
            try:
                spool.publish(member, durable=False)
            except OutputError as e:
                failed(i, e)
    for job_id, i in last.items():
        if job_id not in broken:
            try:
                spool.write_batch(finals[i][0], durable=False)
            except OSError as e:
                failed(i, OutputError(f"Cannot write the batch file into {spool.outbox}: "
                                      f"{e.strerror}."))
    syncfs(spool.outbox)
    moved: list[tuple[int, JobRun, Path]] = []
    for job_id, i in last.items():  # 3. finished jobs' files leave jobs/
        run = finals[i][0]
        if job_id not in broken and not run.archived and run.all_done:
            try:
                moved.append((i, run, spool.move_job_file(run)))
            except OSError as e:
                failed(i, OutputError(f"Cannot archive the job {job_id}: {e.strerror}."))
    syncfs(spool.root)
    for i, run, target in moved:  # 4. their records follow (see ``Spool.follow_records``)
        outcomes[i] = spool.follow_records(run, target)
