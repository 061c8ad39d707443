"""requirements.txt is what the run command installs: it must pin everything its packages need.

The test suite installs more (pytest brings packaging, for one), so a runtime dependency missing
from requirements.txt would pass every other test and still break `bash scripts/run.sh`.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, requires

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.support import ROOT


def pinned() -> dict[str, Requirement]:
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    found = [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]
    return {canonicalize_name(r.name): r for r in found}


def test_every_runtime_dependency_is_pinned() -> None:
    pins = pinned()
    assert all(str(r.specifier).startswith("==") for r in pins.values())
    missing = []
    for name, requirement in pins.items():
        try:
            declared = requires(name) or []
        except PackageNotFoundError:
            missing.append(f"{name} (pinned but not installed)")
            continue
        for entry in map(Requirement, declared):
            wanted = entry.marker is None or any(
                entry.marker.evaluate({"extra": extra}) for extra in (requirement.extras or {""})
            )
            if wanted and canonicalize_name(entry.name) not in pins:
                missing.append(f"{entry.name} (needed by {name}{sorted(requirement.extras) or ''})")
    assert missing == []


# What the Procfile's processes import: web, worker and beat (with the Redis transport), flower,
# the CLI and the run command's process manager.
PROCESS_MODULES = [
    "wsgi", "worker", "worker.__main__", "app.plumbing.transport", "app.operating.cli", "app.operating.simulator",
    "kombu.transport.redis",
    "celery.apps.worker", "celery.apps.beat", "flower.command", "gunicorn.app.wsgiapp", "gunicorn.workers.gthread",
    "honcho.command", "psycopg", "flask_migrate.cli",
]


def test_the_processes_import_with_only_the_pinned_packages(tmp_path) -> None:
    """Import what the processes import with every third-party package that requirements.txt does
    not pin hidden, as in the venv the run command makes: optional imports fail quietly there,
    required ones fail here."""
    import subprocess
    import sys

    script = f"""
import importlib, importlib.abc, re, sys
from importlib.metadata import packages_distributions
def canonicalize_name(name):  # packaging's rule, without importing packaging before the hiding starts
    return re.sub(r"[-_.]+", "-", name).lower()
pinned = {sorted(pinned())!r}
owners = packages_distributions()

class HideUnpinned(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        dists = {{canonicalize_name(d) for d in owners.get(top, [])}}
        if dists and not dists & set(pinned):
            raise ModuleNotFoundError(f"No module named {{name!r}} (not pinned in requirements.txt)", name=name)
        return None

sys.meta_path.insert(0, HideUnpinned())
for name in {PROCESS_MODULES!r}:
    importlib.import_module(name)
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={"DATABASE_URL": f"sqlite:///{tmp_path / 'voice.db'}", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-1500:]
