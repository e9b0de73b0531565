"""Blocking file work off the event loop, with cheap hops.

Every state change of every job is a few small file calls (append a record line, replace a
sidecar), each run in a thread so that a stalled disk never stalls the loop. Through
``asyncio.to_thread`` such a hop cost 60-180 µs of CPU, more than the file calls themselves:
a ``concurrent.futures.Future`` with its locks, a thread wake-up, and a wake-up of the loop
through its self-pipe for every call. Here a call is a plain asyncio future on a
``SimpleQueue``, and results reach the loop in batches: a worker wakes the loop only if no
wake-up is pending, so under load one wake-up delivers many results (about 5 µs a hop).

Semantics match ``asyncio.to_thread``: the call runs in the caller's context (log fields
follow), and cancelling the awaiting task does not stop a call already started. The workers
(``MAX_THREADS``, so fsyncs on a slow disk still overlap) are shared by every event loop and
leave after ``IDLE_S`` without work. ``drain()`` waits until a loop's calls have all finished:
the daemon does so before it exits, since the workers do not hold the process open.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import queue
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

MAX_THREADS = 6  # as asyncio's default executor on two cores: min(32, cores + 4)
IDLE_S = 10.0

_Call = tuple["_Results", asyncio.Future[Any], contextvars.Context, Callable[..., Any],
              tuple[Any, ...]]


class _Results:
    """One loop's finished calls, handed over in batches."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = weakref.ref(loop)  # weak: this is the value of a weak-keyed map by loop
        self.lock = threading.Lock()
        self.done: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        self.wake_pending = False
        self.running = 0  # calls submitted and not yet delivered (loop side only)
        self.drained: asyncio.Future[None] | None = None  # set when running falls to 0

    def add(self, future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
        """From a worker: queue one result; wake the loop unless a wake-up is pending."""
        with self.lock:
            self.done.append((future, result, error))
            if self.wake_pending:
                return
            self.wake_pending = True
        loop = self.loop()
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
                loop.call_soon_threadsafe(self.deliver)

    def deliver(self) -> None:
        with self.lock:
            batch, self.done, self.wake_pending = self.done, [], False
        for future, result, error in batch:
            if not future.cancelled():
                if error is None:
                    future.set_result(result)
                else:
                    future.set_exception(error)
        self.running -= len(batch)
        if self.running == 0 and self.drained is not None and not self.drained.done():
            self.drained.set_result(None)


class _Workers:
    """Up to ``MAX_THREADS`` threads on one queue.

    ``idle`` is the number of threads waiting (or about to wait) for a call, less the calls
    queued: below zero, calls wait for a busy thread. A thread leaves only while the queue is
    empty, and calls are queued under the same lock, so no call is left without a thread.
    """

    def __init__(self) -> None:
        self.calls: queue.SimpleQueue[_Call] = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.threads = 0
        self.idle = 0

    def submit(self, call: _Call) -> None:
        with self.lock:
            if self.idle > 0 or self.threads >= MAX_THREADS:
                self.idle -= 1
                self.calls.put(call)
                return
            self.threads += 1
        # In a list the thread empties: a Thread keeps its args until it ends.
        threading.Thread(target=self._work, args=([call],), name="reeldrop-blocking",
                         daemon=True).start()

    def _work(self, first: list[_Call]) -> None:
        call = first.pop()
        while True:
            results, future, context, fn, args = call
            try:
                results.add(future, context.run(fn, *args), None)
            except BaseException as e:  # noqa: BLE001 - handed to the awaiting task
                results.add(future, None, e)
            del call, results, future, context, fn, args  # hold no references while idle
            with self.lock:
                self.idle += 1
            while True:
                try:
                    call = self.calls.get(timeout=IDLE_S)
                    break
                except queue.Empty:
                    with self.lock:
                        if self.calls.empty():
                            self.idle -= 1
                            self.threads -= 1
                            return


_workers = _Workers()
_results: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Results] = (
    weakref.WeakKeyDictionary())


def _results_of(loop: asyncio.AbstractEventLoop) -> _Results:
    results = _results.get(loop)
    if results is None:
        results = _results[loop] = _Results(loop)
    return results


def run(fn: Callable[..., T], /, *args: Any) -> asyncio.Future[T]:
    """Run ``fn(*args)`` in a worker thread; a future of its result (await it)."""
    loop = asyncio.get_running_loop()
    results = _results_of(loop)
    future: asyncio.Future[T] = loop.create_future()
    results.running += 1
    _workers.submit((results, future, contextvars.copy_context(), fn, args))
    return future


def seen(future: asyncio.Future[Any]) -> None:
    """Mark a call's error as seen, where it is reported another way (asyncio would log
    "exception was never retrieved" for a call nobody awaits to the end)."""
    if not future.cancelled():
        future.exception()


async def drain() -> None:
    """Wait until every call this loop started has finished (the results are delivered),
    and every call started meanwhile: a call's result may start the next (``DurableWrites``
    starts its next group as one lands, before this wakes up)."""
    loop = asyncio.get_running_loop()
    results = _results_of(loop)
    while results.running:
        if results.drained is None or results.drained.done():
            results.drained = loop.create_future()
        await asyncio.shield(results.drained)
