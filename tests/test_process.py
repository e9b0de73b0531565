"""The daemon as a real subprocess: signals, restarts, sd_notify, credentials, secrets."""

from __future__ import annotations

import asyncio
import gc
import itertools
import signal
import socket
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from reeldrop.runtime import GC_YOUNG_THRESHOLD, tune_gc
from reeldrop.simulator import SimConfig, Simulator

from .support import (
    REELDROP,
    TEST_KEY,
    daemon_args,
    drop,
    finish_in_new_daemon,
    finished,
    sidecars,
    spawn,
    until,
    wait_exit,
    wait_ready,
)


class NotifyListener:
    """A real AF_UNIX datagram socket standing in for systemd's notify socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[tuple[float, str]] = []
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self.drain)

    def drain(self) -> list[str]:
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                break
            for line in data.decode().splitlines():
                self.messages.append((time.monotonic(), line))
        return [m for _, m in self.messages]

    def close(self, proc: asyncio.subprocess.Process) -> list[str]:
        """After the test: kill the daemon if it still runs; every message it sent."""
        if proc.returncode is None:
            proc.kill()
        messages = self.drain()
        asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()
        return messages


@pytest.fixture
def sim_config() -> SimConfig:
    return SimConfig(latency_s=1.5, latency_jitter_s=0.3, seed=2, api_key=TEST_KEY)


def env_with_key(env: dict[str, str]) -> dict[str, str]:
    return {**env, "GEMINI_API_KEY": TEST_KEY}


async def start_with_jobs(tmp_path: Path, sim: Simulator, env: dict[str, str],
                          count: int, *flags: str) -> asyncio.subprocess.Process:
    """Drop ``count`` jobs, start a daemon, and return once all of them were submitted."""
    for i in range(count):
        drop(tmp_path / "inbox", f"job{i}.prompt", f"prompt {i}")
    proc = await spawn(daemon_args(tmp_path, sim.base_url, *flags), env, tmp_path / "log")
    await until(lambda: sim.stats["submissions"] == count, what=f"{count} submissions")
    return proc


async def test_notify_ready_status_watchdog_and_stopping(
        tmp_path: Path, sim: Simulator, daemon_env: dict[str, str]) -> None:
    """READY=1 after the scan, STATUS= lines, WATCHDOG=1 at half the interval from the start
    (before READY=1: the first pass over a backlog must not starve the watchdog), and
    STOPPING=1."""
    listener = NotifyListener(tmp_path / "notify.sock")
    drop(tmp_path / "inbox", "early.prompt", "dropped before the start")
    env = {**env_with_key(daemon_env), "NOTIFY_SOCKET": str(listener.path),
           "WATCHDOG_USEC": "400000"}
    proc = await spawn(daemon_args(tmp_path, sim.base_url), env, tmp_path / "log")
    try:
        await until(lambda: "READY=1" in listener.drain(), what="READY=1")
        # The start-up scan already claimed the file dropped while the daemon was down.
        assert not (tmp_path / "inbox" / "early.prompt").exists()
        await asyncio.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc) == 0
    finally:
        messages = listener.close(proc)
    pats = [t for t, m in listener.messages if m == "WATCHDOG=1"]
    assert len(pats) >= 4, messages
    gaps = [b - a for a, b in itertools.pairwise(pats)]
    assert max(gaps) < 0.4, gaps  # half of WATCHDOG_USEC, with room for a busy machine
    assert any(m.startswith("STATUS=") and "in flight" in m for m in messages)
    assert messages.index("READY=1") < messages.index("STOPPING=1")
    assert messages.index("WATCHDOG=1") < messages.index("READY=1")


def _log_lines(log: Path) -> list[dict[str, Any]]:
    return [msgspec.json.decode(line) for line in log.read_bytes().splitlines()
            if line.startswith(b"{")]


async def test_a_job_writes_two_info_lines_and_a_bad_file_says_why(
        tmp_path: Path, sim: Simulator, daemon_env: dict[str, str]) -> None:
    """At the default level a job that goes well writes two lines of its own, both naming its
    file: job.submitted and its job.finished summary, which says where the job was archived;
    its claim is counted in its batch's intake.claimed line. A bad file writes job.invalid
    with the reason, and job.archived to failed. No line holds the key."""
    sim.config = msgspec.structs.replace(sim.config, latency_s=0.2, latency_jitter_s=0.0)
    drop(tmp_path / "inbox", "good.prompt", "a prompt")
    drop(tmp_path / "inbox", "bad.json", '{"prompt": "x", "colour": "red"}')
    log = tmp_path / "log"
    proc = await spawn(daemon_args(tmp_path, sim.base_url), env_with_key(daemon_env), log)
    try:
        await until(finished(tmp_path / "outbox", 2), what="both jobs finished")
        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
    assert TEST_KEY not in log.read_text()
    lines = _log_lines(log)
    by_source = {ln["source"]: ln["job_id"] for ln in lines if "source" in ln}
    good = [ln for ln in lines if ln.get("job_id") == by_source["good.prompt"]]
    bad = [ln for ln in lines if ln.get("job_id") == by_source["bad.json"]]
    assert [ln["event"] for ln in good] == ["job.submitted", "job.finished"]
    assert all(ln["source"] == "good.prompt" for ln in good)
    assert good[-1]["state"] == "succeeded" and good[-1]["archived"] == "done"
    claimed = [ln for ln in lines if ln["event"] == "intake.claimed"]
    assert sum(ln["jobs"] for ln in claimed) == 2 and sum(ln["invalid"] for ln in claimed) == 1
    assert [ln["event"] for ln in bad] == ["job.invalid", "job.archived"]
    assert "colour" in bad[0]["error"] and bad[1]["to"] == "failed"


async def test_sighup_reloads_the_config_in_place_and_the_jobs_carry_on(
        tmp_path: Path, sim: Simulator, daemon_env: dict[str, str]) -> None:
    """SIGHUP with a broken config: daemon.reload_failed, and the daemon runs on. With a good
    one: RELOADING=1 (never STOPPING=1, which systemd would take for a stop), the same
    process starts again with the new settings and sends READY=1 again, and the jobs that
    were generating finish, none submitted twice."""
    sim.config = msgspec.structs.replace(sim.config, latency_s=4.0, latency_jitter_s=0.0)
    listener = NotifyListener(tmp_path / "notify.sock")
    config = tmp_path / "reeldrop.toml"
    config.write_text("concurrency = 3\n")
    args = daemon_args(tmp_path, sim.base_url, "--config", str(config))
    at = args.index("--concurrency")
    del args[at:at + 2]  # from the file, so that a reload can change it
    env = {**env_with_key(daemon_env), "NOTIFY_SOCKET": str(listener.path)}
    for i in range(3):
        drop(tmp_path / "inbox", f"job{i}.prompt", f"prompt {i}")
    log = tmp_path / "log"
    proc = await spawn(args, env, log)
    try:
        await until(lambda: sim.stats["submissions"] == 3, what="3 submissions")
        config.write_text("concurrency = 0\n")
        proc.send_signal(signal.SIGHUP)
        await until(lambda: b"daemon.reload_failed" in log.read_bytes(), what="reload_failed")
        config.write_text("concurrency = 4\n")
        proc.send_signal(signal.SIGHUP)
        await wait_ready(log, 1)
        assert proc.returncode is None
        await until(finished(tmp_path / "outbox", 3), timeout=30)
        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc) == 0
    finally:
        messages = listener.close(proc)
    lines = _log_lines(log)
    failed = [ln for ln in lines if ln["event"] == "daemon.reload_failed"]
    assert len(failed) == 1 and "concurrency" in failed[0]["error"], failed
    assert [ln["concurrency"] for ln in lines if ln["event"] == "daemon.started"] == [3, 4]
    reloading = [ln for ln in lines if ln["event"] == "daemon.reloading"]
    assert len(reloading) == 1 and reloading[0]["in_flight"] == 3, reloading
    assert {d.state for d in sidecars(tmp_path / "outbox").values()} == {"succeeded"}
    assert sorted(sim.submissions.values()) == [1] * 3, "a job was submitted twice"
    after = messages[messages.index("RELOADING=1"):]
    assert after.count("READY=1") == 1 and "STOPPING=1" not in after[:after.index("READY=1")]
    assert messages.count("READY=1") == 2, messages
    assert "STOPPING=1" in after[after.index("READY=1"):], messages  # SIGTERM's, at the end


@pytest.mark.parametrize("event_loop", ["auto", "asyncio"])
async def test_sigterm_exits_cleanly_and_a_restart_finishes_every_job(
        tmp_path: Path, sim: Simulator, daemon_env: dict[str, str], event_loop: str) -> None:
    """SIGTERM mid-generation: exit 0 within the grace, jobs stay claimed, restart ends them.
    On uvloop (auto, where it is installed) and on asyncio's own loop alike."""
    env = env_with_key(daemon_env)
    proc = await start_with_jobs(tmp_path, sim, env, 5, "--event-loop", event_loop)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert await wait_exit(proc) == 0
    assert time.monotonic() - started < 5
    assert any(d.state == "generating" for d in sidecars(tmp_path / "outbox").values())
    lines = [msgspec.json.decode(line) for line in (tmp_path / "log").read_bytes().splitlines()
             if line.startswith(b"{")]
    started_on = [ln["event_loop"] for ln in lines if ln["event"] == "daemon.started"]
    assert started_on == ["asyncio" if event_loop == "asyncio" else "uvloop"]
    stopped = [ln for ln in lines if ln["event"] == "daemon.stopped"]
    assert stopped and stopped[0]["in_flight"] == 5
    await finish_in_new_daemon(tmp_path, sim.base_url, env, 5)
    assert {d.state for d in sidecars(tmp_path / "outbox").values()} == {"succeeded"}
    assert sorted(sim.submissions.values()) == [1] * 5, "a job was submitted twice"


async def test_sigkill_while_generating_resumes_without_paying_twice(
        tmp_path: Path, sim: Simulator, daemon_env: dict[str, str]) -> None:
    """After kill -9, a restart polls the stored operations instead of creating new ones."""
    env = env_with_key(daemon_env)
    proc = await start_with_jobs(tmp_path, sim, env, 4)
    await asyncio.sleep(0.2)
    proc.kill()
    await wait_exit(proc)
    await finish_in_new_daemon(tmp_path, sim.base_url, env, 4)
    assert {d.state for d in sidecars(tmp_path / "outbox").values()} == {"succeeded"}
    assert sorted(sim.submissions.values()) == [1] * 4
    leftovers = [p for p in (tmp_path / "outbox").rglob("*") if p.name.endswith((".tmp", ".part"))]
    assert not leftovers


async def test_the_api_key_is_never_written_anywhere(
        tmp_path: Path, daemon_env: dict[str, str]) -> None:
    """Logs, sidecars and state files never hold the key, even when the service rejects it."""
    sim = Simulator(SimConfig(latency_s=0.1, api_key="the-right-key"))
    await sim.start()
    try:
        drop(tmp_path / "inbox", "job.prompt", "a prompt")
        env = {**daemon_env, "GEMINI_API_KEY": TEST_KEY}
        proc = await spawn(daemon_args(tmp_path, sim.base_url, "--log-level", "debug"), env,
                           tmp_path / "log")
        await until(finished(tmp_path / "outbox", 1))
        proc.send_signal(signal.SIGTERM)
        await wait_exit(proc)
    finally:
        await sim.stop()
    [doc] = sidecars(tmp_path / "outbox").values()
    assert doc.state == "failed"
    assert doc.error is not None
    assert "API key not valid" in doc.error.message
    everything = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(everything) >= 4
    for path in everything:
        assert TEST_KEY.encode() not in path.read_bytes(), path


async def test_a_systemd_credential_supplies_the_key(
        tmp_path: Path, sim: Simulator, daemon_env: dict[str, str]) -> None:
    """With $CREDENTIALS_DIRECTORY/gemini-api-key present, that key is the one sent."""
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "gemini-api-key").write_text(TEST_KEY + "\n")
    env = {**daemon_env, "CREDENTIALS_DIRECTORY": str(creds)}
    drop(tmp_path / "inbox", "job.prompt", "a prompt")
    proc = await spawn(daemon_args(tmp_path, sim.base_url), env, tmp_path / "log")
    try:
        await until(finished(tmp_path / "outbox", 1))
    finally:
        proc.send_signal(signal.SIGTERM)
        await wait_exit(proc)
    assert sidecars(tmp_path / "outbox")["job"].state == "succeeded"


@pytest.mark.parametrize(("flags", "needle"), [
    (["--concurrency", "0"], "concurrency"),
    (["--base-url", "ftp://x"], "base_url"),
    (["--config", "/nonexistent/reeldrop.toml"], "does not exist"),
])
async def test_a_bad_config_exits_2_with_a_clear_message(
        tmp_path: Path, daemon_env: dict[str, str], flags: list[str], needle: str) -> None:
    """A config error is one sentence on stderr and exit code 2, before anything is watched."""
    proc = await asyncio.create_subprocess_exec(
        *REELDROP, "run", "--inbox", str(tmp_path / "in"), "--outbox", str(tmp_path / "out"),
        *flags, env=daemon_env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _out, err = await proc.communicate()
    assert proc.returncode == 2
    assert needle in err.decode()
    assert "Traceback" not in err.decode()
    assert not (tmp_path / "in").exists()


async def test_a_second_signal_skips_the_grace(
        tmp_path: Path, daemon_env: dict[str, str]) -> None:
    """The first SIGTERM waits for a download in flight (the grace); a second one exits at
    once, leaving the partial file hidden for the next run to resume."""
    sim = Simulator(SimConfig(latency_s=0.05, api_key=TEST_KEY, video_bytes=200 << 20,
                              download_chunk_delay_s=0.05))
    await sim.start()
    try:
        drop(tmp_path / "inbox", "big.prompt", "a long download")
        proc = await spawn(daemon_args(tmp_path, sim.base_url, "--shutdown-grace-s", "60"),
                           env_with_key(daemon_env), tmp_path / "log")
        await until(lambda: sim.stats["downloads"] >= 1, what="the download to start")
        await asyncio.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(1.0)
        assert proc.returncode is None, "the first signal did not wait for the download"
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc) == 0
        assert time.monotonic() - started < 3
        assert not list((tmp_path / "outbox").glob("*.mp4")), "a partial video became visible"
        assert list((tmp_path / "outbox" / ".partial").iterdir()), "no partial kept to resume"
        stopped = [msgspec.json.decode(line) for line
                   in (tmp_path / "log").read_bytes().splitlines() if b"daemon.stopped" in line]
        assert stopped[-1]["interrupted"] == 1
        sim.config = msgspec.structs.replace(sim.config, download_chunk_delay_s=0.0)
        await finish_in_new_daemon(tmp_path, sim.base_url, env_with_key(daemon_env), 1)
    finally:
        await sim.stop()
    assert (tmp_path / "outbox" / "big.mp4").stat().st_size == 200 << 20
    assert sim.stats["ranged_downloads"] == 1, "the restart did not resume the partial file"
    assert sim.submissions["a long download"] == 1


def test_tune_gc_freezes_what_start_up_made_and_collects_young_objects_less_often() -> None:
    """After ``tune_gc`` (the daemon's process calls it before its loop starts) the objects
    alive at start-up are frozen, so full collections skip them, and 5,000 new containers
    (a few dozen requests' worth) no longer set off a young collection (Python's default
    threshold, 700, would run seven)."""
    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_freeze_count() > 10_000
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, *before[1:])
        young = gc.get_stats()[0]["collections"]
        containers: list[list[int]] = [[] for _ in range(5000)]
        assert gc.get_stats()[0]["collections"] == young
        del containers
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
