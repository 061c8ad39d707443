"""A malformed web setting stops gunicorn with one line naming the variable, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT, free_port

BIN = Path(sys.executable).parent


def web_command() -> str:
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.startswith("web: "):
            return line.removeprefix("web: ")
    raise KeyError("web")


@pytest.mark.parametrize(
    ("name", "value"),
    [("WEB_CONCURRENCY", "two"), ("WEB_CONCURRENCY", "0"), ("WEB_CONCURRENCY", "-3"), ("WEB_THREADS", "four"),
     ("WEB_THREADS", "0"), ("PORT", "http"), ("PORT", "70000")],
)
def test_the_web_process_names_a_bad_setting(name: str, value: str, tmp_path: Path) -> None:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
           "HOST": "127.0.0.1", "PORT": str(free_port()), name: value}
    done = subprocess.run(["bash", "-c", web_command()], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode != 0
    assert f"{name} must be an integer" in done.stderr and repr(value) in done.stderr.replace('"', "'")
    assert "Traceback" not in done.stderr
