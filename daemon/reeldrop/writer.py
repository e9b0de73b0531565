"""Videos to disk: verified streaming downloads (small files: ``files``).

Videos stream into a hidden partial file, are checked (length, MP4 ``ftyp`` box) and hashed on
the way, and appear under their public name only by rename, after an fsync. Nothing here
follows a symlink planted by someone else.
"""

from __future__ import annotations

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
    size = offset
    try:
        async for chunk in resp.content.iter_chunked(CHUNK_BYTES):
            digest.update(chunk)
            write_all(fd, chunk)
            size += len(chunk)
            if progress is not None:
                progress(size, expected)
    except (aiohttp.ClientError, TimeoutError) as e:
        raise DownloadError(
            f"The download broke off after {size} bytes ({type(e).__name__})."
        ) from None
    except OSError as e:
        _discard(partial)
        full = e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
        raise OutputError(
            f"Cannot write the video into {partial.parent}: {e.strerror}"
            + (" (the disk is full)." if full else ".")
        ) from None
    finally:
        os.close(fd)
    return size, expected, digest


def _size(path: Path) -> int:
    try:
        return os.stat(path, follow_symlinks=False).st_size
    except FileNotFoundError:
        return 0


def _discard(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()
