"""The spool's files: how a job's files are named, found and read back, what a crash leaves
behind (temp files, stale partial downloads), and the upgrade from the older layout with a
directory per job.

Shared by the spool's recovery and by the commands that read the spool without running it
(``reeldrop demo``, ``reeldrop retry``). A job's files in an area (``jobs/``, ``done/``,
``failed/``) are ``<job_id>.NAME`` for the job file and ``<job_id>.member-NNNN.jsonl`` for
each member's record; a job id never holds a dot, so the first dot ends it.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import log, sidecar
from .files import atomic_write, fsync_dir
from .sidecar import Sidecar

MEMBER_PREFIX = "member-"
RECORD_SUFFIX = ".jsonl"
# 64 random bits; 32 in the ids of earlier versions, which a spool may still hold.
_JOB_ID = re.compile(r"\d{8}T\d{6}Z-(?:[0-9a-f]{16}|[0-9a-f]{8})")
_RECORD_NAME = re.compile(rf"{MEMBER_PREFIX}\d{{4}}\{RECORD_SUFFIX}")
# The older layout's records inside a job directory: ``.jsonl`` logs, and before them
# one-document ``.json`` files (read so that jobs in flight survive an upgrade).
_LEGACY_RECORD = re.compile(rf"{MEMBER_PREFIX}(\d{{4}})\.jsonl?")
STALE_PARTIAL_S = 3600.0  # a partial download of a job not claimed here, unwritten this long


def is_record(name: str) -> bool:
    """A member record's name (after the job id). A job file is never one: it ends in
    ``.prompt`` or ``.json``."""
    return _RECORD_NAME.fullmatch(name) is not None


def record_name(index: int) -> str:
    return f"{MEMBER_PREFIX}{index:04d}{RECORD_SUFFIX}"


def job_file(area: Path, job_id: str, name: str) -> str:
    """One of a job's files in an area: ``AREA/<job_id>.NAME`` (a string: claims and state
    writes build one per call; formatted, not ``os.path.join``: a tenth of its time)."""
    return f"{area}/{job_id}.{name}"


@dataclass
class StoredJob:
    """A job's files in one area, by name after the job id."""

    source: str | None = None
    records: list[str] = field(default_factory=list)


def stored_jobs(area: Path) -> dict[str, StoredJob]:
    """The jobs whose files are in ``area``, by job id (one listing of the directory).

    Names that do not start with a job id (temp files, anything put there by hand) and
    directories (the older layout, see ``flatten_legacy``) are not jobs' files.
    """
    found: dict[str, StoredJob] = {}
    with os.scandir(area) as entries:
        for entry in entries:
            job_id, dot, rest = entry.name.partition(".")
            if not dot or not rest or not _JOB_ID.fullmatch(job_id) or entry.is_dir(
                    follow_symlinks=False):
                continue
            job = found.setdefault(job_id, StoredJob())
            if is_record(rest):
                job.records.append(rest)
            elif job.source is None or rest < job.source:
                job.source = rest
    return found


def read_members(area: Path, job_id: str, records: list[str], *,
                 repair: bool = False) -> list[Sidecar]:
    """The current state of each recorded member of a job, in member order.

    With ``repair`` (recovery, before anything appends), a record whose last line a crash cut
    short is truncated back to its last complete line.
    """
    members = []
    for name in sorted(records):
        path = Path(job_file(area, job_id, name))
        if repair:
            _cut_torn_tail(path)
        member = sidecar.read_last(path)
        if member is not None:
            members.append(member)
    return members


def flatten_legacy(area: Path, file_mode: int) -> None:
    """Move jobs of the older layout (``AREA/<job_id>/``) into the flat one, crash-safely.

    Records first (each written anew as a one-line ``.jsonl``, durably), then the job file
    (in ``jobs/`` that move is the commit), then the directory goes. A crash in between is
    finished by the next start: writing the records again gives the same files.
    """
    with os.scandir(area) as entries:  # only job directories: anything else is left alone
        directories = sorted(Path(e.path) for e in entries
                             if _JOB_ID.fullmatch(e.name) and e.is_dir(follow_symlinks=False))
    for directory in directories:
        job_id = directory.name
        names = sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))
        records = {m[1]: n for n in names if (m := _LEGACY_RECORD.fullmatch(n))}  # .jsonl wins
        for index, name in records.items():
            member = sidecar.read_last(directory / name)
            if member is not None:
                atomic_write(job_file(area, job_id, record_name(int(index))),
                             sidecar.encode(member), file_mode)
        for name in names:
            if not _LEGACY_RECORD.fullmatch(name):  # the job file (there is only ever one)
                os.rename(directory / name, job_file(area, job_id, name))
                fsync_dir(area)
        for name in os.listdir(directory):
            (directory / name).unlink()
        directory.rmdir()
        log.get().info("spool.flattened", job_id=job_id, area=area.name)


def _cut_torn_tail(path: Path) -> None:
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            log.get().warning("spool.torn_record_cut", record=str(path))
            f.truncate(data.rfind(b"\n") + 1)
            os.fsync(f.fileno())


def remove_temp_files(directory: Path) -> None:
    """Remove ``.NAME.PID.TOKEN.tmp`` files of dead processes: atomic writes a crash cut short.

    A live process's temp file (another daemon sharing the outbox) is left alone.
    """
    with contextlib.suppress(OSError):
        for p in directory.iterdir():
            parts = p.name.rsplit(".", 3)
            if not (p.name.startswith(".") and len(parts) == 4 and parts[3] == "tmp"):
                continue
            if parts[1].isdigit() and _alive(int(parts[1])):
                continue
            p.unlink(missing_ok=True)


def remove_stale_partials(partial_dir: Path, live_ids: set[str]) -> None:
    """Remove partial downloads (``NAME.JOB_ID.N.mp4.part``) of jobs no longer claimed here
    that nobody has written for ``STALE_PARTIAL_S``: they ended elsewhere (finished, failed,
    or their files were removed). The age spares the downloads of another daemon that shares
    the outbox with a spool of its own: its jobs are not ours, and this sweep used to cut
    its downloads off (their rename failed)."""
    old = time.time() - STALE_PARTIAL_S
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for p in partial_dir.iterdir():
            parts = p.name.split(".")
            if len(parts) >= 5 and parts[-4] in live_ids:
                continue
            with contextlib.suppress(FileNotFoundError):  # gone meanwhile: fine
                if os.stat(p, follow_symlinks=False).st_mtime < old:
                    p.unlink()


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours from a previous life: this process has written nothing yet
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
