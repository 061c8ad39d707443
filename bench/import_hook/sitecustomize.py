"""Import hooks for ``bench/worker_memory.py``.

VOICE_HIDDEN_MODULES (comma-separated top-level names): those imports fail as if the package were
not installed (``--pinned-only``: what requirements.txt does not pin, as in the run command's venv).

Memory, for ``--imports``: with this folder on PYTHONPATH and
VOICE_IMPORT_MEMORY_REPORT set, every module's load is timed in resident memory instead of
seconds (like ``python -X importtime``), and at exit the process writes, per package, the RSS its
modules added while they ran (their own imports of other packages excluded) and who imported it
first. Without the variable it does nothing.
"""

from __future__ import annotations

import atexit
import importlib._bootstrap as bootstrap
import json
import os
import threading
from typing import Any

_REPORT = os.environ.get("VOICE_IMPORT_MEMORY_REPORT")
_HIDDEN = frozenset(filter(None, os.environ.get("VOICE_HIDDEN_MODULES", "").split(",")))
_PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


def _rss_kb() -> int:
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * _PAGE_KB


def _package(name: str) -> str:
    """What a module's cost is reported under: its top-level package; the service's own modules one by one."""
    return name if name.startswith("app.") else name.split(".", 1)[0]


def _install(report: str) -> None:
    original = bootstrap._load_unlocked
    local = threading.local()
    own_kb: dict[str, int] = {}
    importer: dict[str, str] = {}
    pid = os.getpid()

    def load_unlocked(spec: Any) -> Any:
        stack = local.__dict__.setdefault("stack", [])
        frame = [spec.name, 0]
        before = _rss_kb()
        stack.append(frame)
        try:
            return original(spec)
        finally:
            stack.pop()
            total = _rss_kb() - before
            own_kb[spec.name] = own_kb.get(spec.name, 0) + total - frame[1]
            importer.setdefault(spec.name, stack[-1][0] if stack else "(code running, not an import)")
            if stack:
                stack[-1][1] += total

    bootstrap._load_unlocked = load_unlocked

    def write() -> None:
        if os.getpid() != pid:  # a forked child: the parent writes the report
            return
        packages: dict[str, dict[str, Any]] = {}
        for name, kb in own_kb.items():  # in the order the modules finished loading
            package = packages.setdefault(_package(name), {"kb": 0, "modules": 0, "first_by": ""})
            package["kb"] += kb
            package["modules"] += 1
        for name in importer:
            package = packages[_package(name)]
            parent = importer[name]
            if not package["first_by"] and _package(parent) != _package(name):
                package["first_by"] = parent
        hwm = 0
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
        with open(report, "w") as out:
            json.dump({"packages": packages, "hwm_kb": hwm, "modules": own_kb}, out)

    atexit.register(write)


class _Hide:
    """A finder that reports hidden packages as missing."""

    @staticmethod
    def find_spec(name: str, path: Any = None, target: Any = None) -> None:
        if name.split(".", 1)[0] in _HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r} (hidden: not pinned in requirements.txt)", name=name)


if _HIDDEN:
    import sys

    sys.meta_path.insert(0, _Hide())  # type: ignore[arg-type]
if _REPORT:
    _install(_REPORT)
