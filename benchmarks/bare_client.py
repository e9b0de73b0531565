"""The HTTP floor under the makespan run's CPU: the daemon's calls, and nothing else.

Run by ``bench.py makespan`` after the daemon, against the same simulator: as many jobs at
the same concurrency, each a create call, the same number of polls as one of the daemon's
operations took (the last one after it finished), and the download with its redirect,
written to a file on the scratch filesystem. It uses what the daemon uses (one aiohttp
session with the same connector and timeouts, uvloop, msgspec) and does none of the
daemon's own work: no spool, no sidecars, no log lines, no watching, no retries.

Its CPU per job is what these calls cost in this process on this machine in this window,
so the daemon's CPU beyond it is the daemon's own work.

    python benchmarks/bare_client.py BASE_URL KEY OUT_DIR CONCURRENCY GENERATION_S < polls.json

``polls.json`` is a JSON list, a poll count per job. Prints ``{"cpu_s": ..., "jobs": ...}``.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any
from urllib.parse import urljoin

import aiohttp
import msgspec
import uvloop

from reeldrop.config import Config
from reeldrop.veo import VeoClient, open_session

POLL_GAP_S = 0.15  # between the looks before an operation is done (before its age reaches it)
# The last look comes this long after the generation time: the operation started at the
# simulator a little before its name came back, but uvloop's clock is cached per loop pass
# and its timers round to the millisecond, so a look at exactly that age could come early.
LAST_LOOK_AFTER_S = 0.05


async def job(session: aiohttp.ClientSession, client: VeoClient, gate: asyncio.Semaphore,
              base: str, headers: dict[str, str], index: int, polls: int, out: str,
              generation_s: float) -> None:
    timeout = client.request_timeout
    async with gate:  # a slot covers create and polls; downloads hold none, as in the daemon
        body = msgspec.json.encode({"instances": [{"prompt": f"bare {index}"}],
                                    "parameters": {"sampleCount": 1}})
        url = f"{base}/models/veo-3.1-generate-preview:predictLongRunning"
        async with session.post(url, data=body, timeout=timeout,
                                headers={**headers, "Content-Type": "application/json"}) as r:
            name = msgspec.json.decode(await r.read())["name"]
        born = time.monotonic()
        # Looks at ages the operation has not reached (it started before its name came back),
        # then one just past its generation time, which finds it done: ``polls`` calls in all.
        ages = [generation_s - POLL_GAP_S * k for k in range(polls - 1, 0, -1)]
        op: dict[str, Any] = {}
        for age in [*ages, generation_s + LAST_LOOK_AFTER_S]:
            await asyncio.sleep(max(0.0, born + age - time.monotonic()))
            async with session.get(f"{base}/{name}", timeout=timeout,
                                   headers={**headers, "Content-Type": "application/json"}) as r:
                op = msgspec.json.decode(await r.read())
        assert op.get("done"), f"{name} was not done at its last poll"
    uri = op["response"]["generateVideoResponse"]["generatedSamples"][0]["video"]["uri"]
    file_id = uri.split("/files/")[1].split(":")[0]
    url = f"{base}/files/{file_id}:download?alt=media"
    r = await session.get(url, headers=headers, allow_redirects=False,
                          timeout=client.download_timeout)
    url = urljoin(url, r.headers["Location"])
    r.release()
    r = await session.get(url, timeout=client.download_timeout)
    fd = os.open(os.path.join(out, f"{index}.mp4"), os.O_WRONLY | os.O_CREAT, 0o640)
    try:
        async for chunk in r.content.iter_chunked(1 << 20):
            os.write(fd, chunk)
    finally:
        os.close(fd)
        r.release()


async def main() -> None:
    base, key, out, concurrency, generation_s = sys.argv[1:6]
    polls: list[int] = msgspec.json.decode(sys.stdin.buffer.read())
    config = Config(concurrency=int(concurrency))
    async with open_session(config) as session:  # the daemon's session, and its timeouts:
        client = VeoClient(session, config)  # its calls themselves are written out below
        gate = asyncio.Semaphore(config.concurrency)
        before = os.times()
        async with asyncio.TaskGroup() as tg:
            for i, count in enumerate(polls):
                tg.create_task(job(session, client, gate, base.rstrip("/"),
                                   {"x-goog-api-key": key}, i, max(1, count), out,
                                   float(generation_s)))
        after = os.times()
    cpu = (after.user - before.user) + (after.system - before.system)
    print(msgspec.json.encode({"cpu_s": round(cpu, 3), "jobs": len(polls)}).decode())


if __name__ == "__main__":
    uvloop.run(main())
