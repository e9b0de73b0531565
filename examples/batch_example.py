"""Level 3: a batch with a concurrency limit, and its summary.

    uv run python examples/batch_example.py
"""

import asyncio

from reeldrop import generate_videos_batch
from reeldrop.simulator_hosting import service_or_simulator

PROMPTS = [
    "A paper boat drifting down a rain-soaked street, low angle",
    "Time-lapse of clouds racing over a mountain ridge at sunset",
    "A hummingbird hovering at a red flower, slow motion",
    "Neon signs reflected in a puddle as a bicycle rides through",
]

with service_or_simulator() as settings:
    result = asyncio.run(
        generate_videos_batch(PROMPTS, concurrent_limit=2, output_dir="batch_videos", **settings)
    )
    print(f"{result.successful} of {result.total} succeeded ({result.success_rate:.0%})")
    for prompt, response in zip(PROMPTS, result.results, strict=True):
        outcome = response.video_path if response.success else f"FAILED: {response.error}"
        print(f"  {prompt[:40]:40}  {outcome}")
