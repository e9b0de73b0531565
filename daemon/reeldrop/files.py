"""Small files written atomically: a reader or a crash sees the old version or the new one.

Sidecars and state go temp file → fsync → rename → directory fsync (the fsyncs only where the
write must survive a power cut); a file's first version, which must not clobber anything, is
an unnamed file linked into place instead. Apart from the video download (``writer``), so that the
claim path (spool, sidecars, intake) loads without the HTTP client: a daemon with a backlog
starts claiming while aiohttp is still being imported.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import functools
import itertools
import os
import secrets
from pathlib import Path

PARTIAL_DIR = ".partial"  # in the outbox: videos being downloaded (``writer``)
# From this many files on, one ``syncfs`` is cheaper than an fsync of each. Measured on a fresh
# ext4 for the spool's final writes, CPU per write: 0.7-1.2 ms alone, about the same in
# groups of 2, 0.4 ms in groups of 4, 0.23-0.35 ms from 8 on (``durable_writes``; the
# finished videos' ``writer.publish_videos`` follows it).
GROUP_SYNC_FROM = 4


def write_all(fd: int, data: bytes) -> None:
    """Write every byte (``os.write`` may take fewer than it is given)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def fsync_dir(path: str | Path) -> None:
    _fsync_path(path, os.O_RDONLY | os.O_DIRECTORY)


def fsync_file(path: str | Path) -> None:
    """Flush a file's bytes through a descriptor of its own (the writer's may be closed)."""
    _fsync_path(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)


def _fsync_path(path: str | Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def syncfs(path: str | Path) -> None:
    """Flush the whole filesystem holding ``path`` (one call instead of one fsync per file).

    Raises OSError if a write could not be flushed (Linux reports it since 5.8). Where the
    call is refused (a seccomp filter), everything is flushed instead, as ``sync`` does.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            if err not in (errno.ENOSYS, errno.EPERM, errno.EACCES):
                raise OSError(err, os.strerror(err), os.fspath(path))
            os.sync()
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

    With ``exclusive``, the file must not exist yet (FileExistsError otherwise): it is an
    unnamed file given its name by ``linkat`` (``_write_unnamed``), or where the filesystem
    has none, a temp file moved with ``rename_noreplace()``. Without ``durable`` the
    fsyncs are skipped: readers still see the old file or the new one, never a torn one, and
    a process crash cannot lose it; only a machine crash can, which suits copies that are
    rebuilt from a durable record at start-up (the public sidecars).
    """
    parent, name = os.path.split(os.fspath(path))  # strings: this runs for every state change
    if exclusive and _unnamed_ok and _write_unnamed(parent, os.fspath(path), data, mode, durable):
        return
    tmp = os.path.join(parent, f".{name}.{os.getpid()}.{_TMP_TAG}-{next(_tmp_serial)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        try:
            _fill(fd, data, mode, durable)
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


def _fill(fd: int, data: bytes, mode: int, durable: bool) -> None:
    """A new file's bytes and mode (the umask must not decide what consumers can read)."""
    if mode & _umask():
        os.fchmod(fd, mode)
    write_all(fd, data)
    if durable:
        os.fsync(fd)


# Linux: unnamed files, named through /proc. Until a filesystem refuses them.
_unnamed_ok = hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd")


@functools.cache
def _proc_fds() -> int:
    """This process's /proc/self/fd, opened once (the unnamed files' names)."""
    return os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def _write_unnamed(parent: str, path: str, data: bytes, mode: int, durable: bool) -> bool:
    """``atomic_write(exclusive=True)`` through an unnamed file (``O_TMPFILE``) given its name
    by ``linkat``, which refuses an existing name. One entry added to the directory instead of
    a temp name added, then moved (a claim's first sidecar: a seventh of a claim's time in a
    big outbox on ext4), and a crash leaves nothing behind. False if the filesystem has no
    unnamed files (the caller falls back, and so does every later call)."""
    global _unnamed_ok  # noqa: PLW0603 - a one-way switch, set once per process
    try:
        fd = os.open(parent or ".", os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, mode)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
            raise
        _unnamed_ok = e.errno == errno.ENOENT  # a missing directory says nothing of the fs
        return False
    try:
        _fill(fd, data, mode, durable)
        # linkat(AT_SYMLINK_FOLLOW) on /proc/self/fd/N names the file itself (os.link takes
        # linkat only with a directory fd given). FileExistsError if the name is taken.
        os.link(str(fd), path, src_dir_fd=_proc_fds(), follow_symlinks=True)
    finally:
        os.close(fd)
    if durable:
        fsync_dir(parent or ".")
    return True
