"""app/ imports one way: each layer only from the layers below it (pyproject.toml's
[tool.importlinter] contract, checked by import-linter's lint-imports)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from tests.support import ROOT

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def test_app_imports_run_down_the_layers() -> None:
    done = subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"an import runs up the layers:\n{done.stdout[-4000:]}\n{done.stderr[-2000:]}"
    assert "1 kept, 0 broken" in done.stdout


def test_every_package_of_app_is_in_a_layer() -> None:
    """A package added to app/ and left out of the contract would be checked by nobody."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
    named = {part.strip() for layer in config["layers"] for part in layer.split("|")}
    app = ROOT / "app"
    present = {p.name for p in app.iterdir() if (p / "__init__.py").exists()}
    present |= {p.stem for p in app.glob("*.py") if p.name != "__init__.py"}
    assert present == named, (f"in app/ but not in a layer: {sorted(present - named)}; "
                              f"named but gone: {sorted(named - present)}")
