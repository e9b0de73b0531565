"""The operator's side of the directories: submit a job, read the sidecars, retry failures.

Everything here works through the same files a producer or consumer would touch (the inbox,
the outbox's sidecars, the spool's ``failed/`` area), so it works whether or not the daemon
is running, and never needs a second implementation of the daemon's logic.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import msgspec

from . import jobs, sidecar
from .errors import InvalidJob
from .files import atomic_write
from .sidecar import BATCH_SUFFIX, Sidecar
from .spool_files import StoredJob, flatten_legacy, job_file, read_members, stored_jobs

STATES = ("queued", "submitting", "generating", "downloading", "succeeded", "failed")


def job_name(prompt: str) -> str:
    """A readable, unique job name from the prompt's first words."""
    words = re.findall(r"[A-Za-z0-9]+", prompt.lower())[:4]
    stem = "-".join(words) or "job"
    return f"{stem}-{time.strftime('%H%M%S')}-{secrets.token_hex(2)}"


def submit(inbox: Path, request: jobs.VideoRequest, name: str | None = None) -> Path:
    """Write a job into the inbox atomically (hidden temp file, then a rename); its path.

    The job is checked first (InvalidJob), so nothing invalid reaches the daemon.
    """
    stem = jobs.check_output_name(name) if name else job_name(request.prompt)
    target = inbox / f"{stem}.json"
    if target.exists():
        raise InvalidJob(f"{target.name} is already waiting in the inbox; choose another name.")
    body = msgspec.json.encode(request)  # unset options are left out (omit_defaults)
    inbox.mkdir(parents=True, exist_ok=True)
    atomic_write(target, body, 0o660, exclusive=True)
    return target


def sidecars(outbox: Path) -> list[Sidecar]:
    """Every job sidecar in the outbox, newest first."""
    found = []
    for path in outbox.glob("*.json"):
        if path.name.endswith(BATCH_SUFFIX):
            continue
        doc = sidecar.read(path)
        if doc is not None:
            found.append(doc)
    return sorted(found, key=lambda d: d.created_at, reverse=True)


def counts(docs: list[Sidecar]) -> dict[str, int]:
    tally: Counter[str] = Counter(d.state for d in docs)
    return {state: tally[state] for state in STATES}


def find_submitted(outbox: Path, source: str, since: str) -> Sidecar | None:
    """The sidecar of the job file ``source`` claimed at or after ``since`` (RFC 3339)."""
    mine = [d for d in sidecars(outbox) if d.source == source and d.created_at >= since]
    return mine[0] if mine else None


def follow(outbox: Path, source: str, since: str, timeout_s: float,
           on_state: Callable[[Sidecar], None] | None = None) -> Sidecar | None:
    """Watch a submitted job's sidecar until it ends (its last state), or None on timeout."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        doc = find_submitted(outbox, source, since)
        if doc is not None and doc.state != last:
            last = doc.state
            if on_state is not None:
                on_state(doc)
        if doc is not None and doc.done:
            return doc
        time.sleep(0.25)
    return None


def retry(spool: Path, inbox: Path, names: list[str], *, all_failed: bool,
          file_mode: int = 0o640) -> list[str]:
    """Put the kept files of failed jobs back into the inbox, and drop their records; the
    names moved.

    A job matches by its file name, its file's stem, or any member's output name.
    """
    moved: list[str] = []
    failed_area = spool / "failed"
    wanted = set(names)
    stored: dict[str, StoredJob] = {}
    if failed_area.is_dir():
        flatten_legacy(failed_area, file_mode)  # jobs an older version failed
        stored = stored_jobs(failed_area)
    for job_id, job in sorted(stored.items()):
        if job.source is None:
            continue
        source = job_file(failed_area, job_id, job.source)
        outputs = {m.output for m in read_members(failed_area, job_id, job.records)}
        keys = {job.source, Path(job.source).stem, *outputs}
        if not all_failed and not keys & wanted:
            continue
        target = inbox / job.source
        try:
            os.link(source, target)  # never clobbers a file waiting in the inbox
        except FileExistsError:
            continue
        os.unlink(source)
        for record in job.records:  # that try is over; the next run keeps records of its own
            with contextlib.suppress(FileNotFoundError):
                os.unlink(job_file(failed_area, job_id, record))
        moved.append(job.source)
        wanted -= keys
    if wanted and not all_failed:
        raise InvalidJob(f"No failed job named {', '.join(sorted(wanted))} in {failed_area}.")
    return moved


__all__ = ["counts", "find_submitted", "follow", "retry", "sidecars", "submit"]
