"""The sidecar: the public status file ``outbox/NAME.json`` beside each video.

One schema serves twice: it is the document other programs watch, and (as the lines of
``member-NNNN.jsonl`` in the spool) the daemon's own durable record of the member, so recovery
reads exactly what consumers read. Every field is documented in the README; treat it as a
public interface.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from typing import Any, Literal

import msgspec

from .errors import ErrorInfo
from .files import atomic_write

State = Literal["queued", "submitting", "generating", "downloading", "succeeded", "failed"]
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed"})
BATCH_SUFFIX = ".batch.json"


class VideoFile(msgspec.Struct, frozen=True, kw_only=True):
    """One published video, as listed in the sidecar."""

    file: str
    bytes: int
    sha256: str


def now() -> str:
    """RFC 3339 UTC timestamp with milliseconds (cut, not rounded, as ``isoformat`` does).

    Every state change stamps one, and a claim two: built from the second's text, kept,
    this costs 1.7 µs against 4 µs for an aware ``datetime``'s ``isoformat`` (about 5% of
    a claim's CPU in the backlog benchmark)."""
    t = time.time()
    second = int(t)
    return f"{utc_second(second, '%Y-%m-%dT%H:%M:%S')}.{int((t - second) * 1000):03d}Z"


@functools.lru_cache(maxsize=4)
def utc_second(second: int, layout: str) -> str:
    """A Unix second as UTC text in ``layout`` (``time.strftime``); the last few are kept,
    since a busy daemon stamps many things within one."""
    return time.strftime(layout, time.gmtime(second))


class Sidecar(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Status of one video job. Replaced atomically at every state change."""

    job_id: str
    output: str
    source: str
    batch: str | None = None
    index: int = 1
    state: State = "queued"
    prompt: str
    model: str
    parameters: dict[str, Any] = {}
    operation: str | None = None
    attempts: int = 0
    created_at: str
    submitted_at: str | None = None
    updated_at: str
    finished_at: str | None = None
    videos: list[VideoFile] = []
    error: ErrorInfo | None = None
    metadata: dict[str, Any] | None = None
    bytes_done: int | None = None  # while downloading, about once a second
    bytes_total: int | None = None

    @property
    def done(self) -> bool:
        return self.state in TERMINAL

    def moved(self, state: State, **changes: Any) -> Sidecar:
        """A copy in ``state``, stamped; terminal states also get ``finished_at``."""
        stamp = now()
        if state in TERMINAL:
            changes.setdefault("finished_at", stamp)
        return msgspec.structs.replace(self, state=state, updated_at=stamp, **changes)


class BatchSummary(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``outbox/STEM.batch.json`` for a job file that holds a list of jobs."""

    job_id: str
    source: str
    total: int
    succeeded: int
    failed: int
    members: list[str]
    updated_at: str


_encoder = msgspec.json.Encoder()
decode_sidecar = msgspec.json.Decoder(Sidecar).decode


def encode(doc: msgspec.Struct) -> bytes:
    return _encoder.encode(doc) + b"\n"


def path_for(outbox: Path, output: str) -> str:
    return f"{outbox}/{output}.json"  # as spool_files.job_file: every state change builds one


def _read_bytes(path: str | Path, max_bytes: int) -> bytes | None:
    """The file's first ``max_bytes``, or None if it is missing, a link, or not ours to read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as f:
            return f.read(max_bytes)
    except OSError:
        return None


def read(path: str | Path, max_bytes: int = 1 << 20) -> Sidecar | None:
    """The sidecar at ``path``, or None if it is missing, a link, or not a sidecar."""
    data = _read_bytes(path, max_bytes)
    try:
        return None if data is None else decode_sidecar(data)
    except msgspec.DecodeError:
        return None


def read_last(path: Path, max_bytes: int = 1 << 22) -> Sidecar | None:
    """The last complete, valid document of a record of one JSON document per line."""
    for line in reversed((_read_bytes(path, max_bytes) or b"").splitlines()):
        try:
            return decode_sidecar(line)
        except msgspec.DecodeError:
            continue
    return None


def publish(outbox: Path, sidecar: Sidecar, mode: int, *, exclusive: bool = False,
            durable: bool | None = None) -> None:
    """Write the public sidecar (``exclusive``: only if the name is still free).

    Always atomic. Intermediate states are not fsynced: the spool's record is the durable
    copy, and start-up rewrites every live job's sidecar from it (``Spool.republish``). The
    final state is fsynced, since a finished job is no longer in the spool's live area
    (``durable=False``: the caller flushes the filesystem instead).
    """
    atomic_write(path_for(outbox, sidecar.output), encode(sidecar), mode, exclusive=exclusive,
                 durable=sidecar.done if durable is None else durable)


def write_batch(outbox: Path, stem: str, members: list[Sidecar], mode: int, *,
                durable: bool | None = None) -> None:
    summary = BatchSummary(
        job_id=members[0].job_id,
        source=members[0].source,
        total=len(members),
        succeeded=sum(m.state == "succeeded" for m in members),
        failed=sum(m.state == "failed" for m in members),
        members=[m.output for m in members],
        updated_at=now(),
    )
    complete = summary.succeeded + summary.failed == summary.total
    atomic_write(outbox / f"{stem}{BATCH_SUFFIX}", encode(summary), mode,
                 durable=complete if durable is None else durable)
