"""Terminal output for the interactive commands (generate, status --watch), with rich.

Only these commands import this module, so ``reeldrop run`` never loads rich. On a terminal
the user gets live bars; otherwise one plain line per event, for logs and pipes.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

from rich.console import Console, RenderableType
from rich.live import Live
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

__all__ = [
    "GenerateProgress", "Table", "generate_in_foreground", "print_table", "status_table", "watch",
]

from .config import Config
from .jobs import VideoRequest
from .library import VeoVideoGenerator, VideoResponse
from .sidecar import Sidecar


class GenerateProgress:
    """A generation bar (elapsed time; the service reports no percentage, so the bar only
    fills against the model's typical time, labelled as an estimate) and a download bar."""

    def __init__(self, typical_s: float, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        # Bars only when stdout is a terminal: piped or redirected runs get plain lines.
        self.tty = sys.stdout.isatty() and self.console.is_terminal
        self.typical_s = typical_s
        self.started = time.monotonic()
        self.progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
            TimeElapsedColumn(), TextColumn("{task.fields[note]}"),
            console=self.console, transient=False)
        self.download = Progress(
            TextColumn("downloading"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
            TimeRemainingColumn(), console=self.console)
        self._gen: TaskID | None = None
        self._dl: TaskID | None = None

    def __enter__(self) -> GenerateProgress:
        if self.tty:
            self.progress.start()
            self._gen = self.progress.add_task(
                "generating", total=self.typical_s,
                note=f"(bar: typical {self.typical_s:.0f} s, an estimate)")
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._gen is not None:
            self.progress.stop()
        if self._dl is not None:
            self.download.stop()

    def submitted(self, operation: str) -> None:
        self._line(f"submitted: {operation}")

    def polled(self, elapsed_s: float) -> None:
        if self._gen is not None:
            self.progress.update(self._gen, completed=min(elapsed_s, self.typical_s * 0.99))
        else:
            self._line(f"generating: {elapsed_s:.0f} s elapsed")

    def downloading(self, done: int, total: int | None) -> None:
        if not self.tty:
            if done == total or total is None:
                self._line(f"downloaded {done} bytes")
            return
        if self._dl is None:
            if self._gen is not None:
                self.progress.update(self._gen, completed=self.typical_s, note="done")
            self.download.start()
            self._dl = self.download.add_task("download", total=total)
        self.download.update(self._dl, completed=done, total=total)

    def _line(self, text: str) -> None:
        stamp = f"{time.monotonic() - self.started:6.1f}s"
        if self.tty:
            self.progress.console.print(f"[dim]{stamp}[/dim] {text}")
        else:
            print(f"{stamp} {text}", file=sys.stderr, flush=True)  # stdout is for the result


def _age(stamp: str) -> str:
    seconds = (datetime.now(UTC) - datetime.fromisoformat(stamp)).total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def status_table(docs: list[Sidecar], tally: dict[str, int]) -> Table:
    table = Table(title=" · ".join(f"{n} {s}" for s, n in tally.items() if n) or "no jobs",
                  title_justify="left")
    for column in ("name", "state", "age", "attempts", "video", "error"):
        table.add_column(column, overflow="fold")
    colours = {"succeeded": "green", "failed": "red", "downloading": "cyan"}
    for d in docs:
        state = Text(d.state, style=colours.get(d.state, "yellow"))
        video: RenderableType = d.videos[0].file if d.videos else ""
        if d.state == "downloading" and d.bytes_total:
            video = ProgressBar(total=d.bytes_total, completed=d.bytes_done or 0, width=20)
        table.add_row(d.output, state, _age(d.created_at), str(d.attempts), video,
                      d.error.message if d.error else "")
    return table


def watch(render: Callable[[], RenderableType], interval_s: float = 1.0) -> None:
    """Redraw ``render()`` until Ctrl-C."""
    with Live(render(), console=Console(), refresh_per_second=4) as live:
        try:
            while True:
                time.sleep(interval_s)
                live.update(render())
        except KeyboardInterrupt:
            pass


def print_table(table: Table) -> None:
    Console(file=sys.stdout).print(table)


def generate_in_foreground(config: Config, request: VideoRequest, output: Path | None) -> int:
    """`reeldrop generate`: one video with progress; the exit code. Ctrl-C stops waiting and
    names the operation, which keeps running on the service."""
    caps = config.model_caps().get(request.model or config.model)
    operation: list[str] = []

    async def go(progress: GenerateProgress) -> VideoResponse:
        def started(name: str) -> None:
            operation.append(name)
            progress.submitted(name)

        async with VeoVideoGenerator(config=config) as gen:
            return await gen.generate_video_async(
                request, output, on_operation=started, on_poll=progress.polled,
                on_download=progress.downloading)

    try:
        with GenerateProgress(caps.typical_s if caps else 60.0) as progress:
            response = asyncio.run(go(progress))
    except KeyboardInterrupt:
        where = f" as {operation[0]}" if operation else ""
        print(f"reeldrop: stopped waiting; the video may still be generated on the "
              f"service{where} (kept there for 2 days).", file=sys.stderr)
        return 130
    if not response.success:
        print(f"reeldrop: {response.error}", file=sys.stderr)
        return 1
    print(response.video_path)
    return 0
