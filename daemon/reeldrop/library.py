"""The library API: video generation from your own Python code, on the daemon's own core.

One :class:`VeoVideoGenerator` holds one pooled HTTP session; requests are validated by the
same schema as a ``.json`` job; creating, polling and downloading go through the same
``Generation`` steps, retry policy and submission gate as the daemon.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp

from . import blocking, jobs
from .config import Config, load
from .errors import ErrorInfo, ReeldropError
from .generation import Generation
from .jobs import VideoRequest
from .polling import kind_of
from .scheduler import SubmitGate
from .veo import VeoClient, open_session
from .writer import Progress

PromptOrRequest = str | VideoRequest


@dataclass(frozen=True)
class VideoResponse:
    """The outcome of one generation.

    >>> response = await gen.generate_video_async("A fox in the snow")
    >>> if response.success: print(response.video_path, response.file_size_mb)
    ... else: print(response.error)
    """

    success: bool
    video_path: Path | None = None
    file_size_mb: float | None = None
    generation_time: float | None = None  # seconds, from submission to the video on disk
    video_uri: str | None = None
    operation: str | None = None
    error: str | None = None
    error_details: ErrorInfo | None = None
    exception: ReeldropError | None = field(default=None, repr=False, compare=False)

    @property
    def is_success(self) -> bool:
        return self.success

    def raise_for_error(self) -> Path:
        """The video's path, or the typed error that stopped it."""
        if self.exception is not None:
            raise self.exception
        assert self.video_path is not None
        return self.video_path


@dataclass(frozen=True)
class BatchResult:
    """Outcomes of a batch, in input order.

    >>> result = await generate_videos_batch(["a cat", "a dog"], concurrent_limit=2)
    >>> print(f"{result.successful}/{result.total} ({result.success_rate:.0%})")
    """

    results: list[VideoResponse]

    @property
    def total(self) -> int:
        return len(self.results)

    @property
    def successful(self) -> int:
        return sum(r.success for r in self.results)

    @property
    def failed(self) -> int:
        return self.total - self.successful

    @property
    def success_rate(self) -> float:
        return self.successful / self.total if self.total else 0.0


def _config(api_key: str | None, base_url: str | None, model: str | None,
            settings: dict[str, Any]) -> Config:
    flags = {"api_key": api_key, "base_url": base_url, "model": model, **settings}
    return load(flags={k: v for k, v in flags.items() if v is not None})


class VeoVideoGenerator:
    """Generate videos with Veo; use as ``async with`` so one pooled session serves the block.

    >>> async with VeoVideoGenerator(api_key="...") as gen:
    ...     response = await gen.generate_video_async("A lighthouse at dusk", "light.mp4")

    ``api_key`` defaults to ``GEMINI_API_KEY``; ``base_url`` to the Gemini API (or a proxy's
    ``…/v1beta``); ``model`` to ``veo-3.1-generate-preview``. Any other setting of the daemon
    (``poll_max_s``, ``create_tries``, …) can be passed by name.
    """

    def __init__(self, api_key: str | None = None, base_url: str | None = None,
                 model: str | None = None, *, config: Config | None = None,
                 **settings: Any) -> None:
        self.config = config or _config(api_key, base_url, model, settings)
        self._session: aiohttp.ClientSession | None = None
        self._generation: Generation | None = None

    async def __aenter__(self) -> VeoVideoGenerator:
        self._session = open_session(self.config)
        gate = SubmitGate(self.config.submissions_per_minute, self.config.submit_burst)
        self._generation = Generation(VeoClient(self._session, self.config), gate, self.config)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._session is not None:
            await self._session.close()
        self._session = self._generation = None
        await blocking.drain()  # a cancelled download's last file call lands before we return

    def request(self, prompt_or_request: PromptOrRequest, output: str | None = None) -> jobs.Member:
        """Validate like a ``.json`` job (raises InvalidJob) and resolve the defaults."""
        req = (VideoRequest(prompt=prompt_or_request) if isinstance(prompt_or_request, str)
               else prompt_or_request)
        return jobs.resolve(req, self.config, default_output=output or "video")

    async def generate_video_async(
        self,
        prompt_or_request: PromptOrRequest,
        output_path: str | Path | None = None,
        *,
        on_operation: Callable[[str], None] | None = None,
        on_poll: Callable[[float], None] | None = None,
        on_download: Progress | None = None,
    ) -> VideoResponse:
        """Generate one video and save it; failures come back in the response, typed.

        ``output_path`` defaults to ``OUTPUT.mp4`` in the current directory, where OUTPUT is
        the request's ``output`` or ``video-<time>``. The callbacks report progress (the
        service gives no percentage, only "still running").
        """
        if self._generation is None:
            raise RuntimeError("use VeoVideoGenerator inside 'async with'")
        started = time.monotonic()
        operation: str | None = None
        uri: str | None = None
        try:
            member = self.request(prompt_or_request, output=f"video-{time.strftime('%H%M%S')}")
            path = Path(output_path) if output_path else Path.cwd() / f"{member.output}.mp4"
            operation = await self._generation.create(member)
            if on_operation is not None:
                on_operation(operation)
            uris = await self._generation.wait(
                operation, on_poll=on_poll, kind=kind_of(member.model, member.parameters))
            uri = uris[0]
            partial = path.with_name(f".{path.name}.part")
            video = await self._generation.download(uri, partial, path, progress=on_download)
        except ReeldropError as e:
            return VideoResponse(success=False, operation=operation, video_uri=uri,
                                 generation_time=time.monotonic() - started, error=e.message,
                                 error_details=e.info(), exception=e)
        return VideoResponse(success=True, video_path=path, file_size_mb=video.bytes / 1e6,
                             generation_time=time.monotonic() - started, video_uri=uri,
                             operation=operation)


async def generate_videos_batch(
    prompts_or_requests: Sequence[PromptOrRequest],
    concurrent_limit: int = 5,
    output_dir: str | Path = "videos",
    **generator_options: Any,
) -> BatchResult:
    """Generate many videos, at most ``concurrent_limit`` at once; one failure never stops the
    rest. Files are ``OUTPUT_DIR/video-001.mp4``, … (or each request's ``output``).

    >>> result = await generate_videos_batch(["a cat", "a dog"], concurrent_limit=2)
    """
    out = Path(output_dir)
    await asyncio.to_thread(out.mkdir, parents=True, exist_ok=True)
    limit = asyncio.Semaphore(concurrent_limit)
    settings = {"concurrency": concurrent_limit, **generator_options}
    async with VeoVideoGenerator(**settings) as gen:

        async def one(i: int, item: PromptOrRequest) -> VideoResponse:
            name = item.output if isinstance(item, VideoRequest) and item.output else None
            async with limit:
                try:
                    stem = jobs.check_output_name(name) if name else f"video-{i:03d}"
                except ReeldropError as e:
                    return VideoResponse(success=False, error=e.message, error_details=e.info(),
                                         exception=e)
                return await gen.generate_video_async(item, out / f"{stem}.mp4")

        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(one(i, item)) for i, item in enumerate(prompts_or_requests, 1)]
    return BatchResult(results=[t.result() for t in tasks])


def generate_video(prompt: str, output_path: str | Path | None = None, **options: Any) -> Path:
    """Generate one video, blocking; returns its path or raises the typed error.

    >>> path = generate_video("A red fox in fresh snow", "fox.mp4", aspect_ratio="9:16")

    ``options`` are job fields (``aspect_ratio``, ``resolution``, ``duration_seconds``,
    ``negative_prompt``, …) and generator settings (``api_key``, ``base_url``, ``model``, …).
    """
    job_fields = {k: options.pop(k) for k in list(options) if k in _JOB_FIELDS}

    async def run() -> VideoResponse:
        async with VeoVideoGenerator(**options) as gen:
            return await gen.generate_video_async(VideoRequest(prompt=prompt, **job_fields),
                                                  output_path)

    return asyncio.run(run()).raise_for_error()


_JOB_FIELDS = {"negative_prompt", "aspect_ratio", "resolution", "duration_seconds",
               "person_generation", "enhance_prompt", "metadata"}

__all__ = ["BatchResult", "VeoVideoGenerator", "VideoResponse", "generate_video",
           "generate_videos_batch"]
