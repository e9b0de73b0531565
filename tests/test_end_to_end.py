"""The daemon in-process against the simulator over loopback HTTP, with real directories."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import time
from datetime import datetime
from pathlib import Path

import msgspec
import pytest
import structlog

from reeldrop import durable_writes
from reeldrop.demo import examples_dir
from reeldrop.errors import OutputError
from reeldrop.files import GROUP_SYNC_FROM
from reeldrop.sidecar import Sidecar, encode
from reeldrop.simulator import SimConfig, Simulator
from reeldrop.writer import Staged, publish_videos

from .support import (
    NamesAppearing,
    batch_through,
    drop,
    finished,
    kept,
    make_config,
    playable_frames,
    running,
    sidecars,
    until,
)


async def test_every_example_job_becomes_a_playable_video(tmp_path: Path, sim: Simulator) -> None:
    """Each example job ends as a decodable MP4 and a complete `succeeded` sidecar."""
    inbox = tmp_path / "inbox"
    shutil.copytree(examples_dir(), inbox)
    config = make_config(tmp_path, sim.base_url)
    outbox = tmp_path / "outbox"
    async with running(config):
        await until(finished(outbox, 7), what="7 finished sidecars")
    docs = sidecars(outbox)
    assert set(docs) == {"lighthouse", "fox", "phone-reel", "skyline-day-to-night",
                         "storyboard-1", "storyboard-2", "storyboard-finale"}
    for name, doc in docs.items():
        assert doc.state == "succeeded", doc.error
        assert doc.finished_at and doc.operation and doc.attempts == 1
        [video] = doc.videos
        assert video.file == f"{name}.mp4"
        assert (outbox / video.file).stat().st_size == video.bytes
        assert playable_frames(outbox / video.file) > 0
    assert docs["skyline-day-to-night"].metadata == {
        "client": "acme", "ticket": 4711, "tags": ["city", "timelapse"]}
    assert docs["phone-reel"].model == "veo-3.1-fast-generate-preview"
    batch = msgspec.json.decode((outbox / "storyboard.batch.json").read_bytes())
    assert (batch["total"], batch["succeeded"], batch["failed"]) == (3, 3, 0)
    assert not [p for p in inbox.iterdir() if not p.name.startswith(".")], "inbox not emptied"
    done = kept(inbox / ".reeldrop" / "done")
    assert done["lighthouse.prompt"].read_bytes() == (
        examples_dir() / "lighthouse.prompt").read_bytes()
    assert not list((outbox / ".partial").iterdir())
    assert sim.stats["submissions"] == 7


@pytest.fixture
def sim_config() -> SimConfig:
    return SimConfig(latency_s=0.1, latency_jitter_s=0.0, seed=3, api_key="AIzaTEST-reeldrop-"
                     "0123456789abcdefghij", retry_delay_s=0.3)


async def test_failed_and_filtered_operations_fail_with_the_reason(
        tmp_path: Path, sim: Simulator) -> None:
    """A failed operation and a safety-filtered one end `failed` with the service's words."""
    config = make_config(tmp_path, sim.base_url)
    outbox = tmp_path / "outbox"
    async with running(config):
        drop(tmp_path / "inbox", "broken.prompt", "a scene [fail]")
        drop(tmp_path / "inbox", "blocked.prompt", "a scene [filtered]")
        drop(tmp_path / "inbox", "good.prompt", "a scene")
        await until(finished(outbox, 3))
    docs = sidecars(outbox)
    assert docs["broken"].state == "failed"
    assert docs["broken"].error is not None
    assert "internal error" in docs["broken"].error.message
    assert docs["blocked"].state == "failed"
    assert docs["blocked"].error is not None
    assert "safety filter" in docs["blocked"].error.message
    assert "audio" in docs["blocked"].error.message
    assert docs["good"].state == "succeeded"
    failed_area = tmp_path / "inbox" / ".reeldrop" / "failed"
    assert set(kept(failed_area)) == {"broken.prompt", "blocked.prompt"}


async def test_429_is_retried_after_the_services_delay(tmp_path: Path) -> None:
    """A 429 carrying RetryInfo makes the next create of that job wait at least the delay."""
    sim, docs = await batch_through(
        tmp_path, SimConfig(latency_s=0.05, latency_jitter_s=0, seed=5, rate_429=0.4,
                            retry_delay_s=0.3), 6, timeout=60, concurrency=3, create_tries=20)
    assert {doc.state for doc in docs.values()} == {"succeeded"}
    assert sim.stats["http_429"] >= 2
    for t429, _kind, prompt in [e for e in sim.events if e[1] == "429"]:
        retry = min(t for t, kind, p in sim.events
                    if p == prompt and kind in ("create", "fault") and t > t429)
        assert retry - t429 >= 0.3 - 0.01, f"{prompt} retried {retry - t429:.3f} s after 429"
    assert sorted(sim.submissions.values()) == [1] * 6


async def test_5xx_resets_and_truncated_downloads_never_pay_twice(tmp_path: Path) -> None:
    """503s, connection resets and cut-off downloads are retried; each prompt is created once.

    Sixteen jobs, so that every kind of fault occurs whatever order the requests come in
    (with eight, a run saw no cut-off download: about one run in a hundred saw none of one
    kind)."""
    sim, docs = await batch_through(
        tmp_path, SimConfig(latency_s=0.05, latency_jitter_s=0.05, seed=11, rate_5xx=0.25,
                            rate_reset=0.15, rate_truncate=0.5, video_bytes=300_000),
        16, timeout=60, download_tries=10, poll_error_tries=10, create_tries=10)
    assert {d.state for d in docs.values()} == {"succeeded"}, [d.error for d in docs.values()]
    assert sim.stats["fault_5xx"] and sim.stats["fault_reset"] and sim.stats["fault_truncate"]
    assert sorted(sim.submissions.values()) == [1] * 16
    for doc in docs.values():
        assert doc.videos[0].bytes == 300_000
        assert playable_frames(tmp_path / "outbox" / doc.videos[0].file) > 0


async def test_a_bad_file_fails_clearly_and_the_next_good_one_still_runs(
        tmp_path: Path, sim: Simulator) -> None:
    """Invalid JSON ends as a `failed` sidecar naming the problem; its bytes are kept."""
    config = make_config(tmp_path, sim.base_url)
    outbox = tmp_path / "outbox"
    async with running(config):
        drop(tmp_path / "inbox", "bad.json", b'{"prompt": "x", "colour": 1}')
        drop(tmp_path / "inbox", "good.json", b'{"prompt": "x"}')
        await until(finished(outbox, 2))
    docs = sidecars(outbox)
    assert docs["bad"].state == "failed"
    assert docs["bad"].error is not None
    assert docs["bad"].error.type == "InvalidJob"
    assert "unknown field `colour`" in docs["bad"].error.message
    failed = kept(tmp_path / "inbox" / ".reeldrop" / "failed")
    assert failed["bad.json"].read_bytes() == b'{"prompt": "x", "colour": 1}'
    assert docs["good"].state == "succeeded"
    assert sim.stats["submissions"] == 1


async def test_a_name_with_a_video_is_never_overwritten(tmp_path: Path, sim: Simulator) -> None:
    """Dropping the same name twice gives NAME.2, leaving the first video and sidecar intact."""
    config = make_config(tmp_path, sim.base_url)
    outbox = tmp_path / "outbox"
    async with running(config):
        drop(tmp_path / "inbox", "cat.prompt", "a cat")
        await until(finished(outbox, 1))
        first = (outbox / "cat.mp4").read_bytes()
        drop(tmp_path / "inbox", "cat.prompt", "a cat again")
        await until(finished(outbox, 2))
    docs = sidecars(outbox)
    assert docs["cat"].prompt == "a cat"
    assert docs["cat.2"].prompt == "a cat again"
    assert docs["cat.2"].videos[0].file == "cat.2.mp4"
    assert (outbox / "cat.mp4").read_bytes() == first


@pytest.mark.parametrize("others", [0, 1500])
async def test_a_big_batch_keeps_taken_names_and_reuses_failed_ones(
        tmp_path: Path, sim: Simulator, others: int) -> None:
    """Forty-four files waiting at start are claimed in batches (8, 16, 20), the big ones
    looking names up in one listing of the outbox, or, once it holds more than 50 entries per
    file of the batch (``others`` files of other jobs), one name at a time: either way a name
    with a video, with the first of several videos or with another job's live sidecar gets
    NAME.2; a name whose job failed without a video is reused; nothing there is touched."""
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    outbox.mkdir()
    for i in range(others):
        (outbox / f"other{i}.mp4").write_bytes(b"")
    (outbox / "kept.mp4").write_bytes(b"someone's video")
    (outbox / "many-1.mp4").write_bytes(b"someone's first video")
    stamp = "2026-01-01T00:00:00.000Z"
    other = Sidecar(job_id="other-job", output="busy", source="busy.prompt", prompt="x",
                    model="m", created_at=stamp, updated_at=stamp).moved("generating")
    failed = msgspec.structs.replace(other, job_id="old-job", output="retry").moved("failed")
    (outbox / "busy.json").write_bytes(encode(other))
    (outbox / "retry.json").write_bytes(encode(failed))
    names = [f"job{i:02d}" for i in range(40)] + ["kept", "many", "busy", "retry"]
    for age, name in enumerate(reversed(names)):  # the last four are the newest: a big batch
        path = drop(inbox, f"{name}.prompt", f"{name} job")
        os.utime(path, (time.time() - 100 - age, time.time() - 100 - age))
    async with running(make_config(tmp_path, sim.base_url, concurrency=44)):
        await until(lambda: sum(d.done and d.job_id != "old-job"
                                for d in sidecars(outbox).values()) >= 44, timeout=30)
    docs = sidecars(outbox)
    assert {docs[f"{name}.2"].prompt for name in ("kept", "many", "busy")} == {
        "kept job", "many job", "busy job"}
    assert docs["retry"].prompt == "retry job"
    assert docs["busy"].job_id == "other-job"
    assert (outbox / "kept.mp4").read_bytes() == b"someone's video"
    assert (outbox / "many-1.mp4").read_bytes() == b"someone's first video"


async def test_files_waiting_at_start_are_all_claimed_before_the_first_submission(
        tmp_path: Path, sim: Simulator) -> None:
    """A backlog is acknowledged before it is worked: every one of 60 files waiting at start
    has its queued sidecar before the first create call (claims and the HTTP client's loading
    and first submissions no longer compete for the interpreter)."""
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    for i in range(60):
        path = drop(inbox, f"waiting{i:02d}.prompt", f"waiting {i}")
        os.utime(path, (time.time() - 100 + i, time.time() - 100 + i))
    async with running(make_config(tmp_path, sim.base_url, concurrency=8)):
        await until(finished(outbox, 60), timeout=30)
    claimed = max(datetime.fromisoformat(d.created_at).timestamp()
                  for d in sidecars(outbox).values())
    first_create = min(t for t, kind, _ in sim.events if kind == "create")
    assert claimed <= first_create


async def test_several_videos_of_one_job_are_numbered_and_keep_their_name(
        tmp_path: Path, sim: Simulator) -> None:
    """An operation that returns two videos gives NAME-1.mp4 and NAME-2.mp4, both listed
    (with sizes and hashes) in the one sidecar; the name stays taken, so a second job with
    the same name gets NAME.2 instead of overwriting them."""
    config = make_config(tmp_path, sim.base_url)
    outbox = tmp_path / "outbox"
    async with running(config):
        drop(tmp_path / "inbox", "takes.prompt", "two takes [samples=2]")
        await until(finished(outbox, 1))
        drop(tmp_path / "inbox", "takes.prompt", "one more take")
        await until(finished(outbox, 2))
    docs = sidecars(outbox)
    assert docs["takes"].state == "succeeded", docs["takes"].error
    assert [v.file for v in docs["takes"].videos] == ["takes-1.mp4", "takes-2.mp4"]
    for video in docs["takes"].videos:
        data = (outbox / video.file).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (video.bytes, video.sha256)
        assert playable_frames(outbox / video.file) > 0
    assert [v.file for v in docs["takes.2"].videos] == ["takes.2.mp4"]
    assert not (outbox / "takes.mp4").exists()


def _event_times(sim: Simulator) -> dict[tuple[str, str], float]:
    """(event kind, prompt) → when the simulator logged it."""
    prompt_of = {f: op.prompt for op in sim.ops.values() for f in op.file_ids}
    return {(kind, prompt_of.get(key, key)): t for t, kind, key in sim.events}


async def test_a_download_holds_a_download_slot_not_a_generation_slot(tmp_path: Path) -> None:
    """With one generation slot and one download slot: the second job is submitted while the
    first one's video is still downloading (a slot at the service is free once its operation
    is done); the second download waits for the first; and a done job waiting for a download
    slot keeps its generation slot, so the third job is not submitted before then."""
    sim = Simulator(SimConfig(latency_s=0.2, latency_jitter_s=0.0, video_bytes=3 << 20,
                              download_chunk_delay_s=0.15))
    await sim.start()
    outbox = tmp_path / "outbox"
    try:
        async with running(make_config(tmp_path, sim.base_url, concurrency=1,
                                       download_concurrency=1)):
            for name in ("first", "second", "third"):
                drop(tmp_path / "inbox", f"{name}.prompt", f"the {name}")
                await until((outbox / f"{name}.json").exists, what=name)
            await until(finished(outbox, 3), timeout=30)
    finally:
        await sim.stop()
    at = _event_times(sim)
    # The client has every byte before the simulator's last pause: the sidecar's stamp it is.
    delivered = sidecars(outbox)["first"].finished_at
    assert delivered is not None
    first_done = datetime.fromisoformat(delivered).timestamp()
    assert at["create", "the second"] < first_done
    assert at["download_start", "the second"] >= first_done
    assert at["create", "the third"] > first_done


async def test_a_rounds_create_calls_go_before_its_downloads(tmp_path: Path) -> None:
    """When a round of jobs finishes together (here over 0.3 s) and more are queued, every
    freed slot sends its next create call before any of the round's videos is downloaded: the
    downloads wait for a lull in the taking of jobs (a create call starts the service's
    clock; a download only ends a job)."""
    sim = Simulator(SimConfig(latency_s=0.5, latency_jitter_s=0.3))
    await sim.start()
    outbox = tmp_path / "outbox"
    try:  # no gap within the round's 0.3 s is as long as the lull asked for
        async with running(make_config(tmp_path, sim.base_url, concurrency=8,
                                       delivery_lull_s=1.0, delivery_defer_max_s=30.0)):
            for i in range(24):  # three rounds: the queue is not empty while the first ends
                drop(tmp_path / "inbox", f"job-{i:02}.prompt", f"job {i:02}")
            await until(finished(outbox, 24), timeout=60)
    finally:
        await sim.stop()
    at = _event_times(sim)
    created = sorted((t, prompt) for (kind, prompt), t in at.items() if kind == "create")
    first, second = [p for _, p in created[:8]], [t for t, _ in created[8:16]]
    assert len({at["done_seen", p] for p in first}) > 1, "the first round ended at one look"
    assert max(second) < min(at["download_start", p] for p in first)


@pytest.mark.parametrize(("jobs", "quiet_s", "max_s", "low_s", "high_s"), [
    (3, 0.5, 30.0, 0.4, 3.0),  # a job is queued: the download waits for the lull ...
    (3, 30.0, 0.5, 0.4, 3.0),  # ... but never longer than delivery_defer_max_s
    (3, 30.0, 0.0, -1.0, 0.4),  # 0: downloads never wait
    (2, 30.0, 30.0, -1.0, 0.4),  # nothing queued: nothing to let go first
])
async def test_a_download_waits_for_a_lull_in_submissions_while_jobs_are_queued(
        tmp_path: Path, jobs: int, quiet_s: float, max_s: float, low_s: float,
        high_s: float) -> None:
    """With one slot, the first job's download starts ``delivery_lull_s`` after the slot took
    the second job, or ``delivery_defer_max_s`` after the first was found done, whichever is
    sooner; and at once when no job is left in the queue, or with ``delivery_defer_max_s``
    0."""
    # The first generation lasts a second so that the others are surely queued by the time
    # it is done, even on a loaded machine.
    sim = Simulator(SimConfig(latency_s=1.0, latency_jitter_s=0.0))
    await sim.start()
    outbox = tmp_path / "outbox"
    names = ["first", "second", "third"][:jobs]
    try:
        async with running(make_config(tmp_path, sim.base_url, concurrency=1,
                                       delivery_lull_s=quiet_s, delivery_defer_max_s=max_s)):
            for name in names:
                drop(tmp_path / "inbox", f"{name}.prompt", f"the {name}")
                await until((outbox / f"{name}.json").exists, what=f"{name} claimed")
            assert not any(kind == "done_seen" for _, kind, _ in sim.events), \
                "the setup needs the other jobs queued while the first still generates"
            await until(finished(outbox, jobs), timeout=30)
    finally:
        await sim.stop()
    at = _event_times(sim)
    waited = at["download_start", "the first"] - at["create", "the second"]
    assert low_s <= waited < high_s


async def test_the_sidecar_shows_every_state_in_order(tmp_path: Path) -> None:
    """A watcher of NAME.json sees queued → submitting → generating → downloading →
    succeeded, each state long enough here to be shown (brief_state_s) and read (a slow
    create call, a 0.3 s generation, a slow link), and never a torn file."""
    config = SimConfig(latency_s=0.3, latency_jitter_s=0.0, create_latency_s=0.8,
                       video_bytes=3 << 20, download_chunk_delay_s=0.15)
    sim = Simulator(config)
    await sim.start()
    seen: dict[str, list[str]] = {"first": [], "second": []}
    outbox = tmp_path / "outbox"
    try:
        async with running(make_config(tmp_path, sim.base_url, concurrency=1)):
            drop(tmp_path / "inbox", "first.prompt", "the first")
            drop(tmp_path / "inbox", "second.prompt", "the second, queued behind it")
            async with asyncio.timeout(30):
                while not all(s and s[-1] == "succeeded" for s in seen.values()):
                    for name, states in seen.items():
                        if (outbox / f"{name}.json").exists():
                            doc = msgspec.json.decode((outbox / f"{name}.json").read_bytes())
                            if not states or states[-1] != doc["state"]:
                                states.append(doc["state"])
                    await asyncio.sleep(0.005)
    finally:
        await sim.stop()
    order = ["queued", "submitting", "generating", "downloading", "succeeded"]
    assert seen["second"] == order
    assert seen["first"] in (order, order[1:])  # its queued state may last no time at all


async def test_a_passing_states_failed_write_is_logged_and_the_job_goes_on(
        tmp_path: Path) -> None:
    """The submitting state's sidecar cannot be written (a directory stands at its name
    while the create call is out): the failure is a warning in the log with the reason, not
    the job's end. Once the name is free again the job is stored as usual."""
    sim = Simulator(SimConfig(latency_s=0.3, latency_jitter_s=0.0, create_latency_s=2.5))
    await sim.start()
    sidecar = tmp_path / "outbox" / "blocked.json"
    try:
        with structlog.testing.capture_logs() as logs:
            async with running(make_config(tmp_path, sim.base_url, brief_state_s=1.0)):
                drop(tmp_path / "inbox", "blocked.prompt", "a blocked sidecar")
                await until(sidecar.exists)  # queued
                sidecar.unlink()
                (sidecar / "in-the-way").mkdir(parents=True)
                await until(lambda: any(e["event"] == "sidecar.brief_state_not_shown"
                                        for e in logs))
                shutil.rmtree(sidecar)
                await until(finished(tmp_path / "outbox", 1))
    finally:
        await sim.stop()
    warnings = [e for e in logs if e["event"] == "sidecar.brief_state_not_shown"]
    assert len(warnings) == 1 and warnings[0]["log_level"] == "warning"
    assert "blocked.json" in warnings[0]["error"], warnings
    assert sidecars(tmp_path / "outbox")["blocked"].state == "succeeded"


async def test_a_slow_download_shows_its_progress_and_then_its_outcome(
        tmp_path: Path) -> None:
    """A download that lasts seconds shows bytes received in the sidecar as it goes (growing,
    out of the video's length), and no progress version lands after the final one."""
    size = 8 << 20  # eight chunks at 0.4 s: about three progress writes, one a second
    sim = Simulator(SimConfig(latency_s=0.3, latency_jitter_s=0.0, video_bytes=size,
                              download_chunk_delay_s=0.4))
    await sim.start()
    outbox = tmp_path / "outbox"
    seen: list[tuple[str, int | None, int | None]] = []
    try:
        async with running(make_config(tmp_path, sim.base_url, brief_state_s=0.0)):
            drop(tmp_path / "inbox", "slow.prompt", "a slow link")
            async with asyncio.timeout(30):
                while not seen or seen[-1][0] != "succeeded":
                    with contextlib.suppress(FileNotFoundError, KeyError):
                        doc = sidecars(outbox)["slow"]
                        version = (doc.state, doc.bytes_done, doc.bytes_total)
                        if not seen or seen[-1] != version:
                            seen.append(version)
                    await asyncio.sleep(0.005)
            await asyncio.sleep(1.5)  # a progress write landing late would show by now
            final = sidecars(outbox)["slow"]
    finally:
        await sim.stop()
    progress = [done for state, done, total in seen
                if state == "downloading" and done is not None and total == size]
    assert len(progress) >= 2, seen
    assert progress == sorted(progress) and 0 < progress[0] < size, seen
    assert final.state == "succeeded" and final.bytes_done is None, final


@pytest.mark.parametrize(("brief_state_s", "versions"), [(1.0, 3), (0.0, 5)])
async def test_states_over_in_milliseconds_are_not_published(
        tmp_path: Path, brief_state_s: float, versions: int) -> None:
    """A create call answered and a video stored within milliseconds leave no submitting or
    downloading version of the sidecar: queued, generating and succeeded, three versions in
    all (the record still has every state). With brief_state_s = 0 all five appear."""
    sim = Simulator(SimConfig(latency_s=0.3, latency_jitter_s=0.0))
    await sim.start()
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    appearing = NamesAppearing(outbox)
    try:
        async with running(make_config(tmp_path, sim.base_url, brief_state_s=brief_state_s)):
            drop(tmp_path / "inbox", "only.prompt", "the only one")
            await until(finished(outbox, 1))
    finally:
        await sim.stop()
        names = appearing.read()
        appearing.close()
    assert names.count("only.json") == versions, names
    assert sidecars(outbox)["only"].state == "succeeded"


async def test_videos_whose_downloads_end_together_are_published_together(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon stages each downloaded video and publishes it through the grouped queue:
    videos whose downloads end while the first is being published (held here for a second)
    go together in the next group, flushed once for all. Every video ends under its name,
    no partial file is left, and every sidecar says succeeded."""
    sizes: list[int] = []

    def held(videos: list[list[Staged]]) -> list[OutputError | None]:
        sizes.append(len(videos))
        if len(sizes) == 1:
            time.sleep(1.0)  # in the worker thread: the other downloads end meanwhile
        return publish_videos(videos)

    monkeypatch.setattr(durable_writes, "publish_videos", held)
    sim = Simulator(SimConfig(latency_s=0.3, latency_jitter_s=0.0))
    await sim.start()
    outbox = tmp_path / "outbox"
    try:
        async with running(make_config(tmp_path, sim.base_url, concurrency=12)):
            for i in range(12):
                drop(tmp_path / "inbox", f"job-{i:02}.prompt", f"job {i:02}")
            await until(finished(outbox, 12), timeout=30)
    finally:
        await sim.stop()
    assert sum(sizes) == 12 and sizes[0] == 1
    assert max(sizes) >= GROUP_SYNC_FROM, sizes
    assert {d.state for d in sidecars(outbox).values()} == {"succeeded"}
    assert sorted(p.name for p in outbox.glob("*.mp4")) == [f"job-{i:02}.mp4" for i in range(12)]
    assert os.listdir(outbox / ".partial") == []
