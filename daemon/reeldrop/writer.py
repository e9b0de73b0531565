"""Videos to disk: verified streaming downloads (small files: ``files``).

Videos stream into a hidden partial file, are checked (length, MP4 ``ftyp`` box) and hashed on
the way, and appear under their public name only by rename, once their bytes are durable.
That last step is ``publish_videos``, a video alone (``download_video``) or, in the
daemon, every video whose download ended meanwhile, sharing one flush of the filesystem.
Nothing here follows a symlink planted by someone else.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from . import blocking
from .errors import DownloadError, OutputError
from .files import GROUP_SYNC_FROM, fsync_dir, fsync_file, syncfs, write_all
from .sidecar import VideoFile
from .veo import VeoClient

Progress = Callable[[int, int | None], None]  # (bytes received, bytes expected or None)
CHUNK_BYTES = 1 << 20  # large enough to keep syscalls rare, small enough to keep memory flat
BATCH_BYTES = 256 << 10  # chunks gather to this size before a thread hop writes them


@dataclass(frozen=True)
class Staged:
    """A whole, checked video still under its partial name (``download_video(publish=False)``)."""

    partial: Path
    final: Path


def _hash_existing(path: Path) -> tuple[hashlib._Hash, int]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return digest, size


async def download_video(
    client: VeoClient, uri: str, partial: Path, final: Path, mode: int, *,
    progress: Progress | None = None, parent_mode: int | None = None, publish: bool = True,
) -> VideoFile:
    """Stream one video to ``partial`` (resuming it with Range if present), verify, publish.

    A failed transfer leaves the partial file for the next try to resume; a file that fails
    its checks is removed. The public name appears only once the whole, checked file is there.
    A partial file that holds the whole video already (a stop between its last write and its
    rename) is checked and published as it is. With ``parent_mode``, a missing partial
    directory is created with that mode. Without ``publish`` the checked file stays at
    ``partial``, not yet flushed, for the caller's ``publish_videos`` (the daemon publishes
    the videos whose downloads end together as one group).
    """
    video = await _fetch(client, uri, partial, final, mode, progress=progress,
                         parent_mode=parent_mode)
    if publish:
        error = (await blocking.run(publish_videos, [[Staged(partial, final)]]))[0]
        if error is not None:
            raise error
    return video


async def _fetch(
    client: VeoClient, uri: str, partial: Path, final: Path, mode: int, *,
    progress: Progress | None, parent_mode: int | None,
) -> VideoFile:
    """``download_video`` up to the publishing: the whole, checked video at ``partial``."""
    offset = _size(partial)
    resp = await client.open_download(uri, offset)
    try:
        whole = resp.status == 416  # nothing past the partial file's end
        if whole and resp.headers.get("Content-Range") != f"bytes */{offset}":
            _discard(partial)  # not the video's length (or no length given): start afresh
            raise DownloadError("The partial file did not match the video's length; it was "
                                "removed and the download starts again.")
        resumed = whole or (offset > 0 and resp.status == 206 and resp.headers.get(
            "Content-Range", "").startswith(f"bytes {offset}-"))
        file = _PartialFile(partial, mode, parent_mode, resumed=resumed)
        if resumed:
            file.digest, file.stored = await blocking.run(_hash_existing, partial)
        length = resp.headers.get("Content-Length")
        if whole:
            expected: int | None = file.stored
        else:
            expected = file.stored + int(length) if length and length.isdigit() else None
        try:
            if not whole:  # (a 416's body is an error message, not video)
                async for chunk in resp.content.iter_chunked(CHUNK_BYTES):
                    await file.put(chunk)
                    if progress is not None:
                        progress(file.received, expected)
            resp.release()  # the connection goes back to the pool before the last writes
            if expected is not None and file.received != expected:
                await _keep(file, partial)
                raise DownloadError(
                    f"The download ended at {file.received} of {expected} bytes.")
            await file.finish(final)
        except (aiohttp.ClientError, TimeoutError) as e:
            broke = DownloadError(f"The download broke off after {file.received} bytes "
                                  f"({type(e).__name__}).")
            await _keep(file, partial)  # what arrived, for the next try to resume from
            raise broke from None
        except OSError as e:  # from writing the partial file
            _discard(partial)
            raise _write_error(partial, e) from None
        finally:
            file.close()
    finally:
        resp.release()
    return VideoFile(file=final.name, bytes=file.received, sha256=file.digest.hexdigest())


async def _keep(file: _PartialFile, partial: Path) -> None:
    """Write every byte received so far to the partial file, for the next try to resume
    from (a batch still in memory would otherwise be fetched again: all of a video smaller
    than a batch); a write error is the download's error instead."""
    try:
        await file.flush()
    except OSError as e:
        _discard(partial)
        raise _write_error(partial, e) from None


def _open_partial(partial: Path, flags: int, mode: int, parent_mode: int | None) -> int:
    """Open the partial file; with ``parent_mode``, make its directory first if it is gone
    (someone removed the outbox under a running daemon)."""
    try:
        return os.open(partial, flags, mode)
    except FileNotFoundError:
        if parent_mode is None:
            raise
        partial.parent.mkdir(mode=parent_mode, parents=True, exist_ok=True)
        return os.open(partial, flags, mode)


def _write_error(partial: Path, e: OSError) -> OutputError:
    full = e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
    return OutputError(f"Cannot write the video into {partial.parent}: {e.strerror}"
                       + (" (the disk is full)." if full else "."))


class _PartialFile:
    """A download's partial file, written only in worker threads.

    Chunks gather until ``BATCH_BYTES``; each batch is then hashed and written in a thread
    while the loop receives the next (both release the interpreter lock on large buffers),
    one batch at a time. The first batch's hop opens the file, and the last batch's write,
    the checks and the close are one hop (``finish``): a small video costs a single hop
    before it is published (``publish_videos``), and nothing of a download is opened,
    written, flushed or (once finished) closed on the loop (only the
    partial file's size is looked up there, before the request), so a stalled disk stalls
    that download alone. The wait for a batch is shielded: a cancelled download must not
    leave a thread writing to a closed file descriptor.
    """

    def __init__(self, path: Path, mode: int, parent_mode: int | None, *,
                 resumed: bool) -> None:
        self.path, self.mode, self.parent_mode = path, mode, parent_mode
        self.flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        self.flags |= os.O_APPEND if resumed else os.O_TRUNC
        self.digest = hashlib.sha256()
        self.stored = 0  # bytes hashed and written (a resumed file's included)
        self.fd: int | None = None
        self._batch: list[bytes] = []
        self._batched = 0
        self._pending: asyncio.Future[None] | None = None
        self._pending_bytes = 0

    @property
    def received(self) -> int:
        return self.stored + self._pending_bytes + self._batched

    async def put(self, chunk: bytes) -> None:
        """Add a chunk; once a batch is full, wait for the previous one (its write error is
        raised here) and hand this one on."""
        self._batch.append(chunk)
        self._batched += len(chunk)
        if self._batched >= BATCH_BYTES:
            await self._wait()
            self._hand_on(self._store)

    async def flush(self) -> None:
        """Write everything received so far."""
        await self._wait()
        if self._batched:
            self._hand_on(self._store)
            await self._wait()

    async def finish(self, final: Path) -> None:
        """Write the last batch, check the file and close it (``final``: the name it will
        be published under, for the error message)."""
        await self._wait()
        self._hand_on(functools.partial(self._finish, final=final))
        await self._wait()

    def _hand_on(self, store: Callable[[bytes], None]) -> None:
        """Start ``store`` on the batch in a thread (every hop is ``_pending``: ``close``
        must wait for it)."""
        data = b"".join(self._batch)  # a lone chunk is passed on as it is, not copied
        self._batch, self._batched = [], 0
        self._pending, self._pending_bytes = blocking.run(store, data), len(data)

    async def _wait(self) -> None:
        if self._pending is not None:
            await asyncio.shield(self._pending)
            self._pending, self.stored = None, self.stored + self._pending_bytes
            self._pending_bytes = 0

    def _store(self, data: bytes) -> None:
        if self.fd is None:
            self.fd = _open_partial(self.path, self.flags, self.mode, self.parent_mode)
        self.digest.update(data)
        write_all(self.fd, data)

    def _finish(self, data: bytes, final: Path) -> None:
        """The last hop (blocking): the last write, the checks and the close, off the event
        loop; the flush is the publishing's (``publish_videos``). A failed write of the last
        batch raises OSError, as any batch's does (``download_video`` reports it)."""
        self._store(data)
        fd = self.fd
        assert fd is not None
        try:
            if os.pread(fd, 12, 0)[4:8] != b"ftyp":
                _discard(self.path)
                raise DownloadError(
                    "The downloaded file is not an MP4 video (no ftyp box at its start).")
            os.fchmod(fd, self.mode)
        except OSError as e:
            raise OutputError(f"Cannot publish {final.name}: {e.strerror}.") from None
        # Closed here too: on the loop, a syscall waits for the interpreter lock on its way
        # back. Every byte is written, so an error closing is moot (publishing flushes them).
        self.fd = None
        with contextlib.suppress(OSError):
            os.close(fd)

    def close(self) -> None:
        """Close the file now, or once a batch still being written is (a failed or cancelled
        download); its error, if any, is the download's trouble already reported."""
        pending = self._pending
        if pending is None or pending.done():
            self._close(pending)
        else:
            pending.add_done_callback(self._close)

    def _close(self, pending: asyncio.Future[None] | None) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if pending is not None:
            blocking.seen(pending)


def _size(path: Path) -> int:
    try:
        return os.stat(path, follow_symlinks=False).st_size
    except FileNotFoundError:
        return 0


def _discard(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def publish_videos(videos: list[list[Staged]]) -> list[OutputError | None]:
    """Give staged videos their public names, durably (blocking); per list (one member's
    videos), None or the OutputError that kept them from it.

    Each video's bytes are durable before its name is, and its name before this returns (a
    sidecar may then say it is there). From ``GROUP_SYNC_FROM`` videos on, that is one flush
    of the filesystem before the renames and one after, for all of them; on ext4 without a
    journal every fsync also flushes the device. A failed flush fails every list.
    """
    outcomes: list[OutputError | None] = [None] * len(videos)
    if sum(map(len, videos)) < GROUP_SYNC_FROM:
        for i, staged in enumerate(videos):
            try:
                for video in staged:
                    fsync_file(video.partial)
                    os.replace(video.partial, video.final)
                    fsync_dir(video.final.parent)
            except OSError as e:
                outcomes[i] = _publish_error(video, e)
        return outcomes
    outboxes = {video.final.parent for staged in videos for video in staged}
    try:
        for outbox in outboxes:
            syncfs(outbox)  # every staged video's bytes
        for i, staged in enumerate(videos):
            try:
                for video in staged:
                    os.replace(video.partial, video.final)
            except OSError as e:
                outcomes[i] = _publish_error(video, e)
        for outbox in outboxes:
            syncfs(outbox)  # and their names
    except OSError as e:
        error = OutputError(f"Cannot make the videos durable: {e.strerror}.")
        return [outcome or error for outcome in outcomes]
    return outcomes


def _publish_error(video: Staged, e: OSError) -> OutputError:
    return OutputError(f"Cannot publish {video.final.name}: {e.strerror}.")
