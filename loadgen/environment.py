"""An experiment's environment bundle (``bundle.json``): what makes it reproducible — versions, kernel,
git commit, seed, the stack and its profiles, each tier's limits, device and host (the link backend in
force and each network's measured fidelity are added as the experiment goes)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from importlib import metadata
from typing import Any

from loadgen.planning import PROJECT_ROOT
from loadgen.spec import ExperimentSpec
from loadgen.target import Stack


def environment_bundle(stack: Stack, spec: ExperimentSpec) -> dict[str, Any]:
    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=PROJECT_ROOT, check=False, timeout=5
            ).stdout.strip()
            or None
        )
    except OSError:
        commit = None
    statuses = {t: stack.status(t) for t in stack.urls}
    return {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_commit": commit,
        "python": sys.version.split()[0],
        "kernel": platform.release(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "versions": {k: version(k) for k in ("onnxruntime", "numpy", "fastapi", "uvicorn", "tierlab")},
        "seed": spec.seed,
        "stack": stack.state.model_dump(include={"runtime", "profile", "network", "images", "subjects", "nodes"}),
        "tiers": {
            t: status.model_dump(mode="json", include={"limits", "onnxruntime", "device", "device_model", "host"})
            for t, status in statuses.items()
        },
        "networks": {},
    }
