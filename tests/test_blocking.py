"""The worker threads for blocking file calls: results, errors and context come back, calls
overlap, none is ever left without a thread, drain() waits for abandoned ones, and a closed
loop is not kept alive."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import threading
import time
import weakref
from pathlib import Path

import pytest
import structlog

from reeldrop import blocking
from reeldrop import daemon as daemon_mod
from reeldrop.simulator import Simulator

from .support import make_config, running

JOB = contextvars.ContextVar("job", default="none")


def _boom() -> None:
    raise PermissionError("denied")


async def test_results_errors_and_the_callers_context_come_back() -> None:
    """A call returns its value, raises its own exception in the caller, and sees the
    caller's context variables (log fields follow a job into its file calls)."""
    JOB.set("job-7")
    assert await blocking.run(lambda a, b: a + b, 2, 3) == 5
    with pytest.raises(PermissionError, match="denied"):
        await blocking.run(_boom)
    assert await blocking.run(JOB.get) == "job-7"


async def test_calls_overlap_and_more_calls_than_threads_all_finish() -> None:
    """MAX_THREADS calls run at the same time (each waits until all have started, as fsyncs on
    a slow disk would overlap); calls beyond that wait for a thread and all finish."""
    started = threading.Barrier(blocking.MAX_THREADS, timeout=5)
    together = [blocking.run(started.wait) for _ in range(blocking.MAX_THREADS)]
    later = [blocking.run(lambda i=i: i * i) for i in range(50)]
    await asyncio.wait_for(asyncio.gather(*together), 10)
    assert await asyncio.wait_for(asyncio.gather(*later), 10) == [i * i for i in range(50)]


async def test_threads_leave_when_idle_and_calls_after_that_still_run(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """After a burst larger than the pool (calls queued for busy threads), every thread leaves
    once idle; the next calls start new threads instead of waiting on a queue nobody reads."""
    monkeypatch.setattr(blocking, "IDLE_S", 0.05)
    gate = threading.Event()
    burst = [blocking.run(gate.wait, 5) for _ in range(3 * blocking.MAX_THREADS)]
    await asyncio.sleep(0.1)
    gate.set()
    await asyncio.wait_for(asyncio.gather(*burst), 10)
    for _ in range(100):
        if blocking._workers.threads == 0:
            break
        await asyncio.sleep(0.05)
    assert blocking._workers.threads == 0
    for i in range(3):  # one at a time: no later call may rescue an earlier one
        assert await asyncio.wait_for(blocking.run(abs, -i), 5) == i


async def test_drain_waits_for_a_call_whose_caller_was_cancelled() -> None:
    """Cancelling the awaiting task does not stop a call already running (as with
    asyncio.to_thread); drain() returns only once it has finished."""
    gate, finished = threading.Event(), threading.Event()

    def slow() -> None:
        gate.wait(5)
        finished.set()

    task = asyncio.ensure_future(blocking.run(slow))
    await asyncio.sleep(0.05)
    task.cancel()
    draining = [asyncio.create_task(blocking.drain()) for _ in range(2)]
    await asyncio.sleep(0.1)
    assert not any(d.done() for d in draining)
    gate.set()
    await asyncio.wait_for(asyncio.gather(*draining), 5)
    assert finished.is_set()


async def test_drain_waits_for_a_call_started_as_another_lands() -> None:
    """A call started by a finished call's callback (the durable writes start their next
    group so) is waited for too: drain() returns only once nothing runs."""
    finished: list[int] = []

    def slow(tag: int) -> None:
        time.sleep(0.05)
        finished.append(tag)

    blocking.run(slow, 1).add_done_callback(lambda _: blocking.run(slow, 2))
    await asyncio.wait_for(blocking.drain(), 5)
    assert finished == [1, 2]


def test_a_closed_loop_is_not_kept_alive() -> None:
    """The workers are shared by every loop; one that has run calls and closed is freed (the
    test suite alone starts hundreds of loops)."""
    loop = asyncio.new_event_loop()

    async def calls() -> None:
        await asyncio.gather(*(blocking.run(abs, -i) for i in range(10)))

    loop.run_until_complete(calls())
    loop.close()
    ref = weakref.ref(loop)
    del loop
    gc.collect()
    assert ref() is None


async def test_shutdown_waits_for_file_calls_but_not_forever_on_a_hung_disk(
        tmp_path: Path, sim: Simulator, monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon lets file calls still running finish before it exits; one that hangs (a
    dead network disk) holds the exit up for DRAIN_S at most, with an error in the log."""
    monkeypatch.setattr(daemon_mod, "DRAIN_S", 0.3)
    hung = threading.Event()
    config = make_config(tmp_path, sim.base_url)
    with structlog.testing.capture_logs() as logs:
        async with running(config):
            stuck = blocking.run(hung.wait, 10)
            stopping = time.monotonic()
        waited = time.monotonic() - stopping
    hung.set()
    await asyncio.wait_for(stuck, 5)
    assert 0.3 <= waited < 3, waited
    assert [e for e in logs if e["event"] == "daemon.file_calls_unfinished"]
