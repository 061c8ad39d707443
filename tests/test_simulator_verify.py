"""``flask voice simulate --verify``: reads every recording back and says, per recording, pass or fail."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.operating.simulator import Check, differences, table
from tests.e2e.stack import API_KEY, BIN, Stack
from tests.support import ROOT


def test_differences_name_each_field_that_is_not_as_expected() -> None:
    expected = {"status": "completed", "duration": 42, "recording_url": "https://x.example/a.mp3",
                "participants": {"+254700000001": "completed"}}
    assert differences(expected, dict(expected)) == []
    assert differences(expected, None) == ["missing"]
    held = {**expected, "duration": 41, "participants": {"+254700000001": "busy"}}
    assert differences(expected, held) == ["duration", "participants"]
    lines = table([Check("S1", expected, dict(expected)), Check("S2", expected, held, ["duration", "participants"]),
                   Check("S3", expected, None, ["missing"])]).splitlines()
    assert lines[0].split() == ["session", "expected", "held", "result"]
    assert lines[1].startswith("S1") and lines[1].endswith("PASS")
    assert lines[2].endswith("FAIL duration,participants") and "41s" in lines[2]
    assert lines[3].endswith("FAIL missing") and "(none)" in lines[3]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = Path(tmp_path_factory.mktemp("simulate-verify"))
    stack = Stack(workdir, f"sqlite:///{workdir / 'voice.db'}")
    try:
        yield stack.start()
    finally:
        stack.stop()


def simulate(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "flask"), "--app", "wsgi", "voice", "simulate",
         "--url", f"http://127.0.0.1:{stack.port}/api/v1/voice/webhook", *args],
        cwd=ROOT, env=stack.env(), capture_output=True, text=True, timeout=300)


@pytest.mark.e2e
def test_verify_passes_every_recording_the_service_applied(stack: Stack) -> None:
    done = simulate(stack, "--calls", "12", "--participants", "3", "--duplicates", "0.3", "--seed", "21",
                    "--verify", "--api-key", API_KEY)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("ATVoice_sim_21_")]
    assert len(rows) == 12 and all(row.endswith("PASS") for row in rows)
    assert '"verified": {"passed": 12, "failed": 0}' in done.stdout.splitlines()[-1]
    assert "calls sent: 12/12" in done.stderr  # the progress, on stderr


@pytest.mark.e2e
def test_verify_fails_and_exits_non_zero_when_a_recording_holds_something_else(stack: Stack) -> None:
    # The same sessions played twice with different participants: the second run's expectation
    # (one participant) cannot match what the service holds (the first run's three, and the new one).
    assert simulate(stack, "--calls", "3", "--participants", "3", "--seed", "22").returncode == 0
    stack.wait_until_idle()
    done = simulate(stack, "--calls", "3", "--participants", "1", "--seed", "22", "--duplicates", "0",
                    "--verify", "--api-key", API_KEY, "--verify-timeout", "20")
    assert done.returncode == 1, done.stdout + done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("ATVoice_sim_22_")]
    assert len(rows) == 3 and all("FAIL" in row and "participants" in row for row in rows)
    assert '"failed": 3' in done.stdout.splitlines()[-1]


@pytest.mark.e2e
def test_verify_needs_an_api_key_and_a_good_one(stack: Stack) -> None:
    done = simulate(stack, "--calls", "1", "--verify")
    assert done.returncode == 2 and "--api-key" in done.stderr
    done = simulate(stack, "--calls", "1", "--seed", "23", "--verify", "--api-key", "wrong-key")
    assert done.returncode == 1 and "401" in done.stderr and "Traceback" not in done.stderr
