"""Intake: from a claimed job file to queued members with reserved output names.

A bad file never stops anything: it becomes one ``failed`` sidecar with a sentence saying what
to fix, and its bytes stay in ``failed/<job_id>.NAME``. Output names are reserved so that no job
silently overwrites another's video: a name whose video or live sidecar exists gets a suffix
(``NAME.2``, ``NAME.3``, …); a name whose last job failed with no video is reused.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import msgspec

from . import jobs, log, sidecar
from .config import Config
from .errors import InvalidJob, OutputError
from .sidecar import Sidecar, now
from .spool import JobRun, Spool

MAX_SUFFIX = 1000
BATCH_SYNC_FROM = 16  # from this many files on, one syncfs replaces the per-file fsyncs
LISTED_ENTRIES_PER_FILE = 50  # list the outbox for a batch while it has at most this many a file
LISTING_FRESH_S = 1.0  # a listing of the outbox serves the batches of the next second


def check_job_file(path: Path, config: Config) -> list[jobs.Member]:
    """The jobs a file would give the daemon (``reeldrop validate``), or InvalidJob."""
    if path.is_dir() or not jobs.is_job_name(path.name):
        raise InvalidJob(f"{path.name} is not a job file (NAME.prompt or NAME.json).")
    return jobs.parse(path.name, read_job_file(path, config.max_job_bytes), config)


def read_job_file(path: str | Path, max_bytes: int, name: str | None = None) -> bytes:
    """The file's bytes, refusing links, non-regular files and files over ``max_bytes``.

    ``name`` is what the messages call the file (by default, its name on disk).
    """
    name = name or os.path.basename(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise InvalidJob(f"{name} is a symbolic link; reeldrop does not follow links, "
                             "so drop the file itself.") from None
        raise InvalidJob(f"{name} cannot be read: {e.strerror}.") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidJob(f"{name} is not a regular file.")
        if st.st_size > max_bytes:
            raise InvalidJob(f"{name} is {st.st_size} bytes; job files may be at most "
                             f"{max_bytes} bytes (max_job_bytes).")
        chunks, size = [], 0
        while True:  # reads sized to the file: no megabyte buffer for a small prompt
            want = max(1, min(max_bytes + 1, st.st_size + 1) - size)
            chunk = os.read(fd, want)
            chunks.append(chunk)
            size += len(chunk)
            if len(chunk) < want or size > max_bytes:
                break  # a short read of a regular file is its end
        data = b"".join(chunks)
        if len(data) > max_bytes:
            raise InvalidJob(f"{name} grew past {max_bytes} bytes (max_job_bytes).")
        return data
    finally:
        os.close(fd)


class Taken(NamedTuple):
    """A batch of claims: the runs, whether the claims are durable yet, and how many of the
    members are invalid (finished already, as failed)."""

    runs: list[JobRun]
    durable: bool
    invalid: int


def report_archived(run: JobRun, archived: Path | None) -> None:
    if archived is not None:
        log.get().info("job.archived", job_id=run.job_id, to=archived.parent.name)


class Intake:
    def __init__(self, config: Config, spool: Spool) -> None:
        self.config = config
        self.spool = spool
        self.reserved: set[str] = set()  # output names of members in flight
        self._listed: set[str] | None = None  # the outbox's names (see ``outbox_listed``)
        self._listing: set[str] | None = None  # the last listing, and the names added since
        self._listed_at = float("-inf")  # when it was taken (monotonic)
        self._outbox_entries = 0  # as last listed

    def release(self, member: Sidecar) -> None:
        self.reserved.discard(member.output)

    def take(self, paths: list[Path]) -> Taken:
        """Claim and accept a batch of files (blocking: the intake's own thread).

        A big batch skips the per-file fsyncs (``Taken.durable`` is False): the caller makes
        it durable with one filesystem sync before any of its jobs is queued. An invalid file
        is finished already, and archived here."""
        durable = len(paths) < BATCH_SYNC_FROM
        logger = log.get()
        # A big batch looks output names up in one listing of the outbox; a few files make
        # fewer lookups than listing a full outbox would cost.
        names = contextlib.nullcontext() if durable else self.outbox_listed(len(paths))
        with names:
            runs = [run for path in paths if (run := self._take_one(path, durable, logger))]
        invalid = sum(m.state == "failed" for run in runs for m in run.members)
        if runs:  # one line a batch: a backlog's 10,000 claims would flood the journal
            logger.info("intake.claimed", jobs=len(runs),
                        members=sum(len(run.members) for run in runs), invalid=invalid)
        return Taken(runs, durable, invalid)

    def _take_one(self, path: Path, durable: bool, logger: log.Logger) -> JobRun | None:
        try:
            run = self.spool.claim(path, durable=durable)
        except OSError as e:
            logger.error("intake.claim_failed", name=path.name, error=e.strerror)
            return None
        if run is None:
            return None
        try:  # job.accepted (debug), or job.invalid with the reason (error)
            self.accept(run, durable=durable, logger=logger)
        except Exception:  # e.g. the outbox is gone: keep the claim for a restart
            logger.exception("intake.accept_failed", job_id=run.job_id, source=run.source)
            return None
        if run.all_done:  # only an invalid file's job is finished already
            report_archived(run, self.spool.archive_if_done(run))
        return run

    @contextlib.contextmanager
    def outbox_listed(self, files: int) -> Iterator[None]:
        """Inside the block (a batch of ``files`` claims), output names are looked up in one
        listing of the outbox taken at its start, not with three lookups each (a 10,000-file
        backlog made 30,000).

        Only while the outbox, as last listed, is small enough for that to pay: a listed
        entry cost about a fiftieth of a file's three lookups on ext4, so an outbox of months
        of videos is not read in full for every batch. A listing then serves the batches of
        the next ``LISTING_FRESH_S`` too, with the sidecars they publish added: listed for
        every batch of 256, a 10,000-file backlog read its growing outbox 39 times (10,000
        entries took 6 ms on ext4), a cost that grew with the square of the backlog. A name
        another daemon takes meanwhile is still never clobbered: the sidecar is published
        exclusively, and a refused name moves on to the next suffix; our own names are in
        ``reserved``.
        """
        now = time.monotonic()
        if now - self._listed_at > LISTING_FRESH_S:
            self._listing, self._listed_at = None, now
            if self._outbox_entries <= LISTED_ENTRIES_PER_FILE * files:
                with contextlib.suppress(OSError):  # then look each name up (a missing
                    self._listing = set(os.listdir(self.spool.outbox))  # outbox fails there)
                    self._outbox_entries = len(self._listing)
        self._listed = self._listing
        try:
            yield
        finally:
            self._listed = None

    def accept(self, run: JobRun, *, durable: bool = True,
               logger: log.Logger | None = None) -> list[Sidecar]:
        """Parse a freshly claimed (or half-accepted) job; persist its members; return them.

        Members already recorded (a crash cut an array's accept short) are kept as they are;
        only the missing ones are added. Without ``durable``, the caller syncs the spool
        before any member is sent. ``logger``: one bound for a whole batch of claims.
        """
        known = {m.index: m for m in run.members}
        try:
            data = read_job_file(run.path(run.source), self.config.max_job_bytes, run.source)
            members = jobs.parse(run.source, data, self.config)
        except InvalidJob as e:
            if not known:
                self._reject(run, e, durable)
            return run.members  # recorded members stand, even if the config changed since
        if len(known) == len(members):
            return run.members
        stamp = now()
        batch = jobs.default_stem(run.source) if len(members) > 1 else None
        run.members = []
        for index, m in enumerate(members, start=1):
            if index in known:
                run.members.append(known[index])
                continue
            draft = Sidecar(
                job_id=run.job_id, output=m.output, source=run.source, batch=batch,
                index=index, prompt=m.prompt, model=m.model, parameters=m.parameters,
                created_at=stamp, updated_at=stamp, metadata=m.metadata,
            )
            run.members.append(self._publish_first(run, draft, durable, record=batch is not None))
        # At debug: the batch's intake.claimed line counts it, and the job's later lines
        # name its file (``source`` is bound with the job id).
        (logger or log.get()).debug("job.accepted", job_id=run.job_id, source=run.source,
                                    members=len(run.members))
        return run.members

    def adopt(self, run: JobRun) -> None:
        """Recovery: keep the names of members a previous run already published."""
        self.reserved.update(m.output for m in run.members if not m.done)

    def _reject(self, run: JobRun, error: InvalidJob, durable: bool) -> None:
        stamp = now()
        failed = Sidecar(
            job_id=run.job_id, output=jobs.default_stem(run.source), source=run.source,
            prompt="", model="", created_at=stamp, updated_at=stamp,
        ).moved("failed", error=error.info())
        run.members = [self._publish_first(run, failed, durable)]
        self.release(run.members[0])
        log.get().error("job.invalid", job_id=run.job_id, source=run.source, error=error.message)

    def _publish_first(self, run: JobRun, draft: Sidecar, durable: bool, *,
                       record: bool = True) -> Sidecar:
        """Reserve a free output name for ``draft`` and publish it there, never clobbering.

        Without ``record`` only the public sidecar is written: a single job's claimed file is
        its record until its first try (a restart accepts it again and keeps the name, since
        the sidecar carries the job id). Members of an array are recorded at once, so that a
        restart finds all of them even when only some have started.
        """
        for n in range(1, MAX_SUFFIX + 1):
            name = draft.output if n == 1 else f"{draft.output}.{n}"
            if name in self.reserved:
                continue
            owner = _name_owner(self.spool.outbox, name, run.job_id, self._listed)
            if isinstance(owner, str):
                continue
            candidate = draft if n == 1 else _renamed(draft, name)
            mine = owner is not None and owner.job_id == run.job_id
            try:
                if record:
                    self.spool.save(run, candidate, exclusive=owner is None, durable=durable)
                else:
                    self.spool.publish(candidate, exclusive=owner is None)
            except FileExistsError:
                continue  # another daemon took the name a moment ago
            except OSError as e:
                raise OutputError(f"Cannot write the sidecar {name}.json: {e.strerror}.") from None
            if self._listed is not None and f"{name}.json" not in self._listed:
                self._listed.add(f"{name}.json")  # for the batches that share the listing
                self._outbox_entries += 1
            if not mine and n > 1:
                log.get().info("job.output_renamed", job_id=run.job_id, wanted=draft.output,
                               output=name)
            self.reserved.add(name)
            return candidate
        raise OutputError(f"No free output name for {draft.output!r} after {MAX_SUFFIX} tries.")


def _renamed(draft: Sidecar, name: str) -> Sidecar:
    return msgspec.structs.replace(draft, output=name)


def _name_owner(outbox: Path, name: str, job_id: str,
                listed: set[str] | None) -> Sidecar | str | None:
    """None if the name is free; the sidecar if it may be reused; "taken" otherwise.
    ``listed``: the outbox's names, if listed already."""

    def exists(filename: str) -> bool:
        if listed is not None:
            return filename in listed
        return os.path.lexists(os.path.join(outbox, filename))

    if exists(f"{name}.mp4") or exists(f"{name}-1.mp4"):
        return "taken"
    if not exists(f"{name}.json"):
        return None
    path = sidecar.path_for(outbox, name)
    current = sidecar.read(path)
    if current is not None and current.job_id == job_id:
        return current  # ours: a previous run published it before a crash
    if current is not None and current.state == "failed" and not current.videos:
        return current  # a failed job left no video: the name is free to try again
    return "taken"
