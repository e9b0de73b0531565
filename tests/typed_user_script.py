"""A user's script, type-checked with mypy --strict by test_library (never run by pytest)."""

import asyncio
from pathlib import Path

from reeldrop import (
    APIError,
    BatchResult,
    GenerationTimeout,
    VeoVideoGenerator,
    VideoRequest,
    VideoResponse,
    generate_video,
    generate_videos_batch,
)
from video_generation import generate_video as legacy_generate_video


async def main() -> None:
    async with VeoVideoGenerator(api_key="k", base_url="http://127.0.0.1:1/v1beta") as gen:
        response: VideoResponse = await gen.generate_video_async(
            VideoRequest(prompt="p", aspect_ratio="9:16"), Path("x.mp4"))
        size: float | None = response.file_size_mb
        ok: bool = response.is_success
        print(size, ok, response.error_details)
    batch: BatchResult = await generate_videos_batch(["a", "b"], concurrent_limit=2)
    rate: float = batch.success_rate
    print(rate, batch.results[0].video_path)


def sync() -> Path:
    try:
        return generate_video("p", "y.mp4", aspect_ratio="16:9")
    except APIError as e:
        status: int | None = e.status
        print(status, e.retryable)
    except GenerationTimeout:
        pass
    return legacy_generate_video("p")


asyncio.run(main())
