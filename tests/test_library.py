"""The library API against the simulator: single, batch, typed errors, the sync wrapper."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import video_generation
from reeldrop import (
    APIError,
    GenerationTimeout,
    ValidationError,
    VeoVideoGenerator,
    VideoGenerationError,
    VideoRequest,
    generate_video,
    generate_videos_batch,
)
from reeldrop.simulator import SimConfig, Simulator
from reeldrop.simulator_hosting import running_in_thread

from .support import TEST_KEY, playable_frames

FAST: dict[str, Any] = {"poll_initial_s": 0.05, "poll_min_s": 0.05, "poll_max_s": 0.2,
                        "retry_base_s": 0.05, "submissions_per_minute": 6000, "submit_burst": 20}
ROOT = Path(__file__).parent.parent


@pytest.fixture
def sim_config() -> SimConfig:
    return SimConfig(latency_s=0.1, latency_jitter_s=0.1, seed=6, api_key=TEST_KEY)


async def test_one_video_through_the_generator(tmp_path: Path, sim: Simulator) -> None:
    """generate_video_async saves a playable video and fills every response field."""
    polls: list[float] = []
    async with VeoVideoGenerator(api_key=TEST_KEY, base_url=sim.base_url, **FAST) as gen:
        response = await gen.generate_video_async(
            VideoRequest(prompt="a fox", aspect_ratio="9:16"), tmp_path / "fox.mp4",
            on_poll=polls.append)
    assert response.success and response.is_success
    assert response.video_path == tmp_path / "fox.mp4"
    assert playable_frames(tmp_path / "fox.mp4") > 0
    assert response.file_size_mb == pytest.approx((tmp_path / "fox.mp4").stat().st_size / 1e6)
    assert response.generation_time is not None and response.generation_time > 0
    assert response.operation and response.video_uri and response.error is None
    assert polls, "no progress was reported while generating"


async def test_a_batch_keeps_order_and_survives_a_failure(tmp_path: Path, sim: Simulator) -> None:
    """A failure in the middle of a batch leaves the rest intact, results in input order."""
    result = await generate_videos_batch(
        ["one", "two [fail]", VideoRequest(prompt="three", output="third")],
        concurrent_limit=2, output_dir=tmp_path, api_key=TEST_KEY, base_url=sim.base_url, **FAST)
    assert (result.total, result.successful, result.failed) == (3, 2, 1)
    assert result.success_rate == pytest.approx(2 / 3)
    first, second, third = result.results
    assert first.video_path == tmp_path / "video-001.mp4"
    assert not second.success and second.error and "internal error" in second.error
    assert third.video_path == tmp_path / "third.mp4"


async def test_failures_arrive_as_typed_errors(tmp_path: Path, sim: Simulator) -> None:
    """Invalid requests, refused keys and timeouts raise their own types from the response."""
    async with VeoVideoGenerator(api_key=TEST_KEY, base_url=sim.base_url, **FAST) as gen:
        invalid = await gen.generate_video_async(
            VideoRequest(prompt="x", resolution="4k", duration_seconds=4), tmp_path / "a.mp4")
    with pytest.raises(ValidationError, match="only 8 seconds"):
        invalid.raise_for_error()
    async with VeoVideoGenerator(api_key="wrong", base_url=sim.base_url, **FAST) as gen:
        refused = await gen.generate_video_async("x", tmp_path / "b.mp4")
    with pytest.raises(APIError) as info:
        refused.raise_for_error()
    assert info.value.status == 400 and not info.value.retryable
    async with VeoVideoGenerator(api_key=TEST_KEY, base_url=sim.base_url, poll_deadline_s=0.2,
                                 **FAST) as gen:
        slow = await gen.generate_video_async("x [slow]", tmp_path / "c.mp4")
    with pytest.raises(TimeoutError):  # GenerationTimeout is also the built-in TimeoutError
        slow.raise_for_error()
    assert isinstance(slow.exception, GenerationTimeout | VideoGenerationError)


def test_the_blocking_wrapper_returns_a_path_or_raises(tmp_path: Path) -> None:
    """generate_video blocks, returns the saved path, and raises typed errors."""
    with running_in_thread(SimConfig(latency_s=0.1, api_key=TEST_KEY)) as base_url:
        path = generate_video("a cat", tmp_path / "cat.mp4", aspect_ratio="9:16",
                              api_key=TEST_KEY, base_url=base_url, **FAST)
        assert path == tmp_path / "cat.mp4" and playable_frames(path) > 0
        with pytest.raises(APIError):
            generate_video("a cat", tmp_path / "x.mp4", api_key="bad", base_url=base_url, **FAST)


def test_the_old_package_name_is_the_same_objects() -> None:
    """`video_generation` re-exports reeldrop's objects; it is no second implementation."""
    assert video_generation.generate_video is generate_video
    assert video_generation.VeoVideoGenerator is VeoVideoGenerator
    assert video_generation.generate_videos_batch is generate_videos_batch


@pytest.mark.parametrize("script", ["basic_example", "async_example", "batch_example",
                                    "advanced_batch"])
def test_each_example_runs_against_the_simulator(tmp_path: Path, script: str) -> None:
    """Every example runs without an API key, saying it uses the simulator, and exits 0."""
    env = {k: v for k, v in os.environ.items() if k not in ("GEMINI_API_KEY", "GOOGLE_API_KEY")}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / f"{script}.py")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "embedded simulator" in done.stdout
    assert list(tmp_path.rglob("*.mp4"))


def test_a_typed_user_script_passes_mypy_strict() -> None:
    """py.typed ships, and a user's code calling the API is clean under mypy --strict."""
    done = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-incremental",
                           str(Path(__file__).parent / "typed_user_script.py")],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


async def test_the_generator_must_be_entered() -> None:
    """Using the generator outside `async with` is a clear error, not a hang."""
    with pytest.raises(RuntimeError, match="async with"):
        await VeoVideoGenerator(api_key="k").generate_video_async("x")
