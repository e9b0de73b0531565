"""The spool: claimed jobs on disk, so that a claim is atomic and survives a crash.

Layout (``INBOX/.reeldrop`` unless ``state_dir`` says otherwise; it must share the inbox's
filesystem so that a claim is one ``rename()``)::

    jobs/<job_id>.NAME                  the original bytes (NAME.json|NAME.prompt), moved
                                        here by the claim
    jobs/<job_id>.member-0001.jsonl     each member's durable state: one line (the sidecar
                                        schema) per change, the last complete line current
    done/<job_id>.*                     finished jobs' files, kept
    failed/<job_id>.*                   jobs with a failed member, kept for inspection/retry

The spool is flat: a job is the files that share its id, not a directory. On ext4 a
directory per job cost more than the rest of a claim together (the directory allocator
places a new inode and block), and a claim is on every job's path. A file's area is its
state, like Postfix's queues. A finished job's file moves first and that move is made
durable (it is the commit: a job file in ``jobs/`` means every record of it is there too);
its records follow, and recovery finishes a move that a crash cut short. Spools of the older
layout (a directory per job) are flattened at start-up, so jobs in flight survive an upgrade.

A member's record is appended to, not replaced: a replace costs a new file and frees the old
one at every change, and an append needs one fsync where a replace needs two. A crash can
only cut the last line short, and recovery cuts that torn tail off before anything appends.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import blocking, log, sidecar
from .errors import ConfigError, OutputError
from .files import PARTIAL_DIR, fsync_dir, syncfs, write_all
from .sidecar import Sidecar
from .spool_files import (
    flatten_legacy,
    job_file,
    read_members,
    record_name,
    remove_stale_partials,
    remove_temp_files,
    stored_jobs,
)

# S311: job ids need uniqueness, not secrecy; the seed comes from the OS (again in a forked
# child, which would otherwise repeat its parent's ids).
_ids = random.Random(secrets.randbits(64))  # noqa: S311
os.register_at_fork(after_in_child=lambda: _ids.seed(secrets.randbits(64)))


def new_job_id() -> str:
    """Sortable by claim time, unique across daemons sharing the inbox (64 random bits a
    second, from a generator seeded by the OS: no syscall per id); never holds a dot.

    Not 32 bits, as before: a backlog claims thousands a second, and 20,000 ids drawn within
    one second repeat one with a chance of about 5% (two jobs would share their records)."""
    return f"{sidecar.utc_second(int(time.time()), '%Y%m%dT%H%M%SZ')}-{_ids.getrandbits(64):016x}"


@dataclass
class JobRun:
    """A claimed job in memory: where its files are and the latest state of each member."""

    job_id: str
    area: Path  # jobs/ while it runs, then done/ or failed/
    source: str
    members: list[Sidecar] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)  # batch file and archiving
    archived: bool = False
    linked: set[int] = field(default_factory=set)  # members whose record's name is durable

    def path(self, name: str) -> str:
        """One of the job's files: ``AREA/<job_id>.NAME``."""
        return job_file(self.area, self.job_id, name)

    @property
    def is_batch(self) -> bool:
        """A job file holding a list of jobs (its members carry the file's stem as ``batch``)."""
        return bool(self.members) and self.members[0].batch is not None

    @property
    def all_done(self) -> bool:
        return all(m.done for m in self.members)


class Spool:
    def __init__(self, root: Path, inbox: Path, outbox: Path, file_mode: int, dir_mode: int):
        self.root, self.inbox, self.outbox = root, inbox, outbox
        self.file_mode, self.dir_mode = file_mode, dir_mode
        self.jobs, self.done, self.failed = root / "jobs", root / "done", root / "failed"

    def prepare(self) -> None:
        """Create the directories and check that claims can be atomic renames."""
        for d in (self.inbox, self.outbox, self.root, self.jobs, self.done, self.failed):
            try:
                d.mkdir(mode=self.dir_mode, parents=True, exist_ok=True)
            except OSError as e:
                raise ConfigError(f"Cannot create {d}: {e.strerror}.") from None
        if self.root.stat().st_dev != self.inbox.stat().st_dev:
            raise ConfigError(
                f"The state directory {self.root} is not on the inbox's filesystem; "
                "claims must be atomic renames. Put it inside or beside the inbox."
            )

    def claim(self, path: Path, *, durable: bool = True) -> JobRun | None:
        """Move one inbox file into ``jobs/`` under a new job id; None if someone else took
        it first.

        Without ``durable`` the directory fsyncs are left to the caller's ``sync()``, which
        must come before anything of the job is sent.
        """
        job_id = new_job_id()
        try:
            os.rename(path, job_file(self.jobs, job_id, path.name))
        except FileNotFoundError:
            return None
        if durable:
            fsync_dir(self.jobs)
            fsync_dir(self.inbox)
        return JobRun(job_id=job_id, area=self.jobs, source=path.name)

    def sync(self) -> None:
        """Make every write so far on the spool's filesystem durable (after a batch intake)."""
        syncfs(self.root)

    def save(self, run: JobRun, member: Sidecar, *, exclusive: bool = False,
             durable: bool = True, public: bool = True) -> None:
        """Persist a member: spool record first (the truth), then (if ``public``) the public
        sidecar.

        An outbox deleted under us is created again; other write errors become OutputError
        (FileExistsError from an ``exclusive`` write passes through: the name is taken).
        """
        try:
            self.append(run, member, durable)
        except OSError as e:
            raise record_error(run, e) from None
        if public:
            self.publish(member, exclusive=exclusive)

    def append(self, run: JobRun, member: Sidecar, durable: bool) -> None:
        """Add one line to the member's record; a failed write leaves no partial line.
        Without ``durable`` the caller flushes the filesystem, and then adds the member to
        ``run.linked``."""
        path = run.path(record_name(member.index))
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                     self.file_mode)
        try:
            start = os.lseek(fd, 0, os.SEEK_END)
            try:
                write_all(fd, sidecar.encode(member))
                if durable:
                    os.fdatasync(fd)
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, start)
                raise
        finally:
            os.close(fd)
        if durable and member.index not in run.linked:
            fsync_dir(run.area)  # the file's name, once
            run.linked.add(member.index)

    def publish(self, member: Sidecar, *, exclusive: bool = False,
                durable: bool | None = None) -> None:
        """Write the public sidecar alone (see ``save``; ``durable`` as in
        ``sidecar.publish``)."""
        try:
            sidecar.publish(self.outbox, member, self.file_mode, exclusive=exclusive,
                            durable=durable)
        except FileExistsError:
            raise
        except FileNotFoundError:
            log.get().warning("outbox.recreated", outbox=str(self.outbox))
            self.outbox.mkdir(mode=self.dir_mode, parents=True, exist_ok=True)
            sidecar.publish(self.outbox, member, self.file_mode, exclusive=exclusive,
                            durable=durable)
        except OSError as e:
            raise OutputError(f"Cannot write the sidecar {member.output}.json into "
                              f"{self.outbox}: {e.strerror}.") from None

    def record(self, run: JobRun, member: Sidecar, *, durable: bool = True,
               public: bool = True) -> None:
        """Persist a member's intermediate state (blocking)."""
        run.members[member.index - 1] = member
        self.save(run, member, durable=durable, public=public)

    def settle(self, run: JobRun, member: Sidecar) -> Path | None:
        """Persist a member's final state; archive the job if it was the last (blocking).

        Under the job's lock, so the job is archived only after every final record landed
        (another member's in-memory state may run ahead of its file).
        """
        with run.lock:
            self.record(run, member)
            self.write_batch(run)
            return self._archive_locked(run)

    async def update(self, run: JobRun, member: Sidecar, *, durable: bool = True,
                     public: bool = True) -> None:
        """Record a member's new state in memory and on disk (off the event loop); without
        ``public`` the sidecar is left to the caller."""
        await blocking.run(functools.partial(self.record, run, member, durable=durable,
                                             public=public))

    def write_batch(self, run: JobRun, durable: bool | None = None) -> None:
        """``outbox/STEM.batch.json`` for an array job, from the members' current states."""
        if run.is_batch:
            stem = run.members[0].batch
            assert stem is not None
            sidecar.write_batch(self.outbox, stem, list(run.members), self.file_mode,
                                durable=durable)

    def republish(self, run: JobRun) -> None:
        """Recovery: make the public sidecars match the spool's records again.

        A crash between the two writes of ``save()`` leaves the record (the truth) ahead of
        the sidecar; consumers must not be left watching a stale state.
        """
        for member in run.members:
            sidecar.publish(self.outbox, member, self.file_mode)
        if any(m.done for m in run.members):
            self.write_batch(run)

    def archive_if_done(self, run: JobRun) -> Path | None:
        """Move a job whose members are all terminal to done/ or failed/ (once; blocking)."""
        with run.lock:
            return self._archive_locked(run)

    def _archive_locked(self, run: JobRun) -> Path | None:
        if run.archived or not run.all_done:
            return None
        # The job file first, made durable: from then on a restart knows the job is finished
        # and only moves the records that did not follow (see ``recover``). The records'
        # moves are not fsynced: their final states are durable wherever they are.
        target = self.move_job_file(run)
        fsync_dir(self.jobs)
        return self.follow_records(run, target)

    def move_job_file(self, run: JobRun) -> Path:
        """Move a finished job's file from jobs/ to done/ or failed/; the caller makes the
        move durable before the records follow (``follow_records``)."""
        failed = any(m.state == "failed" for m in run.members) or not run.members
        target = Path(job_file(self.failed if failed else self.done, run.job_id, run.source))
        os.rename(run.path(run.source), target)
        return target

    def follow_records(self, run: JobRun, target: Path) -> Path:
        """The records follow a job file moved out of jobs/ (durably) to ``target``."""
        area = target.parent
        self._move_records(run.job_id, [record_name(m.index) for m in run.members], area)
        run.area, run.archived = area, True
        return target

    def _move_records(self, job_id: str, records: list[str], area: Path) -> None:
        for name in records:
            with contextlib.suppress(FileNotFoundError):  # a member that never recorded
                os.rename(job_file(self.jobs, job_id, name), job_file(area, job_id, name))

    def recover(self) -> list[JobRun]:
        """The jobs a previous run left claimed, after removing what a crash leaves behind
        (temp files, and partial downloads of jobs no longer claimed)."""
        for area in (self.jobs, self.failed):
            flatten_legacy(area, self.file_mode)
        remove_temp_files(self.jobs)
        runs: list[JobRun] = []
        for job_id, stored in sorted(stored_jobs(self.jobs).items()):
            members = read_members(self.jobs, job_id, stored.records, repair=True)
            if stored.source is not None:
                runs.append(JobRun(job_id=job_id, area=self.jobs, source=stored.source,
                                   members=members))
                continue
            # Records without their job file: an archive cut short (the file went first), or
            # state whose file someone removed. Either way the records join the file's area.
            finished = bool(members) and all(m.done for m in members)
            failed = not finished or any(m.state == "failed" for m in members)
            if finished:
                log.get().info("spool.archive_finished", job_id=job_id)
            else:
                log.get().warning("spool.orphan_state", job_id=job_id)
            self._move_records(job_id, stored.records, self.failed if failed else self.done)
        remove_temp_files(self.outbox)
        remove_stale_partials(self.outbox / PARTIAL_DIR, {run.job_id for run in runs})
        return runs


def record_error(run: JobRun, error: OSError) -> OutputError:
    """A failed record write, as the member's error (``Spool.record`` and grouped writes)."""
    return OutputError(f"Cannot record the job's state in {run.area}: {error.strerror}.")

