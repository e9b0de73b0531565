"""Level 2: the async generator, one pooled session, and everything the response tells you.

    uv run python examples/async_example.py
"""

import asyncio

from reeldrop import VeoVideoGenerator, VideoRequest
from reeldrop.simulator_hosting import service_or_simulator


async def main(settings: dict[str, object]) -> None:
    request = VideoRequest(
        prompt="Close-up of coffee poured into a ceramic cup, morning light",
        aspect_ratio="9:16",
        duration_seconds=6,
        negative_prompt="text, watermark",
    )
    async with VeoVideoGenerator(**settings) as gen:
        response = await gen.generate_video_async(
            request, "coffee.mp4",
            on_operation=lambda name: print(f"submitted: {name}"),
            on_poll=lambda elapsed: print(f"  still generating after {elapsed:.0f} s"),
        )
    if response.success:
        print(f"video:      {response.video_path}")
        print(f"size:       {response.file_size_mb:.2f} MB")
        print(f"took:       {response.generation_time:.1f} s")
        print(f"operation:  {response.operation}")
        print(f"video URI:  {response.video_uri}")
    else:
        print(f"failed: {response.error} ({response.error_details})")


with service_or_simulator() as settings:
    asyncio.run(main(settings))
