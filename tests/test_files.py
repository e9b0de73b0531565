"""Small files written atomically (``reeldrop.files``), on the real filesystem under tmp_path."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from reeldrop import files


@pytest.mark.parametrize("unnamed", [True, False])
def test_an_exclusive_write_never_clobbers_and_leaves_nothing_behind(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unnamed: bool) -> None:
    """An exclusive write creates the file whole, with its mode, and no other entry in the
    directory; on a name that exists it raises FileExistsError and leaves the file as it was.
    Both through an unnamed file given its name by linkat (the default here: the switch stays
    on, so the filesystem took it) and through a named temp file (the fallback)."""
    if unnamed and not _takes_unnamed_files(tmp_path):
        pytest.skip("this filesystem has no O_TMPFILE")
    monkeypatch.setattr(files, "_unnamed_ok", unnamed)
    target = tmp_path / "job.json"
    files.atomic_write(target, b'{"state": "queued"}', 0o640, exclusive=True, durable=False)
    assert target.read_bytes() == b'{"state": "queued"}'
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    with pytest.raises(FileExistsError):
        files.atomic_write(target, b"other", 0o640, exclusive=True, durable=True)
    assert target.read_bytes() == b'{"state": "queued"}'
    assert os.listdir(tmp_path) == ["job.json"]
    assert files._unnamed_ok is unnamed


def _takes_unnamed_files(directory: Path) -> bool:
    try:
        os.close(os.open(directory, os.O_TMPFILE | os.O_WRONLY, 0o600))
    except (OSError, AttributeError):
        return False
    return True
