"""The import rules between tierlab's parts (``[tool.importlinter]`` in ``pyproject.toml``, run by ``make
check``): they hold on the code as it is, and a forbidden import breaks them. Each run lints a copy of the
packages, so the probe never touches the working tree."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("services", "loadgen", "operators", "benchmarks")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint(tree: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=tree, env=env, capture_output=True, text=True, timeout=300, check=False
    )


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not LINT_IMPORTS.exists():
        pytest.fail(f"import-linter is not installed beside {sys.executable} (pip install -e '.[dev]')")
    copy = tmp_path_factory.mktemp("imports")
    for package in PACKAGES:
        shutil.copytree(ROOT / package, copy / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    return copy


def test_the_import_rules_hold_on_the_code(tree: Path) -> None:
    result = lint(tree)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("loadgen/probe.py", "from services.stack import runtime", "never services.stack"),
        ("loadgen/probe.py", "import operators.blackbox", "never import each other"),
        ("services/contracts/probe.py", "from loadgen import target", "import nothing of tierlab's"),
    ],
)
def test_a_forbidden_import_breaks_the_check(tree: Path, module: str, line: str, contract: str) -> None:
    probe = tree / module
    probe.write_text(f'"""A forbidden import."""\n\n{line}\n')
    try:
        result = lint(tree)
    finally:
        probe.unlink()
    assert result.returncode != 0, result.stdout
    broken = result.stdout.split("Broken contracts")[-1]
    assert contract in " ".join(broken.split()), result.stdout
    assert module.removesuffix(".py").replace("/", ".") in result.stdout
