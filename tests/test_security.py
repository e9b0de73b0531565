"""Security of the daemon itself: redaction, links in the outbox, W^X memory, file modes."""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yarl

from reeldrop import log
from reeldrop.simulator import SimConfig, Simulator

from .support import REELDROP, drop, finished, make_config, running, sidecars, until


@pytest.mark.usefixtures("restore_logging")
def test_a_console_traceback_shows_no_key_neither_in_locals_nor_wrapped_across_lines(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """On the console (``reeldrop generate``, a library user's terminal) a logged exception
    is plain text: no frame's locals (a request's headers hold the key) and no wrapping at
    the terminal's width, which split a key in a long message across two lines, past the
    redaction. (rich's tracebacks, structlog's default where rich is installed, did both.)"""
    key = "AIzaSyD" + "q" * 32

    def call() -> None:
        headers = {"x-goog-api-key": key}
        raise RuntimeError(f"could not reach {'h' * 55}?key={key} ({len(headers)} headers)")

    log.configure("console", "error", [key])
    try:
        call()
    except RuntimeError:
        log.get().exception("job.internal_error")
    out = capsys.readouterr().out
    assert "RuntimeError: could not reach" in out and "?key=[redacted] (1 headers)" in out
    assert "qqqq" not in out  # not even part of the key
    assert "{'x-goog-api-key'" not in out  # no locals (the repr of the headers dict)


@pytest.mark.usefixtures("restore_logging")
def test_no_log_line_carries_the_key_or_anything_shaped_like_one(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Known secrets (as written and as JSON escapes them) and Google-key-shaped strings
    vanish from every rendered line: in any field, nested, inside an exception or an object
    JSON cannot hold (its repr), and in the stdlib's records (aiohttp logs through those)."""
    secret, quoted = "s3cret-value", 'with"quote'
    log.configure("json", "info", [secret, quoted])
    log.get().info(
        "test.line", url=f"https://h/?key={secret}", nested={"k": [secret, (1, secret)]},
        other="AIzaSyA1234567890abcdefghijklmnopqrstu", error=ValueError(f"bad {secret}"),
        where=yarl.URL(f"https://h/x?key={secret}"), odd=f"a {quoted} b", n=3)
    logging.getLogger("aiohttp.client").warning("request to %s failed", f"/?key={secret}")
    out = capsys.readouterr().out
    lines = [json.loads(line) for line in out.splitlines()]
    assert secret not in out and "quote" not in out and "AIzaSy" not in out
    first = lines[0]
    assert first["url"] == "https://h/?key=[redacted]"
    assert first["nested"] == {"k": ["[redacted]", [1, "[redacted]"]]}
    assert first["other"] == "[redacted]" and first["n"] == 3
    assert first["error"] == "ValueError: bad [redacted]"
    assert first["where"] == "URL('https://h/x?key=[redacted]')"
    assert first["odd"] == "a [redacted] b"
    assert lines[1]["event"] == "request to /?key=[redacted] failed"


@pytest.fixture
def sim_config() -> SimConfig:
    return SimConfig(latency_s=0.05, latency_jitter_s=0.0, seed=2)


async def test_links_planted_in_the_outbox_are_never_written_through(
        tmp_path: Path, sim: Simulator) -> None:
    """A symlink at a job's sidecar or video name is not followed: the target stays intact."""
    target = tmp_path / "precious"
    target.write_text("keep me")
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    (outbox / "job.json").symlink_to(target)
    (outbox / "job.2.mp4").symlink_to(target)
    async with running(make_config(tmp_path, sim.base_url)):
        drop(tmp_path / "inbox", "job.prompt", "a prompt")
        await until(finished(outbox, 1))
    assert target.read_text() == "keep me"
    [doc] = sidecars(outbox).values()
    assert doc.state == "succeeded" and doc.output == "job.3"
    assert (outbox / "job.json").is_symlink() and (outbox / "job.2.mp4").is_symlink()


async def test_created_files_and_directories_get_the_configured_modes(
        tmp_path: Path, sim: Simulator) -> None:
    """Videos and sidecars get file_mode, directories dir_mode; nothing is world-writable."""
    config = make_config(tmp_path, sim.base_url, file_mode="0660", dir_mode="0770")
    async with running(config):
        drop(tmp_path / "inbox", "job.prompt", "a prompt")
        await until(finished(tmp_path / "outbox", 1))
    outbox = tmp_path / "outbox"
    assert stat.S_IMODE((outbox / "job.mp4").stat().st_mode) == 0o660
    assert stat.S_IMODE((outbox / "job.json").stat().st_mode) == 0o660
    for path in tmp_path.rglob("*"):
        if path.is_symlink():
            continue
        assert not path.stat().st_mode & stat.S_IWOTH, path
    assert stat.S_IMODE((tmp_path / "inbox" / ".reeldrop" / "done").stat().st_mode) & 0o007 == 0


def _mdwe_supported() -> bool:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    return bool(libc.prctl(66, 0, 0, 0, 0) >= 0)  # PR_GET_MDWE


@pytest.mark.skipif(not _mdwe_supported(), reason="the kernel has no PR_SET_MDWE (Linux < 6.3)")
def test_the_daemon_runs_with_memory_deny_write_execute(tmp_path: Path) -> None:
    """The unit sets MemoryDenyWriteExecute=yes: the whole demo (daemon, simulator, every
    compiled extension) runs under the kernel's W^X refusal, the same rule systemd applies."""

    def deny_write_execute() -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_MDWE) failed")

    probe = "import mmap; mmap.mmap(-1, 4096, prot=mmap.PROT_WRITE | mmap.PROT_EXEC)"
    refused = subprocess.run([sys.executable, "-c", probe], capture_output=True, check=False,
                             preexec_fn=deny_write_execute)
    assert refused.returncode != 0, "W^X was not in force; this test would prove nothing"
    done = subprocess.run([*REELDROP, "demo", "--outbox", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120, check=False,
                          preexec_fn=deny_write_execute)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "7 of 7 succeeded" in done.stdout
