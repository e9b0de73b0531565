"""The service client against real loopback servers: wire format, errors, the key's reach."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from reeldrop import writer
from reeldrop.errors import APIError, DownloadError, GenerationFailed
from reeldrop.generation import Generation
from reeldrop.jobs import Member
from reeldrop.scheduler import SubmitGate
from reeldrop.sidecar import VideoFile
from reeldrop.simulator import Simulator
from reeldrop.veo import (
    Operation,
    VeoClient,
    _OpResponse,
    parse_delay,
    request_body,
    video_uris,
)
from reeldrop.writer import download_video

from .support import TEST_KEY, make_config

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MEMBER = Member(prompt="a cat", model="veo-3.1-generate-preview", output="cat",
                parameters={"aspect_ratio": "9:16", "duration_seconds": 8, "resolution": "1080p"})
URI = "https://h/v1beta/files/abc:download?alt=media"


def test_request_body_uses_the_wire_names() -> None:
    """Options go out camelCased under `parameters`, as the official SDK sends them."""
    assert request_body(MEMBER) == {
        "instances": [{"prompt": "a cat"}],
        "parameters": {"sampleCount": 1, "aspectRatio": "9:16", "durationSeconds": 8,
                       "resolution": "1080p"},
    }


def test_delays_parse_from_both_hint_formats() -> None:
    """Retry-After seconds and protobuf Durations ("47s", "0.5s") both become seconds."""
    assert parse_delay("47s") == 47.0
    assert parse_delay("0.250s") == 0.25
    assert parse_delay("3") == 3.0
    assert parse_delay("soon") is None
    assert parse_delay(None) is None


def test_finished_operations_map_to_uris_or_reasons() -> None:
    """Samples give URIs; an error or a safety filter with no samples is a failure, never []."""
    ok = Operation(name="n", done=True, response=msgspec_response(
        {"generatedSamples": [{"video": {"uri": URI}}]}))
    assert video_uris(ok) == [URI]
    cases: list[tuple[dict[str, object], str]] = [
        ({"raiMediaFilteredCount": 1}, "safety filter"), ({"generatedSamples": []}, "no video"),
        ({}, "no video")]
    for body, needle in cases:
        with pytest.raises(GenerationFailed, match=needle):
            video_uris(Operation(name="n", done=True, response=msgspec_response(body)))


def msgspec_response(result: dict[str, object]) -> _OpResponse:
    return msgspec.convert({"generateVideoResponse": result}, _OpResponse)


async def test_create_poll_download_against_the_simulator(tmp_path: Path, sim: Simulator) -> None:
    """The client's three calls work over HTTP, and the download is streamed and verified."""
    async with aiohttp.ClientSession() as session:
        client = VeoClient(session, make_config(tmp_path, sim.base_url))
        name = await client.create(MEMBER)
        assert name.startswith("models/veo-3.1-generate-preview/operations/")
        op = await client.poll(name)
        while not op.done:
            op = await client.poll(name)
        [uri] = video_uris(op)
        assert uri.startswith("https://generativelanguage.googleapis.com/v1beta/files/")
        video = await download_video(client, uri, tmp_path / "v.part", tmp_path / "v.mp4", 0o640)
    assert video.file == "v.mp4"
    assert (tmp_path / "v.mp4").read_bytes()[4:8] == b"ftyp"
    assert not (tmp_path / "v.part").exists()


async def test_http_errors_carry_status_message_and_retryability(
        tmp_path: Path, sim: Simulator) -> None:
    """A refused key is a non-retryable APIError with the service's own message."""
    async with aiohttp.ClientSession() as session:
        config = make_config(tmp_path, sim.base_url, api_key="wrong-key")
        with pytest.raises(APIError) as info:
            await VeoClient(session, config).create(MEMBER)
    assert info.value.status == 400
    assert not info.value.retryable
    assert "API key not valid" in info.value.message
    assert "wrong-key" not in info.value.message


async def test_a_create_answer_without_an_operation_name_is_not_sent_again(
        tmp_path: Path) -> None:
    """A 200 to the create call whose body names no operation (a proxy's page, a changed
    format) fails the job with that sentence and is not retried: the service may have
    started a video we cannot name, and a second create call could pay for it twice."""
    calls = 0

    async def create(_request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        return web.json_response({"unexpected": True})

    api = TestServer(web.Application())
    api.app.router.add_post("/v1beta/models/{model_action}", create)
    await api.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            config = make_config(tmp_path, str(api.make_url("/v1beta")))
            generation = Generation(VeoClient(session, config), SubmitGate(1000, 10), config)
            with pytest.raises(APIError) as info:
                await generation.create(MEMBER, tries=5)
    finally:
        await api.close()
    assert calls == 1
    assert info.value.status == 200 and not info.value.retryable
    assert info.value.message == "The service's answer to the create call had no operation name."


@contextlib.asynccontextmanager
async def files_api(tmp_path: Path, handler: Handler) -> AsyncIterator[VeoClient]:
    """A client whose base URL is a local server answering ``files/{f}`` with ``handler``."""
    api = TestServer(web.Application())
    api.app.router.add_get("/v1beta/files/{f}", handler)
    await api.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            yield VeoClient(session, make_config(tmp_path, str(api.make_url("/v1beta"))))
    finally:
        await api.close()


async def test_the_key_never_follows_a_redirect_to_another_host(tmp_path: Path) -> None:
    """Downloads send the key to the base URL's host only, not to the redirect target."""
    seen: dict[str, str | None] = {}

    async def storage(request: web.Request) -> web.Response:
        seen["storage"] = request.headers.get("x-goog-api-key")
        return web.Response(body=b"\0\0\0\x10ftypisom" + b"\0" * 100)

    other = TestServer(web.Application())
    other.app.router.add_get("/blob", storage)
    await other.start_server()

    async def files(request: web.Request) -> web.Response:
        seen["api"] = request.headers.get("x-goog-api-key")
        raise web.HTTPFound(str(other.make_url("/blob")))

    try:
        async with files_api(tmp_path, files) as client:
            await download_video(client, URI, tmp_path / "p", tmp_path / "v.mp4", 0o640)
    finally:
        await other.close()
    assert seen == {"api": TEST_KEY, "storage": None}


async def test_an_expired_video_fails_with_a_message_that_says_so(
        tmp_path: Path, sim: Simulator) -> None:
    """A 404 on download is not retried and tells the user that videos are kept 2 days."""
    async with aiohttp.ClientSession() as session:
        client = VeoClient(session, make_config(tmp_path, sim.base_url))
        with pytest.raises(DownloadError) as info:
            await download_video(client, "https://x/v1beta/files/gone:download?alt=media",
                                 tmp_path / "p", tmp_path / "v.mp4", 0o640)
    assert info.value.status == 404
    assert not info.value.retryable
    assert "2 days" in info.value.message


async def generated_uri(client: VeoClient) -> str:
    """Create MEMBER and poll until done; its one video's URI."""
    name = await client.create(MEMBER)
    op = await client.poll(name)
    while not op.done:
        op = await client.poll(name)
    [uri] = video_uris(op)
    return uri


async def downloaded_whole(client: VeoClient, tmp_path: Path) -> tuple[str, Path, VideoFile]:
    """A new video's URI, downloaded once in full to ``whole.mp4``."""
    uri = await generated_uri(client)
    whole = tmp_path / "whole.mp4"
    return uri, whole, await download_video(client, uri, tmp_path / "w.part", whole, 0o640)


async def test_a_cut_download_resumes_with_range(tmp_path: Path, sim: Simulator) -> None:
    """A partial file left by a broken transfer is resumed from its length and checked whole."""
    sim.config = msgspec.structs.replace(sim.config, video_bytes=200_000)
    async with aiohttp.ClientSession() as session:
        client = VeoClient(session, make_config(tmp_path, sim.base_url))
        uri, whole, _ = await downloaded_whole(client, tmp_path)
        partial = tmp_path / "r.part"
        partial.write_bytes(whole.read_bytes()[:123_456])
        before = sim.stats["downloads"]
        video = await download_video(client, uri, partial, tmp_path / "r.mp4", 0o640)
    assert (tmp_path / "r.mp4").read_bytes() == whole.read_bytes()
    assert video.bytes == 200_000
    assert sim.stats["downloads"] == before + 1
    assert sim.stats["ranged_downloads"] == 1


async def test_bytes_that_arrived_before_a_transfer_broke_off_are_kept_for_the_next_try(
        tmp_path: Path, sim: Simulator) -> None:
    """A transfer cut off before a batch filled (here at half of a 300 kB video) leaves what
    arrived in the partial file, so the next try asks only for the rest (Range) instead of
    fetching the whole video again; the file is the server's bytes."""
    sim.config = msgspec.structs.replace(sim.config, video_bytes=300_000, rate_truncate=1.0)
    async with aiohttp.ClientSession() as session:
        client = VeoClient(session, make_config(tmp_path, sim.base_url))
        uri = await generated_uri(client)
        partial, final = tmp_path / "c.part", tmp_path / "c.mp4"
        with pytest.raises(DownloadError, match="broke off after 150000 bytes") as info:
            await download_video(client, uri, partial, final, 0o640)
        assert info.value.retryable
        assert partial.stat().st_size == 150_000
        sim.config = msgspec.structs.replace(sim.config, rate_truncate=0.0)
        video = await download_video(client, uri, partial, final, 0o640)
        plain = await client.open_download(uri)
        served = await plain.read()
        plain.release()
    assert sim.stats["ranged_downloads"] == 1
    assert final.read_bytes() == served and video.bytes == 300_000
    assert video.sha256 == hashlib.sha256(served).hexdigest()


@pytest.mark.parametrize("publish", [True, False])
async def test_a_partial_file_holding_the_whole_video_is_published_as_it_is(
        tmp_path: Path, sim: Simulator, publish: bool) -> None:
    """A stop between a download's last write and its rename leaves the whole video in the
    partial file: the next try's Range request is unsatisfiable (416, as Google's storage
    answers), and the file is checked and published (or, for the daemon, staged and then
    published) without fetching it again, not failed."""
    async with aiohttp.ClientSession() as session:
        client = VeoClient(session, make_config(tmp_path, sim.base_url))
        uri, whole, first = await downloaded_whole(client, tmp_path)
        partial, final = tmp_path / "r.part", tmp_path / "r.mp4"
        partial.write_bytes(whole.read_bytes())
        before = sim.stats["downloads"]
        video = await download_video(client, uri, partial, final, 0o640, publish=publish)
    if not publish:
        assert not final.exists()
        assert writer.publish_videos([[writer.Staged(partial, final)]]) == [None]
    assert final.read_bytes() == whole.read_bytes()
    assert (video.bytes, video.sha256) == (first.bytes, first.sha256)
    assert not partial.exists()
    assert sim.stats["unsatisfiable_ranges"] == 1
    assert sim.stats["downloads"] == before, "the video was fetched again"


async def test_a_staged_download_stays_checked_under_its_partial_name(
        tmp_path: Path, sim: Simulator) -> None:
    """Without ``publish`` the whole, checked video stays at the partial name with its mode,
    and no public name appears; ``publish_videos`` then gives it its name, bytes unchanged."""
    async with aiohttp.ClientSession() as session:
        client = VeoClient(session, make_config(tmp_path, sim.base_url))
        uri, whole, first = await downloaded_whole(client, tmp_path)
        partial, final = tmp_path / "s.part", tmp_path / "s.mp4"
        video = await download_video(client, uri, partial, final, 0o604, publish=False)
        assert not final.exists()
        assert partial.read_bytes() == whole.read_bytes()
        assert partial.stat().st_mode & 0o777 == 0o604
        assert (video.file, video.bytes, video.sha256) == ("s.mp4", first.bytes, first.sha256)
        assert writer.publish_videos([[writer.Staged(partial, final)]]) == [None]
    assert final.read_bytes() == whole.read_bytes() and not partial.exists()


@pytest.mark.parametrize("publish", [True, False])
async def test_a_download_that_is_not_an_mp4_is_removed_and_never_named(
        tmp_path: Path, publish: bool) -> None:
    """A body without an MP4's ``ftyp`` box at its start (an HTML error page served as 200)
    fails as a DownloadError; its partial file is removed, published or staged alike, and
    the public name never appears."""

    async def html(request: web.Request) -> web.Response:
        return web.Response(body=b"<html>quota page</html>" * 10, content_type="text/html")

    async with files_api(tmp_path, html) as client:
        with pytest.raises(DownloadError, match="not an MP4 video"):
            await download_video(client, URI, tmp_path / "p", tmp_path / "v.mp4", 0o640,
                                 publish=publish)
    assert sorted(os.listdir(tmp_path)) == []


async def test_a_partial_file_longer_than_the_video_is_removed(
        tmp_path: Path, sim: Simulator) -> None:
    """A partial file longer than the video cannot be its beginning: the try fails as a
    retryable download error, the file is gone, and the next try downloads it whole."""
    async with aiohttp.ClientSession() as session:
        client = VeoClient(session, make_config(tmp_path, sim.base_url))
        uri, whole, _ = await downloaded_whole(client, tmp_path)
        partial = tmp_path / "r.part"
        partial.write_bytes(whole.read_bytes() + b"junk")
        with pytest.raises(DownloadError, match="did not match the video's length") as info:
            await download_video(client, uri, partial, tmp_path / "r.mp4", 0o640)
        assert info.value.retryable
        assert not partial.exists() and not (tmp_path / "r.mp4").exists()
        await download_video(client, uri, partial, tmp_path / "r.mp4", 0o640)
    assert (tmp_path / "r.mp4").read_bytes() == whole.read_bytes()


@pytest.mark.parametrize("batch_bytes", [1, 1 << 30])
async def test_a_long_download_is_stored_whole_and_in_order(
        tmp_path: Path, sim: Simulator, monkeypatch: pytest.MonkeyPatch,
        batch_bytes: int) -> None:
    """Chunks hashed and written in worker threads while the next ones arrive (each chunk a
    batch of its own with 1; the whole video one batch, written by the last hop, with a
    batch size above the video's) land whole and in order: the file is the server's bytes
    and its sha256 is the file's, for a fresh download and for one resumed from a partial
    file."""
    monkeypatch.setattr(writer, "BATCH_BYTES", batch_bytes)
    sim.config = msgspec.structs.replace(sim.config, video_bytes=5 << 20)
    async with aiohttp.ClientSession() as session:
        client = VeoClient(session, make_config(tmp_path, sim.base_url))
        uri = await generated_uri(client)
        plain = await client.open_download(uri)
        served = await plain.read()
        plain.release()
        fresh = await download_video(client, uri, tmp_path / "f.part", tmp_path / "f.mp4", 0o640)
        partial = tmp_path / "r.part"
        partial.write_bytes(served[:1_234_567])
        resumed = await download_video(client, uri, partial, tmp_path / "r.mp4", 0o640)
    for video in (fresh, resumed):
        data = (tmp_path / video.file).read_bytes()
        assert data == served
        assert (video.bytes, video.sha256) == (len(served), hashlib.sha256(data).hexdigest())
