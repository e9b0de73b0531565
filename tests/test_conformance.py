"""The simulator speaks the real protocol: the official SDK drives it end to end.

google-genai 2.34.0 is the last release that runs Veo over the Gemini API; if the simulator
drifted from the wire format (a 201 on create, an http:// video URI, a missing redirect, an
unchecked key), this SDK would fail here the way it would against a wrong fake.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from reeldrop.simulator import Simulator

from .support import TEST_KEY, playable_frames

genai = pytest.importorskip("google.genai", reason="google-genai is in the dev group")
types = pytest.importorskip("google.genai.types")


def _sdk_round_trip(root_url: str, tmp: str) -> tuple[str, int]:
    client = genai.Client(api_key=TEST_KEY, http_options=types.HttpOptions(base_url=root_url))
    op = client.models.generate_videos(
        model="veo-3.1-generate-preview",
        source=types.GenerateVideosSource(prompt="A lighthouse at dusk"),
        config=types.GenerateVideosConfig(aspect_ratio="9:16", number_of_videos=1,
                                          duration_seconds=8, resolution="1080p"),
    )
    name = op.name
    # Resume from the name alone, as a restarted process would.
    op = types.GenerateVideosOperation(name=name)
    deadline = time.monotonic() + 20
    while not op.done and time.monotonic() < deadline:
        time.sleep(0.05)
        op = client.operations.get(op)
    video = op.response.generated_videos[0].video
    data = client.files.download(file=video)
    path = f"{tmp}/sdk.mp4"
    with open(path, "wb") as f:
        f.write(data)
    return name, len(data)


async def test_the_official_sdk_generates_polls_and_downloads(
        sim: Simulator, tmp_path: Path) -> None:
    """google-genai 2.34.0 creates, polls (resuming from a name) and downloads a playable MP4."""
    root = sim.base_url.removesuffix("v1beta")
    name, size = await asyncio.to_thread(_sdk_round_trip, root, str(tmp_path))
    assert name.startswith("models/veo-3.1-generate-preview/operations/")
    assert size > 1000
    assert playable_frames(tmp_path / "sdk.mp4") > 0
    assert sim.stats["submissions"] == 1
    assert sim.stats["downloads"] == 1


async def test_the_sdk_sees_the_simulators_errors_as_the_real_ones(sim: Simulator) -> None:
    """A wrong key gives the SDK the same 400 INVALID_ARGUMENT envelope as the real service."""
    root = sim.base_url.removesuffix("v1beta")

    def call() -> None:
        client = genai.Client(api_key="bad", http_options=types.HttpOptions(base_url=root))
        client.models.generate_videos(model="veo-3.1-generate-preview",
                                      source=types.GenerateVideosSource(prompt="x"))

    errors = pytest.importorskip("google.genai.errors")
    with pytest.raises(errors.ClientError) as info:
        await asyncio.to_thread(call)
    assert info.value.code == 400
    assert info.value.status == "INVALID_ARGUMENT"
