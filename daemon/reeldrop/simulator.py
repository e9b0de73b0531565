"""The embedded simulator: a fake Veo-over-Gemini-API service on loopback, for demos and tests.

It speaks the real wire format (``shared/reference/veo-api.md``): the same paths under
``/v1beta``, HTTP 200 on create, a running operation that is only ``{"name"}``, URIs that name
the public host, downloads behind a same-origin redirect, the ``x-goog-api-key`` header (or
``?key=``) checked. It serves real, playable MP4s, padded with an MP4 ``free`` box to any size.

Faults are seeded and injected at a configurable rate (429 with RetryInfo and Retry-After,
503, connection resets, truncated downloads), by a requests-per-minute limit, or on demand by
a marker in the prompt: ``[fail]`` (the operation fails), ``[filtered]`` (the safety filter
blocks it), ``[slow]`` (ten times the latency), ``[latency=N]`` (N seconds), ``[samples=N]``
(N videos, 1-4, where the service would return one per requested sample). It counts
everything it does (``stats``).
"""

from __future__ import annotations

import asyncio
import random
import re
import secrets
import string
import struct
import time
from collections import Counter, deque
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

import msgspec
from aiohttp import web

PUBLIC_HOST = "https://generativelanguage.googleapis.com"
_LATENCY_MARK = re.compile(r"\[latency=(\d+(?:\.\d+)?)\]")
_SAMPLES_MARK = re.compile(r"\[samples=([1-4])\]")
PAD_CHUNK = 1 << 20


class SimConfig(msgspec.Struct, frozen=True, kw_only=True):
    """The simulator's knobs. Rates are probabilities per request, from a seeded generator."""

    latency_s: float = 2.0
    latency_jitter_s: float = 0.5
    seed: int = 0
    api_key: str | None = None  # None: any non-empty key is accepted
    rate_429: float = 0.0
    rate_5xx: float = 0.0
    rate_reset: float = 0.0
    rate_truncate: float = 0.0
    rate_fail: float = 0.0
    rate_filtered: float = 0.0
    requests_per_minute: int | None = None
    rate_window_s: float = 60.0  # the window requests_per_minute counts in (shorter in tests)
    retry_delay_s: float = 1.0
    video_bytes: int | None = None  # pad every video to this size
    download_chunk_delay_s: float = 0.0  # pause after each 1 MiB served (a slow link)
    create_latency_s: float = 0.0  # time to answer a create call (the real one takes ~1 s)
    expire_after_s: float = 2 * 86400.0


class _Op(msgspec.Struct):
    name: str
    prompt: str
    ready_at: float
    outcome: str  # "ok" | "fail" | "filtered"
    file_ids: list[str]  # one video per sample
    done_at: float | None = None  # wall time the operation finished (set on first done poll)
    polls: int = 0


def _asset(aspect: str) -> bytes:
    name = "sample-9x16.mp4" if aspect == "9:16" else "sample-16x9.mp4"
    return resources.files("reeldrop").joinpath("assets", name).read_bytes()


def _bad_key() -> web.Response:
    return _error(400, "INVALID_ARGUMENT", "API key not valid. Please pass a valid API key.")


def _error(status: int, canonical: str, message: str, *, details: list[Any] | None = None,
           headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": {"code": status, "message": message, "status": canonical,
                      **({"details": details} if details else {})}}
    return web.Response(status=status, body=msgspec.json.encode(body),
                        content_type="application/json", headers=headers)


class Simulator:
    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        self.rng = random.Random(self.config.seed)
        self.ops: dict[str, _Op] = {}
        self.files: dict[str, tuple[bytes, int, float]] = {}  # id -> (base, total size, created)
        self.submissions: Counter[str] = Counter()  # prompt -> accepted create calls
        self.stats: Counter[str] = Counter()
        self.events: list[tuple[float, str, str]] = []  # (time, kind, prompt)
        self._window: deque[float] = deque()
        self.app = web.Application()
        self.app.router.add_post("/v1beta/models/{model_action}", self.create)
        self.app.router.add_get("/v1beta/models/{model}/operations/{op}", self.poll)
        self.app.router.add_get("/v1beta/files/{file_action}", self.download)
        self.app.router.add_get("/storage/{file_id}", self.storage)
        self.app.router.add_get("/sim/stats", self.stats_view)
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on loopback; returns the base URL to configure (``…/v1beta``)."""
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        sock = site._server.sockets[0]  # type: ignore[union-attr]
        self.base_url = f"http://{host}:{sock.getsockname()[1]}/v1beta"
        return self.base_url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def stats_dict(self) -> dict[str, Any]:
        return {**self.stats, "submissions_by_prompt": dict(self.submissions)}

    async def stats_view(self, _request: web.Request) -> web.Response:
        return web.json_response(self.stats_dict())

    def _authorised(self, request: web.Request) -> bool:
        key = request.headers.get("x-goog-api-key") or request.query.get("key")
        return bool(key) and (self.config.api_key is None or key == self.config.api_key)

    def _fault(self, request: web.Request, kinds: tuple[str, ...]) -> web.Response | None:
        """Maybe inject one fault; ``reset`` aborts the connection and returns a dummy."""
        c = self.config
        for kind, rate in (("429", c.rate_429), ("5xx", c.rate_5xx), ("reset", c.rate_reset)):
            if kind in kinds and rate and self.rng.random() < rate:
                self.stats[f"fault_{kind}"] += 1
                if kind == "429":
                    return self._too_many(c.retry_delay_s)
                if kind == "5xx":
                    return _error(503, "UNAVAILABLE", "The service is currently unavailable.")
                assert request.transport is not None
                request.transport.abort()
                return web.Response(status=500)
        return None

    def _too_many(self, delay_s: float) -> web.Response:
        self.stats["http_429"] += 1
        details = [{"@type": "type.googleapis.com/google.rpc.RetryInfo",
                    "retryDelay": f"{delay_s:.3f}s"}]
        return _error(429, "RESOURCE_EXHAUSTED", "You exceeded your current quota, please "
                      "check your plan and billing details.", details=details,
                      headers={"Retry-After": str(max(1, round(delay_s)))})

    async def create(self, request: web.Request) -> web.Response:
        model, _, action = request.match_info["model_action"].partition(":")
        if action != "predictLongRunning":
            return _error(404, "NOT_FOUND", f"Method {action} not found.")
        if not self._authorised(request):
            return _bad_key()
        if self.config.create_latency_s:
            await asyncio.sleep(self.config.create_latency_s)
        try:
            body = msgspec.json.decode(await request.read())
            prompt = str(body["instances"][0].get("prompt", ""))
            params = body.get("parameters") or {}
        except (msgspec.DecodeError, KeyError, IndexError, TypeError, AttributeError):
            return _error(400, "INVALID_ARGUMENT", "Invalid JSON payload received.")
        fault = self._fault(request, ("429", "5xx", "reset"))
        if fault is not None:
            self.events.append((time.time(), "fault", prompt))
            if fault.status == 429:
                self.events.append((time.time(), "429", prompt))
            return fault
        duration = int(params.get("durationSeconds", 8))
        if params.get("resolution") in ("1080p", "4k") and duration != 8:
            return _error(400, "INVALID_ARGUMENT", "Your use case is currently not supported. "
                          "Please refer to Gemini API documentation for current model offering.")
        limit = self.config.requests_per_minute
        now = time.monotonic()
        window = self.config.rate_window_s
        while self._window and now - self._window[0] >= window:
            self._window.popleft()
        if limit is not None and len(self._window) >= limit:
            self.events.append((time.time(), "429", prompt))
            return self._too_many(self._window[0] + window - now)
        self._window.append(now)
        op_id = "".join(self.rng.choices(string.ascii_lowercase + string.digits, k=12))
        name = f"models/{model}/operations/{op_id}"
        asked = _LATENCY_MARK.search(prompt)
        latency = float(asked[1]) if asked else self.config.latency_s
        latency *= 10 if "[slow]" in prompt else 1
        latency += self.rng.uniform(0, self.config.latency_jitter_s)
        outcome = ("fail" if "[fail]" in prompt or self.rng.random() < self.config.rate_fail
                   else "filtered" if "[filtered]" in prompt
                   or self.rng.random() < self.config.rate_filtered else "ok")
        samples = _SAMPLES_MARK.search(prompt)
        file_ids = ["".join(self.rng.choices(string.ascii_lowercase + string.digits, k=12))
                    for _ in range(int(samples[1]) if samples else 1)]
        self.ops[name] = _Op(name=name, prompt=prompt, ready_at=now + latency, outcome=outcome,
                             file_ids=file_ids)
        base = _asset(str(params.get("aspectRatio", "16:9")))
        for file_id in file_ids:
            self.files[file_id] = (base, max(len(base), self.config.video_bytes or 0),
                                   time.time())
        self.submissions[prompt] += 1
        self.stats["submissions"] += 1
        self.events.append((time.time(), "create", prompt))
        return web.json_response({"name": name})

    async def poll(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return _bad_key()
        self.stats["polls"] += 1
        fault = self._fault(request, ("5xx", "reset"))
        if fault is not None:
            return fault
        name = f"models/{request.match_info['model']}/operations/{request.match_info['op']}"
        op = self.ops.get(name)
        if op is None:
            return _error(404, "NOT_FOUND", f"Operation {name} not found.")
        op.polls += 1
        if time.monotonic() < op.ready_at:
            return web.json_response({"name": name})
        if op.done_at is None:
            op.done_at = time.time() - (time.monotonic() - op.ready_at)  # when it finished
            self.events.append((time.time(), "done_seen", op.prompt))  # first told
        if op.outcome == "fail":
            return web.json_response({"name": name, "done": True, "error": {
                "code": 13, "message": "Video generation failed due to an internal error."}})
        kind = "type.googleapis.com/google.ai.generativelanguage.v1beta.PredictLongRunningResponse"
        if op.outcome == "filtered":
            result: dict[str, Any] = {"raiMediaFilteredCount": 1, "raiMediaFilteredReasons": [
                "We encountered an issue with the audio for your prompt, which means we could "
                "not create your video. You have not been charged for this attempt."]}
        else:
            result = {"generatedSamples": [
                {"video": {"uri": f"{PUBLIC_HOST}/v1beta/files/{file_id}:download?alt=media"}}
                for file_id in op.file_ids]}
        return web.json_response({"name": name, "done": True,
                                  "response": {"@type": kind, "generateVideoResponse": result}})

    async def download(self, request: web.Request) -> web.Response:
        file_id, _, action = request.match_info["file_action"].partition(":")
        if action != "download":
            return _error(404, "NOT_FOUND", "Not found.")
        if not self._authorised(request):
            return _error(403, "PERMISSION_DENIED", "The caller does not have permission.")
        fault = self._fault(request, ("5xx", "reset"))
        if fault is not None:
            return fault
        entry = self.files.get(file_id)
        if entry is None or time.time() - entry[2] > self.config.expire_after_s:
            return _error(404, "NOT_FOUND", f"File {file_id} not found or expired.")
        token = secrets.token_urlsafe(12)  # like a signed storage URL: no key needed there
        raise web.HTTPFound(f"/storage/{file_id}?token={token}")

    async def storage(self, request: web.Request) -> web.StreamResponse:
        entry = self.files.get(request.match_info["file_id"])
        if entry is None or "token" not in request.query:
            return _error(404, "NOT_FOUND", "Not found.")
        base, total, _ = entry
        start = 0
        range_header = request.headers.get("Range", "")
        if range_header.startswith("bytes=") and range_header.endswith("-"):
            start = int(range_header[6:-1])
            if start >= total:  # as HTTP (and Google's storage) answer: nothing left to send
                self.stats["unsatisfiable_ranges"] += 1
                return web.Response(status=416, headers={"Content-Range": f"bytes */{total}"})
        resp = web.StreamResponse(status=206 if start else 200)
        resp.content_type = "video/mp4"
        resp.content_length = total - start
        if start:
            self.stats["ranged_downloads"] += 1
            resp.headers["Content-Range"] = f"bytes {start}-{total - 1}/{total}"
        await resp.prepare(request)
        self.stats["downloads"] += 1
        file_id = request.match_info["file_id"]
        self.events.append((time.time(), "download_start", file_id))
        cut = self.config.rate_truncate and self.rng.random() < self.config.rate_truncate
        limit = start + (total - start) // 2 if cut else total
        async for chunk in _video_bytes(base, total, start, limit):
            await resp.write(chunk)
            if self.config.download_chunk_delay_s:
                await asyncio.sleep(self.config.download_chunk_delay_s)
        if cut:
            self.stats["fault_truncate"] += 1
            assert request.transport is not None
            request.transport.abort()
            return resp
        await resp.write_eof()
        self.events.append((time.time(), "download_end", file_id))
        return resp


async def _video_bytes(
    base: bytes, total: int, start: int, end: int
) -> AsyncIterator[bytes | memoryview]:
    """Bytes [start, end) of ``base`` followed by a ``free`` box that pads it to ``total``."""
    pad = total - len(base)
    header = struct.pack(">I", pad) + b"free" if pad >= 8 else b"\0" * pad
    head = base + header
    if start < len(head):
        yield head[start:min(end, len(head))]
    pos = max(start, len(head))
    zeros = memoryview(bytes(PAD_CHUNK))
    while pos < end:
        n = min(PAD_CHUNK, end - pos)
        yield zeros[:n]
        pos += n
        await asyncio.sleep(0)
