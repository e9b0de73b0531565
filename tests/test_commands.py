"""The commands people reach for: generate (with and without a terminal), submit --wait,
status --json, retry; and `reeldrop run` stays free of rich."""

from __future__ import annotations

import asyncio
import os
import pty
import signal
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from reeldrop.simulator import SimConfig, Simulator

from .support import REELDROP, TEST_KEY, drop, finished, make_config, running, sidecars, until


@pytest.fixture
def sim_config() -> SimConfig:
    return SimConfig(latency_s=0.3, latency_jitter_s=0.1, seed=8, api_key=TEST_KEY)


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REELDROP_", "GEMINI_"))}
    return {**env, "GEMINI_API_KEY": TEST_KEY, "REELDROP_POLL_INITIAL_S": "0.1",
            "REELDROP_POLL_MIN_S": "0.1", "REELDROP_POLL_MAX_S": "0.2", **extra}


async def run_cli(*args: str, env: dict[str, str] | None = None,
                  cwd: Path | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *REELDROP, *args, env=env or cli_env(), cwd=cwd, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def test_the_daemon_never_imports_rich_or_the_simulator(tmp_path: Path) -> None:
    """A running `reeldrop run` has not loaded rich (structlog would import it just because it
    is installed) nor the simulator (and aiohttp's server side with it, ~0.1 s of start-up),
    so the service stays lean and starts fast."""
    probe = f"""
import os, signal, sys, threading, time
sys.argv = ["reeldrop", "run", "--inbox", {str(tmp_path / "in")!r},
            "--outbox", {str(tmp_path / "out")!r}, "--base-url", "http://127.0.0.1:9/v1beta"]
def report():
    time.sleep(1.5)
    loaded = any(m is not None for n, m in sys.modules.items() if n.split(".")[0] == "rich")
    print("reeldrop.daemon" in sys.modules, loaded, "reeldrop.simulator" in sys.modules,
          file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
threading.Thread(target=report, daemon=True).start()
from reeldrop.cli import main
sys.exit(main())
"""
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=60, check=False, env=cli_env())
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "True False False", done.stderr


async def test_generate_without_a_terminal_prints_plain_lines(
        tmp_path: Path, sim: Simulator) -> None:
    """Piped, `generate` prints one plain line per step and the saved path on stdout."""
    code, out, err = await run_cli("generate", "a fox in snow", "-o", str(tmp_path / "fox.mp4"),
                                   "--aspect-ratio", "9:16", "--base-url", sim.base_url)
    assert code == 0, err
    assert out.strip() == str(tmp_path / "fox.mp4")
    assert "submitted: models/veo-3.1-generate-preview/operations/" in out + err
    assert "downloaded" in out + err
    assert "\x1b[" not in out + err, "escape codes in piped output"
    assert (tmp_path / "fox.mp4").stat().st_size > 0


async def test_generate_in_a_terminal_shows_progress_bars(tmp_path: Path, sim: Simulator) -> None:
    """On a terminal, `generate` draws a generation bar (labelled estimate) and a download bar."""
    primary, secondary = pty.openpty()
    proc = await asyncio.create_subprocess_exec(
        *REELDROP, "generate", "a fox", "-o", str(tmp_path / "f.mp4"), "--base-url",
        sim.base_url, env=cli_env(COLUMNS="120", TERM="xterm"), stdin=secondary,
        stdout=secondary, stderr=secondary)
    os.close(secondary)
    output = b""
    loop = asyncio.get_running_loop()
    while True:
        try:
            chunk = await loop.run_in_executor(None, os.read, primary, 65536)
        except OSError:
            break
        if not chunk:
            break
        output += chunk
    assert await proc.wait() == 0
    os.close(primary)
    text = output.decode(errors="replace")
    assert "generating" in text and "an estimate" in text
    assert "downloading" in text and "kB" in text


async def test_generate_reports_a_refusal_in_one_sentence(sim: Simulator) -> None:
    """A request the model refuses exits 1 with one sentence, no traceback."""
    code, _out, err = await run_cli("generate", "x", "--resolution", "4k",
                                    "--duration-seconds", "4", "--base-url", sim.base_url)
    assert code == 1
    assert "only 8 seconds" in err and "Traceback" not in err


async def test_submit_wait_follows_the_job_to_its_video(tmp_path: Path, sim: Simulator) -> None:
    """`submit --wait` drops a job atomically, follows its sidecar and prints the video path."""
    config = make_config(tmp_path, sim.base_url)
    async with running(config):
        code, out, err = await run_cli(
            "submit", "a lighthouse", "--name", "beacon", "--aspect-ratio", "9:16",
            "--inbox", str(tmp_path / "inbox"), "--outbox", str(tmp_path / "outbox"), "--wait")
    assert code == 0, err
    name, video = out.split()
    assert name == "beacon"
    assert video == str(tmp_path / "outbox" / "beacon.mp4")
    assert "beacon: succeeded" in err
    assert sidecars(tmp_path / "outbox")["beacon"].parameters["aspect_ratio"] == "9:16"


async def test_submit_wait_exits_1_with_the_error(tmp_path: Path, sim: Simulator) -> None:
    """A job that fails makes `submit --wait` exit 1 with the sidecar's sentence."""
    async with running(make_config(tmp_path, sim.base_url)):
        code, _out, err = await run_cli(
            "submit", "doomed [fail]", "--inbox", str(tmp_path / "inbox"), "--outbox",
            str(tmp_path / "outbox"), "--wait")
    assert code == 1
    assert "internal error" in err


async def test_status_json_and_retry(tmp_path: Path, sim: Simulator) -> None:
    """`status --json` lists jobs with counts; `retry NAME` puts a failed job back in the inbox,
    and the daemon runs it again."""
    async with running(make_config(tmp_path, sim.base_url)):
        drop(tmp_path / "inbox", "good.prompt", "a good one")
        drop(tmp_path / "inbox", "bad.prompt", "a bad one [fail]")
        await until(finished(tmp_path / "outbox", 2))
        code, out, err = await run_cli("status", "--json", "--outbox", str(tmp_path / "outbox"))
        assert code == 0, err
        report = msgspec.json.decode(out)
        assert report["counts"]["succeeded"] == 1 and report["counts"]["failed"] == 1
        assert {j["output"] for j in report["jobs"]} == {"good", "bad"}
        code, out, err = await run_cli("retry", "bad", "--inbox", str(tmp_path / "inbox"))
        assert code == 0, err
        assert "retrying bad.prompt" in out
        await until(lambda: sim.submissions["a bad one [fail]"] == 2, what="a second attempt")
        await until(finished(tmp_path / "outbox", 2))
        code, out, _ = await run_cli("retry", "nothing-like-it", "--inbox",
                                     str(tmp_path / "inbox"))
        assert code == 1
    code, out, _ = await run_cli("status", "--outbox", str(tmp_path / "outbox"))
    assert code == 0 and "good" in out and "bad" in out and "succeeded" in out


async def test_ctrl_c_during_generate_prints_the_operation(tmp_path: Path, sim: Simulator) -> None:
    """Ctrl-C while the service works stops cleanly (exit 130) and names the operation, so the
    paid-for work is not lost."""
    proc = await asyncio.create_subprocess_exec(
        *REELDROP, "generate", "a long one [slow]", "-o", str(tmp_path / "x.mp4"),
        "--base-url", sim.base_url, env=cli_env(), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
    await until(lambda: sim.stats["polls"] >= 1, what="the first poll")
    proc.send_signal(signal.SIGINT)
    _out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 130
    [operation] = [name for name in sim.ops]
    assert operation in err.decode() and "Traceback" not in err.decode()
