"""Level 1: one video, one blocking call.

    uv run python examples/basic_example.py

Uses GEMINI_API_KEY if set; otherwise the embedded simulator (it says so).
"""

from reeldrop import generate_video
from reeldrop.simulator_hosting import service_or_simulator

with service_or_simulator() as settings:
    path = generate_video(
        "A red fox trotting through fresh snow in a birch forest, soft winter light",
        "fox.mp4",
        aspect_ratio="16:9",
        **settings,
    )
    print(f"saved {path} ({path.stat().st_size:,} bytes)")
