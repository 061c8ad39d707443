"""pip-audit over the pinned requirements, with a dated, reasoned exception list.

Fails on any known vulnerability not excepted in .ci/audit-exceptions.txt. Says plainly how many
packages could not be audited (the vulnerability service unreachable, or a package it does not
know), instead of letting "No known vulnerabilities found" stand for "nothing was checked".
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXCEPTIONS = ROOT / ".ci" / "audit-exceptions.txt"


def exceptions() -> dict[str, str]:
    """``ID  YYYY-MM-DD  reason`` per line; # starts a comment."""
    found = {}
    for line in EXCEPTIONS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            vuln_id, date, reason = line.split(None, 2)
            found[vuln_id] = f"{date}: {reason}"
    return found


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[_normal(name)] = version.strip()
    return pins


def _from_latest_release(dependency: dict, ignored: dict[str, str]) -> None:
    """Where PyPI's per-version data is out of reach but its project page is not: a package
    pinned at its latest release is audited from the vulnerabilities PyPI lists for that release
    (the same data pip-audit's PyPI service reads)."""
    url = f"https://pypi.org/pypi/{dependency['name']}/json"
    try:
        with urllib.request.urlopen(url, timeout=20) as response:
            project = json.load(response)
    except (OSError, ValueError):
        return
    dependency.setdefault("version", _pins().get(_normal(dependency["name"]), ""))
    if project.get("info", {}).get("version") != dependency["version"]:
        return
    dependency.pop("skip_reason")
    dependency["vulns"] = [
        {"id": v["id"], "fix_versions": v.get("fixed_in") or []}
        for v in project.get("vulnerabilities", [])
        if v["id"] not in ignored and not set(v.get("aliases", [])) & set(ignored)
    ]


def main() -> int:
    ignored = exceptions()
    command = [sys.executable, "-m", "pip_audit", "-r", str(ROOT / "requirements.txt"), "--no-deps", "--disable-pip",
               "--format", "json", "--progress-spinner", "off"]
    for vuln_id in ignored:
        command += ["--ignore-vuln", vuln_id]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)  # noqa: S603 - our own argv
    try:
        report = json.loads(done.stdout)
    except ValueError:
        print(f"pip-audit did not run to a report (exit {done.returncode}):\n{done.stderr[-2000:]}")
        return 1
    dependencies = report.get("dependencies", [])
    for dependency in dependencies:
        if dependency.get("skip_reason"):
            _from_latest_release(dependency, ignored)
    vulnerable = [d for d in dependencies if d.get("vulns")]
    skipped = [d for d in dependencies if d.get("skip_reason")]
    for dependency in vulnerable:
        for vuln in dependency["vulns"]:
            fixes = ", ".join(vuln.get("fix_versions", [])) or "no fix yet"
            print(f"VULNERABLE {dependency['name']} {dependency['version']}: {vuln['id']} (fixed in {fixes})")
    for vuln_id, why in ignored.items():
        print(f"excepted {vuln_id} ({why})")
    audited = len(dependencies) - len(skipped)
    print(f"pip-audit: {audited} of {len(dependencies)} pinned packages audited, {len(vulnerable)} vulnerable")
    if skipped:
        print(f"pip-audit: {len(skipped)} could NOT be audited here: {', '.join(d['name'] for d in skipped)}")
        if not audited:
            print("  the vulnerability service is out of reach: this run checked nothing; audit elsewhere")
    return 1 if vulnerable else 0


if __name__ == "__main__":
    sys.exit(main())
