"""The service client: Veo over the Gemini API (create, poll, open a download).

It speaks the wire format in ``shared/reference/veo-api.md`` and maps every answer to a typed
result or a typed error; it does not retry (``retry.py`` does) and does not touch files
(``writer.py`` does). The API key goes only to the configured base URL's host.
"""

from __future__ import annotations

import email.utils
import re
import time
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp
import msgspec

from .config import Config, Secret
from .errors import APIError, DownloadError, GenerationFailed
from .jobs import Member

RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_FILE_ID = re.compile(r"/files/([A-Za-z0-9_\-]+)")
_WIRE_PARAMS = {
    "aspect_ratio": "aspectRatio", "resolution": "resolution",
    "duration_seconds": "durationSeconds", "negative_prompt": "negativePrompt",
    "person_generation": "personGeneration", "enhance_prompt": "enhancePrompt",
}
MAX_REDIRECTS = 5


# The service's answers. Unknown fields are ignored (msgspec's default), so new ones never break us.
class _Video(msgspec.Struct):
    uri: str | None = None


class _Sample(msgspec.Struct):
    video: _Video | None = None


class _VideoResponse(msgspec.Struct, rename="camel"):
    generated_samples: list[_Sample] = []
    rai_media_filtered_count: int = 0
    rai_media_filtered_reasons: list[str] = []


class _OpResponse(msgspec.Struct, rename="camel"):
    generate_video_response: _VideoResponse | None = None


class _Status(msgspec.Struct):
    code: int = 0
    message: str = ""
    status: str | None = None
    details: list[dict[str, Any]] = []


class Operation(msgspec.Struct):
    name: str
    done: bool = False
    response: _OpResponse | None = None
    error: _Status | None = None


class _Envelope(msgspec.Struct):
    error: _Status


_decode_operation = msgspec.json.Decoder(Operation).decode
_decode_envelope = msgspec.json.Decoder(_Envelope).decode


def request_body(member: Member) -> dict[str, Any]:
    """The ``predictLongRunning`` body for one member."""
    params = {_WIRE_PARAMS[k]: v for k, v in member.parameters.items() if k in _WIRE_PARAMS}
    return {"instances": [{"prompt": member.prompt}], "parameters": {"sampleCount": 1, **params}}


def parse_delay(text: str | None) -> float | None:
    """Seconds from ``Retry-After`` (seconds or HTTP date) or a protobuf Duration (``"47s"``)."""
    if not text:
        return None
    text = text.strip()
    try:
        return max(0.0, float(text.removesuffix("s")))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def video_uris(op: Operation) -> list[str]:
    """The finished operation's video URIs, or GenerationFailed with the service's reason."""
    if op.error is not None:
        raise GenerationFailed(
            f"The service could not generate the video: {op.error.message or 'no reason given'} "
            f"(code {op.error.code})."
        )
    result = op.response.generate_video_response if op.response else None
    samples = result.generated_samples if result else []
    uris = [s.video.uri for s in samples if s.video and s.video.uri]
    if uris:
        return uris
    if result and (result.rai_media_filtered_count or result.rai_media_filtered_reasons):
        reasons = " ".join(result.rai_media_filtered_reasons) or "no reason given"
        raise GenerationFailed(f"The service's safety filter blocked the video: {reasons}")
    raise GenerationFailed("The operation finished but returned no video.")


def open_session(config: Config) -> aiohttp.ClientSession:
    """The process's one session: a connection per job slot and per download slot (and a
    few spare), DNS answers kept 5 minutes, and no cookie jar (the API needs none, and the
    jar's filtering was a tenth of each poll's CPU). Call it inside the event loop."""
    connector = aiohttp.TCPConnector(limit=config.concurrency + config.downloads + 4,
                                     ttl_dns_cache=300)
    return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())


class VeoClient:
    """One client per process, over one pooled ``aiohttp.ClientSession`` (``open_session``)."""

    def __init__(self, session: aiohttp.ClientSession, config: Config) -> None:
        self.session = session
        self.base_url = config.base_url.rstrip("/")
        self._host = urlsplit(self.base_url).netloc
        self._prefix = self.base_url + "/"  # URLs under the base URL: the key's own host
        self._key: Secret | None = config.api_key
        self.request_timeout = aiohttp.ClientTimeout(
            total=config.request_timeout_s, sock_connect=config.connect_timeout_s
        )
        self.download_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=config.connect_timeout_s, sock_read=config.read_timeout_s
        )

    def _headers(self, url: str) -> dict[str, str]:
        if self._key is None:
            return {}
        if not url.startswith(self._prefix) and urlsplit(url).netloc != self._host:
            return {}  # (the prefix test spares parsing the URL of every poll)
        return {"x-goog-api-key": self._key.reveal()}

    async def create(self, member: Member) -> str:
        """Start a generation; returns the operation name."""
        url = f"{self.base_url}/models/{member.model}:predictLongRunning"
        body = msgspec.json.encode(request_body(member))
        data = await self._call("POST", url, body)
        try:
            return _decode_operation(data).name
        except msgspec.DecodeError:
            raise APIError("The service's answer to the create call had no operation name.",
                           status=200, retryable=False) from None

    async def poll(self, operation: str) -> Operation:
        """One look at an operation (``done`` is False while it runs)."""
        return _decode_operation(await self._call("GET", f"{self.base_url}/{operation}"))

    async def _call(self, method: str, url: str, body: bytes | None = None) -> bytes:
        headers = {**self._headers(url), "Content-Type": "application/json"}
        try:
            async with self.session.request(
                method, url, data=body, headers=headers, timeout=self.request_timeout
            ) as resp:
                data = await resp.read()
                if resp.status != 200:
                    raise error_from_response(resp.status, resp.reason, resp.headers, data)
                return data
        except (aiohttp.ClientError, TimeoutError) as e:
            raise APIError(
                f"Could not reach the service at {self._host}: {type(e).__name__} {e}".rstrip()
                + ".", retryable=True,
            ) from None

    def download_url(self, uri: str) -> str:
        """Where to fetch a video: through the configured base URL, as the official SDK does."""
        match = _FILE_ID.search(urlsplit(uri).path)
        if match:
            return f"{self.base_url}/files/{match[1]}:download?alt=media"
        if urlsplit(uri).netloc == self._host:
            return uri
        raise DownloadError(f"The video URI {uri!r} names no file id.", retryable=False)

    async def open_download(self, uri: str, offset: int = 0) -> aiohttp.ClientResponse:
        """GET the video, following redirects by hand so the key never leaves its host.

        Returns an open response (status 200, or 206 when ``offset`` was honoured, or 416
        when nothing lies past ``offset``: a partial file that already holds the whole video);
        the caller reads and releases it.
        """
        url = self.download_url(uri)
        for _ in range(MAX_REDIRECTS + 1):
            headers = self._headers(url)
            if offset:
                headers["Range"] = f"bytes={offset}-"
            try:
                resp = await self.session.get(
                    url, headers=headers, allow_redirects=False, timeout=self.download_timeout
                )
            except (aiohttp.ClientError, TimeoutError) as e:
                raise DownloadError(f"Could not reach {urlsplit(url).netloc}: {e!r}.") from None
            if resp.status in (301, 302, 303, 307, 308) and "Location" in resp.headers:
                url = urljoin(url, resp.headers["Location"])
                resp.release()
                continue
            if resp.status in (200, 206) or (offset and resp.status == 416):
                return resp
            data = await resp.read()
            resp.release()
            err = error_from_response(resp.status, resp.reason, resp.headers, data)
            if resp.status in (403, 404, 410):
                raise DownloadError(
                    f"The video is no longer on the service ({resp.status}); generated videos are "
                    f"kept for 2 days. {err.message}", status=resp.status, retryable=False)
            raise DownloadError(err.message, status=resp.status, retryable=err.retryable)
        raise DownloadError(f"Too many redirects (more than {MAX_REDIRECTS}) for the video.")


def error_from_response(
    status: int, reason: str | None, headers: Any, data: bytes
) -> APIError:
    """An APIError from a non-200 answer, with the service's own message and delay hint."""
    message, canonical, delay = "", None, None
    try:
        env = _decode_envelope(data)
        message, canonical = env.error.message, env.error.status
        for detail in env.error.details:
            if str(detail.get("@type", "")).endswith("google.rpc.RetryInfo"):
                delay = parse_delay(str(detail.get("retryDelay", "")))
    except msgspec.DecodeError:
        message = data[:200].decode("utf-8", "replace").strip()
    if delay is None:  # RetryInfo is the finer of the two hints (Retry-After is whole seconds)
        delay = parse_delay(headers.get("Retry-After"))
    label = f"{status} {canonical or reason or ''}".strip()
    text = f"The service answered {label}: {message or 'no message'}".rstrip(".") + "."
    return APIError(text, status=status, retryable=status in RETRYABLE_STATUSES,
                    retry_after_s=delay)

