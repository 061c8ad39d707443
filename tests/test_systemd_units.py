"""deploy/systemd/: the units for a host without a platform, checked by systemd itself
(``systemd-analyze verify``) in a root made like an install (/opt/voice and its virtualenv), and
against what the Procfile and the task limits say."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from app.celery_app import TASK_TIME_LIMIT
from app.plumbing.queues import ALL_QUEUES
from tests.support import ROOT

UNITS_DIR = ROOT / "deploy" / "systemd"
UNITS = ("voice-web.service", "voice-worker@.service", "voice-beat.service", "voice-flower.service")
INSTALL = Path("/opt/voice")
EXEC_KEYS = ("ExecStartPre", "ExecStart", "ExecStartPost", "ExecReload", "ExecStop", "ExecStopPost")


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if not found:
        pytest.fail("systemd-analyze is missing: scripts/test.sh installs Debian's systemd package")
    return found


def unit(name: str) -> dict[str, dict[str, list[str]]]:
    """A unit file's settings: section -> key -> every value given (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in (UNITS_DIR / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def service(name: str) -> dict[str, list[str]]:
    return unit(name)["Service"]


def one(name: str, key: str) -> str:
    values = service(name).get(key, [])
    assert len(values) == 1, f"{name}: {key} given {len(values)} times"
    return values[0]


def exec_paths(name: str) -> set[str]:
    """The programs a unit runs (the first word of each Exec line, without its -@:+! prefixes)."""
    return {shlex.split(value)[0].lstrip("-@:+!") for key in EXEC_KEYS for value in service(name).get(key, [])}


def install_root(tmp_path: Path) -> Path:
    """A filesystem root as a host with the service installed has it: systemd's own units (the
    targets the units order against), the units in /etc/systemd/system, /opt/voice/.venv/bin with
    this virtualenv's programs, and the system programs the units name (those this machine has)."""
    root = tmp_path / "root"
    systemd_units = next((p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if p.is_dir()),
                         None)
    if systemd_units is None:
        pytest.fail("systemd's unit folder is missing: scripts/test.sh installs Debian's systemd package")
    shutil.copytree(systemd_units, root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    for name in UNITS:
        shutil.copy(UNITS_DIR / name, root / "etc/systemd/system" / name)
    (root / "usr/bin").mkdir(parents=True, exist_ok=True)
    for merged in ("bin", "sbin"):
        (root / merged).symlink_to("usr/bin")
    programs = {INSTALL / ".venv/bin" / p.name for p in (ROOT / ".venv/bin").iterdir()}
    programs |= {Path(path) for name in UNITS for path in exec_paths(name)
                 if not path.startswith(str(INSTALL)) and Path(path).exists()}
    for program in programs:
        stub = root / program.relative_to("/")
        stub.parent.mkdir(parents=True, exist_ok=True)
        if not stub.exists():
            stub.write_text("#!/bin/sh\n")
            stub.chmod(0o755)
    return root


@pytest.mark.parametrize("name", [*(n for n in UNITS if not n.endswith("@.service")), "voice-worker@1.service"])
def test_systemd_analyze_verify_finds_nothing(name: str, tmp_path: Path) -> None:
    """Unknown keys, values systemd cannot parse, programs that are not there: systemd prints each
    (often still exiting 0) and the unit would run without that setting. Any line is a failure."""
    root = install_root(tmp_path)
    done = subprocess.run([systemd_analyze(), "verify", f"--root={root}", "--man=no", name], capture_output=True,
                          text=True, timeout=120)
    output = (done.stdout + done.stderr).strip()
    assert done.returncode == 0 and not output, f"systemd-analyze verify {name} (exit {done.returncode}):\n{output}"


def test_verify_would_see_a_bad_unit(tmp_path: Path) -> None:
    """The check above can fail: a misspelt key and a program that is not installed are reported."""
    root = install_root(tmp_path)
    broken = root / "etc/systemd/system/voice-web.service"
    text = broken.read_text().replace("ProtectSystem=strict", "ProtectSytem=strict")
    broken.write_text(text.replace("/.venv/bin/gunicorn ", "/.venv/bin/gunicron "))
    done = subprocess.run([systemd_analyze(), "verify", f"--root={root}", "--man=no", "voice-web.service"],
                          capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert "Unknown key 'ProtectSytem'" in output and "gunicron" in output, output


@pytest.mark.parametrize("name", UNITS)
def test_each_unit_runs_as_the_service_user_with_the_hardening(name: str) -> None:
    settings = service(name)
    assert one(name, "User") == "voice" and one(name, "Group") == "voice"
    assert one(name, "WorkingDirectory") == str(INSTALL)
    assert settings["EnvironmentFile"] == ["/etc/voice/voice.env"]
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes",
                       "ProtectHome": "yes", "Restart": "always"}.items():
        assert one(name, key) == value, f"{name}: {key}"
    # The service's programs from its virtualenv; of the system's, only a shell and kill.
    assert {p for p in exec_paths(name) if not p.startswith(f"{INSTALL}/.venv/bin/")} <= {"/bin/sh", "/bin/kill"}


def test_the_web_unit_runs_the_procfiles_web_command() -> None:
    assert one("voice-web.service", "ExecStart") == f"{INSTALL}/.venv/bin/gunicorn -c gunicorn.conf.py wsgi:app"


def test_the_worker_template_runs_one_solo_worker_per_instance() -> None:
    """Each instance is the Procfile's worker line: one solo process on every queue, a node name of
    its own; systemd replaces it when it dies, and stops it warm for longer than a task may take."""
    name = "voice-worker@.service"
    argv = shlex.split(one(name, "ExecStart"))
    assert argv[:3] == [f"{INSTALL}/.venv/bin/python", "-m", "worker"]
    assert "--pool=solo" in argv
    queues = next(a for a in argv if a.startswith("--queues=")).split("=", 1)[1].split(",")
    assert set(queues) == set(ALL_QUEUES)
    assert "--hostname=worker-%i@%%h" in argv  # %i: the instance; %%h: Celery's own %h
    assert one(name, "KillSignal") == "SIGTERM"
    timeout = one(name, "TimeoutStopSec")
    assert re.fullmatch(r"\d+", timeout) and int(timeout) > TASK_TIME_LIMIT, timeout


def test_the_worker_instances_share_one_metrics_folder_that_outlives_each() -> None:
    """The folder every instance writes to and one serves: under /run (not /tmp, which PrivateTmp
    makes per instance), made by systemd for the unit and kept when one instance stops."""
    name = "voice-worker@.service"
    folders = [v.split("=", 1)[1] for v in service(name)["Environment"] if v.startswith("PROMETHEUS_MULTIPROC_DIR=")]
    assert folders == [f"/run/{one(name, 'RuntimeDirectory')}"]
    assert "%" not in folders[0]  # the same for every instance
    assert one(name, "RuntimeDirectoryPreserve") == "yes"
    web = [v.split("=", 1)[1] for v in service("voice-web.service")["Environment"]
           if v.startswith("PROMETHEUS_MULTIPROC_DIR=")]
    assert web and web != folders  # each role its own folder: no sample served twice


def test_the_beat_unit_keeps_its_schedule_in_its_state_directory() -> None:
    name = "voice-beat.service"
    argv = shlex.split(one(name, "ExecStart"))
    schedule = next(a for a in argv if a.startswith("--schedule=")).split("=", 1)[1]
    assert Path(schedule).parent == Path("/var/lib") / one(name, "StateDirectory")
