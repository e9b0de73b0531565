"""``reeldrop demo``: the example jobs through the real daemon against the embedded simulator."""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from . import jobs
from .config import Config, load
from .daemon import Daemon
from .sidecar import Sidecar
from .simulator import SimConfig, Simulator
from .spool_files import read_members, stored_jobs

DEMO_TIMEOUT_S = 120.0


def examples_dir() -> Path:
    """``inbox.example/``: shipped in the wheel, or at the root of a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "inbox.example", here.parent.parent / "inbox.example"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("inbox.example/ was not found next to the package.")


def demo_config(inbox: Path, outbox: Path, base_url: str) -> Config:
    """Settings for a quick local run: fast polls, no waiting for the (simulated) service."""
    return load(file=None, environ={}, flags={
        "inbox": str(inbox), "outbox": str(outbox), "base_url": base_url,
        "api_key": "demo-key", "poll_initial_s": 0.5, "poll_min_s": 0.2, "poll_max_s": 1.0,
        "settle_s": 0.2, "retry_base_s": 0.2, "submissions_per_minute": 120,
        "log_format": "console", "log_level": "warning",
    })


async def run_demo(outbox: Path) -> int:
    sim = Simulator(SimConfig(latency_s=3.0, latency_jitter_s=2.0, seed=7))
    base_url = await sim.start()
    with tempfile.TemporaryDirectory(prefix="reeldrop-demo-") as tmp:
        inbox = Path(tmp) / "inbox"
        shutil.copytree(examples_dir(), inbox)
        config = demo_config(inbox, outbox, base_url)
        count = len(await asyncio.to_thread(list, inbox.iterdir()))
        print(f"demo: {count} example jobs from {examples_dir()}")
        print(f"demo: simulator at {base_url}; videos go to {outbox}")
        daemon = Daemon(config)
        serving = asyncio.create_task(daemon.serve())
        started = time.monotonic()
        # The finish line is on disk (inbox and spool empty), so look at it now and then.
        while time.monotonic() - started < DEMO_TIMEOUT_S:
            if await asyncio.to_thread(_all_finished, daemon):
                break
            await asyncio.sleep(0.2)
        daemon.should_exit.set()
        await serving
        await sim.stop()
        members = _finished_members(daemon)
    _print_table(members, outbox)
    ok = bool(members) and all(m.state == "succeeded" for m in members)
    print(f"demo: {sum(m.state == 'succeeded' for m in members)} of {len(members)} succeeded "
          f"in {time.monotonic() - started:.1f} s")
    return 0 if ok else 1


def _all_finished(daemon: Daemon) -> bool:
    spool = daemon.spool
    waiting = [p for p in spool.inbox.iterdir() if jobs.is_job_name(p.name)]
    return daemon.ready.is_set() and not waiting and not any(spool.jobs.iterdir())


def _finished_members(daemon: Daemon) -> list[Sidecar]:
    found: list[Sidecar] = []
    for area in (daemon.spool.done, daemon.spool.failed):
        for job_id, job in stored_jobs(area).items():
            found.extend(read_members(area, job_id, job.records))
    return sorted(found, key=lambda m: m.output)


def _seconds(m: Sidecar) -> float:
    if m.finished_at is None:
        return 0.0
    finished, created = datetime.fromisoformat(m.finished_at), datetime.fromisoformat(m.created_at)
    return (finished - created).total_seconds()


def _print_table(members: list[Sidecar], outbox: Path) -> None:
    rows = [("job", "state", "seconds", "file")]
    for m in members:
        file = str(outbox / m.videos[0].file) if m.videos else (m.error.message if m.error else "")
        rows.append((m.output, m.state, f"{_seconds(m):.1f}", file))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)) + "  " + r[3])
    sys.stdout.flush()
