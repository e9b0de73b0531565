"""Videos to disk: verified streaming downloads (small files: ``files``).

Videos stream into a hidden partial file, are checked (length, MP4 ``ftyp`` box) and hashed on
the way, and appear under their public name only by rename, after an fsync. Nothing here
follows a symlink planted by someone else.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import aiohttp

from . import blocking
from .errors import DownloadError, OutputError
from .files import fsync_dir, write_all
from .sidecar import VideoFile
from .veo import VeoClient

Progress = Callable[[int, int | None], None]  # (bytes on disk, bytes expected or None)
CHUNK_BYTES = 1 << 20  # large enough to keep syscalls rare, small enough to keep memory flat
INLINE_BELOW_BYTES = 256 << 10  # smaller chunks are hashed and written on the loop


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
    progress: Progress | None = None, parent_mode: int | None = None,
) -> VideoFile:
    """Stream one video to ``partial`` (resuming it with Range if present), verify, publish.

    A failed transfer leaves the partial file for the next try to resume; a file that fails
    its checks is removed. The public name appears only once the whole, checked file is there.
    With ``parent_mode``, a missing partial directory is created with that mode.
    """
    offset = _size(partial)
    resp = await client.open_download(uri, offset)
    try:
        size, expected, digest = await _receive(resp, partial, offset, mode,
                                                progress=progress, parent_mode=parent_mode)
    finally:
        resp.release()
    if expected is not None and size != expected:
        raise DownloadError(f"The download ended at {size} of {expected} bytes.")
    await blocking.run(_publish, partial, final, mode)
    return VideoFile(file=final.name, bytes=size, sha256=digest.hexdigest())


def _publish(partial: Path, final: Path, mode: int) -> None:
    """Check, flush and rename a complete download into place (blocking: one thread hop for
    the whole step, and no fsync on the event loop)."""
    try:
        fd = os.open(partial, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            if os.pread(fd, 12, 0)[4:8] != b"ftyp":
                _discard(partial)
                raise DownloadError(
                    "The downloaded file is not an MP4 video (no ftyp box at its start).")
            os.fsync(fd)  # the bytes are on disk before the name is
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
        os.replace(partial, final)
        fsync_dir(final.parent)
    except OSError as e:
        raise OutputError(f"Cannot publish {final.name}: {e.strerror}.") from None


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


async def _receive(
    resp: aiohttp.ClientResponse, partial: Path, offset: int, mode: int, *,
    progress: Progress | None, parent_mode: int | None,
) -> tuple[int, int | None, hashlib._Hash]:
    """Stream the body into ``partial`` (appending if the server honoured our Range).

    Returns (bytes on disk, bytes expected or None, sha256 of the whole file so far).
    """
    resumed = offset > 0 and resp.status == 206 and resp.headers.get(
        "Content-Range", "").startswith(f"bytes {offset}-")
    if resumed:
        digest, offset = await blocking.run(_hash_existing, partial)
    else:
        digest, offset = hashlib.sha256(), 0
    length = resp.headers.get("Content-Length")
    expected = offset + int(length) if length and length.isdigit() else None
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    flags |= os.O_APPEND if resumed else os.O_TRUNC
    try:  # in a thread: creating a file can stall on a busy disk, and so would the loop
        fd = await blocking.run(_open_partial, partial, flags, mode, parent_mode)
    except OSError as e:
        raise OutputError(f"Cannot write into {partial.parent}: {e.strerror}.") from None
    pipe = _ChunkPipe(fd, digest)
    try:
        async for chunk in resp.content.iter_chunked(CHUNK_BYTES):
            await pipe.put(chunk)
            if progress is not None:
                progress(offset + pipe.stored, expected)
        await pipe.flush()
    except (aiohttp.ClientError, TimeoutError) as e:
        raise DownloadError(
            f"The download broke off after {offset + pipe.stored} bytes ({type(e).__name__})."
        ) from None
    except OSError as e:
        _discard(partial)
        full = e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
        raise OutputError(
            f"Cannot write the video into {partial.parent}: {e.strerror}"
            + (" (the disk is full)." if full else ".")
        ) from None
    finally:
        pipe.close()
    return offset + pipe.stored, expected, digest


class _ChunkPipe:
    """Hashes and writes a download's chunks in a worker thread, one at a time, while the
    loop receives the next: both release the interpreter lock on large buffers, and a
    stalled disk stalls this download, not the loop. The wait for a chunk is shielded: a
    cancelled download must not leave a thread writing to a closed file descriptor."""

    def __init__(self, fd: int, digest: hashlib._Hash) -> None:
        self.fd, self.digest = fd, digest
        self.stored = 0  # bytes hashed and written
        self._pending: asyncio.Future[None] | None = None
        self._pending_bytes = 0

    async def put(self, chunk: bytes) -> None:
        """Wait for the previous chunk (its write error is raised here), then hand this on;
        a small one is stored at once (a thread hop would cost more than it saves: a small
        video is one small chunk)."""
        await self.flush()
        if len(chunk) < INLINE_BELOW_BYTES:
            self._store(chunk)
            self.stored += len(chunk)
            return
        self._pending = blocking.run(self._store, chunk)
        self._pending_bytes = len(chunk)

    async def flush(self) -> None:
        if self._pending is not None:
            await asyncio.shield(self._pending)
            self._pending, self.stored = None, self.stored + self._pending_bytes

    def _store(self, chunk: bytes) -> None:
        self.digest.update(chunk)
        write_all(self.fd, chunk)

    def close(self) -> None:
        """Close the file now, or once a chunk still being written is (a failed or cancelled
        download); its error, if any, is the download's trouble already reported."""
        pending = self._pending
        if pending is None or pending.done():
            self._close(pending)
        else:
            pending.add_done_callback(self._close)

    def _close(self, pending: asyncio.Future[None] | None) -> None:
        os.close(self.fd)
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
