"""Fixtures: the embedded simulator on a real loopback port; a clean subprocess environment.

Nothing here mocks aiohttp or the filesystem: the simulator is a real HTTP server, the inbox
and outbox are real directories under ``tmp_path``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import structlog

from reeldrop import log
from reeldrop.simulator import SimConfig, Simulator

from .support import TEST_KEY


@pytest.fixture
def sim_config() -> SimConfig:
    return SimConfig(latency_s=0.2, latency_jitter_s=0.1, seed=1, api_key=TEST_KEY)


@pytest.fixture
async def sim(sim_config: SimConfig) -> AsyncIterator[Simulator]:
    simulator = Simulator(sim_config)
    await simulator.start()
    yield simulator
    await simulator.stop()


@pytest.fixture
def daemon_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """Environment for a daemon subprocess: no inherited keys or REELDROP_ settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("REELDROP_", "GEMINI_", "GOOGLE_", "NOTIFY_", "WATCHDOG_"))}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONFAULTHANDLER"] = "1"  # a hung daemon dumps its stacks when wait_exit aborts it
    yield env


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Leave structlog and the root logger as the test found them."""
    config, handlers = structlog.get_config(), logging.getLogger().handlers[:]
    configured = log._configured
    yield
    structlog.configure(**config)
    logging.getLogger().handlers[:] = handlers
    log._configured = configured
