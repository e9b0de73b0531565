"""The commands people type: demo, validate, and the config they read."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from reeldrop.config import Secret, load
from reeldrop.errors import ConfigError

from .support import REELDROP, daemon_args, playable_frames


def test_demo_turns_the_examples_into_playable_videos(tmp_path: Path) -> None:
    """`reeldrop demo` exits 0, prints its table, and leaves one playable MP4 per example job."""
    outbox = tmp_path / "out"
    done = subprocess.run([*REELDROP, "demo", "--outbox", str(outbox)], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "7 of 7 succeeded" in done.stdout
    videos = sorted(outbox.glob("*.mp4"))
    assert len(videos) == 7
    assert all(playable_frames(v) > 0 for v in videos)


def test_validate_reports_each_file_and_fails_on_any_bad_one(tmp_path: Path) -> None:
    """`reeldrop validate` says ok/invalid per file with the reason, exit 1 if any is invalid."""
    good = tmp_path / "good.json"
    good.write_text('[{"prompt": "a"}, {"prompt": "b"}]')
    bad = tmp_path / "bad.json"
    bad.write_text('{"prompt": "a", "resolution": "4k", "duration_seconds": 4}')
    done = subprocess.run([*REELDROP, "validate", str(good), str(bad)], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 1
    assert "ok       " in done.stdout and "good-1, good-2" in done.stdout
    assert "invalid  " in done.stdout and "only 8 seconds" in done.stdout
    ok = subprocess.run([*REELDROP, "validate", str(good)], capture_output=True, check=False)
    assert ok.returncode == 0


def test_settings_come_from_file_then_environment_then_flags(tmp_path: Path) -> None:
    """Later sources win: flags over REELDROP_* over the TOML file; modes parse as octal."""
    cfg = tmp_path / "c.toml"
    cfg.write_text('concurrency = 2\npoll_max_s = 5.0\nmodel = "veo-3.1-fast-generate-preview"\n')
    env = {"REELDROP_CONCURRENCY": "3", "REELDROP_POLL_MAX_S": "7", "REELDROP_FILE_MODE": "0660"}
    config = load(cfg, environ=env, flags={"concurrency": "9"})
    assert config.concurrency == 9
    assert config.poll_max_s == 7.0
    assert config.model == "veo-3.1-fast-generate-preview"
    assert config.file_mode == 0o660


def test_a_state_dir_on_another_filesystem_than_the_inbox_stops_the_start(
        tmp_path: Path) -> None:
    """Claims are renames from the inbox into the state directory, atomic only within one
    filesystem: `reeldrop run` refuses a state directory elsewhere at start (exit 2, the
    reason and the remedy on stderr) rather than copying files later."""
    elsewhere = Path("/dev/shm")
    if not elsewhere.is_dir() or elsewhere.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs a second filesystem at /dev/shm")
    state = elsewhere / f"reeldrop-test-{tmp_path.name}"
    try:
        done = subprocess.run(
            [*daemon_args(tmp_path, "http://127.0.0.1:9/v1beta"), "--state-dir", str(state)],
            capture_output=True, text=True, timeout=60, check=False)
    finally:
        shutil.rmtree(state, ignore_errors=True)
    assert done.returncode == 2, done.stdout + done.stderr
    assert (f"reeldrop: The state directory {state} is not on the inbox's filesystem; claims "
            "must be atomic renames. Put it inside or beside the inbox.") in done.stderr


@pytest.mark.parametrize(("text", "needle"), [
    ("concurency = 2\n", "unknown field `concurency`"),
    ("concurrency = 0\n", "concurrency"),
    ("concurrency = [\n", "not valid TOML"),
    ('model = "veo-0"\n', "capability table"),
])
def test_bad_config_files_say_what_is_wrong(tmp_path: Path, text: str, needle: str) -> None:
    """A typo, a bad value or broken TOML is a ConfigError naming the key."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        load(cfg, environ={})


def test_the_key_comes_from_the_environment_and_hides_from_repr(tmp_path: Path) -> None:
    """GEMINI_API_KEY (then GOOGLE_API_KEY) supplies the key; repr never shows it."""
    config = load(environ={"GOOGLE_API_KEY": "g-key", "GEMINI_API_KEY": "gem-key"})
    assert config.api_key == Secret("gem-key")
    assert "gem-key" not in repr(config)
    assert "gem-key" not in str(config.api_key)
    key_file = tmp_path / "key"
    key_file.write_text("file-key\n")
    config = load(environ={"GEMINI_API_KEY": "gem-key"}, flags={"api_key_file": str(key_file)})
    assert config.api_key == Secret("file-key")
