"""Durable file writes: atomic replaces for small files, verified streaming for videos.

Small files (sidecars, state) go temp file → fsync → rename → directory fsync, so a reader or a
crash sees the old version or the new one, never a torn one. Videos stream into a hidden
partial file, are checked (length, MP4 ``ftyp`` box) and hashed on the way, and appear under
their public name only by rename. Nothing here follows a symlink planted by someone else.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import functools
import hashlib
import itertools
import os
import secrets
from collections.abc import Callable
from pathlib import Path

import aiohttp
import msgspec

from . import blocking
from .errors import DownloadError, OutputError
from .veo import VeoClient

Progress = Callable[[int, int | None], None]  # (bytes on disk, bytes expected or None)
CHUNK_BYTES = 1 << 20  # large enough to keep syscalls rare, small enough to keep memory flat
PARTIAL_DIR = ".partial"


class VideoFile(msgspec.Struct, frozen=True, kw_only=True):
    """One published video, as listed in the sidecar."""

    file: str
    bytes: int
    sha256: str


def write_all(fd: int, data: bytes) -> None:
    """Write every byte (``os.write`` may take fewer than it is given)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def syncfs(path: Path) -> None:
    """Flush the whole filesystem holding ``path`` (one call instead of one fsync per file)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            os.sync()  # syncfs refused: flush everything rather than nothing
    finally:
        os.close(fd)


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_renameat2 = getattr(_libc, "renameat2", None)  # glibc 2.28+


def rename_noreplace(src: str, dst: str) -> None:
    """``rename()`` that never clobbers: FileExistsError if ``dst`` exists.

    One ``renameat2(RENAME_NOREPLACE)`` where the filesystem has it (ext4, xfs, btrfs,
    tmpfs), else ``link()`` and ``unlink()``, which never clobber either.
    """
    if _renameat2 is not None:
        if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst),
                      _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS):  # anything but "not here": a real error
            raise OSError(err, os.strerror(err), dst)
    os.link(src, dst)
    os.unlink(src)


# With the pid, names this process's temp files uniquely: a random tag drawn once (a
# crashed predecessor with the same pid, as in a container, leaves other names) and a
# counter (cheaper than a random token per write).
_TMP_TAG = secrets.token_hex(4)
_tmp_serial = itertools.count()


@functools.cache
def _umask() -> int:
    """The process's umask, read once from /proc (``os.umask`` would change it for a moment,
    under other threads' feet); unknown means "always fchmod"."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o777


def atomic_write(path: str | Path, data: bytes, mode: int = 0o640, *, exclusive: bool = False,
                 durable: bool = True) -> None:
    """Replace ``path`` with ``data`` atomically (and, if ``durable``, survive a power cut).

    With ``exclusive``, the file must not exist yet (FileExistsError otherwise): the final step
    is ``rename_noreplace()`` instead of ``rename()``. Without ``durable`` the
    fsyncs are skipped: readers still see the old file or the new one, never a torn one, and
    a process crash cannot lose it; only a machine crash can, which suits copies that are
    rebuilt from a durable record at start-up (the public sidecars).
    """
    parent, name = os.path.split(os.fspath(path))  # strings: this runs for every state change
    tmp = os.path.join(parent, f".{name}.{os.getpid()}.{_TMP_TAG}-{next(_tmp_serial)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        try:
            if mode & _umask():
                os.fchmod(fd, mode)  # the umask must not decide what consumers can read
            write_all(fd, data)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        if exclusive:
            rename_noreplace(tmp, os.fspath(path))
        else:
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(parent or ".")


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
