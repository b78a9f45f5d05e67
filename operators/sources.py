"""Which source files shape an artefact, and their hash: the key a cached artefact is rebuilt by.

A module's sources are the module and everything of tierlab's it imports (``operators.*`` and
``services.contracts.*``), followed through their own imports, read from the import statements with
``ast`` (imports inside functions count too). So a contracts module the operators never load (the link and
transport specs, the device calibration) can change without rebuilding a model, and a change to what only
the black-box operators or the evaluation use re-makes the variants without retraining their models.
"""

from __future__ import annotations

import ast
import hashlib
from collections.abc import Iterable
from pathlib import Path

import operators

PACKAGE = Path(operators.__file__).parent
CONTRACTS = PACKAGE.parent / "services" / "contracts"


def _imported(file: Path) -> list[Path]:
    """The operators and contracts modules ``file`` imports."""
    found: list[Path] = []
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module in ("services.contracts", "operators"):
            names = [f"{node.module}.{a.name}" for a in node.names]  # from services.contracts import x
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if name.startswith("services.contracts.") and (CONTRACTS / f"{parts[2]}.py").exists():
                found.append(CONTRACTS / f"{parts[2]}.py")
            elif parts[0] == "operators" and len(parts) > 1 and (PACKAGE / f"{parts[1]}.py").exists():
                found.append(PACKAGE / f"{parts[1]}.py")
    return found


def sources_of(roots: Iterable[Path]) -> list[Path]:
    """``roots`` and every operators or contracts module they import, followed through their imports."""
    wanted, found = list(roots), []
    while wanted:
        file = wanted.pop(0)
        if file not in found:
            found.append(file)
            wanted += _imported(file)
    return sorted(found)


def hash_of(files: Iterable[Path]) -> str:
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.read_bytes())
    return digest.hexdigest()[:16]
