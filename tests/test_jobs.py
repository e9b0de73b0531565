"""Job files: decoding, every validation error, output names, the capability table."""

from __future__ import annotations

import os
import re
import time
from datetime import UTC, datetime
from typing import Any

import pytest

from reeldrop.config import load
from reeldrop.errors import InvalidJob
from reeldrop.jobs import check_output_name, is_job_name, parse
from reeldrop.sidecar import now
from reeldrop.spool import new_job_id

CONFIG = load(environ={})


def refuse(source: str, data: bytes | str, config: Any = CONFIG) -> str:
    raw = data.encode() if isinstance(data, str) else data
    with pytest.raises(InvalidJob) as info:
        parse(source, raw, config)
    return info.value.message


def test_prompt_file_is_the_whole_stripped_text_with_config_defaults() -> None:
    """A .prompt file is its stripped text; the model and options come from the config."""
    [m] = parse("sunset beach.prompt", b"  A sunset.\nWaves.\n\n", CONFIG)
    assert m.prompt == "A sunset.\nWaves."
    assert m.model == "veo-3.1-generate-preview"
    assert m.parameters == {}
    assert m.output == "sunset_beach"


def test_json_job_carries_options_metadata_and_output() -> None:
    """Every documented field of a .json job arrives in the member, metadata untouched."""
    data = ('{"prompt": "p", "negative_prompt": "n", "model": "veo-3.1-fast-generate-preview",'
            '"aspect_ratio": "9:16", "resolution": "1080p", "duration_seconds": 8,'
            '"person_generation": "allow_all", "enhance_prompt": true, "output": "clip",'
            '"metadata": {"a": [1, {"b": null}]}}')
    [m] = parse("x.json", data.encode(), CONFIG)
    assert m.model == "veo-3.1-fast-generate-preview"
    assert m.parameters == {"aspect_ratio": "9:16", "resolution": "1080p", "duration_seconds": 8,
                            "negative_prompt": "n", "person_generation": "allow_all",
                            "enhance_prompt": True}
    assert m.output == "clip"
    assert m.metadata == {"a": [1, {"b": None}]}


def test_array_members_are_named_stem_dash_index() -> None:
    """An array's members default to STEM-1, STEM-2, …; an explicit output wins."""
    members = parse("board.json", b'[{"prompt":"a"},{"prompt":"b","output":"end"},{"prompt":"c"}]',
                    CONFIG)
    assert [m.output for m in members] == ["board-1", "end", "board-3"]


@pytest.mark.parametrize(("data", "needle"), [
    ('[{"prompt":"a"},{"prompt":"b"},{"prompt":"c","duration_seconds":"8"}]',
     "$[2].duration_seconds"),
    ('{"prompt":"a","colour":"red"}', "unknown field `colour`"),
    ('{"prompt": 5}', "$.prompt"),
    ('{"negative_prompt": "x"}', "missing required field `prompt`"),
    ('{"prompt": ""}', "$.prompt"),
    ('{"prompt": "  \\n "}', "blank"),
    ('"just a string"', "JSON object or a list of objects, not str"),
    ("[1, 2]", "$[0]"),
    ("[]", "empty list"),
    ("{not json", "not valid JSON"),
    ('{"prompt":"a","resolution":"1080p","duration_seconds":4}', "only 8 seconds"),
    ('{"prompt":"a","resolution":"8k"}', "resolution = '8k' is not supported"),
    ('{"prompt":"a","aspect_ratio":"4:3"}', "use one of 16:9, 9:16"),
    ('{"prompt":"a","duration_seconds":5}', "duration_seconds = 5"),
    ('{"prompt":"a","model":"veo-9"}', "Unknown model 'veo-9'"),
    ('{"prompt":"a","model":"veo-3.1-lite-generate-preview","resolution":"4k"}', "4k"),
    ('[{"prompt":"a","output":"x"},{"prompt":"b","output":"x"}]', "share the output name 'x'"),
])
def test_invalid_json_jobs_are_refused_with_a_pointed_message(data: str, needle: str) -> None:
    """Each kind of bad job gives an InvalidJob whose sentence points at the problem."""
    assert needle in refuse("job.json", data)


def test_non_utf8_and_empty_files_are_refused() -> None:
    """Bytes that are not UTF-8, and empty files, are refused with a sentence saying so."""
    assert "not UTF-8" in refuse("a.prompt", b"caf\xe9")
    assert "not UTF-8" in refuse("a.json", b'{"prompt": "caf\xe9"}')
    assert "empty" in refuse("a.prompt", b"")
    assert "empty" in refuse("a.json", b"  \n")


def test_a_prompt_file_with_a_byte_order_mark_is_read_and_its_bad_byte_named() -> None:
    """A UTF-8 byte order mark is not part of the prompt, and a bad byte after one is named
    with its offset in the file (the mark counted), not an offset into the rest."""
    assert parse("a.prompt", b"\xef\xbb\xbfa fox", CONFIG)[0].prompt == "a fox"
    assert "byte 0xff at offset 6" in refuse("a.prompt", b"\xef\xbb\xbfhi \xff")
    assert "byte 0xe9 at offset 3" in refuse("a.prompt", b"caf\xe9")


def test_prompt_length_and_array_size_caps() -> None:
    """Prompts over max_prompt_chars and arrays over max_array_jobs are refused, not crashed on."""
    small = load(environ={}, flags={"max_prompt_chars": 10, "max_array_jobs": 3})
    assert "limit is 10" in refuse("a.prompt", "x" * 11, small)
    assert "limit is 3" in refuse("a.json", '[{"prompt":"a"}]' * 0 + str(
        [{"prompt": "a"}] * 4).replace("'", '"'), small)


@pytest.mark.parametrize("bad", ["../x", "/etc/x", "a/b", "a\\b", "", "  ", ".", "..",
                                 ".hidden", "x\0y", "CON", "nul.txt", "tab\there", "x" * 200])
def test_unsafe_output_names_are_refused(bad: str) -> None:
    """An output that is a path, hidden, empty, reserved or absurd never reaches the outbox."""
    with pytest.raises(InvalidJob):
        check_output_name(bad)


def test_output_names_are_sanitised() -> None:
    """Characters outside letters, digits, '.', '-' and '_' become '_'."""
    assert check_output_name("my clip (final)!") == "my_clip_final"
    assert check_output_name("été-2026.v2") == "été-2026.v2"


def test_the_config_extends_the_capability_table(tmp_path: Any) -> None:
    """A new model needs only a [models] entry in the config, no code change."""
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text('[models."veo-4-preview"]\nresolutions = {"720p" = [5, 10]}\n')
    cfg = load(cfg_file, environ={})
    [m] = parse("a.json", b'{"prompt":"a","model":"veo-4-preview","duration_seconds":10}', cfg)
    assert m.model == "veo-4-preview"
    assert "use one of 5, 10" in refuse(
        "a.json", '{"prompt":"a","model":"veo-4-preview","duration_seconds":8}', cfg)


@pytest.mark.parametrize(("name", "taken"), [
    ("a.prompt", True), ("a.json", True), (".a.prompt", False), ("a.prompt.tmp", False),
    ("a.part", False), ("a.json~", False), ("a.txt", False), (".json", False), ("a.mp4", False),
])
def test_which_names_the_inbox_takes(name: str, taken: bool) -> None:
    """Only NAME.prompt and NAME.json are jobs; dotfiles and temporary names are ignored."""
    assert is_job_name(name) is taken


def test_timestamps_are_rfc3339_utc_milliseconds_of_the_current_time(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``now()`` (built from a kept second's text) reads as ``isoformat`` would: UTC even
    where local time is not, three digits of milliseconds, cut not rounded, and the current
    time, across a change of second."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        seconds: set[str] = set()
        deadline = time.monotonic() + 3
        while len(seconds) < 2 and time.monotonic() < deadline:
            before = datetime.now(UTC).isoformat(timespec="milliseconds")[:23] + "Z"
            stamp = now()
            after = datetime.now(UTC).isoformat(timespec="milliseconds")[:23] + "Z"
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", stamp), stamp
            assert before <= stamp <= after
            seconds.add(stamp[:19])
        assert len(seconds) >= 2
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_job_ids_are_unique_sortable_and_differ_in_a_forked_child() -> None:
    """Job ids start with their UTC second, carry 64 random bits, never a dot, do not repeat
    (20,000 drawn within a second or two: with 32 bits one repeated in about one run in 20),
    and a forked child does not repeat its parent's next ids."""
    ids = [new_job_id() for _ in range(20000)]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{16}", i) for i in ids)
    assert ids == sorted(ids, key=lambda i: i[:16])
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next id, to the parent
        os.write(writer, new_job_id().encode())
        os._exit(0)
    os.close(writer)
    child = os.read(reader, 64).decode()
    os.close(reader)
    os.waitpid(pid, 0)
    assert child[-16:] != new_job_id()[-16:]
