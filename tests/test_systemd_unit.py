"""The shipped unit: `systemd-analyze verify` says nothing, and the exposure score is ≤ 1.5."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).parent.parent / "systemd" / "reeldrop.service"
analyze = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(analyze is None, reason="systemd-analyze is not installed")


def test_the_unit_never_takes_the_key_from_its_own_text() -> None:
    """The key comes through LoadCredential, never Environment= in a world-readable unit."""
    text = UNIT.read_text()
    assert "LoadCredential=gemini-api-key:" in text
    assert not re.search(r"^Environment=.*(KEY|key)", text, re.M)
    assert "RestartPreventExitStatus=2" in text


@needs_analyze
def test_verify_is_clean(tmp_path: Path) -> None:
    """verify prints nothing at all: it exits 0 even on a misspelled directive."""
    exe = tmp_path / "reeldrop"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    unit = tmp_path / "reeldrop.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/reeldrop", str(exe)))
    done = subprocess.run([str(analyze), "verify", str(unit)], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0
    assert done.stdout.strip() == "" and done.stderr.strip() == "", done.stderr


@needs_analyze
def test_security_exposure_is_at_most_1_5() -> None:
    """`systemd-analyze security --offline=true` scores the unit 1.5 or better."""
    done = subprocess.run([str(analyze), "security", "--offline=true", str(UNIT)],
                          capture_output=True, text=True, check=False)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d)", done.stdout + done.stderr)
    assert match, done.stdout + done.stderr
    assert float(match[1]) <= 1.5
