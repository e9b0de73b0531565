"""Durable writes in groups (``reeldrop.durable_writes``; the videos' ``writer.publish_videos``),
on real files under tmp_path."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

import msgspec
import pytest

from reeldrop import durable_writes, writer
from reeldrop.config import Config
from reeldrop.durable_writes import DurableWrites, Settled, write_group
from reeldrop.errors import ErrorInfo, OutputError
from reeldrop.files import GROUP_SYNC_FROM, syncfs
from reeldrop.intake import Intake
from reeldrop.sidecar import Sidecar, VideoFile, read_last
from reeldrop.spool import JobRun, Spool
from reeldrop.spool_files import job_file, record_name
from reeldrop.writer import Staged, publish_videos

from .support import drop, make_config, sidecars

Final = tuple[JobRun, Sidecar]


def spool_with(tmp_path: Path, jobs: dict[str, str]) -> tuple[Config, Spool, dict[str, JobRun]]:
    """A fresh spool with ``jobs`` (file name: contents) claimed and accepted."""
    config = make_config(tmp_path, "http://127.0.0.1:9/v1beta")
    inbox, outbox = config.require_dirs()
    spool = Spool(config.spool, inbox, outbox, config.file_mode, config.dir_mode)
    spool.prepare()
    intake, runs = Intake(config, spool), {}
    for name, data in jobs.items():
        run = spool.claim(drop(inbox, name, data))
        assert run is not None
        intake.accept(run)
        runs[name] = run
    return config, spool, runs


def succeeded(member: Sidecar) -> Sidecar:
    video = VideoFile(file=f"{member.output}.mp4", bytes=1, sha256="0" * 64)
    return member.moved("generating", operation="models/m/operations/1").moved(
        "succeeded", videos=[video])


def failed(member: Sidecar) -> Sidecar:
    return member.moved("failed", error=ErrorInfo(type="generation", message="Blocked."))


JOBS = {"a.prompt": "a", "b.prompt": "b", "c.prompt": "c",
        "d.json": '[{"prompt": "d1"}, {"prompt": "d2"}]',
        "e.json": '[{"prompt": "e1"}, {"prompt": "e2"}]'}


def finals_of(runs: dict[str, JobRun]) -> list[Final]:
    """a and c succeed, b fails, both members of the array d succeed, and e's first member
    (e2 is still running)."""
    d, e = runs["d.json"], runs["e.json"]
    return [(runs["a.prompt"], succeeded(runs["a.prompt"].members[0])),
            (runs["b.prompt"], failed(runs["b.prompt"].members[0])),
            (d, succeeded(d.members[0])),
            (runs["c.prompt"], succeeded(runs["c.prompt"].members[0])),
            (d, succeeded(d.members[1])),
            (e, succeeded(e.members[0]))]


@pytest.mark.parametrize("grouped", [True, False])
def test_a_group_stores_every_final_state_and_archives_the_finished_jobs(
        tmp_path: Path, grouped: bool) -> None:
    """Written as one group (flushed once per step) or member by member, the end is the
    same: each member's record and sidecar hold its final state, array jobs get their batch
    file, every finished job's file and records move to done/ or failed/ (the last of its
    members in the group says where), and a job with a member still running stays in jobs/."""
    _, spool, runs = spool_with(tmp_path, JOBS)
    finals = finals_of(runs)
    assert len(finals) >= GROUP_SYNC_FROM
    if grouped:
        outcomes = write_group(spool, finals)
    else:
        outcomes = [write_group(spool, [final])[0] for final in finals]

    def archived(name: str, area: Path) -> Path:
        return area / f"{runs[name].job_id}.{name}"

    assert outcomes == [archived("a.prompt", spool.done), archived("b.prompt", spool.failed),
                        None, archived("c.prompt", spool.done), archived("d.json", spool.done),
                        None]
    for run, member in finals:
        record = run.path(f"member-{member.index:04d}.jsonl")
        assert read_last(Path(record)) == member
        assert sidecars(spool.outbox)[member.output] == member
        assert member.index in run.linked
    e = runs["e.json"]
    assert [r.archived for r in runs.values()] == [True, True, True, True, False]
    assert sorted(os.listdir(spool.jobs)) == sorted(
        [f"{e.job_id}.e.json", f"{e.job_id}.member-0001.jsonl", f"{e.job_id}.member-0002.jsonl"])
    assert len(os.listdir(spool.done)) == 2 + 2 + 3  # a and c (file, record), d (file, two)
    for stem, done in (("d", 2), ("e", 1)):
        summary = msgspec.json.decode((spool.outbox / f"{stem}.batch.json").read_bytes())
        assert (summary["succeeded"], summary["total"]) == (done, 2)


def test_a_member_whose_sidecar_cannot_be_written_fails_alone(tmp_path: Path) -> None:
    """In a group, one member's write error is that member's outcome: its job stays claimed
    (a restart takes it up again) and the others are stored and archived as usual."""
    _, spool, runs = spool_with(tmp_path, {f"{n}.prompt": n for n in "abcd"})
    (spool.outbox / "b.json").unlink()
    (spool.outbox / "b.json").mkdir()  # the sidecar's name is taken by a directory
    finals = [(run, succeeded(run.members[0])) for run in runs.values()]
    outcomes = write_group(spool, finals)
    assert isinstance(outcomes[1], OutputError)
    assert "Cannot write the sidecar b.json" in outcomes[1].message
    assert [isinstance(o, Path) for o in outcomes] == [True, False, True, True]
    assert sorted(os.listdir(spool.jobs)) == sorted(
        [f"{runs['b.prompt'].job_id}.b.prompt", f"{runs['b.prompt'].job_id}.member-0001.jsonl"])


@pytest.mark.parametrize("step", ["record", "batch file", "archive"])
def test_a_member_whose_record_batch_file_or_archive_cannot_be_written_fails_alone(
        tmp_path: Path, step: str) -> None:
    """In a group, a job whose record line, batch file (``STEM.batch.json``) or move out of
    jobs/ fails (each name taken by a directory here) gets that step's error as its outcome
    and stays claimed, for a restart to take up again; the group's other jobs are stored and
    archived as usual."""
    _, spool, runs = spool_with(tmp_path, {"a.prompt": "a", "b.prompt": "b", "c.prompt": "c",
                                           "d.json": '[{"prompt": "d1"}, {"prompt": "d2"}]'})
    d = runs["d.json"]
    if step == "record":
        record = Path(d.path(record_name(2)))
        record.unlink()
        record.mkdir()
    elif step == "batch file":
        (spool.outbox / "d.batch.json").mkdir()
    else:
        (Path(job_file(spool.done, d.job_id, d.source)) / "x").mkdir(parents=True)
    finals = [(run, succeeded(member)) for run in runs.values() for member in run.members]
    outcomes = write_group(spool, finals)
    expected = {"record": f"Cannot record the job's state in {spool.jobs}: Is a directory.",
                "batch file": f"Cannot write the batch file into {spool.outbox}: Is a directory.",
                "archive": f"Cannot archive the job {d.job_id}: Is a directory."}[step]
    errors = [o for o in outcomes if isinstance(o, OutputError)]
    assert [e.message for e in errors] == [expected]
    assert [isinstance(o, Path) for o in outcomes[:3]] == [True, True, True]  # a, b, c
    assert d.source in {name.split(".", 1)[1] for name in os.listdir(spool.jobs)}
    assert {name.split(".", 1)[1] for name in os.listdir(spool.done)} >= {
        "a.prompt", "b.prompt", "c.prompt"}


def test_a_failed_flush_fails_the_whole_group_and_archives_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A flush that reports a write error (EIO: a real one cannot be had on demand) leaves
    nothing of the group to trust: every member's outcome says so, and no job leaves jobs/."""
    _, spool, runs = spool_with(tmp_path, {f"{n}.prompt": n for n in "abcd"})

    def broken_disk(path: str | Path) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO), os.fspath(path))

    monkeypatch.setattr(durable_writes, "syncfs", broken_disk)
    outcomes = write_group(spool, [(run, succeeded(run.members[0])) for run in runs.values()])
    assert {o.message for o in outcomes if isinstance(o, OutputError)} == {
        "Cannot make the jobs' states durable: Input/output error."}
    assert len(outcomes) == 4
    assert len(os.listdir(spool.jobs)) == 8 and os.listdir(spool.done) == []


async def test_writes_asked_for_while_a_group_lands_go_together(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first final write starts at once, alone; the ones asked for while it lands form
    the next group, and a write asked for once all have landed starts at once again. Every
    member's future gets its own outcome."""
    _, spool, runs = spool_with(tmp_path, {f"{n}.prompt": n for n in "abcdefg"})
    sizes: list[int] = []

    def counted(spool: Spool, finals: list[Final]) -> list[Settled]:
        sizes.append(len(finals))
        return write_group(spool, finals)

    monkeypatch.setattr(durable_writes, "write_group", counted)
    writes = DurableWrites(spool)
    *first, last = list(runs.values())
    futures = [writes.settle(run, succeeded(run.members[0])) for run in first]
    outcomes = await asyncio.gather(*futures)
    assert sizes == [1, 5]
    outcomes.append(await writes.settle(last, succeeded(last.members[0])))
    assert sizes == [1, 5, 1]
    assert outcomes == [spool.done / f"{run.job_id}.{run.source}" for run in runs.values()]


def generating(member: Sidecar) -> Sidecar:
    return member.moved("generating", operation=f"models/m/operations/{member.output}")


def test_operation_names_share_a_group_with_final_states(tmp_path: Path) -> None:
    """A create call's answer (an intermediate state that must survive a power cut) is
    written in the same groups as final states: its record and sidecar hold it, and its job
    stays claimed while the finished ones are archived."""
    _, spool, runs = spool_with(tmp_path, {f"{n}.prompt": n for n in "abcd"})
    a, b, c, d = runs.values()
    writes = [(a, generating(a.members[0])), (b, succeeded(b.members[0])),
              (c, generating(c.members[0])), (d, succeeded(d.members[0]))]
    outcomes = write_group(spool, writes)
    assert outcomes == [None, spool.done / f"{b.job_id}.b.prompt", None,
                        spool.done / f"{d.job_id}.d.prompt"]
    for run, member in writes:
        assert sidecars(spool.outbox)[member.output] == member
        assert read_last(Path(run.path("member-0001.jsonl"))) == member
    assert sorted(os.listdir(spool.jobs)) == sorted(
        f"{run.job_id}.{name}" for run in (a, c) for name in (run.source, "member-0001.jsonl"))


async def test_an_intermediate_state_that_cannot_be_stored_raises(tmp_path: Path) -> None:
    """``DurableWrites.record`` raises the OutputError that kept a state from being stored
    (the caller fails the job), whether the state was written alone or in a group."""
    _, spool, runs = spool_with(tmp_path, {f"{n}.prompt": n for n in "abcde"})
    (spool.outbox / "a.json").unlink()
    (spool.outbox / "a.json").mkdir()
    writes = DurableWrites(spool)
    a, *others = runs.values()
    for together in ([a], [*others, a]):  # alone; in a group (the first write starts alone)
        results = await asyncio.gather(
            *(writes.record(run, generating(run.members[0])) for run in together),
            return_exceptions=True)
        assert isinstance(results[-1], OutputError)
        assert "Cannot write the sidecar a.json" in results[-1].message
        assert results[:-1] == [None] * (len(together) - 1)


def staged_videos(outbox: Path, names: str) -> list[list[Staged]]:
    """One whole video per name under its partial name, each a member's list."""
    partial_dir = outbox / ".partial"
    partial_dir.mkdir(exist_ok=True)
    videos = []
    for name in names:
        partial = partial_dir / f"{name}.job.1.mp4.part"
        partial.write_bytes(b"\0\0\0\x18ftyp" + name.encode() * 1000)
        videos.append([Staged(partial, outbox / f"{name}.mp4")])
    return videos


@pytest.mark.parametrize("grouped", [True, False])
def test_staged_videos_get_their_names_and_a_taken_name_fails_its_member_alone(
        tmp_path: Path, grouped: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Published together (two flushes of the filesystem, however many videos) or one by one
    (each file and the directory flushed, no filesystem flush), every video ends under its
    public name with its bytes, and its partial file is gone; a name taken by a directory
    is that member's OutputError, and the others are published all the same."""
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    (outbox / "b.mp4").mkdir()
    (outbox / "b.mp4" / "keep").touch()
    videos = staged_videos(outbox, "abcde")
    assert len(videos) >= GROUP_SYNC_FROM
    flushed: list[Path] = []

    def counted(path: str | Path) -> None:
        flushed.append(Path(path))
        syncfs(path)

    monkeypatch.setattr(writer, "syncfs", counted)
    if grouped:
        outcomes = publish_videos(videos)
    else:
        outcomes = [publish_videos([staged])[0] for staged in videos]
    assert flushed == ([outbox, outbox] if grouped else [])
    assert isinstance(outcomes[1], OutputError)
    assert outcomes[1].message.startswith("Cannot publish b.mp4: ")
    assert outcomes[:1] + outcomes[2:] == [None] * 4
    for name in "acde":
        assert (outbox / f"{name}.mp4").read_bytes()[4:] == b"ftyp" + name.encode() * 1000
    assert os.listdir(outbox / ".partial") == ["b.job.1.mp4.part"]


def test_a_failed_flush_of_the_videos_fails_them_all_and_renames_none(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If the flush before the renames reports a write error, no video's bytes can be
    trusted: every member gets the error, and no video takes its public name."""
    outbox = tmp_path / "outbox"
    outbox.mkdir()

    def broken_disk(path: str | Path) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO), os.fspath(path))

    monkeypatch.setattr(writer, "syncfs", broken_disk)
    outcomes = publish_videos(staged_videos(outbox, "abcd"))
    assert {o.message for o in outcomes if isinstance(o, OutputError)} == {
        "Cannot make the videos durable: Input/output error."}
    assert len(outcomes) == 4
    assert sorted(os.listdir(outbox)) == [".partial"]


async def test_a_video_that_cannot_be_published_raises_for_its_member(tmp_path: Path) -> None:
    """``DurableWrites.publish`` returns once the member's videos have their names, and
    raises the OutputError that kept one from its name (the caller fails the member)."""
    _, spool, _ = spool_with(tmp_path, {})
    (spool.outbox / "b.mp4").mkdir()
    (spool.outbox / "b.mp4" / "keep").touch()
    a, b = staged_videos(spool.outbox, "ab")
    writes = DurableWrites(spool)
    results = await asyncio.gather(writes.publish(a), writes.publish(b),
                                   return_exceptions=True)
    assert results[0] is None and isinstance(results[1], OutputError)
    assert (spool.outbox / "a.mp4").exists()
