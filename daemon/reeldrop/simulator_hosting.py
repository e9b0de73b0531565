"""Running the embedded simulator (``simulator.py``) for a caller: as a server of its own
(``reeldrop simulate``), from a background thread for synchronous code (tests, the library's
users), or, for the examples, only when no API key is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Iterator, Mapping
from typing import Any

from .simulator import SimConfig, Simulator


async def serve_forever(config: SimConfig, host: str, port: int) -> None:
    sim = Simulator(config)
    url = await sim.start(host, port)
    print(f"simulator listening; use --base-url {url}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await sim.stop()


@contextlib.contextmanager
def running_in_thread(config: SimConfig | None = None) -> Iterator[str]:
    """Serve the simulator from a background thread (for synchronous callers); yields its
    base URL and stops it when the block ends."""
    loop = asyncio.new_event_loop()
    sim = Simulator(config)
    thread = threading.Thread(target=loop.run_forever, name="reeldrop-simulator", daemon=True)
    thread.start()
    try:
        yield asyncio.run_coroutine_threadsafe(sim.start(), loop).result(timeout=10)
    finally:
        asyncio.run_coroutine_threadsafe(sim.stop(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


@contextlib.contextmanager
def service_or_simulator(environ: Mapping[str, str] | None = None) -> Iterator[dict[str, Any]]:
    """Generator settings for the examples: the real service when a key is set, else the
    embedded simulator (and a line saying so)."""
    env = os.environ if environ is None else environ
    if env.get("GEMINI_API_KEY") or env.get("GOOGLE_API_KEY"):
        yield {}
        return
    print("No GEMINI_API_KEY set: using the embedded simulator; the videos are test patterns.")
    with running_in_thread(SimConfig(latency_s=1.0, latency_jitter_s=1.0)) as base_url:
        yield {"base_url": base_url, "api_key": "simulator", "poll_initial_s": 0.3,
               "poll_min_s": 0.2, "poll_max_s": 1.0, "submissions_per_minute": 600,
               "submit_burst": 10}
