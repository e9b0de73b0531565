"""The daemon: ``serve()`` is start-up → main loop → shutdown, and ``run()`` wraps it.

Tasks are owned by one TaskGroup: ``concurrency`` workers (jobs at the service), a task per
download (at most ``download_concurrency``), the intake loop (scan → claim → accept → queue),
the watcher pump (hints), the heartbeat (sd_notify) and the saving of what was learned.
Signal handlers only set flags. On the first SIGTERM/SIGINT intake stops; tasks in the middle
of a create call or a download get ``shutdown_grace_s`` to finish it; everything else is
cancelled at once, which is safe because every step is persisted before the next begins. A
second signal skips the grace. SIGHUP (``systemctl reload``) reads the configuration again:
if it holds, the daemon stops the same way and ``restart`` tells the caller to start it again
in the same process (``cli``); if not, it says why and runs on.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from . import blocking, log, watcher
from .config import Config
from .errors import ConfigError
from .intake import Intake, report_archived
from .notify import Notifier
from .polling import LEARNED_FILE, LearnedFile
from .runtime import event_loop_runner, tune_gc
from .scheduler import Lull, SubmitGate
from .sidecar import TERMINAL, Sidecar
from .spool import JobRun, Spool

if TYPE_CHECKING:  # loaded once the intake runs (see Daemon.start_runner)
    from .durable_writes import Settling
    from .runner import Generated, Runner

T = TypeVar("T")

INTAKE_BATCH = 256  # files claimed per thread hop; the queue sees them together
INTAKE_FIRST = 8  # the first hop of a pass is small and the size doubles: work starts at once
DRAIN_S = 10.0  # at shutdown, how long file calls still running may take (a hung disk)


class Daemon:
    def __init__(self, config: Config, notifier: Notifier | None = None,
                 reload_config: Callable[[], Config] | None = None) -> None:
        self.config = config
        self.reload_config = reload_config  # reads the configuration again (None: no reload)
        inbox, outbox = config.require_dirs()
        self.spool = Spool(config.spool, inbox, outbox, config.file_mode, config.dir_mode)
        self.intake = Intake(config, self.spool)
        self.scanner = watcher.InboxScanner(inbox, config.settle_s, config.max_job_bytes)
        self.notifier = notifier or Notifier()
        self.queue: asyncio.Queue[tuple[JobRun, int]] = asyncio.Queue()
        self.lull = Lull(config.delivery_lull_s)
        self.counts = {"done": 0, "failed": 0, "busy": 0}
        self.should_exit = asyncio.Event()
        self.force_exit = asyncio.Event()
        self.reload_asked = asyncio.Event()
        self.restart = False  # once stopped: start again with the configuration just checked
        self.ready = asyncio.Event()
        self.wake = asyncio.Event()
        self.inbox_watch = watcher.InboxWatch(inbox, self.wake, config)
        self.intake_thread = ThreadPoolExecutor(1, thread_name_prefix="reeldrop-intake")
        self.download_slots = asyncio.Semaphore(config.downloads)
        self.delivering: set[asyncio.Task[None]] = set()  # downloads, each in its own task

    def run(self) -> int:
        tune_gc()
        return event_loop_runner(self.config.event_loop)(self.serve())

    async def serve(self) -> int:
        self.install_signal_handlers()
        try:
            recovered = await self.startup()
            async with contextlib.AsyncExitStack() as closing:  # after every task has ended
                async with asyncio.TaskGroup() as tg:
                    self.group = tg
                    heartbeat = tg.create_task(self.notifier.heartbeat(self.summary))
                    helpers = [tg.create_task(self.intake_loop())]  # it starts the watch
                    await self.ready.wait()  # the first pass: files waiting are claimed first
                    self.runner = await self.start_runner(closing)
                    learned = LearnedFile(self.runner.generation.first_look,
                                          self.spool.root / LEARNED_FILE, self.config.file_mode)
                    await asyncio.to_thread(learned.load)
                    workers = [tg.create_task(self.worker())
                               for _ in range(self.config.concurrency)]
                    helpers.append(tg.create_task(learned.keep()))
                    await self.main_loop(recovered)
                    await self.shutdown(workers, helpers)
                    heartbeat.cancel()  # the watchdog heard from us all through the shutdown
                await learned.save()
        finally:
            # A claim batch under way ends; a restart waits for it (exec would cut it short).
            self.intake_thread.shutdown(wait=self.restart, cancel_futures=True)
            self.notifier.close()
        return 0

    async def start_runner(self, closing: contextlib.AsyncExitStack) -> Runner:
        """Load the HTTP side, open the process's one session (closed by ``closing``) and
        build the runner.

        Called once the intake's first pass is done: files that were waiting are claimed
        (safe in the spool, their sidecars "queued") before anything is submitted. Loading
        aiohttp (it builds TLS contexts: 0.2-0.3 s) and 200 first submissions competed with
        those claims for the one interpreter lock: a 10,000-file backlog's first thousand
        claims took three times as long as the next. In a thread, so the loop runs meanwhile.
        """
        await asyncio.to_thread(importlib.import_module, f"{__package__}.runner")
        gc.freeze()  # what it loaded lives as long as the process, too (see runtime.tune_gc)
        from .runner import Runner  # noqa: PLC0415 - loaded just above, off the loop
        from .veo import VeoClient, open_session  # noqa: PLC0415

        session = await closing.enter_async_context(open_session(self.config))
        gate = SubmitGate(self.config.submissions_per_minute, self.config.submit_burst)
        return Runner(self.config, VeoClient(session, self.config), self.spool, gate,
                      self.settled)

    async def startup(self) -> int:
        """Prepare directories, then re-queue what a previous run left claimed."""
        self.spool.prepare()
        runs = await asyncio.to_thread(self.spool.recover)
        for run in runs:
            if run.members:
                await asyncio.to_thread(self.spool.republish, run)
            if not run.members or run.is_batch:  # an array's accept a crash cut short: the rest
                await asyncio.to_thread(self.intake.accept, run)
            self.intake.adopt(run)
            report_archived(run, await asyncio.to_thread(self.spool.archive_if_done, run))
            self.enqueue(run)
        log.get().info("daemon.started", inbox=str(self.spool.inbox),
                       outbox=str(self.spool.outbox), recovered=len(runs),
                       base_url=self.config.base_url, concurrency=self.config.concurrency,
                       event_loop=type(asyncio.get_running_loop()).__module__.split(".")[0])
        return len(runs)

    async def main_loop(self, recovered: int) -> None:
        await self.ready.wait()
        self.notifier.send("READY=1", f"STATUS={self.summary()}")
        log.get().info("daemon.ready", recovered=recovered)
        while not self.should_exit.is_set():
            await _first_set(self.should_exit, self.reload_asked)
            if self.reload_asked.is_set() and not self.should_exit.is_set():
                self.reload_asked.clear()
                await self.check_reload()

    async def check_reload(self) -> None:
        """SIGHUP: read the configuration again. If it holds, stop as for SIGTERM and have
        the caller start again (``restart``): every setting takes effect, and the jobs in
        flight resume as after any restart, polled and never paid twice. If it does not,
        say why and run on with the current one."""
        assert self.reload_config is not None
        try:
            (await asyncio.to_thread(self.reload_config)).require_dirs()  # as at start
        except (ConfigError, OSError) as e:
            log.get().error("daemon.reload_failed", error=str(e))
            return
        log.get().info("daemon.reloading", in_flight=self.counts["busy"])
        # Not STOPPING=1: systemd would take that for the service going away.
        self.notifier.send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
        self.restart = True
        self.should_exit.set()

    async def shutdown(self, workers: list[asyncio.Task[None]],
                       helpers: list[asyncio.Task[None]]) -> None:
        if not self.restart:
            self.notifier.send("STOPPING=1")
        self.inbox_watch.stop(cancel=True)
        for task in helpers:
            task.cancel()
        critical = self.runner.critical
        deadline = time.monotonic() + self.config.shutdown_grace_s
        while critical and time.monotonic() < deadline and not self.force_exit.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.05):
                    await self.force_exit.wait()
        interrupted = len(critical)
        in_flight = self.counts["busy"]  # left claimed for the next start
        for task in [*workers, *self.delivering]:
            task.cancel()
        if self.runner.settling:  # final writes already started: let them land
            await asyncio.wait(list(self.runner.settling), timeout=10)
        try:  # and any other file call a cancelled task left running (a hung disk: give up)
            await asyncio.wait_for(blocking.drain(), DRAIN_S)
        except TimeoutError:
            log.get().error("daemon.file_calls_unfinished", waited_s=DRAIN_S)
        log.get().info("daemon.stopped", in_flight=in_flight,
                       interrupted=interrupted, queued=self.queue.qsize(),
                       done=self.counts["done"], failed=self.counts["failed"])

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.handle_exit, sig)
        if self.reload_config is not None:
            loop.add_signal_handler(signal.SIGHUP, self.reload_asked.set)

    def handle_exit(self, sig: signal.Signals) -> None:
        if self.should_exit.is_set():
            self.force_exit.set()
        self.should_exit.set()
        self.restart = False  # a stop asked for during a reload's shutdown wins

    def enqueue(self, run: JobRun) -> None:
        for member in run.members:
            if member.state not in TERMINAL:
                self.queue.put_nowait((run, member.index))

    def settled(self, member: Sidecar) -> None:
        """A member's final write landed (on the loop, once per member; its ``job.finished``
        line says where the job was archived)."""
        self.counts["done" if member.state == "succeeded" else "failed"] += 1
        self.intake.release(member)

    async def worker(self) -> None:
        """One generation slot: a member from its submission until its operation is done.

        A done member waits here for a download slot (so downloads cannot pile up behind a
        slow link), then its download goes on in a task of its own and the slot takes the
        next member (see ``deliver``).

        A failed member's final write lands while the slot takes the next one, but never
        more than one is left behind (awaited shielded: it completes).
        """
        writing: Settling | None = None
        while True:
            run, index = await self.queue.get()
            self.lull.took()
            if self.queue.qsize() < self.config.queue_max // 2:
                self.wake.set()  # intake may have paused at queue_max
            self.counts["busy"] += 1
            handed_off = False
            try:
                with log.job_context(job_id=run.job_id, source=run.source,
                                     output=run.members[index - 1].output):
                    outcome = await self.runner.generate(run, index)
                    if not isinstance(outcome, asyncio.Future):  # generated: download next
                        await self.download_slots.acquire()
                        self.delivering.add(self.group.create_task(self.deliver(run, outcome)))
                        handed_off = True
                        continue
            except Exception:  # noqa: BLE001 - one job's trouble must not stop the worker
                log.get().exception("worker.job_error", job_id=run.job_id, index=index)
                continue
            finally:
                if not handed_off:
                    self.counts["busy"] -= 1
            if writing is not None:
                await asyncio.shield(writing)
            writing = outcome

    async def deliver(self, run: JobRun, generated: Generated) -> None:
        """A member's download and final write, in its own task (holding a download slot).

        While jobs are queued it first waits for a lull in the workers' taking of jobs (for
        at most ``delivery_defer_max_s``): when a round of jobs finishes together the loop is
        saturated, and the round's create calls start the service's clock, a download only
        ends a job (``Lull``)."""
        try:
            if not self.queue.empty():
                await self.lull.wait(self.config.delivery_defer_max_s)
            await asyncio.shield(await self.runner.deliver(run, generated))
        except Exception:  # noqa: BLE001 - one job's trouble must not stop the daemon
            log.get().exception("worker.job_error", job_id=run.job_id, index=generated.member.index)
        finally:
            self.download_slots.release()
            self.counts["busy"] -= 1
            self.delivering.discard(asyncio.current_task())

    async def intake_loop(self) -> None:
        while True:
            self.wake.clear()
            scan = await self.in_intake_thread(self.scanner.scan)
            room = self.config.queue_max - self.queue.qsize()
            ready = scan.ready[:max(0, room)]
            if len(ready) >= INTAKE_BATCH:
                self.inbox_watch.stop()  # back after the pass (see watcher.InboxWatch)
            start, size = 0, INTAKE_FIRST
            syncing: asyncio.Task[None] | None = None  # the last big batch, until durable
            try:
                while start < len(ready) and not self.should_exit.is_set():
                    taken = await self.in_intake_thread(
                        self.intake.take, ready[start:start + size])
                    self.counts["failed"] += taken.invalid
                    if syncing is not None:
                        await syncing
                    syncing = self._queue_when_durable(taken.runs, taken.durable)
                    start, size = start + size, min(size * 2, INTAKE_BATCH)
                if syncing is not None:
                    await syncing
            finally:
                if syncing is not None:
                    syncing.cancel()  # shutdown: its jobs are claimed; a restart takes them
            self.ready.set()
            if not self.inbox_watch.on and not self.should_exit.is_set():
                self.inbox_watch.start(self.group)  # the first pass's end, or a big one's
                # Look again for files that landed unwatched; unless queue_max held files
                # back: the next look comes with room for them (an inbox of 100,000 files
                # would be read twice a refill).
                if len(ready) == len(scan.ready):
                    await asyncio.sleep(watcher.WATCH_SETUP_S)
                    continue
            # Not asyncio.wait_for: on 3.11 it swallows a cancellation that lands as the wake-up
            # does, and the loop would outlive shutdown (the daemon hung on SIGTERM).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(scan.next_check_s or self.config.rescan_s):
                    await self.wake.wait()

    def _queue_when_durable(self, runs: list[JobRun], durable: bool) -> asyncio.Task[None] | None:
        """Queue a batch's jobs once their claims are durable. A big batch's filesystem sync
        runs in the pool while the intake thread claims the next batch (on a busy disk the
        syncs were an eighth of a 10,000-file backlog's time)."""
        if durable or not runs:
            for run in runs:
                self.enqueue(run)
            return None

        async def sync_then_queue() -> None:
            try:
                await asyncio.to_thread(self.spool.sync)
            except OSError as e:  # the claims are made; only a power cut could undo them
                log.get().error("spool.sync_failed", error=e.strerror, jobs=len(runs))
            for run in runs:
                self.enqueue(run)

        return asyncio.create_task(sync_then_queue())

    async def in_intake_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Intake's blocking work runs on its own thread, not in the shared pool, where it
        would queue behind the state writes of the jobs it has just started."""
        return await asyncio.get_running_loop().run_in_executor(self.intake_thread, fn, *args)

    def summary(self) -> str:
        c = self.counts
        return (f"{c['busy']} in flight, {self.queue.qsize()} queued, "
                f"{c['done']} done, {c['failed']} failed")


async def _first_set(*events: asyncio.Event) -> None:
    """Wait until any of ``events`` is set."""
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
